"""Reconstruction of the quantized network, unit by unit in network order (METHOD.md section 3).

Methods (``recon.method``):
- ``fbr`` (EDA-DM): blocks with L = L_b + gamma * L_m, single layers with their output loss;
  AdaRound alpha (Adam, lr_w) and activation steps (Adam, lr_a) learned jointly, both with
  cosine annealing to 0; QDrop on the block input and inside every activation quantizer.
  No rounding regulariser, as the official code; ``recon.round_reg: true`` (ours) adds it,
  which closes the gap between the soft rounding learned and the final hard rounding when
  iterations are few (embedded default, W4A8, 200 iterations: full-model output MSE against
  float 6.4e-4 -> 4.8e-4; BRECQ 4.4e-4; range search only 2.0e-3).
- ``brecq`` (BRECQ / Q-Diffusion baseline): block-output loss only, AdaRound with its rounding
  regulariser (weight 0.01, b from 20 to 2 after a 20 % warm-up), weights first with
  activations off; then the activation ranges are initialised on the weight-quantized model
  and the activation steps learned in a second pass. No QDrop.
- ``layer``: every layer its own unit (AdaRound + steps jointly, output loss, QDrop); the
  attention products' quantizers keep their initial ranges.
- ``none``: range search only (weights round to nearest).

Each unit's inputs and outputs are cached from the calibration set by passes in batches of
``recon.cache_batch_size``, stopped as soon as the unit has run, and kept on the CPU:
- float passes (all quantization off): the float input x, the targets B_fp(x) and, for FBR,
  the float layer outputs O_l^fp(x). The float path never changes, so one pass fills the
  caches of as many upcoming units as ``recon.cache_mb`` allows (layer outputs that do not
  fit are recomputed at each iteration instead);
- a quantized pass per unit (every earlier unit already reconstructed): the quantized-path
  input.
Every positional / keyword input of the unit is cached (pre-hooks with kwargs): for a
ResnetBlock2D that is (hidden_states, temb), for an attention block also temb or
encoder_hidden_states. The quantized pass feeds the unit all of its quantized-path inputs:
QDrop mixes only the main input, x~ = where(rand < p, x, quantized-path input); the other
inputs (temb, which the quantized time-embedding layers produce) come from the quantized
path unmixed, as in the official code, so the unit learns to work with the temb the
quantized network will really give it. encoder_hidden_states is the same in both paths
(the text encoder stays in float).

Resumable: ``run_reconstruction`` checkpoints every finished step under ``work_dir`` (keyed by
a hash of the configs, the calibration data and the model weights); random batches and QDrop
masks come from a generator seeded per step from ``recon.seed``, so a resumed run gives the
same result as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from edadm.artifacts import atomic_output, write_json
from edadm.config import as_dict
from edadm.quant.adaround import LinearTempDecay
from edadm.quant.blocks import Unit
from edadm.quant.config import QuantConfig, ReconConfig
from edadm.quant.layers import QuantLayer
from edadm.quant.model import (
    act_quantizers,
    calibrate_activations,
    quant_info,
    quantize_model,
    set_quant_state,
)
from edadm.quant.quantizer import SCALE_EPS
from edadm.quant.state import (
    SCHEMA_VERSION,
    CheckpointStore,
    build_manifest,
    calibration_hash,
    load_quant_state,
    model_hash,
    quant_state_dict,
    save_quant_state,
)

logger = logging.getLogger(__name__)

CACHE_DEVICE = torch.device("cpu")  # unit caches live on the host; batches move to the device


# ---------------------------------------------------------------------------------------------
# Calibration data
# ---------------------------------------------------------------------------------------------
@dataclass
class CalibrationData:
    """The calibration set: model inputs x_t, timesteps t and (conditional models) text features.

    x: [N, C, H, W] float32; t: [N] int64; encoder_hidden_states: [N, L, D] or None.
    """

    x: torch.Tensor
    t: torch.Tensor
    encoder_hidden_states: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise ValueError(f"calibration x must be [N, C, H, W], got shape {tuple(self.x.shape)}")
        n = self.x.shape[0]
        if n == 0:
            raise ValueError("the calibration set is empty (0 samples): check the select stage's output")
        if self.t.shape != (n,):
            raise ValueError(f"calibration t must be [N]=[{n}], got shape {tuple(self.t.shape)}")
        if self.encoder_hidden_states is not None and self.encoder_hidden_states.shape[0] != n:
            raise ValueError(
                f"calibration encoder_hidden_states has {self.encoder_hidden_states.shape[0]} rows, x has {n}"
            )

    def __len__(self) -> int:
        return self.x.shape[0]

    def model_inputs(
        self, index: slice | torch.Tensor, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        """Forward keyword arguments for the samples ``index``, on ``device``."""
        inputs = {"sample": self.x[index].to(device), "timestep": self.t[index].to(device)}
        if self.encoder_hidden_states is not None:
            inputs["encoder_hidden_states"] = self.encoder_hidden_states[index].to(device)
        return inputs

    def batches(self, batch_size: int, device: torch.device | str) -> Iterator[dict[str, torch.Tensor]]:
        """Forward keyword arguments for consecutive batches (the last one may be smaller)."""
        for start in range(0, len(self), batch_size):
            yield self.model_inputs(slice(start, start + batch_size), device)


# ---------------------------------------------------------------------------------------------
# Losses (METHOD.md 3)
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Unit input / output caches
# ---------------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by a hook once the unit's inputs / outputs are captured: the rest is not needed."""


class UnitInputs:
    """A unit's positional and keyword inputs over the calibration set.

    Tensors whose first dimension is the batch are concatenated over batches ([N, ...]); any
    other value (None, flags, a shared mask) is kept once.
    """

    def __init__(self, captured: list[tuple[tuple, dict]], batch_sizes: list[int]) -> None:
        args0, kwargs0 = captured[0]
        self.args = [self._stack([c[0][i] for c in captured], batch_sizes) for i in range(len(args0))]
        self.kwargs = {k: self._stack([c[1][k] for c in captured], batch_sizes) for k in kwargs0}
        self.batched_args = [self._is_batched(v, batch_sizes) for v in self.args]
        self.batched_kwargs = {k: self._is_batched(v, batch_sizes) for k, v in self.kwargs.items()}
        self.size = sum(batch_sizes)

    @staticmethod
    def _is_batched(value: Any, batch_sizes: list[int]) -> bool:
        return torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == sum(batch_sizes)

    @staticmethod
    def _stack(values: list[Any], batch_sizes: list[int]) -> Any:
        batched = all(
            torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n
            for v, n in zip(values, batch_sizes, strict=True)
        )
        return torch.cat(values) if batched and len(values) > 1 else values[0]

    def select(self, index: torch.Tensor, device: torch.device) -> tuple[list[Any], dict[str, Any]]:
        """The inputs of samples ``index`` on ``device``."""
        args = [
            v[index].to(device) if b else _to(v, device)
            for v, b in zip(self.args, self.batched_args, strict=True)
        ]
        kwargs = {
            k: v[index].to(device) if self.batched_kwargs[k] else _to(v, device)
            for k, v in self.kwargs.items()
        }
        return args, kwargs

    def main_input(self, args: list[Any], kwargs: dict[str, Any]) -> tuple[str | int, torch.Tensor]:
        """The unit's main input (QDrop mixes it): the first positional tensor or ``hidden_states``."""
        if args and torch.is_tensor(args[0]):
            return 0, args[0]
        for key in ("hidden_states", "input_tensor", "input"):
            if torch.is_tensor(kwargs.get(key)):
                return key, kwargs[key]
        raise ValueError("cannot find the unit's main input tensor (first positional or hidden_states)")


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if torch.is_tensor(value) else value


def _detach(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().to(CACHE_DEVICE)
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


@dataclass
class CaptureTarget:
    """What to capture of one unit in a pass: its inputs, and optionally output and layer outputs."""

    module: nn.Module
    output: bool = True
    layers: Sequence[nn.Module] = ()


@dataclass
class Captured:
    """One unit's captured inputs [N, ...], output [N, ...] and layer outputs, on the CPU."""

    inputs: UnitInputs
    output: torch.Tensor | None
    layer_outputs: list[torch.Tensor] | None

    def nbytes(self) -> int:
        tensors = [v for v in (*self.inputs.args, *self.inputs.kwargs.values()) if torch.is_tensor(v)]
        tensors += [self.output] if self.output is not None else []
        tensors += self.layer_outputs or []
        return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def capture_units(
    model: nn.Module,
    targets: Sequence[CaptureTarget],
    calib: CalibrationData,
    batch_size: int,
    device: torch.device,
    *,
    weights: bool,
    activations: bool,
) -> list[Captured]:
    """Run ``model`` over the calibration set with the given quant state; capture the targets.

    Each batch stops as soon as every target is captured (right before a unit whose output
    is not needed, right after one whose output is). Returns one ``Captured`` per target.
    """
    set_quant_state(model, weights, activations)
    inputs: list[list[tuple[tuple, dict]]] = [[] for _ in targets]
    outputs: list[list[torch.Tensor]] = [[] for _ in targets]
    layer_outputs: list[list[list[torch.Tensor]]] = [[[] for _ in t.layers] for t in targets]
    complete = [0]

    def finish_one() -> None:
        complete[0] += 1
        if complete[0] == len(targets):
            raise _StopForward

    def pre_hook(i: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs[i].append((_detach(args), _detach(kwargs)))
        if not targets[i].output:
            finish_one()

    def post_hook(i: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        output = output[0] if isinstance(output, (tuple, list)) else output
        outputs[i].append(output.detach().to(CACHE_DEVICE))
        finish_one()

    def layer_hook(i: int, j: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        layer_outputs[i][j].append(output.detach().to(CACHE_DEVICE))

    handles = []
    for i, target in enumerate(targets):
        handles.append(
            target.module.register_forward_pre_hook(functools.partial(pre_hook, i), with_kwargs=True)
        )
        if target.output:
            handles.append(
                target.module.register_forward_hook(functools.partial(post_hook, i), with_kwargs=True)
            )
        for j, layer in enumerate(target.layers):
            handles.append(layer.register_forward_hook(functools.partial(layer_hook, i, j)))
    batch_sizes = []
    try:
        for batch in calib.batches(batch_size, device):
            batch_sizes.append(batch["sample"].shape[0])
            complete[0] = 0
            try:
                model(**batch)
            except _StopForward:
                pass
            if complete[0] != len(targets):
                missing = [
                    type(t.module).__name__
                    for i, t in enumerate(targets)
                    if len(inputs[i]) < len(batch_sizes)
                ]
                raise RuntimeError(f"unit(s) {missing} did not run in the model's forward")
    finally:
        for handle in handles:
            handle.remove()
    return [
        Captured(
            UnitInputs(inputs[i], batch_sizes),
            torch.cat(outputs[i]) if target.output else None,
            [torch.cat(o) for o in layer_outputs[i]] if target.layers else None,
        )
        for i, target in enumerate(targets)
    ]


@dataclass
class UnitCache:
    """Float inputs, quantized-path inputs, float outputs (and float layer outputs) of one unit."""

    fp_inputs: UnitInputs
    q_inputs: UnitInputs
    fp_outputs: torch.Tensor
    fp_layer_outputs: list[torch.Tensor] | None = None  # None: recomputed each iteration

    def __len__(self) -> int:
        return self.fp_outputs.shape[0]


# ---------------------------------------------------------------------------------------------
# One unit
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    """What a reconstruction step of one unit learns, and how."""

    name: str  # "joint" (fbr, layer), "weights" / "activations" (brecq), "none"
    learn_weights: bool
    learn_acts: bool
    act_quant: bool  # activation quantization on in the quantized path
    layer_terms: bool  # FBR's L_m (only for blocks of the fbr method)
    qdrop: bool
    round_loss: bool  # AdaRound regulariser (brecq)


class _OutputRecorder:
    """Forward hooks keeping each listed layer's latest output, in the given order."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.outputs: list[torch.Tensor | None] = [None] * len(layers)
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.outputs[i] = output

        return hook

    def take(self) -> list[torch.Tensor]:
        outputs, self.outputs = self.outputs, [None] * len(self.outputs)
        return outputs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _run_unit(unit_module: nn.Module, args: list[Any], kwargs: dict[str, Any]) -> torch.Tensor:
    output = unit_module(*args, **kwargs)
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_main(inputs: UnitInputs, args: list, kwargs: dict, value: torch.Tensor) -> tuple[list, dict]:
    key, _ = inputs.main_input(args, kwargs)
    if isinstance(key, int):
        return [value, *args[1:]], kwargs
    return args, {**kwargs, key: value}


def _float_layer_outputs(
    unit_module: nn.Module,
    cache: UnitCache,
    recorder: _OutputRecorder,
    index: torch.Tensor,
    fp_args: list[Any],
    fp_kwargs: dict[str, Any],
    device: torch.device,
) -> list[torch.Tensor]:
    """O_l^fp(x) for the samples ``index``: from the cache, or from a float pass of the unit."""
    if cache.fp_layer_outputs is not None:
        return [t[index].to(device) for t in cache.fp_layer_outputs]
    with torch.no_grad():
        set_quant_state(unit_module, False, False)
        _run_unit(unit_module, fp_args, fp_kwargs)
    return recorder.take()


@torch.no_grad()
def evaluate_unit(
    unit_module: nn.Module,
    layers: Sequence[QuantLayer],
    cache: UnitCache,
    act_quant: bool,
    batch_size: int,
    samples: int,
    device: torch.device,
) -> tuple[float, list[float]]:
    """Block-output loss L_b and every layer's lp loss on the first ``samples`` cached samples.

    The quantized unit runs on the pure quantized-path input (no QDrop) against float targets.
    """
    recorder = _OutputRecorder(layers)
    count = min(samples, len(cache))
    block_total, layer_totals = 0.0, [0.0] * len(layers)
    try:
        for start in range(0, count, batch_size):
            index = torch.arange(start, min(start + batch_size, count))
            fp_args, fp_kwargs = cache.fp_inputs.select(index, device)
            layers_fp = _float_layer_outputs(unit_module, cache, recorder, index, fp_args, fp_kwargs, device)
            set_quant_state(unit_module, True, act_quant)
            out_q = _run_unit(unit_module, *cache.q_inputs.select(index, device))
            layers_q = recorder.take()
            n = len(index)
            block_total += float(lp_loss(out_q, cache.fp_outputs[index].to(device))) * n
            for i, (q, f) in enumerate(zip(layers_q, layers_fp, strict=True)):
                layer_totals[i] += float(lp_loss(q, f)) * n
    finally:
        recorder.remove()
    return block_total / count, [v / count for v in layer_totals]


def reconstruct_unit(
    unit_module: nn.Module,
    layers: Sequence[QuantLayer],
    cache: UnitCache,
    phase: Phase,
    config: ReconConfig,
    lrs: tuple[float, float],
    seed: int,
    device: torch.device,
) -> int:
    """Learn the unit's rounding and / or activation steps on its cache; returns the iterations run.

    Ends with hard rounding written to the layers' integer weights.
    """
    lr_w, lr_a = lrs
    if config.iters == 0:
        return 0
    adarounds = [layer.start_adaround() for layer in layers if phase.learn_weights and layer.weight_quantizer]
    scales = [q.scale for q in act_quantizers(unit_module)] if phase.learn_acts else []
    if not adarounds and not scales:
        return 0
    iters = config.iters
    cpu_generator = torch.Generator().manual_seed(seed)
    device_generator = torch.Generator(device).manual_seed(seed)
    drop_prob = config.qdrop_prob if phase.qdrop else 0.0
    quantizers = act_quantizers(unit_module)
    for quantizer in quantizers:
        quantizer.drop_prob = drop_prob if phase.act_quant else 0.0
        quantizer.generator = device_generator
    for scale in scales:
        scale.requires_grad_(True)

    optimizers, schedulers = [], []
    for params, lr in (([a.alpha for a in adarounds], lr_w), (scales, lr_a)):
        if params:
            optimizer = torch.optim.Adam(params, lr=lr)
            optimizers.append(optimizer)
            schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iters, eta_min=0.0))
    temperature = LinearTempDecay(iters, config.warmup, *config.b_range)
    recorder = _OutputRecorder(layers) if phase.layer_terms else None
    batch = min(config.batch_size, len(cache))
    try:
        for step in tqdm(range(1, iters + 1), desc="iterations", unit="it", leave=False, mininterval=2):
            # 1. a random batch (without replacement) of cached inputs and float targets
            index = torch.randperm(len(cache), generator=cpu_generator)[:batch]
            fp_args, fp_kwargs = cache.fp_inputs.select(index, device)
            q_args, q_kwargs = cache.q_inputs.select(index, device)
            target = cache.fp_outputs[index].to(device)
            # 2. QDrop on the input: x~ = where(rand < p, float input, quantized-path input)
            if drop_prob > 0:
                _, x_fp = cache.fp_inputs.main_input(fp_args, fp_kwargs)
                _, x_q = cache.q_inputs.main_input(q_args, q_kwargs)
                mask = torch.rand(x_q.shape, generator=device_generator, device=device) < drop_prob
                q_args, q_kwargs = _with_main(cache.q_inputs, q_args, q_kwargs, torch.where(mask, x_fp, x_q))
            # 3. float layer outputs O_l^fp(x) for L_m
            if recorder is not None:
                layers_fp = _float_layer_outputs(
                    unit_module, cache, recorder, index, fp_args, fp_kwargs, device
                )
            # 4. quantized pass on x~ and the loss
            set_quant_state(unit_module, True, phase.act_quant)
            out_q = _run_unit(unit_module, q_args, q_kwargs)
            if recorder is not None:
                loss = fbr_loss(out_q, target, recorder.take(), layers_fp, config.gamma)
            else:
                loss = lp_loss(out_q, target)
            if phase.round_loss and step >= config.warmup * iters:
                b = temperature(step)
                loss = loss + config.round_weight * sum(a.round_loss(b) for a in adarounds)
            # 5. Adam steps, cosine-annealed learning rates
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            for scheduler in schedulers:
                scheduler.step()
            with torch.no_grad():
                for scale in scales:
                    scale.clamp_(min=SCALE_EPS)
    finally:
        if recorder is not None:
            recorder.remove()
        for quantizer in quantizers:
            quantizer.drop_prob, quantizer.generator = 0.0, None
        for scale in scales:
            scale.requires_grad_(False)
            scale.grad = None
        # 6. hard rounding: alpha >= 0 rounds up
        for layer in layers:
            layer.finish_adaround()
    return iters


# ---------------------------------------------------------------------------------------------
# The whole network
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One checkpointed step: an activation calibration or one unit's reconstruction."""

    name: str
    kind: str  # "calibrate" | "unit"
    unit: Unit | None = None
    phase: Phase | None = None


def plan_steps(model: nn.Module, config: ReconConfig) -> list[Step]:
    """The steps of ``config.method`` on this quantized model, in order."""
    info = quant_info(model)
    weights_q, acts_q = info.config.quantizes_weights, info.config.quantizes_activations
    method = config.method
    units = info.layout.layer_units() if method == "layer" else info.layout.units
    calibrate = [Step("calibrate", "calibrate")] if acts_q else []
    if method == "brecq":
        weights = Phase("weights", True, False, False, False, False, True)
        acts = Phase("activations", False, True, True, False, False, False)
        steps = [Step(f"weights:{u.name}", "unit", u, weights) for u in units] if weights_q else []
        if acts_q:
            steps += [Step("calibrate", "calibrate")]
            steps += [Step(f"activations:{u.name}", "unit", u, acts) for u in units]
        return steps
    if method == "none":
        phase = Phase("none", False, False, acts_q, False, False, False)
    else:
        qdrop, round_loss = config.qdrop_prob > 0, config.round_reg and weights_q
        phase = Phase("joint", weights_q, acts_q, acts_q, method == "fbr", qdrop, round_loss)
    return calibrate + [Step(f"{phase.name}:{u.name}", "unit", u, _for_unit(phase, u)) for u in units]


def _for_unit(phase: Phase, unit: Unit) -> Phase:
    # L_m needs at least two layers (the last one is left out)
    if phase.layer_terms and (unit.kind != "block" or len(unit.layers) < 2):
        return dataclasses.replace(phase, layer_terms=False)
    return phase


def step_seed(seed: int, step_name: str) -> int:
    """A per-step seed, so a step's random draws do not depend on the steps before it."""
    digest = hashlib.sha256(f"{seed}:{step_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


StepCallback = Callable[[str, dict[str, Any]], None]


class FloatCaches:
    """Float-path caches of upcoming units, filled a group at a time within ``recon.cache_mb``.

    The float path does not change while the quantized one is reconstructed, so one float
    pass can capture several consecutive units (their inputs, outputs and, for FBR, the
    float layer outputs). A unit whose layer outputs alone would overflow the budget gets
    them recomputed at each iteration instead.
    """

    def __init__(
        self, model: nn.Module, calib: CalibrationData, config: ReconConfig, device: torch.device
    ) -> None:
        self.model, self.calib, self.config, self.device = model, calib, config, device
        self.modules = dict(model.named_modules())
        self.budget = config.cache_mb * 2**20
        self.caches: dict[str, Captured] = {}
        self.per_sample: dict[tuple[str, bool], int] = {}

    def _targets(self, steps: Sequence[Step]) -> list[CaptureTarget]:
        return [
            CaptureTarget(
                self.modules[s.unit.name],
                True,
                [self.modules[n] for n in s.unit.layers] if self._keep_layers(s) else (),
            )
            for s in steps
        ]

    def _keep_layers(self, step: Step) -> bool:
        return step.phase.layer_terms and self._bytes(step, True) <= self.budget

    def _bytes(self, step: Step, layers: bool) -> int:
        """Bytes of a step's float cache for the whole calibration set (probed on one sample)."""
        key = (step.unit.name, layers and step.phase.layer_terms)
        if key not in self.per_sample:
            module = self.modules[step.unit.name]
            recorded = [self.modules[n] for n in step.unit.layers] if key[1] else ()
            probe = CalibrationData(*(v[:1] if v is not None else None for v in self._calib_tensors()))
            (captured,) = capture_units(
                self.model,
                [CaptureTarget(module, True, recorded)],
                probe,
                1,
                self.device,
                weights=False,
                activations=False,
            )
            self.per_sample[key] = captured.nbytes()
        return self.per_sample[key] * len(self.calib)

    def _calib_tensors(self) -> tuple:
        return self.calib.x, self.calib.t, self.calib.encoder_hidden_states

    def take(self, steps: Sequence[Step], i: int) -> Captured:
        """The float cache of ``steps[i]``; fills the group of consecutive unit steps from i."""
        name = steps[i].name
        if name not in self.caches:
            group, total = [], 0
            for step in steps[i:]:
                if step.kind != "unit":
                    break
                size = self._bytes(step, self._keep_layers(step))
                if group and total + size > self.budget:
                    break
                group.append(step)
                total += size
            captured = capture_units(
                self.model,
                self._targets(group),
                self.calib,
                self.config.cache_batch_size,
                self.device,
                weights=False,
                activations=False,
            )
            self.caches.update({s.name: c for s, c in zip(group, captured, strict=True)})
        return self.caches.pop(name)


def reconstruct(
    model: nn.Module,
    calib: CalibrationData,
    config: ReconConfig,
    device: torch.device | str,
    *,
    store: CheckpointStore | None = None,
    callback: StepCallback | None = None,
) -> dict[str, Any]:
    """Reconstruct a quantized model (``quantize_model``) in place; returns the report.

    ``store`` checkpoints every finished step and skips the steps it already holds;
    ``callback(step_name, entry)`` runs after each step is checkpointed.
    """
    device = torch.device(device)
    model.to(device).eval().requires_grad_(False)
    info = quant_info(model)
    lrs = config.learning_rates(info.config.w_bits)
    modules = dict(model.named_modules())
    steps = plan_steps(model, config)
    finished = store.finished([s.name for s in steps]) if store else []
    float_caches = FloatCaches(model, calib, config, device)
    entries: list[dict[str, Any]] = []
    start = time.perf_counter()
    progress = tqdm(steps, desc=f"reconstruct ({config.method})", unit="unit")
    for i, step in enumerate(progress):
        progress.set_postfix_str(step.name[-40:])
        if i < len(finished):
            load_quant_state(model, store.load(finished[i]), strict=False)
            entries.append(finished[i]["entry"])
            continue
        tick = time.perf_counter()
        if step.kind == "calibrate":
            calibrate_activations(model, calib.batches(config.init_batch_size, device))
            entry = {"step": step.name, "phase": "calibrate", "seconds": round(time.perf_counter() - tick, 3)}
            state = quant_state_dict(model, activations_only=True)
        else:
            float_cache = float_caches.take(steps, i)
            entry = _reconstruct_step(model, modules, step, float_cache, calib, config, lrs, device)
            entry["seconds"] = round(time.perf_counter() - tick, 3)
            state = quant_state_dict(modules[step.unit.name], prefix=step.unit.name)
        entries.append(entry)
        if store is not None:
            store.save(step.name, state, entry)
        if callback is not None:
            callback(step.name, entry)
    set_quant_state(model, weights=True, activations=True)
    return build_report(config, entries, time.perf_counter() - start)


def _reconstruct_step(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    step: Step,
    float_cache: Captured,
    calib: CalibrationData,
    config: ReconConfig,
    lrs: tuple[float, float],
    device: torch.device,
) -> dict[str, Any]:
    unit, phase = step.unit, step.phase
    unit_module = modules[unit.name]
    layers = [modules[name] for name in unit.layers]
    tick = time.perf_counter()
    # 1. caches: float path (inputs x, targets B_fp(x)), quantized path (inputs of the quantized network)
    (quantized,) = capture_units(
        model,
        [CaptureTarget(unit_module, output=False)],
        calib,
        config.cache_batch_size,
        device,
        weights=True,
        activations=phase.act_quant,
    )
    cache = UnitCache(float_cache.inputs, quantized.inputs, float_cache.output, float_cache.layer_outputs)
    cache_seconds = time.perf_counter() - tick
    # 2. losses before, learning, losses after
    evaluate = functools.partial(
        evaluate_unit,
        unit_module,
        layers,
        cache,
        phase.act_quant,
        config.cache_batch_size,
        config.eval_samples,
        device,
    )
    before, layers_before = evaluate()
    tick_train = time.perf_counter()
    iters = reconstruct_unit(
        unit_module, layers, cache, phase, config, lrs, step_seed(config.seed, step.name), device
    )
    train_seconds = time.perf_counter() - tick_train
    after, layers_after = evaluate() if iters else (before, layers_before)
    logger.info("%s: loss %.4g -> %.4g (%d iters, %.1f s)", step.name, before, after, iters, train_seconds)
    return {
        "step": step.name,
        "unit": unit.name,
        "kind": unit.kind,
        "type": unit.type,
        "phase": phase.name,
        "loss_before": before,
        "loss_after": after,
        "layer_losses_before": dict(zip(unit.layers, layers_before, strict=True)),
        "layer_losses_after": dict(zip(unit.layers, layers_after, strict=True)),
        "iters": iters,
        "train_seconds": round(train_seconds, 3),
        "cache_seconds": round(cache_seconds, 3),
        "float_layer_targets_cached": float_cache.layer_outputs is not None,
    }


def build_report(config: ReconConfig, entries: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """``{"method", "steps": [entry per step], "totals"}``.

    A unit entry holds ``loss_before`` / ``loss_after`` (block-output lp on the first
    ``recon.eval_samples`` samples, pure quantized-path input), ``layer_losses_before`` /
    ``_after`` (every layer's lp), ``iters``, ``seconds`` (wall time of the step, including
    the float pass that fills its group's caches when it is the first of the group),
    ``train_seconds`` and ``cache_seconds``. Totals sum the last phase's units (for brecq the
    activation pass) and every step's seconds.
    """
    units = [e for e in entries if e["phase"] != "calibrate"]
    final_phase = units[-1]["phase"] if units else None
    final = [e for e in units if e["phase"] == final_phase]
    totals = {
        "method": config.method,
        "units": len(final),
        "steps": len(entries),
        "iters": sum(e["iters"] for e in units),
        "seconds": round(seconds, 3),
        "seconds_all_runs": round(sum(e["seconds"] for e in entries), 3),
        "train_seconds": round(sum(e["train_seconds"] for e in units), 3),
        "loss_before": sum(e["loss_before"] for e in final),
        "loss_after": sum(e["loss_after"] for e in final),
    }
    return {"method": config.method, "steps": entries, "totals": totals}


def report_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flat rows for ``plots/recon.csv``: one per reconstructed unit (and phase)."""
    rows = []
    for entry in report["steps"]:
        if entry["phase"] == "calibrate":
            continue
        iters = entry["iters"]
        rows.append(
            {
                "unit": entry["unit"],
                "kind": entry["kind"],
                "type": entry["type"],
                "phase": entry["phase"],
                "loss_before": entry["loss_before"],
                "loss_after": entry["loss_after"],
                "iters": iters,
                "seconds": entry["seconds"],
                "seconds_per_iter": entry["train_seconds"] / iters if iters else math.nan,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Entry point with artifacts
# ---------------------------------------------------------------------------------------------
def run_key(unet_hash: str, calib_hash: str, quant_config: QuantConfig, recon_config: ReconConfig) -> str:
    """Checkpoint key: changes with any config value, the calibration data or the model weights."""
    text = repr(
        (SCHEMA_VERSION, sorted(as_dict(quant_config).items()), sorted(as_dict(recon_config).items()))
    )
    return hashlib.sha256(f"{text}|{unet_hash}|{calib_hash}".encode()).hexdigest()[:20]


def run_reconstruction(
    unet: nn.Module,
    calib: CalibrationData,
    quant_config: QuantConfig,
    recon_config: ReconConfig,
    out_dir: str | Path,
    work_dir: str | Path,
    device: torch.device | str,
    *,
    callback: StepCallback | None = None,
) -> dict[str, Any]:
    """Quantize ``unet`` in place, reconstruct it, write ``out_dir``; return the report.

    ``out_dir`` (written atomically once every step is done): ``state.safetensors`` (integer
    weights, scales, zero-points, bits, activation steps), ``manifest.json`` (configs, units,
    layers, bit-widths, hashes, schema version), ``report.json`` (per unit: losses before /
    after, per-layer losses, iterations, seconds; totals). ``work_dir`` holds the per-step
    checkpoints of an unfinished run (a rerun with the same configs, data and model resumes
    from them) and is removed at the end. On return ``unet`` is the final fake-quant model.
    """
    device = torch.device(device)
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    weights_hash = model_hash(unet)
    data_hash = calibration_hash(calib)
    key = run_key(weights_hash, data_hash, quant_config, recon_config)
    store = CheckpointStore(work_dir, key)
    logger.info("reconstruction %s (method %s), checkpoints in %s", key, recon_config.method, store.path)

    # reconstruction runs in float32, as the official code (AdaRound and the steps learn in it)
    if unet.dtype != torch.float32:
        unet.to(dtype=torch.float32)
    unet.to(device).eval()
    model = quantize_model(
        unet, quant_config, example_inputs=calib.model_inputs(slice(0, 1), device), inplace=True
    )
    report = reconstruct(model, calib, recon_config, device, store=store, callback=callback)
    report["run_key"] = key

    manifest = build_manifest(model, recon_config, weights_hash, data_hash, key)
    with atomic_output(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_quant_state(model, tmp / "state.safetensors")
        write_json(tmp / "manifest.json", manifest)
        write_json(tmp / "report.json", report)
    shutil.rmtree(work_dir, ignore_errors=True)
    return report
