"""Sampling with diffusers schedulers, recording the trajectory for calibration.

``sample`` runs the reverse process from given initial noise; an ``on_step`` callback sees
every step's model input x_t and timestep, which is what the trajectory dump stores and what
calibration samples are drawn from (METHOD.md section 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin

from edadm.config import ParamError, check_range

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpmsolver": DPMSolverMultistepScheduler}


@dataclass(frozen=True)
class SamplerConfig:
    """params.yaml ``sampler``: the sampler the quantized model will be used with."""

    name: Literal["ddim", "ddpm", "dpmsolver"] = "ddim"
    steps: int = 100  # the paper's CIFAR-10 setting (DDIM, 100 steps, eta 0)
    eta: float = 0.0

    def __post_init__(self) -> None:
        check_range("sampler.steps", self.steps, 1)
        check_range("sampler.eta", self.eta, 0.0, 1.0)
        if self.eta and self.name != "ddim":
            raise ParamError(f"sampler.eta applies to ddim only; set it to 0 for sampler.name={self.name}")


def make_sampler(train_scheduler: SchedulerMixin, config: SamplerConfig) -> SchedulerMixin:
    """A fresh sampler with the model's noise schedule, its timesteps set to ``config.steps``."""
    sampler = SCHEDULERS[config.name].from_config(train_scheduler.config)
    if config.steps > sampler.config.num_train_timesteps:
        raise ParamError(
            f"sampler.steps={config.steps} exceeds the model's "
            f"{sampler.config.num_train_timesteps} training steps"
        )
    sampler.set_timesteps(config.steps)
    return sampler


StepCallback = Callable[[int, int, torch.Tensor], None]


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    train_scheduler: SchedulerMixin,
    noise: torch.Tensor,
    config: SamplerConfig,
    generator: torch.Generator | None = None,
    on_step: StepCallback | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``noise`` [B, C, H, W]; return x_0 [B, C, H, W].

    ``on_step(i, t, x_t)`` is called before the model at every step i = 0..steps-1 (i = 0 the
    noisiest), with the exact model input. ``generator`` feeds the stochastic samplers' noise.
    """
    sampler = make_sampler(train_scheduler, config)
    device = next(unet.parameters()).device
    x = noise.to(device) * sampler.init_noise_sigma
    extra = {"encoder_hidden_states": encoder_hidden_states} if encoder_hidden_states is not None else {}
    step_kwargs = {"eta": config.eta} if config.name == "ddim" else {}
    for i, t in enumerate(sampler.timesteps):
        model_input = sampler.scale_model_input(x, t)
        if on_step is not None:
            on_step(i, int(t), model_input)
        timestep = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        eps = unet(model_input, timestep, **extra).sample
        x = sampler.step(eps, t, x, generator=generator, **step_kwargs).prev_sample
    return x


def sampling_timesteps(train_scheduler: SchedulerMixin, config: SamplerConfig) -> list[int]:
    """The timestep values the sampler visits, in order (noisiest first)."""
    return [int(t) for t in make_sampler(train_scheduler, config).timesteps]
