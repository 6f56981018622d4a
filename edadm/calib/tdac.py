"""TDAC: Temporal Distribution Alignment Calibration (docs/method.md §2).

EDA-DM decides how many calibration samples each sampling step gets from two scores of the
step's feature map F_i (the input of the mid-block attention, ``[B, C, h, w]`` for the first
B trajectories), then which trajectory supplies each sample. ``tdac_selection`` runs the
steps in order; each step is a function of its own:

1. Scores (``step_statistics``): all pairwise step MSEs ``mean((F_i - F_j)^2)`` and the
   diversities ``V_i = sum over j != i, b, h, w of [1 - cos_C(F_i[b,:,h,w], F_j[b,:,h,w])]``.
2. Radius (``auto_radius``): the density radius r, fixed or a quantile of the pairwise MSEs.
3. Density (``density_counts``): ``D_i = #{ j != i : mean((F_i - F_j)^2) <= r }``.
4. Weights (``tdac_weights``): ``w_i = D^_i + lambda * V^_i`` on min-max normalised scores.
5. Counts (``allocate_counts``): ``n_i = round(N * w_i / sum w)``, then fixed up to sum to N.
6. Assembly: ``mode: reference`` (``assemble_reference``): a random permutation of the
   multiset of steps, sample b from trajectory b; ``mode: knn`` (our extension,
   ``edadm.calib.knn``): the same counts, the trajectories chosen by k-NN density and coverage.

The official code computes the step-1 scores with two O(T^2) Python loops over step pairs.
Here one pass over the features does it with a few matrix products:

- all pairwise step MSEs from one Gram matrix, ``||F_i||^2 + ||F_j||^2 - 2 F_i . F_j``,
  accumulated in float64 (the difference of large, nearly equal numbers needs it);
- all diversities from channel-normalised features: ``sum_j cos(F_i, F_j) = F^_i . sum_j F^_j``
  per position, minus the self term ``F^_i . F^_i``, which is O(T) instead of O(T^2).

The pass reads the features in chunks of trajectories, so float16 stores larger than memory
(a Zarr array works: anything that slices as ``features[:, b0:b1]``) are scored in bounded
memory. Step index ``i = 0..T-1`` is in sampling order: ``i = 0`` is the first, noisiest
denoising step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from edadm.calib.knn import KNNConfig, pool_features, select_within_steps
from edadm.calib.step_scores import (
    DEFAULT_RADIUS_QUANTILE,
    auto_radius,
    density_counts,
    min_max_normalise,
    step_statistics,
)
from edadm.diffusion.hooks import DEFAULT_FEATURE_LAYER
from edadm.errors import ParamError

logger = logging.getLogger(__name__)

MODES = ("reference", "knn")


@dataclass(frozen=True)
class TDACConfig:
    """Knobs of ``select.tdac`` (docs/method.md §2).

    Attributes:
        mode: ``reference`` reproduces the official code (per-step counts, random
            trajectories); ``knn`` keeps the counts and picks the trajectory at each step by
            k-NN density and coverage (``edadm.calib.knn``).
        radius: density radius r on the per-element MSE of step feature maps; a number (the
            official 3.0 for CIFAR-10 / ImageNet, 0.3 for LSUN / COCO) or ``auto``: the
            ``radius_quantile`` quantile of the pairwise step MSEs, because an absolute
            radius only fits the feature scale of the model it was tuned on.
        radius_quantile: quantile for ``radius: auto``, in (0, 1]; 0.1 (see ``auto_radius``
            for why).
        lam: lambda, the diversity weight in ``w = D^ + lambda * V^`` (params key
            ``lambda``): 1.2 for CIFAR-10 and ImageNet in the official scripts, 1.0 for LSUN,
            5.0 for COCO.
        feature_layer: the module whose input is the TDAC feature map (read by the dump stage;
            diffusers name of the mid-block attention).
        knn: knobs of ``mode: knn``.
    """

    mode: Literal["reference", "knn"] = "reference"
    radius: float | str = "auto"
    radius_quantile: float = DEFAULT_RADIUS_QUANTILE
    lam: float = field(default=1.2, metadata={"key": "lambda"})
    feature_layer: str = DEFAULT_FEATURE_LAYER
    knn: KNNConfig = field(default_factory=KNNConfig)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ParamError(f"select.tdac.mode={self.mode!r} must be one of {', '.join(MODES)}")
        if isinstance(self.radius, str):
            if self.radius != "auto":
                raise ParamError(f"select.tdac.radius={self.radius!r} must be a positive number or 'auto'")
        elif not (isinstance(self.radius, (int, float)) and math.isfinite(self.radius) and self.radius > 0):
            raise ParamError(f"select.tdac.radius={self.radius!r} must be a positive number or 'auto'")
        if not 0.0 < self.radius_quantile <= 1.0:
            raise ParamError(f"select.tdac.radius_quantile={self.radius_quantile} must be in (0, 1]")
        if self.lam < 0:
            raise ParamError(f"select.tdac.lambda={self.lam} must be >= 0")
        if not self.feature_layer:
            raise ParamError("select.tdac.feature_layer must name a module")


@dataclass(frozen=True, eq=False)
class TDACResult:
    """What ``tdac_selection`` chose, with the per-step scores behind it.

    Attributes:
        method: ``tdac`` (reference mode) or ``tdac-knn``.
        traj: ``[n]`` int64 trajectory of each calibration sample (unsorted).
        step: ``[n]`` int64 step of each calibration sample.
        counts: ``[T]`` int64 samples per step (step 5).
        density: ``[T]`` float64 raw density D_i (step 3).
        diversity: ``[T]`` float64 raw diversity V_i (step 1).
        weight: ``[T]`` float64 weight w_i (step 4).
        radius: the density radius r (step 2).
    """

    method: str
    traj: np.ndarray
    step: np.ndarray
    counts: np.ndarray
    density: np.ndarray
    diversity: np.ndarray
    weight: np.ndarray
    radius: float


def tdac_selection(
    config: TDACConfig, size: int, n_trajectories: int, features: Any, rng: np.random.Generator
) -> TDACResult:
    """The calibration set by TDAC (docs/method.md §2), steps 1 to 6.

    Args:
        config: the ``select.tdac`` params.
        size: N, calibration samples (``select.size``).
        n_trajectories: trajectories in the dump; reference mode takes each sample from its
            own trajectory, so ``size <= n_trajectories``.
        features: ``[T, B, C, h, w]`` feature maps of the first B trajectories (numpy, torch
            or Zarr; float16 is fine).
        rng: seeded generator of the reference assembly's permutation (knn mode uses none).

    Returns:
        A ``TDACResult``.

    Raises:
        ParamError: a size the dump cannot supply.
    """
    if config.mode == "reference":
        require_trajectories(size, n_trajectories)  # fail before the scoring pass
    # 1. Pairwise step MSEs and raw diversities V_i, in one pass over the features.
    stats = step_statistics(features)
    # 2. The density radius r: fixed, or a quantile of the pairwise MSEs.
    if config.radius == "auto":
        radius = auto_radius(stats.mse, config.radius_quantile)
    else:
        radius = float(config.radius)
    # 3. Density D_i: steps within the radius.
    density = density_counts(stats.mse, radius).astype(np.float64)
    # 4. Weights w_i = D^_i + lambda * V^_i.
    weight = tdac_weights(density, stats.diversity, config.lam)
    # 5. Samples per step n_i.
    counts = allocate_counts(weight, size)
    # 6. Which trajectory supplies each sample.
    if config.mode == "reference":
        method = "tdac"
        traj, step = assemble_reference(counts, n_trajectories, rng)
    else:
        method = "tdac-knn"
        traj, step = select_within_steps(pool_features(features, config.knn.pool), counts, config.knn)
    logger.info(
        "TDAC (%s): radius %.6g, lambda %g, %d of %d steps used",
        config.mode,
        radius,
        config.lam,
        int((counts > 0).sum()),
        counts.size,
    )
    return TDACResult(
        method=method,
        traj=traj,
        step=step,
        counts=counts,
        density=density,
        diversity=stats.diversity,
        weight=weight,
        radius=radius,
    )


# ---------------------------------------------------------------------------------------------
# 4. Weights
# ---------------------------------------------------------------------------------------------
def tdac_weights(density: np.ndarray, diversity: np.ndarray, lam: float) -> np.ndarray:
    """Per-step weights ``w = D^ + lam * V^`` on min-max normalised scores, ``[T]`` float64."""
    density = np.asarray(density)
    diversity = np.asarray(diversity)
    if density.shape != diversity.shape or density.ndim != 1 or density.size == 0:
        raise ValueError(
            f"density and diversity must be [T] of equal length, got {density.shape}, {diversity.shape}"
        )
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    return min_max_normalise(density) + float(lam) * min_max_normalise(diversity)


# ---------------------------------------------------------------------------------------------
# 5. Counts
# ---------------------------------------------------------------------------------------------
def allocate_counts(weights: np.ndarray, n: int) -> np.ndarray:
    """How many of the n calibration samples each step gets, ``[T]`` int64 summing to n.

    a. ``n_i = round(n * w_i / sum(w))``, rounding half to even. The official code rounds
       with ``torch.Tensor.round`` (``(w / w.sum() * n).round()``), which rounds half to even;
       this is ``np.rint`` on the same expression.
    b. If the total is short by e, add 1 to each of the e largest n_i (the official
       ``sort(descending=True)[:e]``; ties go to the earlier step, a stable sort).
    c. If the total is over by e, subtract 1 scanning from the last step backwards, skipping
       steps already at 0.

    When every weight is 0 (both scores constant, or ``lambda = 0`` with a constant density)
    the scores carry no information and the official code would divide by zero; the
    allocation is then uniform: all weights set to 1 and a. to c. applied (so the remainder of
    ``n / T`` goes to the earliest steps).

    Args:
        weights: ``[T]`` non-negative step weights w_i.
        n: total number of calibration samples (>= 0).

    Returns:
        ``[T]`` int64 counts, summing to ``n``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or weights.size == 0 or np.any(weights < 0):
        raise ValueError(f"weights must be a non-empty non-negative [T] vector, got shape {weights.shape}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if weights.sum() <= 0:
        logger.info(
            "TDAC weights are all zero (constant scores): allocating uniformly over %d steps", weights.size
        )
        weights = np.ones_like(weights)
    # a. Round the proportional share half to even (what torch.round does in the official code).
    counts = np.rint(weights / weights.sum() * n).astype(np.int64)
    error = int(n - counts.sum())
    # b. Short: +1 to each of the `error` largest counts (stable: earlier step first on ties).
    while error > 0:
        order = np.argsort(-counts, kind="stable")[:error]
        counts[order] += 1
        error -= order.size
    # c. Over: -1 from the last step backwards, skipping zeros. Rounding leaves at most T / 2
    #    extra, so one scan suffices; the loop over scans only guards the arithmetic.
    while error < 0:
        nonzero = np.flatnonzero(counts > 0)[::-1][:-error]
        counts[nonzero] -= 1
        error += nonzero.size
    return counts


def tdac_allocation(density: np.ndarray, diversity: np.ndarray, n: int, lam: float) -> np.ndarray:
    """Steps 4 and 5 from the raw scores: ``allocate_counts(tdac_weights(D, V, lam), n)``.

    Args:
        density: ``[T]`` raw density counts D_i.
        diversity: ``[T]`` raw diversities V_i.
        n: total number of calibration samples (>= 0).
        lam: diversity weight lambda (>= 0).

    Returns:
        ``[T]`` int64 counts, summing to ``n``.
    """
    return allocate_counts(tdac_weights(density, diversity, lam), n)


# ---------------------------------------------------------------------------------------------
# 6. Assembly (reference mode; knn mode: edadm.calib.knn.select_within_steps)
# ---------------------------------------------------------------------------------------------
def assemble_reference(
    counts: np.ndarray, n_trajectories: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The official assembly: sample b is step ``perm[b]`` of trajectory b.

    a. The multiset holding ``counts[i]`` copies of step i (length n = sum(counts)).
    b. Randomly permuted with ``rng``.
    c. Calibration sample b is trajectory b at step ``perm[b]``: n distinct trajectories.

    Args:
        counts: ``[T]`` samples per step.
        n_trajectories: N, trajectories in the dump; n must not exceed it.
        rng: seeded numpy Generator.

    Returns:
        ``(traj [n], step [n])`` int64, in trajectory order (traj = 0..n-1).

    Raises:
        ParamError: when n exceeds the number of trajectories.
    """
    counts = np.asarray(counts, dtype=np.int64)
    size = int(counts.sum())
    require_trajectories(size, n_trajectories)
    multiset = np.repeat(np.arange(counts.size, dtype=np.int64), counts)  # a.
    step = rng.permutation(multiset)  # b.
    traj = np.arange(size, dtype=np.int64)  # c.
    return traj, step


def require_trajectories(size: int, n_trajectories: int) -> None:
    """Raise ParamError unless ``size`` calibration samples can come from distinct trajectories."""
    if size > n_trajectories:
        raise ParamError(
            f"select.size={size} exceeds the {n_trajectories} trajectories of the dump (dump.trajectories): "
            "TDAC takes each calibration sample from its own trajectory; "
            "lower select.size or dump more trajectories"
        )
