"""Benchmark reconstruction on the embedded default: seconds per iteration by unit type, totals.

    python bench/recon.py [--quick] [--iters N] [--methods fbr,brecq] [--json PATH]

Runs ``run_reconstruction`` on ``build_embedded_unet()`` (random weights: timing does not
depend on them) with a calibration set of 1024 samples [1, 16, 16], timesteps in 0..999, for
FBR and BRECQ in the same process, and prints JSON: per method the total seconds, the fixed
part (activation calibration, caching, evaluation) and seconds per iteration for each unit
type (ResNet block, attention block, single layer); peak memory; CPU model; torch threads.
``--quick``: 128 samples, 10 iterations (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from edadm.calib.calibration_set import CalibrationSet
from edadm.diffusion.embedded import build_embedded_unet
from edadm.quant import QuantConfig, ReconConfig, ReconResult, run_reconstruction
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
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    samples = args.samples or (128 if args.quick else 1024)
    iters = args.iters if args.iters is not None else (10 if args.quick else ReconConfig().iters)
    generator = torch.Generator().manual_seed(0)
    calib = CalibrationSet(
        torch.randn(samples, 1, 16, 16, generator=generator),
        torch.randint(0, 1000, (samples,), generator=generator),
    )
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
    text = json.dumps(output, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
