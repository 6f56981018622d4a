"""Writes sweep/dvc.yaml: the paper's comparison as DVC `foreach` stages.

sweep/ is a DVC project of its own (`dvc init --subdir`), so the main pipeline's `dvc status`,
`dvc exp run`, `dvc metrics show` and `dvc exp show` never see its ~230 stages, and a plain
`dvc repro` never runs them. Its stages run the main pipeline's stage scripts with overrides,
depend on the main pipeline's model, reference and trajectory dump (`../artifacts/...`), read
the main `params.yaml`, and keep their outputs, cache and `dvc.lock` under sweep/.

A second testbed, the embedded digits UNet's class-conditional variant, has its own stages
(`class_*`): it builds that model in the sweep (sweep/artifacts/model-class), dumps and calibrates
it at each guidance scale, and keeps its outputs under sweep/{artifacts,plots,metrics}/class/.

Run `python sweep/gen_dvc.py` after editing the rows below or the main dvc.yaml's deps, then
`python sweep/run.py [--testbed class]` (or `cd sweep && dvc repro`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

# Calibration sets: name -> the select stage's overrides (docs/method.md §2).
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
# Every knob of the quantizer and of FBR at its official value (docs/paper.md "Differences from the
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
# ... and at the other bit-widths for the TDAC-calibrated rows, which came within 1 dB of a
# neighbour on seed 0 (groups4 at W4A4 is 1.4 dB ahead: its lead needs the seeds to count)
SEEDED_BITS = [(8, 8), (4, 6), (4, 4)]
SEEDED_METHODS = ["eda-dm", "tdac-only", "eda-dm-official", "eda-dm-groups4", "ptq4dm"]
FP_SEEDS = [0, 1, 2]  # the FP row's Frechet-distance noise floor
# Tuning at W4A8 (seed 0): name -> (base method, reconstruct stage overrides), one knob changed
# from params.yaml each. Why each was tried: docs/paper.md. (The first round's
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
    # the official differences one at a time (docs/paper.md)
    "eda-dm-splitshortcut": ("eda-dm", {"quant.split_conv1": "false"}),
    "eda-dm-exactsearch": ("eda-dm", {"quant.act_search_elements": "0"}),
    # the paper's iteration count: about an hour a row on 2 CPU cores, so last in the order
    "eda-dm-iters5000": ("eda-dm", {"recon.iters": "5000"}),
    "eda-dm-official-iters5000": ("eda-dm-official", {"recon.iters": "5000"}),
    "q-diffusion-iters5000": ("q-diffusion", {"recon.iters": "5000"}),
}
LAST = [name for name in TUNING if name.endswith("iters5000")]
# The class-conditional testbed: the paper's three rows at its two bit-widths, at the paper's
# guidance scale (3.0, as for LDM-4 ImageNet) and without guidance (1), calibration seed 0.
CLASS_GUIDANCE = [3, 1]  # run order: the paper's setting first
CLASS_METHODS = ["naive", "q-diffusion", "eda-dm"]
CLASS_SEEDS = [0, 1, 2]  # eda-dm W4A8 only (class_configs says why)
MODEL = "../artifacts/model"  # the main pipeline's model (seen from sweep/)
CLASS_MODEL = "artifacts/model-class"  # the class model, built by the class_model stage (seen from sweep/)


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
            seeded = (w, a) == (4, 8) or (name in SEEDED_METHODS and (w, a) in SEEDED_BITS)
            seeds = CALIB_SEEDS if seeded and not calib.startswith("uniform") else [0]
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
    stress bit-widths, then the extra calibration seeds (W4A8 first: the calibration comparison).
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
    seeded = [n for n in runs if runs[n]["seed"] != 0]
    targets += [f"evaluate@{n}" for n in sorted(seeded, key=lambda n: (runs[n]["w"], runs[n]["a"]) != (4, 8))]
    targets += [f"evaluate@{n}-w4a8-s0" for n in TUNING if n not in LAST]
    targets += [f"evaluate@{n}-w4a8-s0" for n in LAST]
    return targets


def class_configs() -> dict[str, dict]:
    """The class testbed's rows: ``configs()``'s rows of CLASS_METHODS at PAPER_BITS, at each
    guidance scale G (``g``: its name, ``guidance``: its value), keyed ``{row}-g{G}-s{seed}``.

    Calibration seed 0 everywhere, plus CLASS_SEEDS for eda-dm at W4A8, which came within 1 dB of
    q-diffusion at both scales on seed 0 (q-diffusion's uniform set draws nothing at random).
    """
    runs = configs()
    out = {}
    for g in CLASS_GUIDANCE:
        for name in CLASS_METHODS:
            for w, a in PAPER_BITS:
                seeds = CLASS_SEEDS if (name, w, a) == ("eda-dm", 4, 8) else [0]
                for seed in seeds:
                    row = runs[f"{name}-w{w}a{a}-s{seed}"]
                    out[f"{name}-w{w}a{a}-g{g}-s{seed}"] = {**row, "g": f"g{g}", "guidance": g}
    return out


def class_run_order() -> list[str]:
    """The class testbed's evaluate targets, most informative first: at each guidance scale (the
    paper's first), the FP row, then W4A8, where the methods separate, then W8A8; the extra
    calibration seeds last."""
    runs = class_configs()
    targets = []
    for g in CLASS_GUIDANCE:
        targets.append(f"class_evaluate_fp@g{g}-s0")
        for bits in [(4, 8), (8, 8)]:
            targets += [
                f"class_evaluate@{n}"
                for n, r in runs.items()
                if r["guidance"] == g and (r["w"], r["a"]) == bits and r["seed"] == 0
            ]
    targets += [f"class_evaluate@{n}" for n, r in runs.items() if r["seed"] != 0]
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


@dataclass(frozen=True)
class Testbed:
    """What sets a testbed's stages apart; paths are seen from sweep/ and may use ``${item.*}``."""

    prefix: str  # of its stage names
    sub: str  # its subfolder of artifacts/, plots/ and metrics/ ("" or "class/")
    model: str
    trajectories: str  # the dump its calibration sets are selected from
    scale: str  # how an item's calibration sets and FP samples name its guidance scale ("" or "${item.g}-")
    fp_sets: str  # sample_fp's overrides (${item}: its foreach value)
    quant_sets: str  # sample_quant's overrides
    runs: dict  # its rows, the foreach of reconstruct, sample_quant and evaluate
    calibs: dict  # select's foreach
    fp: dict  # sample_fp's foreach; evaluate_fp's is its keys

    @property
    def model_flag(self) -> str:
        # the main pipeline's model is the stage scripts' default
        return "" if self.model == MODEL else f"--model {_from_root(self.model)} "


def _from_root(path: str) -> str:
    """A path seen from sweep/, seen from the repository root (where the commands run)."""
    return path[3:] if path.startswith("../") else f"sweep/{path}"


def _testbed_stages(tb: Testbed) -> dict:
    """The stages both testbeds have: select, reconstruct, sample_fp, sample_quant, evaluate, evaluate_fp."""
    art, plots, metrics = f"artifacts/{tb.sub}", f"plots/{tb.sub}", f"metrics/{tb.sub}"
    timings = f"timings/{tb.prefix.replace('_', '-')}"  # flat: class-* for the class testbed
    calib = f"{art}calib-${{item.calib}}-{tb.scale}s${{item.seed}}.zarr"
    fp = f"{art}samples-fp-{tb.scale}s0.zarr"
    return {
        f"{tb.prefix}select": {
            "foreach": tb.calibs,
            "do": _stage(
                "${item.sets}--set select.seed=${item.seed} "
                f"--trajectories {_from_root(tb.trajectories)} --out sweep/{art}calib-${{key}}.zarr "
                f"--table sweep/{plots}calib-${{key}}.csv",
                "stages/selection.py",
                [tb.trajectories],
                _params("select"),
                outs=[f"{art}calib-${{key}}.zarr", f"{plots}calib-${{key}}.csv"],
            ),
        },
        f"{tb.prefix}reconstruct": {
            "foreach": tb.runs,
            "do": _stage(
                "${item.extra}--set quant.w_bits=${item.w} --set quant.a_bits=${item.a} "
                f"--set recon.method=${{item.recon}} {tb.model_flag}--calib sweep/{calib} "
                f"--out sweep/{art}quant-${{key}} --work sweep/{art}.checkpoint-${{key}} "
                f"--table sweep/{plots}recon-${{key}}.csv --timings sweep/{timings}reconstruct-${{key}}.json",
                "stages/reconstruct.py",
                [tb.model, calib],
                _params("device", "quant", "recon"),
                outs=[f"{art}quant-${{key}}", f"{plots}recon-${{key}}.csv"],
            ),
        },
        f"{tb.prefix}sample_fp": {
            "foreach": tb.fp,
            "do": _stage(
                f"{tb.model_flag}{tb.fp_sets}--set sample.n=${{sample_n}} "
                f"--out sweep/{art}samples-fp-${{key}}.zarr --timings sweep/{timings}sample-fp-${{key}}.json",
                "stages/sample_fp.py",
                [tb.model],
                _params("device", "sampler", "condition", "sample.n", "sample.batch_size"),
                outs=[f"{art}samples-fp-${{key}}.zarr"],
            ),
        },
        f"{tb.prefix}sample_quant": {
            "foreach": tb.runs,
            "do": _stage(
                f"{tb.model_flag}--quant sweep/{art}quant-${{key}} {tb.quant_sets}"
                f"--set sample.n=${{sample_n}} --out sweep/{art}samples-${{key}}.zarr "
                f"--timings sweep/{timings}sample-${{key}}.json",
                "stages/sample_quant.py",
                [tb.model, f"{art}quant-${{key}}"],
                _params("device", "sampler", "condition", "sample"),
                outs=[f"{art}samples-${{key}}.zarr"],
            ),
        },
        f"{tb.prefix}evaluate": {
            "foreach": tb.runs,
            "do": _stage(
                "--set quant.w_bits=${item.w} --set quant.a_bits=${item.a} "
                "--set recon.method=${item.recon} --set select.method=${item.select} "
                f"--fp sweep/{fp} --quant sweep/{art}samples-${{key}}.zarr "
                f"--out sweep/{metrics}${{key}}.json --grid sweep/{plots}samples-${{key}}.png",
                "stages/evaluate.py",
                ["../artifacts/reference", fp, f"{art}samples-${{key}}.zarr"],
                _params("device", "evaluate", "reference.clip_path"),
                outs=[f"{plots}samples-${{key}}.png"],
                metrics=[f"{metrics}${{key}}.json"],
            ),
        },
        f"{tb.prefix}evaluate_fp": {
            "foreach": list(tb.fp),
            "do": _stage(
                f"--fp sweep/{art}samples-fp-${{item}}.zarr --quant none "
                f"--out sweep/{metrics}fp-${{item}}.json",
                "stages/evaluate.py",
                ["../artifacts/reference", f"{art}samples-fp-${{item}}.zarr"],
                _params("device", "evaluate", "reference.clip_path"),
                metrics=[f"{metrics}fp-${{item}}.json"],
            ),
        },
    }


def stages() -> dict:
    runs = configs()
    calibs = sorted({(c["calib"], c["seed"]) for c in runs.values()})
    return _testbed_stages(
        Testbed(
            prefix="",
            sub="",
            model=MODEL,
            trajectories="../artifacts/trajectories.zarr",
            scale="",
            fp_sets="--set sample.seed=${item} ",
            quant_sets="",
            runs=runs,
            calibs={f"{c}-s{s}": {"sets": _sets(CALIBRATIONS[c]), "seed": s} for c, s in calibs},
            fp={f"s{s}": s for s in FP_SEEDS},
        )
    )


def class_stages() -> dict:
    """The class testbed's stages: the same stage scripts as :func:`stages`, on the class model
    built here (``--model``), each guidance scale with its own dump, calibration sets, FP samples
    and rows (``--set condition.guidance_scale``); outputs in the class/ folders of artifacts/, plots/
    and metrics/ (the model's in artifacts/model-class)."""
    runs = class_configs()
    guidance = {f"g{g}": g for g in CLASS_GUIDANCE}
    calibs = sorted({(c["calib"], c["g"], c["seed"]) for c in runs.values()})
    model = _from_root(CLASS_MODEL)
    return {
        "class_model": _stage(
            f"--set model.embedded.conditioning=class --out {model} "
            "--log sweep/artifacts/model-class-train.json --grid sweep/plots/model-class-samples.png "
            "--timings sweep/timings/model-class.json",
            "stages/model.py",
            [],
            _params("device", "model"),
            outs=[CLASS_MODEL, "artifacts/model-class-train.json", "plots/model-class-samples.png"],
        ),
        # the dump at the main pipeline's size and sampler: only the model and the guidance differ
        "class_dump": {
            "foreach": guidance,
            "do": _stage(
                f"--set condition.guidance_scale=${{item}} --model {model} "
                "--out sweep/artifacts/class/trajectories-${key}.zarr "
                "--timings sweep/timings/class-dump-${key}.json",
                "stages/dump.py",
                [CLASS_MODEL],
                _params("device", "sampler", "condition", "dump", "select.tdac.feature_layer"),
                outs=["artifacts/class/trajectories-${key}.zarr"],
            ),
        },
        **_testbed_stages(
            Testbed(
                prefix="class_",
                sub="class/",
                model=CLASS_MODEL,
                trajectories="artifacts/class/trajectories-${item.g}.zarr",
                scale="${item.g}-",
                fp_sets="--set condition.guidance_scale=${item} --set sample.seed=0 ",
                # the FP samples' seed too (0), so that the paired figures compare image k with image k;
                # integer sampling: the fake-quant codes (docs/integer.md), ~1.7x faster on CPU
                quant_sets="--set condition.guidance_scale=${item.guidance} --set sample.seed=0 "
                "--set sample.mode=int ",
                runs=runs,
                calibs={
                    f"{c}-{g}-s{s}": {"sets": _sets(CALIBRATIONS[c]), "g": g, "seed": s} for c, g, s in calibs
                },
                fp={f"{g}-s0": scale for g, scale in guidance.items()},
            )
        ),
    }


def all_stages() -> dict:
    """Every stage of sweep/dvc.yaml: the unconditional testbed's, then the class testbed's."""
    return {**stages(), **class_stages()}


def main() -> None:
    header = (
        "# Generated by sweep/gen_dvc.py: edit that file, not this one.\n"
        "# ${sample_n} comes from sweep/params.yaml, which DVC loads for this project.\n"
    )
    (Path(__file__).parent / "dvc.yaml").write_text(
        header + yaml.safe_dump({"stages": all_stages()}, sort_keys=False)
    )


if __name__ == "__main__":
    main()
