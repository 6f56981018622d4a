"""Capturing and caching the inputs and outputs of reconstruction units (docs/method.md §3).

A unit (a block, or a single layer) learns on its cached inputs and float targets. The caches
are filled from the calibration set by passes in batches of ``recon.cache_batch_size``, each
stopped as soon as the units it is for have run, and kept on the CPU:
- float passes (all quantization off): the float input x, the targets B_fp(x) and, for FBR,
  the float layer outputs O_l^fp(x). The float path never changes, so one pass fills the
  caches of as many upcoming units as ``recon.cache_mb`` allows (``FloatCaches``); layer
  outputs that would not fit are recomputed at each iteration instead;
- a quantized pass per unit (every earlier unit already reconstructed): the quantized-path
  input.
Every positional / keyword input of the unit is cached (pre-hooks with kwargs): for a
ResnetBlock2D that is (hidden_states, temb), for an attention block also temb or
encoder_hidden_states (``UnitInputs``).

Data-parallel (``dist``, see ``edadm.recon.data_parallel``): each rank runs the quantized
passes on its shard of the calibration set and the captures are gathered, so that every rank
holds the caches of the whole set in calibration order (the learning batches draw from all of
it); the float passes run whole on every rank (``FloatCaches``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edadm.calib.calibration_set import CalibrationSet
from edadm.distributed import Dist, all_gather_rows
from edadm.quant.model import set_quant_state
from edadm.recon.config import ReconConfig
from edadm.recon.data_parallel import sample_shard, shard_sizes
from edadm.recon.plan import Step

CACHE_DEVICE = torch.device("cpu")  # unit caches live on the host; batches move to the device


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

    def signature(self) -> tuple:
        """Which inputs are batched (the same on every rank, or the ranks' captures cannot be joined)."""
        return tuple(self.batched_args), tuple(sorted(self.batched_kwargs.items()))

    def map_batched(self, function: Callable[[torch.Tensor], torch.Tensor], size: int) -> UnitInputs:
        """A copy with ``function`` applied to every batched input, now of ``size`` samples."""
        mapped = copy.copy(self)
        mapped.args = [function(v) if b else v for v, b in zip(self.args, self.batched_args, strict=True)]
        mapped.kwargs = {k: function(v) if self.batched_kwargs[k] else v for k, v in self.kwargs.items()}
        mapped.size = size
        return mapped

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

    def with_main(self, args: list[Any], kwargs: dict[str, Any], value: torch.Tensor) -> tuple[list, dict]:
        """``args`` / ``kwargs`` with the main input replaced by ``value``."""
        key, _ = self.main_input(args, kwargs)
        if isinstance(key, int):
            return [value, *args[1:]], kwargs
        return args, {**kwargs, key: value}


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


class _StopForward(Exception):
    """Raised by a hook once every target is captured: the rest of the forward is not needed."""


@torch.no_grad()
def capture_units(
    model: nn.Module,
    targets: Sequence[CaptureTarget],
    calib: CalibrationSet,
    batch_size: int,
    device: torch.device,
    *,
    weights: bool,
    activations: bool,
    dist: Dist | None = None,
) -> list[Captured]:
    """Run ``model`` over the calibration set with the given quant state; capture the targets.

    Each batch stops as soon as every target is captured (right before a unit whose output
    is not needed, right after one whose output is). Returns one ``Captured`` per target.
    ``dist`` (several ranks): each rank runs its ``sample_shard`` of the set; every rank
    returns the captures of the whole set.
    """
    dist = dist or Dist()
    if not dist.active:
        return _capture(model, targets, calib, batch_size, device, weights=weights, activations=activations)
    shard = sample_shard(dist, len(calib), batch_size)
    captured = _capture(
        model, targets, calib.subset(shard), batch_size, device, weights=weights, activations=activations
    )
    rows = shard_sizes(dist, len(calib), batch_size)
    return [_gather(c, dist, rows, device) for c in captured]


def _gather(captured: Captured, dist: Dist, rows: list[int], device: torch.device) -> Captured:
    """Every rank's ``captured`` (its shard of the samples) joined in rank order, on every rank."""
    signature = (captured.inputs.signature(), captured.output is None, len(captured.layer_outputs or []))
    expected = dist.broadcast(signature)
    if signature != expected:
        raise RuntimeError(
            f"rank {dist.rank} captured (batched inputs, no output, layer outputs) {signature}, rank 0 "
            f"{expected}: a non-batch input whose first dim equals a rank's sample count looks batched "
            "there; change recon.cache_batch_size or dist.nproc_per_node"
        )

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        # over the rank's device: NCCL gathers GPU tensors only
        return all_gather_rows(dist, tensor.to(device), rows).to(CACHE_DEVICE)

    return Captured(
        captured.inputs.map_batched(gather, sum(rows)),
        None if captured.output is None else gather(captured.output),
        None if captured.layer_outputs is None else [gather(t) for t in captured.layer_outputs],
    )


def _capture(
    model: nn.Module,
    targets: Sequence[CaptureTarget],
    calib: CalibrationSet,
    batch_size: int,
    device: torch.device,
    *,
    weights: bool,
    activations: bool,
) -> list[Captured]:
    """``capture_units`` in one process, on all of ``calib``."""
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
    t: torch.Tensor | None = None  # [N] each sample's timestep (its group's ranges; see timestep_groups)

    def __len__(self) -> int:
        return self.fp_outputs.shape[0]


class FloatCaches:
    """Float-path caches of upcoming unit steps, filled a group at a time within ``recon.cache_mb``.

    The float path does not change while the quantized one is reconstructed, so one float
    pass can capture several consecutive units (their inputs, outputs and, for FBR, the
    float layer outputs). A unit whose layer outputs alone would overflow the budget gets
    them recomputed at each iteration instead. Which caches a step gets depends only on the
    step and the budget, not on where a run starts: a resumed run caches the same.

    Data-parallel runs fill them on every rank, not split: one float pass serves a whole group
    of units, and gathering its captures (every layer output of the group) would move more
    bytes than the pass costs to compute (``edadm.recon.data_parallel``). The budget holds
    for every rank.
    """

    def __init__(
        self, model: nn.Module, calib: CalibrationSet, config: ReconConfig, device: torch.device
    ) -> None:
        self.model, self.calib, self.config, self.device = model, calib, config, device
        self.modules = dict(model.named_modules())
        self.budget = config.cache_mb * 2**20
        self.caches: dict[str, Captured] = {}
        self.per_sample: dict[tuple[str, bool], int] = {}

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
            captured = self._capture(group, [self._keep_layers(s) for s in group], self.calib)
            self.caches.update({s.name: c for s, c in zip(group, captured, strict=True)})
        return self.caches.pop(name)

    def _capture(
        self, steps: Sequence[Step], layers: Sequence[bool], calib: CalibrationSet
    ) -> list[Captured]:
        targets = [
            CaptureTarget(
                self.modules[step.unit.name],
                output=True,
                layers=[self.modules[n] for n in step.unit.layers] if keep else (),
            )
            for step, keep in zip(steps, layers, strict=True)
        ]
        batch_size = self.config.cache_batch_size
        return capture_units(
            self.model, targets, calib, batch_size, self.device, weights=False, activations=False
        )

    def _keep_layers(self, step: Step) -> bool:
        return step.phase.layer_terms and self._bytes(step, True) <= self.budget

    def _bytes(self, step: Step, layers: bool) -> int:
        """Bytes of a step's float cache for the whole calibration set (probed on one sample)."""
        key = (step.unit.name, layers and step.phase.layer_terms)
        if key not in self.per_sample:
            (captured,) = self._capture([step], [key[1]], self.calib.subset(slice(0, 1)))
            self.per_sample[key] = captured.nbytes()
        return self.per_sample[key] * len(self.calib)
