"""QuantLayer: a Conv2d or Linear with fake-quantized weights and input (BRECQ's QuantModule).

Weights are quantized per output channel with ``weight_quantizer``; the integer codes live in
the ``weight_int`` buffer (uint8) and the forward uses (weight_int - zero_point) * scale, so a
saved and reloaded state gives bitwise-equal outputs. During reconstruction an
``AdaRoundQuantizer`` (``start_adaround``) replaces the codes until ``finish_adaround`` writes
its hard rounding back. The input is quantized per tensor by ``act_quantizer`` (learnable step),
or per tensor and timestep group (``timestep_groups``, see ``edadm.quant.timestep_groups``).

Split shortcut (Q-Diffusion): a layer whose input is concat([h, skip]) (the up path's
ResnetBlock2D conv1 and conv_shortcut) has ``split`` = channels of h; the input halves
[:split] / [split:] get ``act_quantizer`` / ``act_quantizer_0`` and the weight's input-channel
halves get ``weight_quantizer`` / ``weight_quantizer_0``, because the two halves have very
different ranges. Where the split comes from: see ``edadm.quant.units.trace_model``.

The float weight and bias stay registered under their original names, so the wrapped model's
state_dict keeps the float keys; with quantization switched off the forward is the original
module's arithmetic exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from edadm.quant.adaround import AdaRoundQuantizer
from edadm.quant.quantizer import UniformAffineQuantizer, broadcast_to_axis, dequantize, quantize
from edadm.quant.timestep_groups import TimestepGroups


class QuantLayer(nn.Module):
    """Wraps ``module`` (exactly nn.Conv2d or nn.Linear); ``None`` bits leave that side in float."""

    def __init__(
        self,
        module: nn.Conv2d | nn.Linear,
        w_bits: int | None,
        a_bits: int | None,
        symmetric: bool = True,
        split: int = 0,
        timestep_groups: TimestepGroups | None = None,
    ) -> None:
        super().__init__()
        if type(module) not in (nn.Conv2d, nn.Linear):
            raise TypeError(f"QuantLayer wraps nn.Conv2d or nn.Linear, got {type(module).__name__}")
        self.weight = module.weight
        self.bias = module.bias
        if isinstance(module, nn.Conv2d):
            self.layer_type = "Conv2d"
            self.in_channels, self.out_channels = module.in_channels, module.out_channels
            self.kernel_size, self.stride, self.padding = module.kernel_size, module.stride, module.padding
            self.dilation, self.groups, self.padding_mode = (
                module.dilation,
                module.groups,
                module.padding_mode,
            )
            self._reversed_padding_repeated_twice = module._reversed_padding_repeated_twice
            in_channels = module.in_channels
        else:
            self.layer_type = "Linear"
            self.in_features, self.out_features = module.in_features, module.out_features
            in_channels = module.in_features
        if split and (self.layer_type != "Conv2d" or module.groups != 1 or not 0 < split < in_channels):
            raise ValueError(f"split={split} needs a Conv2d with groups=1 and 0 < split < {in_channels}")
        self.split = split
        self.w_bits, self.a_bits = w_bits, a_bits
        out_channels = self.weight.shape[0]

        def weight_quantizer() -> UniformAffineQuantizer | None:
            return UniformAffineQuantizer(w_bits, symmetric, channels=out_channels) if w_bits else None

        def act_quantizer() -> UniformAffineQuantizer | None:
            return (
                UniformAffineQuantizer(a_bits, symmetric, timestep_groups=timestep_groups) if a_bits else None
            )

        self.weight_quantizer = weight_quantizer()
        self.weight_quantizer_0 = weight_quantizer() if split else None
        self.act_quantizer = act_quantizer()
        self.act_quantizer_0 = act_quantizer() if split else None
        if w_bits:
            self.register_buffer("weight_int", torch.zeros(self.weight.shape, dtype=torch.uint8))
        else:
            self.weight_int = None
        self.adaround: AdaRoundQuantizer | None = None
        self.use_weight_quant = w_bits is not None
        self.use_act_quant = a_bits is not None
        self.to(self.weight.device)  # the new quantizers and codes live where the weight does

    def extra_repr(self) -> str:
        return (
            f"{self.layer_type}{tuple(self.weight.shape)}, w_bits={self.w_bits}, a_bits={self.a_bits}, "
            f"split={self.split}"
        )

    # --- weights --------------------------------------------------------------------------
    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` broadcastable to the weight: per output channel (and input half)."""
        ndim = self.weight.ndim
        scale = broadcast_to_axis(self.weight_quantizer.scale.detach(), ndim, 0)
        zero_point = broadcast_to_axis(self.weight_quantizer.zero_point, ndim, 0)
        if not self.split:
            return scale, zero_point
        out_channels, in_channels = self.weight.shape[:2]
        rest = [1] * (ndim - 2)
        scale_0 = broadcast_to_axis(self.weight_quantizer_0.scale.detach(), ndim, 0)
        zero_point_0 = broadcast_to_axis(self.weight_quantizer_0.zero_point, ndim, 0)
        halves = (self.split, in_channels - self.split)
        scale = torch.cat(
            [scale.expand(out_channels, halves[0], *rest), scale_0.expand(out_channels, halves[1], *rest)], 1
        )
        zero_point = torch.cat(
            [
                zero_point.expand(out_channels, halves[0], *rest),
                zero_point_0.expand(out_channels, halves[1], *rest),
            ],
            1,
        )
        return scale, zero_point

    @torch.no_grad()
    def init_weight_range(self) -> None:
        """Search the per-channel ranges (docs/method.md §0) and round to nearest into ``weight_int``."""
        if self.weight_quantizer is None:
            return
        weight = self.weight.detach().float()
        if self.split:
            self.weight_quantizer.init_range(weight[:, : self.split])
            self.weight_quantizer_0.init_range(weight[:, self.split :])
        else:
            self.weight_quantizer.init_range(weight)
        scale, zero_point = self.weight_qparams()
        self.weight_int.copy_(quantize(weight, scale, zero_point, self.w_bits).to(torch.uint8))

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight: AdaRound's while it is attached, else the stored codes."""
        if self.adaround is not None:
            weight = self.adaround()
        else:
            scale, zero_point = self.weight_qparams()
            weight = dequantize(self.weight_int.to(scale.dtype), scale, zero_point)
        return weight.to(self.weight.dtype)

    def start_adaround(self) -> AdaRoundQuantizer:
        scale, zero_point = self.weight_qparams()
        self.adaround = AdaRoundQuantizer(self.weight, scale, zero_point, self.w_bits)
        return self.adaround

    @torch.no_grad()
    def finish_adaround(self) -> None:
        """Hard rounding (alpha >= 0 rounds up) into ``weight_int``; AdaRound is dropped."""
        if self.adaround is not None:
            self.weight_int.copy_(self.adaround.integer_weight())
            self.adaround = None

    # --- activations ----------------------------------------------------------------------
    def act_quantizers(self) -> list[UniformAffineQuantizer]:
        return [q for q in (self.act_quantizer, self.act_quantizer_0) if q is not None]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return self.act_quantizer(x)
        return torch.cat(
            [self.act_quantizer(x[:, : self.split]), self.act_quantizer_0(x[:, self.split :])], dim=1
        )

    # --- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_act_quant and self.act_quantizer is not None:
            x = self.quantize_input(x)
        weight = (
            self.quantized_weight()
            if self.use_weight_quant and self.weight_quantizer is not None
            else self.weight
        )
        if self.layer_type == "Linear":
            return F.linear(x, weight, self.bias)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, _pair(0), self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
