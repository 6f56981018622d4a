"""Reconstruction of one unit (a block, or a single layer) on its cache (docs/method.md §3).

``reconstruct_unit`` learns what its ``Phase`` (``edadm.recon.plan``) says, ``evaluate_unit``
measures the losses the report holds.

The quantized pass feeds the unit all of its quantized-path inputs. QDrop mixes only the
main input, x~ = where(rand < p, x, quantized-path input); the other inputs (temb, which the
quantized time-embedding layers produce) come from the quantized path unmixed, as in the
official code, so the unit learns to work with the temb the quantized network will really
give it. encoder_hidden_states is the same in both paths (the text encoder stays in float).

Data-parallel (``dist``, see ``edadm.recon.data_parallel``): each rank learns on its part of
every batch and the gradients are summed over the ranks before each step; the evaluation
batches are shared out. One process (``dist`` None) runs as without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from edadm.distributed import Dist
from edadm.quant.adaround import LinearTempDecay
from edadm.quant.layers import QuantLayer
from edadm.quant.model import act_quantizers, set_quant_state
from edadm.quant.quantizer import SCALE_EPS
from edadm.quant.timestep_groups import timestep_groups
from edadm.recon.caching import UnitCache
from edadm.recon.config import ReconConfig
from edadm.recon.data_parallel import batch_shard, split, sum_gradients, sum_in_order
from edadm.recon.losses import fbr_loss, lp_loss
from edadm.recon.plan import Phase
from edadm.recon.qdrop import QDrop


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


def _run_quantized(
    unit_module: nn.Module, cache: UnitCache, index: torch.Tensor, args: list[Any], kwargs: dict[str, Any]
) -> torch.Tensor:
    """The unit's quantized pass on the samples ``index``, each with its timestep group's ranges."""
    with timestep_groups(unit_module, None if cache.t is None else cache.t[index]):
        return _run_unit(unit_module, args, kwargs)


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
    dist: Dist | None = None,
) -> tuple[float, list[float]]:
    """Block-output loss L_b and every layer's lp loss on the first ``samples`` cached samples.

    The quantized unit runs on the pure quantized-path input (no QDrop) against float targets.
    ``dist``: each rank evaluates a share of the batches; all get the one-process values.
    """
    dist = dist or Dist()
    recorder = _OutputRecorder(layers)
    count = min(samples, len(cache))
    starts = range(0, count, batch_size)
    # per batch: n * L_b, then n * lp of every layer (a rank fills its own batches)
    sums = [[0.0] * (1 + len(layers)) for _ in starts]
    try:
        for j in range(len(starts))[split(len(starts), dist.world_size, dist.rank)]:
            index = torch.arange(starts[j], min(starts[j] + batch_size, count))
            fp_args, fp_kwargs = cache.fp_inputs.select(index, device)
            layers_fp = _float_layer_outputs(unit_module, cache, recorder, index, fp_args, fp_kwargs, device)
            set_quant_state(unit_module, True, act_quant)
            out_q = _run_quantized(unit_module, cache, index, *cache.q_inputs.select(index, device))
            layers_q = recorder.take()
            n = len(index)
            sums[j][0] = float(lp_loss(out_q, cache.fp_outputs[index].to(device))) * n
            for i, (q, f) in enumerate(zip(layers_q, layers_fp, strict=True)):
                sums[j][1 + i] = float(lp_loss(q, f)) * n
    finally:
        recorder.remove()
    sums = sum_in_order(dist, sums, device)
    # added batch after batch, as one process adds them
    totals = [0.0] * (1 + len(layers))
    for row in sums:
        for i, value in enumerate(row):
            totals[i] += value
    return totals[0] / count, [v / count for v in totals[1:]]


def reconstruct_unit(
    unit_module: nn.Module,
    layers: Sequence[QuantLayer],
    cache: UnitCache,
    phase: Phase,
    config: ReconConfig,
    lrs: tuple[float, float],
    seed: int,
    device: torch.device,
    dist: Dist | None = None,
    hard_round: bool = True,
) -> int:
    """Learn the unit's rounding and / or activation steps on its cache; returns the iterations run.

    ``lrs`` = (lr_w, lr_a); ``seed`` draws the batches and the QDrop masks. Ends with hard
    rounding written to the layers' integer weights (``hard_round`` False: the layers keep their
    soft rounding, for the caller to measure, then call ``finish_adaround``). ``dist``: every
    rank draws the same batches and learns on its part of each (``edadm.recon.data_parallel``);
    the gradients are summed over the ranks, so all ranks end with the same state.
    """
    dist = dist or Dist()
    lr_w = lrs[0] if phase.lr_w is None else phase.lr_w
    lr_a = lrs[1] if phase.lr_a is None else phase.lr_a
    if config.iters == 0:
        return 0
    adarounds = [layer.start_adaround() for layer in layers if phase.learn_weights and layer.weight_quantizer]
    scales = [q.scale for q in act_quantizers(unit_module)] if phase.learn_acts else []
    if not adarounds and not scales:
        return 0
    iters = config.iters
    batch = min(config.batch_size, len(cache))
    part = batch_shard(dist, batch)  # this rank's samples of every batch: all of it in one process
    cpu_generator = torch.Generator().manual_seed(seed)
    qdrop = (
        QDrop(
            phase.qdrop_prob,
            torch.Generator(device).manual_seed(seed),
            (batch, part.start, part.stop) if dist.active else None,
        )
        if phase.qdrop_prob > 0
        else None
    )
    # QDrop inside the activation quantizers only where they quantize
    dropping = act_quantizers(unit_module) if qdrop is not None and phase.act_quant else []
    for scale in scales:
        scale.requires_grad_(True)

    optimizers, schedulers = [], []
    for params, lr, anneal in (
        ([a.alpha for a in adarounds], lr_w, phase.anneal_weights),
        (scales, lr_a, True),
    ):
        if params:
            optimizer = torch.optim.Adam(params, lr=lr)
            optimizers.append(optimizer)
            if anneal:
                schedulers.append(
                    torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iters, eta_min=0.0)
                )
    temperature = LinearTempDecay(iters, config.warmup, *config.b_range)
    recorder = _OutputRecorder(layers) if phase.layer_terms else None
    learned = [a.alpha for a in adarounds] + scales
    progress = tqdm(
        range(1, iters + 1),
        desc="iterations",
        unit="it",
        leave=False,
        mininterval=2,
        disable=not dist.is_main,
    )
    try:
        with qdrop.installed(dropping) if qdrop is not None else contextlib.nullcontext():
            for step in progress:
                # 1. a random batch (without replacement) of cached inputs and float targets
                #    (the same on every rank, which takes its part of it)
                index = torch.randperm(len(cache), generator=cpu_generator)[:batch][part]
                fp_args, fp_kwargs = cache.fp_inputs.select(index, device)
                q_args, q_kwargs = cache.q_inputs.select(index, device)
                target = cache.fp_outputs[index].to(device)
                # 2. QDrop on the main input: x~ = where(rand < p, float input, quantized-path input)
                if qdrop is not None:
                    _, x_fp = cache.fp_inputs.main_input(fp_args, fp_kwargs)
                    _, x_q = cache.q_inputs.main_input(q_args, q_kwargs)
                    q_args, q_kwargs = cache.q_inputs.with_main(q_args, q_kwargs, qdrop.mix(x_fp, x_q))
                # 3. float layer outputs O_l^fp(x) for L_m
                if recorder is not None:
                    layers_fp = _float_layer_outputs(
                        unit_module, cache, recorder, index, fp_args, fp_kwargs, device
                    )
                # 4. quantized pass on x~ and the loss: L_b + gamma * L_m (FBR) or L_b
                set_quant_state(unit_module, True, phase.act_quant)
                out_q = _run_quantized(unit_module, cache, index, q_args, q_kwargs)
                if recorder is not None:
                    loss = fbr_loss(out_q, target, recorder.take(), layers_fp, config.gamma)
                else:
                    loss = lp_loss(out_q, target, phase.lp)
                # 5. the AdaRound regulariser, after the warm-up, temperature b annealed
                if phase.round_reg and step >= config.warmup * iters:
                    b = temperature(step)
                    loss = loss + config.round_weight * sum(a.round_loss(b) for a in adarounds)
                # 6. Adam steps, cosine-annealed learning rates; over several ranks, each weighs its
                #    loss (a mean over its part) by its share of the batch and the gradients are
                #    summed: sum_r (n_r / B) grad L_r = grad L of the whole batch (the regulariser
                #    counts once: its weights n_r / B add up to 1)
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                if dist.active:
                    loss = loss * (len(index) / batch)
                loss.backward()
                sum_gradients(dist, learned)
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
        for scale in scales:
            scale.requires_grad_(False)
            scale.grad = None
        # 7. hard rounding: alpha >= 0 rounds up
        if hard_round:
            for layer in layers:
                layer.finish_adaround()
    return iters
