"""Benchmark reconstruction on the embedded default: seconds per iteration by unit type, totals.

    python bench/recon.py [--quick] [--iters N] [--methods fbr,brecq] [--json PATH]
    python bench/recon.py --ranks 1,2 [--units K] [--quick] [--json PATH]

Runs ``run_reconstruction`` on ``build_embedded_unet()`` (random weights: timing does not
depend on them) with a calibration set of 1024 samples [1, 16, 16], timesteps in 0..999, for
FBR and BRECQ in the same process, and prints JSON: per method the total seconds, the fixed
part (activation calibration, caching, evaluation) and seconds per iteration for each unit
type (ResNet block, attention block, single layer); peak memory; CPU model; torch threads.
``--quick``: 128 samples, 10 iterations (a smoke run, not a measurement).

``--ranks 1,2``: data-parallel scaling (``edadm.recon.data_parallel``). For each count, FBR on
the first ``--units`` units (default 6) in a fresh process, or under torchrun, with the CPU
threads shared out (``OMP_NUM_THREADS`` = cores / ranks, ``--threads`` to set the cores); per
count the wall seconds to the last of those units and their calibrate / cache / train seconds
(rank 0's, from the run's checkpoints), and the speed-up against the first count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from edadm.calib.calibration_set import CalibrationSet
from edadm.diffusion.embedded import build_embedded_unet
from edadm.distributed import launch, rank_device, shutdown
from edadm.quant.config import QuantConfig
from edadm.recon.api import run_reconstruction
from edadm.recon.config import ReconConfig
from edadm.recon.network import ReconResult
from edadm.runtime import cpu_name, resolve_device


def unit_group(entry: dict) -> str:
    if entry["kind"] == "layer":
        return "layer"
    return {"ResnetBlock2D": "resnet_block", "Attention": "attention_block"}.get(entry["type"], entry["type"])


def summarize(result: ReconResult) -> dict:
    """Seconds from ``result.timings`` (the report holds none), iterations and losses from the report."""
    report, timings = result.report, result.timings["steps"]
    by_group: dict[str, list[tuple[float, int]]] = defaultdict(list)
    fixed = train = 0.0
    for entry in report["steps"]:
        timing = timings[entry["step"]]
        if entry["phase"] == "calibrate":
            fixed += timing["seconds"]
            continue
        fixed += timing["seconds"] - timing["train_seconds"]
        train += timing["train_seconds"]
        if entry["iters"]:
            by_group[unit_group(entry)].append((timing["train_seconds"], entry["iters"]))
    per_iter = {
        group: {
            "units": len(values),
            "seconds_per_iter": round(sum(s for s, _ in values) / sum(n for _, n in values), 5),
        }
        for group, values in sorted(by_group.items())
    }
    total_iters = report["totals"]["iters"]
    return {
        "seconds_total": round(result.timings["seconds"], 1),
        "seconds_fixed": round(fixed, 1),
        "seconds_train": round(train, 1),
        "iters_total": total_iters,
        "seconds_per_iter_mean": round(train / total_iters, 5) if total_iters else None,
        "by_unit_type": per_iter,
        "loss_before_total": report["totals"]["loss_before"],
        "loss_after_total": report["totals"]["loss_after"],
    }


def calibration_set(samples: int) -> CalibrationSet:
    generator = torch.Generator().manual_seed(0)
    return CalibrationSet(
        torch.randn(samples, 1, 16, 16, generator=generator),
        torch.randint(0, 1000, (samples,), generator=generator),
    )


class _UnitsDone(Exception):
    """Raised by the step callback once the units to time are reconstructed (on every rank)."""


def time_first_units(args: argparse.Namespace, samples: int, iters: int) -> dict | None:
    """One rank's part of ``--ranks``: FBR up to the ``args.units``-th unit, in ``args.json``'s
    folder; rank 0's figures, None on the other ranks."""
    dist = launch({})  # joins torchrun's process group when torchrun started this process
    device = rank_device(resolve_device(args.device), dist)
    torch.manual_seed(0)
    unet = build_embedded_unet()
    units_done = []

    def stop(step: str, entry: dict) -> None:  # on every rank, after the same step
        if entry["phase"] != "calibrate":
            units_done.append(step)
        if len(units_done) == args.units:
            raise _UnitsDone

    folder = args.json.parent
    tick = time.perf_counter()
    try:
        run_reconstruction(
            unet,
            calibration_set(samples),
            QuantConfig(w_bits=args.w_bits, a_bits=8),
            ReconConfig(method="fbr", iters=iters),
            folder / "out",
            folder / "work",
            device,
            callback=stop,
            dist=dist,
        )
    except _UnitsDone:
        pass
    seconds = time.perf_counter() - tick
    shutdown(dist)
    if not dist.is_main:
        return None
    # every step's seconds are in rank 0's checkpoints
    (progress,) = (folder / "work").glob("*/progress.json")
    steps = {r["step"]: r["entry"]["timing"] for r in json.loads(progress.read_text())["steps"]}
    return {
        "ranks": dist.world_size,
        "torch_threads": torch.get_num_threads(),
        "seconds_to_last_unit": round(seconds, 2),
        "steps": list(steps),
        "calibrate_seconds": steps.get("calibrate", {}).get("seconds", 0.0),
        "cache_seconds": round(sum(t.get("cache_seconds", 0.0) for t in steps.values()), 2),
        "train_seconds": round(sum(t.get("train_seconds", 0.0) for t in steps.values()), 2),
    }


def scaling(args: argparse.Namespace, samples: int, iters: int) -> dict:
    """``--ranks``: the first units at each rank count, each in its own process group."""
    threads = args.threads or os.cpu_count() or 1
    runs = []
    for ranks in [int(r) for r in args.ranks.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            worker = [__file__, "--worker", "--units", str(args.units), "--samples", str(samples)]
            worker += ["--iters", str(iters), "--w-bits", str(args.w_bits), "--device", args.device]
            worker += ["--json", str(Path(tmp) / "rank0.json")]
            launcher = [sys.executable]
            if ranks > 1:
                launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // ranks))}
            subprocess.run([*launcher, *worker], env=env, check=True)
            runs.append(json.loads((Path(tmp) / "rank0.json").read_text()))
    base = runs[0]["seconds_to_last_unit"]
    for run in runs:
        run["speedup"] = round(base / run["seconds_to_last_unit"], 2)
    return {
        "model": "embedded default (build_embedded_unet)",
        "method": "fbr",
        "units": args.units,
        "calibration_samples": samples,
        "iters_per_unit": iters,
        "cpu_threads": threads,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="128 samples, 10 iterations")
    parser.add_argument("--iters", type=int, default=None, help="iterations per unit (default: recon.iters)")
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (default 1024)")
    parser.add_argument("--methods", default="fbr,brecq")
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--ranks", default=None, help="data-parallel scaling: rank counts, e.g. 1,2")
    parser.add_argument("--units", type=int, default=6, help="with --ranks: units to time")
    parser.add_argument("--threads", type=int, default=None, help="with --ranks: CPU cores to share out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one rank of --ranks
    args = parser.parse_args(argv)

    samples = args.samples or (128 if args.quick else 1024)
    iters = args.iters if args.iters is not None else (10 if args.quick else ReconConfig().iters)
    if args.worker:
        output = time_first_units(args, samples, iters)
        if output is not None:
            args.json.write_text(json.dumps(output))
        return output or {}
    if args.ranks:
        return _print(scaling(args, samples, iters), args.json)

    device = resolve_device(args.device)
    calib = calibration_set(samples)
    quant_config = QuantConfig(w_bits=args.w_bits, a_bits=8)
    results = {}
    for method in args.methods.split(","):
        torch.manual_seed(0)
        unet = build_embedded_unet()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with tempfile.TemporaryDirectory() as tmp:
            result = run_reconstruction(
                unet,
                calib,
                quant_config,
                ReconConfig(method=method, iters=iters),
                Path(tmp) / "out",
                Path(tmp) / "work",
                device,
            )
        results[method] = summarize(result)
        if device.type == "cuda":
            results[method]["peak_cuda_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)

    output = {
        "model": "embedded default (build_embedded_unet)",
        "calibration_samples": samples,
        "iters_per_unit": iters,
        "quant": {"w_bits": quant_config.w_bits, "a_bits": quant_config.a_bits},
        "device": str(device),
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "methods": results,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return _print(output, args.json)


def _print(output: dict, path: Path | None) -> dict:
    text = json.dumps(output, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
