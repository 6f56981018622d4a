"""FP sample quality of a class-conditional model against the classifier-free guidance scale.

    python bench/guidance_scan.py [--model DIR] [--scales 1,1.25,1.5,2,3] [--n 512]
        [--set KEY=VALUE ...] [--json PATH]

For each scale, the pipeline's own code samples ``--n`` images (``generate_samples``, the
conditions drawn as the sample stage draws them, ``sample.seed``, params ``sampler``) and scores
them against the reference (``evaluate_samples``: FD, precision / recall and class consistency,
the reference classifier's accuracy against the requested labels). ``--model``: a model
directory (``artifacts/model``, a training-curve snapshot); default: the shipped
class-conditional embedded model (``model.embedded.conditioning=class``). Needs
``artifacts/reference`` (`dvc repro reference`). Prints and writes JSON.

Why: the guidance the paper uses for class-conditional models (3.0, LDM-4 ImageNet) is a
property of that model; a small pixel model may want another, and a comparison of quantized
models at a scale where FP itself fails measures little.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from edadm.artifacts import write_json
from edadm.config import load_params, load_section
from edadm.diffusion.conditioning import ConditionConfig, Conditioning
from edadm.diffusion.loading import ModelConfig, load_diffusion_model
from edadm.diffusion.samples import SampleConfig, generate_samples, load_samples
from edadm.diffusion.sampling import SamplerConfig
from edadm.metrics.conditions import sample_conditions
from edadm.metrics.evaluation import EvaluateConfig, evaluate_samples
from edadm.runtime import cpu_name, load_device

ROOT = Path(__file__).resolve().parents[1]


def model_stage() -> ModuleType:
    """stages/model.py as a module (the stage scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("model_stage", ROOT / "stages" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a class-conditional model directory")
    parser.add_argument("--scales", default="1,1.25,1.5,2,3")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    reference = ROOT / "artifacts" / "reference"
    if not reference.exists():
        raise SystemExit("artifacts/reference is missing: run `dvc repro reference` first")
    overrides = ["model.embedded.conditioning=class", f"sample.n={args.n}", *args.overrides]
    params = load_params(ROOT / "params.yaml", overrides)
    device = load_device(params)
    if args.model:
        model = load_diffusion_model(args.model)
    else:  # what the model stage builds from params (the shipped class weights)
        model, _ = model_stage().build_model(load_section(ModelConfig, "model", params), device)
    if model.kind.condition != "class":
        raise SystemExit(
            f"{args.model or 'the model'} is not class-conditional (kind {model.kind.condition})"
        )
    sample_config = load_section(SampleConfig, "sample", params)
    sampler_config = load_section(SamplerConfig, "sampler", params)
    evaluate_config = load_section(EvaluateConfig, "evaluate", params)
    condition_config = load_section(ConditionConfig, "condition", params)

    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for scale in [float(s) for s in args.scales.split(",")]:
            conditioning = Conditioning(
                model, ConditionConfig(**{**vars(condition_config), "guidance_scale": scale})
            )
            store = Path(tmp) / f"samples-{scale:g}.zarr"
            generate_samples(
                model.unet, model.scheduler, sampler_config, sample_config, store, device,
                desc=f"guidance {scale:g}", conditioning=conditioning,
            )  # fmt: skip
            images, _ = load_samples(store)
            metrics = evaluate_samples(
                images, reference, conditions=sample_conditions(store), config=evaluate_config, device=device
            )
            keys = ("fd", "is_mean", "precision", "recall", "class_consistency", "n")
            rows.append({"guidance_scale": scale, **{k: metrics[k] for k in keys}})
            print(json.dumps(rows[-1]), flush=True)
    report = {
        "model": str(args.model or "shipped class-conditional embedded weights"),
        "overrides": overrides,
        "sampler": vars(sampler_config),
        "seconds": round(time.perf_counter() - started, 1),
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
