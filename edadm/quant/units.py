"""Block discovery for diffusers UNets: the reconstruction units in network (execution) order.

docs/method.md §3: every ResNet block and every attention / transformer block is a block; the
standalone layers (time-embedding linears, conv_in, down / up-sampler convs, proj_in /
proj_out of transformers, conv_out) are single-layer units. Blocks are:
- ``ResnetBlock2D`` (and ``ResnetBlockCondNorm2D``),
- ``Attention`` of UNet2DModel's attention blocks (group norm, q / k / v / out, residual),
- ``BasicTransformerBlock`` of the conditional UNets' ``Transformer2DModel``s (self-attention,
  cross-attention, feed-forward); the Transformer2DModel's proj_in / proj_out are single
  layers, as in the official code (Q-Diffusion's BasicTransformerBlock quant block).
A block nested in another block belongs to the outer one.

Order comes from one forward pass (``trace_model``) with a pre-hook on every module recording
its first call, not from module registration order (UNet2DModel registers conv_in before the
time embedding, but runs the time embedding first).

The same pass finds the split shortcut: an up block (any module with ``resnets`` that is
called with ``res_hidden_states_tuple``) runs resnet i on concat([h, skip_i]) where skip_i is
``res_hidden_states_tuple[-(i + 1)]``; a pre-hook on the up block records the skips' channel
counts, so split = conv1.in_channels - skip channels (the channels of h, which come first).
conv_shortcut takes the same concatenated input and gets the same split.

The pass needs the forward's conditioning too (``conditioning`` reads it from the config):
text features for a UNet2DConditionModel's cross-attention, class labels for a class
embedding. The class embedding (an nn.Embedding) is not a unit: it stays in float.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D
from torch import nn

BLOCK_TYPES = (ResnetBlock2D, ResnetBlockCondNorm2D, Attention, BasicTransformerBlock)


@dataclass(frozen=True)
class Unit:
    """One reconstruction unit: a block, or a single layer.

    ``layers`` are the quantized layers inside (full dotted names), in module order; for a
    single-layer unit it is ``(name,)``.
    """

    name: str
    kind: str  # "block" | "layer"
    type: str  # class name: ResnetBlock2D, Attention, BasicTransformerBlock, Conv2d, Linear
    layers: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "type": self.type, "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Unit:
        return cls(data["name"], data["kind"], data["type"], tuple(data["layers"]))


@dataclass(frozen=True)
class ModelLayout:
    """What one traced forward pass tells about a UNet.

    ``layer_order``: the Conv2d / Linear layers that ran, in execution order.
    ``splits``: layer name -> channels of h in its concat([h, skip]) input.
    ``units``: blocks and single layers in execution order.
    """

    layer_order: tuple[str, ...]
    splits: dict[str, int] = field(default_factory=dict)
    units: tuple[Unit, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer_order": list(self.layer_order),
            "splits": dict(self.splits),
            "units": [unit.to_dict() for unit in self.units],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelLayout:
        return cls(
            tuple(data["layer_order"]),
            {k: int(v) for k, v in data["splits"].items()},
            tuple(Unit.from_dict(u) for u in data["units"]),
        )

    def layer_units(self) -> tuple[Unit, ...]:
        """Every layer as its own unit, in execution order (the layer-wise baseline)."""
        types = {layer: unit.type for unit in self.units if unit.kind == "layer" for layer in unit.layers}
        return tuple(Unit(name, "layer", types.get(name, "layer"), (name,)) for name in self.layer_order)


def conditioning(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The conditioning a UNet's forward takes besides ``sample`` and ``timestep``, from its config.

    ``{"encoder_hidden_states": {"dim": D}}`` for a UNet2DConditionModel (text features
    [B, L, D] for its cross-attention), ``{"class_labels": {"num_class_embeds": K,
    "class_embed_type": ...}}`` for a class-conditional UNet ([B] labels); {} when unconditional.
    """
    inputs: dict[str, dict[str, Any]] = {}
    if "cross_attention_dim" in config:  # only UNet2DConditionModel has the key; its forward needs it
        inputs["encoder_hidden_states"] = {"dim": config["cross_attention_dim"]}
    if config.get("num_class_embeds") or config.get("class_embed_type"):
        inputs["class_labels"] = {
            "num_class_embeds": config.get("num_class_embeds"),
            "class_embed_type": config.get("class_embed_type"),
        }
    return inputs


def default_example_inputs(model: nn.Module) -> dict[str, Any]:
    """One small input for the trace, built from the UNet's config (1 sample).

    Text features are random [1, 4, D]; class labels are label 0. ValueError for conditioning
    this cannot invent (projection / identity class embeddings, SDXL-style added embeddings,
    one cross-attention dim per block).
    """
    config = model.config
    size = config.get("sample_size") or 2 ** (len(config.get("block_out_channels", (0,) * 4)) + 1)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator().manual_seed(0)
    inputs: dict[str, Any] = {
        "sample": torch.randn(1, config.in_channels, height, width, generator=generator),
        "timestep": torch.tensor([1], dtype=torch.long),
    }
    needed = conditioning(config)
    problems = []
    if config.get("addition_embed_type"):
        problems.append(f"addition_embed_type={config['addition_embed_type']!r}")
    # label 0 fits an nn.Embedding and a "timestep" class embedding (labels are timesteps there)
    if config.get("class_embed_type") not in (None, "timestep"):
        problems.append(f"class_embed_type={config['class_embed_type']!r}")
    dim = needed.get("encoder_hidden_states", {}).get("dim", 0)
    if not isinstance(dim, int):
        problems.append(f"cross_attention_dim={dim!r}")
    if problems:
        raise ValueError(
            f"{type(model).__name__} needs conditioning this trace cannot invent ({', '.join(problems)}); "
            "pass example_inputs= (forward kwargs for one sample)"
        )
    if "encoder_hidden_states" in needed:
        inputs["encoder_hidden_states"] = torch.randn(1, 4, dim, generator=generator)
    if "class_labels" in needed:
        inputs["class_labels"] = torch.zeros(1, dtype=torch.long)
    return inputs


def _record_call(order: dict[str, int], name: str, module: nn.Module, args: tuple) -> None:
    order.setdefault(name, len(order))


def _record_skips(
    skips: dict[str, list[int]], name: str, module: nn.Module, args: tuple, kwargs: dict
) -> None:
    res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
    if isinstance(res, (tuple, list)) and res and all(torch.is_tensor(t) for t in res) and name not in skips:
        skips[name] = [int(t.shape[1]) for t in res]


def trace_model(model: nn.Module, example_inputs: Mapping[str, Any], layers: list[str]) -> ModelLayout:
    """Run one float forward with hooks; return the execution-ordered layout of ``layers``.

    ``layers`` are the names of the Conv2d / Linear modules to be quantized; those that do not
    run in this forward are left out of the layout (the caller leaves them in float).
    """
    order: dict[str, int] = {}
    skips: dict[str, list[int]] = {}
    handles = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(functools.partial(_record_call, order, name)))
        if isinstance(getattr(module, "resnets", None), nn.ModuleList):
            handles.append(
                module.register_forward_pre_hook(
                    functools.partial(_record_skips, skips, name), with_kwargs=True
                )
            )
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in example_inputs.items()}
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()

    layer_order = tuple(sorted((name for name in layers if name in order), key=order.__getitem__))
    called = set(layer_order)

    # split points of the up path's concatenated inputs
    splits: dict[str, int] = {}
    for block_name, skip_channels in skips.items():
        for i, resnet in enumerate(modules[block_name].resnets):
            if i >= len(skip_channels) or not isinstance(getattr(resnet, "conv1", None), nn.Conv2d):
                continue
            in_channels = resnet.conv1.in_channels
            split = in_channels - skip_channels[-(i + 1)]
            if not 0 < split < in_channels:
                continue
            for conv in ("conv1", "conv_shortcut"):
                layer = getattr(resnet, conv, None)
                if isinstance(layer, nn.Conv2d) and layer.in_channels == in_channels:
                    splits[f"{block_name}.resnets.{i}.{conv}"] = split

    # blocks: outermost modules of a block type; single layers: the rest
    blocks: list[str] = []
    for name, module in modules.items():
        if isinstance(module, BLOCK_TYPES) and not any(name.startswith(b + ".") for b in blocks):
            blocks.append(name)
    units = []
    in_block: set[str] = set()
    for block in blocks:
        inner = tuple(name for name in modules if name.startswith(block + ".") and name in called)
        in_block.update(inner)
        if inner and block in order:
            units.append(Unit(block, "block", type(modules[block]).__name__, inner))
    for name in layer_order:
        if name not in in_block:
            units.append(Unit(name, "layer", type(modules[name]).__name__, (name,)))
    units.sort(key=lambda unit: order[unit.name])
    return ModelLayout(layer_order, splits, tuple(units))
