"""Reconstruction losses (METHOD.md 3): the lp distance and FBR's L = L_b + gamma * L_m."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def lp_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """lp(p, t) = ((p - t)^2).sum(dim=1).mean(): summed over dim 1, averaged over the rest."""
    return (pred - target).pow(2).sum(1).mean()


def fbr_loss(
    block_out_q: torch.Tensor,
    block_out_fp: torch.Tensor,
    layer_outs_q: Sequence[torch.Tensor],
    layer_outs_fp: Sequence[torch.Tensor],
    gamma: float,
) -> torch.Tensor:
    """FBR loss L = L_b + gamma * L_m (METHOD.md 3).

    L_b = lp(B_q(x~), B_fp(x)); L_m = sum over the block's quantized layers except the last,
    in module order, of lp(O_l^q(x~), O_l^fp(x)). ``layer_outs_*`` hold every quantized layer's
    output in module order (the last one is left out here).
    """
    if len(layer_outs_q) != len(layer_outs_fp):
        raise ValueError(
            f"fbr_loss: {len(layer_outs_q)} quantized layer outputs vs {len(layer_outs_fp)} float"
        )
    block_term = lp_loss(block_out_q, block_out_fp)
    layer_term = sum((lp_loss(q, f) for q, f in zip(layer_outs_q[:-1], layer_outs_fp[:-1], strict=True)), 0.0)
    return block_term + gamma * layer_term
