"""The sweep's definition (sweep/gen_dvc.py) and its table builder (sweep/results.py), without running it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sweep"))
import gen_dvc  # noqa: E402

import results  # noqa: E402


def test_every_configuration_runs_once_in_order_and_dvc_yaml_is_current() -> None:
    runs = gen_dvc.configs()
    order = gen_dvc.run_order()
    targets = [t.split("@", 1)[1] for t in order if "evaluate@" in t]
    assert sorted(targets) == sorted(runs) and len(set(order)) == len(order)
    assert order[0] == "evaluate_fp@s0"  # every row pairs with FP seed 0
    # the paper's rows at W4A8 over three calibration seeds, the stress rows at seed 0 only
    seeded = [m for m, (calib, _, _) in gen_dvc.METHODS.items() if not calib.startswith("uniform")]
    assert {f"{m}-w4a8-s{s}" for m in seeded for s in gen_dvc.CALIB_SEEDS} <= set(runs)
    assert "q-diffusion-w4a8-s1" not in runs  # uniform calibration: one set whatever the seed
    assert {f"{m}-w3a8-s0" for m in gen_dvc.STRESS_METHODS} <= set(runs)
    for name, (base, overrides) in gen_dvc.TUNING.items():
        assert runs[f"{name}-w4a8-s0"]["calib"] == runs[f"{base}-w4a8-s0"]["calib"]
        assert all(f"--set {k}={v}" in runs[f"{name}-w4a8-s0"]["extra"] for k, v in overrides.items())
    # the committed sweep/dvc.yaml is what gen_dvc.py writes (so also its code deps: the main dvc.yaml's)
    committed = yaml.safe_load((Path(gen_dvc.__file__).parent / "dvc.yaml").read_text())
    assert committed["stages"] == yaml.safe_load(yaml.safe_dump(gen_dvc.stages())), "run sweep/gen_dvc.py"


def test_the_sweep_is_a_dvc_project_of_its_own() -> None:
    """The main pipeline's DVC commands never collect the sweep's stages (a DVC subrepo)."""
    sweep = Path(gen_dvc.__file__).parent
    assert (sweep / ".dvc" / "config").exists()
    for stage in gen_dvc.stages().values():
        do = stage["do"]
        assert do["cmd"].startswith("cd .. && python stages/") and "wdir" not in do
        assert all(out.startswith(("artifacts/", "plots/", "metrics/")) for out in do.get("outs", []))
        assert "../edadm" not in do["deps"] and any(d.startswith("../edadm/") for d in do["deps"])


def _metrics(path: Path, fd: float, psnr: float, fp_fd: float = 1.0) -> None:
    fp = {"n": 8, "fd": fp_fd, "is_mean": 5.0, "precision": 0.7, "recall": 0.8}
    quant = {**fp, "fd": fd, "fd_vs_fp": fd / 10, "psnr": psnr}
    path.write_text(json.dumps({"fp": fp, "quant": quant}))


def test_rows_average_calibration_seeds_and_tuning_rows_get_their_own_table(tmp_path) -> None:
    _metrics(tmp_path / "fp-s0.json", 0, 0, fp_fd=1.0)
    _metrics(tmp_path / "fp-s1.json", 0, 0, fp_fd=2.0)
    _metrics(tmp_path / "eda-dm-w4a8-s0.json", 3.0, 28.0)
    _metrics(tmp_path / "eda-dm-w4a8-s1.json", 5.0, 30.0)
    _metrics(tmp_path / "eda-dm-fixedacts-w4a8-s0.json", 4.0, 24.0)
    rows = {(r["method"], r["w_bits"]): r for r in results.build_rows([tmp_path])}
    fp, eda = rows[("fp", 32)], rows[("eda-dm", 4)]
    assert fp["fd"] == pytest.approx(1.5) and fp["fd_seed_std"] == pytest.approx(0.5) and fp["seeds"] == 2
    assert eda["fd"] == pytest.approx(4.0) and eda["psnr_vs_fp"] == pytest.approx(29.0)
    assert eda["fd_calib_std"] == pytest.approx(1.0) and [r["calib_seed"] for r in eda["runs"]] == [0, 1]

    result = CliRunner().invoke(
        results.main, ["--metrics", str(tmp_path), "--out", str(tmp_path / "out" / "t")]
    )
    assert result.exit_code == 0, result.output
    table = (tmp_path / "out" / "t.md").read_text()
    main_table, tuning = table.split("Tuning")
    assert "| eda-dm | W4A8 | 4.00 ± 1.00 |" in main_table and "29.00 ± 1.00" in main_table
    assert "fixedacts" not in main_table and "| eda-dm-fixedacts | W4A8 |" in tuning
    assert len(json.loads((tmp_path / "out" / "t.json").read_text())) == 3


def test_previous_table_keeps_its_runs_and_new_metrics_replace_them(tmp_path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    _metrics(first / "fp-s0.json", 0, 0, fp_fd=1.0)
    _metrics(first / "eda-dm-w4a8-s0.json", 3.0, 28.0)
    _metrics(first / "naive-w4a8-s0.json", 9.0, 20.0)
    table = tmp_path / "table.json"
    table.write_text(json.dumps(results.build_rows([first])))

    # a later sweep: FP seed 1, a new calibration seed, and naive run again (its figures replace the old)
    _metrics(second / "fp-s1.json", 0, 0, fp_fd=2.0)
    _metrics(second / "eda-dm-w4a8-s1.json", 5.0, 30.0)
    _metrics(second / "naive-w4a8-s0.json", 7.0, 21.0)
    rows = {(r["method"], r["w_bits"]): r for r in results.build_rows([second], [table])}
    assert rows[("fp", 32)]["fd"] == pytest.approx(1.5) and rows[("fp", 32)]["seeds"] == 2
    assert [r["sample_seed"] for r in rows[("fp", 32)]["runs"]] == [0, 1]
    assert rows[("eda-dm", 4)]["psnr_vs_fp"] == pytest.approx(29.0) and rows[("eda-dm", 4)]["seeds"] == 2
    assert rows[("naive", 4)]["fd"] == pytest.approx(7.0) and rows[("naive", 4)]["seeds"] == 1

    # a table of another model (its FP seed-0 run differs) must not be merged
    _metrics(second / "fp-s0.json", 0, 0, fp_fd=1.1)
    with pytest.raises(SystemExit, match="different models"):
        results.build_rows([second], [table])

    old_rows = json.loads(table.read_text())
    table.write_text(json.dumps([r for r in old_rows if r["method"] != "fp"]))
    with pytest.raises(SystemExit, match="no FP seed-0 run"):
        results.build_rows([second], [table])

    table.write_text("[{}]")
    with pytest.raises(SystemExit, match="not a results table"):
        results.build_rows([second], [table])
