"""Scores that need no feature statistics: Inception Score and paired agreement with FP samples."""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` from class ``logits: [N, K]``.

    As in the reference code, the images are cut into ``splits`` contiguous parts, the score is
    computed on each (p(y) being the part's mean prediction), and the mean and standard
    deviation over parts are returned. It ranges from 1 (every image gets the same prediction)
    to K (confident predictions spread evenly over the K classes).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, K], got shape {logits.shape}")
    if not 1 <= splits <= len(logits):
        raise ValueError(f"splits={splits} must be in [1, N={len(logits)}]")
    # log_softmax stays finite for confident predictions, where log(softmax) would give -inf.
    log_p_yx = log_softmax(logits, axis=1)  # [N, K]
    scores = []
    for part in np.array_split(log_p_yx, splits):
        p_yx = np.exp(part)
        p_y = p_yx.mean(axis=0, keepdims=True)  # [1, K]
        # Classes with p(y) = 0 have p(y|x) = 0 everywhere in the part: their terms are 0.
        log_p_y = np.log(np.where(p_y > 0, p_y, 1.0))
        kl = (p_yx * (part - log_p_y)).sum(axis=1)  # [n]
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def paired_agreement(
    images: np.ndarray, reference_images: np.ndarray, data_range: float = 2.0
) -> dict[str, float]:
    """How closely ``images`` match ``reference_images`` image by image (same seeds, same order).

    Both ``[N, C, H, W]`` in [-1, 1] (hence ``data_range`` 2). Returns ``{"mse": mean squared
    error over all pixels of all images, "psnr": PSNR in dB computed per image,
    10 log10(data_range^2 / mse_i), then averaged over images}``. An image identical to its
    reference has infinite PSNR, and so then does the average.
    """
    images = np.asarray(images, dtype=np.float64)
    reference_images = np.asarray(reference_images, dtype=np.float64)
    if images.shape != reference_images.shape or images.ndim != 4:
        raise ValueError(
            f"images and reference_images must be [N, C, H, W] of the same shape, "
            f"got {images.shape} and {reference_images.shape}"
        )
    per_image_mse = ((images - reference_images) ** 2).reshape(len(images), -1).mean(axis=1)  # [N]
    with np.errstate(divide="ignore"):
        per_image_psnr = 10 * np.log10(data_range**2 / per_image_mse)
    return {"mse": float(per_image_mse.mean()), "psnr": float(per_image_psnr.mean())}
