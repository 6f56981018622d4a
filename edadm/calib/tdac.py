"""TDAC: Temporal Distribution Alignment Calibration (METHOD.md section 2).

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
import torch
from tqdm.auto import tqdm

from edadm.calib.knn import KNNConfig, pool_features, select_within_steps
from edadm.config import ParamError

logger = logging.getLogger(__name__)

MODES = ("reference", "knn")

#: ``eps`` of ``torch.nn.CosineSimilarity(dim=1, eps=1e-6)`` in the official code: each
#: channel vector's norm is clamped to at least this before dividing (torch's definition).
COSINE_EPS = 1e-6

#: Default bytes of the float64 buffer of one chunk of trajectories. Small chunks keep the
#: working set in cache (measured on 1 thread, T=100, B=1024: 0.66 s with 16 MiB chunks,
#: 0.92 s with 64 MiB); the per-chunk GEMM stays large enough to run at full speed.
DEFAULT_CHUNK_BYTES = 16 * 2**20

#: Default quantile for ``radius: auto`` (see ``auto_radius``).
DEFAULT_RADIUS_QUANTILE = 0.1


@dataclass(frozen=True)
class TDACConfig:
    """Knobs of ``select.tdac`` (METHOD.md section 2).

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
    feature_layer: str = "mid_block.attentions.0"
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
    """The calibration set by TDAC (METHOD.md section 2), steps 1 to 6.

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
# 1. Scores: pairwise step MSEs and diversities
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepStatistics:
    """Everything TDAC needs from one pass over the features.

    Attributes:
        mse: ``[T, T]`` float64, ``mse[i, j] = mean((F_i - F_j)^2)`` over the whole
            ``[B, C, h, w]`` tensor; symmetric, zero diagonal.
        diversity: ``[T]`` float64, the raw diversity V_i (sum of ``1 - cos`` over the other
            steps and over every position ``(b, h, w)``).
    """

    mse: np.ndarray
    diversity: np.ndarray


def step_statistics(
    features: Any, chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: bool = True
) -> StepStatistics:
    """Step 1: pairwise step MSEs and raw diversities in one chunked pass (METHOD.md section 2).

    Precision: the Gram matrix is accumulated in float64 (float16 and float32 products are exact there),
    so the MSEs match a direct float64 computation to ~1e-12 relative. The cosines are
    computed in float32 for float16/float32 input (float64 for float64 input) per position,
    and summed over positions in float64: about 1e-6 relative on V, far below what moves
    an allocation.

    Args:
        features: ``[T, B, C, h, w]`` numpy array, torch tensor (CPU or CUDA; computed on its
            device) or any array that slices as ``features[:, b0:b1]`` (a Zarr array); any
            float dtype.
        chunk_bytes: bytes of the float64 buffer of one chunk of trajectories
            ``[T, b, C, h, w]``; bounds the extra memory to about 2.5x this.
        progress: show a tqdm bar when there are several chunks.

    Returns:
        ``StepStatistics`` with ``mse [T, T]`` and ``diversity [T]``, both float64.
    """
    shape = tuple(int(s) for s in features.shape)
    if len(shape) != 5:
        raise ValueError(f"features must be [T, B, C, h, w], got shape {shape}")
    n_steps, batch, channels, height, width = shape
    if n_steps < 2 or batch < 1:
        raise ValueError(f"TDAC needs at least 2 steps and 1 trajectory of features, got shape {shape}")
    device = features.device if isinstance(features, torch.Tensor) else torch.device("cpu")
    work_dtype = torch.float64 if _dtype_of(features) == torch.float64 else torch.float32
    trajectories_per_chunk = max(1, min(batch, int(chunk_bytes) // (n_steps * channels * height * width * 8)))

    # Reused buffers (allocating per chunk costs page faults comparable to the arithmetic).
    chunk_shape = (n_steps, trajectories_per_chunk, height, width, channels)  # channels last
    work = torch.empty(chunk_shape, dtype=work_dtype, device=device)
    wide = torch.empty((n_steps, work[0].numel()), dtype=torch.float64, device=device)
    norms = torch.empty(chunk_shape[:-1], dtype=work_dtype, device=device)
    unit_sum = torch.empty(chunk_shape[1:], dtype=work_dtype, device=device)
    gram = torch.zeros(n_steps, n_steps, dtype=torch.float64, device=device)
    cos_sum = torch.zeros(n_steps, dtype=torch.float64, device=device)  # sum_{j} sum_{b,h,w} cos(F_i, F_j)
    self_sum = torch.zeros(n_steps, dtype=torch.float64, device=device)  # the j = i terms

    starts = range(0, batch, trajectories_per_chunk)
    bar = tqdm(starts, desc="TDAC scores", unit="chunk", leave=False, disable=not progress or len(starts) < 8)
    for start in bar:
        stop = min(start + trajectories_per_chunk, batch)
        x = work[:, : stop - start]  # [T, b, h, w, C]
        x.copy_(_read_chunk(features, start, stop, device).permute(0, 1, 3, 4, 2))
        flat = wide[:, : x[0].numel()]
        flat.copy_(x.reshape(n_steps, -1))
        # 1a. Gram matrix of the flattened step tensors, G_ij = F_i . F_j, in float64. The
        #     column order (channels last) does not change a dot product.
        gram.addmm_(flat, flat.T)
        # 1b. Channel-normalised features F^ = F / max(||F||_C, eps): torch's cosine definition.
        n = norms[:, : stop - start]
        torch.linalg.vector_norm(x, dim=-1, out=n)
        # The self term cos(F_i, F_i) = ||F^_i||^2 is 1, or (||F||/eps)^2 below eps (0 for 0).
        self_sum += (
            (n / n.clamp_min(COSINE_EPS)).square_().reshape(n_steps, -1).sum(dim=1, dtype=torch.float64)
        )
        n.clamp_min_(COSINE_EPS)
        x.div_(n.unsqueeze(-1))
        # 1c. Per position, sum_j cos(F_i, F_j) = F^_i . (sum_j F^_j): O(T) instead of O(T^2).
        s = unit_sum[: stop - start]
        torch.sum(x, dim=0, out=s)
        x.mul_(s)
        cos_sum += x.sum(dim=-1).reshape(n_steps, -1).sum(dim=1, dtype=torch.float64)

    # 1d. MSE_ij = (||F_i||^2 + ||F_j||^2 - 2 G_ij) / numel, clamped at 0 against rounding.
    numel = batch * channels * height * width
    squared_norms = torch.diagonal(gram)
    mse = (squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram) / numel
    mse = mse.clamp_min_(0.0)
    mse.fill_diagonal_(0.0)
    mse = 0.5 * (mse + mse.T)  # exactly symmetric
    # 1e. V_i = sum over j != i and positions (b, h, w) of (1 - cos)
    #         = (T - 1) * B*h*w - (cos_sum_i - self_i).
    positions = batch * height * width
    diversity = (n_steps - 1) * positions - (cos_sum - self_sum)
    return StepStatistics(mse=mse.cpu().numpy(), diversity=diversity.cpu().numpy())


def _dtype_of(features: Any) -> torch.dtype:
    if isinstance(features, torch.Tensor):
        return features.dtype
    return torch.from_numpy(np.zeros(0, dtype=np.dtype(features.dtype))).dtype


def _read_chunk(features: Any, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Trajectories ``start:stop`` of the features as a tensor ``[T, b, C, h, w]`` on ``device``."""
    if isinstance(features, torch.Tensor):
        chunk = features[:, start:stop]
    else:
        chunk = torch.from_numpy(np.asarray(features[:, start:stop]))
    if not chunk.is_floating_point():
        raise TypeError(f"features must be floating point, got {chunk.dtype}")
    return chunk.to(device)


def pairwise_step_mse(features: Any, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """``[T, T]`` float64 matrix of ``mean((F_i - F_j)^2)`` for features ``[T, B, C, h, w]``."""
    return step_statistics(features, chunk_bytes=chunk_bytes).mse


def tdac_scores(
    features: Any, radius: float, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Raw TDAC density and diversity per step (steps 1 and 3), before normalisation.

    Args:
        features: ``[T, B, C, h, w]`` mid-block attention inputs (numpy, torch or Zarr; any
            float dtype).
        radius: the density radius r on the per-element MSE (official: 3.0 for CIFAR-10 and
            ImageNet, 0.3 for LSUN and COCO; see ``auto_radius`` for our data-driven choice).
        chunk_bytes: memory bound of one chunk, see ``step_statistics``.

    Returns:
        ``(density [T] int64, diversity [T] float64)``.
    """
    stats = step_statistics(features, chunk_bytes=chunk_bytes)
    return density_counts(stats.mse, radius), stats.diversity


# ---------------------------------------------------------------------------------------------
# 2. Radius
# ---------------------------------------------------------------------------------------------
def auto_radius(pairwise_mse: np.ndarray, quantile: float = DEFAULT_RADIUS_QUANTILE) -> float:
    """Step 2: the density radius for ``radius: auto``, a quantile of the off-diagonal step MSEs.

    The official radii (3.0, 0.3) are absolute MSE values and only make sense for the feature
    scale of the model they were tuned on. A quantile q of the pairwise MSEs is scale-free:
    every step has on average ``q * (T - 1)`` neighbours within the radius, whatever the model.

    Default q = 0.1. The steps lie on a curve in feature space, so D_i mostly measures how
    slowly the features move around step i. With q = 0.1 a step's neighbourhood spans about a
    tenth of the trajectory (about 10 steps for T = 100): local enough that D follows the local
    speed, wide enough that the integer counts are not mostly ties. On synthetic T = 100
    trajectories whose speed decays exponentially / is U-shaped / drops 10x after 30 steps,
    the rank correlation of D with 1 / speed was 0.97 / 1.00 / 0.88 at q = 0.1, against
    0.53 / 0.99 / 0.80 at q = 0.5 (large radii count far-away steps, and D drifts towards
    "central steps are dense") and 0.91 / 0.96 / 0.96 at q = 0.02 with only 4 to 10 distinct
    count values. For short trajectories (T < 20) a step then has about one neighbour on
    average: consider a larger q there.

    Args:
        pairwise_mse: ``[T, T]`` matrix from ``pairwise_step_mse``.
        quantile: in (0, 1].

    Returns:
        The radius r (float).
    """
    mse = np.asarray(pairwise_mse, dtype=np.float64)
    if mse.ndim != 2 or mse.shape[0] != mse.shape[1] or mse.shape[0] < 2:
        raise ValueError(f"pairwise_mse must be a square [T, T] matrix with T >= 2, got {mse.shape}")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    upper = mse[np.triu_indices(mse.shape[0], k=1)]  # each unordered pair once
    return float(np.quantile(upper, quantile))


# ---------------------------------------------------------------------------------------------
# 3. Density
# ---------------------------------------------------------------------------------------------
def density_counts(pairwise_mse: np.ndarray, radius: float) -> np.ndarray:
    """D_i = #{j != i : mse[i, j] <= radius} from a ``[T, T]`` MSE matrix; returns ``[T]`` int64."""
    mse = np.asarray(pairwise_mse, dtype=np.float64)
    close = mse <= float(radius)
    np.fill_diagonal(close, False)
    return close.sum(axis=1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# 4. Weights
# ---------------------------------------------------------------------------------------------
def min_max_normalise(values: np.ndarray) -> np.ndarray:
    """``(v - min) / (max - min)`` as float64; a constant vector becomes all zeros.

    The official code divides by ``max - min`` unguarded (NaN for a constant score). A
    constant score says nothing about which step matters, so it contributes nothing here.
    """
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min()
    if span == 0:
        return np.zeros_like(values)
    return (values - values.min()) / span


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
