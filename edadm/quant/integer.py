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

Attention's two products, QK^T and softmax x V, run on int8 kernels too
(``IntegerAttnProcessor``): q, k, v and the softmax output already have codes (their
QuantAttnProcessor quantizers), shifted by 128 into int8 with exact int32 corrections for
the zero-points (``affine_bmm``), one ``int_mm`` per batch x head. Cross-attention's L text
tokens against the query's h * w need nothing special; its to_k / to_v run integer on the
text features [B, L, D] like any Linear. A guided batch [uncond; cond] shares one timestep,
hence one group.

Left on the fake path, and listed in the report: layers whose input stays in float (the last
layer, METHOD.md 0), weights whose codes do not fit int8 around their zero-point (asymmetric
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

from edadm.quant.attention import QuantAttnProcessor
from edadm.quant.layers import QuantLayer
from edadm.quant.model import replace_submodule
from edadm.quant.quantizer import UniformAffineQuantizer, grid_max, quantize

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
# Registered with torch.library.Library, not the @custom_op decorator: the decorator's Python
# autograd and dispatch layers cost 35 to 55 us a call (2-core Xeon, a 1 x 32 x 4 x 4 conv whose
# kernel takes 36 us), about 3 ms of the embedded UNet's forward; this costs about 8.
_LIBRARY = torch.library.Library("edadm", "FRAGMENT")


def _define(schema: str, kernel, fake) -> torch._ops.OpOverloadPacket:
    """``edadm::<schema>`` with ``kernel`` on every device (CompositeExplicitAutograd: the
    packed weights are MkldnnCPU tensors) and ``fake`` for tracing; returns the op."""
    name = schema.split("(", 1)[0]
    _LIBRARY.define(schema)
    _LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"edadm::{name}", fake, lib=_LIBRARY)
    return getattr(torch.ops.edadm, name)


def _qconv2d_kernel(
    codes, scale, zero_point, packed, weight_scale, weight_zero_points, bias,
    stride, padding, dilation, groups, out_channels, kernel_size,
):  # fmt: skip
    # channels-last in and out: oneDNN's own layout, so its output needs no reorder and the
    # element-wise ops after it (and the next layer's codes) stay channels-last; the fake
    # kernel promises these strides to inductor
    return torch.ops.onednn.qconv2d_pointwise(
        codes.contiguous(memory_format=torch.channels_last), scale, zero_point, packed,
        weight_scale, weight_zero_points, bias, stride, padding, dilation, groups,
        1.0, 0, torch.float32, "none", [], "",
    ).contiguous(memory_format=torch.channels_last)  # fmt: skip


def _qconv2d_fake(
    codes, scale, zero_point, packed, weight_scale, weight_zero_points, bias,
    stride, padding, dilation, groups, out_channels, kernel_size,
):  # fmt: skip
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


# int8 convolution of uint8 codes [B, C, H, W] -> float32 [B, out_channels, H', W'], channels-last
onednn_qconv2d = _define(
    "onednn_qconv2d_channels_last(Tensor codes, float scale, int zero_point, Tensor packed, "
    "Tensor weight_scale, Tensor weight_zero_points, Tensor? bias, int[] stride, int[] padding, "
    "int[] dilation, int groups, int out_channels, int[] kernel_size) -> Tensor",
    _qconv2d_kernel,
    _qconv2d_fake,
)


def _qlinear_kernel(codes, scale, zero_point, packed, weight_scale, weight_zero_points, bias, out_features):
    return torch.ops.onednn.qlinear_pointwise(
        codes.contiguous(), scale, zero_point, packed, weight_scale, weight_zero_points, bias,
        1.0, 0, torch.float32, "none", [], "",
    ).contiguous()  # fmt: skip


def _qlinear_fake(codes, scale, zero_point, packed, weight_scale, weight_zero_points, bias, out_features):
    return codes.new_empty((codes.shape[0], out_features), dtype=torch.float32)


# int8 linear layer of uint8 codes [M, K] -> float32 [M, out_features]
onednn_qlinear = _define(
    "onednn_qlinear(Tensor codes, float scale, int zero_point, Tensor packed, Tensor weight_scale, "
    "Tensor weight_zero_points, Tensor? bias, int out_features) -> Tensor",
    _qlinear_kernel,
    _qlinear_fake,
)


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


def int_mm(a: torch.Tensor, b: torch.Tensor, pad: bool | None = None) -> torch.Tensor:
    """int8 [M, K] x int8 [K, N] -> int32 [M, N] by ``torch._int_mm``, padded to its shape rules.

    cuBLASLt wants M > 16 and K, N multiples of 8; zero rows and columns add nothing to the
    products, so the result is sliced back to [M, N]. ``pad``: default on CUDA only (the CPU
    kernel takes any shape).
    """
    m, k = a.shape
    n = b.shape[1]
    if not (a.is_cuda if pad is None else pad):
        return torch._int_mm(a.contiguous(), b.contiguous())
    pad_m, pad_k, pad_n = max(0, 17 - m), -k % 8, -n % 8
    if pad_m or pad_k:
        a = F.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = F.pad(b, (0, pad_n, 0, pad_k))
    return torch._int_mm(a.contiguous(), b.contiguous())[:m, :n]


# ---------------------------------------------------------------------------------------------
# Attention products
# ---------------------------------------------------------------------------------------------
# Largest K for which float32 sums K integer products exactly (every partial sum within 2^24):
FLOAT_EXACT_K = 2**24 // 128**2  # of two int8 codes (1024)
FLOAT_EXACT_K_CENTERED = 2**24 // 255**2  # of two codes less their zero-points (258)


@torch.library.custom_op("edadm::int8_bmm", mutates_args=())
def int8_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [R, M, K] x int8 [R, K, N] -> int32 [R, M, N], exactly.

    PyTorch has no batched int8 GEMM: on int8 kernels, attention's R = batch x heads pairs run
    one ``int_mm`` each, and R small products cost more in calls than they save (3x the FP32
    model's whole attention on the embedded model, 64 tokens). On CPU, while K <= FLOAT_EXACT_K
    the float32 batched GEMM gives the very same integers in one call: every product of two
    int8 codes is at most 2^14 in magnitude, so every partial sum of K of them is an integer
    within 2^24, which float32 holds exactly, in any summation order. (Not on CUDA: TF32 may
    round the operands.) An opaque op, so that ``torch.compile`` calls it once instead of
    unrolling the loop.
    """
    if a.device.type == "cpu" and a.shape[2] <= FLOAT_EXACT_K:
        return torch.bmm(a.float(), b.float()).to(torch.int32)
    return torch.stack([int_mm(a[r], b[r]) for r in range(a.shape[0])])


@int8_bmm.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]), dtype=torch.int32)


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


def affine_bmm(
    a: torch.Tensor, a_offset: torch.Tensor, b: torch.Tensor, b_offset: torch.Tensor
) -> torch.Tensor:
    """(a + a_offset) @ (b + b_offset) exactly, in int32, on int8 kernels.

    a: int8 [R, M, K], b: int8 [R, K, N], offsets int32 [R]. Expanded, the product is a @ b
    (``int8_bmm``) plus rank-one corrections: a_offset x column sums of b, b_offset x row sums
    of a, and a_offset x b_offset x K. Exact while K x 255^2 < 2^31 (K up to 33,000 tokens).
    On CPU, K <= FLOAT_EXACT_K_CENTERED takes one float32 GEMM of a + a_offset and b + b_offset.
    """
    a_offset, b_offset = a_offset[:, None, None], b_offset[:, None, None]
    if a.device.type == "cpu" and a.shape[2] <= FLOAT_EXACT_K_CENTERED:
        # small K (attention at the embedded model's 64 tokens): the codes less their
        # zero-points (|.| <= 255) on the float32 GEMM, exact as int8_bmm says; plain ops, so
        # inductor fuses the conversions into the kernels that make the codes
        return torch.bmm(a.float() + a_offset, b.float() + b_offset).to(torch.int32)
    products = int8_bmm(a, b)
    products += a_offset * b.sum(dim=1, dtype=torch.int32)[:, None, :]
    products += b_offset * a.sum(dim=2, dtype=torch.int32)[:, :, None]
    return products + a_offset * b_offset * a.shape[2]


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
