"""The Python API: ``edadm.quantize`` in memory, ``edadm.load`` from either artifact, in a pipeline."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMScheduler
from safetensors.torch import load_file
from tiny_models import quick_recon, tiny_attn_unet, tiny_calib

import edadm
from edadm.deploy.export import export_quantized
from edadm.errors import ArtifactError, ParamError
from edadm.quant.config import QuantConfig
from edadm.quant.layers import QuantLayer
from edadm.recon.api import reconstruction_of, run_reconstruction


@pytest.fixture(scope="module")
def reconstructed(tmp_path_factory):
    """One reconstruction in memory, and the same run through the stage's file-writing path."""
    root = tmp_path_factory.mktemp("api")
    calib = tiny_calib(16)
    float_unet = tiny_attn_unet()
    float_unet.save_pretrained(root / "model" / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "model" / "scheduler")
    quant, recon = {"w_bits": 4, "a_bits": 8}, quick_recon(iters=3)
    model = edadm.quantize(copy.deepcopy(float_unet), calib, quant=quant, recon=recon)
    run_reconstruction(
        copy.deepcopy(float_unet), calib, QuantConfig(**quant), recon, root / "quant", root / "work", "cpu"
    )
    return root, calib, float_unet, model


def test_import_edadm_exposes_quantize_and_load_without_importing_the_library():
    code = "import sys, edadm; assert 'edadm.recon.api' not in sys.modules; edadm.quantize; edadm.load"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_quantize_returns_the_reconstructed_model_in_memory(reconstructed):
    root, calib, float_unet, model = reconstructed
    assert type(model) is type(float_unet)  # still the diffusers class: drops into its pipeline
    assert sum(isinstance(m, QuantLayer) for m in model.modules()) > 10
    made = reconstruction_of(model)
    assert made.quant == QuantConfig(w_bits=4, a_bits=8) and made.recon.iters == 3
    assert [e["step"] for e in made.result.report["steps"]][0] == "calibrate"
    # the stage's artifact holds the very state the in-memory call made (same inputs, same process)
    state = load_file(root / "quant" / "state.safetensors")
    conv = model.get_submodule("conv_in")
    assert torch.equal(state["conv_in.weight_int"], conv.weight_int)
    with torch.no_grad():
        quantized = model(calib.x, calib.t).sample
        floating = float_unet(calib.x, calib.t).sample
    assert 0 < (quantized - floating).abs().mean() < floating.abs().mean()


def test_load_reads_a_reconstruct_artifact_and_an_export_alike(reconstructed, tmp_path):
    root, calib, _, model = reconstructed
    from_dir = edadm.load(root / "quant")  # model_dir: `model` beside it
    export_quantized(from_dir, tmp_path / "model.safetensors")
    from_export = edadm.load(tmp_path / "model.safetensors")
    with torch.no_grad():
        expected = model(calib.x, calib.t).sample
        assert torch.equal(from_dir(calib.x, calib.t).sample, expected)
        assert torch.equal(from_export(calib.x, calib.t).sample, expected)
    integer = edadm.load(tmp_path / "model.safetensors", integer=True)
    with torch.no_grad():
        out = integer(calib.x, calib.t).sample
    # integer kernels: the same codes, float rounding apart (a code on a rounding boundary may flip)
    signal = expected.pow(2).mean()
    assert 10 * torch.log10(signal / (out - expected).pow(2).mean().clamp_min(1e-20)) > 30


def test_a_loaded_model_generates_in_its_diffusers_pipeline(reconstructed):
    root, _, float_unet, _ = reconstructed
    pipe = DDIMPipeline(
        unet=float_unet, scheduler=DDPMScheduler.from_pretrained(root / "model" / "scheduler")
    )
    pipe.unet = edadm.load(root / "quant")
    images = pipe(
        batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    images = images.images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_bad_input_to_the_api_is_a_clear_error(reconstructed, tmp_path):
    root, calib, float_unet, _ = reconstructed
    with pytest.raises(ParamError, match=r"quant\.w_bits=5.*not a supported|unknown param"):
        edadm.quantize(copy.deepcopy(float_unet), calib, quant={"w_bits": 5, "nonsense": 1})
    with pytest.raises(TypeError, match="CalibrationSet"):
        edadm.quantize(copy.deepcopy(float_unet), calib.x)
    with pytest.raises(ArtifactError, match="not found"):
        edadm.load(tmp_path / "nothing")
    with pytest.raises(ArtifactError, match="needs the float model"):
        edadm.load(root / "quant", model_dir=tmp_path / "no-model")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ArtifactError, match="neither a reconstruct artifact"):
        edadm.load(tmp_path / "folder")
