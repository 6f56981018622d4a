"""The ``evaluate`` stage's library: generated samples scored against the reference.

``evaluate_samples`` reads a reference directory (``edadm.metrics.reference``) and scores a
batch of generated images against it: FD (FID with Inception), sFID, IS, precision and recall;
given FP samples of the same seeds, MSE, PSNR, SSIM and the FD between the two sample sets; for
class-conditional samples the reference classifier's agreement with the requested classes, for
text-to-image samples the CLIP score. Its knobs are the ``evaluate`` section of params.yaml
(``EvaluateConfig``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from edadm.config import check_range
from edadm.metrics.clip import CLIP_PARAM, clip_score
from edadm.metrics.conditions import SampleConditions
from edadm.metrics.extractors import extract_all
from edadm.metrics.frechet import feature_stats, frechet_distance
from edadm.metrics.precision_recall import precision_recall
from edadm.metrics.reference import load_extractor, load_reference_stats, read_reference
from edadm.metrics.scores import class_consistency, inception_score, paired_agreement
from edadm.metrics.ssim import structural_similarity

if TYPE_CHECKING:  # only the type: scoring in one process needs no torch.distributed
    from edadm.distributed import Dist

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
    conditions: SampleConditions | None = None,
    clip_path: str | Path | None = None,
    config: EvaluateConfig | None = None,
    device: torch.device | str = "cpu",
    dist: Dist | None = None,
) -> dict[str, Any] | None:
    """Score generated ``samples: [N, C, H, W]`` in [-1, 1] against the reference.

    Args:
        samples: the generated images.
        reference_dir: a directory written by ``build_reference``.
        fp_samples: the full-precision model's images for the same seeds (same shape and
            order), or None.
        conditions: what each image was conditioned on (``edadm.metrics.conditions``), or None
            for an unconditional model.
        clip_path: the local CLIP model directory (``reference.clip_path``) that scores
            text-conditioned samples, or None.
        config: the ``evaluate`` params (defaults when None).
        device: where the feature extractor (and the CLIP model) runs.
        dist: this process's rank under torchrun, or None (one process). The feature passes
            are shared out over the ranks (``extract_all``); rank 0 scores, the others
            return None.

    Returns:
        ``{"n", "fd", "sfid", "is_mean", "is_std", "precision", "recall"}`` and, with
        ``fp_samples``, ``"mse"``, ``"psnr"`` (per-image PSNR averaged, see
        ``paired_agreement``), ``"ssim_vs_fp"`` (mean SSIM, ``edadm.metrics.ssim``) and
        ``"fd_vs_fp"`` (Frechet distance between the samples' and the FP samples' features).
        Class conditions add ``"class_consistency"`` (the reference classifier's top-1 accuracy
        against the requested labels) and ``"class_consistency_per_class"`` ({label: accuracy});
        text conditions add ``"clip_score"``. "fd" is FID when the reference uses Inception. A
        value the reference cannot give (sFID from a precomputed .npz without spatial
        statistics, precision/recall without real features, class consistency without a
        classifier of the model's classes, a CLIP score without ``clip_path``) is None.
    """
    config = config or EvaluateConfig()
    stats = load_reference_stats(reference_dir)
    extractor = load_extractor(reference_dir, device)
    out = extract_all(extractor, samples, config.batch_size, desc="sample features", dist=dist)
    fp = None  # every rank takes part in both feature passes before rank 0 scores
    if fp_samples is not None:
        fp = extract_all(extractor, fp_samples, config.batch_size, desc="FP sample features", dist=dist)
    if out is None:  # a rank other than 0: its share is with rank 0
        return None
    n = len(out.features)
    if conditions is not None and len(conditions.index) != n:
        raise ValueError(
            f"{n} samples but conditions for {len(conditions.index)}: give one condition per image"
        )
    mu, sigma = feature_stats(out.features)
    result: dict[str, Any] = {"n": n}
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

    if conditions is not None and conditions.kind == "class":
        result.update(
            reference_class_consistency(out.logits, conditions, read_reference(reference_dir)["extractor"])
        )
    if conditions is not None and conditions.kind == "text":
        result["clip_score"] = None
        if clip_path is None:
            logger.warning(
                "clip_score is null: set param %s to a local directory holding a CLIPModel and its "
                "processor (save_pretrained) to score text-to-image samples",
                CLIP_PARAM,
            )
        else:
            result["clip_score"] = clip_score(
                samples, conditions.image_prompts(), clip_path, batch_size=config.batch_size, device=device
            )

    if fp_samples is not None:
        result.update(paired_agreement(samples, fp_samples))
        result["ssim_vs_fp"] = structural_similarity(samples, fp_samples)
        result["fd_vs_fp"] = frechet_distance(mu, sigma, *feature_stats(fp.features))
    logger.info("evaluation: %s", json.dumps(result))
    return result


def reference_class_consistency(
    logits: np.ndarray | None, conditions: SampleConditions, extractor: str
) -> dict[str, float | dict[str, float] | None]:
    """``class_consistency`` of the reference extractor's ``logits: [N, K]`` against the requested
    labels of ``conditions``; None (with a log line saying why) where those logits are not the
    model's classes: only the digits classifier (``extractor`` "digits") is a classifier of a
    (digits) model's classes."""
    if extractor != "digits" or logits is None:
        logger.warning(
            "class_consistency is null: it needs a reference classifier of the model's classes, and the "
            "%s reference extractor is none (Inception's 1008 outputs are not the model's labels); "
            "edadm has one for digits models only (reference.extractor: digits)",
            extractor,
        )
        return {"class_consistency": None, "class_consistency_per_class": None}
    return class_consistency(logits, conditions.class_labels())
