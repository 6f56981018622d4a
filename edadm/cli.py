"""The `edadm` command line."""

from __future__ import annotations

import json

import click

from edadm.artifacts import ArtifactError


@click.group()
@click.version_option(package_name="edadm")
def main() -> None:
    """edadm: post-training quantization of diffusion models with EDA-DM."""


@main.command()
@click.argument("path", type=click.Path())
def inspect(path: str) -> None:
    """Summarise the artifact at PATH (model, Zarr store, quantization state, export, metrics)."""
    from edadm.inspect import describe

    try:
        click.echo(describe(path))
    except (ArtifactError, ValueError) as err:
        raise click.ClickException(str(err)) from err


@main.command()
@click.option(
    "--model", "model_dir", required=True, type=click.Path(), help="Float diffusers model directory."
)
@click.option(
    "--quant", "quant_dir", required=True, type=click.Path(), help="Output of the reconstruct stage."
)
@click.option("--out", "out_file", required=True, type=click.Path(), help="The .safetensors file to write.")
def export(model_dir: str, quant_dir: str, out_file: str) -> None:
    """Write the quantized model as one safetensors file (packed integer weights), loadable alone."""
    from edadm.diffusion.loading import load_scheduler
    from edadm.quant import export_quantized, load_quant_model

    try:
        model = load_quant_model(model_dir, quant_dir)
        # the noise schedule travels with the weights: the file alone is enough to sample
        scheduler = json.loads(load_scheduler(model_dir).to_json_string())
        summary = export_quantized(model, out_file, metadata={"scheduler": scheduler})
    except ArtifactError as err:
        raise click.ClickException(str(err)) from err
    file_mb, fp32_mb = summary["file_bytes"] / 2**20, summary["fp32_bytes"] / 2**20
    click.echo(
        f"{out_file}: {file_mb:.2f} MB, FP32 {fp32_mb:.2f} MB, "
        f"{100 * summary['file_bytes'] / summary['fp32_bytes']:.1f} % of FP32 "
        f"({summary['quantized_layers']} layers with packed weights)"
    )


if __name__ == "__main__":
    main()
