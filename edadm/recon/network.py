"""Reconstruction of the quantized network, unit by unit in network order (docs/method.md §3).

Methods (``recon.method``):
- ``fbr`` (EDA-DM): blocks with L = L_b + gamma * L_m, single layers with their output loss;
  AdaRound alpha (Adam, lr_w) and activation steps (Adam, lr_a) learned jointly, both with
  cosine annealing to 0; QDrop on the block input and inside every activation quantizer.
  The official code has no rounding regulariser; ``recon.round_reg`` (ours, on in
  params.yaml) adds it, with ``round_weight``, ``b_range`` and ``warmup`` as in BRECQ, which
  closes the gap between the soft rounding learned and the final hard rounding when
  iterations are few (embedded default, W4A8, 200 iterations: full-model output MSE against
  float 6.4e-4 -> 4.8e-4; BRECQ 4.4e-4; range search only 2.0e-3).
- ``brecq`` (BRECQ / Q-Diffusion baseline): block-output loss only, AdaRound with its rounding
  regulariser (weight 0.01, b from 20 to 2 after a 20 % warm-up), weights first with
  activations off; then the activation ranges are initialised on the weight-quantized model
  and the activation steps learned in a second pass. No QDrop. ``recon.brecq_optimizer``:
  FBR's rates and schedules (shared) or Q-Diffusion's own (qdiffusion, official).
- ``layer``: every layer its own unit, learned as in ``fbr`` with the output loss only
  (AdaRound + steps jointly, QDrop, the regulariser with ``round_reg``); the attention
  products' quantizers keep their initial ranges.
- ``none``: range search only (weights round to nearest).

The parts, one module each: ``caching`` (the units' cached inputs and float targets),
``block_reconstruction`` (``Phase``, learning one unit), ``losses``, ``qdrop``. This module
plans the steps of a method, runs them with checkpoints and writes the artifacts.

The artifacts hold only what their content determines: ``report.json`` has losses and
iterations, never seconds; the timings come back apart (``ReconResult.timings``), for a
metrics file outside the DVC outs.

Resumable: ``run_reconstruction`` checkpoints every finished step under ``work_dir`` (keyed by
a hash of the configs, the calibration data and the model weights), with its report entry and
its timing. Random batches and QDrop masks come from a generator seeded per step from
``recon.seed``, so a resumed run writes the same bytes as an uninterrupted one.

Data-parallel under torchrun (``dist``; ``edadm.recon.data_parallel`` says what is split and
how): every rank runs every step on its share of the work and holds the same state after it;
rank 0 initialises the activation ranges (and broadcasts them), writes the checkpoints and the
artifacts. The result does not depend on the number of ranks (up to floating-point summation
order), so neither the run key nor the artifacts record it; a run resumes on any number.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from edadm.calib.calibration_set import CalibrationSet
from edadm.distributed import Dist
from edadm.quant.model import calibrate_activations, quant_info, set_quant_state
from edadm.quant.state import load_quant_state, quant_state_dict
from edadm.recon.artifact import CheckpointStore
from edadm.recon.caching import CaptureTarget, FloatCaches, UnitCache, capture_units
from edadm.recon.config import ReconConfig
from edadm.recon.data_parallel import check_world
from edadm.recon.plan import Step, plan_steps, step_seed
from edadm.recon.unit import evaluate_unit, reconstruct_unit

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: a step's record holds {"report": entry, "timing": seconds}

StepCallback = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class ReconResult:
    """What a reconstruction returns: the report (an artifact) and the timings (not one).

    ``report``: ``{"method", "steps": [entry per step], "totals"[, "run_key"]}`` (``build_report``).
    ``timings``: ``{"seconds", "steps_resumed", "steps": {step: {"seconds", "cache_seconds",
    "train_seconds", "resumed"}}}``: wall-clock seconds of this run, and of every step (a
    resumed step's from the run that did it).
    """

    report: dict[str, Any]
    timings: dict[str, Any]

    def timing_totals(self) -> dict[str, Any]:
        """The run's seconds in a few figures (the stage's metrics file; per step is for bench/).

        ``seconds`` (this run, wall clock), ``calibrate_seconds``, ``cache_seconds`` and
        ``train_seconds`` (summed over steps, a resumed step's from the run that did it),
        ``steps_resumed``.
        """
        steps = self.timings["steps"]
        calibrate = sum(t["seconds"] for name, t in steps.items() if name.startswith("calibrate"))
        return {
            "seconds": self.timings["seconds"],
            "calibrate_seconds": round(calibrate, 3),
            "cache_seconds": round(sum(t.get("cache_seconds", 0.0) for t in steps.values()), 3),
            "train_seconds": round(sum(t.get("train_seconds", 0.0) for t in steps.values()), 3),
            "steps_resumed": self.timings["steps_resumed"],
        }


# ---------------------------------------------------------------------------------------------
# Running the steps
# ---------------------------------------------------------------------------------------------
def reconstruct(
    model: nn.Module,
    calib: CalibrationSet,
    config: ReconConfig,
    device: torch.device | str,
    *,
    store: CheckpointStore | None = None,
    callback: StepCallback | None = None,
    dist: Dist | None = None,
) -> ReconResult:
    """Reconstruct a quantized model (``quantize_model``) in place; returns report and timings.

    ``store`` checkpoints every finished step and skips the steps it already holds;
    ``callback(step_name, entry)`` runs after each step is checkpointed (on every rank).
    ``dist``: this rank of a data-parallel run (None: one process); rank 0 saves the checkpoints.
    """
    dist = dist or Dist()
    device = torch.device(device)
    model.to(device).eval().requires_grad_(False)
    info = quant_info(model)
    if info.timestep_groups is not None:
        info.timestep_groups.check_covers(calib.t)  # before anything costly
    check_world(dist, len(calib), config.batch_size)
    lrs = config.learning_rates(info.config.w_bits)
    modules = dict(model.named_modules())
    steps = plan_steps(model, config)
    finished = store.finished([s.name for s in steps]) if store and dist.is_main else []
    if dist.active:
        finished = dist.broadcast(finished)  # rank 0's reading: the others load the same files
    float_caches = FloatCaches(model, calib, config, device)
    entries: list[dict[str, Any]] = []
    timings: dict[str, dict[str, Any]] = {}
    progress = tqdm(steps, desc=f"reconstruct ({config.method})", unit="unit", disable=not dist.is_main)
    for i, step in enumerate(progress):
        progress.set_postfix_str(step.name[-40:])
        if i < len(finished):
            record = finished[i]["entry"]
            load_quant_state(model, store.load(finished[i]), strict=False)
            entries.append(record["report"])
            timings[step.name] = {**record["timing"], "resumed": True}
            continue
        tick = time.perf_counter()
        if step.kind == "calibrate":
            state = _calibrate_step(model, calib, config, device, dist)
            entry, timing = {"step": step.name, "phase": "calibrate"}, {}
        else:
            entry, timing = _reconstruct_step(
                model, modules, steps, i, float_caches, calib, config, lrs, device, dist
            )
            state = quant_state_dict(modules[step.unit.name], prefix=step.unit.name)
        timing = {"seconds": round(time.perf_counter() - tick, 3), **timing}
        entries.append(entry)
        timings[step.name] = {**timing, "resumed": False}
        if store is not None and dist.is_main:
            store.save(step.name, state, {"report": entry, "timing": timing})
        if callback is not None:
            callback(step.name, entry)
    set_quant_state(model, weights=True, activations=True)
    return ReconResult(build_report(config, entries), {"steps_resumed": len(finished), "steps": timings})


def _calibrate_step(
    model: nn.Module, calib: CalibrationSet, config: ReconConfig, device: torch.device, dist: Dist
) -> dict[str, torch.Tensor]:
    """Initialise every activation range (docs/method.md §0); returns them (the step's checkpoint).

    Not data-parallel: each batch's range search needs all of its activations and the EMA chains
    the batches (``edadm.recon.data_parallel``), so rank 0 runs it and broadcasts the ranges.
    """
    if dist.is_main:
        calibrate_activations(model, calib.batches(config.init_batch_size, device))
        state = quant_state_dict(model, activations_only=True)
    else:
        state = None
    if dist.active:
        state = dist.broadcast(state)
        if not dist.is_main:
            load_quant_state(model, state, strict=False)
    return state


def _reconstruct_step(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    steps: Sequence[Step],
    i: int,
    float_caches: FloatCaches,
    calib: CalibrationSet,
    config: ReconConfig,
    lrs: tuple[float, float],
    device: torch.device,
    dist: Dist,
) -> tuple[dict[str, Any], dict[str, float]]:
    """One unit's step: its report entry and its timing (cache and train seconds)."""
    step = steps[i]
    unit, phase = step.unit, step.phase
    unit_module = modules[unit.name]
    layers = [modules[name] for name in unit.layers]
    tick = time.perf_counter()
    # 1. caches: float path (inputs x, targets B_fp(x)), quantized path (inputs of the quantized network)
    float_cache = float_caches.take(steps, i)
    (quantized,) = capture_units(
        model,
        [CaptureTarget(unit_module, output=False)],
        calib,
        config.cache_batch_size,
        device,
        weights=True,
        activations=phase.act_quant,
        dist=dist,
    )
    # caches hold the samples in calibration order: sample i's timestep is calib.t[i]
    cache = UnitCache(
        float_cache.inputs, quantized.inputs, float_cache.output, float_cache.layer_outputs, calib.t
    )
    cache_seconds = time.perf_counter() - tick

    # 2. losses before, learning, losses after
    def evaluate() -> tuple[float, list[float]]:
        return evaluate_unit(
            unit_module,
            layers,
            cache,
            phase.act_quant,
            config.cache_batch_size,
            config.eval_samples,
            device,
            dist,
        )

    before, layers_before = evaluate()
    tick = time.perf_counter()
    seed = step_seed(config.seed, step.name)
    iters = reconstruct_unit(
        unit_module, layers, cache, phase, config, lrs, seed, device, dist, hard_round=False
    )
    train_seconds = time.perf_counter() - tick
    rounding = _rounding_diagnostics(layers, evaluate) if iters and phase.learn_weights else None
    for layer in layers:
        layer.finish_adaround()
    after, layers_after = evaluate() if iters else (before, layers_before)
    logger.info("%s: loss %.4g -> %.4g (%d iters, %.1f s)", step.name, before, after, iters, train_seconds)
    entry = {
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
        "float_layer_targets_cached": float_cache.layer_outputs is not None,
    }
    if rounding is not None:
        entry["rounding"] = {**rounding, "loss_hard": after}
    return entry, {"cache_seconds": round(cache_seconds, 3), "train_seconds": round(train_seconds, 3)}


def _rounding_diagnostics(
    layers: Sequence[nn.Module], evaluate: Callable[[], tuple[float, list[float]]]
) -> dict[str, float] | None:
    """How far AdaRound's soft rounding had committed when learning ended, before hard rounding.

    ``undecided_share``: the share of weights whose h(alpha) lies strictly inside (0.01, 0.99);
    ``loss_soft``: the unit's block-output loss with the soft rounding (the report's
    ``loss_after`` is with the hard one). A large share and a hard loss far above the soft one
    say the rounding learned is not the rounding deployed (the regulariser's job).
    """
    counts = [layer.adaround.undecided() for layer in layers if layer.adaround is not None]
    if not counts:
        return None
    undecided, total = (sum(c) for c in zip(*counts, strict=True))
    loss_soft, _ = evaluate()
    return {"undecided_share": undecided / total, "loss_soft": loss_soft}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def build_report(config: ReconConfig, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"method", "steps": [entry per step], "totals"}``: nothing a rerun would change.

    A unit entry holds ``loss_before`` / ``loss_after`` (block-output lp on the first
    ``recon.eval_samples`` samples, pure quantized-path input), ``layer_losses_before`` /
    ``_after`` (every layer's lp), ``iters`` and ``float_layer_targets_cached``, and where the
    rounding was learned ``rounding`` (``undecided_share``, ``loss_soft``, ``loss_hard``:
    ``_rounding_diagnostics``). Totals count steps and iterations, and sum the losses of the
    last phase's units (for brecq the activation pass); with rounding diagnostics, the soft
    loss summed and the undecided share averaged over the units that learned rounding.
    """
    units = [e for e in entries if e["phase"] != "calibrate"]
    final_phase = units[-1]["phase"] if units else None
    final = [e for e in units if e["phase"] == final_phase]
    totals = {
        "method": config.method,
        "units": len(final),
        "steps": len(entries),
        "iters": sum(e["iters"] for e in units),
        "loss_before": sum(e["loss_before"] for e in final),
        "loss_after": sum(e["loss_after"] for e in final),
    }
    rounded = [e["rounding"] for e in units if "rounding" in e]
    if rounded:
        totals["rounding"] = {
            "units": len(rounded),
            "undecided_share_mean": sum(r["undecided_share"] for r in rounded) / len(rounded),
            "loss_soft": sum(r["loss_soft"] for r in rounded),
            "loss_hard": sum(r["loss_hard"] for r in rounded),
        }
    return {"method": config.method, "steps": entries, "totals": totals}


def report_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flat rows for ``plots/recon.csv``: one per reconstructed unit (and phase)."""
    columns = ("unit", "kind", "type", "phase", "loss_before", "loss_after", "iters")
    return [{c: entry[c] for c in columns} for entry in report["steps"] if entry["phase"] != "calibrate"]


# ---------------------------------------------------------------------------------------------
# Entry point with artifacts
# ---------------------------------------------------------------------------------------------
