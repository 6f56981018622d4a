"""AdaRound: learned up / down rounding of the weights (Nagel et al. 2020), docs/method.md §3.

Each weight element rounds to floor(W / scale) + h(alpha) with the rectified sigmoid
h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1.
alpha starts where h(alpha) = frac(W / scale), so the soft weights start at the float weights;
the hard rounding at the end rounds up where alpha >= 0. The rounding regulariser
sum(1 - |2 h(alpha) - 1|^b) pushes h to 0 or 1; the official EDA-DM code leaves it off for
FBR, the BRECQ baseline uses it.
"""

from __future__ import annotations

import torch
from torch import nn

from edadm.quant.quantizer import grid_max

ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)


def init_alpha(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """alpha with h(alpha) = frac(weight / scale) (inverse of the rectified sigmoid)."""
    ratio = weight / scale
    rest = ratio - torch.floor(ratio)  # in [0, 1)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def round_regularizer(alpha: torch.Tensor, b: float) -> torch.Tensor:
    """AdaRound's rounding term sum(1 - |2 h(alpha) - 1|^b) (without its weight)."""
    return (1 - (2 * (rectified_sigmoid(alpha) - 0.5)).abs().pow(b)).sum()


#: h(alpha) within this of 0 or 1 counts as decided (rounding diagnostics, ``undecided``)
UNDECIDED_MARGIN = 0.01


class AdaRoundQuantizer(nn.Module):
    """Fake-quantized weights with learnable rounding.

    ``scale`` and ``zero_point`` broadcast against the weight (per output channel, or per
    output channel and input half for a split layer); they stay fixed, only ``alpha`` learns.
    ``soft_targets`` True uses h(alpha) (training), False the hard rounding.
    """

    def __init__(
        self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
    ) -> None:
        super().__init__()
        weight = weight.detach().float()
        self.bits = bits
        self.register_buffer("scale", scale.detach().float())
        self.register_buffer("zero_point", zero_point.detach().float())
        self.register_buffer("weight_floor", torch.floor(weight / self.scale))
        self.alpha = nn.Parameter(init_alpha(weight, self.scale))
        self.soft_targets = True

    def rounding(self) -> torch.Tensor:
        """The rounding offsets in [0, 1] added to floor(W / scale)."""
        if self.soft_targets:
            return rectified_sigmoid(self.alpha)
        return (self.alpha >= 0).float()

    def forward(self) -> torch.Tensor:
        """The fake-quantized weight (same shape as the weight, float32)."""
        q = torch.clamp(self.weight_floor + self.rounding() + self.zero_point, 0, grid_max(self.bits))
        return (q - self.zero_point) * self.scale

    @torch.no_grad()
    def integer_weight(self) -> torch.Tensor:
        """The hard-rounded integer codes (uint8): floor(W / scale) + [alpha >= 0] + zero_point."""
        q = torch.clamp(
            self.weight_floor + (self.alpha >= 0).float() + self.zero_point, 0, grid_max(self.bits)
        )
        return q.to(torch.uint8)

    def round_loss(self, b: float) -> torch.Tensor:
        return round_regularizer(self.alpha, b)

    @torch.no_grad()
    def undecided(self, margin: float = UNDECIDED_MARGIN) -> tuple[int, int]:
        """(elements whose soft rounding h(alpha) lies strictly inside (margin, 1 - margin), all
        elements): what the final hard rounding still changes (0 when the rounding has committed)."""
        h = rectified_sigmoid(self.alpha)
        return int(((h > margin) & (h < 1 - margin)).sum()), h.numel()


class LinearTempDecay:
    """BRECQ's temperature b for the regulariser: start_b until the warm-up ends, then linear to end_b."""

    def __init__(self, iters: int, warmup: float = 0.2, start_b: float = 20.0, end_b: float = 2.0) -> None:
        self.iters = iters
        self.start_decay = warmup * iters
        self.start_b = start_b
        self.end_b = end_b

    def __call__(self, step: int) -> float:
        if step < self.start_decay:
            return self.start_b
        span = max(self.iters - self.start_decay, 1e-12)
        rel = (step - self.start_decay) / span
        return self.end_b + (self.start_b - self.end_b) * max(0.0, 1 - rel)
