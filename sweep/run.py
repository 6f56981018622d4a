"""Runs the sweep one row at a time, most informative row first (sweep/gen_dvc.py:run_order).

sweep/ is a DVC project of its own (sweep/gen_dvc.py says why). `cd sweep && dvc repro` runs
every row in DVC's order; this script runs the same stages target by target, so a sweep
stopped after a few hours has the rows that matter most, and a rerun skips what DVC has cached
(sweep/dvc.lock, sweep/.dvc/cache). `python sweep/results.py` builds the table from whatever ran.
It needs the main pipeline's model, reference and dump: run `dvc repro` first.

    python sweep/run.py            # all rows
    python sweep/run.py --list     # the order, nothing run
    python sweep/run.py --first 8  # the first 8 targets
    python sweep/run.py --only '*iters1000*'  # the targets matching a pattern
"""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).parent))
from gen_dvc import run_order  # noqa: E402

SWEEP = Path(__file__).resolve().parent
NEEDS = ("artifacts/model", "artifacts/reference", "artifacts/trajectories.zarr")


@click.command()
@click.option("--list", "list_only", is_flag=True, help="print the targets in order and exit")
@click.option("--first", type=int, default=None, help="run only the first N targets")
@click.option("--only", default="*", show_default=True, help="run only the targets matching this pattern")
def main(list_only: bool, first: int | None, only: str) -> None:
    targets = [t for t in run_order() if fnmatch.fnmatch(t, only)][:first]
    missing = [p for p in NEEDS if not (SWEEP.parent / p).exists()]
    if missing and not list_only:
        raise click.ClickException(f"{', '.join(missing)} missing: run the main pipeline first (`dvc repro`)")
    for i, target in enumerate(targets, 1):
        click.echo(f"[{i}/{len(targets)}] {target}")
        if not list_only:
            subprocess.run([sys.executable, "-m", "dvc", "repro", target], cwd=SWEEP, check=True)


if __name__ == "__main__":
    main()
