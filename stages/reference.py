"""Stage `reference`: what the metrics compare against.

embedded digits: train the small CNN classifier on the digits' train split and store the
held-out test digits' feature statistics; real RGB models: the FID Inception network from a
local weights file. Output: artifacts/reference/ (no timings: it is a DVC out); the stage's
time goes to metrics/timings/reference.json.

It runs on the CPU whatever ``device`` says: the digits classifier trains in seconds there,
and its weights, hence every FD, do not then depend on which machine built them.
"""

from __future__ import annotations

import click

from edadm.artifacts import timed
from edadm.config import load_section, params_options
from edadm.data import digits_split
from edadm.metrics.reference import ReferenceConfig, build_reference
from edadm.runtime import configure_logging


@click.command()
@params_options
@click.option("--out", default="artifacts/reference", show_default=True)
@click.option("--timings", default="metrics/timings/reference.json", show_default=True)
def main(params: dict, out: str, timings: str) -> None:
    configure_logging()
    config = load_section(ReferenceConfig, "reference", params)
    real_images = None
    if config.extractor == "digits":
        _, (real_images, _) = digits_split(config.classifier.seed, config.classifier.test_fraction)
    with timed(timings) as details:
        build_reference(config, out, real_images, timings=details)


if __name__ == "__main__":
    main()
