"""The compiled integer model (edadm.deploy.compiled): torch.compile keeps fake quantization's codes.

One reconstructed tiny model serves every test, at one batch size, so inductor compiles the
whole UNet once (later compiles of the same graph hit its FX graph cache).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
import zarr
from click.testing import CliRunner
from diffusers import DDPMPipeline, DDPMScheduler
from tiny_models import assert_samples_agree, quick_recon, tiny_attn_unet, tiny_calib

from edadm.deploy import compiled as compiled_module
from edadm.deploy.compiled import CompiledUNet, compile_integer, compile_unavailable_reason
from edadm.deploy.integer import to_integer
from edadm.deploy.kernels import onednn_available
from edadm.diffusion.samples import SampleConfig, generate_samples, load_samples
from edadm.diffusion.sampling import SamplerConfig
from edadm.quant.config import QuantConfig
from edadm.quant.state import load_quant_model
from edadm.recon.api import run_reconstruction

ROOT = Path(__file__).resolve().parents[1]
BATCH = 4

pytestmark = pytest.mark.skipif(
    not onednn_available() or compile_unavailable_reason("cpu") is not None,
    reason="needs the oneDNN int8 kernels and inductor's C++ compiler",
)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y - reference).abs().mean() / reference.abs().mean())


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory) -> Path:
    """A tiny DDPM pipeline (model/) and its W8A8 state (quant/), as the model / reconstruct stages write."""
    root = tmp_path_factory.mktemp("compiled")
    unet = tiny_attn_unet()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root / "model")
    run_reconstruction(
        unet,
        tiny_calib(8),
        QuantConfig(w_bits=8, a_bits=8),
        quick_recon(method="none"),
        root / "quant",
        root / "work",
        "cpu",
    )
    return root


@pytest.fixture(scope="module")
def models(pipeline_dirs) -> dict[str, torch.nn.Module]:
    fake = load_quant_model(pipeline_dirs / "model", pipeline_dirs / "quant").eval()
    integer = copy.deepcopy(fake)
    to_integer(integer, "onednn")
    return {"fake": fake, "int": integer, "compiled": compile_integer(integer)}


def test_compiled_layer_gives_the_eager_codes(models) -> None:
    """Per layer, fused with the SiLU before it: the same uint8 codes, so the same outputs."""
    integer = models["int"]
    g = torch.Generator().manual_seed(0)
    for name, shape in (
        ("up_blocks.0.resnets.0.conv1", (BATCH, 32, 4, 4)),
        ("down_blocks.1.attentions.0.to_q", (BATCH, 16, 16)),
    ):
        layer = integer.get_submodule(name)
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            eager = layer(F.silu(x))
            fused = torch.compile(lambda x, layer=layer: layer(F.silu(x)), dynamic=False)(x)
        assert relative_error(fused, eager) < 1e-6, name


def test_compiled_model_matches_eager_and_fake(models) -> None:
    calib = tiny_calib(BATCH, seed=7)
    with torch.no_grad():
        fake = models["fake"](calib.x, calib.t).sample
        eager = models["int"](calib.x, calib.t).sample
        compiled = models["compiled"](calib.x, calib.t).sample
        # a smaller batch is padded to the compiled one: the same rows
        part = models["compiled"](calib.x[:3], calib.t[:3]).sample
    assert isinstance(models["compiled"], CompiledUNet) and models["compiled"].fallback_reason is None
    # only fused float arithmetic differs (GroupNorm's sums, the time embedding's sin / cos)
    assert relative_error(compiled, eager) < 1e-4
    assert relative_error(compiled, fake) < 1e-4
    assert part.shape[0] == 3 and relative_error(part, compiled[:3]) < 1e-5


def test_compiled_sampling_matches_eager(models, tmp_path, tiny_scheduler) -> None:
    sampler, config = SamplerConfig(steps=4), SampleConfig(n=BATCH, batch_size=BATCH)
    for name in ("int", "compiled"):
        generate_samples(
            models[name], tiny_scheduler, sampler, config, tmp_path / f"{name}.zarr", torch.device("cpu")
        )
    eager, compiled = (load_samples(tmp_path / f"{n}.zarr")[0] for n in ("int", "compiled"))
    assert_samples_agree(compiled, eager)


def test_sample_stage_int_compile(pipeline_dirs, tmp_path, monkeypatch, caplog) -> None:
    params = yaml.safe_load((ROOT / "tests" / "profiles" / "tiny.yaml").read_text())
    params["sampler"]["steps"] = 3
    params["sample"].update(n=BATCH + 2, batch_size=BATCH, mode="int")  # the last batch is padded
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    spec = importlib.util.spec_from_file_location("stage_sample", ROOT / "stages" / "sample_quant.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    dirs = ["--model", str(pipeline_dirs / "model"), "--quant", str(pipeline_dirs / "quant")]
    for name, flag in (("eager", "false"), ("compiled", "true")):
        args = [*dirs, "--set", f"sample.int_compile={flag}", "--out", f"{name}.zarr"]
        with caplog.at_level(logging.WARNING, logger="edadm.deploy.compiled"):
            result = CliRunner().invoke(stage.main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    assert "eager" not in caplog.text  # compiled, not the fallback
    eager, compiled = (zarr.open_group(f"{n}.zarr", mode="r") for n in ("eager", "compiled"))
    assert compiled.attrs["sample"]["int_compile"] is True and eager.attrs["sample"]["int_compile"] is False
    assert_samples_agree(compiled["images"][:], eager["images"][:])


def test_no_compiler_falls_back_to_eager_with_a_warning(models, monkeypatch, caplog) -> None:
    monkeypatch.setattr(compiled_module, "compile_unavailable_reason", lambda device: "no C++ compiler found")
    with caplog.at_level(logging.WARNING, logger="edadm.deploy.compiled"):
        assert compile_integer(models["int"]) is models["int"]
    assert "no C++ compiler found" in caplog.text and "eager" in caplog.text


def test_a_failed_compilation_runs_eager_with_a_warning(models, caplog) -> None:
    from torch._inductor.exc import InvalidCxxCompiler

    def fail(*args, **kwargs):
        raise InvalidCxxCompiler

    wrapper = CompiledUNet(models["int"])
    object.__setattr__(wrapper, "_compiled", fail)  # what torch.compile raises without g++
    calib = tiny_calib(2, seed=7)
    with caplog.at_level(logging.WARNING, logger="edadm.deploy.compiled"), torch.no_grad():
        out = wrapper(calib.x, calib.t).sample
        assert torch.equal(out, models["int"](calib.x, calib.t).sample)
    assert (
        wrapper.fallback_reason.startswith("InvalidCxxCompiler")
        and "running the integer model eager" in caplog.text
    )
