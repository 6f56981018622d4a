"""Stage `dump`: full-precision trajectories and TDAC feature maps (docs/method.md §1).

Output: artifacts/trajectories.zarr (x [T, N, C, H, W], t [T], x0, features [T, B, C', h', w'],
and each trajectory's condition for conditional models, drawn with params ``condition``);
the stage's time goes to metrics/timings/dump.json. With ``dist.nproc_per_node`` > 1, or
started by ``torchrun``, the ranks sample their share of the trajectories into one store.
"""

from __future__ import annotations

import click

from edadm.artifacts import timed
from edadm.config import load_section, params_options
from edadm.diffusion.conditioning import ConditionConfig, Conditioning
from edadm.diffusion.hooks import feature_layer_param
from edadm.diffusion.loading import load_diffusion_model
from edadm.diffusion.sampling import SamplerConfig
from edadm.diffusion.trajectories import DumpConfig, dump_trajectories
from edadm.distributed import launch, rank_device, shutdown
from edadm.runtime import configure_logging, load_device


@click.command()
@params_options
@click.option("--model", "model_dir", default="artifacts/model", show_default=True)
@click.option("--out", default="artifacts/trajectories.zarr", show_default=True)
@click.option("--timings", default="metrics/timings/dump.json", show_default=True)
def main(params: dict, model_dir: str, out: str, timings: str) -> None:
    configure_logging()
    config = load_section(DumpConfig, "dump", params)
    sampler_config = load_section(SamplerConfig, "sampler", params)
    feature_layer = feature_layer_param(params)
    device = load_device(params)
    dist = launch(params, device)  # with dist.nproc_per_node > 1: runs this script under torchrun
    device = rank_device(device, dist)
    model = load_diffusion_model(model_dir, param="the model stage's output").to(device)
    conditioning = Conditioning(model, load_section(ConditionConfig, "condition", params))
    with timed(timings, write=dist.is_main) as details:
        details["world_size"] = dist.world_size
        dump_trajectories(
            model.unet,
            model.scheduler,
            sampler_config,
            config,
            feature_layer,
            out,
            device,
            conditioning,
            dist,
        )
    shutdown(dist)


if __name__ == "__main__":
    main()
