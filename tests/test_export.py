"""edadm.deploy.packing / export: packed codes, the self-contained file, `edadm export` / `inspect`."""

from __future__ import annotations

import logging

import pytest
import torch
from click.testing import CliRunner
from diffusers import UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import quick_recon, tiny_attn_unet, tiny_calib, tiny_cond_unet

from edadm.cli import main
from edadm.deploy.export import (
    EXPORT_SCHEMA_VERSION,
    export_quantized,
    export_summary,
    fp32_size_bytes,
    load_exported,
)
from edadm.deploy.packing import pack_codes, unpack_codes
from edadm.errors import ArtifactError
from edadm.inspect import describe
from edadm.quant.config import QuantConfig
from edadm.quant.model import calibrate_activations, quant_layers, quantize_model, set_quant_state
from edadm.quant.state import SCHEMA_VERSION, load_quant_model, save_quant_state
from edadm.recon.api import run_reconstruction

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(1,), (7,), (6, 5, 3, 3), (16, 33), (0, 4)])
def test_pack_round_trip(bits: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    numel = codes.numel()
    assert packed.dtype == torch.uint8 and packed.ndim == 1
    assert packed.numel() == ((numel + 1) // 2 if bits <= 4 else numel)
    assert torch.equal(unpack_codes(packed, bits, shape), codes)


def test_pack_layout_low_nibble_first() -> None:
    codes = torch.tensor([1, 2, 3, 15, 7], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [0x21, 0xF3, 0x07]  # odd count: zero high nibble
    assert pack_codes(codes, 8).tolist() == codes.tolist()
    grid = torch.arange(256, dtype=torch.uint8).reshape(16, 16)  # the whole 8-bit grid
    assert torch.equal(unpack_codes(pack_codes(grid, 8), 8, grid.shape), grid)


def test_pack_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="outside the 4-bit grid"):
        pack_codes(torch.tensor([3, 16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="outside the 3-bit grid"):
        pack_codes(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="2 to 8 bits"):
        pack_codes(torch.zeros(4, dtype=torch.uint8), 9)
    packed = pack_codes(torch.zeros(10, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=r"5 packed bytes do not hold a \(3, 4\) tensor"):
        unpack_codes(packed, 4, (3, 4))
    with pytest.raises(ValueError, match="flat uint8"):
        unpack_codes(packed.float(), 4, (10,))
    with pytest.raises(ValueError, match="padding nibble"):
        unpack_codes(torch.tensor([0x10], dtype=torch.uint8), 4, (1,))
    with pytest.raises(ValueError, match="outside the 3-bit grid"):
        unpack_codes(torch.tensor([0xFF], dtype=torch.uint8), 3, (2,))


# ---------------------------------------------------------------------------------------------
# Export / load round trip
# ---------------------------------------------------------------------------------------------
def calibrated(unet: torch.nn.Module, config: QuantConfig, text: bool = False) -> tuple:
    """A fake-quant copy of ``unet`` with calibrated activation ranges, and test inputs."""
    calib = tiny_calib(8, channels=unet.config.in_channels, text=text)
    model = quantize_model(unet, config, example_inputs=calib.model_inputs(slice(0, 1), "cpu"))
    calibrate_activations(model, calib.batches(8, "cpu"))
    return model, calib.model_inputs(slice(0, 4), "cpu")


@pytest.mark.parametrize("w_bits", [4, 8])
def test_export_load_bitwise_equal(tmp_path, w_bits: int) -> None:
    unet = tiny_attn_unet()
    model, inputs = calibrated(unet, QuantConfig(w_bits=w_bits, a_bits=8))
    path = tmp_path / "model.safetensors"
    summary = export_quantized(model, path, metadata={"run": {"seed": 3}})
    assert summary["file_bytes"] == path.stat().st_size
    assert summary["fp32_bytes"] == fp32_size_bytes(unet) == export_summary(path)["fp32_bytes"]

    # what the file holds: codes instead of float weights, quantizer state, float rest
    stored = load_file(path)
    layers = quant_layers(model)
    assert summary["quantized_layers"] == len(layers)
    for name, layer in layers.items():
        assert f"{name}.weight" not in stored and f"{name}.weight_int" not in stored
        packed = stored[f"{name}.weight_packed"]
        per_byte = 2 if layer.w_bits <= 4 else 1
        assert packed.dtype == torch.uint8 and packed.numel() == -(-layer.weight.numel() // per_byte)
        assert int(stored[f"{name}.weight_quantizer.bits"]) == layer.w_bits
    assert stored["conv_in.bias"].dtype == torch.float32
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["schema"] == "edadm.export" and f.metadata()["run"] == '{"seed": 3}'

    loaded = load_exported(path)
    # the split shortcut and the attention products came back as they were
    split_layer = loaded.get_submodule("up_blocks.0.resnets.0.conv1")
    assert split_layer.split == 16 and split_layer.weight_quantizer_0 is not None
    assert type(loaded.get_submodule("down_blocks.1.attentions.0").processor).__name__ == "QuantAttnProcessor"
    loaded_layers = quant_layers(loaded)
    assert loaded_layers.keys() == layers.keys()
    for name, layer in layers.items():
        assert torch.equal(loaded_layers[name].weight_int, layer.weight_int), name
        assert torch.equal(loaded_layers[name].weight, layer.quantized_weight()), name
    with torch.no_grad():
        expected = model(**inputs).sample
        assert torch.equal(loaded(**inputs).sample, expected)
        # self-consistent: the float weights are the dequantized codes
        set_quant_state(loaded, weights=False, activations=True)
        assert torch.equal(loaded(**inputs).sample, expected)


def test_export_load_conditional_unet(tmp_path) -> None:
    model, inputs = calibrated(tiny_cond_unet(), QuantConfig(w_bits=4, a_bits=8), text=True)
    export_quantized(model, tmp_path / "cond.safetensors")
    loaded = load_exported(tmp_path / "cond.safetensors")
    assert type(loaded).__name__ == "UNet2DConditionModel"
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)


def test_export_refuses_float_model_and_reserved_metadata(tmp_path) -> None:
    with pytest.raises(ValueError, match="not quantized"):
        export_quantized(tiny_attn_unet(), tmp_path / "x.safetensors")
    model = quantize_model(tiny_attn_unet(), QuantConfig(w_bits=4, a_bits=32))
    with pytest.raises(ValueError, match=r"\['layers'\] are reserved"):
        export_quantized(model, tmp_path / "x.safetensors", metadata={"layers": 1})
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Size against FP32
# ---------------------------------------------------------------------------------------------
def wide_unet() -> UNet2DModel:
    """One resolution of 160 channels (mid attention): weights dominate, as in real UNets.

    In tiny_attn_unet the file header, norms, biases and per-channel scales outweigh them.
    """
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(160,),
        layers_per_block=1,
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        norm_num_groups=8,
        attention_head_dim=32,
    ).eval()


# Measured (torch 2.13, diffusers 0.42, safetensors 0.8): W8 25.66 %, W4 13.52 % of the FP32
# tensor data (16.0 MB); the float UNet's own file is 7 KB larger (its header): 25.65 %, 13.51 %.
@pytest.mark.parametrize("w_bits, limit", [(8, 0.26), (4, 0.14)])
def test_size_against_fp32(tmp_path, w_bits: int, limit: float) -> None:
    unet = wide_unet()
    save_file(unet.state_dict(), tmp_path / "fp32.safetensors")
    fp32_file = (tmp_path / "fp32.safetensors").stat().st_size
    fp32_bytes = fp32_size_bytes(unet)
    assert 0 < fp32_file - fp32_bytes < 0.01 * fp32_bytes  # only the JSON header is not counted

    model = quantize_model(unet, QuantConfig(w_bits=w_bits, a_bits=8))
    summary = export_quantized(model, tmp_path / "q.safetensors")
    ratio = summary["file_bytes"] / fp32_bytes
    logger.info(
        "W%d export: %d of %d bytes, %.2f %% of FP32", w_bits, summary["file_bytes"], fp32_bytes, 100 * ratio
    )
    assert summary["fp32_bytes"] == fp32_bytes
    assert ratio <= limit, f"W{w_bits}: {100 * ratio:.2f} % of FP32"
    assert summary["file_bytes"] / fp32_file <= ratio


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def test_cli_export_and_inspect(tmp_path) -> None:
    unet = tiny_attn_unet()
    unet.save_pretrained(tmp_path / "model")
    calib = tiny_calib(8)
    run_reconstruction(
        unet,
        calib,
        QuantConfig(w_bits=4, a_bits=8),
        quick_recon(method="none"),
        tmp_path / "quant",
        tmp_path / "work",
        "cpu",
    )
    out = tmp_path / "export" / "unet.safetensors"
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["export", "--model", str(tmp_path / "model"), "--quant", str(tmp_path / "quant"), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "% of FP32" in result.output and "MB" in result.output

    reference = load_quant_model(tmp_path / "model", tmp_path / "quant")
    loaded = load_exported(out)
    with torch.no_grad():
        assert torch.equal(loaded(calib.x, calib.t).sample, reference(calib.x, calib.t).sample)

    result = runner.invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"edadm.export v{EXPORT_SCHEMA_VERSION}, UNet2DModel" in text and "W4A8" in text
    n_layers = len(quant_layers(reference))
    assert f"{n_layers} of {n_layers} QuantLayers" in text
    assert (
        f"{out.stat().st_size / 2**20:.2f} MB on disk vs {fp32_size_bytes(unet) / 2**20:.2f} MB FP32" in text
    )

    result = runner.invoke(
        main,
        [
            "export",
            "--model",
            str(tmp_path / "model"),
            "--quant",
            str(tmp_path / "nothing"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 2 and "manifest.json not found" in result.output


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------
def test_bad_files_raise_artifact_errors(tmp_path) -> None:
    model = quantize_model(tiny_attn_unet(), QuantConfig(w_bits=4, a_bits=32))
    good = tmp_path / "good.safetensors"
    export_quantized(model, good)

    with pytest.raises(ArtifactError, match=r"missing\.safetensors not found.*edadm export"):
        load_exported(tmp_path / "missing.safetensors")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"truncated\.safetensors is not a readable safetensors file"):
        load_exported(truncated)
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        describe(truncated)

    other = tmp_path / "state.safetensors"
    save_quant_state(model, other)  # a reconstruct stage state: schema edadm.quant
    with pytest.raises(ArtifactError, match=rf"schema 'edadm\.quant' v{SCHEMA_VERSION}, not an edadm export"):
        load_exported(other)
    assert "schema edadm.quant" in describe(other)

    # a file that lost tensors (here: a bias and a layer's codes) names them
    with safe_open(str(good), framework="pt") as f:
        metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    del tensors["conv_in.bias"], tensors["conv_out.weight_packed"]
    save_file(tensors, tmp_path / "partial.safetensors", metadata=metadata)
    with pytest.raises(ArtifactError, match=r"lacks tensors \['conv_in\.bias', 'conv_out\.weight_packed'\]"):
        load_exported(tmp_path / "partial.safetensors")

    # codes of another size do not fit the layer
    with safe_open(str(good), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    tensors["conv_in.weight_packed"] = tensors["conv_in.weight_packed"][:-1].clone()
    save_file(tensors, tmp_path / "short.safetensors", metadata=metadata)
    with pytest.raises(ArtifactError, match="quantization state does not fit.*packed bytes"):
        load_exported(tmp_path / "short.safetensors")


def test_weight_only_model_round_trip(tmp_path) -> None:
    """W4A32: no activation quantizers, no attention processors; codes alone make the output."""
    unet = tiny_attn_unet()
    model = quantize_model(unet, QuantConfig(w_bits=4, a_bits=32))
    export_quantized(model, tmp_path / "w4.safetensors")
    loaded = load_exported(tmp_path / "w4.safetensors")
    assert not loaded.training and loaded.get_submodule("conv_in").act_quantizer is None
    calib = tiny_calib(4)
    with torch.no_grad():
        assert torch.equal(loaded(calib.x, calib.t).sample, model(calib.x, calib.t).sample)
