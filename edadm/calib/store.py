"""The calibration store ``calib.zarr``: the chosen (x_t, t) and how they were chosen.

Layout:
  x [n, C, H, W] float32, t [n] int64   the calibration inputs (model input and timestep)
  traj [n], step [n] int64             where each came from in the trajectory dump
  per_step/{density, diversity, weight, count} [T]   the selection's per-step statistics
  timesteps [T]                        the dump's timestep of each step
  encoder_hidden_states [n, L, D], class_labels [n]   conditioning, when the model takes it

``load_calibration`` reads it into a ``CalibrationSet`` (torch tensors), which the reconstruct
stage hands to ``run_reconstruction`` as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from edadm.artifacts import (
    CALIBRATION,
    TRAJECTORIES,
    atomic_output,
    create_array,
    create_store,
    finish_store,
    open_store,
    read_array,
    write_csv,
)
from edadm.calib.calibration_set import CalibrationSet

PER_STEP = ("density", "diversity", "weight", "count")
CONDITIONING = ("encoder_hidden_states", "class_labels")  # optional arrays, one row per sample


def open_trajectories(path: str | Path) -> zarr.Group:
    """The dump's store, validated (clear error naming the file and the `dump` stage)."""
    return open_store(path, TRAJECTORIES)


def gather_inputs(trajectories: zarr.Group, traj: np.ndarray, step: np.ndarray) -> np.ndarray:
    """x[step_k, traj_k] for every k, as float32 [n, C, H, W]; reads each needed step once."""
    x = trajectories["x"]
    out = np.empty((len(traj), *x.shape[2:]), dtype=np.float32)
    for s in np.unique(step):
        rows = np.nonzero(step == s)[0]
        out[rows] = np.asarray(x[int(s)])[traj[rows]]
    return out


def write_calibration(
    path: str | Path,
    x: np.ndarray,
    timesteps: np.ndarray,
    traj: np.ndarray,
    step: np.ndarray,
    per_step: dict[str, np.ndarray],
    attrs: dict[str, Any],
) -> None:
    """Write ``calib.zarr`` atomically; ``timesteps`` [T] is the dump's t of every step."""
    with atomic_output(path) as tmp:
        store = create_store(tmp, CALIBRATION, attrs)
        create_array(store, "x", x.shape, np.float32, data=x.astype(np.float32))
        create_array(store, "t", (len(step),), np.int64, data=timesteps[step].astype(np.int64))
        create_array(store, "traj", (len(traj),), np.int64, data=traj.astype(np.int64))
        create_array(store, "step", (len(step),), np.int64, data=step.astype(np.int64))
        create_array(store, "timesteps", timesteps.shape, np.int64, data=timesteps.astype(np.int64))
        group = store.create_group("per_step")
        for name, values in per_step.items():
            values = np.asarray(values)
            create_array(group, name, values.shape, values.dtype, data=values)
        finish_store(store)


def load_calibration(path: str | Path) -> CalibrationSet:
    """Read a finished ``calib.zarr`` into a ``CalibrationSet`` (x float32, t / traj / step int64)."""
    store = open_store(path, CALIBRATION)
    names = ["x", "t", "traj", "step"] + [name for name in CONDITIONING if name in store]
    arrays = {name: read_array(store, name, path, CALIBRATION.stage) for name in names}
    if len(arrays["x"]) == 0:
        raise ValueError(f"{path} holds an empty calibration set; raise select.size")
    arrays["x"] = arrays["x"].astype(np.float32, copy=False)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in arrays.items()}
    try:
        return CalibrationSet(**tensors, attrs=dict(store.attrs))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def write_step_table(path: str | Path, timesteps: np.ndarray, per_step: dict[str, np.ndarray]) -> None:
    """plots/tdac.csv: one row per step (step, t, density, diversity, weight, count)."""
    columns = [name for name in PER_STEP if name in per_step]
    rows = []
    for i, t in enumerate(timesteps):
        row = {"step": i, "t": int(t)}
        for name in columns:
            value = per_step[name][i]
            row[name] = int(value) if name == "count" else ("" if np.isnan(value) else f"{value:.6g}")
        rows.append(row)
    write_csv(path, rows, header=["step", "t", *columns])
