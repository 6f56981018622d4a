"""Benchmark of TDAC scoring (reference mode), the knn mode, and the official per-pair loops.

    python bench/tdac.py [--quick] [--json PATH]

Prints one JSON object (and writes it to PATH when given):

- ``reference_t100``: scoring + allocation for features [100, 1024, 64, 4, 4] (float16,
  random normal data scaled by 3: inside the float16 range), with the default torch threads
  and with 1 thread (robust to other jobs on a shared machine).
- ``reference_t1000``: the same for T = 1000 steps, with B = 128 trajectories of features
  ([1000, 128, 64, 4, 4] float16, 262 MB; B = 32 with --quick).
- ``knn_100k``: mode knn on the T = 100 features: 100 x 1024 = 102,400 candidates (pooling,
  per-step FAISS k-NN and greedy picks of 1024 samples; scoring reported separately).
- ``naive_loops``: the official implementation (two Python loops over step pairs, torch
  float32, ``torch.mean((F_i - F_j)**2)`` and ``nn.CosineSimilarity(dim=1)``) timed on the
  first 10 rows i of the T = 100 case (990 pairs; 2 rows with --quick) and extrapolated
  linearly to all 100 rows; ``speedup`` = extrapolated / ``reference_t100`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edadm.artifacts import write_json  # noqa: E402
from edadm.calib.knn import KNNConfig, pool_features, select_within_steps  # noqa: E402
from edadm.calib.step_scores import auto_radius, density_counts, step_statistics
from edadm.calib.tdac import tdac_allocation
from edadm.runtime import cpu_name  # noqa: E402


def random_features(steps: int, batch: int, seed: int = 0) -> np.ndarray:
    """[T, B, 64, 4, 4] float16, normal * 3, generated in slices to bound the float32 peak."""
    rng = np.random.default_rng(seed)
    out = np.empty((steps, batch, 64, 4, 4), dtype=np.float16)
    for i in range(steps):
        out[i] = 3.0 * rng.standard_normal((batch, 64, 4, 4), dtype=np.float32)
    return out


def time_reference(features: np.ndarray, size: int, repeats: int) -> dict:
    """Best-of-``repeats`` seconds of scoring (auto radius) + allocation."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        stats = step_statistics(features, progress=False)
        radius = auto_radius(stats.mse)
        density = density_counts(stats.mse, radius)
        counts = tdac_allocation(density, stats.diversity, size, 1.2)
        times.append(time.perf_counter() - start)
    return {"seconds": round(min(times), 3), "all_seconds": [round(t, 3) for t in times], "counts": counts}


def naive_rows(features32: torch.Tensor, rows: int) -> float:
    """Seconds of the official per-pair loops restricted to rows i < ``rows`` (all j != i)."""
    steps = features32.shape[0]
    radius = 3.0
    density = torch.zeros(steps, dtype=torch.int16)
    diversity = torch.zeros(steps)
    start = time.perf_counter()
    for i in range(rows):
        for j in range(steps):
            if i != j:
                mse = torch.mean((features32[i] - features32[j]) ** 2)
                if mse <= radius:
                    density[i] += 1
                diversity[i] += torch.sum(
                    1 - F.cosine_similarity(features32[i], features32[j], dim=1, eps=1e-6)
                )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller T = 1000 case and naive subset")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    threads = torch.get_num_threads()
    results: dict = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "faiss": faiss.__version__,
        "faiss_gpus": faiss.get_num_gpus(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "quick": args.quick,
    }

    # 1. Reference mode, T = 100, B = 1024.
    features = random_features(100, 1024)
    ref = time_reference(features, 1024, repeats)
    torch.set_num_threads(1)
    ref_1 = time_reference(features, 1024, repeats)
    torch.set_num_threads(threads)
    results["reference_t100"] = {
        "features": list(features.shape),
        "dtype": "float16",
        "seconds": ref["seconds"],
        "all_seconds": ref["all_seconds"],
        "seconds_1_thread": ref_1["seconds"],
    }

    # 2. knn mode on 100 x 1024 = 102,400 candidates (counts from the reference allocation).
    start = time.perf_counter()
    pooled = pool_features(features, 1)
    pool_seconds = time.perf_counter() - start
    start = time.perf_counter()
    knn = KNNConfig()
    index_kind = "IndexFlatL2" if pooled.shape[1] <= knn.exact_max else "IndexIVFFlat"
    traj, step = select_within_steps(pooled, ref["counts"], knn, progress=False)
    select_seconds = time.perf_counter() - start
    results["knn_100k"] = {
        "candidates": int(pooled.shape[0] * pooled.shape[1]),
        "selected": int(traj.size),
        "distinct_trajectories": int(np.unique(traj).size),
        "pool_seconds": round(pool_seconds, 3),
        "select_seconds": round(select_seconds, 3),
        "seconds": round(pool_seconds + select_seconds, 3),
        "seconds_with_scoring": round(pool_seconds + select_seconds + ref["seconds"], 3),
        "index": f"{index_kind} per step ({pooled.shape[1]} candidates, exact_max {knn.exact_max}), "
        f"{'GPU' if faiss.get_num_gpus() > 0 else 'CPU'}",
    }

    # 3. The official per-pair loops on a subset of rows, extrapolated to T = 100.
    rows = 2 if args.quick else 10
    features32 = torch.from_numpy(features).float()
    naive = naive_rows(features32, rows)
    del features32
    extrapolated = naive * 100 / rows
    results["naive_loops"] = {
        "measured_rows": rows,
        "measured_pairs": rows * 99,
        "measured_seconds": round(naive, 3),
        "extrapolated_seconds_t100": round(extrapolated, 1),
        "speedup": round(extrapolated / ref["seconds"], 1),
        "note": "official loops (torch float32), rows i < measured_rows of T=100, scaled by 100/rows",
    }
    del features, pooled

    # 4. Reference mode, T = 1000.
    batch = 32 if args.quick else 128
    features = random_features(1000, batch, seed=1)
    ref_1000 = time_reference(features, 1024, 1)
    results["reference_t1000"] = {
        "features": list(features.shape),
        "dtype": "float16",
        "megabytes": round(features.nbytes / 2**20),
        "seconds": ref_1000["seconds"],
        "note": f"B = {batch} trajectories of features keeps the float16 array at "
        f"{features.nbytes / 2**20:.0f} MB; cost grows as T^2 * B (Gram) + T * B (cosines)",
    }

    print(json.dumps(results, indent=2))
    if args.json is not None:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
