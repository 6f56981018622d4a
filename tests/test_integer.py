"""Integer inference: int8 kernels reproduce fake quantization (same codes, int32 accumulation)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import fake_and_integer_samples, tiny_attn_unet, tiny_calib

from edadm.diffusion.samples import SampleConfig
from edadm.diffusion.sampling import SamplerConfig
from edadm.quant import QuantConfig, calibrate_activations, quantize_model
from edadm.quant.integer import IntegerLayer, int_mm, onednn_available, to_integer
from edadm.quant.layers import QuantLayer

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
    # every layer but conv_out (input in float, METHOD.md 0) runs integer, split shortcuts included
    assert list(report.fake_layers) == ["conv_out"]
    splits = [n for n, m in model.named_modules() if isinstance(m, QuantLayer) and m.split]
    assert splits and all(isinstance(integer_model.get_submodule(n), IntegerLayer) for n in splits)
    assert len(integer_model.get_submodule(splits[0]).parts) == 2


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
    assert np.abs(fake - integer).max() < 1e-3


def test_int_mm_pads_to_the_kernel_shape_rules() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (5, 27), generator=g, dtype=torch.int8)  # M <= 16, K not a multiple of 8
    b = torch.randint(-128, 128, (27, 3), generator=g, dtype=torch.int8)
    assert torch.equal(int_mm(a, b), a.int() @ b.int())
