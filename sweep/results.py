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
def main(testbed: str, dirs: tuple[Path, ...], previous: tuple[Path, ...], out: str | None) -> None:
    rows = build_rows(list(dirs) or None, list(previous), testbed)
    stem = ROOT / (out or TESTBEDS[testbed].out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(rows, indent=2) + "\n")
    stem.with_name(stem.name + ".md").write_text(markdown(rows, testbed))
    print(markdown(rows, testbed))


if __name__ == "__main__":
    main()
