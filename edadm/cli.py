"""The `edadm` command line."""

from __future__ import annotations

import click

from edadm.errors import VERBOSE_HELP, user_errors


class _Group(click.Group):
    """Param and artifact errors of any subcommand end in one ``error: ...`` line (exit 2)."""

    def invoke(self, ctx: click.Context) -> None:
        with user_errors(ctx.params.get("verbose", False)):
            return super().invoke(ctx)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)
@click.version_option(package_name="edadm")
def main(verbose: bool) -> None:
    """edadm: post-training quantization of diffusion models with EDA-DM."""


@main.command()
@click.argument("path", type=click.Path())
def inspect(path: str) -> None:
    """Summarise the artifact at PATH (model, Zarr store, quantization state, export, metrics)."""
    from edadm.inspect import describe

    try:
        click.echo(describe(path))
    except ValueError as err:  # not an artifact edadm knows
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
    from edadm.deploy.export import describe_export_summary, export_reconstruction

    click.echo(describe_export_summary(out_file, export_reconstruction(model_dir, quant_dir, out_file)))


@main.command("step-error")
@click.option(
    "--model", "model_dir", required=True, type=click.Path(), help="Float diffusers model directory."
)
@click.option("--trajectories", required=True, type=click.Path(), help="The dump stage's trajectories.zarr.")
@click.option(
    "--quant",
    "quants",
    required=True,
    multiple=True,
    metavar="[NAME=]DIR",
    help="Output of a reconstruct stage (repeatable; NAME labels its column).",
)
@click.option("--every", default=10, show_default=True, help="Visit every EVERY-th step (and the last).")
@click.option("--n", default=64, show_default=True, help="Trajectories per step (the dump's last N).")
@click.option("--out", "out_file", type=click.Path(), help="Also write the table as CSV here.")
def step_error(
    model_dir: str, trajectories: str, quants: tuple[str, ...], every: int, n: int, out_file: str | None
) -> None:
    """Relative noise-prediction error of quantized models against FP, step by step (GPU if any)."""
    from edadm.artifacts import write_csv
    from edadm.calib.store import open_trajectories
    from edadm.diffusion.loading import load_unet
    from edadm.metrics.step_error import noise_error_by_step
    from edadm.quant.state import load_quant_model
    from edadm.runtime import resolve_device

    device = resolve_device("auto")
    names = [q.split("=", 1)[0] if "=" in q else q for q in quants]
    if len(set(names)) != len(names):
        raise click.BadParameter(f"two share a name ({names}): label them NAME=DIR", param_hint="--quant")
    try:
        store = open_trajectories(trajectories)
        fp = load_unet(model_dir, param="--model").to(device).eval()
        models = {
            name: load_quant_model(model_dir, q.split("=", 1)[-1], device).eval()
            for name, q in zip(names, quants, strict=True)
        }
        rows = noise_error_by_step(fp, models, store, every=every, n=n, device=device)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    click.echo("step  t     " + "  ".join(f"{name:>12s}" for name in names))
    for row in rows:
        click.echo(f"{row['step']:<5d} {row['t']:<5d} " + "  ".join(f"{row[name]:12.3e}" for name in names))
    if out_file:
        write_csv(out_file, rows)


if __name__ == "__main__":
    main()
