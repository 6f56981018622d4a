"""Stage `model`: the full-precision diffusion model, in diffusers format.

embedded: the digits UNet whose converged weights the package ships (checked against their
sha256 and the ``model.embedded`` recipe); train: train that UNet from scratch on scikit-learn's
digits with ``model.embedded`` (``model.embedded.conditioning: class``: the class-conditional
variant); pretrained: load a local diffusers pipeline directory of any kind (edadm.diffusion.
loading). Each is written in the same format, with its kind. Outputs: artifacts/model/,
artifacts/train.json (the loss curve), plots/model_samples.png; the stage's time goes to
metrics/timings/model.json, outside the cached outs.
"""

from __future__ import annotations

import logging

import click
import numpy as np
import torch

from edadm.artifacts import timed, write_json
from edadm.config import load_section, params_options
from edadm.data import digits_split
from edadm.diffusion.conditioning import Conditioning
from edadm.diffusion.embedded import NULL_LABEL, load_embedded_weights, train_embedded
from edadm.diffusion.loading import (
    DiffusionModel,
    ModelConfig,
    kind_from_unet,
    load_diffusion_model,
    model_hash,
    save_model,
)
from edadm.diffusion.sampling import SamplerConfig, sample
from edadm.plots import save_grid
from edadm.runtime import configure_logging, load_device

logger = logging.getLogger("stages.model")

GRID_SAMPLES = 64
LATENT_GRID_SAMPLES = 16  # latent models are larger and their VAE decodes too


def build_model(config: ModelConfig, device: torch.device) -> tuple[DiffusionModel, dict]:
    """The model ``config.source`` names and a log that records the source."""
    if config.source == "pretrained":
        model = load_diffusion_model(config.path, null_class=config.null_class)
        return model, {"source": config.path, "loss": [], "steps": 0}
    if config.source == "embedded":
        unet, scheduler, log = load_embedded_weights(config.embedded)
    else:
        (images, labels), _ = digits_split(config.embedded.seed, size=config.embedded.image_size)
        # labels: read by the class variant (model.embedded.conditioning: class), ignored otherwise
        unet, scheduler, log = train_embedded(images, config.embedded, device, labels=labels)
        log = {**log, "source": "train"}
    null_class = NULL_LABEL if config.embedded.conditioning == "class" else None
    return DiffusionModel(unet, scheduler, kind_from_unet(unet, latent=False, null_class=null_class)), log


@torch.no_grad()
def sample_grid(model: DiffusionModel, device: torch.device) -> np.ndarray:
    """Samples a person can look at (does the model make digits?), one condition after another.

    Fixed settings (DDIM 100 steps, the default conditions and guidance), so that changing
    `sampler` or `condition` does not rerun the model stage.
    """
    unet = model.unet
    size = unet.config.sample_size
    shape = (unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    n = LATENT_GRID_SAMPLES if model.kind.latent else GRID_SAMPLES
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(0))
    conditioning = Conditioning(model)
    condition = conditioning.batch(np.arange(n) % conditioning.count, device)
    x0 = sample(unet, model.scheduler, noise, SamplerConfig(), condition=condition)
    return model.decode(x0).cpu().numpy()


@click.command()
@params_options
@click.option("--out", default="artifacts/model", show_default=True)
@click.option("--log", "log_path", default="artifacts/train.json", show_default=True)
@click.option("--grid", default="plots/model_samples.png", show_default=True)
@click.option("--timings", default="metrics/timings/model.json", show_default=True)
def main(params: dict, out: str, log_path: str, grid: str, timings: str) -> None:
    configure_logging()
    config = load_section(ModelConfig, "model", params)
    device = load_device(params)

    with timed(timings):
        model, log = build_model(config, device)
        save_model(model, out)
        logger.info("%s model written to %s", model.kind.name, out)
        save_grid(sample_grid(model.to(device), device), grid)
        log.update(
            {
                "kind": model.kind.name,
                "parameters": sum(p.numel() for p in model.unet.parameters()),
                "model_hash": model_hash(model.unet),
            }
        )
    write_json(log_path, log)


if __name__ == "__main__":
    main()
