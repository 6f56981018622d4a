"""Benchmark of scale-out: the dump and FP sampling stages at 1 and 2 processes (torchrun).

    python bench/scale.py [--quick] [--json PATH] [--nprocs 1 2] [--threads T]

The embedded default (the shipped digits UNet, 1 x 16 x 16) at a reduced size: 256
trajectories and 256 images, DDIM 100 steps, batches of 64 (so that 2 ranks get 2 batches
each; ``--quick``: 32 items, 10 steps, batches of 8). Each stage runs as a user runs it,
``python stages/X.py --set dist.nproc_per_node=N`` (N > 1: the stage relaunches itself under
torchrun), in a temporary directory. The T threads (default: every core) are shared out:
OMP_NUM_THREADS = T // N for each process, so that no count oversubscribes the cores. The
figures are the stage's own time (metrics/timings: sampling and writing the store, not the
interpreter start or model loading) and the command's wall time. Time them on an otherwise
idle machine: with another job on the 2 cores, one process of 2 threads ran 20-50x slower
than 2 ranks of one thread (OpenMP threads waiting on each other), a figure of contention.

JSON (printed, and written to PATH): ``cpu``, ``date``, ``torch``, ``threads`` (T),
``config``, and per stage (``dump``, ``sample_fp``) and process count the threads per
process, seconds, wall seconds and throughput (``trajectory_steps_per_s`` for the dump,
``images_per_s`` for sampling), and ``speedup`` of the largest count over 1 process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edadm.diffusion.embedded import EmbeddedConfig, load_embedded_weights  # noqa: E402
from edadm.diffusion.loading import DiffusionModel, kind_from_unet, save_model  # noqa: E402
from edadm.runtime import cpu_name  # noqa: E402


def bench_params(quick: bool) -> dict:
    """params.yaml with the reduced sizes; ``dist`` is set per run on the command line."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    items, steps, batch = (32, 10, 8) if quick else (256, 100, 64)
    params["device"] = {"name": "cpu"}
    params["sampler"]["steps"] = steps
    params["dump"].update(trajectories=items, batch_size=batch)
    params["sample"].update(n=items, batch_size=batch)
    return params


def run_stage(args: list[str], workdir: Path, nproc: int, threads: int, timings: Path) -> dict:
    """One stage run at ``nproc`` processes sharing ``threads``: its seconds (timings file) and
    wall seconds."""
    command = [sys.executable, *args, "--timings", str(timings), "--set", f"dist.nproc_per_node={nproc}"]
    per_process = max(1, threads // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(per_process)}  # torchrun passes it on to the ranks
    start = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    recorded = json.loads(timings.read_text())
    if recorded.get("world_size") != nproc:
        raise RuntimeError(f"{timings} says world_size {recorded.get('world_size')}, expected {nproc}")
    return {
        "threads_per_process": per_process,
        "seconds": recorded["seconds"],
        "wall_seconds": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 items, 10 steps: checks it runs (~1 min)")
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="process counts to time")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads shared by the processes")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    params = bench_params(args.quick)
    n_items, steps = params["dump"]["trajectories"], params["sampler"]["steps"]
    output = {
        "cpu": cpu_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": args.threads,
        "quick": args.quick,
        "config": {
            "model": "embedded (shipped digits UNet)",
            "items": n_items,
            "steps": steps,
            "batch_size": params["dump"]["batch_size"],
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "params.yaml").write_text(yaml.safe_dump(params))
        unet, scheduler, _ = load_embedded_weights(EmbeddedConfig())
        kind = kind_from_unet(unet, latent=False, null_class=None)
        save_model(DiffusionModel(unet, scheduler, kind), workdir / "model")
        stages = {
            "dump": (
                ["stages/dump.py", "--out", "trajectories.zarr"],
                "trajectory_steps_per_s",
                n_items * steps,
            ),
            "sample_fp": (["stages/sample_fp.py", "--out", "fp.zarr"], "images_per_s", n_items),
        }
        for stage, (stage_args, unit, work) in stages.items():
            script = [str(ROOT / stage_args[0]), *stage_args[1:], "--model", "model"]
            runs = {}
            for nproc in args.nprocs:
                runs[nproc] = run_stage(script, workdir, nproc, args.threads, workdir / f"{stage}.json")
                # timings are rounded to 0.1 s: a --quick run can be that short
                runs[nproc][unit] = round(work / max(runs[nproc]["seconds"], 0.1), 1)
                print(f"{stage} at {nproc} process(es): {runs[nproc]}", file=sys.stderr)
            output[stage] = {str(n): run for n, run in runs.items()}
            most = max(args.nprocs)
            if 1 in runs and most > 1:
                output[stage]["speedup"] = round(runs[1]["seconds"] / runs[most]["seconds"], 2)
    print(json.dumps(output, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(output, indent=2) + "\n")
    return output


if __name__ == "__main__":
    main()
