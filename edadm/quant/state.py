"""The quantization state on disk: save / load, ``load_quant_model``.

``state.safetensors`` holds, per quantized layer, ``{layer}.weight_int`` (uint8 codes) and,
per quantizer (weights: ``{layer}.weight_quantizer[_0]``, activations:
``{layer}.act_quantizer[_0]``, ``{attention}.processor.act_quantizer_q/k/v/w``),
``{quantizer}.scale`` (float32; per output channel for weights, a scalar step for
activations), ``{quantizer}.zero_point`` (int32) and ``{quantizer}.bits`` (int32). With
``quant.act_timestep_groups`` G > 1 an activation's scale and zero_point are [G], and
``act_timestep_groups.boundaries`` (float64 [G - 1]) holds the timestep thresholds of the
groups (``edadm.quant.timestep_groups``). The float weights are not in it: they come from the
model directory, whose hash the manifest records.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from edadm.artifacts import read_json
from edadm.config import from_dict
from edadm.diffusion.loading import load_unet, model_hash
from edadm.errors import ArtifactError, ParamError
from edadm.quant.config import QuantConfig
from edadm.quant.layers import QuantLayer
from edadm.quant.model import INFO_ATTR, quant_info, quantize_model
from edadm.quant.quantizer import UniformAffineQuantizer
from edadm.quant.timestep_groups import BOUNDARIES_KEY, TimestepGroups
from edadm.quant.units import ModelLayout

logger = logging.getLogger(__name__)

SCHEMA = "edadm.quant"
# 2: quant.qkv_bits (q, k, v at the activation bits unless set), quant.split_conv1,
# quant.act_timestep_groups ([G] activation scales and the group boundaries)
SCHEMA_VERSION = 2
STAGE = "reconstruct"


# ---------------------------------------------------------------------------------------------
# State tensors
# ---------------------------------------------------------------------------------------------
def quant_state_dict(
    module: nn.Module, prefix: str = "", activations_only: bool = False
) -> dict[str, torch.Tensor]:
    """The quantization state of ``module`` (names prefixed by ``prefix``), CPU tensors.

    The timestep group boundaries come with a whole quantized model (not with a part of it).
    """
    state = {}
    groups = _timestep_groups(module)
    if groups is not None and groups.boundaries is not None:
        state[BOUNDARIES_KEY] = groups.boundaries.clone()
    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, QuantLayer) and m.weight_int is not None and not activations_only:
            state[f"{name}.weight_int"] = m.weight_int.detach().cpu().clone()
        elif isinstance(m, UniformAffineQuantizer):
            if activations_only and m.channel_axis is not None:
                continue
            state[f"{name}.scale"] = m.scale.detach().float().cpu().clone()
            state[f"{name}.zero_point"] = m.zero_point.detach().round().to(torch.int32).cpu()
            state[f"{name}.bits"] = torch.tensor(m.bits, dtype=torch.int32)
    return state


@torch.no_grad()
def load_quant_state(model: nn.Module, tensors: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Set integer weights and quantizer ranges from ``tensors`` (``quant_state_dict``'s format).

    ``strict``: every quantizer of ``model`` must be present, and nothing else.
    Raises KeyError / ValueError naming the tensors that do not fit.
    """
    modules = dict(model.named_modules())
    tensors = dict(tensors)
    boundaries = tensors.pop(BOUNDARIES_KEY, None)
    groups = _timestep_groups(model)
    if boundaries is not None:
        if groups is None:
            raise KeyError(
                f"the quant state has {BOUNDARIES_KEY} (timestep groups); the model has one set of "
                "activation ranges (quant.act_timestep_groups=1)"
            )
        groups.set_boundaries(boundaries)
    if strict:
        expected = set(quant_state_dict(model)) | ({BOUNDARIES_KEY} if groups is not None else set())
        given = set(tensors) | ({BOUNDARIES_KEY} if boundaries is not None else set())
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        if missing or unexpected:
            raise KeyError(
                f"quant state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    by_module: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        name, _, attr = key.rpartition(".")
        by_module[name][attr] = tensor
    for name, values in by_module.items():
        module = modules.get(name)
        if isinstance(module, QuantLayer) and set(values) == {"weight_int"}:
            if module.weight_int is None or module.weight_int.shape != values["weight_int"].shape:
                raise ValueError(f"{name}.weight_int does not fit the layer {tuple(module.weight.shape)}")
            module.weight_int.copy_(values["weight_int"])
        elif isinstance(module, UniformAffineQuantizer) and set(values) == {"scale", "zero_point", "bits"}:
            if int(values["bits"]) != module.bits:
                raise ValueError(
                    f"{name} has {module.bits} bits in the model, {int(values['bits'])} in the state"
                )
            if values["scale"].shape != module.scale.shape:
                raise ValueError(
                    f"{name}.scale is {tuple(values['scale'].shape)} in the state, "
                    f"{tuple(module.scale.shape)} in the model (quant.act_timestep_groups differs?)"
                )
            module.set_qparams(
                values["scale"].to(module.scale.device), values["zero_point"].to(module.scale.device).float()
            )
        else:
            raise KeyError(f"quant state entries {sorted(values)} for {name!r} fit no quantizer of the model")


def _timestep_groups(module: nn.Module) -> TimestepGroups | None:
    """The groups of a whole quantized model (None for a part of one, or one set of ranges)."""
    info = getattr(module, INFO_ATTR, None)
    return None if info is None else info.timestep_groups


def save_quant_state(model: nn.Module, path: str | Path) -> None:
    """Write the whole quantization state of ``model`` to a safetensors file."""
    metadata = {"schema": SCHEMA, "schema_version": str(SCHEMA_VERSION)}
    save_safetensors(quant_state_dict(model), path, metadata)


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]
) -> None:
    """``safetensors.torch.save_file``, with the same bytes for the same tensors and metadata.

    The library writes its header from hash maps whose key order changes from call to call,
    so a DVC out would change hash on every run; here every key of the header is sorted (the
    header keeps its length: only the order of its keys changes).
    """
    data = save(dict(tensors), metadata=dict(metadata))
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode()
    if len(text) > size:
        raise RuntimeError(f"safetensors header re-serialised to {len(text)} bytes, more than {size}")
    Path(path).write_bytes(data[:8] + text.ljust(size) + data[8 + size :])


def timestep_groups_entry(model: nn.Module) -> dict[str, Any]:
    """``{"timestep_groups": {"groups", "boundaries"}}`` for a model with G > 1 groups, else {}."""
    groups = quant_info(model).timestep_groups
    if groups is None:
        return {}
    return {"timestep_groups": {"groups": groups.count, "boundaries": groups.boundaries.tolist()}}


# ---------------------------------------------------------------------------------------------
# Loading a reconstructed model
# ---------------------------------------------------------------------------------------------
def load_quant_model(
    model_dir: str | Path, quant_dir: str | Path, device: torch.device | str = "cpu", check_model: bool = True
) -> nn.Module:
    """Rebuild the fake-quant model of a ``reconstruct`` run.

    ``model_dir``: the float diffusers UNet (``save_pretrained`` directory); ``quant_dir``: the
    output of ``run_reconstruction``. Outputs are bitwise equal to those of the model at the
    end of reconstruction (same device). ``check_model`` verifies that the float weights are
    the ones the state was made for. Raises ArtifactError for a missing or incomplete
    ``quant_dir`` (naming the file and the ``reconstruct`` stage) or another model.
    """
    model_dir, quant_dir = Path(model_dir), Path(quant_dir)
    remedy = f"it is made by the '{STAGE}' stage: run `dvc repro {STAGE}`"
    manifest_path, state_path = quant_dir / "manifest.json", quant_dir / "state.safetensors"
    manifest = read_json(manifest_path, stage=STAGE)
    if manifest.get("schema") != SCHEMA or manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{manifest_path} is schema {manifest.get('schema')} v{manifest.get('schema_version')}, "
            f"this edadm reads {SCHEMA} v{SCHEMA_VERSION}; rerun it with `dvc repro -f {STAGE}`"
        )
    for key in ("quant", "layout", "model_hash"):
        if key not in manifest:
            raise ArtifactError(f"{manifest_path} lacks '{key}' (truncated?); {remedy}")
    if not state_path.exists():
        raise ArtifactError(f"{state_path} not found; {remedy}")
    try:
        tensors = load_file(str(state_path))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise ArtifactError(f"{state_path} could not be read ({err}); {remedy}") from err

    unet = load_unet(model_dir, param="model_dir")
    if check_model and model_hash(unet) != manifest["model_hash"]:
        raise ArtifactError(
            f"{quant_dir} was made for other weights than {model_dir}: rerun `dvc repro {STAGE}`"
        )
    if unet.dtype != torch.float32:
        unet.to(dtype=torch.float32)  # as in run_reconstruction
    try:
        config = from_dict(QuantConfig, manifest["quant"], "quant")
    except ParamError as err:
        raise ArtifactError(f"{manifest_path}: {err}") from err
    model = quantize_model(
        unet, config, layout=ModelLayout.from_dict(manifest["layout"]), inplace=True, init_weights=False
    )
    try:
        load_quant_state(model, tensors, strict=True)
    except (KeyError, ValueError) as err:
        raise ArtifactError(f"{state_path} is incomplete or of another model ({err}); {remedy}") from err
    return model.to(device).eval()
