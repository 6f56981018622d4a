"""Stages `sample_fp` and `sample_quant`: evaluation samples from the same per-image seeds.

`--which fp` samples the full-precision model; `--which quant` the quantized model rebuilt
from artifacts/quant, fake-quantized or (`sample.mode: int`) on integer kernels. Two DVC
stages, so a change of quantization params reruns only the quantized sampling. Outputs:
artifacts/samples/{fp,quant}.zarr; the stage's time goes to metrics/timings/sample_{fp,quant}.json.
"""

from __future__ import annotations

import click

from edadm.artifacts import timed
from edadm.config import load_section, params_options
from edadm.diffusion.conditioning import ConditionConfig, Conditioning
from edadm.diffusion.loading import load_diffusion_model, scheduler_from_config
from edadm.diffusion.samples import SampleConfig, generate_samples
from edadm.diffusion.sampling import SamplerConfig
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
    # the FP model's float parts (VAE, text encoder) serve the quantized UNet too
    model = load_diffusion_model(model_dir, param="the model stage's output").to(device)
    conditioning = Conditioning(model, load_section(ConditionConfig, "condition", params))
    scheduler = None
    if which == "fp":
        unet = model.unet
        attrs = {"model": "fp"}
    else:
        from edadm.quant import load_exported, load_quant_model
        from edadm.quant.export import read_export_metadata

        if export_path:
            unet = load_exported(export_path, device)
            stored = read_export_metadata(export_path).get("scheduler")  # `edadm export` stores it
            scheduler = scheduler_from_config(stored) if stored else None
        else:
            unet = load_quant_model(model_dir, quant_dir, device)
        attrs = {"model": "quant", "quant": params.get("quant"), "recon": params.get("recon")}
        if config.mode == "int":
            from edadm.quant.integer import to_integer

            report = to_integer(unet, config.int_backend)
            attrs["integer"] = {"backend": report.backend, "fake_layers": report.fake_layers}
    out = out or f"artifacts/samples/{which}.zarr"
    with timed(timings or f"metrics/timings/sample_{which}.json"):
        generate_samples(
            unet,
            scheduler or model.scheduler,
            sampler_config,
            config,
            out,
            device,
            attrs,
            desc=f"sample {which}",
            conditioning=conditioning,
            decode=model.decode if model.vae is not None else None,
        )


if __name__ == "__main__":
    main()
