"""Stage `sample_fp`: evaluation samples of the full-precision model.

The same per-image seeds (and conditions) as `sample_quant`, so the two sets are paired.
Output: artifacts/samples/fp.zarr; the stage's time goes to metrics/timings/sample_fp.json.
"""

from __future__ import annotations

import click

from edadm.config import params_options
from edadm.diffusion.sample_stage import load_fp_model, run_sample_stage


@click.command()
@params_options
@click.option("--model", "model_dir", default="artifacts/model", show_default=True)
@click.option("--out", default=None, help="default: artifacts/samples/fp.zarr")
@click.option("--timings", default=None, help="default: metrics/timings/sample_fp.json")
def main(params: dict, model_dir: str, out: str | None, timings: str | None) -> None:
    def load(device, config):
        model = load_fp_model(model_dir, device)
        return model, model.unet, {"model": "fp"}

    run_sample_stage("fp", params, load, out, timings)


if __name__ == "__main__":
    main()
