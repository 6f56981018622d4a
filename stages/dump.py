"""Stage `dump`: full-precision trajectories and TDAC feature maps (METHOD.md section 1).

Output: artifacts/trajectories.zarr (x [T, N, C, H, W], t [T], x0, features [T, B, C', h', w']).
"""

from __future__ import annotations

import click

from edadm.calib.selection import SelectConfig
from edadm.config import load_params, load_section
from edadm.diffusion.loading import load_scheduler, load_unet
from edadm.diffusion.sampling import SamplerConfig
from edadm.diffusion.trajectories import DumpConfig, dump_trajectories
from edadm.runtime import configure_logging, resolve_device


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--model", "model_dir", default="artifacts/model", show_default=True)
@click.option("--out", default="artifacts/trajectories.zarr", show_default=True)
def main(params_path: str, model_dir: str, out: str) -> None:
    configure_logging()
    params = load_params(params_path)
    config = load_section(DumpConfig, "dump", params)
    sampler_config = load_section(SamplerConfig, "sampler", params)
    feature_layer = load_section(SelectConfig, "select", params).tdac.feature_layer
    device = resolve_device(params.get("device", "auto"))
    unet = load_unet(model_dir, param="the model stage's output")
    dump_trajectories(unet, load_scheduler(model_dir), sampler_config, config, feature_layer, out, device)


if __name__ == "__main__":
    main()
