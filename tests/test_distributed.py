"""Stages under torchrun (torch.distributed, gloo on CPU, 2 ranks): the dump and sample stores
are bitwise those of one process, a rank killed mid-dump leaves no complete store and the
rerun completes, and the evaluate stage's metrics do not depend on the number of ranks.

One process runs here (click's test runner); the ranks are real processes, started by
torchrun directly (``python -m torch.distributed.run ... stages/X.py``) or by the stage itself
(``dist.nproc_per_node: 2``, the path `dvc exp run -S dist.nproc_per_node=2` takes).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
import zarr
from diffusers import DDPMPipeline
from stage_runner import run_stage
from tiny_pipelines import NULL_CLASS, save_class_conditional

from edadm.diffusion.embedded import EmbeddedConfig, build_embedded_scheduler, build_embedded_unet
from edadm.diffusion.loading import load_diffusion_model, save_model
from edadm.distributed import Dist
from edadm.inspect import describe

# several processes under torchrun: `pytest -m "not dist"` leaves them out of a quick loop
pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# Rank 1 dies (SIGKILL, no clean-up) right after sampling its first batch, before writing it.
KILL_RANK_1 = """
import importlib.util, os, signal

import edadm.diffusion.trajectories as trajectories

sample_batch = trajectories._sample_batch


def sample_then_die(*args, **kwargs):
    result = sample_batch(*args, **kwargs)
    if os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return result


trajectories._sample_batch = sample_then_die
# the stage's main, run from here: sys.argv[0] stays this file, which the relaunch runs
spec = importlib.util.spec_from_file_location("dump_stage", {script!r})
stage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage)
stage.main()
"""

# every rank records its pid, then hangs in its first batch, as a stage stuck or slow would
HANG_IN_FIRST_BATCH = KILL_RANK_1.replace(
    """    result = sample_batch(*args, **kwargs)
    if os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return result""",
    """    with open(f"rank{{os.environ['RANK']}}.pid", "w") as pid_file:
        pid_file.write(str(os.getpid()))
    signal.pause()""",
)


def _spawn(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A directory with an unconditional and a class-conditional (guided) model, and params."""
    path = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    tiny = EmbeddedConfig(block_out_channels=(8, 16, 16), image_size=16)
    unet, scheduler = build_embedded_unet(tiny).eval(), build_embedded_scheduler(tiny)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path / "uncond")
    # as the model stage writes it: the class model with its "no class" label recorded
    source = save_class_conditional(path / "source")
    save_model(load_diffusion_model(source, null_class=NULL_CLASS), path / "class")
    params = yaml.safe_load((ROOT / "tests" / "profiles" / "tiny.yaml").read_text())
    params["reference"]["classifier"]["epochs"] = 1
    params["sampler"]["steps"] = 4
    # two dump batches (one a rank) with features for 8 trajectories: rank 1 holds the last 2
    params["dump"].update(trajectories=12, batch_size=6, feature_batch=8)
    # three batches of samples and of features: rank 0 takes two, rank 1 a partial one
    params["sample"].update(n=10, batch_size=4)
    params["evaluate"]["batch_size"] = 4
    params["dist"] = {"nproc_per_node": 1, "timeout_s": 120}  # no test waits forever
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    return path


def _assert_same_store(one: Path, ranks: Path) -> None:
    """Bitwise the same arrays and chunk files; attributes the same but ``world_size``."""
    a, b = zarr.open_group(str(one), mode="r"), zarr.open_group(str(ranks), mode="r")
    assert a.attrs["complete"] and b.attrs["complete"]
    assert (a.attrs["world_size"], b.attrs["world_size"]) == (1, 2)
    assert {**a.attrs, "world_size": 2} == dict(b.attrs)
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in a.array_keys():
        assert a[name].dtype == b[name].dtype and a[name].chunks == b[name].chunks, name
        assert a[name][...].tobytes() == b[name][...].tobytes(), name
    # every chunk file and every array's metadata; only the group's zarr.json (the attributes) differs
    files = sorted(f.relative_to(one) for f in one.rglob("*") if f.is_file())
    assert files == sorted(f.relative_to(ranks) for f in ranks.rglob("*") if f.is_file())
    for file in files:
        if file == Path("zarr.json"):
            continue
        assert (one / file).read_bytes() == (ranks / file).read_bytes(), file


def test_shards_are_contiguous_whole_chunks_covering_every_item():
    for n_items, chunk, world_size in [(12, 6, 2), (10, 4, 2), (1024, 256, 3), (5, 4, 4)]:
        shards = [Dist(rank, world_size).shard(n_items, chunk) for rank in range(world_size)]
        assert [i for shard in shards for i in shard] == list(range(n_items))
        assert all(shard.start % chunk == 0 for shard in shards if len(shard))
        blocks = [-(-len(shard) // chunk) for shard in shards]
        assert max(blocks) - min(blocks) <= 1, blocks  # even: no rank idles long at the barrier


def test_dump_under_torchrun_is_the_one_process_store(project, monkeypatch):
    monkeypatch.chdir(project)
    args = ["--params", "params.yaml", "--model", "uncond", "--timings", "timings.json"]
    run_stage("dump", *args, "--out", "uncond_one.zarr")
    _ok(_spawn([*TORCHRUN, str(ROOT / "stages" / "dump.py"), *args, "--out", "uncond_ranks.zarr"], project))
    _assert_same_store(project / "uncond_one.zarr", project / "uncond_ranks.zarr")
    assert "written by 2 torchrun ranks" in describe(project / "uncond_ranks.zarr")
    assert json.loads((project / "timings.json").read_text())["world_size"] == 2  # rank 0 wrote it


def test_a_killed_rank_leaves_no_store_and_the_rerun_completes(project, monkeypatch):
    monkeypatch.chdir(project)
    common = ["--params", "params.yaml", "--model", "class", "--timings", "timings.json"]
    run_stage("dump", *common, "--out", "class_one.zarr")
    args = [*common, "--out", "class.zarr"]
    wrapper = project / "dump_kill_rank_1.py"
    wrapper.write_text(KILL_RANK_1.format(script=str(ROOT / "stages" / "dump.py")))

    # `python stage`: with dist.nproc_per_node=2 the stage relaunches itself under torchrun
    killed = _spawn([sys.executable, str(wrapper), *args, "--set", "dist.nproc_per_node=2"], project)
    assert killed.returncode != 0, "a dead rank must fail the stage"
    assert "torchrun exited with status" in killed.stderr and "SIGKILL" in killed.stderr
    assert not (project / "class.zarr").exists()
    # rank 0, ended by torchrun, may leave its temporary at any point of being written or removed
    # (even without its group metadata), but never marked complete
    for leftover in project.glob(".class.zarr.tmp-*"):
        metadata = leftover / "zarr.json"
        if metadata.exists():
            assert json.loads(metadata.read_text())["attributes"]["complete"] is False

    _ok(_spawn([*TORCHRUN, str(ROOT / "stages" / "dump.py"), *args], project))
    assert not list(project.glob(".class.zarr.*"))  # the rerun removed the dead run's temporary
    _assert_same_store(project / "class_one.zarr", project / "class.zarr")
    assert "condition" in zarr.open_group(str(project / "class.zarr"), mode="r")


def test_sigterm_to_the_relaunching_stage_stops_torchrun_and_every_rank(project):
    """A scheduler's SIGTERM reaches only `python stage`: it must end torchrun and its ranks too."""
    wrapper = project / "dump_hang.py"
    wrapper.write_text(HANG_IN_FIRST_BATCH.format(script=str(ROOT / "stages" / "dump.py")))
    args = ["--params", "params.yaml", "--model", "uncond", "--timings", "timings.json", "--out", "hang.zarr"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    stage = subprocess.Popen(
        [sys.executable, str(wrapper), *args, "--set", "dist.nproc_per_node=2"],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid_files = [project / f"rank{rank}.pid" for rank in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(f.exists() and f.read_text() for f in pid_files):
        assert stage.poll() is None and time.monotonic() < deadline, "the ranks never started"
        time.sleep(0.2)
    ranks = [int(f.read_text()) for f in pid_files]

    stage.send_signal(signal.SIGTERM)
    _, stderr = stage.communicate(timeout=60)
    assert stage.returncode != 0 and "torchrun exited with status" in stderr
    for pid in ranks:  # torchrun has ended its ranks before it exited
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (project / "hang.zarr").exists()


@pytest.fixture(scope="module")
def samples(project) -> Path:
    """One process's class-conditional samples (fp.zarr, and quant.zarr: fewer sampler steps,
    the same seeds and conditions) and the digits reference."""
    common = ["--params", "params.yaml", "--model", "class", "--timings", "timings.json"]
    with contextlib.chdir(project):
        run_stage("sample_fp", *common, "--out", "fp.zarr")
        run_stage("sample_fp", *common, "--set", "sampler.steps=3", "--out", "quant.zarr")
        run_stage("reference", "--params", "params.yaml", "--out", "reference", "--timings", "timings.json")
    return project


def test_samples_under_torchrun_are_the_one_process_samples(samples):
    args = ["--params", "params.yaml", "--model", "class", "--timings", "timings.json"]
    _ok(_spawn([*TORCHRUN, str(ROOT / "stages" / "sample_fp.py"), *args, "--out", "fp_ranks.zarr"], samples))
    _assert_same_store(samples / "fp.zarr", samples / "fp_ranks.zarr")


def test_evaluate_under_torchrun_gives_the_one_process_metrics(samples, monkeypatch):
    monkeypatch.chdir(samples)
    args = ["--params", "params.yaml", "--reference", "reference", "--fp", "fp.zarr", "--quant", "quant.zarr"]
    run_stage("evaluate", *args, "--out", "eval_one.json", "--grid", "grid_one.png")
    ranks_args = [*args, "--out", "eval_ranks.json", "--grid", "grid_ranks.png"]
    _ok(_spawn([*TORCHRUN, str(ROOT / "stages" / "evaluate.py"), *ranks_args], samples))
    assert (samples / "grid_ranks.png").read_bytes() == (samples / "grid_one.png").read_bytes()
    one = json.loads((samples / "eval_one.json").read_text())
    ranks = json.loads((samples / "eval_ranks.json").read_text())
    assert one["quant"]["n"] == 10 and one["quant"]["class_consistency"] is not None
    for row in ("fp", "quant"):
        for key, value in one[row].items():
            if isinstance(value, float):
                assert ranks[row][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (row, key)
            else:
                assert ranks[row][key] == value, (row, key)
