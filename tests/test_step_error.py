"""Noise-prediction error by step: a real dump, real quantized models, the `edadm step-error` CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edadm.artifacts import TRAJECTORIES, open_store
from edadm.calib.calibration_set import CalibrationSet
from edadm.cli import main
from edadm.diffusion.loading import load_unet
from edadm.diffusion.sampling import SamplerConfig
from edadm.diffusion.trajectories import DumpConfig, dump_trajectories
from edadm.metrics.step_error import noise_error_by_step
from edadm.quant.config import QuantConfig
from edadm.quant.state import load_quant_model
from edadm.recon.api import run_reconstruction
from edadm.recon.config import ReconConfig

LAYER = "mid_block.attentions.0"


@pytest.fixture()
def setup(tmp_path, tiny_unet, tiny_scheduler):
    """A 5-step dump of 8 trajectories and range-search-only models at W8A8 and W4A4."""
    dump_trajectories(
        tiny_unet,
        tiny_scheduler,
        SamplerConfig(steps=5),
        DumpConfig(trajectories=8, batch_size=8),
        LAYER,
        tmp_path / "traj.zarr",
        torch.device("cpu"),
    )
    store = open_store(tmp_path / "traj.zarr", TRAJECTORIES)
    tiny_unet.save_pretrained(tmp_path / "model")
    x = torch.from_numpy(np.asarray(store["x"][...], dtype=np.float32)).flatten(0, 1)  # every (step, traj)
    t = torch.from_numpy(np.asarray(store["t"][...])).repeat_interleave(8)
    recon = ReconConfig(method="none", init_batch_size=16, cache_batch_size=16)
    for bits in (8, 4):
        run_reconstruction(
            load_unet(tmp_path / "model"),
            CalibrationSet(x, t),
            QuantConfig(w_bits=bits, a_bits=bits),
            recon,
            tmp_path / f"w{bits}",
            tmp_path / "work",
            "cpu",
        )
    return tmp_path, store


def test_error_grows_as_bits_drop_and_is_zero_for_the_fp_model(setup) -> None:
    tmp_path, store = setup
    w8a8 = load_quant_model(tmp_path / "model", tmp_path / "w8")
    fp = load_unet(tmp_path / "model").eval()
    models = {"w8a8": w8a8, "w4a4": load_quant_model(tmp_path / "model", tmp_path / "w4"), "fp": fp}
    rows = noise_error_by_step(fp, models, store, every=2, n=6)
    assert [(r["step"], r["t"]) for r in rows] == [(0, 800), (2, 400), (4, 0)]
    for row in rows:
        assert row["fp"] == 0.0
        assert 0.0 < row["w8a8"] < row["w4a4"]
    # W8A8 on a range-searched tiny model: well under 1 % of the noise's energy
    assert max(r["w8a8"] for r in rows) < 0.01


def test_cli_prints_and_writes_the_table(setup) -> None:
    tmp_path, _ = setup
    common = ["step-error", "--model", str(tmp_path / "model"), "--trajectories", str(tmp_path / "traj.zarr")]
    out = tmp_path / "plots" / "step_error.csv"
    result = CliRunner().invoke(
        main,
        [*common, "--quant", f"a={tmp_path / 'w8'}", "--quant", f"b={tmp_path / 'w4'}", "--every", "4"]
        + ["--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.split("\n")[0].split() == ["step", "t", "a", "b"]
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "4"] and float(rows[0]["a"]) < float(rows[0]["b"])

    # bad input: duplicate labels, a missing dump (names the stage), a bad --every
    result = CliRunner().invoke(
        main, [*common, "--quant", str(tmp_path / "w8"), "--quant", str(tmp_path / "w8")]
    )
    assert result.exit_code != 0 and "NAME=DIR" in result.output
    bad = ["step-error", "--model", str(tmp_path / "model"), "--trajectories", str(tmp_path / "none.zarr")]
    result = CliRunner().invoke(main, [*bad, "--quant", str(tmp_path / "w8")])
    assert result.exit_code != 0 and "dump" in result.output
    result = CliRunner().invoke(main, [*common, "--quant", str(tmp_path / "w8"), "--every", "0"])
    assert result.exit_code != 0 and "every" in result.output
