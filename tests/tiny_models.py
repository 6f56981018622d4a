"""Tiny diffusers models built in tests (never downloaded), and calibration sets and
reconstruction configs sized for them; shared by several test files."""

from __future__ import annotations

import copy

import numpy as np
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from edadm.calib.calibration_set import CalibrationSet
from edadm.deploy.integer import to_integer
from edadm.diffusion.samples import SampleConfig, generate_samples, load_samples
from edadm.diffusion.sampling import SamplerConfig
from edadm.quant.model import set_quant_state
from edadm.recon.config import ReconConfig


def tiny_cond_unet(seed: int = 0, channels: int = 2) -> UNet2DConditionModel:
    """Cross-attention down and up, 8-d text features: a Stable Diffusion UNet in miniature."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def tiny_attn_unet(seed: int = 0, channels: int = 1, **config) -> UNet2DModel:
    """Two resolutions, attention in the down and up path: each unit kind of docs/method.md §3, fast."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        **config,
    ).eval()


def tiny_class_unet(seed: int = 0) -> UNet2DModel:
    """tiny_attn_unet with 4 class embeddings (an nn.Embedding added to the time embedding);
    label 3 is the null class of classifier-free guidance."""
    return tiny_attn_unet(seed, num_class_embeds=4)


# ---------------------------------------------------------------------------------------------
# Calibration sets and reconstruction configs for the tiny models
# ---------------------------------------------------------------------------------------------
def tiny_calib(n: int = 16, channels: int = 1, text: bool = False, seed: int = 1) -> CalibrationSet:
    """n random 8x8 inputs with timesteps in 0..999 (and [n, 3, 8] text features with ``text``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    ehs = torch.randn(n, 3, 8, generator=g) if text else None
    return CalibrationSet(x, t, encoder_hidden_states=ehs)


def quick_recon(**overrides) -> ReconConfig:
    """A few iterations on small batches; round_reg off unless asked (the pinned numbers are without)."""
    params = {
        "iters": 4,
        "batch_size": 8,
        "init_batch_size": 8,
        "cache_batch_size": 8,
        "round_reg": False,
        **overrides,
    }
    return ReconConfig(**params)


def float_samples(model, scheduler, sampler: SamplerConfig, config: SampleConfig, tmp_path):
    """Samples of a quantized model with its quantization off: the float model (same seeds)."""
    floating = copy.deepcopy(model)
    set_quant_state(floating, weights=False, activations=False)
    generate_samples(floating, scheduler, sampler, config, tmp_path / "float.zarr", torch.device("cpu"))
    return load_samples(tmp_path / "float.zarr")[0]


def fake_and_integer_samples(model, scheduler, sampler: SamplerConfig, config: SampleConfig, tmp_path):
    """Samples of a calibrated quantized model, fake-quantized, then on integer kernels (same seeds)."""
    cpu = torch.device("cpu")
    generate_samples(model, scheduler, sampler, config, tmp_path / "fake.zarr", cpu)
    to_integer(model)
    generate_samples(model, scheduler, sampler, config, tmp_path / "int.zarr", cpu)
    return load_samples(tmp_path / "fake.zarr")[0], load_samples(tmp_path / "int.zarr")[0]


def sample_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of samples in [-1, 1] (peak-to-peak 2)."""
    mse = float(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean())
    return 10 * np.log10(4.0 / max(mse, 1e-20))


def assert_samples_agree(
    a: np.ndarray, b: np.ndarray, *, within: float = 1e-3, share: float = 0.99, min_psnr: float = 40.0
) -> None:
    """Two sets of multi-step samples in [-1, 1] agree: at least ``share`` of the pixels within
    ``within``, and PSNR of at least ``min_psnr`` dB (peak-to-peak 2).

    Not the max over every pixel: through a sampler, one activation code on a rounding boundary
    (which CPUs round differently) flips and the later steps carry it to a few pixels.
    """
    close = float((np.abs(np.asarray(a, dtype=np.float64) - b) <= within).mean())
    psnr = sample_psnr(a, b)
    assert close >= share and psnr >= min_psnr, f"{close:.2%} of pixels within {within}, PSNR {psnr:.1f} dB"
