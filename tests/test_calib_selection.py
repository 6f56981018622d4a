"""choose_calibration: configs, determinism, baselines, errors, and the knn extension."""

from __future__ import annotations

import numpy as np
import pytest

from edadm.calib.baselines import NDTCConfig, ndtc_steps
from edadm.calib.knn import KNNConfig, knn_mean_distance, pool_features, select_within_steps
from edadm.calib.selection import SelectConfig, allocation_chart, choose_calibration
from edadm.calib.tdac import TDACConfig
from edadm.config import as_dict, from_dict
from edadm.errors import ParamError


def make_features(seed: int = 0, steps: int = 12, batch: int = 40, channels: int = 8) -> np.ndarray:
    """[T, B, C, 4, 4] float16 features drifting between two random maps."""
    rng = np.random.default_rng(seed)
    start = rng.standard_normal((batch, channels, 4, 4))
    end = rng.standard_normal((batch, channels, 4, 4))
    s = (np.linspace(0, 1, steps) ** 2)[:, None, None, None, None]
    return ((1 - s) * start + s * end + 0.05 * rng.standard_normal((steps, batch, channels, 4, 4))).astype(
        np.float16
    )


def config(**overrides) -> SelectConfig:
    return from_dict(SelectConfig, overrides, "select")


TIMESTEPS = np.linspace(999, 0, 12).astype(np.int64)


# ----------------------------------------------------------------------------------------- configs
def test_config_defaults_and_lambda_key():
    cfg = config(tdac={"lambda": 5.0, "radius": 3.0})
    assert cfg.method == "tdac" and cfg.size == 1024 and cfg.tdac.lam == 5.0 and cfg.tdac.radius == 3.0
    assert cfg.tdac.mode == "reference" and cfg.tdac.feature_layer == "mid_block.attentions.0"
    assert as_dict(cfg)["tdac"]["lambda"] == 5.0
    assert (
        config().tdac.radius == "auto"
        and config().uniform.n_steps == 20
        and config().uniform.per_step is None
    )


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"tdac": {"lambda": -1.0}}, "select.tdac.lambda"),
        ({"tdac": {"radius": "big"}}, "select.tdac.radius"),
        ({"tdac": {"radius": -3.0}}, "select.tdac.radius"),
        ({"tdac": {"radius_quantile": 1.5}}, "select.tdac.radius_quantile"),
        ({"tdac": {"mode": "global"}}, "select.tdac.mode"),
        ({"tdac": {"knn": {"k": 0}}}, "select.tdac.knn.k"),
        ({"size": 0}, "select.size"),
        ({"method": "brecq"}, "select.method"),
        ({"uniform": {"n_steps": 0}}, "select.uniform.n_steps"),
        ({"tdac": {"lamda": 1.0}}, "select.tdac.lamda"),
    ],
)
def test_bad_params_name_the_param(overrides, name):
    with pytest.raises(ParamError, match=name.replace(".", r"\.")):
        config(**overrides)


# ------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("method", ["tdac", "ndtc", "random"])
def test_same_seed_same_selection_other_seed_other_selection(method):
    features = make_features()
    first = choose_calibration(config(method=method, size=32, seed=1), 12, 40, features, TIMESTEPS)
    again = choose_calibration(config(method=method, size=32, seed=1), 12, 40, features, TIMESTEPS)
    other = choose_calibration(config(method=method, size=32, seed=2), 12, 40, features, TIMESTEPS)
    assert np.array_equal(first.traj, again.traj) and np.array_equal(first.step, again.step)
    assert not (np.array_equal(first.traj, other.traj) and np.array_equal(first.step, other.step))


def hand_features() -> np.ndarray:
    """[T=4, B=1, C=2, 1, 1]: F_0 = (1, 0), F_1 = (0, 1), F_2 = (0, 2), F_3 = (0, 4)."""
    features = np.zeros((4, 1, 2, 1, 1))
    for i, vector in enumerate([(1, 0), (0, 1), (0, 2), (0, 4)]):
        features[i, 0, :, 0, 0] = vector
    return features


def test_tdac_reference_selection_of_a_hand_computed_example():
    # Pairwise MSEs (mean over the 2 elements): (0,1) 1, (0,2) 2.5, (0,3) 8.5, (1,2) 0.5,
    # (1,3) 4.5, (2,3) 2. radius auto at quantile 0.5: the median of [0.5, 1, 2, 2.5, 4.5, 8.5]
    # is (2 + 2.5) / 2 = 2.25. Density D = [1, 2, 2, 1].
    # Cosines: F_0 is orthogonal to the others (cos 0), F_1..F_3 are parallel (cos 1), so
    # V = [3, 1, 1, 1]. D^ = [0, 1, 1, 0], V^ = [1, 0, 0, 0], lambda 1.2: w = [1.2, 1, 1, 0].
    # n = 11: shares 11 * w / 3.2 = [4.125, 3.4375, 3.4375, 0] -> [4, 3, 3, 0] = 10, one short:
    # +1 to the largest count -> [5, 3, 3, 0].
    timesteps = np.array([750, 500, 250, 0])
    cfg = config(size=11, seed=0, tdac={"radius_quantile": 0.5})
    selection = choose_calibration(cfg, 4, 12, hand_features(), timesteps)
    assert selection.method == "tdac" and selection.radius == pytest.approx(2.25)
    np.testing.assert_array_equal(selection.per_step["density"], [1, 2, 2, 1])
    np.testing.assert_allclose(selection.per_step["diversity"], [3, 1, 1, 1], atol=1e-12)
    np.testing.assert_allclose(selection.per_step["weight"], [1.2, 1, 1, 0], atol=1e-12)
    np.testing.assert_array_equal(selection.per_step["count"], [5, 3, 3, 0])
    np.testing.assert_array_equal(selection.per_step["timestep"], timesteps)
    # One sample per trajectory, in trajectory order 0..n-1 (the official assembly's order).
    np.testing.assert_array_equal(selection.traj, np.arange(11))


@pytest.mark.parametrize("method", ["tdac", "uniform", "ndtc", "random"])
def test_every_batch_mixes_the_steps(method):
    """Range calibration folds consecutive batches into an EMA: each must span the steps."""
    features = make_features()
    params = {"method": method, "size": 40, "seed": 0, "uniform": {"n_steps": 4}}
    selection = choose_calibration(config(**params), 12, 40, features, TIMESTEPS)
    used = np.unique(selection.step)
    for batch in np.array_split(selection.step, 2):  # like init_batch_size = n / 2
        assert np.ptp(batch) >= 0.6 * np.ptp(used), (method, batch)
    assert np.all(np.diff(selection.traj) >= 0)


def test_fixed_radius_is_used():
    selection = choose_calibration(config(size=16, tdac={"radius": 1e9}), 12, 40, make_features(), TIMESTEPS)
    assert selection.radius == 1e9
    np.testing.assert_array_equal(selection.per_step["density"], np.full(12, 11.0))  # all steps in radius


# --------------------------------------------------------------------------------------- baselines
def test_uniform_reproduces_q_diffusion_steps():
    timesteps = np.arange(100)[::-1]
    selection = choose_calibration(config(method="uniform", size=1024), 100, 1024, None, timesteps)
    chosen = np.flatnonzero(selection.per_step["count"])
    np.testing.assert_array_equal(chosen, np.arange(0, 100, 5))  # 0, 5, ..., 95
    assert selection.size == 20 * (1024 // 20)  # per_step = size // 20 = 51
    np.testing.assert_array_equal(selection.traj[selection.step == 95], np.arange(51))  # the first 51
    assert np.all(np.isnan(selection.per_step["weight"])) and selection.radius is None
    # per_step: 256 reproduces Q-Diffusion's 5120 samples (trajectories reused across steps).
    q_diffusion = choose_calibration(
        config(method="uniform", uniform={"per_step": 256}), 100, 256, None, timesteps
    )
    assert q_diffusion.size == 5120 and len(np.unique(q_diffusion.traj)) == 256


def test_uniform_follows_q_diffusion_when_t_is_not_a_multiple():
    # range(0, 50, 50 // 20) has 25 steps, as in Q-Diffusion; per_step = 100 // 25.
    selection = choose_calibration(config(method="uniform", size=100), 50, 64, None, np.arange(50))
    np.testing.assert_array_equal(np.flatnonzero(selection.per_step["count"]), np.arange(0, 50, 2))
    assert selection.size == 100


def test_ndtc_steps_are_clamped_and_truncated():
    rng = np.random.default_rng(0)
    assert set(ndtc_steps(200, 100, NDTCConfig(mu=-3.0, sigma=0.1), rng)) == {0}
    assert set(ndtc_steps(200, 100, NDTCConfig(mu=4.0, sigma=0.1), rng)) == {99}
    assert set(ndtc_steps(10, 100, NDTCConfig(mu=0.4, sigma=0.0), rng)) == {40}
    assert set(ndtc_steps(10, 100, NDTCConfig(mu=0.999, sigma=0.0), rng)) == {99}  # int(99.9) = 99
    steps = ndtc_steps(20000, 100, NDTCConfig(), rng)
    assert steps.min() == 0 and steps.max() == 99
    assert np.mean(steps == 0) == pytest.approx(0.165, abs=0.01)  # P(z < 1/T) = Phi(-0.975)
    assert np.median(steps) == pytest.approx(40, abs=2)


def test_ndtc_and_random_selections():
    ndtc = choose_calibration(config(method="ndtc", size=30), 12, 40, None, TIMESTEPS)
    np.testing.assert_array_equal(np.sort(ndtc.traj), np.arange(30))  # one sample per trajectory
    rand = choose_calibration(config(method="random", size=400), 12, 40, None, TIMESTEPS)
    pairs = set(zip(rand.traj.tolist(), rand.step.tolist(), strict=True))
    assert len(pairs) == 400 and rand.traj.max() < 40 and rand.step.max() < 12


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("method", ["tdac", "ndtc"])
def test_size_beyond_trajectories_names_both_params(method):
    with pytest.raises(ParamError) as err:
        choose_calibration(config(method=method, size=64), 12, 40, make_features(), TIMESTEPS)
    assert "select.size=64" in str(err.value) and "dump.trajectories" in str(err.value)
    assert "40 trajectories" in str(err.value)


def test_random_size_beyond_all_pairs():
    with pytest.raises(ParamError, match=r"select\.size=481"):
        choose_calibration(config(method="random", size=481), 12, 40, None, TIMESTEPS)


def test_tdac_without_features_is_a_clear_error():
    with pytest.raises(ParamError, match=r"select\.method=tdac needs the TDAC feature maps"):
        choose_calibration(config(size=8), 12, 40, None, TIMESTEPS)


def test_uniform_with_more_steps_than_the_dump():
    with pytest.raises(ParamError, match=r"select\.uniform\.n_steps=20"):
        choose_calibration(config(method="uniform", size=40), 12, 40, None, TIMESTEPS)


# --------------------------------------------------------------------------------------------- knn
def test_knn_mode_keeps_counts_and_picks_unique_distinct_candidates():
    features = make_features(batch=40)
    reference = choose_calibration(config(size=32), 12, 40, features, TIMESTEPS)
    knn = choose_calibration(config(size=32, tdac={"mode": "knn"}), 12, 40, features, TIMESTEPS)
    assert knn.method == "tdac-knn"
    np.testing.assert_array_equal(knn.per_step["count"], reference.per_step["count"])
    assert knn.traj.min() >= 0 and knn.traj.max() < 40
    assert len(set(zip(knn.traj.tolist(), knn.step.tolist(), strict=True))) == 32
    assert len(np.unique(knn.traj)) == 32  # n <= B: one sample per trajectory, as the reference
    again = choose_calibration(config(size=32, seed=5, tdac={"mode": "knn"}), 12, 40, features, TIMESTEPS)
    np.testing.assert_array_equal(again.traj, knn.traj)  # deterministic, seed-free


def blob_with_outliers(steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pooled candidates [T, 60, 2]: 50 in a Gaussian blob (sd 1) and 10 outliers at radius 20."""
    rng = np.random.default_rng(seed)
    blob = rng.standard_normal((steps, 50, 2))
    angles = rng.uniform(0, 2 * np.pi, (steps, 10))
    outliers = 20 * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    return np.concatenate([blob, outliers], axis=1).astype(np.float32), np.arange(50, 60)


def test_knn_prefers_dense_then_uncovered_candidates_and_avoids_outliers():
    pooled, outlier_ids = blob_with_outliers(steps=3)
    counts = np.array([6, 6, 6])
    cfg = KNNConfig(k=5, distinct_trajectories=False)
    traj, step = select_within_steps(pooled, counts, cfg, progress=False)
    for i in range(3):
        picks = traj[step == i]
        points = pooled[i]
        radius = knn_mean_distance(points, 5)
        # The first pick of a step is its densest candidate.
        assert picks[0] == np.argmin(radius)
        # No outlier while the blob is not covered.
        assert not set(picks.tolist()) & set(outlier_ids.tolist())
        # Spread: farther apart than the 6 densest candidates (pure density would cluster).
        densest = np.argsort(radius)[:6]
        assert min_pairwise(points[picks]) > min_pairwise(points[densest])


def min_pairwise(points: np.ndarray) -> float:
    distances = np.linalg.norm(points[:, None] - points[None, :], axis=-1)
    return float(distances[np.triu_indices(len(points), 1)].min())


def test_knn_distinct_trajectories_across_steps_and_ivf_path():
    pooled, _ = blob_with_outliers(steps=4, seed=1)
    counts = np.array([10, 5, 20, 15])  # 50 <= 60 trajectories
    cfg = KNNConfig(k=5, exact_max=30, nprobe=2)  # 60 candidates per step > 30: IVF index
    traj, step = select_within_steps(pooled, counts, cfg, progress=False)
    assert len(np.unique(traj)) == 50
    np.testing.assert_array_equal(np.bincount(step, minlength=4), counts)


def test_knn_step_needing_more_than_b_candidates_is_an_error():
    pooled, _ = blob_with_outliers(steps=2)
    with pytest.raises(ParamError, match=r"select\.size"):
        select_within_steps(pooled, np.array([61, 0]), KNNConfig(), progress=False)


def test_pool_features_grid():
    features = np.arange(2 * 3 * 2 * 4 * 4, dtype=np.float32).reshape(2, 3, 2, 4, 4)
    mean = pool_features(features, grid=1)
    np.testing.assert_allclose(mean, features.mean(axis=(3, 4)))
    assert pool_features(features, grid=2).shape == (2, 3, 8)


# ------------------------------------------------------------------------------------------- chart
def test_allocation_chart_groups_long_trajectories():
    count = np.arange(100)
    lines = allocation_chart(np.arange(100)[::-1], count)
    assert len(lines) == 26  # header + 25 rows of 4 steps
    assert lines[-1].split()[:3] == ["96-99", "3..0", str(96 + 97 + 98 + 99)]
    assert lines[-1].count("#") == 40
    short = allocation_chart(np.array([999, 500, 0]), np.array([0, 5, 10]), width=10)
    assert len(short) == 4 and short[2].count("#") == 5 and short[1].count("#") == 0


def test_direct_construction_is_validated_too():
    with pytest.raises(ParamError, match=r"select\.tdac\.lambda=-0\.5 must be >= 0"):
        TDACConfig(lam=-0.5)
    with pytest.raises(ParamError, match=r"select\.tdac\.mode"):
        TDACConfig(mode="global")  # type: ignore[arg-type]
