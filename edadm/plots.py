"""Pictures a person can look at: sample grids as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from edadm.artifacts import atomic_output


def image_grid(images: np.ndarray, nrow: int = 8, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Tile ``images`` [N, C, H, W] in [-1, 1] into one uint8 picture [rows, cols(, 3)]."""
    images = np.clip((np.asarray(images, dtype=np.float32) + 1) * 127.5, 0, 255).astype(np.uint8)
    n, c, h, w = images.shape
    images = images.repeat(scale, axis=2).repeat(scale, axis=3)
    h, w = h * scale, w * scale
    ncol = nrow
    nrows = -(-n // ncol)
    grid = np.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = images[k]
    return grid[0] if c == 1 else grid[:3].transpose(1, 2, 0)


def save_grid(images: np.ndarray, path: str | Path, nrow: int = 8, scale: int = 4) -> None:
    """Write a PNG grid of ``images`` [N, C, H, W] in [-1, 1], atomically."""
    picture = image_grid(images, nrow, scale)
    with atomic_output(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")


def save_grids_side_by_side(
    panels: Sequence[np.ndarray], path: str | Path, nrow: int = 8, scale: int = 4, gap: int = 8
) -> None:
    """Several grids of the same size next to each other (e.g. FP | quantized, same seeds)."""
    pictures = [image_grid(p, nrow, scale) for p in panels]
    height = max(p.shape[0] for p in pictures)
    spacer = np.full((height, gap) + pictures[0].shape[2:], 255, dtype=np.uint8)
    row = []
    for k, p in enumerate(pictures):
        row.append(p)
        if k < len(pictures) - 1:
            row.append(spacer)
    with atomic_output(path) as tmp:
        Image.fromarray(np.concatenate(row, axis=1)).save(tmp, format="PNG")
