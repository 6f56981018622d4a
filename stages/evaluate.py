"""Stage `evaluate`: the quantized model's samples against real data and against FP.

Inputs: artifacts/reference, artifacts/samples/{fp,quant}.zarr; params: device, evaluate (how
the samples are scored), reference.clip_path (the CLIP model of text-to-image scores) and the
labels of the row. Outputs: metrics/eval.json (DVC metrics: fd, sfid, is, precision, recall for
FP and quantized, and the paired fd_vs_fp, mse, psnr and ssim_vs_fp; class_consistency and its
per-class figures for class-conditional models, clip_score for text-to-image models),
plots/samples_fp_vs_quant.png (same seeds side by side). With ``dist.nproc_per_node`` > 1, or
started by ``torchrun``, the ranks share the feature passes and rank 0 scores and writes.
"""

from __future__ import annotations

import functools

import click

from edadm.artifacts import write_json
from edadm.config import load_section, params_options
from edadm.diffusion.samples import load_samples
from edadm.distributed import launch, rank_device, shutdown
from edadm.errors import ArtifactError
from edadm.metrics.conditions import check_same_conditions, sample_conditions
from edadm.metrics.evaluation import EvaluateConfig, evaluate_samples
from edadm.metrics.reference import ReferenceConfig
from edadm.plots import save_grids_side_by_side
from edadm.runtime import configure_logging, load_device

GRID = 64


@click.command()
@params_options
@click.option("--reference", "reference_dir", default="artifacts/reference", show_default=True)
@click.option("--fp", "fp_path", default="artifacts/samples/fp.zarr", show_default=True)
@click.option(
    "--quant", "quant_path", default="artifacts/samples/quant.zarr", show_default=True, help="'none': FP only"
)
@click.option("--out", default="metrics/eval.json", show_default=True)
@click.option("--grid", default="plots/samples_fp_vs_quant.png", show_default=True)
def main(params: dict, reference_dir: str, fp_path: str, quant_path: str, out: str, grid: str) -> None:
    configure_logging()
    config = load_section(EvaluateConfig, "evaluate", params)
    clip_path = load_section(ReferenceConfig, "reference", params).clip_path
    device = load_device(params)
    dist = launch(params, device)  # with dist.nproc_per_node > 1: runs this script under torchrun
    device = rank_device(device, dist)
    fp_images, fp_seeds = load_samples(fp_path, "sample_fp")
    fp_conditions = sample_conditions(fp_path, "sample_fp")

    # Both rows are scored alike: one reference, the same conditions (checked below), one CLIP model.
    evaluate = functools.partial(
        evaluate_samples,
        reference_dir=reference_dir,
        conditions=fp_conditions,
        clip_path=clip_path,
        config=config,
        device=device,
        dist=dist,
    )

    if quant_path == "none":  # the sweep's FP rows at other seeds: the noise floor of the table
        fp = evaluate(fp_images)
        if dist.is_main:
            write_json(out, {"w_bits": 32, "a_bits": 32, "method": "fp", "fp": fp})
        shutdown(dist)
        return
    quant_images, quant_seeds = load_samples(quant_path, "sample_quant")
    if fp_seeds.shape != quant_seeds.shape or (fp_seeds != quant_seeds).any():
        raise ArtifactError(
            f"{fp_path} and {quant_path} were sampled from different seeds: rerun both sample stages "
            "(`dvc repro sample_fp sample_quant`)"
        )
    # Paired metrics compare image k with image k: both must also have asked for the same thing.
    check_same_conditions(fp_conditions, sample_conditions(quant_path, "sample_quant"), fp_path, quant_path)

    fp = evaluate(fp_images)
    quant = evaluate(quant_images, fp_samples=fp_images)
    shutdown(dist)
    if not dist.is_main:  # rank 0 has every rank's features and writes the results
        return
    quant_params = params.get("quant", {})
    write_json(
        out,
        {
            "w_bits": quant_params.get("w_bits"),
            "a_bits": quant_params.get("a_bits"),
            "method": params.get("recon", {}).get("method"),
            "calibration": params.get("select", {}).get("method"),
            "fp": fp,
            "quant": quant,
        },
    )
    save_grids_side_by_side([fp_images[:GRID], quant_images[:GRID]], grid)


if __name__ == "__main__":
    main()
