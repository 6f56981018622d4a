"""Sample sets for evaluation: ``sample.n`` images from fixed per-image seeds, in a Zarr store.

Image k starts from noise drawn with seed ``sample.seed * SEED_STRIDE + k``, whatever the
batch size, so the FP and the quantized model denoise exactly the same x_T (paired samples)
and the FP row can be redrawn at other seeds for the noise floor.

Layout of a samples store: images [n, C, H, W] float32 in [-1, 1], seeds [n] int64, and for
conditional models conditions [n] int64, image k's condition index (into the attrs'
``condition.labels`` or ``condition.prompts``), drawn from its seed as the dump draws them.
Latent models' images are the float VAE's decoding of the sampled latents. Under torchrun
each rank writes whole batches of images (``edadm.artifacts.shared_output``); attrs
``world_size`` records how many ranks did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from diffusers import SchedulerMixin
from tqdm.auto import tqdm

from edadm.artifacts import (
    SAMPLES,
    create_array,
    create_store,
    finish_store,
    join_store,
    open_store,
    read_array,
    shared_output,
    writable_array,
)
from edadm.config import check_range
from edadm.diffusion.sampling import SamplerConfig, sample
from edadm.distributed import Dist

if TYPE_CHECKING:  # the evaluate stage reads sample stores without the models' code
    from edadm.diffusion.conditioning import Conditioning

logger = logging.getLogger(__name__)

SEED_STRIDE = 1_000_003  # > any sample.n: seed sets of different sample.seed never overlap


@dataclass(frozen=True)
class SampleConfig:
    """params.yaml ``sample``."""

    n: int = 1024  # the Frechet distance is biased upwards for small n: compare rows at one n
    batch_size: int = 256
    seed: int = 0
    # int: the quantized Conv2d / Linear layers on int8 kernels (edadm.deploy.integer)
    mode: Literal["fake", "int"] = "fake"
    int_backend: Literal["auto", "onednn", "int_mm"] = "auto"  # auto: onednn on CPU, int_mm on CUDA
    # mode int: torch.compile the integer UNet (edadm.deploy.compiled): same codes, fused element-wise work
    int_compile: bool = False

    def __post_init__(self) -> None:
        check_range("sample.n", self.n, 1)
        check_range("sample.batch_size", self.batch_size, 1)
        check_range("sample.seed", self.seed, 0)


def initial_noise(seeds: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """x_T [len(seeds), *shape], image k drawn from its own generator seeded ``seeds[k]``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def _image_shape(
    shape: tuple[int, ...], decode: Callable[[torch.Tensor], torch.Tensor] | None, device: torch.device
) -> tuple[int, ...]:
    """The stored images' [C, H, W]: the sampler's ``shape``, or the VAE's decoding of it (one
    decode of a zero latent: the store is created before any rank samples)."""
    if decode is None:
        return shape
    return tuple(decode(torch.zeros((1, *shape), device=device)).shape[1:])


@torch.no_grad()
def generate_samples(
    unet: torch.nn.Module,
    train_scheduler: SchedulerMixin,
    sampler_config: SamplerConfig,
    config: SampleConfig,
    out_path: str | Path,
    device: torch.device,
    attrs: dict[str, Any] | None = None,
    desc: str = "sample",
    *,
    conditioning: Conditioning | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dist: Dist | None = None,
) -> None:
    """Sample ``config.n`` images and write them to the samples store ``out_path`` atomically.

    ``unet``: the FP or the quantized UNet. ``conditioning``: what a conditional model is
    conditioned on (the FP model's text encoder made its embeddings). ``decode``: latents to
    images (``DiffusionModel.decode``: the float VAE) for latent models. ``dist``: this
    process's rank under torchrun (None: one process); each rank samples a contiguous run of
    the batches one process runs, into its region of one store, so the images do not depend
    on the number of ranks.
    """
    dist = dist or Dist()
    unet = unet.to(device).eval()
    size = unet.config.sample_size
    shape = (unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    seeds = config.seed * SEED_STRIDE + np.arange(config.n, dtype=np.int64)
    conditional = conditioning is not None and conditioning.kind != "none"
    conditions = conditioning.draw(seeds) if conditional else None
    store_attrs = {"sample": config.__dict__, "sampler": sampler_config.__dict__, **(attrs or {})}
    store_attrs["condition"] = conditioning.attrs() if conditional else None
    store_attrs["world_size"] = dist.world_size  # the images do not depend on it
    # whole batches per rank: a chunk is one batch, so no two ranks write one chunk
    shard = dist.shard(config.n, config.batch_size)
    with shared_output(out_path, dist) as tmp:
        if dist.is_main:
            store = create_store(tmp, SAMPLES, store_attrs)
            create_array(store, "seeds", (config.n,), np.int64, data=seeds)
            if conditional:
                create_array(store, "conditions", (config.n,), np.int64, data=conditions)
            image_shape = _image_shape(shape, decode, device)
            chunks = (config.batch_size, *image_shape)
            create_array(store, "images", (config.n, *image_shape), np.float32, chunks=chunks)
        store = join_store(tmp, dist)
        images = writable_array(store, "images")
        starts = range(shard.start, shard.stop, config.batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not dist.is_main):
            batch_seeds = seeds[start : start + config.batch_size]
            noise = initial_noise(batch_seeds, shape)
            # Stochastic samplers (eta > 0) draw their step noise from a generator tied to the batch's seeds.
            generator = torch.Generator(device=device).manual_seed(int(batch_seeds[0]))
            condition = (
                conditioning.batch(conditions[start : start + len(batch_seeds)], device)
                if conditional
                else None
            )
            x0 = sample(unet, train_scheduler, noise, sampler_config, generator, condition=condition)
            batch_images = (decode(x0) if decode is not None else x0).clamp(-1, 1).float().cpu().numpy()
            images[start : start + len(batch_seeds)] = batch_images
        dist.barrier()  # every rank's images are written
        if dist.is_main:
            finish_store(store)
    if dist.is_main:
        logger.info("wrote %d samples to %s", config.n, out_path)


def load_samples(path: str | Path, stage: str = "sample_fp") -> tuple[np.ndarray, np.ndarray]:
    """``(images [n, C, H, W], seeds [n])`` from a finished samples store made by ``stage``."""
    store = open_store(path, SAMPLES, stage)
    return read_array(store, "images", path, stage), read_array(store, "seeds", path, stage)
