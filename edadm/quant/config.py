"""Params of quantization (params.yaml ``quant``); reconstruction's are ``edadm.recon.config``.

Every default equals params.yaml's value. Where a default differs from the official EDA-DM
code (docs/method.md §0 and §3), params.yaml writes the official value beside it and
docs/paper.md gives the measured effect. Here: ``quant.split_conv1`` (off officially) and
``quant.act_search_elements`` (0, every element, officially); the ``recon`` ones are listed in
``edadm.recon.config``.
"""

from __future__ import annotations

from dataclasses import dataclass

from edadm.config import check_range
from edadm.errors import ParamError

FLOAT_BITS = (16, 32)  # a bit-width of 16 or 32 means "leave this tensor in float"


def is_float_bits(bits: int) -> bool:
    """True when ``bits`` means "not quantized" (16 or 32)."""
    return bits in FLOAT_BITS


def check_bits(name: str, bits: int) -> None:
    """Bit-widths are 2..8 (the unsigned integer grid of docs/method.md §0) or 16 / 32 (float)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not (2 <= bits <= 8 or bits in FLOAT_BITS):
        raise ParamError(
            f"param {name}={bits!r} is not a supported bit-width: use 2 to 8 (integer grid) "
            f"or 16 / 32 (leave in float, e.g. weight-only W4A32)"
        )


@dataclass(frozen=True)
class QuantConfig:
    """What gets quantized and to how many bits (params.yaml ``quant``)."""

    w_bits: int = 4  # weights, per output channel; W4A8, the paper's hard setting (8: W8A8)
    a_bits: int = 8  # activations at the input of every Conv2d / Linear, per tensor
    attn_bits: int = 8  # attention softmax output, [0, tau] (only when a_bits quantizes)
    # attention q, k, v; None: the activation bits, as the official code (docs/method.md §0)
    qkv_bits: int | None = None
    first_last_bits: int = 8  # docs/method.md §0: first and last weight quantizers kept at 8 bit
    symmetric: bool = True  # ranges [-tau, tau] ([0, tau] for non-negative tensors)
    split_shortcut: bool = True  # Q-Diffusion: separate quantizers for the shortcut's concat halves
    # Ours: split the up path's conv1 too (its input is GroupNorm(SiLU) of the same concat).
    # Official (and Q-Diffusion): False, only the shortcut conv is split.
    split_conv1: bool = True
    # Activation range search: elements per batch whose error ranks the 100 candidates (the
    # largest |x| eighth always in). 0 = all, as the reference (exact, ~30x slower on CPU).
    act_search_elements: int = 65536
    # Ours: G activation ranges per quantizer, one per group of consecutive sampling steps
    # (edadm.quant.timestep_groups). Official: 1, one set for all timesteps (docs/method.md §0).
    act_timestep_groups: int = 1

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "attn_bits", "first_last_bits"):
            check_bits(f"quant.{name}", getattr(self, name))
        if self.qkv_bits is not None:
            check_bits("quant.qkv_bits", self.qkv_bits)
        check_range("quant.act_search_elements", self.act_search_elements, 0)
        groups = self.act_timestep_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ParamError(
                f"param quant.act_timestep_groups={groups!r} must be an integer >= 1 "
                "(1: one set of activation ranges for all timesteps)"
            )

    @property
    def attention_qkv_bits(self) -> int:
        """The bit-width of attention's q, k and v (``qkv_bits``, else the activation bits)."""
        return self.a_bits if self.qkv_bits is None else self.qkv_bits

    @property
    def quantizes_weights(self) -> bool:
        return not is_float_bits(self.w_bits)

    @property
    def quantizes_activations(self) -> bool:
        return not is_float_bits(self.a_bits)
