"""Builds results/embedded.json and results/embedded.md from the sweep's metrics files.

Rows: {"method", "w_bits", "a_bits", "fd", "fd_vs_fp", "is", "precision", "recall",
"psnr_vs_fp", "n"}, averaged over calibration seeds where a configuration has several (with
their spread), plus the FP row with ``fd_seed_std``, the Frechet distance's spread over the FP
sampling seeds: the table's noise floor.
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


def metrics_files(dirs: list[Path]) -> dict[str, Path]:
    """File name -> path over ``dirs`` (rows of one sweep run in several work trees; first wins)."""
    files: dict[str, Path] = {}
    for directory in dirs:
        for path in sorted(directory.glob("*.json")):
            files.setdefault(path.name, path)
    return dict(sorted(files.items()))


def build_rows(dirs: list[Path] | None = None) -> list[dict]:
    files = metrics_files(dirs or [METRICS])
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for name, path in files.items():
        match = NAME.fullmatch(name)
        if match:
            quant = json.loads(path.read_text())["quant"]
            groups[(match["method"], int(match["w"]), int(match["a"]))].append(
                {**quant, "calib_seed": int(match["seed"])}
            )
    fp_runs = [json.loads(path.read_text())["fp"] for name, path in files.items() if name.startswith("fp-s")]
    if not fp_runs:
        raise SystemExit(f"no FP metrics in {METRICS}: run `dvc repro sweep/dvc.yaml` first")
    fp_fd = [r["fd"] for r in fp_runs]
    rows = [
        {
            "method": "fp",
            "w_bits": 32,
            "a_bits": 32,
            "fd": float(np.mean(fp_fd)),
            "fd_seed_std": float(np.std(fp_fd)),
            "fd_vs_fp": 0.0,
            "is": float(np.mean([r["is_mean"] for r in fp_runs])),
            "precision": float(np.mean([r["precision"] for r in fp_runs])),
            "recall": float(np.mean([r["recall"] for r in fp_runs])),
            "psnr_vs_fp": None,
            "n": fp_runs[0]["n"],
            "seeds": len(fp_runs),
        }
    ]
    for (method, w, a), runs in groups.items():

        def mean(key: str, runs: list[dict] = runs) -> float:
            return float(np.mean([r[key] for r in runs]))

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
            "n": runs[0]["n"],
            "seeds": len(runs),
        }
        if len(runs) > 1:
            row["fd_calib_std"] = float(np.std([r["fd"] for r in runs]))
            row["psnr_calib_std"] = float(np.std([r["psnr"] for r in runs]))
            row["fd_vs_fp_calib_std"] = float(np.std([r["fd_vs_fp"] for r in runs]))
        row["runs"] = [
            {k: r[k] for k in ("calib_seed", "fd", "fd_vs_fp", "is_mean", "precision", "recall", "psnr")}
            for r in runs
        ]
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
    "--out",
    default="results/embedded",
    show_default=True,
    help="path stem of the table: STEM.json and STEM.md (relative to the repository root)",
)
def main(dirs: tuple[Path, ...], out: str) -> None:
    rows = build_rows(list(dirs) or None)
    stem = ROOT / out
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(rows, indent=2) + "\n")
    stem.with_name(stem.name + ".md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
