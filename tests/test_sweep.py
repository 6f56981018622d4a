"""The sweep's definition (sweep/gen_dvc.py) and its table builder (sweep/results.py), without running it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sweep"))
import gen_dvc  # noqa: E402
import run  # noqa: E402

import results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_every_configuration_runs_once_in_order_and_dvc_yaml_is_current() -> None:
    runs = gen_dvc.configs()
    order = gen_dvc.run_order()
    targets = [t.split("@", 1)[1] for t in order if "evaluate@" in t]
    assert sorted(targets) == sorted(runs) and len(set(order)) == len(order)
    assert order[0] == "evaluate_fp@s0"  # every row pairs with FP seed 0
    # the paper's rows at W4A8 over three calibration seeds, the TDAC rows also at W8A8, W4A6 and
    # W4A4; W3A8 at seed 0 only
    seeded = [m for m, (calib, _, _) in gen_dvc.METHODS.items() if not calib.startswith("uniform")]
    assert {f"{m}-w4a8-s{s}" for m in seeded for s in gen_dvc.CALIB_SEEDS} <= set(runs)
    assert {f"eda-dm-groups4-w4a4-s{s}" for s in gen_dvc.CALIB_SEEDS} <= set(runs)
    assert "ptq4dm-w8a8-s2" in runs and "ptq4dm-w4a4-s0" not in runs  # ptq4dm: paper bit-widths only
    assert "q-diffusion-w4a8-s1" not in runs  # uniform calibration: one set whatever the seed
    assert {f"{m}-w3a8-s0" for m in gen_dvc.STRESS_METHODS} <= set(runs) and "eda-dm-w3a8-s1" not in runs
    for name, (base, overrides) in gen_dvc.TUNING.items():
        assert runs[f"{name}-w4a8-s0"]["calib"] == runs[f"{base}-w4a8-s0"]["calib"]
        assert all(f"--set {k}={v}" in runs[f"{name}-w4a8-s0"]["extra"] for k, v in overrides.items())
    # the committed sweep/dvc.yaml is what gen_dvc.py writes (so also its code deps: the main dvc.yaml's)
    committed = yaml.safe_load((Path(gen_dvc.__file__).parent / "dvc.yaml").read_text())
    assert committed["stages"] == yaml.safe_load(yaml.safe_dump(gen_dvc.all_stages())), "run sweep/gen_dvc.py"


def test_the_sweep_is_a_dvc_project_of_its_own() -> None:
    """The main pipeline's DVC commands never collect the sweep's stages (a DVC subrepo)."""
    sweep = Path(gen_dvc.__file__).parent
    assert (sweep / ".dvc" / "config").exists()
    for stage in gen_dvc.all_stages().values():
        do = stage.get("do", stage)  # the class model's stage is a single one
        assert do["cmd"].startswith("cd .. && python stages/") and "wdir" not in do
        assert all(out.startswith(("artifacts/", "plots/", "metrics/")) for out in do.get("outs", []))
        assert "../edadm" not in do["deps"] and any(d.startswith("../edadm/") for d in do["deps"])


SAMPLE_N = yaml.safe_load((Path(gen_dvc.__file__).parent / "params.yaml").read_text())["sample_n"]


def _resolved(stage: dict) -> dict[str, dict]:
    """A foreach stage's commands and deps per key, ``${...}`` filled in as DVC does."""
    items = stage["foreach"]
    items = items if isinstance(items, dict) else {item: item for item in items}

    def fill(text: str, key: str, item) -> str:
        def value(match: re.Match) -> str:
            name = match[1]
            if name == "key":
                return key
            if name == "sample_n":
                return str(SAMPLE_N)
            return str(item if name == "item" else item[name.removeprefix("item.")])

        return re.sub(r"\$\{([\w.]+)\}", value, text)

    return {
        key: {
            "cmd": fill(stage["do"]["cmd"], key, item),
            "deps": [fill(d, key, item) for d in stage["do"]["deps"]],
            "params": stage["do"]["params"][0]["../params.yaml"],
        }
        for key, item in items.items()
    }


def test_class_testbed_has_its_own_stages_on_the_class_model_at_each_guidance_scale() -> None:
    unconditional, class_stages = gen_dvc.stages(), gen_dvc.class_stages()
    assert all(name.startswith("class_") for name in class_stages)
    assert not set(class_stages) & set(unconditional)
    model = class_stages["class_model"]
    assert "--set model.embedded.conditioning=class --out sweep/artifacts/model-class " in model["cmd"]
    assert model["deps"] == gen_dvc.code_deps("stages/model.py")
    assert "model" in model["params"][0]["../params.yaml"]
    assert "artifacts/model-class" in model["outs"]

    dump = _resolved(class_stages["class_dump"])
    assert set(dump) == {"g1", "g3"}
    for g in (1, 3):
        assert (
            f"--set condition.guidance_scale={g} --model sweep/artifacts/model-class " in dump[f"g{g}"]["cmd"]
        )
        assert "--set dump." not in dump[f"g{g}"]["cmd"] and "--set sampler." not in dump[f"g{g}"]["cmd"]
    # every stage that runs the class model depends on it and loads it, never the main pipeline's
    for name in ("class_dump", "class_reconstruct", "class_sample_fp", "class_sample_quant"):
        for key, stage in _resolved(class_stages[name]).items():
            assert "artifacts/model-class" in stage["deps"] and "../artifacts/model" not in stage["deps"], key
            assert "--model sweep/artifacts/model-class " in stage["cmd"], key
            assert set(gen_dvc.code_deps(stage["cmd"].split()[4])) <= set(stage["deps"]), key

    rows = {
        f"{m}-w{w}a{a}-g{g}-s0"
        for m in ("naive", "q-diffusion", "eda-dm")
        for w, a in [(8, 8), (4, 8)]
        for g in (1, 3)
    } | {f"eda-dm-w4a8-g{g}-s{s}" for g in (1, 3) for s in (1, 2)}
    assert set(gen_dvc.class_configs()) == rows
    recon = _resolved(class_stages["class_reconstruct"])["eda-dm-w4a8-g3-s0"]
    assert "--calib sweep/artifacts/class/calib-tdac-g3-s0.zarr" in recon["cmd"]
    assert "--set recon.method=fbr" in recon["cmd"]
    assert "artifacts/class/calib-tdac-g3-s0.zarr" in recon["deps"]
    naive = _resolved(class_stages["class_reconstruct"])["naive-w8a8-g1-s0"]
    assert "calib-uniform-g1-s0.zarr" in naive["cmd"] and "--set recon.method=none" in naive["cmd"]
    select = _resolved(class_stages["class_select"])
    assert set(select) == {f"{c}-g{g}-s0" for c in ("uniform", "tdac") for g in (1, 3)} | {
        f"tdac-g{g}-s{s}" for g in (1, 3) for s in (1, 2)
    }
    tdac = select["tdac-g3-s0"]["cmd"]
    assert "--set select.method=tdac --set select.seed=0 " in tdac
    assert "--trajectories sweep/artifacts/class/trajectories-g3.zarr" in tdac
    # FP and quantized samples from the same seed and guidance scale: the paired figures need it
    fp = _resolved(class_stages["class_sample_fp"])["g3-s0"]["cmd"]
    quant = _resolved(class_stages["class_sample_quant"])["eda-dm-w4a8-g3-s0"]["cmd"]
    for cmd in (fp, quant):
        assert "--set condition.guidance_scale=3 " in cmd and "--set sample.seed=0 " in cmd
        assert f"--set sample.n={SAMPLE_N} " in cmd
    evaluate = _resolved(class_stages["class_evaluate"])["eda-dm-w4a8-g1-s0"]
    assert "--fp sweep/artifacts/class/samples-fp-g1-s0.zarr" in evaluate["cmd"]
    assert "--out sweep/metrics/class/eda-dm-w4a8-g1-s0.json" in evaluate["cmd"]
    # outputs under class/ folders, apart from the unconditional testbed's (results.py reads them apart)
    for name, stage in class_stages.items():
        do = stage.get("do", stage)
        for out in [*do.get("outs", []), *do.get("metrics", [])]:
            assert out.split("/")[1] == "class" or name == "class_model", out


def test_run_lists_the_class_testbed_in_its_order() -> None:
    result = CliRunner().invoke(run.main, ["--testbed", "class", "--list"])
    assert result.exit_code == 0, result.output
    listed = [line.split("] ", 1)[1] for line in result.output.splitlines()]
    # the paper's guidance scale first; at each, FP, then W4A8 (where methods separate), then W8A8;
    assert listed == [
        "class_evaluate_fp@g3-s0",
        "class_evaluate@naive-w4a8-g3-s0",
        "class_evaluate@q-diffusion-w4a8-g3-s0",
        "class_evaluate@eda-dm-w4a8-g3-s0",
        "class_evaluate@naive-w8a8-g3-s0",
        "class_evaluate@q-diffusion-w8a8-g3-s0",
        "class_evaluate@eda-dm-w8a8-g3-s0",
        "class_evaluate_fp@g1-s0",
        "class_evaluate@naive-w4a8-g1-s0",
        "class_evaluate@q-diffusion-w4a8-g1-s0",
        "class_evaluate@eda-dm-w4a8-g1-s0",
        "class_evaluate@naive-w8a8-g1-s0",
        "class_evaluate@q-diffusion-w8a8-g1-s0",
        "class_evaluate@eda-dm-w8a8-g1-s0",
        # then the extra calibration seeds (eda-dm W4A8, within 1 dB of q-diffusion on seed 0)
        "class_evaluate@eda-dm-w4a8-g3-s1",
        "class_evaluate@eda-dm-w4a8-g3-s2",
        "class_evaluate@eda-dm-w4a8-g1-s1",
        "class_evaluate@eda-dm-w4a8-g1-s2",
    ]
    # every listed target is a stage of the generated dvc.yaml
    stages = gen_dvc.class_stages()
    assert {t.split("@")[1] for t in listed if t.startswith("class_evaluate@")} == set(
        stages["class_evaluate"]["foreach"]
    )
    assert {t.split("@")[1] for t in listed if t.startswith("class_evaluate_fp@")} == set(
        stages["class_evaluate_fp"]["foreach"]
    )


def _class_metrics(path: Path, fd: float, psnr: float, consistency: float, fp_fd: float = 1.0) -> None:
    """A class model's metrics file, as stages/evaluate.py writes it: both rows, the paired figures."""
    per_class = {str(label): consistency for label in range(10)}
    fp = {"n": 8, "fd": fp_fd, "sfid": None, "is_mean": 5.0, "is_std": 0.1, "precision": 0.7, "recall": 0.8}
    fp |= {
        "class_consistency": 0.97,
        "class_consistency_per_class": {str(label): 0.97 for label in range(10)},
    }
    quant = {**fp, "fd": fd, "fd_vs_fp": fd / 10, "mse": 0.01, "psnr": psnr, "ssim_vs_fp": psnr / 40}
    quant |= {"class_consistency": consistency, "class_consistency_per_class": per_class}
    path.write_text(
        json.dumps(
            {"w_bits": 4, "a_bits": 8, "method": "fbr", "calibration": "tdac", "fp": fp, "quant": quant}
        )
    )


def test_class_table_has_a_row_per_method_bits_and_guidance(tmp_path, monkeypatch) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    _class_metrics(metrics / "fp-g3-s0.json", 0, 0, 0, fp_fd=1.0)
    _class_metrics(metrics / "fp-g1-s0.json", 0, 0, 0, fp_fd=2.0)
    _class_metrics(metrics / "eda-dm-w4a8-g3-s0.json", 3.0, 28.0, 0.9)
    _class_metrics(metrics / "eda-dm-w4a8-g1-s0.json", 5.0, 26.0, 0.8)
    _class_metrics(metrics / "naive-w8a8-g3-s0.json", 4.0, 36.0, 0.95)
    _metrics(metrics / "eda-dm-w4a8-s0.json", 3.0, 28.0)  # an unconditional row: not this table's

    monkeypatch.setattr(results, "ROOT", tmp_path)  # the default --out, under tmp_path
    result = CliRunner().invoke(results.main, ["--testbed", "class", "--metrics", str(metrics)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "results" / "embedded-class.json").read_text())
    assert [(r["method"], r["w_bits"], r["guidance_scale"]) for r in rows] == [
        ("fp", 32, 3),
        ("naive", 8, 3),
        ("eda-dm", 4, 3),
        ("fp", 32, 1),
        ("eda-dm", 4, 1),
    ]
    fp3, eda3 = rows[0], rows[2]
    assert fp3["class_consistency"] == pytest.approx(0.97) and fp3["ssim_vs_fp"] is None and fp3["fd"] == 1.0
    assert eda3["class_consistency"] == pytest.approx(0.9) and eda3["ssim_vs_fp"] == pytest.approx(0.7)
    assert eda3["runs"][0]["class_consistency_per_class"]["7"] == pytest.approx(0.9)
    table = (tmp_path / "results" / "embedded-class.md").read_text()
    assert table.splitlines()[0] == (
        "| method | guidance | W/A | FD | FD vs FP | PSNR vs FP (dB) | SSIM vs FP | class consistency | n "
        "| seeds |"
    )
    assert "| eda-dm | 3 | W4A8 | 3.00 | 0.30 | 28.00 | 0.700 | 0.900 | 8 | 1 |" in table
    assert "| fp | 1 | W32A32 | 2.00 | 0.00 |  |  | 0.970 | 8 | 1 |" in table  # one seed: no spread

    # --previous as for the other table: a later run adds a row, and only a class table merges
    later = tmp_path / "later"
    later.mkdir()
    _class_metrics(later / "q-diffusion-w4a8-g3-s0.json", 3.5, 27.0, 0.85)
    previous = tmp_path / "results" / "embedded-class.json"
    merged = results.build_rows([later], [previous], testbed="class")
    assert len(merged) == 6
    assert ("q-diffusion", 4, 3) in {(r["method"], r["w_bits"], r["guidance_scale"]) for r in merged}
    with pytest.raises(SystemExit, match="not a table of the unconditional testbed"):
        results.build_rows([later], [previous])
    with pytest.raises(SystemExit, match="no FP metrics.*--testbed class"):
        results.build_rows([later], testbed="class")


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


def test_generated_tables_are_current():
    """README's headline table and docs/results.md are what sweep/results.py writes from results/."""
    done = subprocess.run(
        [sys.executable, str(REPO / "sweep" / "results.py"), "--docs", "--check"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
