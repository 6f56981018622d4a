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

The class-conditional variant (``--set model.embedded.conditioning=class``) is also measured for
class consistency: ``--n`` samples with requested labels (uniform over 0..9, seeded by
``sample.seed``) at each guidance scale of ``--guidance`` (default 1,3), scored like the FP row
(FD, IS, precision, recall) plus the reference classifier's accuracy against the requested
labels. The stage scripts' FP / naive W8A8 rows (``--stages``) are off by default for it: the
pipeline's dump and sample stages do not pass class labels yet.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import SchedulerMixin

from edadm.config import load_params, load_section
from edadm.data import digits_split
from edadm.diffusion.embedded import NULL_LABEL, NUM_CLASSES, build_embedded_scheduler, train_embedded
from edadm.diffusion.loading import (
    DiffusionModel,
    ModelConfig,
    kind_from_unet,
    load_scheduler,
    load_unet,
    save_model,
)
from edadm.diffusion.samples import SEED_STRIDE, SampleConfig, initial_noise
from edadm.diffusion.sampling import SamplerConfig, ddim_step, make_sampler, sampling_timesteps
from edadm.metrics.classifier import DigitsClassifier, accuracy
from edadm.metrics.evaluation import EvaluateConfig, evaluate_samples
from edadm.metrics.reference import load_extractor
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
    for which in ("fp", "quant"):
        out = str(work / f"{which}.zarr")
        run("sample.py", {"--which": which, "--model": model, "--quant": quant, "--out": out, **scratch}, [])
    reference = str(ROOT / "artifacts" / "reference")
    scores = {
        "--fp": str(work / "fp.zarr"),
        "--quant": str(work / "quant.zarr"),
        "--out": str(work / "eval.json"),
    }
    run("evaluate.py", {"--reference": reference, **scores, "--grid": str(work / "grid.png")}, naive_w8a8)

    metrics = json.loads((work / "eval.json").read_text())
    return {
        "fp": {k: metrics["fp"][k] for k in ("fd", "is_mean", "precision", "recall", "n")},
        "naive_w8a8": {k: metrics["quant"][k] for k in ("fd", "fd_vs_fp", "psnr", "n")},
    }


@torch.no_grad()
def guided_sample(
    unet: torch.nn.Module,
    train_scheduler: SchedulerMixin,
    noise: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    config: SamplerConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``edadm.diffusion.sampling.sample`` with classifier-free guidance; returns x_0 [B, C, H, W].

    noise: x_T [B, C, H, W]; labels: [B] in 0..9. At every step (Ho & Salimans 2022, eq. 6)
    eps = eps(x_t, null) + scale * (eps(x_t, y) - eps(x_t, null)), both halves from one UNet call
    on the batch [uncond; cond], as diffusers pipelines do; scale 1 is the conditional eps
    alone, one pass (diffusers skips guidance there too).
    """
    sampler = make_sampler(train_scheduler, config)
    timesteps = sampling_timesteps(train_scheduler, config)
    prev_timesteps = [*timesteps[1:], -1]
    device = next(unet.parameters()).device
    x = noise.to(device) * sampler.init_noise_sigma
    labels = labels.to(device)
    guided = scale != 1.0
    class_labels = torch.cat([torch.full_like(labels, NULL_LABEL), labels]) if guided else labels
    step_kwargs = {"eta": config.eta} if config.name == "ddim" else {}
    for i, t in enumerate(timesteps):
        model_input = sampler.scale_model_input(x, t)
        batch = torch.cat([model_input, model_input]) if guided else model_input
        timestep = torch.full((len(batch),), t, device=device, dtype=torch.long)
        eps = unet(batch, timestep, class_labels=class_labels).sample
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + scale * (eps_cond - eps_uncond)
        if config.spacing == "quadratic":
            x = ddim_step(sampler, eps, t, prev_timesteps[i], x, config.eta, generator)
        else:
            x = sampler.step(eps, t, x, generator=generator, **step_kwargs).prev_sample
    return x


def requested_labels(n: int, seed: int) -> np.ndarray:
    """[n] digits drawn uniformly from 0..9 with a generator seeded ``seed``."""
    return torch.randint(0, NUM_CLASSES, (n,), generator=torch.Generator().manual_seed(seed)).numpy()


def measure_guided(
    model_dir: Path, reference: Path, scales: list[float], params: dict, device: torch.device
) -> dict:
    """Class consistency of a class-conditional snapshot at each guidance scale.

    ``sample.n`` images from the per-image seeds the sample stage uses (``sample.seed``), each
    asked for a label of ``requested_labels``; scored against the reference like the FP row,
    plus ``class_accuracy``: the reference digits classifier's top-1 accuracy on the samples
    against the requested labels.
    """
    sample_config = load_section(SampleConfig, "sample", params)
    sampler_config = load_section(SamplerConfig, "sampler", params)
    evaluate_config = load_section(EvaluateConfig, "evaluate", params)
    classifier = load_extractor(reference, device)
    if not isinstance(classifier, DigitsClassifier):
        raise SystemExit(
            f"{reference} has no digits classifier: class consistency needs reference.extractor: digits"
        )
    unet, scheduler = load_unet(model_dir).to(device).eval(), load_scheduler(model_dir)
    if unet.config.get("num_class_embeds") != NUM_CLASSES + 1:
        raise SystemExit(
            f"{model_dir} is no class-conditional embedded model (num_class_embeds != {NUM_CLASSES + 1})"
        )
    n, batch_size = sample_config.n, sample_config.batch_size
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    seeds = sample_config.seed * SEED_STRIDE + np.arange(n, dtype=np.int64)
    labels = requested_labels(n, sample_config.seed)
    out = {}
    for scale in scales:
        images = []
        for start in range(0, n, batch_size):
            batch_seeds = seeds[start : start + batch_size]
            generator = torch.Generator(device=device).manual_seed(int(batch_seeds[0]))  # as generate_samples
            x0 = guided_sample(
                unet,
                scheduler,
                initial_noise(batch_seeds, shape),
                torch.from_numpy(labels[start : start + batch_size]),
                scale,
                sampler_config,
                generator,
            )
            images.append(x0.clamp(-1, 1).float().cpu().numpy())
        images = np.concatenate(images)
        metrics = evaluate_samples(images, reference, config=evaluate_config, device=device)
        out[f"{scale:g}"] = {
            **{k: metrics[k] for k in ("fd", "is_mean", "precision", "recall", "n")},
            "class_accuracy": accuracy(classifier, images, labels),
        }
    return out


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
    parser.add_argument(
        "--guidance", default="1,3", help="class model: guidance scales of the class-consistency rows"
    )
    parser.add_argument(
        "--stages",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure FP and naive W8A8 with the stage scripts (default: on, off for the class model)",
    )
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
    use_stages = not conditional if args.stages is None else args.stages
    scales = [float(s) for s in args.guidance.split(",")] if conditional else []
    # the guided rows read sample / sampler / evaluate as the stage scripts would, with the same n
    measure_params = load_params(params_path, [*args.overrides, f"sample.n={n}"])
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
            work = tmp / f"work-{step}"
            work.mkdir()
            figures = {}
            if use_stages:
                figures = measure(snapshots[step], work, n, trajectories, params_path, args.overrides)
            if conditional:
                reference = ROOT / "artifacts" / "reference"
                figures["guided"] = measure_guided(snapshots[step], reference, scales, measure_params, device)
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
    text = json.dumps(report, indent=2, default=list)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
