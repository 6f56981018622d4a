"""Builds results/embedded.json and results/embedded.md from the sweep's metrics files.

Rows: {"method", "w_bits", "a_bits", "fd", "fd_vs_fp", "is", "precision", "recall",
"psnr_vs_fp", "n"}, averaged over calibration seeds where a configuration has several (with
their spread), plus the FP row with ``fd_seed_std``, the Frechet distance's spread over the FP
sampling seeds: the table's noise floor. Every row keeps its per-seed runs, so
``--previous results/embedded.json`` adds newly run rows to the committed table (a row run
again replaces its old figures) without the metrics folders of the runs before.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gen_dvc import TUNING  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METRICS = ROOT / "sweep" / "metrics"
NAME = re.compile(r"(?P<method>.+)-w(?P<w>\d+)a(?P<a>\d+)-s(?P<seed>\d+)\.json")


RUN_KEYS = ("fd", "fd_vs_fp", "is_mean", "precision", "recall", "psnr")


def metrics_files(dirs: list[Path]) -> dict[str, Path]:
    """File name -> path over ``dirs`` (rows of one sweep run in several work trees; first wins)."""
    files: dict[str, Path] = {}
    for directory in dirs:
        for path in sorted(directory.glob("*.json")):
            files.setdefault(path.name, path)
    return dict(sorted(files.items()))


def runs_from_metrics(dirs: list[Path]) -> dict[tuple, dict]:
    """(method, w_bits, a_bits, seed) -> one run's figures, from the sweep's metrics files.

    The seed is the calibration seed of a quantized row and the sampling seed of an FP run.
    """
    runs: dict[tuple, dict] = {}
    for name, path in metrics_files(dirs).items():
        metrics = json.loads(path.read_text())
        if match := NAME.fullmatch(name):
            key = (match["method"], int(match["w"]), int(match["a"]), int(match["seed"]))
            runs[key] = {k: metrics["quant"][k] for k in (*RUN_KEYS, "n")}
        elif match := re.fullmatch(r"fp-s(\d+)\.json", name):
            fp = metrics["fp"]
            runs[("fp", 32, 32, int(match[1]))] = {
                **{k: fp[k] for k in ("fd", "is_mean", "precision", "recall", "n")},
                "fd_vs_fp": 0.0,
                "psnr": None,
            }
    return runs


def runs_from_table(path: Path) -> dict[tuple, dict]:
    """The per-seed runs a results JSON keeps, keyed as in :func:`runs_from_metrics`.

    Lets a sweep continued later, after its metrics folders are gone, add its new rows to the
    committed table instead of rerunning every row (on the same model: ``_check_same_model``).
    """
    try:
        rows = json.loads(path.read_text())
        runs = {}
        for row in rows:
            config = (row["method"], row["w_bits"], row["a_bits"])
            for run in row.get("runs", []):  # older tables kept no runs for the FP row
                seed = run["calib_seed"] if "calib_seed" in run else run["sample_seed"]
                runs[(*config, seed)] = {
                    **{k: run[k] for k in RUN_KEYS},
                    "n": row["n"],
                }
        return runs
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: not a results table written by sweep/results.py ({err})") from err


FP_SEED0 = ("fp", 32, 32, 0)


def _check_same_model(table: Path, old: dict | None, new: dict | None) -> None:
    """Runs join only runs of the same model: FP seed 0 is bitwise reproducible on one machine,
    so its figures identify the model (one trained on another CPU type differs in its bits)."""
    if old is None:
        raise SystemExit(
            f"{table} has no FP seed-0 run, so its rows can't be shown to come from this model: "
            "rerun its rows instead (`python sweep/run.py`)"
        )
    if new is not None and any(old[k] != new[k] for k in ("fd", "is_mean", "precision", "recall")):
        raise SystemExit(
            f"{table}: its FP seed-0 run differs from that in the metrics folders (FD {old['fd']:.4f} vs "
            f"{new['fd']:.4f}): the tables come from different models (trained on another machine?); "
            "rerun the rows on one model instead of merging"
        )


def build_rows(dirs: list[Path] | None = None, previous: list[Path] = ()) -> list[dict]:
    """The table's rows from the metrics files in ``dirs``, plus the runs of ``previous`` tables
    that no metrics file gives again (a rerun row replaces its old figures)."""
    runs = runs_from_metrics(dirs or [METRICS])
    for table in previous:
        kept = runs_from_table(table)
        _check_same_model(table, kept.get(FP_SEED0), runs.get(FP_SEED0))
        for key, run in kept.items():
            runs.setdefault(key, run)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for (method, w, a, seed), run in sorted(runs.items()):
        groups[(method, w, a)].append({**run, "seed": seed})
    if ("fp", 32, 32) not in groups:
        raise SystemExit(f"no FP metrics in {dirs or [METRICS]}: run `python sweep/run.py` first")
    rows = []
    for (method, w, a), group in groups.items():

        def mean(key: str, group: list[dict] = group) -> float | None:
            values = [r[key] for r in group]
            return None if None in values else float(np.mean(values))

        fp = method == "fp"
        row = {
            "method": method,
            "w_bits": w,
            "a_bits": a,
            "fd": mean("fd"),
            "fd_vs_fp": mean("fd_vs_fp"),
            "is": mean("is_mean"),
            "precision": mean("precision"),
            "recall": mean("recall"),
            "psnr_vs_fp": mean("psnr"),
            "n": group[0]["n"],
            "seeds": len(group),
        }
        if fp:  # the FP row's seeds are sampling seeds: their spread is the table's noise floor
            row["fd_seed_std"] = float(np.std([r["fd"] for r in group]))
        elif len(group) > 1:
            row["fd_calib_std"] = float(np.std([r["fd"] for r in group]))
            row["psnr_calib_std"] = float(np.std([r["psnr"] for r in group]))
            row["fd_vs_fp_calib_std"] = float(np.std([r["fd_vs_fp"] for r in group]))
        seed_key = "sample_seed" if fp else "calib_seed"
        row["runs"] = [{seed_key: r["seed"], **{k: r[k] for k in RUN_KEYS}} for r in group]
        rows.append(row)
    rows.sort(key=lambda r: (-r["w_bits"], -r["a_bits"], r["method"]))
    return rows


def markdown(rows: list[dict]) -> str:
    """The comparison table, then the tuning rows (one recon knob changed each) in their own."""

    def cell(value: float | None, digits: int = 2) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    def table(rows: list[dict]) -> list[str]:
        lines = [
            "| method | W/A | FD | FD vs FP | IS | precision | recall | PSNR vs FP (dB) | n | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            fd = cell(r["fd"]) + (f" ± {r['fd_seed_std']:.2f}" if "fd_seed_std" in r else "")
            fd += f" ± {r['fd_calib_std']:.2f}" if "fd_calib_std" in r else ""
            psnr = cell(r["psnr_vs_fp"]) + (f" ± {r['psnr_calib_std']:.2f}" if "psnr_calib_std" in r else "")
            lines.append(
                f"| {r['method']} | W{r['w_bits']}A{r['a_bits']} | {fd} | {cell(r['fd_vs_fp'])} | "
                f"{cell(r['is'])} | {cell(r['precision'])} | {cell(r['recall'])} | {psnr} | "
                f"{r['n']} | {r['seeds']} |"
            )
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
    "--metrics",
    "dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="metrics folder(s) of the sweep (default sweep/metrics); rows found in several: first wins",
)
@click.option(
    "--previous",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a results JSON whose per-seed runs are kept where the metrics folders give no new run",
)
@click.option(
    "--out",
    default="results/embedded",
    show_default=True,
    help="path stem of the table: STEM.json and STEM.md (relative to the repository root)",
)
def main(dirs: tuple[Path, ...], previous: tuple[Path, ...], out: str) -> None:
    rows = build_rows(list(dirs) or None, list(previous))
    stem = ROOT / out
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(rows, indent=2) + "\n")
    stem.with_name(stem.name + ".md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
