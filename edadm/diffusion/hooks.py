"""Forward hooks that record a module's input: TDAC's feature map (docs/method.md §2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from edadm.errors import ParamError

FEATURE_LAYER_PARAM = "select.tdac.feature_layer"
#: The UNet's mid-block attention: its input is the feature map of docs/method.md §2
DEFAULT_FEATURE_LAYER = "mid_block.attentions.0"


def feature_layer_param(params: Mapping[str, Any]) -> str:
    """``select.tdac.feature_layer`` of the params, for the dump stage.

    Read here rather than through ``SelectConfig``: the dump records the feature map and needs
    only this key, so it does not depend on the selection code (``edadm.calib``).
    """
    select = params.get("select") or {}
    tdac = (select.get("tdac") or {}) if isinstance(select, Mapping) else None
    name = tdac.get("feature_layer", DEFAULT_FEATURE_LAYER) if isinstance(tdac, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ParamError(f"param {FEATURE_LAYER_PARAM}={name!r} must name a module of the denoiser")
    return name


def find_module(model: torch.nn.Module, name: str, param: str) -> torch.nn.Module:
    """The submodule called ``name``; a clear error naming ``param`` when it does not exist."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    attention = [n for n, m in modules.items() if type(m).__name__ in ("Attention", "Transformer2DModel")]
    hint = (
        f" Attention modules in this model: {', '.join(attention)}."
        if attention
        else " The model has no attention."
    )
    raise ParamError(
        f"{param}={name!r}: the model has no module of that name.{hint} Set {param} to one of them."
    )


class InputRecorder:
    """Records the first positional input of a module on every forward call (a pre-hook).

    Use as a context manager: ``with InputRecorder(unet, "mid_block.attentions.0", param) as rec:``;
    ``rec.last`` is the most recent input [B, C, h, w] (detached).
    """

    def __init__(self, model: torch.nn.Module, name: str, param: str = FEATURE_LAYER_PARAM):
        self.module = find_module(model, name, param)
        self.name = name
        self.last: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.last = args[0].detach()

    def __enter__(self) -> InputRecorder:
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
