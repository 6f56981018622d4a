"""``edadm.quantize``: a float denoiser and a calibration set in, the reconstructed model out.

The in-memory entry point (as torchao's ``quantize_(model, config)`` or ModelOpt's
``mtq.quantize``): ``quantize`` builds the quantized model (``edadm.quant.model``) and
reconstructs it (``edadm.recon.network``); ``save_reconstruction`` writes the reconstruct
stage's artifact; ``run_reconstruction`` is the two, which the stage runs. The recipe of a
run (configs, hashes, run key, report, timings) travels with the model (``reconstruction_of``),
so ``save_reconstruction`` needs nothing else.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edadm.artifacts import atomic_output, write_json
from edadm.calib.calibration_set import CalibrationSet
from edadm.config import as_dict, from_dict
from edadm.diffusion.loading import model_hash
from edadm.distributed import Dist
from edadm.quant.config import QuantConfig
from edadm.quant.model import quantize_model
from edadm.quant.state import SCHEMA_VERSION, save_quant_state
from edadm.quant.timestep_groups import sampler_timesteps
from edadm.recon.artifact import CheckpointStore, build_manifest, calibration_hash
from edadm.recon.config import ReconConfig
from edadm.recon.network import CHECKPOINT_FORMAT, ReconResult, StepCallback, reconstruct

logger = logging.getLogger(__name__)

RECONSTRUCTION_ATTR = "_edadm_reconstruction"  # the Reconstruction of a model quantize returned


@dataclass(frozen=True)
class Reconstruction:
    """What ``quantize`` did to a model: its configs, what it was made from, the result."""

    quant: QuantConfig
    recon: ReconConfig
    model_hash: str  # of the float weights
    calibration_hash: str
    run_key: str
    result: ReconResult


def _config(cls: type, value: Any, section: str) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return from_dict(cls, value, section)
    raise TypeError(f"{section} must be a {cls.__name__} or a mapping of params.yaml {section} keys")


def run_key(
    unet_hash: str,
    calib_hash: str,
    quant_config: QuantConfig,
    recon_config: ReconConfig,
    timesteps: Sequence[float] | None = None,
) -> str:
    """Checkpoint key: changes with any config value, the calibration data or the model weights
    (and the sampler's timesteps, when they define timestep groups)."""
    key = (
        SCHEMA_VERSION,
        CHECKPOINT_FORMAT,
        sorted(as_dict(quant_config).items()),
        sorted(as_dict(recon_config).items()),
    )
    text = repr(key if timesteps is None else (*key, [float(t) for t in timesteps]))
    return hashlib.sha256(f"{text}|{unet_hash}|{calib_hash}".encode()).hexdigest()[:20]


def quantize(
    denoiser: nn.Module,
    calibration: CalibrationSet,
    quant: QuantConfig | Mapping[str, Any] | None = None,
    recon: ReconConfig | Mapping[str, Any] | None = None,
    *,
    device: torch.device | str = "cpu",
    checkpoints: str | Path | None = None,
    timesteps: Sequence[float] | None = None,
    callback: StepCallback | None = None,
    dist: Dist | None = None,
) -> nn.Module:
    """Quantize ``denoiser`` in place and reconstruct it; return the fake-quant model.

    Args:
        denoiser: a diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``), float weights.
        calibration: the calibration set (``edadm.calib.store.load_calibration``, or one built
            in memory as ``CalibrationSet``).
        quant / recon: ``QuantConfig`` / ``ReconConfig``, or mappings of the keys of
            params.yaml's ``quant`` / ``recon`` sections (missing keys take their defaults).
        device: where reconstruction runs.
        checkpoints: a directory for per-step checkpoints: a rerun with the same configs, data
            and weights resumes from them (None: none kept).
        timesteps: the sampler's, in step order, for ``quant.act_timestep_groups`` > 1 (default:
            those of the dump the calibration set was drawn from).
        callback: ``callback(step_name, report_entry)`` after each step.
        dist: this rank of a data-parallel run under torchrun (None: one process).

    Returns:
        The same module, now quantized (weight and activation quantization on, eval mode), on
        ``device``; ``reconstruction_of(model)`` gives its report and timings.
    """
    if not isinstance(calibration, CalibrationSet):
        kind = type(calibration).__name__
        raise TypeError(f"calibration must be a CalibrationSet (edadm.calib.calibration_set), got {kind}")
    quant_config = _config(QuantConfig, quant, "quant")
    recon_config = _config(ReconConfig, recon, "recon")
    start = time.perf_counter()
    device = torch.device(device)
    weights_hash = model_hash(denoiser)
    data_hash = calibration_hash(calibration)
    grouped = quant_config.act_timestep_groups > 1
    if grouped and timesteps is None:
        timesteps = sampler_timesteps(calibration)
    key = run_key(weights_hash, data_hash, quant_config, recon_config, timesteps if grouped else None)
    store = CheckpointStore(checkpoints, key) if checkpoints is not None else None
    logger.info("reconstruction %s (method %s)", key, recon_config.method)

    # reconstruction runs in float32, as the official code (AdaRound and the steps learn in it)
    if denoiser.dtype != torch.float32:
        denoiser.to(dtype=torch.float32)
    denoiser.to(device).eval()
    model = quantize_model(
        denoiser,
        quant_config,
        example_inputs=calibration.model_inputs(slice(0, 1), device),
        inplace=True,
        timesteps=timesteps,
    )
    result = reconstruct(model, calibration, recon_config, device, store=store, callback=callback, dist=dist)
    report = {**result.report, "run_key": key}
    timings = {"seconds": round(time.perf_counter() - start, 3), **result.timings}
    setattr(
        model,
        RECONSTRUCTION_ATTR,
        Reconstruction(
            quant_config, recon_config, weights_hash, data_hash, key, ReconResult(report, timings)
        ),
    )
    return model


def reconstruction_of(model: nn.Module) -> Reconstruction:
    """The ``Reconstruction`` of a model ``quantize`` returned."""
    found = getattr(model, RECONSTRUCTION_ATTR, None)
    if found is None:
        raise ValueError("this model was not made by edadm.quantize (it has no reconstruction record)")
    return found


def save_reconstruction(model: nn.Module, out_dir: str | Path, dist: Dist | None = None) -> ReconResult:
    """Write the reconstruct artifact of a ``quantize``d model to ``out_dir``, atomically.

    ``state.safetensors`` (integer weights, scales, zero-points, bits, activation steps),
    ``manifest.json`` (configs, units, layers, bit-widths, hashes, schema version),
    ``report.json`` (per unit: losses before / after, per-layer losses, iterations; totals).
    No timings, dates or paths: the same inputs give the same bytes, resumed or not. Under
    torchrun rank 0 writes and every rank returns once it is written. Returns the run's
    report and timings.
    """
    dist = dist or Dist()
    made = reconstruction_of(model)
    if dist.is_main:
        manifest = build_manifest(model, made.recon, made.model_hash, made.calibration_hash, made.run_key)
        with atomic_output(out_dir) as tmp:
            tmp.mkdir(parents=True)
            save_quant_state(model, tmp / "state.safetensors")
            write_json(tmp / "manifest.json", manifest)
            write_json(tmp / "report.json", made.result.report)
    dist.barrier()  # the artifacts exist when any rank returns
    return made.result


def run_reconstruction(
    unet: nn.Module,
    calib: CalibrationSet,
    quant_config: QuantConfig,
    recon_config: ReconConfig,
    out_dir: str | Path,
    work_dir: str | Path,
    device: torch.device | str,
    *,
    callback: StepCallback | None = None,
    timesteps: Sequence[float] | None = None,
    dist: Dist | None = None,
) -> ReconResult:
    """``quantize`` with checkpoints in ``work_dir``, then ``save_reconstruction`` to ``out_dir``.

    ``work_dir`` holds the per-step checkpoints of an unfinished run (a rerun with the same
    configs, data and model resumes from them) and is removed at the end; it must be one
    directory for all ranks (one node, or a shared file system). On return ``unet`` is the
    final fake-quant model. Every rank returns the same report.
    """
    dist = dist or Dist()
    model = quantize(
        unet,
        calib,
        quant_config,
        recon_config,
        device=device,
        checkpoints=work_dir,
        timesteps=timesteps,
        callback=callback,
        dist=dist,
    )
    result = save_reconstruction(model, out_dir, dist)
    if dist.is_main:
        shutil.rmtree(work_dir, ignore_errors=True)
    dist.barrier()
    return result
