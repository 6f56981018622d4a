"""Reconstruction losses (docs/method.md §3): the lp distance and FBR's L = L_b + gamma * L_m."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def channel_dim(x: torch.Tensor) -> int:
    """The channel dim: 1 for NCHW maps and [B, C] vectors, -1 for token-major [B, tokens, C]."""
    return -1 if x.ndim == 3 else 1


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """lp(pred, t) = |pred - t|^p summed over channels, averaged over the rest (docs/method.md §3).

    p = 2 everywhere but Q-Diffusion's activation pass (2.4, ``recon.brecq_optimizer``).

    The official code sums over dim 1, the channels of its NCHW layers (its attention q, k, v
    are 1x1 convolutions); diffusers' attention Linears give [B, tokens, C], where dim 1 would
    be the tokens and weigh those terms hw / C times more.
    """
    diff = pred - target
    error = diff.pow(2) if p == 2 else diff.abs().pow(p)
    return error.sum(channel_dim(pred)).mean()


def fbr_loss(
    block_out_q: torch.Tensor,
    block_out_fp: torch.Tensor,
    layer_outs_q: Sequence[torch.Tensor],
    layer_outs_fp: Sequence[torch.Tensor],
    gamma: float,
) -> torch.Tensor:
    """FBR loss L = L_b + gamma * L_m (docs/method.md §3).

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
