"""Stages `sample_fp` and `sample_quant`: evaluation samples from the same per-image seeds.

`--which fp` samples the full-precision model; `--which quant` the quantized model rebuilt
from artifacts/quant, fake-quantized or (`sample.mode: int`) on integer kernels. Two DVC
stages, so a change of quantization params reruns only the quantized sampling. Outputs:
artifacts/samples/{fp,quant}.zarr; the stage's time goes to metrics/timings/sample_{fp,quant}.json.
With ``dist.nproc_per_node`` > 1, or started by ``torchrun``, the ranks sample their share of
the images into one store.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from edadm.artifacts import ArtifactError, timed
from edadm.config import load_section, params_options
from edadm.diffusion.conditioning import ConditionConfig, Conditioning
from edadm.diffusion.loading import (
    DiffusionModel,
    kind_from_unet,
    load_diffusion_model,
    scheduler_from_config,
)
from edadm.diffusion.samples import SampleConfig, generate_samples
from edadm.diffusion.sampling import SamplerConfig
from edadm.distributed import launch, rank_device, shutdown
from edadm.runtime import configure_logging, load_device


@click.command()
@click.option("--which", type=click.Choice(["fp", "quant"]), required=True)
@params_options
@click.option("--model", "model_dir", default="artifacts/model", show_default=True)
@click.option("--quant", "quant_dir", default="artifacts/quant", show_default=True)
@click.option(
    "--export", "export_path", default=None, help="sample this `edadm export` file instead of --model/--quant"
)
@click.option("--out", default=None, help="default: artifacts/samples/{fp,quant}.zarr")
@click.option("--timings", default=None, help="default: metrics/timings/sample_{fp,quant}.json")
def main(
    which: str,
    params: dict,
    model_dir: str,
    quant_dir: str,
    export_path: str | None,
    out: str | None,
    timings: str | None,
) -> None:
    configure_logging()
    config = load_section(SampleConfig, "sample", params)
    sampler_config = load_section(SamplerConfig, "sampler", params)
    device = load_device(params)
    dist = launch(params, device)  # with dist.nproc_per_node > 1: runs this script under torchrun
    device = rank_device(device, dist)
    condition_config = load_section(ConditionConfig, "condition", params)
    if export_path and which == "quant":
        model = _exported_model(export_path, model_dir, device)
    else:
        # the FP model's float parts (VAE, text encoder) serve the quantized UNet too
        model = load_diffusion_model(model_dir, param="the model stage's output").to(device)
    conditioning = Conditioning(model, condition_config)
    if which == "fp":
        unet = model.unet
        attrs = {"model": "fp"}
    else:
        from edadm.quant import load_quant_model

        unet = model.unet if export_path else load_quant_model(model_dir, quant_dir, device)
        attrs = {"model": "quant", "quant": params.get("quant"), "recon": params.get("recon")}
        if config.mode == "int":
            from edadm.quant.integer import to_integer

            report = to_integer(unet, config.int_backend)
            attrs["integer"] = {
                "backend": report.backend,
                "fake_layers": report.fake_layers,
                "integer_attention": report.integer_attention,
            }
            if config.int_compile:  # once per stage run; inductor's FX graph cache spans runs
                from edadm.quant.compiled import compile_integer

                unet = compile_integer(unet)
    out = out or f"artifacts/samples/{which}.zarr"
    with timed(timings or f"metrics/timings/sample_{which}.json", write=dist.is_main) as details:
        details["world_size"] = dist.world_size
        generate_samples(
            unet,
            model.scheduler,
            sampler_config,
            config,
            out,
            device,
            attrs,
            desc=f"sample {which}",
            conditioning=conditioning,
            decode=model.decode if model.vae is not None else None,
            dist=dist,
        )
    shutdown(dist)


def _exported_model(export_path: str, model_dir: str, device: torch.device) -> DiffusionModel:
    """The exported UNet with its stored scheduler, and the FP model's float parts when
    ``model_dir`` exists: an export alone serves an unconditional pixel model only."""
    from edadm.quant import load_exported
    from edadm.quant.export import read_export_metadata

    unet = load_exported(export_path, device)
    stored = read_export_metadata(export_path).get("scheduler")  # `edadm export` stores it
    if Path(model_dir).exists():
        model = load_diffusion_model(model_dir, param="the model stage's output").to(device)
        model.unet = unet
    else:
        model = DiffusionModel(unet, None, kind_from_unet(unet, latent=False, null_class=None))
        if model.kind.condition != "none":
            raise ArtifactError(
                f"{export_path} holds a {model.kind.name} UNet: its conditions need the FP model's "
                f"parts, and --model {model_dir} does not exist; point --model at the model stage's output"
            )
    if stored:
        model.scheduler = scheduler_from_config(stored)
    elif model.scheduler is None:
        raise ArtifactError(f"{export_path} stores no scheduler and --model {model_dir} does not exist")
    return model


if __name__ == "__main__":
    main()
