"""Sampler timestep spacing: the official quadratic DDIM schedule, and the DDIM update that runs it
checked against diffusers' DDIMScheduler.step and against the official update loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tiny_models import tiny_attn_unet

from edadm.config import from_dict
from edadm.diffusion.sampling import (
    SamplerConfig,
    ddim_step,
    quadratic_timesteps,
    sample,
    sampling_timesteps,
)
from edadm.errors import ParamError


def _noise(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_quadratic_timesteps_follow_the_official_formula():
    ts = quadratic_timesteps(1000, 100)
    expected = [int(s) for s in np.linspace(0, np.sqrt(800), 100) ** 2][::-1]
    assert ts == expected and len(ts) == 100
    assert ts[0] == int(np.sqrt(800) ** 2) and ts[-1] == 0
    assert all(a >= b for a, b in zip(ts, ts[1:], strict=False))
    # the official sequence's repeats are kept: four 0s and two 2s at 100 steps over 1000
    assert ts.count(0) == 4 and ts.count(2) == 2


def test_sampling_timesteps_for_both_spacings():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    uniform = SamplerConfig(steps=10)
    assert sampling_timesteps(scheduler, uniform) == list(range(900, -1, -100))
    quad = SamplerConfig(steps=10, spacing="quadratic")
    expected = quadratic_timesteps(1000, 10)
    assert sampling_timesteps(scheduler, quad) == expected


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_with_uniform_prev_reproduces_diffusers(eta, clip):
    """Given diffusers' own prev = t - T // steps, ddim_step is DDIMScheduler.step, noise included."""
    unet = tiny_attn_unet()
    scheduler = DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=1000, clip_sample=clip).config)
    steps = 10
    scheduler.set_timesteps(steps)
    gen_ref, gen_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x_ref = x_ours = _noise()
    with torch.no_grad():
        for t in scheduler.timesteps:
            t_int = int(t)
            timestep = torch.full((2,), t_int, dtype=torch.long)
            eps_ref = unet(x_ref, timestep).sample
            eps_ours = unet(x_ours, timestep).sample
            x_ref = scheduler.step(eps_ref, t, x_ref, eta=eta, generator=gen_ref).prev_sample
            x_ours = ddim_step(scheduler, eps_ours, t_int, t_int - 1000 // steps, x_ours, eta, gen_ours)
            torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=1e-6)


def _official_generalized_steps(unet, betas: torch.Tensor, x: torch.Tensor, seq: list[int]) -> torch.Tensor:
    """The official DDIM ``generalized_steps`` at eta 0 (no x0 clipping), for comparison."""
    alphas = (1 - torch.cat([torch.zeros(1), betas])).cumprod(0)  # index t + 1; alpha at -1 is 1
    seq_next = [-1, *seq[:-1]]
    for i, j in zip(reversed(seq), reversed(seq_next), strict=True):
        at, at_next = alphas[i + 1], alphas[j + 1]
        eps = unet(x, torch.full((x.shape[0],), i, dtype=torch.long)).sample
        x0 = (x - eps * (1 - at).sqrt()) / at.sqrt()
        x = at_next.sqrt() * x0 + (1 - at_next).sqrt() * eps
    return x


def test_quadratic_sampling_visits_the_quadratic_timesteps_and_matches_the_official_loop():
    unet = tiny_attn_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)  # the official code never clips
    config = SamplerConfig(steps=100, spacing="quadratic")
    seen: list[tuple[int, int]] = []
    noise = _noise()
    x0 = sample(unet, scheduler, noise, config, on_step=lambda i, t, x: seen.append((i, t)))
    assert seen == list(enumerate(quadratic_timesteps(1000, 100)))
    assert all(isinstance(t, int) for _, t in seen)

    seq = [int(s) for s in np.linspace(0, np.sqrt(800), 100) ** 2]
    with torch.no_grad():
        expected = _official_generalized_steps(unet, scheduler.betas, noise, seq)
    torch.testing.assert_close(x0, expected, rtol=0, atol=1e-5)


def test_quadratic_with_eta_draws_from_the_generator():
    unet, scheduler = tiny_attn_unet(), DDPMScheduler(num_train_timesteps=1000)
    config = SamplerConfig(steps=5, eta=0.5, spacing="quadratic")
    a, b, c = (sample(unet, scheduler, _noise(), config, torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.isfinite(a).all()


def test_quadratic_spacing_needs_ddim_and_epsilon_prediction():
    with pytest.raises(ParamError, match="sampler.spacing"):
        SamplerConfig(name="ddpm", spacing="quadratic")
    with pytest.raises(ParamError, match="sampler.spacing"):
        from_dict(SamplerConfig, {"name": "dpmsolver", "spacing": "quadratic"}, "sampler")
    with pytest.raises(ParamError, match="sampler.spacing"):
        from_dict(SamplerConfig, {"spacing": "cosine"}, "sampler")
    v_pred = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    with pytest.raises(ParamError, match="prediction_type"):
        sampling_timesteps(v_pred, SamplerConfig(steps=10, spacing="quadratic"))
