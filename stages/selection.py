"""Stage `select` (script named selection.py: `select` would shadow the standard library module): the
calibration set, by TDAC (docs/method.md §2) or a baseline.
Inputs: artifacts/trajectories.zarr. Outputs: artifacts/calib.zarr, plots/tdac.csv.
"""

from __future__ import annotations

import logging

import click
import numpy as np

from edadm.artifacts import read_array
from edadm.calib.selection import SelectConfig, choose_calibration
from edadm.calib.store import (
    calibration_rows,
    gather_inputs,
    open_trajectories,
    write_calibration,
    write_step_table,
)
from edadm.config import as_dict, load_section, params_options
from edadm.runtime import configure_logging

logger = logging.getLogger("stages.select")


@click.command()
@params_options
@click.option("--trajectories", default="artifacts/trajectories.zarr", show_default=True)
@click.option("--out", default="artifacts/calib.zarr", show_default=True)
@click.option("--table", default="plots/tdac.csv", show_default=True)
def main(params: dict, trajectories: str, out: str, table: str) -> None:
    configure_logging()
    config = load_section(SelectConfig, "select", params)
    store = open_trajectories(trajectories)
    timesteps = read_array(store, "t", trajectories, "dump")
    n_steps, n_traj = store["x"].shape[:2]

    features = None
    if config.method == "tdac":
        if "features" not in store:
            raise ValueError(f"{trajectories} holds no features: rerun `dvc repro dump` (dump.feature_batch)")
        features = read_array(store, "features", trajectories, "dump")
    selection = choose_calibration(config, n_steps, n_traj, features, timesteps)

    traj, step, conditioning = calibration_rows(store, selection.traj, selection.step)
    x = gather_inputs(store, traj, step)
    attrs = {"select": as_dict(config), "radius": selection.radius, "dump": dict(store.attrs)}
    write_calibration(out, x, timesteps, traj, step, selection.per_step, attrs, conditioning)
    write_step_table(table, timesteps, selection.per_step)
    logger.info(
        "selected %d samples from %d steps (%s)",
        len(x),
        int(np.sum(selection.per_step["count"] > 0)),
        config.method,
    )


if __name__ == "__main__":
    main()
