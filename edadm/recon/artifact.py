"""What a reconstruct run writes beside the state: its manifest, and checkpoints of an unfinished run.

The manifest (``manifest.json``) is what ``edadm inspect`` shows and ``load_quant_model``
(``edadm.quant.state``) needs to rebuild the model; the schema constants live there.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edadm.artifacts import atomic_output, write_json
from edadm.config import as_dict
from edadm.diffusion.loading import update_digest
from edadm.quant.attention import QuantAttnProcessor
from edadm.quant.model import describe_units, quant_info, quant_layers
from edadm.quant.state import SCHEMA, SCHEMA_VERSION, STAGE, timestep_groups_entry
from edadm.quant.units import conditioning
from edadm.recon.config import ReconConfig

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Hashes
# ---------------------------------------------------------------------------------------------
def calibration_hash(calib: Any) -> str:
    """sha256 of the calibration set's model inputs (x, t and any conditioning)."""
    digest = hashlib.sha256()
    for name in ("x", "t", "encoder_hidden_states", "class_labels"):
        value = getattr(calib, name)
        if value is not None:
            update_digest(digest, name, value)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------
def build_manifest(
    model: nn.Module, recon_config: ReconConfig, weights_hash: str, data_hash: str, run_key: str
) -> dict[str, Any]:
    """What ``edadm inspect`` shows and ``load_quant_model`` needs to rebuild the model."""
    info = quant_info(model)
    layers = quant_layers(model)
    float_bytes = quant_bytes = 0
    for layer in layers.values():
        numel, size = layer.weight.numel(), layer.weight.element_size()
        float_bytes += numel * size
        quant_bytes += numel * layer.w_bits / 8 if layer.w_bits else numel * size
    attention = {
        name: {
            "qkv_bits": m.processor.qkv_bits,
            "softmax_bits": m.processor.softmax_bits,
            # k, v from the text features (BasicTransformerBlock.attn2), quantized as self-attention's
            "cross_attention": bool(getattr(m, "is_cross_attention", False)),
        }
        for name, m in model.named_modules()
        if isinstance(getattr(m, "processor", None), QuantAttnProcessor)
    }
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "stage": STAGE,
        "model_class": type(model).__name__,
        "conditioning": conditioning(getattr(model, "config", {})),
        "model_hash": weights_hash,
        "calibration_hash": data_hash,
        "run_key": run_key,
        "quant": as_dict(info.config),
        "recon": as_dict(recon_config),
        "units": describe_units(model),
        "layers": {
            name: {"type": m.layer_type, "w_bits": m.w_bits, "a_bits": m.a_bits, "split": m.split}
            for name, m in layers.items()
        },
        "attention": attention,
        "unsupported": list(info.unsupported),
        "size": {"float_weight_bytes": float_bytes, "quantized_weight_bytes": int(quant_bytes)},
        "layout": info.layout.to_dict(),
        **timestep_groups_entry(model),
    }


# ---------------------------------------------------------------------------------------------
# Checkpoints of an unfinished run
# ---------------------------------------------------------------------------------------------
class CheckpointStore:
    """Per-step checkpoints under ``work_dir/key``: one safetensors file per step + progress.json.

    A step's file holds only the state that step changed (a unit's quantizers, or every
    activation range after a calibration). The key hashes configs, data and weights, so a
    checkpoint of another run is never picked up.
    """

    def __init__(self, work_dir: str | Path, key: str) -> None:
        self.key = key
        self.path = Path(work_dir) / key
        self.records: list[dict[str, Any]] = []

    @property
    def progress_path(self) -> Path:
        return self.path / "progress.json"

    def finished(self, step_names: list[str]) -> list[dict[str, Any]]:
        """The checkpointed steps, which must be the first steps of ``step_names`` in order."""
        self.records = []
        if not self.progress_path.exists():
            return []
        try:
            progress = json.loads(self.progress_path.read_text())
            records = progress["steps"] if progress.get("key") == self.key else []
        except (json.JSONDecodeError, KeyError, TypeError):
            records = []
        for i, record in enumerate(records):
            if (
                i >= len(step_names)
                or record.get("step") != step_names[i]
                or not (self.path / record["file"]).exists()
            ):
                logger.warning(
                    "checkpoint %s does not match this run from step %d: starting over", self.path, i
                )
                return []
            self.records.append(record)
        if self.records:
            logger.info(
                "resuming from %s: %d of %d steps done", self.path, len(self.records), len(step_names)
            )
        return list(self.records)

    def save(self, step_name: str, tensors: Mapping[str, torch.Tensor], entry: Mapping[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        file = f"step_{len(self.records):04d}.safetensors"
        with atomic_output(self.path / file) as tmp:
            save_file(dict(tensors), str(tmp))
        self.records.append({"step": step_name, "file": file, "entry": dict(entry)})
        write_json(self.progress_path, {"key": self.key, "steps": self.records})

    def load(self, record: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / record["file"]))
