"""Stage `sample_quant`: evaluation samples of the quantized model, fake-quant or integer.

The quantized denoiser is rebuilt from artifacts/quant (or read from an `edadm export` file,
``--export``) and, with ``sample.mode: int``, put on integer kernels (``edadm.deploy``). The
same per-image seeds (and conditions) as `sample_fp`. Output: artifacts/samples/quant.zarr;
the stage's time goes to metrics/timings/sample_quant.json.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from edadm.config import params_options
from edadm.diffusion.loading import DiffusionModel, kind_from_unet, scheduler_from_config
from edadm.diffusion.sample_stage import load_fp_model, run_sample_stage
from edadm.errors import ArtifactError


@click.command()
@params_options
@click.option("--model", "model_dir", default="artifacts/model", show_default=True)
@click.option("--quant", "quant_dir", default="artifacts/quant", show_default=True)
@click.option(
    "--export", "export_path", default=None, help="sample this `edadm export` file instead of --model/--quant"
)
@click.option("--out", default=None, help="default: artifacts/samples/quant.zarr")
@click.option("--timings", default=None, help="default: metrics/timings/sample_quant.json")
def main(
    params: dict,
    model_dir: str,
    quant_dir: str,
    export_path: str | None,
    out: str | None,
    timings: str | None,
) -> None:
    def load(device, config):
        if export_path:
            model = _exported_model(export_path, model_dir, device)
            denoiser = model.unet
        else:
            from edadm.quant.state import load_quant_model

            # the FP model's float parts (VAE, text encoder) serve the quantized denoiser too
            model = load_fp_model(model_dir, device)
            denoiser = load_quant_model(model_dir, quant_dir, device)
        attrs = {"model": "quant", "quant": params.get("quant"), "recon": params.get("recon")}
        if config.mode == "int":
            from edadm.deploy.integer import to_integer

            report = to_integer(denoiser, config.int_backend)
            attrs["integer"] = {
                "backend": report.backend,
                "fake_layers": report.fake_layers,
                "integer_attention": report.integer_attention,
            }
            if config.int_compile:  # once per stage run; inductor's FX graph cache spans runs
                from edadm.deploy.compiled import compile_integer

                denoiser = compile_integer(denoiser)
        return model, denoiser, attrs

    run_sample_stage("quant", params, load, out, timings)


def _exported_model(export_path: str, model_dir: str, device: torch.device) -> DiffusionModel:
    """The exported denoiser with its stored scheduler, and the FP model's float parts when
    ``model_dir`` exists: an export alone serves an unconditional pixel model only."""
    from edadm.deploy.export import load_exported, read_export_metadata

    unet = load_exported(export_path, device)
    stored = read_export_metadata(export_path).get("scheduler")  # `edadm export` stores it
    if Path(model_dir).exists():
        model = load_fp_model(model_dir, device)
        model.unet = unet
    else:
        model = DiffusionModel(unet, None, kind_from_unet(unet, latent=False, null_class=None))
        if model.kind.condition != "none":
            raise ArtifactError(
                f"{export_path} holds a {model.kind.name} denoiser: its conditions need the FP model's "
                f"parts, and --model {model_dir} does not exist; point --model at the model stage's output"
            )
    if stored:
        model.scheduler = scheduler_from_config(stored)
    elif model.scheduler is None:
        raise ArtifactError(f"{export_path} stores no scheduler and --model {model_dir} does not exist")
    return model


if __name__ == "__main__":
    main()
