"""The ``evaluate`` stage's library: generated samples scored against the reference.

``evaluate_samples`` reads a reference directory (``edadm.metrics.reference``) and scores a
batch of generated images against it: FD (FID with Inception), sFID, IS, precision and recall,
and, given FP samples of the same seeds, MSE, PSNR and the FD between the two sample sets. Its
knobs are the ``evaluate`` section of params.yaml (``EvaluateConfig``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edadm.config import check_range
from edadm.metrics.extractors import extract_all
from edadm.metrics.frechet import feature_stats, frechet_distance
from edadm.metrics.precision_recall import precision_recall
from edadm.metrics.reference import load_extractor, load_reference_stats
from edadm.metrics.scores import inception_score, paired_agreement

logger = logging.getLogger(__name__)

SECTION = "evaluate"


@dataclass(frozen=True)
class EvaluateConfig:
    """How samples are scored (``evaluate`` in params.yaml).

    Attributes:
        pr_k: k of the k-NN manifolds of improved precision / recall (Kynkaanniemi et al.
            2019 use 3).
        is_splits: parts the samples are cut into for the Inception Score's mean and standard
            deviation; 10 as in the reference IS code (capped at the number of samples).
        batch_size: images per forward pass of the feature extractor (memory only; the
            scores do not depend on it beyond float round-off).
    """

    pr_k: int = 3
    is_splits: int = 10
    batch_size: int = 64

    def __post_init__(self) -> None:
        check_range(f"{SECTION}.pr_k", self.pr_k, low=1)
        check_range(f"{SECTION}.is_splits", self.is_splits, low=1)
        check_range(f"{SECTION}.batch_size", self.batch_size, low=1)


def evaluate_samples(
    samples: np.ndarray,
    reference_dir: str | Path,
    fp_samples: np.ndarray | None = None,
    *,
    config: EvaluateConfig | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float | int | None]:
    """Score generated ``samples: [N, C, H, W]`` in [-1, 1] against the reference.

    Args:
        samples: the generated images.
        reference_dir: a directory written by ``build_reference``.
        fp_samples: the full-precision model's images for the same seeds (same shape and
            order), or None.
        config: the ``evaluate`` params (defaults when None).
        device: where the feature extractor runs.

    Returns:
        ``{"n", "fd", "sfid", "is_mean", "is_std", "precision", "recall"}`` and, with
        ``fp_samples``, ``"mse"``, ``"psnr"`` (per-image PSNR averaged, see
        ``paired_agreement``) and ``"fd_vs_fp"`` (Frechet distance between the samples' and the
        FP samples' features). "fd" is FID when the reference uses Inception. A value the
        reference cannot give (sFID from a precomputed .npz without spatial statistics,
        precision/recall without real features) is None.
    """
    config = config or EvaluateConfig()
    stats = load_reference_stats(reference_dir)
    extractor = load_extractor(reference_dir, device)
    out = extract_all(extractor, samples, config.batch_size, desc="sample features")
    n = len(out.features)
    mu, sigma = feature_stats(out.features)
    result: dict[str, float | int | None] = {"n": n}
    result["fd"] = frechet_distance(mu, sigma, stats["mu"], stats["sigma"])
    result["sfid"] = None
    if "spatial_mu" in stats:
        result["sfid"] = frechet_distance(
            *feature_stats(out.spatial), stats["spatial_mu"], stats["spatial_sigma"]
        )
    result["is_mean"] = result["is_std"] = None
    if out.logits is not None:
        result["is_mean"], result["is_std"] = inception_score(out.logits, splits=min(config.is_splits, n))
    result["precision"] = result["recall"] = None
    if "real_features" in stats and min(n, len(stats["real_features"])) > config.pr_k:
        result.update(precision_recall(stats["real_features"], out.features, k=config.pr_k))
    else:
        logger.warning(
            "precision/recall skipped: need real features and more than %s.pr_k=%d images on each side",
            SECTION,
            config.pr_k,
        )

    if fp_samples is not None:
        result.update(paired_agreement(samples, fp_samples))
        fp = extract_all(extractor, fp_samples, config.batch_size, desc="FP sample features")
        result["fd_vs_fp"] = frechet_distance(mu, sigma, *feature_stats(fp.features))
    logger.info("evaluation: %s", json.dumps(result))
    return result
