"""Choosing the calibration set: the ``select`` params and one entry point for every method.

``choose_calibration(config, ...)`` dispatches on ``select.method``: TDAC (EDA-DM, docs/method.md
section 2, in ``edadm.calib.tdac``) or one of the baselines (``edadm.calib.baselines``:
uniform / Q-Diffusion, ndtc / PTQ4DM, random). It returns a ``Selection``: which trajectory at
which step makes each calibration sample, plus per-step diagnostics for the ``select`` stage's
plot and for ``edadm inspect`` (``allocation_chart``).
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
from edadm.calib.tdac import TDACConfig, tdac_selection
from edadm.config import check_range
from edadm.errors import ParamError

logger = logging.getLogger(__name__)

METHODS = ("tdac", "uniform", "ndtc", "random")


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
    """Choose the calibration set with ``config.method``.

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
        if features is None:
            raise ParamError(
                "select.method=tdac needs the TDAC feature maps (the input of "
                f"select.tdac.feature_layer={config.tdac.feature_layer!r}) recorded by the dump stage; "
                "none were given. Dump them, or choose select.method uniform, ndtc or random"
            )
        if int(features.shape[0]) != n_steps:
            raise ValueError(f"features hold {features.shape[0]} steps, the dump has {n_steps}")
        tdac = tdac_selection(config.tdac, config.size, n_trajectories, features, rng)
        method, traj, step = tdac.method, tdac.traj, tdac.step
        density, diversity, weight, radius = tdac.density, tdac.diversity, tdac.weight, tdac.radius
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
