"""Stage `export`: the deployable model, one safetensors file with packed integer weights.

Inputs: artifacts/model, artifacts/quant. Output: artifacts/export/model.safetensors, which
`edadm.quant.load_exported` rebuilds alone (`edadm export` does the same from the command line).
"""

from __future__ import annotations

import logging

import click

from edadm.config import params_options
from edadm.deploy.export import describe_export_summary, export_reconstruction
from edadm.runtime import configure_logging

logger = logging.getLogger("stages.export")


@click.command()
@params_options
@click.option("--model", "model_dir", default="artifacts/model", show_default=True)
@click.option("--quant", "quant_dir", default="artifacts/quant", show_default=True)
@click.option("--out", default="artifacts/export/model.safetensors", show_default=True)
def main(params: dict, model_dir: str, quant_dir: str, out: str) -> None:
    configure_logging()
    logger.info(describe_export_summary(out, export_reconstruction(model_dir, quant_dir, out)))


if __name__ == "__main__":
    main()
