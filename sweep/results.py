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

``--docs`` builds nothing from metrics: it reads the committed results/*.json (every testbed's
table with the seeds of each row's runs, the embedded models' training curves) and writes
docs/results.md, the README's headline table (between ``<!-- results:start -->`` and
``<!-- results:end -->``) and the training-curve tables of docs/embedded-models.md (between
``<!-- results:NAME:start -->`` and ``<!-- results:NAME:end -->``); ``--docs --check`` writes
nothing and exits 1 where any of them differs from what it would write.
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
    "seed_list": "seeds",
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
        "seed_list": ", ".join(str(seed) for seed in run_seeds(r)) or f"{r['seeds']}",
    }


def run_seeds(row: dict) -> list[int]:
    """The seeds of a row's runs: sampling seeds for FP, calibration seeds for the rest (older
    tables kept no runs for the FP row: none)."""
    return [run["sample_seed"] if "sample_seed" in run else run["calib_seed"] for run in row.get("runs", [])]


def markdown(rows: list[dict], testbed: str = "unconditional", seed_list: bool = False) -> str:
    """The comparison table, then the tuning rows (one recon knob changed each) in their own.

    ``seed_list``: the seeds column lists the seeds of each row's runs instead of counting them.
    """
    columns = TESTBEDS[testbed].columns
    if seed_list:
        columns = tuple("seed_list" if c == "seeds" else c for c in columns)

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


# --docs: the pages generated from the committed results (paths under ROOT, read when called)
DOCS_RESULTS = "docs/results.md"
README = "README.md"
EMBEDDED_MODELS = "docs/embedded-models.md"
HEADLINE_METHODS = (
    ("naive", "naive"),
    ("q-diffusion", "Q-Diffusion"),
    ("ptq4dm", "PTQ4DM"),
    ("eda-dm", "EDA-DM"),
)
HEADLINE_BITS = ((8, 8), (4, 8), (4, 4))


def block_markers(name: str | None = None) -> tuple[str, str]:
    """The comment lines around a generated block: ``<!-- results:start -->`` / ``:end -->`` for the
    README's headline table, ``<!-- results:NAME:start -->`` for the others."""
    tag = "results" if name is None else f"results:{name}"
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


def with_block(text: str, body: str, name: str | None, path: str) -> str:
    """``text`` with the block between ``name``'s markers replaced by ``body`` (lines, ending in \\n)."""
    start, end = block_markers(name)
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"{path}: no {start} ... {end} lines around the generated table; put them back")
    return text[: i + len(start)] + "\n" + body + text[j:]


def _load(name: str):
    path = ROOT / "results" / name
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


def _per_seed_table(rows: list[dict], guided: bool = False) -> list[str]:
    """PSNR vs FP / FD of every run of the rows with several calibration seeds, seed by seed."""
    seeded = [r for r in rows if r["method"] != "fp" and len(r.get("runs", [])) > 1]
    if not seeded:
        return []
    seeds = sorted({seed for r in seeded for seed in run_seeds(r)})
    lines = [
        "| method | "
        + ("guidance | " if guided else "")
        + "W/A | "
        + " | ".join(f"seed {seed}" for seed in seeds)
        + " |",
        "|---|" + ("---|" if guided else "") + "---|" + "---|" * len(seeds),
    ]
    for r in seeded:
        by_seed = {seed: run for seed, run in zip(run_seeds(r), r["runs"], strict=True)}
        cells = [
            f"{_num(by_seed[seed]['psnr'])} / {_num(by_seed[seed]['fd'])}" if seed in by_seed else ""
            for seed in seeds
        ]
        guidance = f"{r['guidance_scale']} | " if guided else ""
        lines.append(
            f"| {r['method']} | {guidance}W{r['w_bits']}A{r['a_bits']} | " + " | ".join(cells) + " |"
        )
    return lines


def _sweep_section(rows: list[dict], testbed: str) -> list[str]:
    """A testbed's table (its seeds column lists the seeds of each row's runs), then its rows with
    several calibration seeds, seed by seed."""
    out = [markdown(rows, testbed, seed_list=True).rstrip("\n")]
    per_seed = _per_seed_table(rows, guided=TESTBEDS[testbed].guided)
    if per_seed:
        out += [
            "",
            "PSNR vs FP (dB) / FD of each run of the rows with several calibration seeds:",
            "",
            *per_seed,
        ]
    return out


def _curve_table(rows: list[dict]) -> list[str]:
    lines = [
        "| steps | train loss | FP FD | IS | precision | recall | naive W8A8 PSNR vs FP (dB) | naive W8A8 FD "
        "| FD vs FP | source |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["steps"]):
        fp, q = r["fp"], r["naive_w8a8"]
        lines.append(
            f"| {r['steps']} | {r['train_loss']:.4f} | {_num(fp['fd'])} | {_num(fp['is_mean'])} | "
            f"{_num(fp['precision'])} | {_num(fp['recall'])} | {_num(q['psnr'], 1)} | {_num(q['fd'])} | "
            f"{_num(q['fd_vs_fp'])} | {r['source']} |"
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
    the scan's scales, 3 from the class sweep's FP row; each row names its file."""
    last = max(curve["rows"], key=lambda r: r["steps"])
    points = [(1.0, last["guided"]["1"]["fp"], f"training_curve_class.json, {last['steps']} steps")]
    points += [(r["guidance_scale"], r, "guidance_scan_class.json") for r in scan["rows"]]
    points += [
        (float(r["guidance_scale"]), r, "embedded-class.json, FP row")
        for r in sweep_rows
        if r["method"] == "fp" and r["guidance_scale"] not in (None, 1)
    ]
    lines = [
        "| guidance | FP FD | class consistency | precision | recall | source |",
        "|---|---|---|---|---|---|",
    ]
    for g, r, source in sorted(points, key=lambda p: p[0]):
        lines.append(
            f"| {g:g} | {_num(r['fd'])} | {_num(r['class_consistency'], 3)} | {_num(r['precision'])} | "
            f"{_num(r['recall'])} | {source} |"
        )
    return lines


def curve_tables() -> dict[str, list[str]]:
    """The embedded models' training-curve and guidance tables, by block name (docs/results.md shows
    them, docs/embedded-models.md has each between its markers)."""
    curve, long, class_curve = (
        _load("training_curve.json"),
        _load("training_curve_long.json"),
        _load("training_curve_class.json"),
    )
    unconditional = [{**r, "source": "training_curve.json"} for r in curve["rows"]]
    unconditional += [{**r, "source": "training_curve_long.json"} for r in long["rows"]]
    return {
        "training-curve": _curve_table(unconditional),
        "training-curve-class": _class_curve_table(class_curve["rows"], "1"),
        "training-curve-class-g3": _class_curve_table(class_curve["guidance_3_rows"], "3"),
        "guidance": _guidance_table(
            _load("guidance_scan_class.json"), class_curve, _load("embedded-class.json")
        ),
    }


def _earlier_rounds() -> list[str]:
    """The sweep's tables on the 900-step embedded models (results/embedded-round*.json), each with
    the reading it had at the time in results/embedded-round*.md."""
    out = []
    for path in sorted((ROOT / "results").glob("embedded-round*.json")):
        rows = _load(path.name)
        fp = next(r for r in rows if r["method"] == "fp")
        out += [
            "",
            f"### {path.stem.removeprefix('embedded-').replace('round', 'Round ')}",
            "",
            f"`results/{path.name}` (FP FD {_spread(fp, 'fd', 'fd_seed_std')}; the reading of the time: "
            f"[results/{path.stem}.md](../results/{path.stem}.md)).",
            "",
            *_sweep_section(rows, "unconditional"),
        ]
    return out


def results_page() -> str:
    """docs/results.md: every testbed's table, the runs behind each row, the training curves."""
    rows, class_rows = _load("embedded.json"), _load("embedded-class.json")
    curve, long, class_curve = (
        _load("training_curve.json"),
        _load("training_curve_long.json"),
        _load("training_curve_class.json"),
    )
    tables = curve_tables()
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
        "calibration sets that draw nothing at random (naive, q-diffusion) have one seed. The seeds",
        "column lists the seeds of each row's runs (FP: sampling seeds). Measured on a 2-core Intel",
        "Xeon, CPU only, one or two threads a worker. How to rerun the rows, and what the figures say:",
        "[paper.md](paper.md).",
        "",
        "## The embedded default (unconditional digits UNet)",
        "",
        "`python sweep/run.py`, then `python sweep/results.py`",
        "([results/embedded.json](../results/embedded.json)).",
        "",
        *_sweep_section(rows, "unconditional"),
        "",
        "## The class-conditional digits model",
        "",
        "`python sweep/run.py --testbed class`, then `python sweep/results.py --testbed class`",
        "([results/embedded-class.json](../results/embedded-class.json)). Quantized rows sample on the",
        "integer path (`sample.mode: int`). At guidance 3 (the paper's) the FP samples themselves are",
        "broken on this model, so FD and class consistency there rank nothing; the paired figures",
        "still say how closely a quantized model follows FP.",
        "",
        *_sweep_section(class_rows, "class"),
        "",
        "## Training curves of the embedded models",
        "",
        f"The unconditional recipe, one constant-rate run measured at each snapshot (n = {curve['n']},",
        "sample seed 0, against the 360 held-out digits); naive W8A8 is uniform calibration and range",
        f"search only, paired with FP. {curve['cpu']}, {curve['torch_threads']} threads. The rows of",
        "`training_curve_long.json` come from a longer run of the same recipe whose 8000-step",
        "snapshot is the shipped weights.",
        "`python bench/training_curve.py --steps 500,1000,2000,3000,5000,8000 --set model.embedded.lr=1e-3",
        "--set model.embedded.ema_decay=0.999 --keep DIR`",
        f"(`--steps {','.join(str(r['steps']) for r in long['rows'])}` for the longer run).",
        "",
        *tables["training-curve"],
        "",
        f"The class-conditional recipe without guidance (n = {class_curve['n']},",
        "[results/training_curve_class.json](../results/training_curve_class.json);",
        "`python bench/training_curve.py --measure DIR --guidance 1",
        "--set model.embedded.conditioning=class`):",
        "",
        *tables["training-curve-class"],
        "",
        "The same at guidance 3, first snapshots only:",
        "",
        *tables["training-curve-class-g3"],
        "",
        "FP quality of the shipped class model against the guidance scale (n = 512, DDIM 100 steps;",
        "the scan's scales by `python bench/guidance_scan.py --scales 1.25,1.5,2`; source: the file",
        "under `results/` each row comes from):",
        "",
        *tables["guidance"],
        "",
        "## Earlier testbeds: the 900-step embedded models",
        "",
        "The sweep first ran on an undertrained 900-step embedded model, several times more fragile",
        "under quantization than the converged one; these tables keep those runs. They do not compare",
        "with the tables above.",
        *_earlier_rounds(),
        "",
    ]
    return "\n".join(out)


def embedded_models_page(text: str) -> str:
    """docs/embedded-models.md with its training-curve tables (between their markers) regenerated."""
    for name, lines in curve_tables().items():
        if name in ("training-curve", "training-curve-class", "guidance"):
            text = with_block(text, "\n".join(lines) + "\n", name, EMBEDDED_MODELS)
    return text


def generated_docs() -> dict[Path, str]:
    """Every file ``--docs`` writes -> the text it writes there."""
    readme, models = ROOT / README, ROOT / EMBEDDED_MODELS
    for path in (readme, models):
        if not path.is_file():
            raise SystemExit(f"{path} not found: --docs fills its generated tables")
    return {
        ROOT / DOCS_RESULTS: results_page(),
        readme: with_block(readme.read_text(), headline(_load("embedded.json")), None, README),
        models: embedded_models_page(models.read_text()),
    }


def docs(check: bool) -> None:
    """Writes (or, with ``check``, compares) docs/results.md, the README's headline table and the
    training-curve tables of docs/embedded-models.md."""
    wanted = generated_docs()
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
    help="from the committed results/*.json: write docs/results.md and the generated tables of README.md "
    "and docs/embedded-models.md",
)
@click.option(
    "--check", is_flag=True, help="with --docs: write nothing, exit 1 where a generated file is out of date"
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
