"""The integer kernels behind ``edadm.deploy.integer``: oneDNN convolutions and linears, int8 GEMMs.

Pure arithmetic on codes (no quantized modules): ``resolve_backend`` picks ``onednn`` (x86
CPU) or ``int_mm`` (``torch._int_mm``, cuBLASLt on CUDA); the oneDNN kernels are custom ops
(``edadm::onednn_qconv2d_channels_last``, ``edadm::onednn_qlinear``) so ``torch.compile``
keeps them as they are; ``int8_bmm`` / ``affine_bmm`` are attention's exact int32 products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


# The oneDNN kernels as opaque custom ops: torch.compile (edadm.deploy.compiled) then calls them
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
