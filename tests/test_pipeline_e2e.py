"""End to end: `dvc repro` of the real dvc.yaml in a temporary git repository, tiny profile.

One run of the whole pipeline, then a second `dvc repro` that must run nothing, then param
changes that must rerun only the stages that read them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE = Path(__file__).parent / "profiles" / "tiny.yaml"

pytestmark = pytest.mark.e2e


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = str(cwd)  # the stages import the copied library, which is the tracked dependency
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout + result.stderr


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("pipeline")
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "edadm", "sweep"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROFILE, repo / "params.yaml")
    _run(["git", "init", "-q"], repo)
    _run(["git", "config", "user.email", "test@example.com"], repo)
    _run(["git", "config", "user.name", "test"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "pipeline"], repo)
    return repo


def test_repro_builds_every_artifact_then_reruns_only_what_changed(repo):
    dvc = [sys.executable, "-m", "dvc"]
    first = _run([*dvc, "repro"], repo)
    stages = set(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    assert _stages_run(first) == stages
    for path in (
        "artifacts/model/unet/config.json",
        "artifacts/reference/reference.json",
        "artifacts/trajectories.zarr/zarr.json",
        "artifacts/calib.zarr/zarr.json",
        "plots/model_samples.png",
        "plots/tdac.csv",
        "artifacts/quant/state.safetensors",
        "artifacts/quant/report.json",
        "plots/recon.csv",
        "artifacts/export/model.safetensors",
        "artifacts/samples/fp.zarr/zarr.json",
        "artifacts/samples/quant.zarr/zarr.json",
        "metrics/eval.json",
        "plots/samples_fp_vs_quant.png",
    ):
        assert (repo / path).exists(), path
    inspect = _run([str(Path(sys.executable).parent / "edadm"), "inspect", "artifacts/calib.zarr"], repo)
    assert "allocation" in inspect
    inspect = _run([str(Path(sys.executable).parent / "edadm"), "inspect", "artifacts/quant"], repo)
    assert "W4" in inspect and "mid_block.attentions.0" in inspect
    inspect = _run(
        [str(Path(sys.executable).parent / "edadm"), "inspect", "artifacts/export/model.safetensors"], repo
    )
    assert "% of FP32" in inspect or "%" in inspect
    # The exported file alone (no model dir, no quant dir) reproduces the quantized samples.
    export = "artifacts/export/model.safetensors"
    _run(
        [sys.executable, "stages/sample.py", "--which", "quant", "--export", export,
         "--model", "missing", "--out", "exported.zarr"],
        repo,
    )  # fmt: skip
    from edadm.diffusion.samples import load_samples

    exported, _ = load_samples(repo / "exported.zarr")
    pipeline, _ = load_samples(repo / "artifacts" / "samples" / "quant.zarr")
    # same batches as the pipeline: a batch-size change moves float sums by ulps, which flip codes
    np.testing.assert_allclose(exported, pipeline, atol=1e-6)
    shutil.rmtree(repo / "exported.zarr")
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert metrics["quant"]["n"] == 64 and metrics["quant"]["psnr"] > 0 and metrics["fp"]["fd"] >= 0

    # Nothing changed: nothing runs.
    second = _run([*dvc, "repro"], repo)
    assert _stages_run(second) == set()

    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "first run"], repo)

    # A TDAC param: select and what follows run again, the dump is reused.
    changed = _run([*dvc, "exp", "run", "-S", "select.tdac.lambda=2.0"], repo)
    ran = _stages_run(changed)
    assert "select" in ran and not ran & {"model", "reference", "dump"}, ran

    # A quantization param: reconstruct, the export, the quantized samples and evaluate; nothing before.
    changed = _run([*dvc, "exp", "run", "-S", "quant.w_bits=8"], repo)
    assert _stages_run(changed) == {"reconstruct", "export", "sample_quant", "evaluate"}

    # Integer sampling: only the quantized samples and evaluate; the metrics agree with fake quantization.
    fake = json.loads((repo / "metrics" / "eval.json").read_text())["quant"]
    changed = _run([*dvc, "exp", "run", "-S", "sample.mode=int"], repo)
    assert _stages_run(changed) == {"sample_quant", "evaluate"}
    integer = json.loads((repo / "metrics" / "eval.json").read_text())["quant"]
    assert integer["psnr"] == pytest.approx(fake["psnr"], abs=0.5) and integer["n"] == fake["n"]

    # A model param: the model and everything downstream of it, but not the reference.
    changed = _run([*dvc, "exp", "run", "-S", "model.embedded.train_steps=10"], repo)
    ran = _stages_run(changed)
    assert {"model", "dump", "select", "reconstruct", "sample_fp"} <= ran and "reference" not in ran, ran


def test_sweep_runs_one_comparison_row_and_builds_the_results_table(repo):
    dvc = [sys.executable, "-m", "dvc"]
    out = _run(
        [*dvc, "repro", "sweep/dvc.yaml:evaluate@eda-dm-w4a8-s0", "sweep/dvc.yaml:evaluate_fp@s1"], repo
    )
    ran = _stages_run(out)
    assert "sweep/dvc.yaml:reconstruct@eda-dm-w4a8-s0" in ran and "dump" not in ran, ran
    _run([sys.executable, "sweep/results.py"], repo)
    rows = json.loads((repo / "results" / "embedded.json").read_text())
    assert [r["method"] for r in rows] == ["fp", "eda-dm"]
    assert set(rows[1]) >= {
        "method",
        "w_bits",
        "a_bits",
        "fd",
        "fd_vs_fp",
        "is",
        "precision",
        "recall",
        "psnr_vs_fp",
        "n",
    }
    assert rows[1]["w_bits"] == 4 and rows[1]["a_bits"] == 8 and rows[1]["n"] == 64
