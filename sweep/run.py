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
    python sweep/run.py --testbed class  # the class-conditional model's rows (class_run_order)
"""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).parent))
from gen_dvc import class_run_order, run_order  # noqa: E402

SWEEP = Path(__file__).resolve().parent
# testbed -> (its targets in order, the main pipeline's outputs its stages read)
TESTBEDS = {
    "unconditional": (run_order, ("artifacts/model", "artifacts/reference", "artifacts/trajectories.zarr")),
    # the class model, its dumps and calibration sets are the sweep's own stages
    "class": (class_run_order, ("artifacts/reference",)),
}


@click.command()
@click.option("--list", "list_only", is_flag=True, help="print the targets in order and exit")
@click.option("--first", type=int, default=None, help="run only the first N targets")
@click.option("--only", default="*", show_default=True, help="run only the targets matching this pattern")
@click.option(
    "--testbed",
    type=click.Choice(list(TESTBEDS)),
    default="unconditional",
    show_default=True,
    help="unconditional: the embedded default's rows; class: the class-conditional embedded model's",
)
def main(list_only: bool, first: int | None, only: str, testbed: str) -> None:
    order, needs = TESTBEDS[testbed]
    targets = [t for t in order() if fnmatch.fnmatch(t, only)][:first]
    missing = [p for p in needs if not (SWEEP.parent / p).exists()]
    if missing and not list_only:
        raise click.ClickException(f"{', '.join(missing)} missing: run the main pipeline first (`dvc repro`)")
    for i, target in enumerate(targets, 1):
        click.echo(f"[{i}/{len(targets)}] {target}")
        if not list_only:
            subprocess.run([sys.executable, "-m", "dvc", "repro", target], cwd=SWEEP, check=True)


if __name__ == "__main__":
    main()
