"""Sampling with diffusers schedulers, recording the trajectory for calibration.

``sample`` runs the reverse process from given initial noise; an ``on_step`` callback sees
every step's model input x_t and timestep, which is what the trajectory dump stores and what
calibration samples are drawn from (docs/method.md §1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from edadm.config import check_range
from edadm.errors import ParamError

if TYPE_CHECKING:
    from edadm.diffusion.conditioning import BatchCondition

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpmsolver": DPMSolverMultistepScheduler}


@dataclass(frozen=True)
class SamplerConfig:
    """params.yaml ``sampler``: the sampler the quantized model will be used with."""

    name: Literal["ddim", "ddpm", "dpmsolver"] = "ddim"
    steps: int = 100  # the paper's CIFAR-10 setting (DDIM, 100 steps, eta 0)
    eta: float = 0.0
    # uniform: diffusers' own spacing; quadratic: the official DDIM/EDA-DM CIFAR-10 `skip_type: quad`
    spacing: Literal["uniform", "quadratic"] = "uniform"

    def __post_init__(self) -> None:
        check_range("sampler.steps", self.steps, 1)
        check_range("sampler.eta", self.eta, 0.0, 1.0)
        if self.eta and self.name != "ddim":
            raise ParamError(f"sampler.eta applies to ddim only; set it to 0 for sampler.name={self.name}")
        if self.spacing == "quadratic" and self.name != "ddim":
            raise ParamError(
                f"sampler.spacing=quadratic applies to ddim only; use uniform for sampler.name={self.name}"
            )


def make_sampler(train_scheduler: SchedulerMixin, config: SamplerConfig) -> SchedulerMixin:
    """A fresh sampler with the model's noise schedule, its timesteps set to ``config.steps``."""
    sampler = SCHEDULERS[config.name].from_config(train_scheduler.config)
    if config.steps > sampler.config.num_train_timesteps:
        raise ParamError(
            f"sampler.steps={config.steps} exceeds the model's "
            f"{sampler.config.num_train_timesteps} training steps"
        )
    if config.spacing == "quadratic":
        # ddim_step implements the official eps-prediction update only
        if sampler.config.prediction_type != "epsilon":
            raise ParamError(
                "sampler.spacing=quadratic needs an epsilon-prediction model; this model's scheduler has "
                f"prediction_type={sampler.config.prediction_type} (use sampler.spacing=uniform)"
            )
        if sampler.config.thresholding:
            raise ParamError("sampler.spacing=quadratic does not support the scheduler's thresholding")
    sampler.set_timesteps(config.steps)
    return sampler


def quadratic_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The official DDIM ``skip_type: quad`` timesteps, noisiest first.

    Kept exactly as the official code builds them, repeats included (100 steps over 1000 give
    four 0s and two 2s): a step from t to the same t is what the official sampler runs.
    """
    seq = [int(s) for s in np.linspace(0, np.sqrt(0.8 * num_train_timesteps), steps) ** 2]
    return seq[::-1]


def _timesteps(sampler: SchedulerMixin, config: SamplerConfig) -> list[int]:
    """The one place the visited timesteps are chosen (noisiest first)."""
    if config.spacing == "quadratic":
        return quadratic_timesteps(sampler.config.num_train_timesteps, config.steps)
    return [int(t) for t in sampler.timesteps]


def ddim_step(
    scheduler: DDIMScheduler,
    eps: torch.Tensor,
    t: int,
    prev_t: int,
    x: torch.Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One DDIM update of x_t [B, C, H, W] from timestep t to ``prev_t`` (-1: to x_0), eps-prediction.

    diffusers' ``DDIMScheduler.step`` assumes prev = t - T // steps, wrong for non-uniform
    timesteps; this takes prev explicitly and otherwise follows it op for op (clip_sample,
    the eta variance and the generator's noise), so uniform timesteps give its result.
    """
    alpha_prod_t = scheduler.alphas_cumprod[t]
    # the official code's alpha_cumprod at -1 is 1: diffusers' final_alpha_cumprod (set_alpha_to_one)
    alpha_prod_t_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev

    x0 = (x - beta_prod_t ** (0.5) * eps) / alpha_prod_t ** (0.5)
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)

    # sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * eps
    prev_x = alpha_prod_t_prev ** (0.5) * x0 + direction
    if eta > 0:
        noise = randn_tensor(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
        prev_x = prev_x + std_dev_t * noise
    return prev_x


StepCallback = Callable[[int, int, torch.Tensor], None]


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    train_scheduler: SchedulerMixin,
    noise: torch.Tensor,
    config: SamplerConfig,
    generator: torch.Generator | None = None,
    on_step: StepCallback | None = None,
    condition: BatchCondition | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``noise`` [B, C, H, W]; return x_0 [B, C, H, W].

    ``on_step(i, t, x_t)`` is called before the model at every step i = 0..steps-1 (i = 0 the
    noisiest), with the exact model input. ``generator`` feeds the stochastic samplers' noise.
    ``condition``: the batch's class labels or text embeddings, and classifier-free guidance
    (edadm.diffusion.conditioning); None for unconditional models.
    """
    sampler = make_sampler(train_scheduler, config)
    timesteps = _timesteps(sampler, config)
    # each step goes to the next visited timestep, x_0 (-1) after the last, as the official code
    prev_timesteps = [*timesteps[1:], -1]
    device = next(unet.parameters()).device
    x = noise.to(device) * sampler.init_noise_sigma
    step_kwargs = {"eta": config.eta} if config.name == "ddim" else {}
    for i, t in enumerate(timesteps):
        model_input = sampler.scale_model_input(x, t)
        if on_step is not None:
            on_step(i, t, model_input)
        timestep = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        eps = (
            unet(model_input, timestep).sample
            if condition is None
            else condition.eps(unet, model_input, timestep)
        )
        if config.spacing == "quadratic":
            x = ddim_step(sampler, eps, t, prev_timesteps[i], x, config.eta, generator)
        else:
            x = sampler.step(eps, t, x, generator=generator, **step_kwargs).prev_sample
    return x


def sampling_timesteps(train_scheduler: SchedulerMixin, config: SamplerConfig) -> list[int]:
    """The timestep values ``sample`` visits, in order (noisiest first); what the dump stores."""
    return _timesteps(make_sampler(train_scheduler, config), config)
