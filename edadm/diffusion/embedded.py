"""The embedded default: a small UNet2DModel trained on scikit-learn's digits.

It exists so that a fresh clone runs end to end with no download. Its architecture has what
EDA-DM needs: ResNet blocks, attention at the middle resolution (8x8) and a mid-block
attention at 4x4 whose input TDAC hooks (features [B, 64, 4, 4]).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from edadm.config import ParamError, check_range

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedConfig:
    """Training knobs of the embedded default (params.yaml ``model.embedded``)."""

    train_steps: int = 900  # 0.56 s a step at batch 128 on 2 cores: the stage stays under 10 minutes
    batch_size: int = 128
    lr: float = 2e-3  # a small UNet on 1.8k images tolerates a large rate with warm-up
    warmup_steps: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.995  # short run: a long EMA horizon would average in the untrained start
    # cosine: decay to 10 % of lr over train_steps; constant: lr after the warm-up, so that a
    # snapshot at step k of a longer run is the model of a k-step run (bench/training_curve.py)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    image_size: int = 16
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    num_train_timesteps: int = 1000
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        check_range("model.embedded.train_steps", self.train_steps, 1)
        check_range("model.embedded.batch_size", self.batch_size, 1)
        check_range("model.embedded.lr", self.lr, 0.0)
        check_range("model.embedded.ema_decay", self.ema_decay, 0.0, 1.0)
        check_range("model.embedded.warmup_steps", self.warmup_steps, 0)
        if len(self.block_out_channels) != 3:
            raise ParamError("model.embedded.block_out_channels must list 3 widths (one per resolution)")
        if self.image_size % 4:
            raise ParamError("model.embedded.image_size must be divisible by 4 (two downsamplings)")


def build_embedded_unet(config: EmbeddedConfig = EmbeddedConfig()) -> UNet2DModel:
    """The embedded default architecture (random weights)."""
    return UNet2DModel(
        sample_size=config.image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=config.block_out_channels[1] // 2,  # two heads at every width
    )


def build_embedded_scheduler(config: EmbeddedConfig = EmbeddedConfig()) -> DDPMScheduler:
    """DDPM schedule: 1000 linear-beta steps, epsilon prediction (Ho et al. 2020)."""
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=2e-2,
        prediction_type="epsilon",
        clip_sample=True,
    )


def _lr_factor(step: int, config: EmbeddedConfig) -> float:
    """Linear warm-up, then constant or cosine decay to 10% of the peak rate."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.train_steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_embedded(
    images: np.ndarray,
    config: EmbeddedConfig,
    device: torch.device,
    snapshot_steps: Sequence[int] = (),
    on_snapshot: Callable[[int, UNet2DModel], None] | None = None,
) -> tuple[UNet2DModel, DDPMScheduler, dict]:
    """Train the embedded UNet on ``images`` [N, 1, H, W] in [-1, 1] with the DDPM loss.

    Returns the EMA weights (what gets saved and sampled), the scheduler, and a training log
    ``{"loss": [...], "loss_steps": [...], "steps": ...}`` (no timings: it is an artifact).
    ``on_snapshot(step, ema)`` is called after each of ``snapshot_steps`` (a training curve
    from one run; with ``lr_schedule: constant`` each snapshot is a shorter run's model).
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    unet = build_embedded_unet(config).to(device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = build_embedded_scheduler(config)
    data = torch.from_numpy(images).float()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    alphas_cumprod = scheduler.alphas_cumprod.to(device)

    losses, loss_steps, running = [], [], []
    start = time.perf_counter()
    progress = tqdm(range(config.train_steps), desc="train embedded UNet", unit="step")
    for step in progress:
        # 1. a batch of clean images, noise and timesteps (all from the seeded generator)
        index = torch.randint(0, len(data), (config.batch_size,), generator=generator)
        x0 = data[index].to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, config.num_train_timesteps, (config.batch_size,), generator=generator).to(device)
        # 2. forward diffusion q(x_t | x_0) and the epsilon-prediction loss (Ho et al. eq. 14)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        # 3. EMA of the weights; warmed up so early steps are not frozen in
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        running.append(loss.item())
        if on_snapshot is not None and step + 1 in snapshot_steps:
            on_snapshot(step + 1, ema)
        if (step + 1) % config.log_every == 0 or step + 1 == config.train_steps:
            losses.append(float(np.mean(running)))
            loss_steps.append(step + 1)
            running = []
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    logger.info("trained %d steps in %.0f s, final loss %.4f", config.train_steps, seconds, losses[-1])
    log = {
        "loss": losses,
        "loss_steps": loss_steps,
        "steps": config.train_steps,
    }
    return ema.cpu(), scheduler, log
