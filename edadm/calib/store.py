"""The calibration store ``calib.zarr``: the chosen (x_t, t) and how they were chosen.

Layout:
  x [n, C, H, W] float32, t [n] int64   the calibration inputs (model input and timestep)
  traj [n], step [n] int64             where each came from in the trajectory dump
  per_step/{density, diversity, weight, count} [T]   the selection's per-step statistics
  timesteps [T]                        the dump's timestep of each step
  condition [n] int64                  conditional models: the sample's condition index in the
                                       dump's attrs, -1 for the unconditional (guidance) branch
  class_labels [n]                     class-conditional models: the UNet's label input
  prompt_embeddings [P, L, D], null_embedding [1, L, D]   text models: the embeddings once
Under classifier-free guidance the UNet sees every x_t with the condition and with the null
condition, so each selected sample is two calibration inputs (as Q-Diffusion calibrates Stable
Diffusion): the first n/2 rows the conditional branch, the next n/2 the unconditional one.

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
TEXT_EMBEDDINGS = ("prompt_embeddings", "null_embedding")
NULL_CONDITION = -1  # the condition index of the unconditional branch's rows


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


def calibration_rows(
    trajectories: zarr.Group, traj: np.ndarray, step: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``(traj, step, conditioning)`` of the calibration inputs for the selected samples.

    Unconditional dumps: the selection as it is, no conditioning arrays. Conditional dumps:
    ``condition`` (and ``class_labels``, or the text embeddings) for each row; under guidance
    every sample twice, conditional branch first, then unconditional (condition -1).
    """
    attrs = trajectories.attrs.get("condition") or {"kind": "none"}
    if attrs["kind"] == "none":
        return traj, step, {}
    condition = np.asarray(trajectories["condition"])[traj].astype(np.int64)
    if attrs["guidance_scale"] != 1.0:
        traj, step = np.concatenate([traj, traj]), np.concatenate([step, step])
        condition = np.concatenate([condition, np.full_like(condition, NULL_CONDITION)])
    arrays = {"condition": condition}
    if attrs["kind"] == "class":
        labels = np.asarray(attrs["labels"], dtype=np.int64)
        null = attrs["null_class"] if attrs["null_class"] is not None else NULL_CONDITION
        arrays["class_labels"] = np.where(condition >= 0, labels[condition], null).astype(np.int64)
    else:
        arrays.update({name: np.asarray(trajectories[name]) for name in TEXT_EMBEDDINGS})
    return traj, step, arrays


def write_calibration(
    path: str | Path,
    x: np.ndarray,
    timesteps: np.ndarray,
    traj: np.ndarray,
    step: np.ndarray,
    per_step: dict[str, np.ndarray],
    attrs: dict[str, Any],
    conditioning: dict[str, np.ndarray] | None = None,
) -> None:
    """Write ``calib.zarr`` atomically; ``timesteps`` [T] is the dump's t of every step;
    ``conditioning``: the arrays of ``calibration_rows``."""
    with atomic_output(path) as tmp:
        store = create_store(tmp, CALIBRATION, attrs)
        create_array(store, "x", x.shape, np.float32, data=x.astype(np.float32))
        create_array(store, "t", (len(step),), np.int64, data=timesteps[step].astype(np.int64))
        create_array(store, "traj", (len(traj),), np.int64, data=traj.astype(np.int64))
        create_array(store, "step", (len(step),), np.int64, data=step.astype(np.int64))
        create_array(store, "timesteps", timesteps.shape, np.int64, data=timesteps.astype(np.int64))
        for name, values in (conditioning or {}).items():
            create_array(store, name, values.shape, values.dtype, data=values)
        group = store.create_group("per_step")
        for name, values in per_step.items():
            values = np.asarray(values)
            create_array(group, name, values.shape, values.dtype, data=values)
        finish_store(store)


def load_calibration(path: str | Path) -> CalibrationSet:
    """Read a finished ``calib.zarr`` into a ``CalibrationSet`` (x float32, t / traj / step int64)."""
    store = open_store(path, CALIBRATION)
    names = ["x", "t", "traj", "step"] + [name for name in ("class_labels",) if name in store]
    arrays = {name: read_array(store, name, path, CALIBRATION.stage) for name in names}
    if len(arrays["x"]) == 0:
        raise ValueError(f"{path} holds an empty calibration set; raise select.size")
    arrays["x"] = arrays["x"].astype(np.float32, copy=False)
    if "prompt_embeddings" in store:
        # text models: each row's encoder_hidden_states from the embeddings stored once
        condition = read_array(store, "condition", path, CALIBRATION.stage)
        prompts, null = (read_array(store, name, path, CALIBRATION.stage) for name in TEXT_EMBEDDINGS)
        arrays["encoder_hidden_states"] = np.where(
            (condition >= 0)[:, None, None], prompts[np.maximum(condition, 0)], null
        ).astype(np.float32)
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
