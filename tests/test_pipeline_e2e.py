"""End to end: `dvc repro` of the real dvc.yaml in a temporary git repository, tiny profile.

One run of the whole pipeline, then a second `dvc repro` that must run nothing; a forced run
with the same out hashes; a dump and a reconstruction killed with SIGKILL and rerun; param
changes that must rerun only the stages that read them; and one row of the sweep, a DVC
project of its own in sweep/ that the main pipeline's commands never show.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
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


def _out_hashes(repo: Path) -> dict[str, str]:
    """Every stage out's hash as dvc.lock records it, but the timings (which change every run)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    outs = [out for stage in lock.values() for out in stage.get("outs", [])]
    return {out["path"]: out["md5"] for out in outs if not out["path"].startswith("metrics/timings/")}


def _kill_when(args: list[str], cwd: Path, ready, timeout: float = 600) -> None:
    """Start ``args`` in its own process group and SIGKILL the whole group once ``ready()``."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = str(cwd)
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"{' '.join(args)} finished before it could be killed"
            assert time.monotonic() < deadline, "timed out waiting to kill"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


def _reconstruct_steps_done(repo: Path) -> int:
    done = 0
    for progress in (repo / "artifacts" / ".reconstruct-checkpoint").glob("*/progress.json"):
        try:
            done = max(done, len(json.loads(progress.read_text())["steps"]))
        except (json.JSONDecodeError, KeyError):  # caught mid-write (it is written atomically, but be safe)
            pass
    return done


def _untracked(folder: str, names: list[str]) -> set[str]:
    """What a clone would not have: caches, and the outputs of a sweep run in this checkout."""
    skip = {"__pycache__"}
    if Path(folder) == ROOT / "sweep":
        skip |= {"artifacts", "metrics", "plots", "timings", "dvc.lock"}
    if Path(folder) == ROOT / "sweep" / ".dvc":
        skip |= {"cache", "tmp"}
    return skip & set(names)


def _make_repo(repo: Path, params: dict) -> Path:
    """A git + DVC repository holding the pipeline, the library and ``params`` as params.yaml."""
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "edadm", "sweep"):
        shutil.copytree(ROOT / name, repo / name, ignore=_untracked)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "sweep" / "params.yaml").write_text("sample_n: 64\n")  # the sweep's rows at the tiny size
    _run(["git", "init", "-q"], repo)
    _run(["git", "config", "user.email", "test@example.com"], repo)
    _run(["git", "config", "user.name", "test"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "pipeline"], repo)
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return _make_repo(tmp_path_factory.mktemp("pipeline"), yaml.safe_load(PROFILE.read_text()))


@pytest.fixture(scope="module")
def class_repo(tmp_path_factory) -> Path:
    """The tiny profile on the class-conditional embedded variant (guidance: the paper's 3.0)."""
    params = yaml.safe_load(PROFILE.read_text())
    params["model"]["embedded"]["conditioning"] = "class"
    params["sample"]["n"] = 32
    return _make_repo(tmp_path_factory.mktemp("class_pipeline"), params)


def test_repro_builds_every_artifact_then_reruns_only_what_changed(repo):
    dvc = [sys.executable, "-m", "dvc"]
    edadm = str(Path(sys.executable).parent / "edadm")
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
        "metrics/timings/reconstruct.json",
    ):
        assert (repo / path).exists(), path
    assert "allocation" in _run([edadm, "inspect", "artifacts/calib.zarr"], repo)
    inspect = _run([edadm, "inspect", "artifacts/quant"], repo)
    assert "W4" in inspect and "mid_block.attentions.0" in inspect
    inspect = _run([edadm, "inspect", "artifacts/export/model.safetensors"], repo)
    size = re.search(r"size: ([\d.]+) MB on disk vs ([\d.]+) MB FP32 \(([\d.]+) %\)", inspect)
    assert size, inspect
    file_mb, fp32_mb, percent = map(float, size.groups())
    on_disk = (repo / "artifacts" / "export" / "model.safetensors").stat().st_size
    assert file_mb == pytest.approx(on_disk / 2**20, abs=0.01)
    # W4 packs two codes a byte, but the tiny model's norms, biases and scales weigh as much again
    assert percent == pytest.approx(100 * file_mb / fp32_mb, abs=5) and 15 < percent < 75, inspect
    # The exported file alone (no model dir, no quant dir) reproduces the quantized samples.
    export = "artifacts/export/model.safetensors"
    _run(
        [sys.executable, "stages/sample_quant.py", "--export", export,
         "--model", "missing", "--out", "exported.zarr", "--timings", "exported.json"],
        repo,
    )  # fmt: skip
    from edadm.diffusion.samples import load_samples

    exported, _ = load_samples(repo / "exported.zarr")
    pipeline, _ = load_samples(repo / "artifacts" / "samples" / "quant.zarr")
    # same batches as the pipeline: a batch-size change moves float sums by ulps, which flip codes
    np.testing.assert_allclose(exported, pipeline, atol=1e-6)
    shutil.rmtree(repo / "exported.zarr")
    (repo / "exported.json").unlink()
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert metrics["quant"]["n"] == 64 and metrics["fp"]["n"] == 64
    # the tiny model after 20 training steps: its W4A8 samples follow FP's only loosely
    assert 5 < metrics["quant"]["psnr"] < 60 and metrics["quant"]["fd_vs_fp"] > 0
    # A full run pinned on a fixed seed (as diffusers pins its full-loop tests), measured on a
    # 2-core AMD EPYC. FP sampling is float only: its figures move by rounding, well inside 2 %.
    # The quantized run moves when a CPU rounds an activation onto the other side of a code
    # boundary (integer against fake kernels, below: within 0.5 dB PSNR), so its tolerances are
    # twice that spread.
    assert metrics["fp"]["fd"] == pytest.approx(96.25, rel=0.02)
    assert metrics["fp"]["sfid"] == pytest.approx(29.01, rel=0.02)
    assert metrics["quant"]["psnr"] == pytest.approx(25.93, abs=1.0)
    assert metrics["quant"]["ssim_vs_fp"] == pytest.approx(0.948, abs=0.01)
    assert metrics["quant"]["fd"] == pytest.approx(94.17, rel=0.05)

    # Nothing changed: nothing runs, and `dvc status` says so in a line (the sweep is not collected).
    assert _stages_run(_run([*dvc, "repro"], repo)) == set()
    status = _run([*dvc, "status"], repo).strip().splitlines()
    assert status == ["Data and pipelines are up to date."], status
    first_hashes = _out_hashes(repo)

    # The process count is no stage's param: results do not depend on it, so nothing reruns.
    assert _stages_run(_run([*dvc, "exp", "run", "-S", "dist.nproc_per_node=2"], repo)) == set()
    _run(["git", "checkout", "params.yaml"], repo)

    # Editing a module no stage imports (inspect, the CLI) reruns nothing.
    with (repo / "edadm" / "inspect.py").open("a") as f:
        f.write("\n# an edit no stage depends on\n")
    assert _stages_run(_run([*dvc, "repro"], repo)) == set()
    # Each stage depends on what it runs: TDAC's knn code is the select stage's alone, the
    # deployment code the export's and the quantized samples' (integer kernels: those alone).
    for module, changed in (
        ("edadm/calib/knn.py", {"select"}),
        ("edadm/deploy/packing.py", {"export", "sample_quant"}),
        ("edadm/deploy/integer.py", {"sample_quant"}),
    ):
        with (repo / module).open("a") as f:
            f.write("\n# an edit\n")
        assert set(json.loads(_run([*dvc, "status", "--json"], repo))) == changed, module
        _run(["git", "checkout", module], repo)

    # The README's Python API example runs as it is written, on this pipeline's artifacts.
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(# README API example\n.*?)```", readme, re.S)
    assert example, "README.md has no `# README API example` block"
    (repo / "readme_example.py").write_text(example.group(1))
    _run([sys.executable, "readme_example.py"], repo)
    (repo / "readme_example.py").unlink()
    assert _stages_run(_run([*dvc, "repro"], repo)) == set()  # it changed no artifact

    # Same params, same out hashes: every stage again from scratch.
    forced = _run([*dvc, "repro", "-f"], repo)
    assert _stages_run(forced) == stages
    assert _out_hashes(repo) == first_hashes

    # A dump killed mid-write leaves no store under its path; the stage's next run removes the
    # temporary sibling and writes the same store, so nothing downstream reruns. (A plain
    # `dvc repro` would restore the store from DVC's run cache instead of running the stage.)
    tmp_dumps = lambda: list((repo / "artifacts").glob(".trajectories.zarr.tmp-*"))  # noqa: E731
    _kill_when([*dvc, "repro", "-f", "-s", "dump"], repo, lambda: bool(tmp_dumps()))
    assert not (repo / "artifacts" / "trajectories.zarr").exists()
    assert tmp_dumps(), "the killed dump left no temporary store: it was killed too late"
    assert _stages_run(_run([*dvc, "repro", "-f", "-s", "dump"], repo)) == {"dump"}
    assert not tmp_dumps()
    assert _stages_run(_run([*dvc, "repro"], repo)) == set()
    assert _out_hashes(repo) == first_hashes

    # A reconstruction killed after a few units resumes from its checkpoints; its outs equal an
    # uninterrupted run's, so export, sample_quant and evaluate stay up to date.
    _kill_when([*dvc, "repro", "-f", "-s", "reconstruct"], repo, lambda: _reconstruct_steps_done(repo) >= 3)
    assert not (repo / "artifacts" / "quant").exists()
    resumed = _run([*dvc, "repro", "-f", "-s", "reconstruct"], repo)
    assert _stages_run(resumed) == {"reconstruct"} and "resuming from" in resumed, resumed
    assert _stages_run(_run([*dvc, "repro"], repo)) == set()
    assert _out_hashes(repo) == first_hashes
    assert _run([*dvc, "status"], repo).strip() == "Data and pipelines are up to date."

    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "first run"], repo)

    # A TDAC param: select and what follows run again, the dump is reused.
    changed = _run([*dvc, "exp", "run", "-S", "select.tdac.lambda=2.0"], repo)
    ran = _stages_run(changed)
    assert "select" in ran and not ran & {"model", "reference", "dump"}, ran
    assert "sweep" not in changed, changed  # the sweep's project is not the main pipeline's

    # A quantization param: reconstruct, the export, the quantized samples and evaluate; nothing before.
    changed = _run([*dvc, "exp", "run", "-S", "quant.w_bits=8"], repo)
    assert _stages_run(changed) == {"reconstruct", "export", "sample_quant", "evaluate"}
    assert "No file hash info" not in changed and "sweep" not in changed, changed

    # Integer sampling: only the quantized samples and evaluate; the metrics agree with fake quantization.
    fake = json.loads((repo / "metrics" / "eval.json").read_text())["quant"]
    changed = _run([*dvc, "exp", "run", "-S", "sample.mode=int"], repo)
    assert _stages_run(changed) == {"sample_quant", "evaluate"}
    integer = json.loads((repo / "metrics" / "eval.json").read_text())["quant"]
    assert integer["psnr"] == pytest.approx(fake["psnr"], abs=0.5) and integer["n"] == fake["n"]

    # The main pipeline's metrics and experiments only: nothing of the sweep, no load failures.
    metrics_out = _run([*dvc, "metrics", "show"], repo)
    assert "eval.json" in metrics_out and "sweep" not in metrics_out and "failed" not in metrics_out
    shown = _run([*dvc, "exp", "show", "--no-pager", "--csv"], repo)
    header = shown.splitlines()[0].split(",")
    # (and no column per reconstructed unit: the timings file holds totals)
    crowding = [c for c in header if "sweep" in c or "resnets" in c or "attentions" in c]
    assert "quant.w_bits" in header and not crowding, crowding

    # A bad param: one line naming it, no traceback, and the stage fails.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = str(repo)
    bad = subprocess.run(
        [*dvc, "exp", "run", "-S", "quant.w_bits=banana"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert bad.returncode != 0
    errors = [line for line in (bad.stdout + bad.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "quant.w_bits" in errors[0], bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr
    _run(["git", "checkout", "params.yaml"], repo)

    # A model param: the model and everything downstream of it, but not the reference.
    changed = _run([*dvc, "exp", "run", "-S", "model.embedded.train_steps=10"], repo)
    ran = _stages_run(changed)
    assert {"model", "dump", "select", "reconstruct", "sample_fp"} <= ran and "reference" not in ran, ran


def test_sweep_runs_one_comparison_row_and_builds_the_results_table(repo):
    run = [sys.executable, "sweep/run.py", "--only"]
    out = _run([*run, "evaluate@eda-dm-w4a8-s0"], repo) + _run([*run, "evaluate_fp@s1"], repo)
    ran = _stages_run(out)
    assert {"reconstruct@eda-dm-w4a8-s0", "sample_fp@s0", "evaluate_fp@s1"} <= ran and "dump" not in ran, ran
    # the documented command again: every row is cached in the sweep's own DVC project
    assert _stages_run(_run([*run, "evaluate@eda-dm-w4a8-s0"], repo)) == set()
    status = _run([sys.executable, "-m", "dvc", "status"], repo).strip().splitlines()
    assert status == ["Data and pipelines are up to date."], status  # the main pipeline's view
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


def test_repro_of_a_class_conditional_model_with_guidance(class_repo):
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "repro"], class_repo)
    assert "kind: class-conditional" in _run(
        [sys.executable, "-m", "edadm.cli", "inspect", "artifacts/model"], class_repo
    )
    metrics = json.loads((class_repo / "metrics" / "eval.json").read_text())
    for row in ("fp", "quant"):
        assert 0.0 <= metrics[row]["class_consistency"] <= 1.0
        assert set(metrics[row]["class_consistency_per_class"]) <= {str(label) for label in range(10)}
    assert 0.0 < metrics["quant"]["ssim_vs_fp"] <= 1.0
    calib = _run([sys.executable, "-m", "edadm.cli", "inspect", "artifacts/calib.zarr"], class_repo)
    assert "class_labels" in calib and "condition" in calib

    # Guidance changes what the UNet sees: everything from the dump on, not the model or the reference.
    changed = _run([*dvc, "exp", "run", "-S", "condition.guidance_scale=1.0"], class_repo)
    ran = _stages_run(changed)
    assert {"dump", "select", "reconstruct", "sample_fp", "sample_quant", "evaluate"} <= ran, ran
    assert not {"model", "reference"} & ran, ran
