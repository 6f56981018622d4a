"""Frechet distance between Gaussians fitted to features: FID (Heusel et al. 2017), sFID, FD.

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

computed in float64 as the reference FID code (TTUR / pytorch-fid) does, including its two
safeguards: an ``eps * I`` offset on both covariances when their product is singular, and a
check that ``sqrtm``'s imaginary part (numerical noise) is negligible before dropping it.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from scipy import linalg

logger = logging.getLogger(__name__)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (float64, unbiased, rows = samples) of ``features: [N, D]``."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"feature_stats needs [N >= 2, D] features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    mu: ``[D]``, sigma: ``[D, D]``. Returns a float >= 0 (tiny negative values from round-off
    are possible, as with every FID implementation, and left as they are).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"covariances must both be [{len(mu1)}, {len(mu1)}], got {sigma1.shape} and {sigma2.shape}"
        )

    diff = mu1 - mu2
    # 1. the matrix square root of the product; scipy returns a complex array when it must.
    with warnings.catch_warnings(record=True) as caught:
        # scipy warns (LinAlgWarning) on a singular product, e.g. fewer images than feature dims.
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if caught:
        logger.warning("Frechet distance: %s (fewer images than feature dims?)", caught[0].message)
    if not np.isfinite(covmean).all():
        # 2. a singular product (fewer samples than dims, dead features): offset both diagonals.
        logger.warning("Frechet distance: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # 3. round-off gives sqrtm a small imaginary part; a large one means the result is wrong.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            largest = np.max(np.abs(covmean.imag))
            raise ValueError(f"Frechet distance: sqrtm has an imaginary component of {largest:.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
