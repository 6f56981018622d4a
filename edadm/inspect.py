"""`edadm inspect PATH`: a readable summary of any artifact, so nobody writes a script to look.

Each kind of artifact has one ``_describe_*`` function; ``describe`` picks by what is on disk.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from edadm.artifacts import SCHEMAS, describe_store, open_store
from edadm.errors import ArtifactError


def describe(path: str | Path) -> str:
    """A multi-line text summary of the artifact at ``path``."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    for matches, summarise in DESCRIBERS:
        if matches(path):
            return "\n".join(summarise(path))
    raise ArtifactError(
        f"{path}: not an edadm artifact "
        "(model directory, Zarr store, quantization directory, reference, JSON or safetensors file)"
    )


# --------------------------------------------------------------------------------------------- model
def _is_model(path: Path) -> bool:
    return path.is_dir() and (
        (path / "model_index.json").exists() or (path / "unet" / "config.json").exists()
    )


def _describe_model(path: Path) -> list[str]:
    from edadm.diffusion.loading import load_diffusion_model

    model = load_diffusion_model(path, param="PATH")
    unet, scheduler, kind = model.unet, model.scheduler, model.kind
    n_params = sum(p.numel() for p in unet.parameters())
    size_mb = sum(f.stat().st_size for f in (path / "unet").rglob("*.safetensors")) / 2**20
    lines = [f"diffusion model: {path}", f"  kind: {kind.name} (only the UNet is quantized)"]
    if kind.condition == "class":
        null = "none" if kind.null_class is None else kind.null_class
        lines.append(
            f"  classes: {kind.num_classes} (labels 0..{kind.num_classes - 1}); 'no class' label: {null}"
        )
    lines.append(f"  unet: {type(unet).__name__}, {n_params:,} parameters, {size_mb:.2f} MB on disk")
    floats = {model.vae_folder: model.vae, "text_encoder": model.text_encoder}
    for folder, part in floats.items():
        if part is not None:
            count = sum(p.numel() for p in part.parameters())
            lines.append(f"  {folder}: {type(part).__name__}, {count:,} parameters (float)")
    if model.tokenizer is not None:
        lines.append(
            f"  tokenizer: {type(model.tokenizer).__name__}, max length {model.tokenizer.model_max_length}"
        )
    keys = (
        "sample_size",
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "up_block_types",
        "attention_head_dim",
        "norm_num_groups",
        "cross_attention_dim",
    )
    for key in keys:
        if key in unet.config and unet.config[key] is not None:
            lines.append(f"    {key}: {_short(unet.config[key])}")
    sc = scheduler.config
    lines.append(
        f"  scheduler: {type(scheduler).__name__}, {sc.num_train_timesteps} steps, {sc.beta_schedule} betas "
        f"[{sc.beta_start}, {sc.beta_end}], prediction {sc.prediction_type}"
    )
    train_log = path.parent / "train.json"
    if train_log.exists():
        log = json.loads(train_log.read_text())
        if log.get("loss"):
            last = ", ".join(f"{v:.4f}" for v in log["loss"][-5:])
            # the stage's time is in metrics/timings/model.json, not in its cached train.json
            took = f" in {log['seconds']} s" if "seconds" in log else ""
            lines.append(f"  training: {log['steps']} steps{took}; last losses {last}")
    return lines


# --------------------------------------------------------------------------------------------- zarr stores
def _is_store(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").exists()


def _describe_store(path: Path) -> list[str]:
    group = zarr.open_group(store=str(path), mode="r")
    kind = group.attrs.get("edadm_schema")
    if kind in SCHEMAS:
        group = open_store(path, SCHEMAS[kind])
    lines = [f"zarr store: {path} ({kind or 'not an edadm store'})"]
    size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    n_files = sum(1 for f in path.rglob("*") if f.is_file())
    lines.append(f"  {size_mb:.2f} MB in {n_files} files")
    world_size = group.attrs.get("world_size")
    if world_size is not None:  # stores written before scale-out do not say
        ranks = "one process" if world_size == 1 else f"{world_size} torchrun ranks, each its share"
        lines.append(f"  written by {ranks} (the arrays do not depend on how many)")
    lines += describe_store(group)
    if "per_step" in group:
        per_step = group["per_step"]
        lines += ["  per_step:"] + [
            "  " + line for line in describe_store(per_step) if "attributes" not in line
        ]
        if "count" in per_step and "timesteps" in group:
            from edadm.calib.selection import allocation_chart

            lines.append("  allocation (samples per step):")
            lines += [
                "    " + line
                for line in allocation_chart(
                    np.asarray(group["timesteps"][...]), np.asarray(per_step["count"][...])
                )
            ]
    if kind == "samples" and "images" in group and "seeds" in group:
        images, seeds = np.asarray(group["images"][...]), np.asarray(group["seeds"][...])
        lines.append(
            f"  samples: {len(images)} images, seeds {seeds.min()}..{seeds.max()}, pixels mean "
            f"{images.mean():.3f} std {images.std():.3f} in [{images.min():.2f}, {images.max():.2f}], "
            f"{np.mean(np.abs(images) >= 1):.1%} clipped at +-1"
        )
    return lines


# --------------------------------------------------------------------------------------------- json
def _is_json(path: Path) -> bool:
    return path.is_file() and path.suffix == ".json"


def _describe_json(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    lines = [f"json: {path}"]
    lines += _flatten(data, "  ")
    return lines


def _flatten(data, indent: str, prefix: str = "") -> list[str]:
    lines = []
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict):
                lines += _flatten(value, indent, name)
            else:
                lines.append(f"{indent}{name}: {_short(value)}")
    else:
        lines.append(f"{indent}{_short(data)}")
    return lines


def _short(value, limit: int = 100) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = json.dumps(value) if not isinstance(value, str) else value
    if isinstance(value, list) and len(value) > 8 and all(isinstance(v, (int, float)) for v in value):
        text = f"[{len(value)} values, first {value[0]:.4g}, last {value[-1]:.4g}]"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------- reference
def _is_reference(path: Path) -> bool:
    return path.is_dir() and (path / "reference.json").exists()


def _describe_reference(path: Path) -> list[str]:
    lines = [f"metrics reference: {path}"]
    lines += _flatten(json.loads((path / "reference.json").read_text()), "  ")
    stats = path / "stats.npz"
    if stats.exists():
        with np.load(stats) as npz:
            lines += [f"  stats.npz {key}: shape {npz[key].shape}" for key in npz.files]
    return lines


# --------------------------------------------------------------------------------------------- quantization
def _is_quant(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").exists()


def _bits(w_bits, a_bits) -> str:
    return f"W{w_bits if w_bits else 'fp'}A{a_bits if a_bits else 'fp'}"


def _attention_bits(quant: dict) -> str:
    """q, k, v and softmax widths (states written before qkv_bits used attn_bits for both)."""
    qkv = quant.get("qkv_bits", quant["attn_bits"])
    qkv = quant["a_bits"] if qkv is None else qkv
    return f"q/k/v {qkv} bit, softmax {quant['attn_bits']} bit"


def _describe_groups(groups: dict | None) -> list[str]:
    """quant.act_timestep_groups > 1: activation ranges per group of sampling steps."""
    if not groups:
        return []
    return [f"  activation ranges: {groups['groups']} timestep groups, boundaries {groups['boundaries']}"]


def _describe_conditioning(conditioning: dict | None) -> list[str]:
    """The forward's conditioning inputs (``edadm.quant.units.conditioning``), for conditional UNets."""
    if not conditioning:
        return []
    parts = []
    text = conditioning.get("encoder_hidden_states")
    if text:
        parts.append(f"encoder_hidden_states [B, L, {text['dim']}] (cross-attention k / v)")
    labels = conditioning.get("class_labels")
    if labels:
        if labels.get("class_embed_type"):
            parts.append(f"class_labels [B] ({labels['class_embed_type']} class embedding)")
        else:
            parts.append(f"class_labels [B] in 0..{labels['num_class_embeds'] - 1} (embedding kept in float)")
    return [f"  conditioning: {', '.join(parts)}"]


def _describe_quant(path: Path) -> list[str]:
    manifest = json.loads((path / "manifest.json").read_text())
    quant, recon, size = manifest["quant"], manifest["recon"], manifest["size"]
    state = path / "state.safetensors"
    lines = [
        f"quantization state: {path} ({manifest['model_class']}, {_bits(quant['w_bits'], quant['a_bits'])}, "
        f"attention {_attention_bits(quant)}, reconstruction {recon['method']}, "
        f"{recon['iters']} iterations a unit)",
        f"  weights: {size['float_weight_bytes'] / 2**20:.2f} MB float -> "
        f"{size['quantized_weight_bytes'] / 2**20:.2f} MB "
        f"at their bit-widths; state.safetensors {state.stat().st_size / 2**20:.2f} MB",
    ]
    lines += _describe_conditioning(manifest.get("conditioning"))  # absent in older manifests
    lines += _describe_groups(manifest.get("timestep_groups"))
    if manifest.get("unsupported"):
        lines.append(f"  left in float (unsupported): {', '.join(manifest['unsupported'])}")
    steps = []
    if (path / "report.json").exists():
        steps = [e for e in json.loads((path / "report.json").read_text()).get("steps", []) if "unit" in e]
    report = {e["unit"]: e for e in steps}  # brecq: the activation pass, the last
    rounding = {e["unit"]: e["rounding"] for e in steps if "rounding" in e}  # where rounding learned
    lines.append(
        f"  {'unit':<34} {'kind':<6} {'loss before':>12} {'after':>10} {'soft':>10} {'undecided':>9}  "
        "layers (bits)"
    )
    for unit in manifest["units"]:
        entry = report.get(unit["name"], {})
        before, after = entry.get("loss_before"), entry.get("loss_after")
        losses = (
            f"{before:>12.4g} {after:>10.4g}" if before is not None and after is not None else f"{'':>23}"
        )
        # AdaRound when learning ended: the loss with the soft rounding, the share still undecided
        soft = rounding.get(unit["name"])
        losses += f" {soft['loss_soft']:>10.4g} {soft['undecided_share']:>9.1%}" if soft else f"{'':>21}"
        layers = ", ".join(
            f"{layer['name'].removeprefix(unit['name'] + '.') or layer['name']} "
            f"{_bits(layer['w_bits'], layer['a_bits'])}" + (" split" if layer.get("split") else "")
            for layer in unit["layers"]
        )
        lines.append(f"  {unit['name']:<34} {unit['kind']:<6} {losses}  {layers}")
    if rounding:
        shares = [r["undecided_share"] for r in rounding.values()]
        lines.append(
            f"  rounding: soft = the unit's loss with AdaRound's soft rounding, before the hard one (after); "
            f"undecided = share of h(alpha) in (0.01, 0.99), mean {sum(shares) / len(shares):.1%}"
        )
    for name, bits in manifest.get("attention", {}).items():
        qkv, softmax = bits["qkv_bits"], bits["softmax_bits"]
        cross = " (cross-attention)" if bits.get("cross_attention") else ""
        lines.append(f"  attention {name}{cross}: q, k, v at {qkv} bit, softmax at {softmax} bit")
    return lines


# --------------------------------------------------------------------------------------------- export
def _is_safetensors(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors"


def _describe_safetensors(path: Path) -> list[str]:
    """An ``edadm export`` file in full; any other safetensors file by its tensors and metadata."""
    from safetensors import SafetensorError, safe_open

    from edadm.deploy.export import EXPORT_SCHEMA, export_summary
    from edadm.quant.units import conditioning

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, n_tensors = f.metadata() or {}, len(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path} is not a readable safetensors file (damaged? {err})") from err
    size_mb = path.stat().st_size / 2**20
    if metadata.get("schema") != EXPORT_SCHEMA:
        return [
            f"safetensors file: {path} (schema {metadata.get('schema', 'none')}), "
            f"{n_tensors} tensors, {size_mb:.2f} MB",
            *(f"  {key}: {_short(value)}" for key, value in metadata.items()),
        ]
    summary = export_summary(path)
    quant = summary["quant"]
    fp32_mb = summary["fp32_bytes"] / 2**20
    lines = [
        f"quantized export: {path} ({summary['schema']} v{summary['schema_version']}, "
        f"{summary['model_class']})",
        f"  bits: {_bits(quant['w_bits'], quant['a_bits'])}, attention {_attention_bits(quant)}, "
        f"first / last layer {quant['first_last_bits']} bit",
        f"  layers: {summary['quantized_layers']} of {len(summary['layers'])} QuantLayers "
        "with packed integer weights",
        f"  size: {size_mb:.2f} MB on disk vs {fp32_mb:.2f} MB FP32 "
        f"({100 * summary['file_bytes'] / summary['fp32_bytes']:.1f} %); "
        f"packed weights {summary['packed_weight_bytes'] / 2**20:.2f} MB",
    ]
    lines += _describe_conditioning(conditioning(summary["model_config"]))
    lines += _describe_groups(summary.get("timestep_groups"))
    lines += [f"  {key}: {_short(value)}" for key, value in summary["extra"].items()]
    return lines


DESCRIBERS: list[tuple[Callable[[Path], bool], Callable[[Path], list[str]]]] = [
    (_is_model, _describe_model),
    (_is_quant, _describe_quant),
    (_is_store, _describe_store),
    (_is_reference, _describe_reference),
    (_is_json, _describe_json),
    (_is_safetensors, _describe_safetensors),
]
