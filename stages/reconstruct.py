"""Stage `reconstruct`: ``edadm.quantize`` the denoiser, block by block (docs/method.md §0, §3).

Inputs: artifacts/model, artifacts/calib.zarr. Outputs: artifacts/quant/ (state.safetensors,
manifest.json, report.json) and plots/recon.csv, which hold only what the inputs determine
(a rerun or a resumed run writes the same bytes); the wall-clock seconds (total, and cache /
train per step) go to metrics/timings/reconstruct.json. A killed run resumes from the last
finished unit: checkpoints live in artifacts/.reconstruct-checkpoint, outside DVC's outputs,
which DVC would delete before rerunning the stage.

With ``dist.nproc_per_node`` > 1 the stage reruns itself under torchrun and reconstructs
data-parallel (``edadm.recon.data_parallel``); rank 0 writes every output. The outputs do not
depend on the process count up to floating-point summation order (not bitwise).
"""

from __future__ import annotations

import logging
import shutil

import click

from edadm.artifacts import write_csv, write_json
from edadm.calib.store import load_calibration
from edadm.config import load_section, params_options
from edadm.diffusion.loading import load_unet
from edadm.distributed import launch, rank_device, shutdown
from edadm.quant.config import QuantConfig
from edadm.recon.api import quantize, save_reconstruction
from edadm.recon.config import ReconConfig
from edadm.recon.network import report_rows
from edadm.runtime import configure_logging, load_device


@click.command()
@params_options
@click.option("--model", "model_dir", default="artifacts/model", show_default=True)
@click.option("--calib", "calib_path", default="artifacts/calib.zarr", show_default=True)
@click.option("--out", default="artifacts/quant", show_default=True)
@click.option("--work", "work_dir", default="artifacts/.reconstruct-checkpoint", show_default=True)
@click.option("--table", default="plots/recon.csv", show_default=True)
@click.option("--timings", default="metrics/timings/reconstruct.json", show_default=True)
def main(
    params: dict, model_dir: str, calib_path: str, out: str, work_dir: str, table: str, timings: str
) -> None:
    configure_logging()
    quant_config = load_section(QuantConfig, "quant", params)
    recon_config = load_section(ReconConfig, "recon", params)
    device = load_device(params)
    dist = launch(params, device)  # with dist.nproc_per_node > 1: runs this script under torchrun
    device = rank_device(device, dist)
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 logs the run's progress

    calib = load_calibration(calib_path)
    unet = load_unet(model_dir, param="the model stage's output")
    # edadm.quantize, checkpointed in work_dir so a killed run resumes from its last finished unit
    model = quantize(unet, calib, quant_config, recon_config, device=device, checkpoints=work_dir, dist=dist)
    result = save_reconstruction(model, out, dist)
    if dist.is_main:
        shutil.rmtree(work_dir, ignore_errors=True)
    shutdown(dist)
    if not dist.is_main:  # rank 0 has written the artifacts and writes the rest
        return

    rows = report_rows(result.report)
    write_csv(table, rows, header=() if rows else ["unit"])
    write_json(timings, result.timing_totals())  # a few columns in `dvc exp show`, not one per unit


if __name__ == "__main__":
    main()
