"""Scores that need no feature statistics: Inception Score, paired agreement with FP samples, class
consistency of class-conditional samples."""

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


def class_consistency(logits: np.ndarray, labels: np.ndarray) -> dict[str, float | dict[str, float]]:
    """How often a reference classifier sees the class each image was generated for.

    ``logits: [N, K]`` of the reference classifier on the generated images, ``labels: [N]`` the
    requested class of each image (in [0, K)). Returns ``{"class_consistency": top-1 accuracy
    over all images, "class_consistency_per_class": {str(label): accuracy over the images of
    that label}}`` for every label present, in increasing order (JSON keys are strings). The
    per-class figures show which classes a quantized model loses.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (len(logits),):
        raise ValueError(
            f"logits must be [N, K] and labels [N], got shapes {logits.shape} and {labels.shape}"
        )
    if len(labels) == 0:
        raise ValueError("no images to score")
    num_classes = logits.shape[1]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"requested class labels span [{labels.min()}, {labels.max()}] but the reference classifier has "
            f"{num_classes} classes: class consistency needs a reference classifier of the model's classes"
        )
    correct = logits.argmax(axis=1) == labels  # [N]
    per_class = {str(int(label)): float(correct[labels == label].mean()) for label in np.unique(labels)}
    return {"class_consistency": float(correct.mean()), "class_consistency_per_class": per_class}
