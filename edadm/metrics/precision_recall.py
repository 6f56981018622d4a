"""Improved precision and recall (Kynkäänniemi et al. 2019), with exact FAISS searches.

Each set's manifold is the union of balls around its points, the radius of a point being the
distance to its k-th nearest neighbour within the set (itself excluded). Precision is the
fraction of fake samples inside the real manifold (quality), recall the fraction of real
samples inside the fake manifold (coverage).

Both steps are exact FAISS flat searches, on GPU where faiss has GPUs, in query batches so that
memory stays bounded by ``batch_size x set size`` distances:

1. radii: a k+1 nearest-neighbour L2 search of a set against itself (the first hit is the point).
2. membership: "is q inside some ball (c_j, r_j)" asks whether
   ``min_j ||q - c_j||^2 - r_j^2 <= 0``. Expanding the square, that is
   ``max_j <[q, 1], [2 c_j, r_j^2 - ||c_j||^2]> >= ||q||^2``: one maximum-inner-product search
   (k = 1) over augmented vectors, instead of the full query-by-centre distance matrix.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from edadm.faiss_backend import faiss, gpu_available

logger = logging.getLogger(__name__)


def _flat_index(vectors: np.ndarray, inner_product: bool) -> faiss.Index:
    """An exact (flat) index over ``vectors: [N, D]`` float32, moved to the GPUs when faiss has them."""
    index = faiss.IndexFlatIP(vectors.shape[1]) if inner_product else faiss.IndexFlatL2(vectors.shape[1])
    if gpu_available():
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(vectors)
    return index


def _search(index: faiss.Index, queries: np.ndarray, k: int, batch_size: int, desc: str) -> np.ndarray:
    """Scores ``[Q, k]`` of the k best hits for ``queries: [Q, D]``, searched ``batch_size`` at a time."""
    scores = np.empty((len(queries), k), dtype=np.float32)
    starts = range(0, len(queries), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=len(starts) < 2):
        scores[start : start + batch_size], _ = index.search(queries[start : start + batch_size], k)
    return scores


def manifold_radii(features: np.ndarray, k: int = 3, batch_size: int = 8192) -> np.ndarray:
    """Squared distance ``[N]`` from each row of ``features: [N, D]`` to its k-th nearest other row."""
    if len(features) <= k:
        raise ValueError(f"need more than k={k} points to estimate a manifold, got {len(features)}")
    features = np.ascontiguousarray(features, dtype=np.float32)
    index = _flat_index(features, inner_product=False)
    # Column 0 is the point itself (distance 0), so column k is its k-th neighbour.
    distances = _search(index, features, k + 1, batch_size, desc="k-NN radii")
    return np.maximum(distances[:, k], 0.0)  # BLAS round-off can give tiny negatives


def inside_manifold(
    queries: np.ndarray, centres: np.ndarray, squared_radii: np.ndarray, batch_size: int = 8192
) -> np.ndarray:
    """Whether each of ``queries: [Q, D]`` lies in some ball ``(centres[j], sqrt(squared_radii[j]))``.

    ``centres: [N, D]``, ``squared_radii: [N]``. Returns a bool array ``[Q]``. Exact, by the
    inner-product reduction of the module docstring.
    """
    # Centre both sets on the centres' mean: distances do not change, and smaller norms keep
    # the float32 inner products precise.
    origin = centres.mean(axis=0, dtype=np.float64)
    centres = np.asarray(centres, np.float64) - origin
    queries = np.asarray(queries, np.float64) - origin
    base = np.concatenate([2 * centres, (squared_radii - (centres**2).sum(1))[:, None]], axis=1)
    augmented = np.concatenate([queries, np.ones((len(queries), 1))], axis=1)
    index = _flat_index(np.ascontiguousarray(base, dtype=np.float32), inner_product=True)
    best = _search(index, np.ascontiguousarray(augmented, dtype=np.float32), 1, batch_size, desc="manifold")
    return best[:, 0] >= (queries**2).sum(1)


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, batch_size: int = 8192
) -> dict[str, float]:
    """Improved precision and recall of ``fake_features: [M, D]`` against ``real_features: [N, D]``.

    Returns ``{"precision": fraction of fakes inside the real manifold, "recall": fraction of
    reals inside the fake manifold}``, both in [0, 1]. k=3 is the paper's default.
    """
    real_features = np.asarray(real_features, dtype=np.float32)
    fake_features = np.asarray(fake_features, dtype=np.float32)
    if real_features.ndim != 2 or fake_features.ndim != 2 or real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(
            f"features must be [N, D] with the same D, got {real_features.shape} and {fake_features.shape}"
        )
    real_radii = manifold_radii(real_features, k, batch_size)
    fake_radii = manifold_radii(fake_features, k, batch_size)
    precision = inside_manifold(fake_features, real_features, real_radii, batch_size).mean()
    recall = inside_manifold(real_features, fake_features, fake_radii, batch_size).mean()
    return {"precision": float(precision), "recall": float(recall)}
