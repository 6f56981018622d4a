"""The trajectory dump (METHOD.md section 1): FP sampling paths stored as a Zarr v3 group.

Layout of ``trajectories.zarr``:
  x         [T, N, C, H, W]  the model input at every step (``dump.dtype``)
  t         [T]              the timestep value of every step (noisiest first)
  x0        [N, C, H, W]     the final FP samples (float32)
  features  [T, B, C', h', w'] the input of ``feature_layer`` for the first B trajectories
Chunks hold several steps of one batch of trajectories, so a store is a few dozen MB-sized
files rather than thousands of tiny ones.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import SchedulerMixin, UNet2DConditionModel
from tqdm.auto import tqdm

from edadm.artifacts import TRAJECTORIES, atomic_output, create_array, create_store, finish_store
from edadm.config import ParamError, as_dict, check_range
from edadm.diffusion.hooks import InputRecorder
from edadm.diffusion.loading import model_hash
from edadm.diffusion.sampling import SamplerConfig, sample, sampling_timesteps

logger = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # aim for ~4 MB chunks


@dataclass(frozen=True)
class DumpConfig:
    """params.yaml ``dump``."""

    trajectories: int = 1024  # N candidates per step; TDAC's assembly takes one sample per trajectory
    batch_size: int = 256
    dtype: Literal["float16", "float32"] = (
        "float16"  # x_t is unit-scale noise/images: fp16 loses nothing TDAC sees
    )
    feature_batch: int | None = None  # B trajectories whose features are stored; null = all
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("dump.trajectories", self.trajectories, 1)
        check_range("dump.batch_size", self.batch_size, 1)
        if self.feature_batch is not None:
            check_range("dump.feature_batch", self.feature_batch, 1, self.trajectories)

    @property
    def n_features(self) -> int:
        return self.trajectories if self.feature_batch is None else self.feature_batch


def _steps_per_chunk(bytes_per_step: int, n_steps: int) -> int:
    return max(1, min(CHUNK_BYTES // max(1, bytes_per_step), n_steps))


def _sample_batch(
    unet: torch.nn.Module,
    train_scheduler: SchedulerMixin,
    sampler_config: SamplerConfig,
    noise: torch.Tensor,
    generator: torch.Generator,
    recorder: InputRecorder,
    n_feat: int,
    dtype: np.dtype,
    progress: tqdm,
) -> tuple[np.ndarray, list[np.ndarray], torch.Tensor]:
    """One batch of trajectories: (x_t at every step [T, b, ...], features of the first
    ``n_feat`` trajectories per step, x_0)."""
    x_list: list[np.ndarray] = []
    feature_steps: list[np.ndarray] = []

    def record(i: int, t: int, x_t: torch.Tensor) -> None:
        # the features are the hooked input of the previous model call: take them on the next step
        if i > 0 and n_feat:
            feature_steps.append(recorder.last[:n_feat].cpu().numpy().astype(dtype))
        x_list.append(x_t.cpu().numpy().astype(dtype))
        progress.update(len(noise))

    x0 = sample(unet, train_scheduler, noise, sampler_config, generator, record)
    if n_feat:
        feature_steps.append(recorder.last[:n_feat].cpu().numpy().astype(dtype))
    return np.stack(x_list), feature_steps, x0


@torch.no_grad()
def dump_trajectories(
    unet: torch.nn.Module,
    train_scheduler: SchedulerMixin,
    sampler_config: SamplerConfig,
    config: DumpConfig,
    feature_layer: str,
    out_path: str | Path,
    device: torch.device,
) -> None:
    """Sample ``config.trajectories`` FP trajectories and write them to ``out_path`` atomically."""
    if isinstance(unet, UNet2DConditionModel):
        raise ParamError(
            "dump: conditional UNets (UNet2DConditionModel) need prompts/conditioning, which the dump stage "
            "does not produce yet; use an unconditional UNet2DModel"
        )
    unet = unet.to(device).eval()
    channels, size = unet.config.in_channels, unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    timesteps = sampling_timesteps(train_scheduler, sampler_config)
    n_steps, n_traj, batch = len(timesteps), config.trajectories, config.batch_size
    dtype = np.dtype(config.dtype)

    # 1. all initial noise from one seeded generator: independent of the batch size
    generator = torch.Generator().manual_seed(config.seed)
    noise = torch.randn((n_traj, channels, *size), generator=generator)

    attrs = {
        "sampler": as_dict(sampler_config),
        "dump": as_dict(config),
        "feature_layer": feature_layer,
        "model_hash": model_hash(unet),
        "timesteps": timesteps,
    }
    with atomic_output(out_path) as tmp:
        store = create_store(tmp, TRAJECTORIES, attrs)
        x_bytes = batch * channels * math.prod(size) * dtype.itemsize
        x_store = create_array(
            store,
            "x",
            (n_steps, n_traj, channels, *size),
            dtype,
            chunks=(_steps_per_chunk(x_bytes, n_steps), batch, channels, *size),
        )
        create_array(store, "t", (n_steps,), np.int64, data=np.asarray(timesteps, dtype=np.int64))
        x0_store = create_array(
            store, "x0", (n_traj, channels, *size), np.float32, chunks=(batch, channels, *size)
        )
        feature_store = None

        progress = tqdm(total=n_traj * n_steps, desc="dump trajectories", unit="step")
        with InputRecorder(unet, feature_layer) as recorder:
            for start in range(0, n_traj, batch):
                stop = min(start + batch, n_traj)
                n_feat = max(0, min(stop, config.n_features) - start)
                step_generator = torch.Generator(device=device).manual_seed(config.seed + 1 + start)
                x_steps, feature_steps, x0 = _sample_batch(
                    unet,
                    train_scheduler,
                    sampler_config,
                    noise[start:stop],
                    step_generator,
                    recorder,
                    n_feat,
                    dtype,
                    progress,
                )
                x_store[:, start:stop] = x_steps
                x0_store[start:stop] = x0.float().cpu().numpy()
                if n_feat:
                    features = np.stack(feature_steps)  # [T, b, C', h', w']
                    if feature_store is None:
                        f_shape = features.shape[2:]
                        f_bytes = batch * math.prod(f_shape) * dtype.itemsize
                        feature_store = create_array(
                            store,
                            "features",
                            (n_steps, config.n_features, *f_shape),
                            dtype,
                            chunks=(_steps_per_chunk(f_bytes, n_steps), batch, *f_shape),
                        )
                    feature_store[:, start : start + n_feat] = features
        progress.close()
        finish_store(store)
    logger.info("wrote %s: %d trajectories x %d steps", out_path, n_traj, n_steps)
