"""Stage `reference`: what the metrics compare against.

embedded digits: train the small CNN classifier on the digits' train split and store the
held-out test digits' feature statistics; real RGB models: the FID Inception network from a
local weights file. Output: artifacts/reference/.
"""

from __future__ import annotations

import click

from edadm.config import load_params, load_section
from edadm.data import digits_split
from edadm.metrics.reference import ReferenceConfig, build_reference
from edadm.runtime import configure_logging


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--out", default="artifacts/reference", show_default=True)
def main(params_path: str, out: str) -> None:
    configure_logging()
    config = load_section(ReferenceConfig, "reference", load_params(params_path))
    real_images = None
    if config.extractor == "digits":
        _, (real_images, _) = digits_split(config.classifier.seed, config.classifier.test_fraction)
    build_reference(config, out, real_images)


if __name__ == "__main__":
    main()
