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
  (``edadm.deploy.compiled``: the compiled integer UNet, ``sample.int_compile``).
- ``int_mm``: ``torch._int_mm`` (int8 x int8 -> int32 GEMM, cuBLASLt on CUDA), convolutions
  through unfold; the GPU path, and a portable reference on CPU (slow there: unfold copies).
- ``auto``: onednn on CPU when PyTorch has it, int_mm on CUDA.

Attention's two products, QK^T and softmax x V, run on int8 kernels too
(``IntegerAttnProcessor``): q, k, v and the softmax output already have codes (their
QuantAttnProcessor quantizers), shifted by 128 into int8 with exact int32 corrections for
the zero-points (``affine_bmm``, ``edadm.deploy.kernels``): on CPU, while the inner dimension
is small enough for float32 to sum the integer products exactly, one float32 batched GEMM; else
one ``int_mm`` per batch x head pair. Cross-attention's L text
tokens against the query's h * w need nothing special; its to_k / to_v run integer on the
text features [B, L, D] like any Linear. A guided batch [uncond; cond] shares one timestep,
hence one group.

Left on the fake path, and listed in the report: layers whose input stays in float (the last
layer, docs/method.md §0), weights whose codes do not fit int8 around their zero-point (asymmetric
weights, 8-bit one-sided channels), non-zero padding modes, attention whose q, k, v or softmax
output stays in float.

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
from diffusers.models.attention_processor import Attention
from torch import nn

from edadm.deploy.kernels import (
    affine_bmm,
    int_mm,
    onednn_qconv2d,
    onednn_qlinear,
    resolve_backend,
)
from edadm.quant.attention import QuantAttnProcessor
from edadm.quant.layers import QuantLayer
from edadm.quant.model import replace_submodule
from edadm.quant.quantizer import UniformAffineQuantizer, grid_max, quantize

logger = logging.getLogger(__name__)


@dataclass
class IntegerReport:
    """What ``to_integer`` did: the backend, the layers on integer kernels, the ones left fake."""

    backend: str
    integer_layers: list[str] = field(default_factory=list)
    fake_layers: dict[str, str] = field(default_factory=dict)  # name -> why
    integer_attention: list[str] = field(default_factory=list)  # Attention modules: QK^T, softmax x V

    def summary(self) -> str:
        return (
            f"{len(self.integer_layers)} layers and {len(self.integer_attention)} attention products' "
            f"pairs on integer kernels ({self.backend}), {len(self.fake_layers)} left fake-quantized"
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
        self.packed_for: list[tuple[int, ...] | None] = []  # per group: the input shape it was packed for


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
            part.packed_for = [None] * len(part.packed)
            self.parts.append(part)

    def extra_repr(self) -> str:
        return f"{self.layer_type}, out={self.out_channels}, parts={len(self.parts)}, backend={self.backend}"

    def _prepack(self, part: _Part, group: int, input_shape: tuple[int, ...] | None = None) -> torch.Tensor:
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
                None if input_shape is None else list(input_shape),
            )
        return torch.ops.onednn.qlinear_prepack(part.weight, None)

    def _packed_conv_weight(self, part: _Part, group: int, input_shape: torch.Size) -> torch.Tensor:
        """``part``'s packed weight, repacked in eager mode for the input shape it meets.

        Packed without the input shape, the weight's blocked layout is oneDNN's guess, and the
        kernel chosen for the real shape (AMX / VNNI brgemm) reorders it at every call (seen with
        ONEDNN_VERBOSE=1); packed for the shape, it is used as it is: same output, less time a
        call. Compiled code uses what eager packed (``CompiledUNet`` runs one eager call first).
        """
        if part.packed_for[group] != tuple(input_shape) and not torch.compiler.is_compiling():
            part.packed[group] = self._prepack(part, group, tuple(input_shape))
            part.packed_for[group] = tuple(input_shape)
        return part.packed[group]

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
            if self.backend == "onednn" and self.layer_type == "Conv2d":
                # oneDNN's layout, made here: compiled, inductor writes the codes in it at once
                # (the first layer's NCHW input, a split's channel slice) instead of the op copying
                codes = codes.contiguous(memory_format=torch.channels_last)
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
        scale, zero_point = part.act_scales[group], part.act_zero_points[group]
        if self.layer_type == "Conv2d":
            packed = self._packed_conv_weight(part, group, codes.shape)
            return onednn_qconv2d(
                codes, scale, zero_point, packed, part.weight_scale, self.weight_zero_points, bias,
                self.stride, self.padding, self.dilation, self.groups, self.out_channels,
                list(self.kernel_size),
            )  # fmt: skip
        lead = codes.shape[:-1]
        y = onednn_qlinear(
            codes.reshape(-1, codes.shape[-1]), scale, zero_point, part.packed[group],
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


# ---------------------------------------------------------------------------------------------
# Attention products
# ---------------------------------------------------------------------------------------------
def shifted_codes(
    quantizer: UniformAffineQuantizer, x: torch.Tensor, group_repeats: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` [R, ...] on ``quantizer``'s grid as int8 codes shifted by 128, with what undoes it.

    Returns ``(codes - 128 as int8, offset = 128 - zero_point [R] int32, scale [R] float32)``, so
    that x^ = (shifted + offset) * scale: the fake-quantized values, from the same rounding
    (``quantize``). Any grid of <= 8 bits fits the shift, symmetric (zero-point 2^(b-1)) or
    one-sided (the softmax output's, zero-point 0). With timestep groups each of the R rows
    (samples, or samples x ``group_repeats`` heads) has its group's scale.
    """
    rows = x.shape[0]
    if quantizer.timestep_groups is None:
        scale, zero_point = quantizer.scale.expand(rows), quantizer.zero_point.expand(rows)
    else:
        groups = quantizer.timestep_groups.batch_index(rows, x.device, group_repeats)
        scale, zero_point = quantizer.scale[groups], quantizer.zero_point[groups]
    scale, zero_point = scale.detach().float(), zero_point.round()
    codes = quantize(x.float(), scale, zero_point, quantizer.bits, channel_axis=0)
    return (codes - 128).to(torch.int8), (128 - zero_point).to(torch.int32), scale


class IntegerAttnProcessor(QuantAttnProcessor):
    """QuantAttnProcessor whose two products, QK^T and softmax x V, run on int8 kernels.

    The operands are the codes the fake quantizers give (``shifted_codes``), the int32 products
    are exact, and they are rescaled into float by the operands' scales: the result differs
    from the fake path's float products by float rounding only. The softmax runs in float32
    between them, as in the fake path. The projections stay whatever layers they are.
    """

    def __init__(self, fake: QuantAttnProcessor) -> None:
        super().__init__(fake.original_processor, fake.qkv_bits, fake.softmax_bits)
        self.act_quantizer_q, self.act_quantizer_k = fake.act_quantizer_q, fake.act_quantizer_k
        self.act_quantizer_v, self.act_quantizer_w = fake.act_quantizer_v, fake.act_quantizer_w
        self.use_act_quant = fake.use_act_quant

    def attend(
        self,
        attn: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        heads = attn.heads
        q, q_offset, q_scale = shifted_codes(self.act_quantizer_q, query)
        k, k_offset, k_scale = shifted_codes(self.act_quantizer_k, key)
        v, v_offset, v_scale = shifted_codes(self.act_quantizer_v, value)
        q, k, v = attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), attn.head_to_batch_dim(v)

        def per_head(t: torch.Tensor) -> torch.Tensor:  # [B] -> [B x heads], sample-major
            return t.repeat_interleave(heads)

        scores = affine_bmm(q, per_head(q_offset), k.transpose(1, 2).contiguous(), per_head(k_offset))
        scores = scores.float() * (per_head(q_scale * k_scale) * attn.scale)[:, None, None]
        if attention_mask is not None:
            scores = scores + attention_mask
        probs, probs_offset, probs_scale = shifted_codes(self.act_quantizer_w, scores.softmax(dim=-1), heads)
        out = affine_bmm(probs, probs_offset, v, per_head(v_offset))
        return (out.float() * (probs_scale * per_head(v_scale))[:, None, None]).to(query.dtype)


def why_fake_attention(processor: QuantAttnProcessor) -> str | None:
    """Why ``processor``'s products cannot run on int8 kernels (None when they can)."""
    quantizers = (
        processor.act_quantizer_q, processor.act_quantizer_k,
        processor.act_quantizer_v, processor.act_quantizer_w,
    )  # fmt: skip
    if any(q is None for q in quantizers) or not processor.use_act_quant:
        return "q, k, v or the softmax output in float"
    if not all(q.initialized for q in quantizers):
        return "activation range not calibrated"
    return None


def signed_weight(layer: QuantLayer) -> torch.Tensor:
    """The layer's weight codes minus their zero-points (per output channel and input half)."""
    _, zero_point = layer.weight_qparams()
    return layer.weight_int.to(torch.int16) - zero_point.round().to(torch.int16)


def why_fake(layer: QuantLayer) -> str | None:
    """Why ``layer`` cannot run on an integer kernel (None when it can)."""
    if layer.weight_quantizer is None or not layer.use_weight_quant:
        return "weight in float"
    if layer.act_quantizer is None or not layer.use_act_quant:
        return "input in float (docs/method.md §0: the last layer's input)"
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
    for name, attn in model.named_modules():
        if not isinstance(attn, Attention) or not isinstance(attn.processor, QuantAttnProcessor):
            continue
        reason = why_fake_attention(attn.processor)
        if reason:
            report.fake_layers[f"{name} (products)"] = reason
            continue
        attn.set_processor(IntegerAttnProcessor(attn.processor))
        report.integer_attention.append(name)
    logger.info("integer model: %s", report.summary())
    for name, reason in report.fake_layers.items():
        logger.info("fake-quantized: %s (%s)", name, reason)
    return report
