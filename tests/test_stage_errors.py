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
