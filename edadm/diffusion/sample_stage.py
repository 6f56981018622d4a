"""What the two sample stages share: params, ranks, the FP model's float parts, the store.

``stages/sample_fp.py`` and ``stages/sample_quant.py`` differ only in the denoiser they
sample, so each passes ``load_denoiser``; they are two scripts so that a stage's deps are what
it runs (editing ``edadm/deploy`` reruns ``sample_quant`` only). Kept apart from
``edadm.diffusion.samples``, which the evaluate stage reads without the models' code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from edadm.artifacts import timed
from edadm.config import load_section
from edadm.diffusion.conditioning import ConditionConfig, Conditioning
from edadm.diffusion.loading import DiffusionModel, load_diffusion_model
from edadm.diffusion.samples import SampleConfig, generate_samples
from edadm.diffusion.sampling import SamplerConfig
from edadm.distributed import launch, rank_device, shutdown
from edadm.runtime import configure_logging, load_device

#: ``load_denoiser(device, config) -> (model, denoiser, attrs)``: the pipeline whose float parts
#: (scheduler, VAE, text encoder) serve the sampling, the denoiser to sample and the store's attrs
LoadDenoiser = Callable[[torch.device, SampleConfig], tuple[DiffusionModel, torch.nn.Module, dict[str, Any]]]


def load_fp_model(model_dir: str, device: torch.device) -> DiffusionModel:
    """The model stage's output on ``device``."""
    return load_diffusion_model(model_dir, param="the model stage's output").to(device)


def run_sample_stage(
    which: str, params: Mapping[str, Any], load_denoiser: LoadDenoiser, out: str | None, timings: str | None
) -> None:
    """Sample ``sample.n`` images from the denoiser ``load_denoiser`` gives into
    ``artifacts/samples/{which}.zarr`` (or ``out``), timed into ``metrics/timings/sample_{which}.json``.

    With ``dist.nproc_per_node`` > 1, or started by ``torchrun``, the ranks sample their share
    of the images into one store.
    """
    configure_logging()
    config = load_section(SampleConfig, "sample", params)
    sampler_config = load_section(SamplerConfig, "sampler", params)
    device = load_device(params)
    dist = launch(params, device)  # with dist.nproc_per_node > 1: runs the script under torchrun
    device = rank_device(device, dist)
    condition_config = load_section(ConditionConfig, "condition", params)
    model, denoiser, attrs = load_denoiser(device, config)
    conditioning = Conditioning(model, condition_config)
    with timed(timings or f"metrics/timings/sample_{which}.json", write=dist.is_main) as details:
        details["world_size"] = dist.world_size
        generate_samples(
            denoiser,
            model.scheduler,
            sampler_config,
            config,
            out or f"artifacts/samples/{which}.zarr",
            device,
            attrs,
            desc=f"sample {which}",
            conditioning=conditioning,
            decode=model.decode if model.vae is not None else None,
            dist=dist,
        )
    shutdown(dist)
