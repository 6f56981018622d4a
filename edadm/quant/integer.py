"""Integer inference: a fake-quant model's Conv2d and Linear layers on int8 kernels.

``to_integer(model)`` swaps every QuantLayer that quantizes both its weight and its input for
an ``IntegerLayer``: the input is rounded to its uint8 codes with the layer's own activation
scale and zero-point (the same arithmetic as fake quantization), the weight is the stored
integer codes shifted to signed int8 (code - zero_point: symmetric, zero-point 0), and the
kernel accumulates in int32 and rescales by input scale x weight scale per output channel
into float32, bias fused. Integer and fake outputs therefore differ only by float rounding.
With timestep groups (``quant.act_timestep_groups``) a layer has one input scale per group: a
batch runs with its group's, and a batch that mixes groups is split by group.

Backends (``backend=``):
- ``onednn`` (CPU): ``torch.ops.onednn.qconv2d_pointwise`` / ``qlinear_pointwise``, the
  kernels behind PyTorch's x86 PT2E lowering, with a float32 output so no output
  requantization is added. Chosen by measurement (bench/int_speed.py): on a 2-core AVX512-VNNI
  Xeon a 3x3 conv at 128 channels, 32x32, batch 16 took 10.8 ms against 56.8 ms in FP32, the
  same as the eager ``quantized.conv2d`` op (10.0 ms + quantize / dequantize) which needs the
  deprecated quantized tensors and an output scale that fake quantization does not have.
  Called through the custom ops below, so ``torch.compile`` keeps them as they are
  (``edadm.quant.compiled``: the compiled integer UNet, ``sample.int_compile``).
- ``int_mm``: ``torch._int_mm`` (int8 x int8 -> int32 GEMM, cuBLASLt on CUDA), convolutions
  through unfold; the GPU path, and a portable reference on CPU (slow there: unfold copies).
- ``auto``: onednn on CPU when PyTorch has it, int_mm on CUDA.

Left on the fake path, and listed in the report: layers whose input stays in float (the last
layer, METHOD.md 0), weights whose codes do not fit int8 around their zero-point (asymmetric
weights, 8-bit one-sided channels), non-zero padding modes. Attention products (q, k, v,
softmax) stay fake-quantized float matmuls (QuantAttnProcessor), so cross-attention's L text
tokens against the query's h * w need nothing here; its to_k / to_v run integer on the text
features [B, L, D] like any Linear. A guided batch [uncond; cond] shares one timestep, hence
one group.

Integer and fake outputs agree layer by layer to float rounding (~1e-6 relative). Through a
whole network they agree as well unless a value lies within that rounding of a code boundary:
its code then differs by one, and later layers carry the difference (on the tiny random test
models at W4A8, 28-40 dB sample PSNR against the fake samples when it happens).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from edadm.quant.layers import QuantLayer
from edadm.quant.model import replace_submodule
from edadm.quant.quantizer import UniformAffineQuantizer, grid_max

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onednn", "int_mm")


def onednn_available() -> bool:
    """True when this PyTorch build has the oneDNN int8 conv / linear kernels (x86 CPU builds)."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.onednn, "qconv2d_pointwise")
        and hasattr(torch.ops.onednn, "qlinear_pointwise")
    )


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend for ``device``; ValueError when it cannot run there."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"integer backend {backend!r} unknown: use one of {BACKENDS}")
    if backend == "auto":
        backend = "onednn" if device.type == "cpu" and onednn_available() else "int_mm"
    if backend == "onednn" and (device.type != "cpu" or not onednn_available()):
        raise ValueError(
            f"the onednn integer backend runs on x86 CPUs with PyTorch's oneDNN build (device {device}, "
            f"available: {onednn_available()}); use backend 'int_mm' or 'auto'"
        )
    return backend


# The oneDNN kernels as opaque custom ops: torch.compile (edadm.quant.compiled) then calls them
# as they are, with the packed weights as inputs, instead of inductor's own int8 lowering, which
# needs frozen constant weights and would requantize the output. Eager runs the same calls.
# Inductor's FX graph cache does not hash an op's Python body: a change of its contract (the
# convolution's layout) takes a new op name, or old cached graphs assume the old one.
@torch.library.custom_op("edadm::onednn_qconv2d_channels_last", mutates_args=())
def onednn_qconv2d(
    codes: torch.Tensor,
    scale: float,
    zero_point: int,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_points: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_channels: int,
    kernel_size: list[int],
) -> torch.Tensor:
    """int8 convolution of uint8 ``codes`` [B, C, H, W] -> float32 [B, out_channels, H', W'].

    Channels-last in and out: oneDNN's own layout, so its output needs no reorder and the
    element-wise ops after it (and the next layer's codes) stay channels-last; the fake kernel
    promises these strides to inductor.
    """
    return torch.ops.onednn.qconv2d_pointwise(
        codes.contiguous(memory_format=torch.channels_last), scale, zero_point, packed,
        weight_scale, weight_zero_points, bias, stride, padding, dilation, groups,
        1.0, 0, torch.float32, "none", [], "",
    ).contiguous(memory_format=torch.channels_last)  # fmt: skip


@onednn_qconv2d.register_fake
def _(codes, scale, zero_point, packed, weight_scale, weight_zero_points, bias,
      stride, padding, dilation, groups, out_channels, kernel_size):  # fmt: skip
    batch, _, height, width = codes.shape
    out_h, out_w = (
        (size + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
        for i, size in enumerate((height, width))
    )
    return torch.empty(
        (batch, out_channels, out_h, out_w),
        dtype=torch.float32,
        device=codes.device,
        memory_format=torch.channels_last,
    )


@torch.library.custom_op("edadm::onednn_qlinear", mutates_args=())
def onednn_qlinear(
    codes: torch.Tensor,
    scale: float,
    zero_point: int,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_points: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """int8 linear layer of uint8 ``codes`` [M, K] -> float32 [M, out_features]."""
    return torch.ops.onednn.qlinear_pointwise(
        codes.contiguous(), scale, zero_point, packed, weight_scale, weight_zero_points, bias,
        1.0, 0, torch.float32, "none", [], "",
    ).contiguous()  # fmt: skip


@onednn_qlinear.register_fake
def _(codes, scale, zero_point, packed, weight_scale, weight_zero_points, bias, out_features):
    return codes.new_empty((codes.shape[0], out_features), dtype=torch.float32)


@dataclass
class IntegerReport:
    """What ``to_integer`` did: the backend, the layers on integer kernels, the ones left fake."""

    backend: str
    integer_layers: list[str] = field(default_factory=list)
    fake_layers: dict[str, str] = field(default_factory=dict)  # name -> why

    def summary(self) -> str:
        return (
            f"{len(self.integer_layers)} layers on integer kernels ({self.backend}), "
            f"{len(self.fake_layers)} left fake-quantized"
        )


def quantize_codes(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """uint8 codes of ``x`` by ``quantizer.quantize``'s arithmetic (the same codes), in place."""
    return torch.div(x, scale).round_().add_(zero_point).clamp_(0, grid_max(bits)).to(torch.uint8)


class _Part:
    """One input slice of a layer (two for a split shortcut) and the weight columns it meets.

    ``act_scales`` / ``act_zero_points``: one per timestep group (one without groups).
    """

    def __init__(
        self, act: UniformAffineQuantizer, weight: torch.Tensor, scale: torch.Tensor, start: int, stop: int
    ):
        self.act_scales = [float(s) for s in act.scale.detach().reshape(-1)]
        self.act_zero_points = [int(z) for z in act.zero_point.round().reshape(-1)]
        self.act_bits = act.bits
        self.weight = weight  # int8, code - zero_point
        self.weight_scale = scale.float().contiguous()  # [out]
        self.start, self.stop = start, stop
        self.packed: list[torch.Tensor] = []  # per group (oneDNN convs pack the input scale in)


class IntegerLayer(nn.Module):
    """Inference-only counterpart of a QuantLayer on integer kernels (see the module docstring)."""

    def __init__(self, layer: QuantLayer, backend: str) -> None:
        super().__init__()
        self.layer_type = layer.layer_type
        self.backend = backend
        self.bias = (
            None if layer.bias is None else nn.Parameter(layer.bias.detach().float(), requires_grad=False)
        )
        if layer.layer_type == "Conv2d":
            self.stride, self.padding = list(layer.stride), list(layer.padding)
            self.dilation, self.groups = list(layer.dilation), layer.groups
            self.kernel_size = layer.kernel_size
        self.out_channels = layer.weight.shape[0]
        self.weight_zero_points = torch.zeros(self.out_channels, dtype=torch.int64)  # symmetric int8
        self.timestep_groups = layer.act_quantizer.timestep_groups
        self.parts = []
        signed = signed_weight(layer).to(torch.int8)  # why_fake checked the range
        halves = [(layer.weight_quantizer, layer.act_quantizer, 0, layer.split or layer.weight.shape[1])]
        if layer.split:
            halves.append(
                (layer.weight_quantizer_0, layer.act_quantizer_0, layer.split, layer.weight.shape[1])
            )
        for weight_quantizer, act, start, stop in halves:
            part = _Part(
                act, signed[:, start:stop].contiguous(), weight_quantizer.scale.detach(), start, stop
            )
            part.packed = [self._prepack(part, g) for g in range(len(part.act_scales))]
            self.parts.append(part)

    def extra_repr(self) -> str:
        return f"{self.layer_type}, out={self.out_channels}, parts={len(self.parts)}, backend={self.backend}"

    def _prepack(self, part: _Part, group: int) -> torch.Tensor:
        if self.backend != "onednn":
            return part.weight
        if self.layer_type == "Conv2d":
            return torch.ops.onednn.qconv_prepack(
                part.weight,
                part.weight_scale,
                part.act_scales[group],
                part.act_zero_points[group],
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                None,
            )
        return torch.ops.onednn.qlinear_prepack(part.weight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.timestep_groups is None:
            return self._forward_group(x, 0)
        groups = self.timestep_groups.batch_index(x.shape[0], x.device)
        present = self.timestep_groups.present
        if len(present) == 1:  # sampling: one timestep a batch
            return self._forward_group(x, present[0])
        out = None
        for g in present:
            rows = (groups == g).nonzero().squeeze(1)
            y = self._forward_group(x[rows], g)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        return out

    def _forward_group(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """The layer on ``x``, every sample of timestep group ``group`` (0 without groups)."""
        out = None
        for i, part in enumerate(self.parts):
            x_part = x if len(self.parts) == 1 else x[:, part.start : part.stop]
            scale, zero_point = part.act_scales[group], part.act_zero_points[group]
            codes = quantize_codes(x_part.float(), scale, zero_point, part.act_bits)
            bias = self.bias if i == 0 else None  # the bias once, with the first slice
            y = (
                self._onednn(codes, part, group, bias)
                if self.backend == "onednn"
                else self._int_mm(codes, part, group, bias)
            )
            out = y if out is None else out.add_(y)
        return out.to(x.dtype)

    def _onednn(
        self, codes: torch.Tensor, part: _Part, group: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        scale, zero_point, packed = part.act_scales[group], part.act_zero_points[group], part.packed[group]
        if self.layer_type == "Conv2d":
            return onednn_qconv2d(
                codes, scale, zero_point, packed, part.weight_scale, self.weight_zero_points, bias,
                self.stride, self.padding, self.dilation, self.groups, self.out_channels,
                list(self.kernel_size),
            )  # fmt: skip
        lead = codes.shape[:-1]
        y = onednn_qlinear(
            codes.reshape(-1, codes.shape[-1]), scale, zero_point, packed,
            part.weight_scale, self.weight_zero_points, bias, self.out_channels,
        )  # fmt: skip
        return y.reshape(*lead, self.out_channels)

    def _int_mm(
        self, codes: torch.Tensor, part: _Part, group: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        # (code - zp) = (code - 128) - (zp - 128): signed int8 operands, one correction term per
        # output channel, sum_k (zp - 128) * w[n, k].
        scale, zero_point = part.act_scales[group], part.act_zero_points[group]
        weight = part.weight.reshape(self.out_channels, -1)  # [N, K]
        if self.layer_type == "Conv2d":
            batch = codes.shape[0]
            # pad with the code of 0.0 (the zero-point), as the fake path pads with 0.0
            pad_h, pad_w = self.padding
            padded = F.pad(codes.float(), (pad_w, pad_w, pad_h, pad_h), value=float(zero_point))
            out_h, out_w = (
                (padded.shape[2 + i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1) // self.stride[i] + 1
                for i in range(2)
            )
            cols = F.unfold(padded, self.kernel_size, self.dilation, 0, self.stride)  # [B, K, L]
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [B*L, K]
        else:
            lead = codes.shape[:-1]
            rows = codes.reshape(-1, codes.shape[-1]).float()
        signed = (rows - 128).to(torch.int8)
        acc = int_mm(signed, weight.t())  # [M, N] int32
        correction = (zero_point - 128) * weight.sum(dim=1, dtype=torch.int32)
        y = (acc - correction).float() * (scale * part.weight_scale)
        if bias is not None:
            y = y + bias
        if self.layer_type == "Conv2d":
            return y.reshape(batch, out_h, out_w, self.out_channels).permute(0, 3, 1, 2)
        return y.reshape(*lead, self.out_channels)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [K, N] -> int32 [M, N] by ``torch._int_mm``, padded to its shape rules.

    cuBLASLt wants M > 16 and K, N multiples of 8; zero rows and columns add nothing to the
    products, so the result is sliced back to [M, N].
    """
    m, k = a.shape
    n = b.shape[1]
    pad_m, pad_k, pad_n = max(0, 17 - m), -k % 8, -n % 8
    if pad_m or pad_k:
        a = F.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = F.pad(b, (0, pad_n, 0, pad_k))
    return torch._int_mm(a.contiguous(), b.contiguous())[:m, :n]


def signed_weight(layer: QuantLayer) -> torch.Tensor:
    """The layer's weight codes minus their zero-points (per output channel and input half)."""
    _, zero_point = layer.weight_qparams()
    return layer.weight_int.to(torch.int16) - zero_point.round().to(torch.int16)


def why_fake(layer: QuantLayer) -> str | None:
    """Why ``layer`` cannot run on an integer kernel (None when it can)."""
    if layer.weight_quantizer is None or not layer.use_weight_quant:
        return "weight in float"
    if layer.act_quantizer is None or not layer.use_act_quant:
        return "input in float (METHOD.md 0: the last layer's input)"
    if layer.layer_type == "Conv2d" and layer.padding_mode != "zeros":
        return f"padding_mode {layer.padding_mode!r}"
    if not all(q.initialized for q in layer.act_quantizers()):
        return "activation range not calibrated"
    signed = signed_weight(layer)
    if signed.min() < -128 or signed.max() > 127:
        return "weight codes do not fit int8 around their zero-point (asymmetric or one-sided 8-bit weights)"
    return None


@torch.no_grad()
def to_integer(model: nn.Module, backend: str = "auto") -> IntegerReport:
    """Swap the model's QuantLayers for IntegerLayers in place (inference only); returns the report.

    The model must be a fake-quant model with its ranges set (``load_quant_model``,
    ``load_exported`` or after ``calibrate_activations``) and stays on its device.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}
    if not layers:
        raise ValueError(
            "to_integer needs a quantized model (quantize_model / load_quant_model); it has no QuantLayer"
        )
    device = next(iter(layers.values())).weight.device
    report = IntegerReport(resolve_backend(backend, device))
    for name, layer in layers.items():
        reason = why_fake(layer)
        if reason:
            report.fake_layers[name] = reason
            continue
        replace_submodule(model, name, IntegerLayer(layer, report.backend).to(device))
        report.integer_layers.append(name)
    logger.info("integer model: %s", report.summary())
    for name, reason in report.fake_layers.items():
        logger.info("fake-quantized: %s (%s)", name, reason)
    return report
