"""Params of reconstruction (params.yaml ``recon``).

Every default equals params.yaml's value; where it differs from the official EDA-DM code
params.yaml writes the official value beside it and docs/paper.md gives the measured effect:
``recon.iters`` (5000 official; ours sized for 2 CPU cores), ``recon.round_reg`` (off
officially) and ``recon.brecq_optimizer`` (the baseline's optimisers; Q-Diffusion's own are
``qdiffusion``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edadm.config import check_range
from edadm.errors import ParamError
from edadm.quant.config import is_float_bits

METHODS = ("fbr", "brecq", "layer", "none")


@dataclass(frozen=True)
class ReconConfig:
    """How the quantized network is reconstructed (params.yaml ``recon``)."""

    method: Literal["fbr", "brecq", "layer", "none"] = "fbr"
    # Iterations per unit. 5000 in the paper (CIFAR). 300 reconstructs the embedded default
    # (23 units, 1024 calibration samples, W4A8) in about 3 minutes on 2 CPU cores (the
    # reconstruct stage of a fresh-clone `dvc repro`: 2 min 43 s on a 2-core Xeon; bench/recon.py
    # times it apart), leaving margin on a busy machine, where an iteration costs 2-5x more.
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
        """``(lr_w, lr_a)``, resolving ``auto`` by weight bits (docs/method.md §3, CIFAR column)."""
        low_bits = not is_float_bits(w_bits) and w_bits <= 4
        lr_w = (5e-1 if low_bits else 5e-2) if self.lr_w == "auto" else float(self.lr_w)
        lr_a = (5e-4 if low_bits else 1e-3) if self.lr_a == "auto" else float(self.lr_a)
        return lr_w, lr_a
