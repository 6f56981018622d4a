"""A param or artifact error at the top of a stage script or the CLI: one line, exit code 2.

The message names the problem and the fix; the traceback only with ``-v`` or EDADM_DEBUG=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if key != "EDADM_DEBUG"}
    environ.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run(args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_bad_param_prints_one_line_naming_it_and_exits_2(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    script = [sys.executable, str(ROOT / "stages" / "selection.py"), "--set", "select.size=-5"]
    result = _run(script, tmp_path)
    assert result.returncode == 2
    assert _error_lines(result) == ["error: param select.size=-5 is out of range [1, inf]"], result.stderr

    for verbose in (_run([*script, "-v"], tmp_path), _run(script, tmp_path, EDADM_DEBUG="1")):
        assert verbose.returncode != 0 and "Traceback" in verbose.stderr
        assert "select.size=-5" in verbose.stderr


def test_missing_artifact_names_the_file_and_the_stage_that_makes_it(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = _run([sys.executable, str(ROOT / "stages" / "selection.py")], tmp_path)
    assert result.returncode == 2
    (line,) = _error_lines(result)
    assert line.startswith("error: artifacts/trajectories.zarr not found") and "dvc repro dump" in line


def test_cli_reports_a_missing_artifact_in_one_line(tmp_path):
    edadm = [sys.executable, "-m", "edadm.cli"]
    export = ["export", "--model", "nope", "--quant", "nope", "--out", "x.safetensors"]
    result = _run([*edadm, *export], tmp_path)
    assert result.returncode == 2
    (line,) = _error_lines(result)
    assert line.startswith("error: ") and "nope" in line and "reconstruct" in line
    assert "Traceback" in _run([*edadm, "-v", *export], tmp_path).stderr


def _tiny_model_dir(path: Path) -> Path:
    from diffusers import UNet2DModel

    UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4,
    ).save_pretrained(path / "unet")  # fmt: skip
    (path / "model_index.json").write_text(
        '{"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}'
    )
    return path


def _sample_fp(model_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return _run([sys.executable, str(ROOT / "stages" / "sample_fp.py"), "--model", str(model_dir)], cwd)


def test_a_model_config_that_is_not_json_is_one_line_naming_the_file(tmp_path):
    model_dir = _tiny_model_dir(tmp_path / "model")
    (model_dir / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel", ')  # truncated
    result = _sample_fp(model_dir, tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = _error_lines(result)
    assert line.startswith(f"error: {model_dir / 'unet' / 'config.json'} is not valid JSON"), line
    assert "save_pretrained" in line and "dvc repro -f model" in line


def test_a_missing_weights_file_is_one_line_naming_the_folder(tmp_path):
    model_dir = _tiny_model_dir(tmp_path / "model")
    for weights in (model_dir / "unet").glob("*.safetensors"):
        weights.unlink()
    result = _sample_fp(model_dir, tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = _error_lines(result)
    assert line.startswith(f"error: {model_dir / 'unet'} could not be loaded"), line
    assert "weights are missing or damaged" in line


def test_params_yaml_that_is_not_yaml_is_one_line_with_its_line_number(tmp_path):
    (tmp_path / "params.yaml").write_text("quant:\n  w_bits: 4\n  a_bits: [8\n")
    result = _run([sys.executable, str(ROOT / "stages" / "selection.py")], tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = _error_lines(result)
    assert line.startswith("error: params.yaml is not valid YAML at line"), line
    assert "git checkout params.yaml" in line
