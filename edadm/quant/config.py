"""Params of quantization (``quant`` section) and of reconstruction (``recon`` section).

Every default equals params.yaml's value. Where a default differs from the official EDA-DM
code (METHOD.md sections 0 and 3), params.yaml writes the official value beside it and the
README's "Differences from the official code" gives the measured effect: ``recon.iters``
(5000 official; ours sized for 2 CPU cores), ``recon.round_reg`` (off officially),
``quant.split_conv1`` (off officially), ``quant.act_search_elements`` (0, every element,
officially) and ``recon.brecq_optimizer`` (the baseline's optimisers; Q-Diffusion's own are
``qdiffusion``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edadm.config import ParamError, check_range

FLOAT_BITS = (16, 32)  # a bit-width of 16 or 32 means "leave this tensor in float"
METHODS = ("fbr", "brecq", "layer", "none")


def is_float_bits(bits: int) -> bool:
    """True when ``bits`` means "not quantized" (16 or 32)."""
    return bits in FLOAT_BITS


def check_bits(name: str, bits: int) -> None:
    """Bit-widths are 2..8 (the unsigned integer grid of METHOD.md section 0) or 16 / 32 (float)."""
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
    # attention q, k, v; None: the activation bits, as the official code (METHOD.md 0)
    qkv_bits: int | None = None
    first_last_bits: int = 8  # METHOD.md 0: first and last weight quantizers kept at 8 bit
    symmetric: bool = True  # ranges [-tau, tau] ([0, tau] for non-negative tensors)
    split_shortcut: bool = True  # Q-Diffusion: separate quantizers for the shortcut's concat halves
    # Ours: split the up path's conv1 too (its input is GroupNorm(SiLU) of the same concat).
    # Official (and Q-Diffusion): False, only the shortcut conv is split.
    split_conv1: bool = True
    # Activation range search: elements per batch whose error ranks the 100 candidates (the
    # largest |x| eighth always in). 0 = all, as the reference (exact, ~30x slower on CPU).
    act_search_elements: int = 65536
    # Ours: G activation ranges per quantizer, one per group of consecutive sampling steps
    # (edadm.quant.timestep_groups). Official: 1, one set for all timesteps (METHOD.md 0).
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


@dataclass(frozen=True)
class ReconConfig:
    """How the quantized network is reconstructed (params.yaml ``recon``)."""

    method: Literal["fbr", "brecq", "layer", "none"] = "fbr"
    # Iterations per unit. 5000 in the paper (CIFAR). 300 reconstructs the embedded default
    # (23 units, 1024 calibration samples, W4A8) in 190 s on 2 idle CPU cores (bench/recon.py):
    # margin for the 10-minute budget on a busy machine, where an iteration costs 2-5x more.
    iters: int = 300
    batch_size: int = 32
    gamma: float = 0.8  # FBR weight of the layer terms L_m ("add_loss"; 1.0 for LSUN)
    lr_w: float | Literal["auto"] = "auto"  # AdaRound alpha; auto: 5e-2 at W8, 5e-1 at W<=4
    lr_a: float | Literal["auto"] = "auto"  # activation steps; auto: 1e-3 at W8, 5e-4 at W<=4
    qdrop_prob: float = 0.5  # QDrop: probability of a float element (input mix and quantizers)
    # AdaRound rounding regulariser: always in brecq; in fbr / layer when round_reg is on
    round_weight: float = 0.01  # its weight
    # Ours, off in the official code: the rounding regulariser (round_weight, b_range, warmup)
    # in fbr / layer too, so the soft rounding commits before the final hard rounding.
    round_reg: bool = True
    b_range: tuple[float, float] = (20.0, 2.0)  # its temperature b, annealed start -> end
    warmup: float = 0.2  # fraction of iterations before it starts (and b starts to fall)
    # The BRECQ baseline's optimisers. shared: FBR's (lr_w / lr_a, both cosine-annealed), a
    # comparison of losses at equal settings. qdiffusion: Q-Diffusion's own (official), AdaRound
    # at Adam's default 1e-3 without a schedule, activation steps at 4e-4 cosine-annealed with
    # an lp exponent of 2.4; its iteration counts (20k weights, 5k activations) stay recon.iters.
    brecq_optimizer: Literal["shared", "qdiffusion"] = "shared"
    init_batch_size: int = 256  # batch of the activation range initialisation (EMA over batches)
    cache_batch_size: int = 64  # batch of the passes that cache a unit's inputs / outputs
    # Host memory for float-path caches: one float pass fills as many upcoming units as fit
    # (and FBR's float layer outputs, else recomputed per iteration). Not counting the
    # current unit's quantized-path inputs.
    cache_mb: int = 1024
    eval_samples: int = 256  # loss before / after in the report: on the first samples
    seed: int = 0  # batch sampling and QDrop masks derive from it (per unit, so resumes match)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ParamError(f"param recon.method={self.method!r} must be one of {', '.join(METHODS)}")
        check_range("recon.iters", self.iters, 0)
        if self.brecq_optimizer not in ("shared", "qdiffusion"):
            raise ParamError(
                f"param recon.brecq_optimizer={self.brecq_optimizer!r} must be shared or qdiffusion"
            )
        check_range("recon.batch_size", self.batch_size, 1)
        check_range("recon.gamma", self.gamma, 0.0)
        for name in ("lr_w", "lr_a"):
            value = getattr(self, name)
            if value != "auto":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ParamError(f"param recon.{name}={value!r} must be a number or 'auto'")
                check_range(f"recon.{name}", value, 0.0)
        check_range("recon.qdrop_prob", self.qdrop_prob, 0.0, 1.0)
        check_range("recon.round_weight", self.round_weight, 0.0)
        if len(self.b_range) != 2 or min(self.b_range) <= 0:
            raise ParamError(
                f"param recon.b_range={list(self.b_range)} must be two positive numbers [start, end]"
            )
        check_range("recon.warmup", self.warmup, 0.0, 1.0)
        check_range("recon.init_batch_size", self.init_batch_size, 1)
        check_range("recon.cache_batch_size", self.cache_batch_size, 1)
        check_range("recon.cache_mb", self.cache_mb, 0)
        check_range("recon.eval_samples", self.eval_samples, 1)

    def learning_rates(self, w_bits: int) -> tuple[float, float]:
        """``(lr_w, lr_a)``, resolving ``auto`` by weight bits (METHOD.md 3, CIFAR column)."""
        low_bits = not is_float_bits(w_bits) and w_bits <= 4
        lr_w = (5e-1 if low_bits else 5e-2) if self.lr_w == "auto" else float(self.lr_w)
        lr_a = (5e-4 if low_bits else 1e-3) if self.lr_a == "auto" else float(self.lr_a)
        return lr_w, lr_a
