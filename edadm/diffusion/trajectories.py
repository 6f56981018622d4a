"""The trajectory dump (docs/method.md §1): FP sampling paths stored as a Zarr v3 group.

Layout of ``trajectories.zarr``:
  x         [T, N, C, H, W]  the model input at every step (``dump.dtype``)
  t         [T]              the timestep value of every step (noisiest first)
  x0        [N, C, H, W]     the final FP samples (float32)
  features  [T, B, C', h', w'] the input of ``feature_layer`` for the first B trajectories
  condition [N]              conditional models: each trajectory's condition index (a label
                             of attrs condition.labels, or a prompt of condition.prompts)
  prompt_embeddings [P, L, D], null_embedding [1, L, D]   text models: the text encoder's
                             output for every prompt and for the empty prompt, stored once
Under classifier-free guidance the UNet sees x_t twice at every step, with the condition and
with the null condition: both are calibration inputs (``edadm.calib.store``), built from x_t
and these arrays. The TDAC features are the conditional branch's.
Chunks hold several steps of one batch of trajectories, so a store is a few dozen MB-sized
files rather than thousands of tiny ones. Under torchrun each rank writes whole batches of
trajectories (``edadm.artifacts.shared_output``); attrs ``world_size`` records how many did.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import SchedulerMixin
from tqdm.auto import tqdm

from edadm.artifacts import (
    TRAJECTORIES,
    create_array,
    create_store,
    finish_store,
    join_store,
    shared_output,
    writable_array,
)
from edadm.config import as_dict, check_range
from edadm.diffusion.conditioning import BatchCondition, Conditioning
from edadm.diffusion.hooks import InputRecorder
from edadm.diffusion.loading import model_hash
from edadm.diffusion.sampling import SamplerConfig, sample, sampling_timesteps
from edadm.distributed import Dist

logger = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # aim for ~4 MB chunks
TRAJECTORY_SEED_STRIDE = 1_000_003  # trajectory j's condition comes from seed dump.seed * stride + j


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
    condition: BatchCondition | None,
) -> tuple[np.ndarray, list[np.ndarray], torch.Tensor]:
    """One batch of trajectories: (x_t at every step [T, b, ...], features of the first
    ``n_feat`` trajectories per step, x_0)."""
    x_list: list[np.ndarray] = []
    feature_steps: list[np.ndarray] = []
    # under guidance the model runs on [uncond; cond]: the features are the conditional half's
    first = len(noise) if condition is not None and condition.uncond is not None else 0

    def features() -> np.ndarray:
        return recorder.last[first : first + n_feat].cpu().numpy().astype(dtype)

    def record(i: int, t: int, x_t: torch.Tensor) -> None:
        # the features are the hooked input of the previous model call: take them on the next step
        if i > 0 and n_feat:
            feature_steps.append(features())
        x_list.append(x_t.cpu().numpy().astype(dtype))
        progress.update(len(noise))

    x0 = sample(unet, train_scheduler, noise, sampler_config, generator, record, condition)
    if n_feat:
        feature_steps.append(features())
    return np.stack(x_list), feature_steps, x0


def _feature_shape(
    unet: torch.nn.Module,
    recorder: InputRecorder,
    x: torch.Tensor,
    t: int,
    condition: BatchCondition | None,
) -> tuple[int, ...]:
    """The hooked layer's input shape [C', h', w'], from one model call on ``x: [1, C, H, W]``
    (the store, features included, is created before any rank samples)."""
    timestep = torch.full((len(x),), t, device=x.device, dtype=torch.long)
    if condition is None:
        unet(x, timestep)
    else:
        condition.eps(unet, x, timestep)
    return tuple(recorder.last.shape[1:])


@torch.no_grad()
def dump_trajectories(
    unet: torch.nn.Module,
    train_scheduler: SchedulerMixin,
    sampler_config: SamplerConfig,
    config: DumpConfig,
    feature_layer: str,
    out_path: str | Path,
    device: torch.device,
    conditioning: Conditioning | None = None,
    dist: Dist | None = None,
) -> None:
    """Sample ``config.trajectories`` FP trajectories and write them to ``out_path`` atomically.

    ``conditioning``: the conditions of a class-conditional or text model (each trajectory
    draws one from its index) and the guidance scale; None for unconditional models.
    ``dist``: this process's rank under torchrun (None: one process). Each rank samples a
    contiguous run of whole batches, the very batches one process runs, into its region of
    one store: the store does not depend on the number of ranks.
    """
    dist = dist or Dist()
    unet = unet.to(device).eval()
    channels, size = unet.config.in_channels, unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    timesteps = sampling_timesteps(train_scheduler, sampler_config)
    n_steps, n_traj, batch = len(timesteps), config.trajectories, config.batch_size
    dtype = np.dtype(config.dtype)

    # 1. all initial noise from one seeded generator: independent of the batch size, and of the
    #    ranks (every rank draws it all and takes its slice: a few MB at most)
    generator = torch.Generator().manual_seed(config.seed)
    noise = torch.randn((n_traj, channels, *size), generator=generator)
    conditions = (
        None
        if conditioning is None
        else conditioning.draw(config.seed * TRAJECTORY_SEED_STRIDE + np.arange(n_traj))
    )

    def batch_condition(start: int, stop: int) -> BatchCondition | None:
        return None if conditions is None else conditioning.batch(conditions[start:stop], device)

    attrs = {
        "sampler": as_dict(sampler_config),
        "dump": as_dict(config),
        "feature_layer": feature_layer,
        "model_hash": model_hash(unet),
        "timesteps": timesteps,
        "condition": None if conditioning is None else conditioning.attrs(),
        "world_size": dist.world_size,  # the arrays do not depend on it
    }
    # 2. this rank's batches: chunks hold whole batches, so no two ranks write one chunk
    shard = dist.shard(n_traj, batch)
    with InputRecorder(unet, feature_layer) as recorder, shared_output(out_path, dist) as tmp:
        if dist.is_main:
            store = create_store(tmp, TRAJECTORIES, attrs)
            x_bytes = batch * channels * math.prod(size) * dtype.itemsize
            create_array(
                store,
                "x",
                (n_steps, n_traj, channels, *size),
                dtype,
                chunks=(_steps_per_chunk(x_bytes, n_steps), batch, channels, *size),
            )
            create_array(store, "t", (n_steps,), np.int64, data=np.asarray(timesteps, dtype=np.int64))
            create_array(store, "x0", (n_traj, channels, *size), np.float32, chunks=(batch, channels, *size))
            first = noise[:1].to(device)
            f_shape = _feature_shape(unet, recorder, first, timesteps[0], batch_condition(0, 1))
            f_bytes = batch * math.prod(f_shape) * dtype.itemsize
            create_array(
                store,
                "features",
                (n_steps, config.n_features, *f_shape),
                dtype,
                chunks=(_steps_per_chunk(f_bytes, n_steps), batch, *f_shape),
            )
            if conditioning is not None and conditioning.kind != "none":
                create_array(store, "condition", (n_traj,), np.int64, data=conditions)
                if conditioning.kind == "text":
                    embeddings = {
                        "prompt_embeddings": conditioning.embeddings,
                        "null_embedding": conditioning.null_embedding,
                    }
                    for name, value in embeddings.items():
                        create_array(store, name, tuple(value.shape), np.float32, data=value.numpy())
        store = join_store(tmp, dist)
        x_store, x0_store = writable_array(store, "x"), writable_array(store, "x0")
        feature_store = writable_array(store, "features")

        # 3. sample and write this rank's batches
        progress = tqdm(
            total=len(shard) * n_steps, desc="dump trajectories", unit="step", disable=not dist.is_main
        )
        for start in range(shard.start, shard.stop, batch):
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
                batch_condition(start, stop),
            )
            x_store[:, start:stop] = x_steps
            x0_store[start:stop] = x0.float().cpu().numpy()
            if n_feat:
                feature_store[:, start : start + n_feat] = np.stack(feature_steps)  # [T, b, C', h', w']
        progress.close()
        dist.barrier()  # every rank's region is written
        if dist.is_main:
            finish_store(store)
    if dist.is_main:
        logger.info("wrote %s: %d trajectories x %d steps", out_path, n_traj, n_steps)
