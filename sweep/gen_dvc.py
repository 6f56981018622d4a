"""Writes sweep/dvc.yaml: the paper's comparison as DVC `foreach` stages.

sweep/ is a DVC project of its own (`dvc init --subdir`), so the main pipeline's `dvc status`,
`dvc exp run`, `dvc metrics show` and `dvc exp show` never see its ~230 stages, and a plain
`dvc repro` never runs them. Its stages run the main pipeline's stage scripts with overrides,
depend on the main pipeline's model, reference and trajectory dump (`../artifacts/...`), read
the main `params.yaml`, and keep their outputs, cache and `dvc.lock` under sweep/.

Run `python sweep/gen_dvc.py` after editing the rows below or the main dvc.yaml's deps, then
`python sweep/run.py` (or `cd sweep && dvc repro`).
"""

from __future__ import annotations

from pathlib import Path

import yaml

# Calibration sets: name -> the select stage's overrides (METHOD.md section 2).
CALIBRATIONS = {
    "uniform": {"select.method": "uniform"},  # Q-Diffusion's rule at the pipeline's size (1024)
    "ndtc": {"select.method": "ndtc"},
    "tdac": {"select.method": "tdac"},
    "random": {"select.method": "random"},
    # the official settings: TDAC with the fixed radius 3.0 (CIFAR), Q-Diffusion's 256 samples
    # at each of its 20 steps (5120)
    "tdac-official": {"select.method": "tdac", "select.tdac.radius": "3.0"},
    "uniform-official": {"select.method": "uniform", "select.uniform.per_step": "256"},
}
# Every knob of the quantizer and of FBR at its official value (README "Differences from the
# official code"); the sampler's quadratic spacing is left out: it changes the trajectories and
# the FP samples every row shares, so it is measured apart on the main pipeline.
EDA_DM_OFFICIAL = {
    "recon.round_reg": "false",
    "quant.split_conv1": "false",
    "quant.act_search_elements": "0",
}
# name -> (calibration set, reconstruction method, reconstruct stage overrides)
METHODS = {
    "naive": ("uniform", "none", {}),
    "ptq4dm": ("ndtc", "brecq", {}),
    "q-diffusion": ("uniform", "brecq", {}),
    "eda-dm": ("tdac", "fbr", {}),
    "tdac-only": ("tdac", "brecq", {}),
    "fbr-only": ("uniform", "fbr", {}),
    "eda-dm-official": ("tdac-official", "fbr", EDA_DM_OFFICIAL),
    "q-diffusion-official": ("uniform-official", "brecq", {"recon.brecq_optimizer": "qdiffusion"}),
    # beyond the paper: random calibration, the floor every calibration rule must beat (W4A8 only)
    "random-brecq": ("random", "brecq", {}),
    # the official fixed radius alone (W4A8 only)
    "eda-dm-radius3": ("tdac-official", "fbr", {}),
    # beyond the paper: activation ranges per group of 25 consecutive sampling steps
    "naive-groups4": ("uniform", "none", {"quant.act_timestep_groups": "4"}),
    "eda-dm-groups4": ("tdac", "fbr", {"quant.act_timestep_groups": "4"}),
}
CALIB_ONLY_METHODS = ["random-brecq", "eda-dm-radius3"]
PAPER_BITS = [(8, 8), (4, 8)]
# beyond the paper: where calibration and reconstruction matter more
STRESS_BITS = [(4, 6), (4, 4), (3, 8)]
STRESS_METHODS = [
    "naive",
    "q-diffusion",
    "eda-dm",
    "tdac-only",
    "eda-dm-official",
    "naive-groups4",
    "eda-dm-groups4",
]
CALIB_SEEDS = [0, 1, 2]  # calibration rules compared over seeds at W4A8
FP_SEEDS = [0, 1, 2]  # the FP row's Frechet-distance noise floor
# Tuning at W4A8 (seed 0): name -> (base method, reconstruct stage overrides), one knob changed
# from params.yaml each. Why each was tried: README "What the figures say". (The first round's
# `-noreg-*` rows, each knob with the rounding regulariser off, are in results/embedded-round1.md.)
TUNING = {
    "eda-dm-noreg": ("eda-dm", {"recon.round_reg": "false"}),
    "eda-dm-lrw": ("eda-dm", {"recon.lr_w": "0.05"}),
    "eda-dm-noqdrop": ("eda-dm", {"recon.qdrop_prob": "0.0"}),
    "eda-dm-lowgamma": ("eda-dm", {"recon.gamma": "0.4"}),
    "eda-dm-iters1000": ("eda-dm", {"recon.iters": "1000"}),
    "q-diffusion-iters1000": ("q-diffusion", {"recon.iters": "1000"}),
    # fixed activation steps (no LSQ): do the learned steps help, for each calibration rule?
    "eda-dm-fixedacts": ("eda-dm", {"recon.lr_a": "0.0"}),
    "q-diffusion-fixedacts": ("q-diffusion", {"recon.lr_a": "0.0"}),
    "fbr-only-fixedacts": ("fbr-only", {"recon.lr_a": "0.0"}),
    "tdac-only-fixedacts": ("tdac-only", {"recon.lr_a": "0.0"}),
    # activation ranges searched once on the whole calibration set instead of an EMA over batches
    "naive-initall": ("naive", {"recon.init_batch_size": "1024"}),
    "eda-dm-initall": ("eda-dm", {"recon.init_batch_size": "1024"}),
    # the official differences one at a time (README "Differences from the official code")
    "eda-dm-splitshortcut": ("eda-dm", {"quant.split_conv1": "false"}),
    "eda-dm-exactsearch": ("eda-dm", {"quant.act_search_elements": "0"}),
    # the paper's iteration count: about an hour a row on 2 CPU cores, so last in the order
    "eda-dm-iters5000": ("eda-dm", {"recon.iters": "5000"}),
    "eda-dm-official-iters5000": ("eda-dm-official", {"recon.iters": "5000"}),
    "q-diffusion-iters5000": ("q-diffusion", {"recon.iters": "5000"}),
}
LAST = [name for name in TUNING if name.endswith("iters5000")]


def _sets(overrides: dict[str, str]) -> str:
    return "".join(f"--set {key}={value} " for key, value in sorted(overrides.items()))


def configs() -> dict[str, dict]:
    out = {}
    for name, (calib, recon, overrides) in METHODS.items():
        if name in CALIB_ONLY_METHODS:
            bits = [(4, 8)]
        else:
            bits = PAPER_BITS + (STRESS_BITS if name in STRESS_METHODS else [])
        for w, a in bits:
            # uniform calibration draws nothing at random: its seeds would all be the same set
            seeds = CALIB_SEEDS if (w, a) == (4, 8) and not calib.startswith("uniform") else [0]
            for seed in seeds:
                out[f"{name}-w{w}a{a}-s{seed}"] = {
                    "method": name,
                    "calib": calib,
                    "select": CALIBRATIONS[calib]["select.method"],
                    "recon": recon,
                    "w": w,
                    "a": a,
                    "seed": seed,
                    "extra": _sets(overrides),
                }
    for name, (method, overrides) in TUNING.items():
        base = out[f"{method}-w4a8-s0"]
        _, _, base_overrides = METHODS[method]
        out[f"{name}-w4a8-s0"] = {**base, "method": name, "extra": _sets({**base_overrides, **overrides})}
    return out


def run_order() -> list[str]:
    """The sweep's evaluate targets, most informative first: stopping early still gives a table.

    FP seed 0 (every row pairs with it), the paper's W4A8 rows, the FP noise floor, W8A8, the
    stress bit-widths, then the extra calibration seeds of the W4A8 calibration comparison.
    """
    runs = configs()
    names = [n for n in runs if runs[n]["seed"] == 0 and runs[n]["method"] in METHODS]
    by_bits = {
        bits: [n for n in names if (runs[n]["w"], runs[n]["a"]) == bits] for bits in PAPER_BITS + STRESS_BITS
    }
    targets = ["evaluate_fp@s0"] + [f"evaluate@{n}" for n in by_bits[(4, 8)]]
    targets += [f"evaluate_fp@s{s}" for s in FP_SEEDS[1:]]
    for bits in [(8, 8)] + STRESS_BITS:
        targets += [f"evaluate@{n}" for n in by_bits[bits]]
    targets += [f"evaluate@{n}" for n in runs if runs[n]["seed"] != 0]
    targets += [f"evaluate@{n}-w4a8-s0" for n in TUNING if n not in LAST]
    targets += [f"evaluate@{n}-w4a8-s0" for n in LAST]
    return targets


ROOT = Path(__file__).resolve().parents[1]


def code_deps(script: str) -> list[str]:
    """The deps on code of the main pipeline's stage that runs ``script``, seen from sweep/.

    The main dvc.yaml lists the modules each stage script imports (tests/test_stage_deps.py
    keeps it right); the sweep runs the same scripts, so it takes the same list.
    """
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        if script in stage["cmd"].split():
            return [f"../{d}" for d in stage["deps"] if d.startswith(("stages/", "edadm/"))]
    raise KeyError(f"no stage of dvc.yaml runs {script}")


def _params(*sections: str) -> list[dict]:
    return [{"../params.yaml": list(sections)}]


def _stage(cmd: str, script: str, inputs: list[str], params: list[dict], **outs) -> dict:
    """A stage of the sweep's DVC project (root sweep/): the command runs from the repository
    root (DVC refuses a wdir outside the project), its outputs live under sweep/, and its
    timings go to sweep/timings/ (not outputs: only the rows' figures are)."""
    return {
        "cmd": f"cd .. && python {script} {cmd}",
        "deps": [*code_deps(script), *inputs],
        "params": params,
        **outs,
    }


def stages() -> dict:
    runs = configs()
    calibs = sorted({(c["calib"], c["seed"]) for c in runs.values()})
    return {
        "select": {
            "foreach": {f"{c}-s{s}": {"sets": _sets(CALIBRATIONS[c]), "seed": s} for c, s in calibs},
            "do": _stage(
                "${item.sets}--set select.seed=${item.seed} "
                "--trajectories artifacts/trajectories.zarr --out sweep/artifacts/calib-${key}.zarr "
                "--table sweep/plots/calib-${key}.csv",
                "stages/selection.py",
                ["../artifacts/trajectories.zarr"],
                _params("select"),
                outs=["artifacts/calib-${key}.zarr", "plots/calib-${key}.csv"],
            ),
        },
        "reconstruct": {
            "foreach": runs,
            "do": _stage(
                "${item.extra}--set quant.w_bits=${item.w} --set quant.a_bits=${item.a} "
                "--set recon.method=${item.recon} "
                "--calib sweep/artifacts/calib-${item.calib}-s${item.seed}.zarr "
                "--out sweep/artifacts/quant-${key} --work sweep/artifacts/.checkpoint-${key} "
                "--table sweep/plots/recon-${key}.csv --timings sweep/timings/reconstruct-${key}.json",
                "stages/reconstruct.py",
                ["../artifacts/model", "artifacts/calib-${item.calib}-s${item.seed}.zarr"],
                _params("device", "quant", "recon"),
                outs=["artifacts/quant-${key}", "plots/recon-${key}.csv"],
            ),
        },
        "sample_fp": {
            "foreach": {f"s{s}": s for s in FP_SEEDS},
            "do": _stage(
                "--which fp --set sample.seed=${item} --set sample.n=${sample_n} "
                "--out sweep/artifacts/samples-fp-${key}.zarr --timings sweep/timings/sample-fp-${key}.json",
                "stages/sample.py",
                ["../artifacts/model"],
                _params("device", "sampler", "condition", "sample.n", "sample.batch_size"),
                outs=["artifacts/samples-fp-${key}.zarr"],
            ),
        },
        "sample_quant": {
            "foreach": runs,
            "do": _stage(
                "--which quant --quant sweep/artifacts/quant-${key} --set sample.n=${sample_n} "
                "--out sweep/artifacts/samples-${key}.zarr --timings sweep/timings/sample-${key}.json",
                "stages/sample.py",
                ["../artifacts/model", "artifacts/quant-${key}"],
                _params("device", "sampler", "condition", "sample"),
                outs=["artifacts/samples-${key}.zarr"],
            ),
        },
        "evaluate": {
            "foreach": runs,
            "do": _stage(
                "--set quant.w_bits=${item.w} --set quant.a_bits=${item.a} "
                "--set recon.method=${item.recon} --set select.method=${item.select} "
                "--fp sweep/artifacts/samples-fp-s0.zarr --quant sweep/artifacts/samples-${key}.zarr "
                "--out sweep/metrics/${key}.json --grid sweep/plots/samples-${key}.png",
                "stages/evaluate.py",
                ["../artifacts/reference", "artifacts/samples-fp-s0.zarr", "artifacts/samples-${key}.zarr"],
                _params("device", "evaluate", "reference.clip_path"),
                outs=["plots/samples-${key}.png"],
                metrics=["metrics/${key}.json"],
            ),
        },
        "evaluate_fp": {
            "foreach": [f"s{s}" for s in FP_SEEDS],
            "do": _stage(
                "--fp sweep/artifacts/samples-fp-${item}.zarr --quant none "
                "--out sweep/metrics/fp-${item}.json",
                "stages/evaluate.py",
                ["../artifacts/reference", "artifacts/samples-fp-${item}.zarr"],
                _params("device", "evaluate", "reference.clip_path"),
                metrics=["metrics/fp-${item}.json"],
            ),
        },
    }


def main() -> None:
    header = (
        "# Generated by sweep/gen_dvc.py: edit that file, not this one.\n"
        "# ${sample_n} comes from sweep/params.yaml, which DVC loads for this project.\n"
    )
    (Path(__file__).parent / "dvc.yaml").write_text(
        header + yaml.safe_dump({"stages": stages()}, sort_keys=False)
    )


if __name__ == "__main__":
    main()
