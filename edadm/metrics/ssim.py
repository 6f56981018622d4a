"""SSIM (Wang et al. 2004) between generated images and the FP images of the same seeds.

The standard definition, as skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)`` and torchmetrics compute it: local means, variances
and covariance under an 11-tap Gaussian window (sigma 1.5), on images mapped from [-1, 1] to
[0, 1], per channel; the SSIM map is averaged over the positions where the window fits
entirely (no padding), over channels, then over images.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
DATA_RANGE = 1.0  # after mapping [-1, 1] to [0, 1]
# Pixels (float64) per batch of the filtering: 5 filtered maps of this size stay ~200 MB.
PIXELS_PER_BATCH = 1 << 22


def gaussian_window(size: int, sigma: float = SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian ``[size]`` (float64); the 2-D window is its outer product."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(x**2) / (2 * sigma**2))
    return weights / weights.sum()


def window_size(height: int, width: int) -> int:
    """11, or the largest odd size that fits an image smaller than 11 pixels on a side."""
    fit = min(height, width)
    return WINDOW if fit >= WINDOW else fit - (1 - fit % 2)


def _local_mean(z: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted mean of ``z: [M, 1, H, W]`` over every position where the window fits.

    Separable: a row pass then a column pass; 'valid' (no padding), the region skimage keeps.
    """
    size = len(window)
    return F.conv2d(F.conv2d(z, window.view(1, 1, 1, size)), window.view(1, 1, size, 1))


def ssim_per_image(images: np.ndarray, reference_images: np.ndarray) -> np.ndarray:
    """SSIM of each image against its reference: ``[N]`` in [-1, 1] (1 for identical images).

    Both ``[N, C, H, W]`` in [-1, 1], same shape, paired by index. Images smaller than the
    11-pixel window get the largest odd window that fits (same sigma), with a warning: the
    value is then not comparable with the standard SSIM of larger images.
    """
    if images.shape != reference_images.shape or images.ndim != 4:
        raise ValueError(
            f"images and reference_images must be [N, C, H, W] of the same shape, "
            f"got {images.shape} and {reference_images.shape}"
        )
    n, channels, height, width = images.shape
    size = window_size(height, width)
    if size < WINDOW:
        logger.warning(
            "SSIM: %dx%d images are smaller than the %d-pixel window; using a %d-pixel window",
            height,
            width,
            WINDOW,
            size,
        )
    window = gaussian_window(size)
    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    batch = max(1, PIXELS_PER_BATCH // (channels * height * width))
    scores = []
    for start in range(0, n, batch):
        # [B, C, H, W] -> [B * C, 1, H, W]: every channel filtered on its own.
        x = (torch.as_tensor(np.asarray(images[start : start + batch]), dtype=torch.float64) + 1) / 2
        y = (
            torch.as_tensor(np.asarray(reference_images[start : start + batch]), dtype=torch.float64) + 1
        ) / 2
        x, y = x.reshape(-1, 1, height, width), y.reshape(-1, 1, height, width)
        mu_x, mu_y = _local_mean(x, window), _local_mean(y, window)
        # Population (not sample) variances: use_sample_covariance=False.
        var_x = _local_mean(x * x, window) - mu_x**2
        var_y = _local_mean(y * y, window) - mu_y**2
        cov_xy = _local_mean(x * y, window) - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
            (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
        )  # [B * C, 1, H - size + 1, W - size + 1]
        scores.append(ssim_map.reshape(-1, channels * ssim_map[0].numel()).mean(dim=1))
    return torch.cat(scores).numpy()


def structural_similarity(images: np.ndarray, reference_images: np.ndarray) -> float:
    """Mean SSIM over images (see ``ssim_per_image``) of ``[N, C, H, W]`` pairs in [-1, 1]."""
    return float(ssim_per_image(images, reference_images).mean())
