"""QDrop (Wei et al. 2022), as the EDA-DM official code uses it while reconstructing (docs/method.md §3).

Element-wise, with probability ``prob``, a quantized tensor is replaced by its float value:
x~ = where(rand < prob, x_float, x_quantized). It is applied in two places, both through
``QDrop.mix``: on the unit's input (float input vs quantized-path input), and inside every
activation quantizer of the unit (its float input vs its fake-quantized output), installed
with ``QDrop.installed``. One generator draws every mask of a unit, so a unit's masks depend
only on its seed (a resumed run draws the same ones).

Data-parallel reconstruction (``edadm.recon.data_parallel``): a rank holds rows ``start:stop``
of a batch of ``batch`` samples (``shard``). It draws every mask for the whole batch, from the
same generator state as the other ranks, and keeps its rows: the ranks' masks together are the
one process's, and the generators stay in step.
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

    def __init__(
        self, prob: float, generator: torch.Generator, shard: tuple[int, int, int] | None = None
    ) -> None:
        if not 0.0 < prob <= 1.0:
            raise ValueError(f"QDrop probability must be in (0, 1], got {prob}")
        if shard is not None and not 0 <= shard[1] < shard[2] <= shard[0]:
            raise ValueError(
                f"QDrop shard (batch, start, stop) must have 0 <= start < stop <= batch, got {shard}"
            )
        self.prob = prob
        self.generator = generator
        self.shard = shard  # (batch, start, stop): this rank's rows of the batch; None: all of it

    def mix(self, x_float: torch.Tensor, x_quant: torch.Tensor) -> torch.Tensor:
        """where(rand < prob, x_float, x_quant), the mask drawn over ``x_quant``'s shape (or,
        with a shard, over the whole batch's, of which this rank's rows are kept)."""
        keep_float = self._uniform(x_quant) < self.prob
        return torch.where(keep_float, x_float, x_quant)

    def _uniform(self, x: torch.Tensor) -> torch.Tensor:
        if self.shard is None:
            return torch.rand(x.shape, generator=self.generator, device=x.device)
        batch, start, stop = self.shard
        # dim 0 is the batch, or the batch times the attention heads (sample-major)
        per_sample, rest = divmod(x.shape[0], stop - start)
        if rest or not per_sample:
            raise RuntimeError(
                f"QDrop on a shard of {stop - start} samples got a tensor of {x.shape[0]} rows: dim 0 must "
                "be the batch, or the batch times a whole number (attention heads)"
            )
        whole = torch.rand((batch * per_sample, *x.shape[1:]), generator=self.generator, device=x.device)
        return whole[start * per_sample : stop * per_sample]

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
