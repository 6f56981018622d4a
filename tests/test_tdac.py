"""TDAC reference mode (docs/method.md §2): scores, radius, allocation, assembly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edadm.calib.step_scores import (
    auto_radius,
    density_counts,
    pairwise_step_mse,
    step_statistics,
    tdac_scores,
)
from edadm.calib.tdac import allocate_counts, assemble_reference, tdac_allocation
from edadm.errors import ParamError


def slow_scores(features: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The official per-pair loops (scripts/calibration.py of EDA-DM), in float64."""
    maps = torch.as_tensor(np.asarray(features, dtype=np.float64))
    steps = maps.shape[0]
    mse = np.zeros((steps, steps))
    density = np.zeros(steps, dtype=np.int64)
    diversity = np.zeros(steps)
    for i in range(steps):
        for j in range(steps):
            if i != j:
                mse[i, j] = torch.mean((maps[i] - maps[j]) ** 2).item()
                density[i] += int(mse[i, j] <= radius)
                diversity[i] += torch.sum(1 - F.cosine_similarity(maps[i], maps[j], dim=1, eps=1e-6)).item()
    return mse, density, diversity


def smooth_features(seed: int, steps: int = 20, batch: int = 16, channels: int = 8) -> np.ndarray:
    """[T, B, C, 4, 4] features drifting from one random map to another, slowly at first."""
    rng = np.random.default_rng(seed)
    start = rng.standard_normal((batch, channels, 4, 4))
    end = rng.standard_normal((batch, channels, 4, 4))
    s = (np.linspace(0, 1, steps) ** 2)[:, None, None, None, None]
    noise = 0.05 * rng.standard_normal((steps, batch, channels, 4, 4))
    return ((1 - s) * start + s * end + noise).astype(np.float32)


# ------------------------------------------------------------------------------------------ scores
@pytest.mark.parametrize("chunk_bytes", [1, 2**24])  # one trajectory per chunk / all at once
def test_scores_match_the_per_pair_loops(chunk_bytes):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((7, 5, 6, 2, 3))
    features[2, 1, :, 0, 1] = 0.0  # a zero channel vector: cos = 0 under torch's eps clamp
    features[4, 3, :, 1, 2] *= 1e-8  # below eps: cos shrinks by (||x|| / eps)
    mse_slow, _, diversity_slow = slow_scores(features, 1.0)
    # between two pair MSEs, not on one: a pair exactly at the radius flips with float rounding
    pairs = np.sort(mse_slow[np.triu_indices(7, 1)])
    radius = float(pairs[len(pairs) // 2] + pairs[len(pairs) // 2 + 1]) / 2
    _, density_slow, _ = slow_scores(features, radius)

    stats = step_statistics(features, chunk_bytes=chunk_bytes)
    np.testing.assert_allclose(stats.mse, mse_slow, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats.diversity, diversity_slow, rtol=1e-12)
    density, diversity = tdac_scores(features, radius, chunk_bytes=chunk_bytes)
    np.testing.assert_array_equal(density, density_slow)
    np.testing.assert_allclose(diversity, diversity_slow, rtol=1e-12)


def test_float16_and_torch_inputs():
    features = smooth_features(1, steps=9, batch=6)
    half = features.astype(np.float16)
    mse_slow, _, diversity_slow = slow_scores(half.astype(np.float64), 1.0)
    # Gram in float64: float16 products are exact, so the MSEs match to float64 precision;
    # cosines in float32 per position: ~1e-6 relative on V.
    np.testing.assert_allclose(pairwise_step_mse(half), mse_slow, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(step_statistics(half).diversity, diversity_slow, rtol=2e-6)
    np.testing.assert_allclose(pairwise_step_mse(torch.from_numpy(half)), mse_slow, rtol=1e-10, atol=1e-14)


def test_mse_is_symmetric_with_zero_diagonal():
    mse = pairwise_step_mse(smooth_features(2))
    assert np.array_equal(mse, mse.T)
    assert np.all(np.diag(mse) == 0) and np.all(mse >= 0)


# ------------------------------------------------------------------------------------------ radius
def test_auto_radius_is_a_quantile_of_the_off_diagonal_pairs():
    positions = np.arange(5.0)
    mse = (positions[:, None] - positions[None, :]) ** 2  # pairs: 1 (x4), 4 (x3), 9 (x2), 16
    assert auto_radius(mse, 0.5) == pytest.approx(np.median([1, 1, 1, 1, 4, 4, 4, 9, 9, 16]))
    assert auto_radius(mse, 1.0) == 16.0
    assert auto_radius(mse, 0.1) == pytest.approx(1.0)  # the diagonal zeros do not count
    with pytest.raises(ValueError):
        auto_radius(mse, 0.0)


def test_auto_radius_makes_density_scale_free():
    features = smooth_features(3)
    mse = pairwise_step_mse(features)
    scaled = pairwise_step_mse(features * 8.0)  # a power of 2: exact in float32
    assert auto_radius(scaled) == pytest.approx(64.0 * auto_radius(mse), rel=1e-12)
    np.testing.assert_array_equal(
        density_counts(scaled, auto_radius(scaled)), density_counts(mse, auto_radius(mse))
    )


# -------------------------------------------------------------------------------------- allocation
def test_allocation_rounding_over_scans_back_from_the_last_nonzero_step():
    # density [3, 3, 3, 0] -> D^ = [1, 1, 1, 0]; diversity constant -> V^ = 0; w = [1, 1, 1, 0].
    # n = 5: shares 5/3 = 1.67 -> rounded [2, 2, 2, 0] = 6, one over; scanning back from the
    # last step: step 3 is already 0 (skipped), step 2 loses one -> [2, 2, 1, 0].
    counts = tdac_allocation(np.array([3, 3, 3, 0]), np.full(4, 5.0), n=5, lam=1.2)
    np.testing.assert_array_equal(counts, [2, 2, 1, 0])


def test_allocation_rounding_short_adds_to_the_largest_count():
    # density [0, 1, 1, 1] -> w = [0, 1, 1, 1]; n = 10: shares 3.33 -> [0, 3, 3, 3] = 9, one
    # short; +1 to the largest count, ties to the earliest step -> [0, 4, 3, 3].
    counts = tdac_allocation(np.array([0, 1, 1, 1]), np.zeros(4), n=10, lam=1.2)
    np.testing.assert_array_equal(counts, [0, 4, 3, 3])
    # Two short: n = 11 -> shares 3.67 -> [0, 4, 4, 4] = 12, over by one -> [0, 4, 4, 3].
    np.testing.assert_array_equal(
        tdac_allocation(np.array([0, 1, 1, 1]), np.zeros(4), n=11, lam=1.2), [0, 4, 4, 3]
    )


def test_allocation_rounds_half_to_even():
    # density [0, 1, 3, 4] -> D^ = [0, .25, .75, 1], sum 2 -> shares of n = 12: [0, 1.5, 4.5, 6],
    # exact in binary. Half to even (torch.round in the official code): [0, 2, 4, 6] = 12, no
    # fix needed. Rounding half up would give [0, 2, 5, 6] = 13 and then [0, 2, 5, 5].
    counts = tdac_allocation(np.array([0, 1, 3, 4]), np.ones(4), n=12, lam=1.0)
    np.testing.assert_array_equal(counts, [0, 2, 4, 6])


def test_allocate_counts_from_weights():
    # w = [3, 1, 0, 4], sum 8; n = 6: shares [2.25, 0.75, 0, 3] -> [2, 1, 0, 3] = 6.
    np.testing.assert_array_equal(allocate_counts(np.array([3.0, 1, 0, 4]), 6), [2, 1, 0, 3])
    # n = 10: shares [3.75, 1.25, 0, 5] -> [4, 1, 0, 5] = 10.
    np.testing.assert_array_equal(allocate_counts(np.array([3.0, 1, 0, 4]), 10), [4, 1, 0, 5])
    with pytest.raises(ValueError, match="non-negative"):
        allocate_counts(np.array([1.0, -1.0]), 4)


def test_allocation_mixes_density_and_diversity_with_lambda():
    # D^ = [0, .5, 1, 1], V^ = [0, 1, 0, .5], lambda 2: w = [0, 2.5, 1, 2], sum 5.5.
    # n = 11: shares [0, 5, 2, 4] exactly.
    counts = tdac_allocation(np.array([0, 2, 4, 4]), np.array([10.0, 30, 10, 20]), n=11, lam=2.0)
    np.testing.assert_array_equal(counts, [0, 5, 2, 4])


def test_allocation_with_constant_scores_is_uniform():
    # All weights 0: uniform, 10 / 3 = 3.33 -> [3, 3, 3], the remainder to the earliest step.
    counts = tdac_allocation(np.full(3, 2), np.full(3, 7.0), n=10, lam=1.2)
    np.testing.assert_array_equal(counts, [4, 3, 3])
    np.testing.assert_array_equal(tdac_allocation(np.full(3, 2), np.full(3, 7.0), n=0, lam=1.2), [0, 0, 0])


@pytest.mark.parametrize("seed", range(5))
def test_allocation_always_sums_to_n(seed):
    rng = np.random.default_rng(seed)
    steps = int(rng.integers(2, 200))
    n = int(rng.integers(0, 3000))
    counts = tdac_allocation(rng.integers(0, 50, steps), rng.random(steps), n, lam=float(rng.random() * 5))
    assert counts.sum() == n and counts.min() >= 0 and counts.dtype == np.int64


def test_allocation_regression_fixed_seed():
    features = smooth_features(0)
    stats = step_statistics(features)
    radius = auto_radius(stats.mse)
    density = density_counts(stats.mse, radius)
    counts = tdac_allocation(density, stats.diversity, 256, 1.2)
    assert abs(radius - 0.011488187) < 1e-8
    np.testing.assert_array_equal(density, [4, 4, 4, 5, 6, 3, 3, 2, 2, 2, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(
        counts, [20, 20, 20, 23, 26, 15, 14, 10, 9, 8, 7, 3, 0, 1, 3, 7, 11, 15, 20, 24]
    )
    assert int((np.arange(20) * counts).sum()) == 2116


# ---------------------------------------------------------------------------------------- assembly
def test_assembly_permutes_the_multiset_over_distinct_trajectories():
    counts = np.array([3, 0, 2, 5])
    traj, step = assemble_reference(counts, n_trajectories=12, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(traj, np.arange(10))
    np.testing.assert_array_equal(np.bincount(step, minlength=4), counts)
    again = assemble_reference(counts, 12, np.random.default_rng(0))[1]
    np.testing.assert_array_equal(step, again)


def test_assembly_needs_one_trajectory_per_sample():
    with pytest.raises(ParamError, match=r"select\.size=10") as err:
        assemble_reference(np.array([5, 5]), n_trajectories=9, rng=np.random.default_rng(0))
    assert "dump.trajectories" in str(err.value) and "9 trajectories" in str(err.value)
