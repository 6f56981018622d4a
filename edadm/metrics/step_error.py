"""Where along the denoising trajectory a quantized model goes wrong.

Sample metrics say *that* a quantized model drifts from full precision; this says *where*:
the relative error of the predicted noise, ||eps_q - eps_fp||^2 / ||eps_fp||^2, at every
``every``-th step of the trajectory dump, on the FP inputs x_t stored there (so every model
sees the same inputs and errors do not compound). A calibration rule that starves some steps
of samples shows up as a bump at those steps.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import zarr
from torch import nn
from tqdm.auto import tqdm

from edadm.config import check_range


@torch.no_grad()
def noise_error_by_step(
    fp_unet: nn.Module,
    quantized: Mapping[str, nn.Module],
    trajectories: zarr.Group,
    every: int = 10,
    n: int = 64,
    device: torch.device | str = "cpu",
) -> list[dict[str, float]]:
    """One row per visited step: {"step", "t", <name>: relative noise error of each model}.

    ``trajectories``: the dump (``x`` [T, N, C, H, W], ``t`` [T]); the last ``n`` trajectories
    are used at steps 0, every, 2 * every, ... and always the last step.
    """
    check_range("every", every, 1)
    check_range("n", n, 1)
    if not quantized:
        raise ValueError("no quantized model to compare: give at least one")
    x_all, timesteps = trajectories["x"], np.asarray(trajectories["t"][...])
    n = min(n, x_all.shape[1])
    steps = sorted({*range(0, len(timesteps), every), len(timesteps) - 1})
    rows = []
    for step in tqdm(steps, desc="step error", unit="step", leave=False):
        x = torch.from_numpy(np.asarray(x_all[step, -n:], dtype=np.float32)).to(device)
        t = torch.full((n,), int(timesteps[step]), dtype=torch.long, device=device)
        eps_fp = fp_unet(x, t).sample
        norm = float((eps_fp.double() ** 2).sum())
        row = {"step": step, "t": int(timesteps[step])}
        for name, model in quantized.items():
            row[name] = float(((model(x, t).sample - eps_fp).double() ** 2).sum()) / max(norm, 1e-30)
        rows.append(row)
    return rows
