"""One self-contained file for a quantized UNet: ``export_quantized`` writes it, ``load_exported`` reads it.

The file is a safetensors file that needs nothing else (no model directory, no calibration
or reconstruction artifacts). It holds:
- ``{layer}.weight_packed`` (uint8): the integer weight codes of every weight-quantized
  QuantLayer, packed by ``edadm.deploy.packing`` (two per byte at <= 4 bits); the layer's
  float weight is not stored, it is the dequantized codes;
- every quantizer's ``scale`` / ``zero_point`` / ``bits``, as ``quant_state_dict`` names them;
- every other tensor of the model's state_dict (biases, norms, float layers) in float32;
- metadata (str -> str): ``schema`` = "edadm.export", ``schema_version`` and ``model_class``
  as plain strings; as JSON ``model_config`` (the diffusers config), ``quant`` (QuantConfig),
  ``layout`` (the traced ModelLayout, so loading needs no trace), ``layers`` ({name:
  {w_bits, a_bits, split, shape}}), with ``quant.act_timestep_groups`` > 1 ``timestep_groups``
  ({groups, boundaries}; the boundaries are a tensor too, as in ``state.safetensors``), and
  the caller's own entries.

The loaded model is the same fake-quant module ``load_quant_model`` gives (outputs bitwise
equal on the same device and dtype), with the float weights replaced by their dequantized
values. Its size is measured against ``fp32_size_bytes``, the tensor data of the float
UNet's own safetensors file.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from edadm.artifacts import atomic_output
from edadm.config import as_dict, from_dict
from edadm.deploy.packing import pack_codes, unpack_codes
from edadm.diffusion.loading import UNET_CLASSES
from edadm.errors import ArtifactError, ParamError
from edadm.quant.config import QuantConfig
from edadm.quant.layers import QuantLayer
from edadm.quant.model import quant_info, quant_layers, quantize_model
from edadm.quant.quantizer import UniformAffineQuantizer
from edadm.quant.state import load_quant_state, quant_state_dict, save_safetensors, timestep_groups_entry
from edadm.quant.timestep_groups import BOUNDARIES_KEY
from edadm.quant.units import ModelLayout

logger = logging.getLogger(__name__)

EXPORT_SCHEMA = "edadm.export"
# 2: quant.qkv_bits, quant.split_conv1 and quant.act_timestep_groups in the metadata
EXPORT_SCHEMA_VERSION = 2
PACKED_SUFFIX = ".weight_packed"
FLOAT_BYTES = 4  # the reference size is the float32 model
PLAIN_METADATA = ("schema", "schema_version", "model_class")  # plain strings; the rest is JSON
RESERVED_METADATA = ("schema", "schema_version", "model_class", "model_config", "quant", "layout", "layers")
OPTIONAL_METADATA = ("timestep_groups",)  # written only when there are timestep groups
REMEDY = "write it again with `edadm export --model MODEL_DIR --quant QUANT_DIR --out FILE.safetensors`"
# bytes per element of the safetensors dtype names, for sizes read from a header
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2}


# ---------------------------------------------------------------------------------------------
# Which state_dict entries are float, which are quantization state
# ---------------------------------------------------------------------------------------------
def _packed_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """The QuantLayers whose weights are quantized (they have integer codes)."""
    return {name: m for name, m in quant_layers(model).items() if m.weight_int is not None}


def _float_keys(model: nn.Module, with_quantized_weights: bool) -> list[str]:
    """state_dict keys of ``model`` that the float UNet has too, in state_dict order.

    Left out: integer codes and quantizer ranges (quantization state); and, unless
    ``with_quantized_weights``, the float weight of each weight-quantized layer.
    """
    owned_by_quant = set()
    for name, module in model.named_modules():
        if isinstance(module, UniformAffineQuantizer):
            owned_by_quant.add(name)
        elif isinstance(module, QuantLayer) and module.adaround is not None:
            raise ValueError(f"{name} still has AdaRound attached: call finish_adaround() before exporting")
    skipped = set()
    for name in _packed_layers(model):
        skipped.add(f"{name}.weight_int")
        if not with_quantized_weights:
            skipped.add(f"{name}.weight")
    return [
        key
        for key in model.state_dict(keep_vars=True)
        if key not in skipped and key.rpartition(".")[0] not in owned_by_quant
    ]


def fp32_size_bytes(model: nn.Module) -> int:
    """Bytes of tensor data in the FP32 safetensors file of the float UNet behind ``model``.

    ``model``: a float UNet or a quantized one (its QuantLayers' float weights count at 4
    bytes an element; codes and quantizer ranges are not part of the float model). The sum
    of numel * 4 over the float state_dict is exact for the data and needs no serialisation;
    the file's JSON header (some KB, a name and shape per tensor) is not counted, so ratios
    against it slightly overstate an export's relative size.
    """
    state = model.state_dict(keep_vars=True)
    keys = _float_keys(model, with_quantized_weights=True)
    return sum(_fp32_bytes(state[key].numel(), state[key].is_floating_point()) for key in keys)


def _fp32_bytes(numel: int, floating: bool, element_size: int = FLOAT_BYTES) -> int:
    return numel * (FLOAT_BYTES if floating else element_size)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def export_quantized(
    model: nn.Module, path: str | Path, metadata: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write the fake-quant ``model`` as one safetensors file at ``path`` (atomically).

    ``model``: from ``quantize_model`` / ``load_quant_model`` (a diffusers UNet2DModel or
    UNet2DConditionModel whose Conv2d / Linear are QuantLayers). ``metadata``: extra
    JSON-serialisable entries stored JSON-encoded in the file's metadata.
    Returns ``{"path", "file_bytes", "fp32_bytes", "packed_weight_bytes", "qparam_bytes",
    "float_bytes", "quantized_layers", "layers"}``.
    """
    info = quant_info(model)  # ValueError for a float model
    model_class = type(model).__name__
    if model_class not in UNET_CLASSES:
        raise ValueError(f"export_quantized takes {' or '.join(UNET_CLASSES)}, got {model_class}")
    metadata = dict(metadata or {})
    clashes = sorted(set(metadata) & {*RESERVED_METADATA, *OPTIONAL_METADATA})
    if clashes:
        raise ValueError(f"metadata keys {clashes} are reserved by the export format; rename them")

    # 1. float tensors (float32), without the weights that are stored as codes
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for key in _float_keys(model, with_quantized_weights=False):
        value = state[key].detach()
        value = value.float() if value.is_floating_point() else value
        tensors[key] = value.cpu().contiguous().clone()  # clone: tied weights must not share storage
    float_bytes = sum(t.numel() * t.element_size() for t in tensors.values())

    # 2. quantizer ranges as quant_state_dict writes them; the codes packed instead of weight_int
    layers = _packed_layers(model)
    qparam_bytes = packed_bytes = 0
    for key, value in quant_state_dict(model).items():
        name, _, attr = key.rpartition(".")
        if attr == "weight_int":
            packed = pack_codes(value, layers[name].w_bits)
            tensors[name + PACKED_SUFFIX] = packed
            packed_bytes += packed.numel()
        else:
            tensors[key] = value
            qparam_bytes += value.numel() * value.element_size()

    # 3. what rebuilds the module without any other file
    header = {
        "schema": EXPORT_SCHEMA,
        "schema_version": str(EXPORT_SCHEMA_VERSION),
        "model_class": model_class,
        "model_config": json.dumps(json.loads(model.to_json_string())),
        "quant": json.dumps(as_dict(info.config)),
        "layout": json.dumps(info.layout.to_dict()),
        "layers": json.dumps(
            {
                name: {
                    "w_bits": m.w_bits,
                    "a_bits": m.a_bits,
                    "split": m.split,
                    "shape": list(m.weight.shape),
                }
                for name, m in quant_layers(model).items()
            }
        ),
    }
    header.update({key: json.dumps(value) for key, value in timestep_groups_entry(model).items()})
    header.update({key: json.dumps(value) for key, value in metadata.items()})
    path = Path(path)
    with atomic_output(path) as tmp:
        save_safetensors(tensors, tmp, metadata=header)

    summary = {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "fp32_bytes": fp32_size_bytes(model),
        "packed_weight_bytes": packed_bytes,
        "qparam_bytes": qparam_bytes,
        "float_bytes": float_bytes,
        "quantized_layers": len(layers),
        "layers": len(quant_layers(model)),
    }
    logger.info(
        "exported %s: %d bytes, %.1f %% of FP32 (%d bytes); %d packed layers",
        path,
        summary["file_bytes"],
        100 * summary["file_bytes"] / summary["fp32_bytes"],
        summary["fp32_bytes"],
        len(layers),
    )
    return summary


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported file, JSON entries decoded (reads the header only).

    Raises ArtifactError naming the file for a missing, damaged or other-schema file.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found; {REMEDY}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path} is not a readable safetensors file (damaged? {err}); {REMEDY}") from err
    return _decode_metadata(path, raw)


def _decode_metadata(path: Path, raw: Mapping[str, str]) -> dict[str, Any]:
    if raw.get("schema") != EXPORT_SCHEMA or raw.get("schema_version") != str(EXPORT_SCHEMA_VERSION):
        raise ArtifactError(
            f"{path} is schema {raw.get('schema')!r} v{raw.get('schema_version')}, not an edadm export "
            f"({EXPORT_SCHEMA} v{EXPORT_SCHEMA_VERSION}); {REMEDY}"
        )
    decoded: dict[str, Any] = {
        "schema": EXPORT_SCHEMA,
        "schema_version": EXPORT_SCHEMA_VERSION,
        "model_class": raw.get("model_class"),
    }
    for key, text in raw.items():
        if key in PLAIN_METADATA:
            continue
        try:
            decoded[key] = json.loads(text)
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{path}: metadata {key!r} is not valid JSON ({err}); {REMEDY}") from err
    missing = [key for key in RESERVED_METADATA if decoded.get(key) is None]
    if missing:
        raise ArtifactError(f"{path} lacks metadata {missing}; {REMEDY}")
    return decoded


def _read_export(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    metadata = read_export_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"{path}: tensors could not be read (damaged? {err}); {REMEDY}") from err
    return metadata, tensors


def load_exported(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the fake-quant UNet written by ``export_quantized`` from that file alone.

    Returns the model in eval mode on ``device``, weight and activation quantization on;
    each quantized layer's float ``weight`` holds its dequantized codes. Raises ArtifactError
    naming the file and the fix for a missing, damaged, other-schema or incomplete file.
    """
    path = Path(path)
    metadata, tensors = _read_export(path)

    # 1. the float architecture from its diffusers config
    model_class = metadata["model_class"]
    if model_class not in UNET_CLASSES:
        raise ArtifactError(f"{path} holds a {model_class!r}; edadm loads {' and '.join(UNET_CLASSES)}")
    try:
        unet = UNET_CLASSES[model_class].from_config(metadata["model_config"])
        config = from_dict(QuantConfig, metadata["quant"], "quant")
        layout = ModelLayout.from_dict(metadata["layout"])
    except (ParamError, KeyError, TypeError, ValueError) as err:
        raise ArtifactError(
            f"{path}: its model_config / quant / layout metadata do not build a model ({err}); {REMEDY}"
        ) from err

    # 2. the same QuantLayers and quantizers as the exported model (no trace, no range search)
    try:
        model = quantize_model(unet, config, layout=layout, inplace=True, init_weights=False)
    except ValueError as err:
        raise ArtifactError(
            f"{path}: the stored layout does not fit its model_config ({err}); {REMEDY}"
        ) from err

    # 3. float tensors: every float entry of the model, and only those, must be in the file
    layers = _packed_layers(model)
    float_keys = _float_keys(model, with_quantized_weights=False)
    missing = [key for key in float_keys if key not in tensors]
    missing += [name + PACKED_SUFFIX for name in layers if name + PACKED_SUFFIX not in tensors]
    if missing:
        raise ArtifactError(
            f"{path} lacks tensors {missing[:5]} ({len(missing)} in all, truncated?); {REMEDY}"
        )
    try:
        model.load_state_dict({key: tensors.pop(key) for key in float_keys}, strict=False)
    except RuntimeError as err:  # a shape that does not fit
        raise ArtifactError(f"{path}: float tensors do not fit {model_class} ({err}); {REMEDY}") from err

    # 4. codes unpacked, then every quantizer range (strict: nothing missing, nothing extra)
    try:
        for name, layer in layers.items():
            packed = tensors.pop(name + PACKED_SUFFIX)
            tensors[f"{name}.weight_int"] = unpack_codes(packed, layer.w_bits, layer.weight.shape)
        load_quant_state(model, tensors, strict=True)
    except (KeyError, ValueError) as err:
        raise ArtifactError(f"{path}: quantization state does not fit the model ({err}); {REMEDY}") from err

    # 5. float weights = dequantized codes, so the module is self-consistent (e.g. quant off)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.copy_(layer.quantized_weight())
    return model.to(device).eval()


def export_summary(path: str | Path) -> dict[str, Any]:
    """Sizes and settings of an exported file, from its header alone (no tensor data read).

    Returns the decoded metadata plus ``file_bytes``, ``fp32_bytes`` (as ``fp32_size_bytes``
    of the model: float entries at 4 bytes an element, each packed layer's weight shape at
    4 bytes), ``packed_weight_bytes``, ``quantized_layers`` and ``extra`` (the caller's
    metadata entries).
    """
    path = Path(path)
    metadata = read_export_metadata(path)
    shapes: dict[str, tuple[str, list[int]]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                shapes[key] = (tensor.get_dtype(), tensor.get_shape())
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path} is not a readable safetensors file (damaged? {err}); {REMEDY}") from err
    # a quantizer is recognised by its "bits" entry: its scale / zero_point are not float UNet data
    quantizers = {key.removesuffix(".bits") for key in shapes if key.endswith(".bits")}
    fp32_bytes = packed_bytes = quantized_layers = 0
    for key, (dtype, shape) in shapes.items():
        numel = math.prod(shape)
        if key == BOUNDARIES_KEY:
            continue  # quantization state, not float UNet data
        if key.endswith(PACKED_SUFFIX):
            layer = metadata["layers"].get(key.removesuffix(PACKED_SUFFIX))
            if layer is None:
                raise ArtifactError(f"{path}: {key} has no entry in the 'layers' metadata; {REMEDY}")
            fp32_bytes += math.prod(layer["shape"]) * FLOAT_BYTES
            packed_bytes += numel
            quantized_layers += 1
        elif key.rpartition(".")[0] not in quantizers:
            floating = dtype.startswith(("F", "BF"))
            fp32_bytes += _fp32_bytes(numel, floating, _DTYPE_BYTES.get(dtype, 1))
    return {
        **metadata,
        "file_bytes": path.stat().st_size,
        "fp32_bytes": fp32_bytes,
        "packed_weight_bytes": packed_bytes,
        "quantized_layers": quantized_layers,
        "extra": {
            key: value
            for key, value in metadata.items()
            if key not in RESERVED_METADATA and key not in OPTIONAL_METADATA
        },
    }


def export_reconstruction(
    model_dir: str | Path, quant_dir: str | Path, out_file: str | Path
) -> dict[str, Any]:
    """The `export` stage (and `edadm export`): the reconstruct stage's model as one file.

    The noise schedule travels with the weights, so the file alone is enough to sample.
    Returns ``export_quantized``'s summary (file and FP32 bytes, packed layers).
    """
    from edadm.diffusion.loading import load_scheduler
    from edadm.quant.state import load_quant_model

    model = load_quant_model(model_dir, quant_dir)
    scheduler = json.loads(load_scheduler(model_dir).to_json_string())
    return export_quantized(model, out_file, metadata={"scheduler": scheduler})


def describe_export_summary(out_file: str | Path, summary: Mapping[str, Any]) -> str:
    """One line: the file's size against FP32, e.g. for the CLI and the stage's log."""
    file_mb, fp32_mb = summary["file_bytes"] / 2**20, summary["fp32_bytes"] / 2**20
    return (
        f"{out_file}: {file_mb:.2f} MB, FP32 {fp32_mb:.2f} MB, "
        f"{100 * summary['file_bytes'] / summary['fp32_bytes']:.1f} % of FP32 "
        f"({summary['quantized_layers']} layers with packed weights)"
    )
