"""The embedded default's data: scikit-learn's bundled digits (no download needed).

1,797 8x8 grey images with values 0..16, upsampled to 16x16 and scaled to [-1, 1]. The same
seeded split serves the classifier (train) and the metrics' real-data reference (test).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def digits_images(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """All digits as ``(images [1797, 1, size, size] float32 in [-1, 1], labels [1797] int64)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    if size != 8:
        # Bilinear keeps strokes smooth; nearest would give blocky 2x2 pixels the model then learns.
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    return images.numpy(), digits.target.astype(np.int64)


def digits_split(
    seed: int = 0, test_fraction: float = 0.2, size: int = 16
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A fixed, seeded, stratified train/test split: ``((x_train, y_train), (x_test, y_test))``."""
    from sklearn.model_selection import train_test_split

    images, labels = digits_images(size)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return (x_train, y_train), (x_test, y_test)
