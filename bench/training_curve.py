"""The embedded default's quality and fragility against training steps (issue: a converged default).

    python bench/training_curve.py [--steps 500,1000,2000,3000,5000] [--n 512] [--json PATH]

Trains the embedded recipe once (``model.embedded`` of params.yaml, with ``--set`` overrides;
``lr_schedule: constant`` so that the snapshot at step k is the model a k-step run gives),
saves the EMA weights at every ``--steps`` value, and measures each snapshot with the
pipeline's own stage scripts (the same code as `dvc repro` and the sweep): FP samples
(``--n``, sample seed 0) scored against the reference's held-out digits (FD, IS, precision,
recall), and naive W8A8 (uniform calibration + range search, the sweep's ``naive`` row) with
its PSNR and FD against FP. Needs ``artifacts/reference`` (`dvc repro reference`).
``--quick``: steps 20,40 and n 64 (a smoke run, not a measurement). Prints and writes JSON.
``--keep DIR`` keeps the snapshots (``DIR/model-STEP``) and the training log (``DIR/train_log.json``,
what ``bench/ship_embedded.py --train-log`` takes); ``--measure DIR`` measures the snapshots
a stopped run kept there, without training.

The class-conditional variant (``--set model.embedded.conditioning=class``) is measured the same
way, by the same stage scripts, once per guidance scale of ``--guidance`` (default 3, the
pipeline's ``condition.guidance_scale`` for class models): each image asks for a digit drawn
from its own seed, and the rows add class consistency (the reference digits classifier's top-1
accuracy against the requested labels) for FP and naive W8A8.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from edadm.artifacts import write_json
from edadm.config import load_params, load_section
from edadm.data import digits_split
from edadm.diffusion.embedded import NULL_LABEL, build_embedded_scheduler, train_embedded
from edadm.diffusion.loading import (
    DiffusionModel,
    ModelConfig,
    kind_from_unet,
    save_model,
)
from edadm.runtime import cpu_name, load_device

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ("model.embedded.lr_schedule=constant",)


def stage(script: str, *args: str, params: Path, overrides: list[str]) -> None:
    """Run a stage script of the pipeline with explicit paths (as the sweep does)."""
    sets = [a for o in overrides for a in ("--set", o)]
    command = [sys.executable, str(ROOT / "stages" / script), "--params", str(params), *sets, *args]
    subprocess.run(command, cwd=ROOT, check=True)


def measure(model_dir: Path, work: Path, n: int, trajectories: int, params: Path, sets: list[str]) -> dict:
    """FP quality and naive W8A8 agreement of one snapshot, from the stage scripts."""
    model, traj, calib, quant = (
        str(model_dir),
        str(work / "traj.zarr"),
        str(work / "calib.zarr"),
        str(work / "q"),
    )
    scratch = {"--timings": str(work / "timings.json")}  # figures nobody reads here
    common = [*sets, f"sample.n={n}"]
    naive_w8a8 = ["quant.w_bits=8", "quant.a_bits=8", "recon.method=none", "select.method=uniform"]

    def run(script: str, paths: dict[str, str], overrides: list[str]) -> None:
        stage(
            script,
            *[a for item in paths.items() for a in item],
            params=params,
            overrides=[*common, *overrides],
        )

    run("dump.py", {"--model": model, "--out": traj, **scratch}, [f"dump.trajectories={trajectories}"])
    table = {"--table": str(work / "table.csv")}
    run(
        "selection.py",
        {"--trajectories": traj, "--out": calib, **table},
        [*naive_w8a8, f"select.size={trajectories}"],
    )
    recon = {
        "--model": model,
        "--calib": calib,
        "--out": quant,
        "--work": str(work / "ckpt"),
        **table,
        **scratch,
    }
    run("reconstruct.py", recon, naive_w8a8)
    run("sample_fp.py", {"--model": model, "--out": str(work / "fp.zarr"), **scratch}, [])
    run(
        "sample_quant.py",
        {"--model": model, "--quant": quant, "--out": str(work / "quant.zarr"), **scratch},
        [],
    )
    reference = str(ROOT / "artifacts" / "reference")
    scores = {
        "--fp": str(work / "fp.zarr"),
        "--quant": str(work / "quant.zarr"),
        "--out": str(work / "eval.json"),
    }
    run("evaluate.py", {"--reference": reference, **scores, "--grid": str(work / "grid.png")}, naive_w8a8)

    metrics = json.loads((work / "eval.json").read_text())
    fp_keys, quant_keys = ["fd", "is_mean", "precision", "recall", "n"], ["fd", "fd_vs_fp", "psnr", "n"]
    if "class_consistency" in metrics["fp"]:
        fp_keys, quant_keys = [*fp_keys, "class_consistency"], [*quant_keys, "class_consistency"]
    return {
        "fp": {k: metrics["fp"][k] for k in fp_keys},
        "naive_w8a8": {k: metrics["quant"][k] for k in quant_keys},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="500,1000,2000,3000,5000")
    parser.add_argument("--n", type=int, default=512, help="samples per snapshot (FD n)")
    parser.add_argument(
        "--trajectories", type=int, default=512, help="dumped trajectories = calibration size"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="KEY=VALUE params override"
    )
    parser.add_argument("--keep", type=Path, help="keep each snapshot's model directory here")
    parser.add_argument("--measure", type=Path, help="measure the snapshots kept in this directory")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--guidance", default="3", help="class model: the guidance scales measured")
    args = parser.parse_args()
    steps = [20, 40] if args.quick else sorted(int(s) for s in args.steps.split(","))
    if args.measure:
        steps = [s for s in steps if (args.measure / f"model-{s}").is_dir()]
    n, trajectories = (64, 64) if args.quick else (args.n, args.trajectories)
    overrides = [*RECIPE, *args.overrides, f"model.embedded.train_steps={max(steps)}"]
    if not (ROOT / "artifacts" / "reference").exists():
        raise SystemExit("artifacts/reference is missing: run `dvc repro reference` first")

    params_path = ROOT / "params.yaml"
    config = load_section(ModelConfig, "model", load_params(params_path, overrides)).embedded
    device = load_device(load_params(params_path))
    conditional = config.conditioning == "class"
    scales = [float(s) for s in args.guidance.split(",")] if conditional else []
    (train_images, train_labels), _ = digits_split(config.seed, size=config.image_size)
    scheduler = build_embedded_scheduler(config)
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        snapshots: dict[int, Path] = {}

        def save_snapshot(step: int, ema: torch.nn.Module) -> None:
            snapshots[step] = (args.keep or tmp) / f"model-{step}"
            # the class model's kind records NULL_LABEL as its "no class" label
            kind = kind_from_unet(ema, latent=False, null_class=NULL_LABEL if conditional else None)
            save_model(DiffusionModel(ema, scheduler, kind), snapshots[step])

        if args.measure:
            snapshots = {step: args.measure / f"model-{step}" for step in steps}
            log_path = args.measure / "train_log.json"
            log = json.loads(log_path.read_text()) if log_path.exists() else {"loss": [], "loss_steps": []}
        else:
            _, _, log = train_embedded(train_images, config, device, steps, save_snapshot, train_labels)
            if args.keep:
                (args.keep / "train_log.json").write_text(json.dumps(log) + "\n")
        train_seconds = time.perf_counter() - started
        losses = dict(zip(log["loss_steps"], log["loss"], strict=True)) or {0: float("nan")}
        for step in steps:
            if conditional:
                figures = {"guided": {}}
                for scale in scales:
                    work = tmp / f"work-{step}-guidance{scale:g}"
                    work.mkdir()
                    sets = [*args.overrides, f"condition.guidance_scale={scale:g}"]
                    figures["guided"][f"{scale:g}"] = measure(
                        snapshots[step], work, n, trajectories, params_path, sets
                    )
            else:
                work = tmp / f"work-{step}"
                work.mkdir()
                figures = measure(snapshots[step], work, n, trajectories, params_path, args.overrides)
            nearest = min(losses, key=lambda s: abs(s - step))
            rows.append({"steps": step, "train_loss": round(losses[nearest], 5), **figures})
            print(json.dumps(rows[-1]), flush=True)
    report = {
        "recipe": {**{k: v for k, v in vars(config).items() if k != "train_steps"}},
        "overrides": overrides,
        "n": n,
        "trajectories": trajectories,
        "guidance_scales": scales,
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
