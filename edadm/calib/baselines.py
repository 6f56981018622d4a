"""Calibration baselines EDA-DM compares against (docs/method.md §2, "Baselines").

- ``uniform``: Q-Diffusion's time-step-aware calibration: evenly spaced steps, the same
  first trajectories at each of them.
- ``ndtc``: PTQ4DM's normally distributed time-step calibration: one sample per trajectory,
  its step drawn from N(mu, sigma) on the [0, 1) scale of the sampling order.
- ``random``: uniform random (trajectory, step) pairs without repetition.

Every function returns ``(traj [n], step [n])`` int64 arrays; step ``i = 0..T-1`` is in
sampling order (``i = 0`` is the first, noisiest denoising step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edadm.config import check_range
from edadm.errors import ParamError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UniformConfig:
    """Knobs of ``select.uniform`` (Q-Diffusion).

    Attributes:
        n_steps: Q-Diffusion's ``cali_st``; steps ``range(0, T, T // n_steps)`` (20 in
            Q-Diffusion; when T is not a multiple of n_steps this gives more than n_steps
            steps, exactly as Q-Diffusion does).
        per_step: trajectories per chosen step (Q-Diffusion's ``cali_n``). ``null`` (default)
            takes ``select.size // number of chosen steps`` so that all methods compare at the
            same calibration budget (``size // n_steps`` when T is a multiple of n_steps);
            ``per_step: 256`` with ``n_steps: 20`` reproduces Q-Diffusion's 5120 samples.
    """

    n_steps: int = 20
    per_step: int | None = None

    def __post_init__(self) -> None:
        check_range("select.uniform.n_steps", self.n_steps, low=1)
        if self.per_step is not None:
            check_range("select.uniform.per_step", self.per_step, low=1)


@dataclass(frozen=True)
class NDTCConfig:
    """Knobs of ``select.ndtc`` (PTQ4DM): the step is ``int(N(mu, sigma) * T)``, clamped.

    Attributes:
        mu: mean on the [0, 1) scale of the sampling order (0 = first, noisiest step). 0.4 in
            PTQ4DM.
        sigma: standard deviation on the same scale. 0.4 in PTQ4DM.
    """

    mu: float = 0.4
    sigma: float = 0.4

    def __post_init__(self) -> None:
        check_range("select.ndtc.sigma", self.sigma, low=0.0)


def uniform_selection(
    size: int, n_steps: int, n_trajectories: int, config: UniformConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Q-Diffusion: the first ``per_step`` trajectories at steps ``range(0, T, T // n_steps)``.

    Trajectories are reused across steps, as in Q-Diffusion.

    Args:
        size: ``select.size``, the budget that sets ``per_step`` when it is null.
        n_steps: T, sampling steps in the dump.
        n_trajectories: N, trajectories in the dump.
        config: ``select.uniform``.

    Returns:
        ``(traj, step)`` of ``len(steps) * per_step`` samples, grouped by step.
    """
    stride = n_steps // config.n_steps
    if stride < 1:
        raise ParamError(
            f"select.uniform.n_steps={config.n_steps} exceeds the {n_steps} sampling steps of the dump"
        )
    chosen = np.arange(0, n_steps, stride, dtype=np.int64)
    per_step = config.per_step if config.per_step is not None else size // chosen.size
    if per_step < 1:
        raise ParamError(
            f"select.size={size} is smaller than the {chosen.size} uniform steps: "
            "raise select.size or set select.uniform.per_step"
        )
    if per_step > n_trajectories:
        raise ParamError(
            f"select.uniform.per_step={per_step} exceeds the {n_trajectories} trajectories of the dump "
            "(dump.trajectories)"
        )
    if config.per_step is None and per_step * chosen.size != size:
        logger.info(
            "uniform: %d steps x %d trajectories = %d samples (select.size=%d is not a multiple of %d)",
            chosen.size,
            per_step,
            per_step * chosen.size,
            size,
            chosen.size,
        )
    step = np.repeat(chosen, per_step)
    traj = np.tile(np.arange(per_step, dtype=np.int64), chosen.size)
    return traj, step


def ndtc_steps(size: int, n_steps: int, config: NDTCConfig, rng: np.random.Generator) -> np.ndarray:
    """PTQ4DM's step draw: ``t = int(z * T)`` with ``z ~ N(mu, sigma)``, clamped to [0, T - 1].

    ``int`` truncates toward zero (as Python's ``int``), then the clamp maps everything below
    0 to the first step and everything past the end to the last. ``[size]`` int64.
    """
    z = rng.normal(config.mu, config.sigma, size=size)
    return np.clip(np.trunc(z * n_steps), 0, n_steps - 1).astype(np.int64)


def ndtc_selection(
    size: int, n_steps: int, n_trajectories: int, config: NDTCConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """PTQ4DM (NDTC): trajectory b at step ``ndtc_steps(...)[b]``, one sample per trajectory."""
    if size > n_trajectories:
        raise ParamError(
            f"select.size={size} exceeds the {n_trajectories} trajectories of the dump (dump.trajectories): "
            "NDTC takes each calibration sample from its own trajectory"
        )
    return np.arange(size, dtype=np.int64), ndtc_steps(size, n_steps, config, rng)


def random_selection(
    size: int, n_steps: int, n_trajectories: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random (trajectory, step) pairs without repetition."""
    candidates = n_steps * n_trajectories
    if size > candidates:
        raise ParamError(
            f"select.size={size} exceeds the {candidates} (trajectory, step) pairs of the dump "
            f"({n_trajectories} trajectories x {n_steps} steps)"
        )
    flat = rng.choice(candidates, size=size, replace=False).astype(np.int64)
    return flat // n_steps, flat % n_steps
