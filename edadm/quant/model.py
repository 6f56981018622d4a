"""Quantized model: wrap a diffusers UNet's layers in place (``quantize_model``) and switch them.

What gets quantized (docs/method.md §0):
- every nn.Conv2d and nn.Linear becomes a QuantLayer: weights per output channel at
  ``quant.w_bits``, input per tensor at ``quant.a_bits``;
- the first and the last weight quantizers in execution order (the time-embedding linear_1
  and conv_out in diffusers UNets) use ``quant.first_last_bits`` (8);
- the input of the last layer (conv_out) stays in float; GroupNorm / SiLU are not quantized;
- the up path's shortcut conv, whose input is the raw concat([h, skip]), gets split quantizers
  (``quant.split_shortcut``); ``quant.split_conv1`` splits the up path's conv1 too (ours);
- attention q, k, v at the activation bits (``quant.qkv_bits`` overrides) and the softmax
  output at ``quant.attn_bits``, through QuantAttnProcessor (only when activations are
  quantized: they are activations).
With ``quant.act_timestep_groups`` G > 1 (ours) every activation quantizer keeps G ranges, one
per group of sampling steps (``edadm.quant.timestep_groups``); a pre-hook on the UNet picks
each sample's group from its ``timestep``.
The class embedding of class-conditional UNets (``class_embedding``, an nn.Embedding) stays in
float by design, as in the official code: it is a table lookup, with no input activation to
quantize and a few KB of weights, so it is not reported.
Anything else that holds a weight matrix (ConvTranspose2d, Conv1d, subclasses of Conv2d /
Linear such as LoRA-compatible layers, PEFT LoRA wrappers) is listed, left in float, and
reported with an ``UnsupportedLayerWarning``; so is an attention whose products the processor
cannot reproduce, and a layer that does not run in the traced forward.

The model stays a drop-in: same class, same forward signature, float weights under the same
state_dict keys; ``set_quant_state(model, False, False)`` gives the float model's outputs
exactly.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn
from tqdm.auto import tqdm

from edadm.quant.attention import QuantAttnProcessor, unsupported_reason
from edadm.quant.config import QuantConfig, is_float_bits
from edadm.quant.layers import QuantLayer
from edadm.quant.quantizer import UniformAffineQuantizer
from edadm.quant.timestep_groups import (
    TimestepGroups,
    find_timestep_groups,
    install_hooks,
    no_samples_message,
)
from edadm.quant.units import ModelLayout, Unit, default_example_inputs, trace_model

logger = logging.getLogger(__name__)

INFO_ATTR = "_edadm_quant"


class UnsupportedLayerWarning(UserWarning):
    """A layer holding weights was left in float because QuantLayer cannot wrap it."""


@dataclass
class QuantModelInfo:
    """Attached to a quantized model (``model._edadm_quant``)."""

    config: QuantConfig
    layout: ModelLayout
    unsupported: list[str] = field(default_factory=list)  # "name (Type): reason"
    timestep_groups: TimestepGroups | None = None  # quant.act_timestep_groups > 1


def quant_info(model: nn.Module) -> QuantModelInfo:
    info = getattr(model, INFO_ATTR, None)
    if info is None:
        raise ValueError("this model is not quantized: call edadm.quant.quantize_model(unet, config) first")
    return info


def _is_lora(module: nn.Module) -> bool:
    return any(hasattr(module, attr) for attr in ("base_layer", "lora_A", "lora_layer"))


def scan_layers(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(quantizable, unsupported)``: names of exact Conv2d / Linear layers, and "name (Type): reason"."""
    quantizable, unsupported, skipped = [], [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skipped):
            continue
        if isinstance(module, QuantLayer):
            raise ValueError(f"{name} is already a QuantLayer: quantize the float model, not a quantized one")
        if _is_lora(module):
            unsupported.append(f"{name} ({type(module).__name__}): LoRA layer")
            skipped.append(name + ".")
        elif type(module) in (nn.Conv2d, nn.Linear):
            quantizable.append(name)
        elif type(module) is nn.Embedding:
            continue  # a lookup (class labels): float by design, see the module docstring
        else:
            weight = module._parameters.get("weight")
            if weight is not None and weight.ndim >= 2:
                unsupported.append(f"{name} ({type(module).__name__}): not an nn.Conv2d / nn.Linear")
    return quantizable, unsupported


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model`` (quantize_model and to_integer swap layers)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _bits(bits: int) -> int | None:
    return None if is_float_bits(bits) else bits


def _split_point(layout: ModelLayout, config: QuantConfig, name: str) -> int:
    """Input channels of the first half of ``name``'s split quantizers (0: not split)."""
    if not config.split_shortcut:
        return 0
    if name.endswith(".conv1") and not config.split_conv1:
        return 0
    return layout.splits.get(name, 0)


def quantize_model(
    unet: nn.Module,
    config: QuantConfig,
    *,
    example_inputs: Mapping[str, Any] | None = None,
    layout: ModelLayout | None = None,
    inplace: bool = False,
    init_weights: bool = True,
    timesteps: Sequence[float] | None = None,
) -> nn.Module:
    """Wrap a diffusers UNet2DModel / UNet2DConditionModel for fake quantization.

    ``example_inputs``: forward keyword arguments for the trace (default: one sample built
    from the config). ``layout``: a stored layout (from a manifest) instead of tracing.
    ``inplace``: modify ``unet`` itself instead of a deep copy. ``init_weights``: search the
    weight ranges and round to nearest now (skipped when a saved state is loaded next).
    ``timesteps``: the sampler's timesteps in step order, cut into ``quant.act_timestep_groups``
    groups when that is > 1 (None: the group boundaries come with a loaded state).

    Returns the model with weight quantization on and activation quantization on; the
    activation ranges must be initialised (``calibrate_activations`` or a loaded state) before
    a quantized forward.
    """
    if hasattr(unet, INFO_ATTR):
        raise ValueError("quantize_model got an already quantized model")
    model = unet if inplace else copy.deepcopy(unet)
    quantizable, unsupported = scan_layers(model)
    if layout is None:
        layout = trace_model(model, example_inputs or default_example_inputs(model), quantizable)
    ran = set(layout.layer_order)
    foreign = sorted(ran - set(quantizable))
    if foreign:
        raise ValueError(
            f"the layout names layers this model has no nn.Conv2d / nn.Linear for: {foreign[:5]}"
        )
    for name in quantizable:
        if name not in ran:
            unsupported.append(
                f"{name} ({type(model.get_submodule(name)).__name__}): did not run in the traced forward"
            )

    # 1. layers (activation ranges per timestep group when asked, weights never)
    groups = None
    if config.act_timestep_groups > 1:
        groups = (
            TimestepGroups(config.act_timestep_groups)
            if timesteps is None
            else TimestepGroups.from_timesteps(timesteps, config.act_timestep_groups)
        )
    w_bits, a_bits = _bits(config.w_bits), _bits(config.a_bits)
    first, last = layout.layer_order[0], layout.layer_order[-1]
    for name in layout.layer_order:
        layer_w_bits = _bits(config.first_last_bits) if w_bits and name in (first, last) else w_bits
        layer_a_bits = None if name == last else a_bits
        split = _split_point(layout, config, name)
        module = model.get_submodule(name)
        replace_submodule(
            model, name, QuantLayer(module, layer_w_bits, layer_a_bits, config.symmetric, split, groups)
        )

    # 2. attention products
    qkv_bits, softmax_bits = _bits(config.attention_qkv_bits), _bits(config.attn_bits)
    if a_bits and (qkv_bits or softmax_bits):
        for name, module in list(model.named_modules()):
            if isinstance(module, Attention):
                reason = unsupported_reason(module)
                if reason:
                    unsupported.append(f"{name} (Attention): products left in float, {reason}")
                else:
                    processor = QuantAttnProcessor(
                        module.processor, qkv_bits, softmax_bits, config.symmetric, groups
                    )
                    module.set_processor(processor.to(module.to_q.weight.device))

    for quantizer in act_quantizers(model):
        quantizer.search_max_elements = config.act_search_elements

    for entry in unsupported:
        warnings.warn(f"left in float: {entry}", UnsupportedLayerWarning, stacklevel=2)
        logger.warning("left in float: %s", entry)

    # 3. weight ranges (100-candidate search per output channel) and nearest rounding
    if init_weights:
        layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
        for layer in tqdm(layers, desc="weight ranges", unit="layer", leave=False):
            layer.init_weight_range()

    if groups is not None:
        install_hooks(model, groups)
    object.__setattr__(model, INFO_ATTR, QuantModelInfo(config, layout, unsupported, groups))
    set_quant_state(model, weights=True, activations=True)
    return model


def set_quant_state(model: nn.Module, weights: bool, activations: bool) -> None:
    """Switch weight and activation quantization on / off in ``model`` (or any submodule)."""
    for module in model.modules():
        if isinstance(module, QuantLayer):
            module.use_weight_quant = weights
            module.use_act_quant = activations
        elif isinstance(module, QuantAttnProcessor):
            module.use_act_quant = activations


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}


def act_quantizers(model: nn.Module) -> list[UniformAffineQuantizer]:
    """Every activation quantizer (layer inputs and attention products) in ``model``."""
    quantizers = []
    for module in model.modules():
        if isinstance(module, (QuantLayer, QuantAttnProcessor)):
            quantizers.extend(module.act_quantizers())
    return quantizers


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> None:
    """Initialise every activation range batch by batch (search + EMA, docs/method.md §0).

    ``batches`` yields forward keyword arguments already on the model's device. Weights are
    quantized during the pass (as in the official code), so each quantizer sees the input the
    quantized network gives it. The EMA weighs early batches most: each batch should mix the
    timesteps (the select stage's sets are in trajectory order for this), or the ranges fit
    the steps that come first. With timestep groups, each group's ranges come from its own
    samples only; ValueError when a group gets none.
    """
    quantizers = act_quantizers(model)
    for quantizer in quantizers:
        quantizer.start_calibration()
    set_quant_state(model, weights=True, activations=True)
    try:
        for inputs in batches:
            model(**inputs)
        missing = sorted({g for quantizer in quantizers for g in quantizer.uncalibrated_groups()})
        if missing:
            raise ValueError(no_samples_message(find_timestep_groups(model), missing))
    finally:
        for quantizer in quantizers:
            quantizer.finish_calibration()


def describe_units(model: nn.Module) -> list[dict[str, Any]]:
    """The reconstruction units in network order with their quantized layers and bit-widths.

    ``[{"name", "kind": "block" | "layer", "type", "layers": [{"name", "type", "w_bits",
    "a_bits", "split", "shape"}]}]``; bits are None where that side stays in float.
    """
    info = quant_info(model)
    layers = quant_layers(model)
    return [_describe_unit(unit, layers) for unit in info.layout.units]


def _describe_unit(unit: Unit, layers: Mapping[str, QuantLayer]) -> dict[str, Any]:
    described = []
    for name in unit.layers:
        layer = layers[name]
        described.append(
            {
                "name": name,
                "type": layer.layer_type,
                "w_bits": layer.w_bits,
                "a_bits": layer.a_bits,
                "split": layer.split,
                "shape": list(layer.weight.shape),
            }
        )
    return {**unit.to_dict(), "layers": described}
