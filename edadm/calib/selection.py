"""Choosing the calibration set: the ``select`` params and one entry point for every method.

``choose_calibration(config, ...)`` runs TDAC (reference or knn mode, METHOD.md section 2) or
one of the baselines (uniform / Q-Diffusion, ndtc / PTQ4DM, random) and returns a
``Selection``: which trajectory at which step makes each calibration sample, plus per-step
diagnostics for the ``select`` stage's plot and for ``edadm inspect``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from edadm.calib.baselines import (
    NDTCConfig,
    UniformConfig,
    ndtc_selection,
    random_selection,
    uniform_selection,
)
from edadm.calib.knn import KNNConfig, pool_features, select_within_steps
from edadm.calib.tdac import (
    DEFAULT_RADIUS_QUANTILE,
    assemble_reference,
    auto_radius,
    density_counts,
    require_trajectories,
    step_statistics,
    tdac_allocation,
    tdac_weights,
)
from edadm.config import ParamError, check_range

logger = logging.getLogger(__name__)

METHODS = ("tdac", "uniform", "ndtc", "random")
TDAC_MODES = ("reference", "knn")


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
        radius_quantile: quantile for ``radius: auto``, in (0, 1]; 0.1 (see
            ``edadm.calib.tdac.auto_radius`` for why).
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
        if self.mode not in TDAC_MODES:
            raise ParamError(f"select.tdac.mode={self.mode!r} must be one of {', '.join(TDAC_MODES)}")
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


@dataclass(frozen=True)
class SelectConfig:
    """The ``select`` section of params.yaml.

    Attributes:
        method: ``tdac`` (EDA-DM), ``uniform`` (Q-Diffusion), ``ndtc`` (PTQ4DM), ``random``.
        size: calibration samples (1024 for CIFAR, LSUN, ImageNet in EDA-DM; 256 for SD).
            tdac reference and ndtc take one sample per trajectory, so size <= trajectories.
        seed: seed of the random parts (tdac reference permutation, ndtc, random).
        tdac: knobs of ``method: tdac``.
        uniform: knobs of ``method: uniform``.
        ndtc: knobs of ``method: ndtc``.
    """

    method: Literal["tdac", "uniform", "ndtc", "random"] = "tdac"
    size: int = 1024
    seed: int = 0
    tdac: TDACConfig = field(default_factory=TDACConfig)
    uniform: UniformConfig = field(default_factory=UniformConfig)
    ndtc: NDTCConfig = field(default_factory=NDTCConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ParamError(f"select.method={self.method!r} must be one of {', '.join(METHODS)}")
        check_range("select.size", self.size, low=1)
        check_range("select.seed", self.seed, low=0)


@dataclass(frozen=True, eq=False)
class Selection:
    """The chosen calibration set.

    Attributes:
        method: the method that chose it (``tdac``, ``tdac-knn``, ``uniform``, ``ndtc``,
            ``random``).
        traj: ``[n]`` int64 trajectory index of each calibration sample.
        step: ``[n]`` int64 step index (0 = first, noisiest sampling step). Both arrays are
            sorted by trajectory, then by step: the official TDAC order (sample b is
            trajectory b at a randomly permuted step), which mixes the steps in every
            consecutive batch, as the batch-by-batch EMA of the activation ranges assumes.
        per_step: ``[T]`` arrays: ``count`` (int64, samples per step), ``timestep`` (the
            model timestep t of each step), and float64 ``density`` (raw D_i), ``diversity``
            (raw V_i), ``weight`` (w_i = D^ + lambda V^): NaN for the baselines.
        radius: the density radius used (tdac), else None.
    """

    method: str
    traj: np.ndarray
    step: np.ndarray
    per_step: dict[str, np.ndarray]
    radius: float | None

    @property
    def size(self) -> int:
        return int(self.traj.size)


def choose_calibration(
    config: SelectConfig,
    n_steps: int,
    n_trajectories: int,
    features: Any | None,
    timesteps: np.ndarray,
) -> Selection:
    """Choose the calibration set with ``config.method`` (METHOD.md section 2).

    Args:
        config: the ``select`` params.
        n_steps: T, sampling steps per trajectory in the dump.
        n_trajectories: N, trajectories in the dump (``dump.trajectories``).
        features: ``[T, B, C, h, w]`` TDAC feature maps of the first B trajectories (numpy,
            torch or Zarr; float16 is fine); required for tdac, ignored otherwise.
        timesteps: ``[T]`` model timestep of each step, in sampling order.

    Returns:
        A ``Selection``. The same config (seed included) and inputs give the same selection;
        ``tdac`` in knn mode is deterministic and does not use the seed.

    Raises:
        ParamError: a size the dump cannot supply, or tdac without features.
    """
    timesteps = np.asarray(timesteps)
    if timesteps.shape != (n_steps,):
        raise ValueError(f"timesteps must be [T] = [{n_steps}], got shape {timesteps.shape}")
    rng = np.random.default_rng(config.seed)
    nan = np.full(n_steps, np.nan)
    density = diversity = weight = nan
    radius = None

    if config.method == "tdac":
        tdac = config.tdac
        if features is None:
            raise ParamError(
                "select.method=tdac needs the TDAC feature maps (the input of "
                f"select.tdac.feature_layer={tdac.feature_layer!r}) recorded by the dump stage; "
                "none were given. Dump them, or choose select.method uniform, ndtc or random"
            )
        if int(features.shape[0]) != n_steps:
            raise ValueError(f"features hold {features.shape[0]} steps, the dump has {n_steps}")
        if tdac.mode == "reference" and config.size > n_trajectories:
            require_trajectories(config.size, n_trajectories)  # fail before the scoring pass
        # 1. Pairwise step MSEs and diversities (one pass over the features).
        stats = step_statistics(features)
        # 2. The density radius: fixed, or a quantile of the pairwise MSEs.
        radius = auto_radius(stats.mse, tdac.radius_quantile) if tdac.radius == "auto" else float(tdac.radius)
        density = density_counts(stats.mse, radius).astype(np.float64)
        diversity = stats.diversity
        weight = tdac_weights(density, diversity, tdac.lam)
        # 3. Samples per step.
        counts = tdac_allocation(density, diversity, config.size, tdac.lam)
        # 4. Which trajectory at which step.
        if tdac.mode == "reference":
            method = "tdac"
            traj, step = assemble_reference(counts, n_trajectories, rng)
        else:
            method = "tdac-knn"
            pooled = pool_features(features, tdac.knn.pool)
            traj, step = select_within_steps(pooled, counts, tdac.knn)
        logger.info(
            "TDAC (%s): radius %.6g, lambda %g, %d of %d steps used",
            tdac.mode,
            radius,
            tdac.lam,
            int((counts > 0).sum()),
            n_steps,
        )
    elif config.method == "uniform":
        method = "uniform"
        traj, step = uniform_selection(config.size, n_steps, n_trajectories, config.uniform)
    elif config.method == "ndtc":
        method = "ndtc"
        traj, step = ndtc_selection(config.size, n_steps, n_trajectories, config.ndtc, rng)
    else:
        method = "random"
        traj, step = random_selection(config.size, n_steps, n_trajectories, rng)

    # By trajectory, then step. Not by step: the activation ranges are an EMA over consecutive
    # batches (the first weighs ~70 %), so a step-sorted set fits them to the noisiest steps.
    order = np.lexsort((step, traj))
    traj, step = traj[order].astype(np.int64), step[order].astype(np.int64)
    per_step = {
        "count": np.bincount(step, minlength=n_steps).astype(np.int64),
        "timestep": timesteps.copy(),
        "density": np.asarray(density, dtype=np.float64),
        "diversity": np.asarray(diversity, dtype=np.float64),
        "weight": np.asarray(weight, dtype=np.float64),
    }
    logger.info(
        "select: %s chose %d samples from %d steps", method, traj.size, int((per_step["count"] > 0).sum())
    )
    return Selection(method=method, traj=traj, step=step, per_step=per_step, radius=radius)


def allocation_chart(
    timesteps: np.ndarray, count: np.ndarray, width: int = 40, max_rows: int = 25
) -> list[str]:
    """The per-step allocation as a text bar chart (for ``edadm inspect``).

    When T exceeds ``max_rows``, consecutive steps are grouped so the chart keeps about
    ``max_rows`` rows; a row then shows the step range, the timestep range and the group's
    total count. Bars are scaled to the largest row.

    Args:
        timesteps: ``[T]`` model timesteps in sampling order.
        count: ``[T]`` samples per step.
        width: characters of the longest bar.
        max_rows: rows before grouping.

    Returns:
        Lines of text: a header, then one line per step or group of steps.
    """
    timesteps = np.asarray(timesteps)
    count = np.asarray(count, dtype=np.int64)
    n_steps = count.size
    group = max(1, math.ceil(n_steps / max_rows))
    starts = np.arange(0, n_steps, group)
    totals = np.add.reduceat(count, starts) if n_steps else np.zeros(0, dtype=np.int64)
    largest = max(int(totals.max()) if totals.size else 0, 1)
    lines = [
        f"{'step':>9}  {'timestep':>11}  {'count':>6}  (total {int(count.sum())}, {group} step(s) per row)"
    ]
    for start, total in zip(starts, totals, strict=True):
        stop = min(start + group, n_steps) - 1
        steps = f"{start}" if stop == start else f"{start}-{stop}"
        times = f"{timesteps[start]}" if stop == start else f"{timesteps[start]}..{timesteps[stop]}"
        bar = "#" * int(round(width * int(total) / largest))
        lines.append(f"{steps:>9}  {times:>11}  {int(total):>6}  {bar}")
    return lines
