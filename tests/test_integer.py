"""Integer inference: int8 kernels reproduce fake quantization (same codes, int32 accumulation)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention
from tiny_models import assert_samples_agree, fake_and_integer_samples, tiny_attn_unet, tiny_calib

from edadm.deploy import kernels as integer_kernels
from edadm.deploy.integer import IntegerAttnProcessor, IntegerLayer, shifted_codes, to_integer
from edadm.deploy.kernels import (
    FLOAT_EXACT_K,
    FLOAT_EXACT_K_CENTERED,
    affine_bmm,
    int8_bmm,
    int_mm,
    onednn_available,
)
from edadm.diffusion.samples import SampleConfig
from edadm.diffusion.sampling import SamplerConfig
from edadm.quant.config import QuantConfig
from edadm.quant.layers import QuantLayer
from edadm.quant.model import calibrate_activations, quantize_model

BACKENDS = ["int_mm"] + (["onednn"] if onednn_available() else [])


def calibrated(w_bits: int, a_bits: int, **config) -> torch.nn.Module:
    calib = tiny_calib()
    model = quantize_model(tiny_attn_unet(), QuantConfig(w_bits=w_bits, a_bits=a_bits, **config))
    calibrate_activations(model, calib.batches(8, "cpu"))
    return model.eval()


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y - reference).abs().mean() / reference.abs().mean())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("w_bits", "a_bits"), [(8, 8), (4, 8), (4, 6)])
def test_integer_model_matches_fake_quantization(backend: str, w_bits: int, a_bits: int) -> None:
    model = calibrated(w_bits, a_bits)
    calib = tiny_calib(4, seed=7)
    with torch.no_grad():
        fake = model(calib.x, calib.t).sample
        integer_model = copy.deepcopy(model)
        report = to_integer(integer_model, backend)
        integer = integer_model(calib.x, calib.t).sample
    # the bound is 1% at W8A8; the same codes leave only float rounding (~1e-7)
    assert relative_error(integer, fake) < 1e-4
    assert report.backend == backend
    # every layer but conv_out (input in float, docs/method.md §0) runs integer, split shortcuts included
    assert list(report.fake_layers) == ["conv_out"]
    # and both products of every attention
    attentions = [n for n, m in model.named_modules() if isinstance(m, Attention)]
    assert attentions and report.integer_attention == attentions
    assert all(isinstance(integer_model.get_submodule(n).processor, IntegerAttnProcessor) for n in attentions)
    splits = [n for n, m in model.named_modules() if isinstance(m, QuantLayer) and m.split]
    assert splits and all(isinstance(integer_model.get_submodule(n), IntegerLayer) for n in splits)
    assert len(integer_model.get_submodule(splits[0]).parts) == 2


@pytest.mark.skipif(not onednn_available(), reason="oneDNN int8 kernels not in this PyTorch build")
def test_onednn_convolutions_repack_for_the_input_shape_and_give_the_same_output() -> None:
    model = calibrated(8, 8)
    to_integer(model, "onednn")
    calib = tiny_calib(4, seed=7)
    layer = model.get_submodule("conv_in")
    part = layer.parts[0]
    assert part.packed_for == [None]  # packed at to_integer, before any input was seen
    unshaped = part.packed[0]
    with torch.no_grad():
        first = model(calib.x, calib.t).sample
        assert part.packed_for == [tuple(calib.x.shape)] and part.packed[0] is not unshaped
        repacked = part.packed[0]
        again = model(calib.x, calib.t).sample  # the same shape: packed once
        assert part.packed[0] is repacked
        # the layer alone with the weight packed without a shape: the same output
        x = torch.randn(4, *calib.x.shape[1:])
        shaped = layer(x)
        part.packed[0], part.packed_for[0] = unshaped, tuple(x.shape)
        assert torch.equal(layer(x), shaped)
    assert torch.equal(first, again)


def test_weights_that_do_not_fit_int8_stay_fake() -> None:
    model = calibrated(8, 8)
    layer = model.get_submodule("conv_in")
    # a one-sided 8-bit channel: zero-point 0, codes up to 255, beyond int8 around the zero-point
    layer.weight_quantizer.zero_point[0] = 0
    layer.weight_int[0] = 200
    calib = tiny_calib(2, seed=3)
    with torch.no_grad():
        fake = model(calib.x, calib.t).sample
        report = to_integer(model, "int_mm")
        assert "int8" in report.fake_layers["conv_in"]
        assert isinstance(model.conv_in, QuantLayer)
        assert relative_error(model(calib.x, calib.t).sample, fake) < 1e-4


def test_to_integer_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="quantize_model"):
        to_integer(tiny_attn_unet())
    with pytest.raises(ValueError, match="unknown"):
        to_integer(calibrated(8, 8), "tensorrt")


def test_integer_sampling_matches_fake_sampling(tmp_path, tiny_scheduler) -> None:
    model = calibrated(8, 8)
    sampler, config = SamplerConfig(steps=4), SampleConfig(n=4, batch_size=4)
    fake, integer = fake_and_integer_samples(model, tiny_scheduler, sampler, config, tmp_path)
    assert_samples_agree(integer, fake)


def test_int_mm_pads_to_the_kernel_shape_rules() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (5, 27), generator=g, dtype=torch.int8)  # M <= 16, K not a multiple of 8
    b = torch.randint(-128, 128, (27, 3), generator=g, dtype=torch.int8)
    assert torch.equal(int_mm(a, b, pad=True), a.int() @ b.int())
    assert torch.equal(int_mm(a, b, pad=False), a.int() @ b.int())


@pytest.mark.parametrize("k", [FLOAT_EXACT_K_CENTERED, FLOAT_EXACT_K_CENTERED + 1])
def test_affine_bmm_is_the_exact_product_of_the_shifted_codes(k: int) -> None:
    """At K = FLOAT_EXACT_K_CENTERED one float32 GEMM on CPU, one more int8_bmm and corrections."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (6, 5, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (6, k, 9), generator=g, dtype=torch.int8)
    a[0], b[0] = 127, 127  # with offsets 128: every product 255^2, the float path's worst case
    a_offset = torch.tensor([128, 0, 120, 128, 0, 1], dtype=torch.int32)  # 128 - zero_point
    b_offset = torch.tensor([0, 128, 8, 128, 128, 0], dtype=torch.int32)
    expected = (a.long() + a_offset[:, None, None]) @ (b.long() + b_offset[:, None, None])
    assert torch.equal(affine_bmm(a, a_offset, b, b_offset).long(), expected)


@pytest.mark.parametrize("k", [FLOAT_EXACT_K, FLOAT_EXACT_K + 1])
def test_int8_bmm_is_exact_on_the_float_gemm_and_on_int8_kernels(k: int) -> None:
    """At K = FLOAT_EXACT_K the CPU takes the float32 GEMM, one more and the int8 kernels; both
    must give the int64 product, worst case included (every code -128: sums of 2^14 x K)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (3, 4, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (3, k, 5), generator=g, dtype=torch.int8)
    a[0], b[0] = -128, -128
    a[1, :, 1::2] = 127  # partial sums that change sign: no cancellation saves the float path
    expected = a.long() @ b.long()
    assert expected[0].max() == 2**14 * k
    result = int8_bmm(a, b)
    assert result.dtype == torch.int32 and torch.equal(result.long(), expected)


@pytest.mark.parametrize("a_bits", [8, 4])
def test_shifted_codes_give_the_fake_quantized_values(a_bits: int) -> None:
    model = calibrated(8, a_bits)
    processor = next(m.processor for m in model.modules() if isinstance(m, Attention))
    x = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(1))
    softmax = x.softmax(-1)
    for quantizer, tensor in [(processor.act_quantizer_q, x), (processor.act_quantizer_w, softmax)]:
        codes, offset, scale = shifted_codes(quantizer, tensor)
        assert codes.dtype == torch.int8 and offset.shape == scale.shape == (3,)
        dequantized = (codes.float() + offset[:, None, None]) * scale[:, None, None]
        torch.testing.assert_close(dequantized, quantizer(tensor), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernels", ["float32 GEMM", "int8"])
def test_integer_attention_products_match_the_fake_ones(kernels: str, monkeypatch) -> None:
    """Both products, exact integers (on the float32 GEMM, as 16 tokens take on CPU, or forced
    onto int8 kernels), against the fake processor's float products, several heads."""
    if kernels == "int8":
        monkeypatch.setattr(integer_kernels, "FLOAT_EXACT_K_CENTERED", 0)
        monkeypatch.setattr(integer_kernels, "FLOAT_EXACT_K", 0)
    model = calibrated(8, 8)
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    fake = attn.processor
    g = torch.Generator().manual_seed(2)
    channels = attn.to_q.weight.shape[0]
    query, key, value = (torch.randn(4, 16, channels, generator=g) for _ in range(3))
    integer = IntegerAttnProcessor(fake)
    for heads in (1, 2):
        attn.heads = heads
        with torch.no_grad():
            expected = fake.attend(attn, query, key, value, None)
            got = integer.attend(attn, query, key, value, None)
        assert got.shape == expected.shape == (4 * heads, 16, channels // heads)
        assert relative_error(got, expected) < 1e-4
