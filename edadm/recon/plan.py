"""The plan of a reconstruction: what each checkpointed step learns (docs/method.md §3).

A ``Phase`` says what a unit's step learns; its named constructors are the methods' phases:
``Phase.fbr`` (EDA-DM), ``Phase.layer`` (layer-wise), ``Phase.brecq_weights`` /
``Phase.brecq_activations`` (the BRECQ / Q-Diffusion baseline's two passes) and
``Phase.range_only`` (no learning). ``plan_steps`` lays out a method's steps over the units:
one activation calibration and one ``Step`` per unit (two passes for BRECQ).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from torch import nn

from edadm.quant.model import quant_info
from edadm.quant.units import Unit
from edadm.recon.config import ReconConfig

# Q-Diffusion's BRECQ optimisers (recon.brecq_optimizer: qdiffusion): Adam's default rate for
# AdaRound (no rate is passed, no schedule), --cali_lr and --cali_p for the activation pass.
QDIFFUSION_LR_W = 1e-3
QDIFFUSION_LR_A = 4e-4
QDIFFUSION_ACT_LP = 2.4


@dataclass(frozen=True, kw_only=True)
class Phase:
    """What a reconstruction step of one unit learns, and how. Build it with a named constructor."""

    name: str  # "joint" (fbr, layer), "weights" / "activations" (brecq), "none"
    learn_weights: bool = False  # AdaRound alpha, Adam(lr_w)
    learn_acts: bool = False  # activation step sizes, Adam(lr_a)
    act_quant: bool = False  # activation quantization on in the quantized path
    layer_terms: bool = False  # FBR's L_m (blocks of two or more layers only, see for_unit)
    qdrop_prob: float = 0.0  # QDrop on the unit's input and in its activation quantizers
    round_reg: bool = False  # AdaRound rounding regulariser (recon.round_weight, b_range, warmup)
    # Optimiser settings that differ from the run's (Q-Diffusion's own BRECQ): None = recon's
    lr_w: float | None = None
    lr_a: float | None = None
    anneal_weights: bool = True  # cosine-anneal the AdaRound rate to 0 (Q-Diffusion: constant)
    lp: float = 2.0  # exponent of the lp loss

    @classmethod
    def fbr(cls, config: ReconConfig, *, weights: bool, activations: bool) -> Phase:
        """EDA-DM's FBR: rounding and steps jointly, L = L_b + gamma * L_m, QDrop; the
        regulariser when ``recon.round_reg`` (ours; off in the official code)."""
        return cls(
            name="joint",
            learn_weights=weights,
            learn_acts=activations,
            act_quant=activations,
            layer_terms=True,
            qdrop_prob=config.qdrop_prob,
            round_reg=config.round_reg and weights,
        )

    @classmethod
    def layer(cls, config: ReconConfig, *, weights: bool, activations: bool) -> Phase:
        """Layer-wise: as FBR on single layers, with the output loss only."""
        return dataclasses.replace(
            cls.fbr(config, weights=weights, activations=activations), layer_terms=False
        )

    @classmethod
    def brecq_weights(cls, config: ReconConfig) -> Phase:
        """BRECQ's first pass: AdaRound with its regulariser, activations off, no QDrop."""
        phase = cls(name="weights", learn_weights=True, round_reg=True)
        if config.brecq_optimizer == "qdiffusion":
            return dataclasses.replace(phase, lr_w=QDIFFUSION_LR_W, anneal_weights=False)
        return phase

    @classmethod
    def brecq_activations(cls, config: ReconConfig) -> Phase:
        """BRECQ's second pass: activation steps on the weight-quantized model, no QDrop."""
        phase = cls(name="activations", learn_acts=True, act_quant=True)
        if config.brecq_optimizer == "qdiffusion":
            return dataclasses.replace(phase, lr_a=QDIFFUSION_LR_A, lp=QDIFFUSION_ACT_LP)
        return phase

    @classmethod
    def range_only(cls, *, activations: bool) -> Phase:
        """No learning (``recon.method: none``): only the losses are measured."""
        return cls(name="none", act_quant=activations)

    def for_unit(self, unit: Unit) -> Phase:
        """This phase on ``unit``: L_m needs a block of at least two layers (the last is left out)."""
        if self.layer_terms and (unit.kind != "block" or len(unit.layers) < 2):
            return dataclasses.replace(self, layer_terms=False)
        return self


@dataclass(frozen=True)
class Step:
    """One checkpointed step: an activation calibration or one unit's reconstruction."""

    name: str
    kind: str  # "calibrate" | "unit"
    unit: Unit | None = None
    phase: Phase | None = None

    @classmethod
    def calibrate(cls) -> Step:
        return cls("calibrate", "calibrate")

    @classmethod
    def reconstruct(cls, phase: Phase, unit: Unit) -> Step:
        return cls(f"{phase.name}:{unit.name}", "unit", unit, phase.for_unit(unit))


def plan_steps(model: nn.Module, config: ReconConfig) -> list[Step]:
    """The steps of ``config.method`` on this quantized model, in order."""
    info = quant_info(model)
    weights, activations = info.config.quantizes_weights, info.config.quantizes_activations
    units = info.layout.layer_units() if config.method == "layer" else info.layout.units
    calibrate = [Step.calibrate()] if activations else []
    if config.method == "brecq":
        # weights first (activations off), then ranges on the weight-quantized model, then steps
        steps = [Step.reconstruct(Phase.brecq_weights(config), u) for u in units] if weights else []
        if activations:
            steps += calibrate + [Step.reconstruct(Phase.brecq_activations(config), u) for u in units]
        return steps
    if config.method == "none":
        phase = Phase.range_only(activations=activations)
    elif config.method == "layer":
        phase = Phase.layer(config, weights=weights, activations=activations)
    else:
        phase = Phase.fbr(config, weights=weights, activations=activations)
    return calibrate + [Step.reconstruct(phase, u) for u in units]


def step_seed(seed: int, step_name: str) -> int:
    """A per-step seed, so a step's random draws do not depend on the steps before it."""
    digest = hashlib.sha256(f"{seed}:{step_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
