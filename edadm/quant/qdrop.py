"""QDrop (Wei et al. 2022), as the EDA-DM official code uses it while reconstructing (METHOD.md 3).

Element-wise, with probability ``prob``, a quantized tensor is replaced by its float value:
x~ = where(rand < prob, x_float, x_quantized). It is applied in two places, both through
``QDrop.mix``: on the unit's input (float input vs quantized-path input), and inside every
activation quantizer of the unit (its float input vs its fake-quantized output), installed
with ``QDrop.installed``. One generator draws every mask of a unit, so a unit's masks depend
only on its seed (a resumed run draws the same ones).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch


class _HasQDrop(Protocol):
    qdrop: QDrop | None


class QDrop:
    """Random element-wise mixing of float and quantized values, masks from ``generator``."""

    def __init__(self, prob: float, generator: torch.Generator) -> None:
        if not 0.0 < prob <= 1.0:
            raise ValueError(f"QDrop probability must be in (0, 1], got {prob}")
        self.prob = prob
        self.generator = generator

    def mix(self, x_float: torch.Tensor, x_quant: torch.Tensor) -> torch.Tensor:
        """where(rand < prob, x_float, x_quant), the mask drawn over ``x_quant``'s shape."""
        keep_float = torch.rand(x_quant.shape, generator=self.generator, device=x_quant.device) < self.prob
        return torch.where(keep_float, x_float, x_quant)

    @contextmanager
    def installed(self, quantizers: Sequence[_HasQDrop]) -> Iterator[None]:
        """Apply QDrop inside ``quantizers`` (activation quantizers) for the duration of the block."""
        for quantizer in quantizers:
            quantizer.qdrop = self
        try:
            yield
        finally:
            for quantizer in quantizers:
                quantizer.qdrop = None
