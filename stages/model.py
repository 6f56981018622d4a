"""Stage `model`: the full-precision diffusion model, in diffusers format.

embedded: the digits UNet whose converged weights the package ships (checked against their
sha256 and the ``model.embedded`` recipe); train: train that UNet from scratch on scikit-learn's
digits with ``model.embedded``; pretrained: load a local diffusers model directory. Each is
written in the same format. Outputs: artifacts/model/,
artifacts/train.json (the loss curve), plots/model_samples.png; the stage's time goes to
metrics/timings/model.json, outside the cached outs.
"""

from __future__ import annotations

import logging

import click
import torch
from diffusers import SchedulerMixin

from edadm.artifacts import timed, write_json
from edadm.config import load_section, params_options
from edadm.data import digits_split
from edadm.diffusion.embedded import load_embedded_weights, train_embedded
from edadm.diffusion.loading import ModelConfig, load_scheduler, load_unet, model_hash, save_model
from edadm.diffusion.sampling import SamplerConfig, sample
from edadm.plots import save_grid
from edadm.runtime import configure_logging, load_device

logger = logging.getLogger("stages.model")

GRID_SAMPLES = 64


def build_model(config: ModelConfig, device: torch.device) -> tuple[torch.nn.Module, SchedulerMixin, dict]:
    """The model ``config.source`` names, its scheduler and a log that records the source."""
    if config.source == "embedded":
        return load_embedded_weights(config.embedded)
    if config.source == "train":
        (train_images, _), _ = digits_split(config.embedded.seed, size=config.embedded.image_size)
        unet, scheduler, log = train_embedded(train_images, config.embedded, device)
        return unet, scheduler, {**log, "source": "train"}
    return (
        load_unet(config.path),
        load_scheduler(config.path),
        {"source": config.path, "loss": [], "steps": 0},
    )


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
        unet, scheduler, log = build_model(config, device)
        save_model(unet, scheduler, out)

        # A grid a person can look at: does the model make digits?
        unet = unet.to(device).eval()
        channels, size = unet.config.in_channels, unet.config.sample_size
        noise = torch.randn((GRID_SAMPLES, channels, size, size), generator=torch.Generator().manual_seed(0))
        if hasattr(unet, "config") and unet.config.get("cross_attention_dim") is not None:
            logger.info("conditional model: no unconditional sample grid")
        else:
            # A fixed sampler (DDIM, 100 steps), so that changing `sampler` does not retrain the model.
            images = sample(unet, scheduler, noise, SamplerConfig()).cpu().numpy()
            save_grid(images, grid)
        log.update(
            {
                "parameters": sum(p.numel() for p in unet.parameters()),
                "model_hash": model_hash(unet),
            }
        )
    write_json(log_path, log)


if __name__ == "__main__":
    main()
