"""Builds the sweep's tables from its metrics files: results/embedded.{json,md} for the embedded
default, results/embedded-class.{json,md} for the class-conditional testbed (``--testbed class``).

Rows: {"method", "w_bits", "a_bits", "fd", "fd_vs_fp", "is", "precision", "recall",
"psnr_vs_fp", "n"}, averaged over calibration seeds where a configuration has several (with
their spread), plus the FP row with ``fd_seed_std``, the Frechet distance's spread over the FP
sampling seeds: the table's noise floor. The class table's rows also have ``guidance_scale``,
``ssim_vs_fp`` and ``class_consistency`` (the FP row at each guidance scale too), and their runs
``class_consistency_per_class``. Every row keeps its per-seed runs, so ``--previous
results/embedded.json`` adds newly run rows to the committed table (a row run again replaces
its old figures) without the metrics folders of the runs before.

``--docs`` builds nothing from metrics: it reads the committed results/*.json (both testbeds'
tables and the embedded models' training curves) and writes docs/results.md and the README's
headline table (between ``<!-- results:start -->`` and ``<!-- results:end -->``);
``--docs --check`` writes nothing and exits 1 where either file differs from what it would write.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gen_dvc import TUNING  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METRICS = ROOT / "sweep" / "metrics"

# The figures of a metrics file's row that a run keeps, and the FP run's paired figures (FP
# against itself: the evaluate stage writes none).
RUN_KEYS = ("fd", "fd_vs_fp", "is_mean", "precision", "recall", "psnr")
CLASS_RUN_KEYS = (*RUN_KEYS, "ssim_vs_fp", "class_consistency", "class_consistency_per_class")
FP_PAIRED = {"fd_vs_fp": 0.0, "psnr": None, "ssim_vs_fp": None}
# row field -> the run figure it averages (those of the testbed's run keys)
ROW_FIELDS = {
    "fd": "fd",
    "fd_vs_fp": "fd_vs_fp",
    "is": "is_mean",
    "precision": "precision",
    "recall": "recall",
    "psnr_vs_fp": "psnr",
    "ssim_vs_fp": "ssim_vs_fp",
    "class_consistency": "class_consistency",
}


@dataclass(frozen=True)
class Testbed:
    """One of the sweep's tables: the model its rows quantize and where their figures are."""

    name: str
    metrics: Path  # the folder its evaluate stages write (sweep/gen_dvc.py)
    out: str  # the table's default path stem, relative to the repository root
    guided: bool  # rows at several guidance scales: metrics files named {row}-g{G}-s{seed}.json
    run_keys: tuple[str, ...]  # the figures each run keeps (RUN_KEYS, CLASS_RUN_KEYS)
    columns: tuple[str, ...]  # of the Markdown table, keys of markdown()'s cells

    @property
    def run_command(self) -> str:
        """The command that runs its rows."""
        return "python sweep/run.py" + ("" if self.name == "unconditional" else f" --testbed {self.name}")


TESTBEDS = {
    "unconditional": Testbed(
        "unconditional",
        METRICS,
        "results/embedded",
        guided=False,
        run_keys=RUN_KEYS,
        columns=("method", "bits", "fd", "fd_vs_fp", "is", "precision", "recall", "psnr", "n", "seeds"),
    ),
    "class": Testbed(
        "class",
        METRICS / "class",  # gen_dvc.class_stages
        "results/embedded-class",
        guided=True,
        run_keys=CLASS_RUN_KEYS,
        columns=(
            "method",
            "guidance",
            "bits",
            "fd",
            "fd_vs_fp",
            "psnr",
            "ssim",
            "class_consistency",
            "n",
            "seeds",
        ),
    ),
}


def metrics_files(dirs: list[Path]) -> dict[str, Path]:
    """File name -> path over ``dirs`` (rows of one sweep run in several work trees; first wins)."""
    files: dict[str, Path] = {}
    for directory in dirs:
        for path in sorted(directory.glob("*.json")):
            files.setdefault(path.name, path)
    return dict(sorted(files.items()))


def _figures(figures: dict, testbed: Testbed, path: Path) -> dict:
    """The figures a run keeps; a clear error where the file lacks some (another testbed's file)."""
    missing = [k for k in testbed.run_keys if k not in figures]
    if missing:
        raise SystemExit(
            f"{path} has no {', '.join(missing)}: not the metrics of an evaluate stage of the {testbed.name} "
            "testbed"
        )
    return {k: figures[k] for k in testbed.run_keys}


def runs_from_metrics(dirs: list[Path], testbed: Testbed) -> dict[tuple, dict]:
    """(method, w_bits, a_bits, guidance, seed) -> one run's figures, from the sweep's metrics files.

    The seed is the calibration seed of a quantized row and the sampling seed of an FP run; the
    guidance scale is None in the unconditional testbed.
    """
    guidance = r"-g(?P<g>\d+)" if testbed.guided else ""
    quant_name = re.compile(rf"(?P<method>.+)-w(?P<w>\d+)a(?P<a>\d+){guidance}-s(?P<seed>\d+)\.json")
    fp_name = re.compile(rf"fp{guidance}-s(?P<seed>\d+)\.json")
    runs: dict[tuple, dict] = {}
    for name, path in metrics_files(dirs).items():
        if match := quant_name.fullmatch(name):
            config = (match["method"], int(match["w"]), int(match["a"]))
            figures = json.loads(path.read_text())["quant"]
        elif match := fp_name.fullmatch(name):
            config = ("fp", 32, 32)
            figures = {**json.loads(path.read_text())["fp"], **FP_PAIRED}
        else:
            continue
        g = int(match["g"]) if testbed.guided else None
        runs[(*config, g, int(match["seed"]))] = {
            **_figures(figures, testbed, path),
            "n": figures["n"],
        }
    return runs


def runs_from_table(path: Path, testbed: Testbed) -> dict[tuple, dict]:
    """The per-seed runs a results JSON keeps, keyed as in :func:`runs_from_metrics`.

    Lets a sweep continued later, after its metrics folders are gone, add its new rows to the
    committed table instead of rerunning every row (on the same model: ``_check_same_model``).
    """
    try:
        rows = json.loads(path.read_text())
        runs = {}
        for row in rows:
            if ("guidance_scale" in row) != testbed.guided:
                raise SystemExit(f"{path}: not a table of the {testbed.name} testbed (--testbed)")
            config = (row["method"], row["w_bits"], row["a_bits"], row.get("guidance_scale"))
            for run in row.get("runs", []):  # older tables kept no runs for the FP row
                seed = run["calib_seed"] if "calib_seed" in run else run["sample_seed"]
                runs[(*config, seed)] = {
                    **{k: run[k] for k in testbed.run_keys},
                    "n": row["n"],
                }
        return runs
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: not a results table written by sweep/results.py ({err})") from err


def _fp_seed0(runs: dict[tuple, dict]) -> dict[tuple, dict]:
    """The FP runs at sampling seed 0, one per guidance scale."""
    return {key: run for key, run in runs.items() if key[0] == "fp" and key[-1] == 0}


def _check_same_model(
    table: Path, kept: dict[tuple, dict], runs: dict[tuple, dict], testbed: Testbed
) -> None:
    """Runs join only runs of the same model: FP seed 0 is bitwise reproducible on one machine,
    so its figures identify the model (one trained on another CPU type differs in its bits)."""
    old, new = _fp_seed0(kept), _fp_seed0(runs)
    if not old:
        raise SystemExit(
            f"{table} has no FP seed-0 run, so its rows can't be shown to come from this model: "
            f"rerun its rows instead (`{testbed.run_command}`)"
        )
    for key in old.keys() & new.keys():
        if any(old[key][k] != new[key][k] for k in ("fd", "is_mean", "precision", "recall")):
            raise SystemExit(
                f"{table}: its FP seed-0 run differs from that in the metrics folders (FD "
                f"{old[key]['fd']:.4f} vs {new[key]['fd']:.4f}): the tables come from different models "
                "(trained on another machine?); rerun the rows on one model instead of merging"
            )


def build_rows(
    dirs: list[Path] | None = None, previous: list[Path] = (), testbed: str = "unconditional"
) -> list[dict]:
    """The table's rows from the metrics files in ``dirs`` (default: the testbed's folder), plus the
    runs of ``previous`` tables that no metrics file gives again (a rerun row replaces its old
    figures). ``testbed``: a key of TESTBEDS."""
    bed = TESTBEDS[testbed]
    dirs = dirs or [bed.metrics]
    runs = runs_from_metrics(dirs, bed)
    for table in previous:
        kept = runs_from_table(table, bed)
        _check_same_model(table, kept, runs, bed)
        for key, run in kept.items():
            runs.setdefault(key, run)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for (*config, seed), run in sorted(runs.items()):
        groups[tuple(config)].append({**run, "seed": seed})
    if not any(method == "fp" for method, *_ in groups):
        raise SystemExit(f"no FP metrics in {', '.join(map(str, dirs))}: run `{bed.run_command}` first")
    rows = []
    for (method, w, a, g), group in groups.items():

        def mean(key: str, group: list[dict] = group) -> float | None:
            values = [r[key] for r in group]
            return None if None in values else float(np.mean(values))

        fp = method == "fp"
        row = {"method": method, "w_bits": w, "a_bits": a}
        if bed.guided:
            row["guidance_scale"] = g
        row.update({field: mean(key) for field, key in ROW_FIELDS.items() if key in bed.run_keys})
        row.update({"n": group[0]["n"], "seeds": len(group)})
        if fp and len(group) > 1:  # the FP row's seeds are sampling seeds: their spread is the noise floor
            row["fd_seed_std"] = float(np.std([r["fd"] for r in group]))
        elif len(group) > 1:
            row["fd_calib_std"] = float(np.std([r["fd"] for r in group]))
            row["psnr_calib_std"] = float(np.std([r["psnr"] for r in group]))
            row["fd_vs_fp_calib_std"] = float(np.std([r["fd_vs_fp"] for r in group]))
        seed_key = "sample_seed" if fp else "calib_seed"
        row["runs"] = [{seed_key: r["seed"], **{k: r[k] for k in bed.run_keys}} for r in group]
        rows.append(row)
    # the paper's guidance scale (the larger) first, then as the unconditional table
    rows.sort(key=lambda r: (-(r.get("guidance_scale") or 0), -r["w_bits"], -r["a_bits"], r["method"]))
    return rows


HEADERS = {
    "method": "method",
    "guidance": "guidance",
    "bits": "W/A",
    "fd": "FD",
    "fd_vs_fp": "FD vs FP",
    "is": "IS",
    "precision": "precision",
    "recall": "recall",
    "psnr": "PSNR vs FP (dB)",
    "ssim": "SSIM vs FP",
    "class_consistency": "class consistency",
    "n": "n",
    "seeds": "seeds",
}


def _cells(r: dict) -> dict[str, str]:
    """A row's Markdown cells, keyed as HEADERS (a field the row lacks gives an empty cell)."""

    def cell(value: float | None, digits: int = 2) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    fd = cell(r["fd"]) + (f" ± {r['fd_seed_std']:.2f}" if "fd_seed_std" in r else "")
    fd += f" ± {r['fd_calib_std']:.2f}" if "fd_calib_std" in r else ""
    psnr = cell(r["psnr_vs_fp"]) + (f" ± {r['psnr_calib_std']:.2f}" if "psnr_calib_std" in r else "")
    return {
        "method": r["method"],
        "guidance": f"{r.get('guidance_scale', '')}",
        "bits": f"W{r['w_bits']}A{r['a_bits']}",
        "fd": fd,
        "fd_vs_fp": cell(r["fd_vs_fp"]),
        "is": cell(r.get("is")),
        "precision": cell(r.get("precision")),
        "recall": cell(r.get("recall")),
        "psnr": psnr,
        "ssim": cell(r.get("ssim_vs_fp"), 3),
        "class_consistency": cell(r.get("class_consistency"), 3),
        "n": f"{r['n']}",
        "seeds": f"{r['seeds']}",
    }


def markdown(rows: list[dict], testbed: str = "unconditional") -> str:
    """The comparison table, then the tuning rows (one recon knob changed each) in their own."""
    columns = TESTBEDS[testbed].columns

    def table(rows: list[dict]) -> list[str]:
        lines = [
            "| " + " | ".join(HEADERS[c] for c in columns) + " |",
            "|" + "---|" * len(columns),
        ]
        for r in rows:
            cells = _cells(r)
            lines.append("| " + " | ".join(cells[c] for c in columns) + " |")
        return lines

    tuning = [r for r in rows if r["method"] in TUNING]
    lines = table([r for r in rows if r["method"] not in TUNING])
    if tuning:
        caption = "Tuning (calibration seed 0, recon knobs set as in sweep/gen_dvc.py TUNING):"
        lines += ["", caption, ""]
        lines += table(tuning)
    return "\n".join(lines) + "\n"


# --docs: the pages generated from the committed results
RESULTS = ROOT / "results"
DOCS_RESULTS = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
HEADLINE_START, HEADLINE_END = "<!-- results:start -->", "<!-- results:end -->"
HEADLINE_METHODS = (
    ("naive", "naive"),
    ("q-diffusion", "Q-Diffusion"),
    ("ptq4dm", "PTQ4DM"),
    ("eda-dm", "EDA-DM"),
)
HEADLINE_BITS = ((8, 8), (4, 8), (4, 4))


def _load(name: str):
    path = RESULTS / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"{path}: can't read it ({err}); it is committed with the sweep's results") from err


def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _spread(row: dict, key: str, std: str) -> str:
    return _num(row[key]) + (f" ± {row[std]:.2f}" if std in row else "")


def best_row(rows: list[dict], w_bits: int, a_bits: int) -> dict | None:
    """The quantized row with the highest PSNR vs FP at a width (the one-knob tuning rows, one seed
    each, left out)."""
    candidates = [
        r
        for r in rows
        if r["method"] != "fp"
        and r["method"] not in TUNING
        and (r["w_bits"], r["a_bits"]) == (w_bits, a_bits)
        and r["psnr_vs_fp"] is not None
    ]
    return max(candidates, key=lambda r: r["psnr_vs_fp"], default=None)


def headline(rows: list[dict]) -> str:
    """The README's table: FP and the paper's methods at W8A8, W4A8 and W4A4, and the sweep's best row."""
    by_key = {(r["method"], r["w_bits"], r["a_bits"]): r for r in rows}
    fp = by_key[("fp", 32, 32)]
    bits = [f"W{w}A{a}" for w, a in HEADLINE_BITS]
    lines = [
        "| method | " + " | ".join(f"{b} FD | {b} PSNR vs FP (dB)" for b in bits) + " |",
        "|---|" + "---|---|" * len(bits),
    ]
    fp_fd = _spread(fp, "fd", "fd_seed_std")
    lines.append("| FP (W32A32) | " + " | ".join(f"{fp_fd} | " for _ in bits) + " |")

    def cells(row: dict | None, label: bool = False) -> str:
        if row is None:
            return "not run | not run"
        name = f" ({row['method']})" if label else ""
        return f"{_spread(row, 'fd', 'fd_calib_std')} | {_spread(row, 'psnr_vs_fp', 'psnr_calib_std')}{name}"

    for method, label in HEADLINE_METHODS:
        lines.append(
            f"| {label} | " + " | ".join(cells(by_key.get((method, w, a))) for w, a in HEADLINE_BITS) + " |"
        )
    lines.append(
        "| best row of the sweep | "
        + " | ".join(cells(best_row(rows, w, a), True) for w, a in HEADLINE_BITS)
        + " |"
    )
    return "\n".join(lines) + "\n"


def _curve_table(rows: list[dict]) -> list[str]:
    lines = [
        "| steps | train loss | FP FD | IS | precision | recall | naive W8A8 PSNR vs FP (dB) | naive W8A8 FD "
        "| FD vs FP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["steps"]):
        fp, q = r["fp"], r["naive_w8a8"]
        lines.append(
            f"| {r['steps']} | {r['train_loss']:.4f} | {_num(fp['fd'])} | {_num(fp['is_mean'])} | "
            f"{_num(fp['precision'])} | {_num(fp['recall'])} | {_num(q['psnr'], 1)} | {_num(q['fd'])} | "
            f"{_num(q['fd_vs_fp'])} |"
        )
    return lines


def _class_curve_table(rows: list[dict], scale: str) -> list[str]:
    lines = [
        "| steps | train loss | FP FD | IS | precision | recall | class consistency "
        "| naive W8A8 PSNR vs FP (dB) | naive W8A8 FD | FD vs FP | naive W8A8 class consistency |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["steps"]):
        fp, q = r["guided"][scale]["fp"], r["guided"][scale]["naive_w8a8"]
        lines.append(
            f"| {r['steps']} | {r['train_loss']:.4f} | {_num(fp['fd'])} | {_num(fp['is_mean'])} | "
            f"{_num(fp['precision'])} | {_num(fp['recall'])} | {_num(fp['class_consistency'], 3)} | "
            f"{_num(q['psnr'], 1)} | {_num(q['fd'])} | {_num(q['fd_vs_fp'], 3)} | "
            f"{_num(q['class_consistency'], 3)} |"
        )
    return lines


def _guidance_table(scan: dict, curve: dict, sweep_rows: list[dict]) -> list[str]:
    """FP quality of the class model against the guidance scale: 1 from the curve's last snapshot,
    the scan's scales, 3 from the class sweep's FP row."""
    last = max(curve["rows"], key=lambda r: r["steps"])["guided"]["1"]["fp"]
    points = [(1.0, last)] + [(r["guidance_scale"], r) for r in scan["rows"]]
    points += [
        (float(r["guidance_scale"]), {**r, "precision": r["precision"], "recall": r["recall"]})
        for r in sweep_rows
        if r["method"] == "fp" and r["guidance_scale"] not in (None, 1)
    ]
    lines = ["| guidance | FP FD | class consistency | precision | recall |", "|---|---|---|---|---|"]
    for g, r in sorted(points, key=lambda p: p[0]):
        lines.append(
            f"| {g:g} | {_num(r['fd'])} | {_num(r['class_consistency'], 3)} | {_num(r['precision'])} | "
            f"{_num(r['recall'])} |"
        )
    return lines


def results_page() -> str:
    """docs/results.md: every testbed's table and the embedded models' training curves."""
    rows, class_rows = _load("embedded.json"), _load("embedded-class.json")
    curve, long, class_curve = (
        _load("training_curve.json"),
        _load("training_curve_long.json"),
        _load("training_curve_class.json"),
    )
    scan = _load("guidance_scan_class.json")
    out = [
        "# Results",
        "",
        "<!-- Generated by `python sweep/results.py --docs` from results/*.json: "
        "edit the generator, not this page. -->",
        "",
        "Every figure here is read from the committed `results/*.json`. The sweep's rows use fake",
        "quantization unless said otherwise, 512 samples from the FP rows' seeds, 100 DDIM steps and",
        "`recon.iters: 300`; PSNR, SSIM and FD vs FP are paired with FP (same x_T). FD uses the digits",
        "classifier's 128-d features, so its scale is not that of Inception FIDs. `±` is the spread",
        "(std) over seeds: sampling seeds for FP (the noise floor), calibration seeds for the rest;",
        "calibration sets that draw nothing at random (naive, q-diffusion) have one seed. Measured on a",
        "2-core Intel Xeon, CPU only, one or two threads a worker. How to rerun the rows, and what",
        "the figures say: [paper.md](paper.md).",
        "",
        "## The embedded default (unconditional digits UNet)",
        "",
        "`python sweep/run.py`, then `python sweep/results.py` (`results/embedded.json`).",
        "",
        markdown(rows).rstrip("\n"),
        "",
        "## The class-conditional digits model",
        "",
        "`python sweep/run.py --testbed class`, then `python sweep/results.py --testbed class`",
        "(`results/embedded-class.json`). Quantized rows sample on the integer path (`sample.mode: int`).",
        "At guidance 3 (the paper's) the FP samples themselves are broken on this model, so FD and",
        "class consistency there rank nothing; the paired figures still say how closely a quantized",
        "model follows FP.",
        "",
        markdown(class_rows, "class").rstrip("\n"),
        "",
        "## Training curves of the embedded models",
        "",
        f"The unconditional recipe, one constant-rate run measured at each snapshot (n = {curve['n']},",
        "sample seed 0, against the 360 held-out digits); naive W8A8 is uniform calibration and range",
        f"search only, paired with FP. {curve['cpu']}, {curve['torch_threads']} threads",
        f"(`results/training_curve.json`; steps {', '.join(str(r['steps']) for r in long['rows'])} from a",
        "longer run of the same recipe whose 8000-step snapshot is the shipped weights,",
        "`results/training_curve_long.json`).",
        "`python bench/training_curve.py --steps 500,1000,2000,3000,5000,8000 --set model.embedded.lr=1e-3",
        "--set model.embedded.ema_decay=0.999 --keep DIR`.",
        "",
        *_curve_table(curve["rows"] + long["rows"]),
        "",
        "The class-conditional recipe without guidance (`results/training_curve_class.json`;",
        "`python bench/training_curve.py --measure DIR --guidance 1",
        "--set model.embedded.conditioning=class`):",
        "",
        *_class_curve_table(class_curve["rows"], "1"),
        "",
        "The same at guidance 3, first snapshots only:",
        "",
        *_class_curve_table(class_curve["guidance_3_rows"], "3"),
        "",
        "FP quality of the shipped class model against the guidance scale (n = 512, DDIM 100 steps;",
        "1 is the curve's last row, 3 the class sweep's FP row; the others",
        "`python bench/guidance_scan.py --scales 1.25,1.5,2`, `results/guidance_scan_class.json`):",
        "",
        *_guidance_table(scan, class_curve, class_rows),
        "",
    ]
    return "\n".join(out)


def readme_with_headline(text: str, table: str) -> str:
    """The README with its headline table (between the markers) replaced by ``table``."""
    start, end = text.find(HEADLINE_START), text.find(HEADLINE_END)
    if start < 0 or end < start:
        raise SystemExit(f"{README}: no {HEADLINE_START} ... {HEADLINE_END} markers for the headline table")
    return text[: start + len(HEADLINE_START)] + "\n" + table + text[end:]


def docs(check: bool) -> None:
    """Writes (or, with ``check``, compares) docs/results.md and the README's headline table."""
    rows = _load("embedded.json")
    wanted = {
        DOCS_RESULTS: results_page(),
        README: readme_with_headline(README.read_text(), headline(rows)),
    }
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    if check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run `python sweep/results.py --docs`")
        raise SystemExit(1 if stale else 0)
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")


@click.command()
@click.option(
    "--testbed",
    type=click.Choice(list(TESTBEDS)),
    default="unconditional",
    show_default=True,
    help="unconditional: the embedded default's table; class: the class-conditional model's",
)
@click.option(
    "--metrics",
    "dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="metrics folder(s) of the testbed (default sweep/metrics, sweep/metrics/class); rows found in "
    "several: first wins",
)
@click.option(
    "--previous",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a results JSON whose per-seed runs are kept where the metrics folders give no new run",
)
@click.option(
    "--out",
    default=None,
    help="path stem of the table: STEM.json and STEM.md (relative to the repository root); default "
    "results/embedded, results/embedded-class",
)
@click.option(
    "--docs",
    "write_docs",
    is_flag=True,
    help="from the committed results/*.json: write docs/results.md and the README's headline table",
)
@click.option(
    "--check", is_flag=True, help="with --docs: write nothing, exit 1 where either file is out of date"
)
def main(
    testbed: str,
    dirs: tuple[Path, ...],
    previous: tuple[Path, ...],
    out: str | None,
    write_docs: bool = False,
    check: bool = False,
) -> None:
    if check and not write_docs:
        raise click.UsageError("--check goes with --docs")
    if write_docs:
        docs(check)
        return
    rows = build_rows(list(dirs) or None, list(previous), testbed)
    stem = ROOT / (out or TESTBEDS[testbed].out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(rows, indent=2) + "\n")
    stem.with_name(stem.name + ".md").write_text(markdown(rows, testbed))
    print(markdown(rows, testbed))


if __name__ == "__main__":
    main()
