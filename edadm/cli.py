"""The `edadm` command line."""

from __future__ import annotations

import click

from edadm.artifacts import ArtifactError


@click.group()
@click.version_option(package_name="edadm")
def main() -> None:
    """edadm: post-training quantization of diffusion models with EDA-DM."""


@main.command()
@click.argument("path", type=click.Path())
def inspect(path: str) -> None:
    """Summarise the artifact at PATH (model, Zarr store, quantization state, metrics)."""
    from edadm.inspect import describe

    try:
        click.echo(describe(path))
    except (ArtifactError, ValueError) as err:
        raise click.ClickException(str(err)) from err


if __name__ == "__main__":
    main()
