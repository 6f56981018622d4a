"""Benchmark of integer inference: FP32 vs fake quantization vs int8 kernels, and export sizes.

    python bench/int_speed.py [--quick] [--json PATH] [--threads N] [--trained artifacts/model]

Two UNet2DModels with random weights (speed does not depend on training): the embedded
default (1 x 16 x 16, widths 32/64/64) and the architecture of the DDPM CIFAR-10 model
(google/ddpm-cifar10-32: 3 x 32 x 32, widths 128/256/256/256, attention at 16 x 16, 35.7M
parameters). Each is quantized at W8A8 (activation ranges calibrated on random inputs), then
timed as FP32, fake-quant and integer (``edadm.deploy.integer``, backend ``auto`` = oneDNN on
CPU; ``int_mm`` timed too, as the measurement that decided between them) at batch 1 and 64:
best of a few forward passes, and a DDIM sampling run at batch 64 (embedded: 100 steps; the
CIFAR model: 10 steps). FP32 and integer also run compiled (``edadm.deploy.compiled``,
torch.compile / inductor, static shapes): forward at batch 64 and sampling, their compile
time reported apart (``compile_seconds``: first call less a steady one; lower when inductor's
FX graph cache is warm). FP32 is compiled twice: plain (``fp32_compiled``) and with inductor's
freezing (``fp32_frozen``, prepacked oneDNN weights); the best FP32 path is the fastest of the
three. Sampling runs interleave the variants, so a shared machine's load hits FP32 and integer
alike; --quick: one forward repeat, no fake-quant sampling.

JSON (printed, and written to PATH): ``cpu``, ``threads``, per model the timings in seconds,
``sampling_speedup_int_vs_fp32`` / ``embedded_sampling_speedup_int_vs_fp32`` (best integer path
against best FP32 path, eager, compiled or frozen, DDIM sampling at batch 64; per model
``sampling_speedup`` has the eager and compiled ratios beside it), ``speedup_int_vs_fp32``
(the CIFAR-sized model, W8A8, batch 64 forward, eager, same run),
``speedup_int_compiled_vs_fp32_compiled`` (the same, compiled), ``speedup_int_vs_fake``,
``int_vs_fake_rel_error`` (mean |int - fake| / mean |fake| of the
predicted noise at W8A8 on the pipeline's trained model when artifacts/model exists, else on
the CIFAR-sized one; per model ``accuracy`` adds the float64 floor, see ``accuracy``, and
``accuracy_compiled`` the same for the compiled integer model),
``w8_size_ratio`` and ``w4_size_ratio`` (exported safetensors bytes / FP32 safetensors bytes of
the CIFAR-sized model). W4 weights run on the same int8 kernels (unpacked at load).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edadm.artifacts import write_json  # noqa: E402
from edadm.deploy.compiled import compile_integer  # noqa: E402
from edadm.deploy.export import export_quantized  # noqa: E402
from edadm.deploy.integer import to_integer  # noqa: E402
from edadm.diffusion.embedded import build_embedded_unet  # noqa: E402
from edadm.diffusion.loading import load_unet  # noqa: E402
from edadm.diffusion.sampling import SamplerConfig, sample  # noqa: E402
from edadm.quant.config import QuantConfig
from edadm.quant.model import calibrate_activations, quantize_model  # noqa: E402
from edadm.runtime import cpu_name  # noqa: E402


def cifar_unet() -> UNet2DModel:
    """The DDPM CIFAR-10 UNet's architecture (config of google/ddpm-cifar10-32), random weights."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        attention_head_dim=None,
    ).eval()


def inputs(unet: UNet2DModel, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    return x, torch.randint(0, 1000, (batch,), generator=g)


def quantized(unet: UNet2DModel, w_bits: int, a_bits: int) -> torch.nn.Module:
    """Fake-quant model with weight ranges searched and activation ranges from 2 random batches."""
    model = quantize_model(unet, QuantConfig(w_bits=w_bits, a_bits=a_bits))
    batches = [dict(zip(("sample", "timestep"), inputs(unet, 8, seed), strict=True)) for seed in (1, 2)]
    calibrate_activations(model, batches)
    return model.eval()


@torch.no_grad()
def best_seconds(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, repeats: int) -> float:
    model(x, t)  # warm-up: oneDNN primitive creation, allocator (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x, t)
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def compile_seconds(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """Seconds of the first call of a compiled model (tracing, code generation, C++ build), less
    one steady call: what compiling costs once per run (less with inductor's warm FX cache)."""
    start = time.perf_counter()
    model(x, t)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model(x, t)
    return first - (time.perf_counter() - start)


@torch.no_grad()
def sampling_seconds(model: torch.nn.Module, unet: UNet2DModel, batch: int, steps: int) -> float:
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    noise, _ = inputs(unet, batch, seed=3)
    start = time.perf_counter()
    sample(model, scheduler, noise, SamplerConfig(steps=steps), torch.Generator().manual_seed(0))
    return time.perf_counter() - start


def bench_model(name: str, unet: UNet2DModel, sampling: tuple[int, int], repeats: int, quick: bool) -> dict:
    """Forward and sampling seconds of FP32 and integer W8A8, eager and compiled, and fake W8A8.

    Compiled variants (``edadm.deploy.compiled``, static shapes) are timed at the sampling batch
    only, after their compilation, which is reported apart. Sampling runs are interleaved (FP32,
    integer, FP32, ...) so that load on a shared machine hits both alike.
    """
    batch, steps = sampling
    fake = quantized(unet, 8, 8)
    variants = {"fp32": unet, "fake": fake}
    for backend in ("onednn", "int_mm"):
        variants[f"int_{backend}"] = copy.deepcopy(fake)
        to_integer(variants[f"int_{backend}"], backend)
    compiled = {
        "fp32_compiled": compile_integer(unet),
        # inductor's freezing (weights as constants, oneDNN convolutions prepacked): the CPU
        # inference setting a user may pick for FP32, so part of the best FP32 path
        "fp32_frozen": compile_integer(copy.deepcopy(unet), {"freezing": True}),
        "int_compiled": compile_integer(variants["int_onednn"]),
    }
    out = {"parameters": sum(p.numel() for p in unet.parameters()), "forward": {}}
    x, t = inputs(unet, batch, seed=4)
    out["compile_seconds"] = {v: compile_seconds(m, x, t) for v, m in compiled.items()}
    print(f"{name} compile: {out['compile_seconds']}", file=sys.stderr)
    variants.update(compiled)
    for size in (1, batch):
        x, t = inputs(unet, size, seed=4)
        out["forward"][f"batch{size}"] = {
            v: best_seconds(m, x, t, repeats)
            for v, m in variants.items()
            if (v != "int_int_mm" or size == 1) and (v not in compiled or size == batch)
        }
        print(f"{name} batch {size}: {out['forward'][f'batch{size}']}", file=sys.stderr)
    out["accuracy"] = accuracy(fake, variants["int_onednn"], unet)
    out["accuracy_compiled"] = accuracy(fake, variants["int_compiled"], unet, batch)
    timed = ["fp32", "int_onednn", "fp32_compiled", "fp32_frozen", "int_compiled"] + (
        [] if quick else ["fake"]
    )
    out["sampling"] = {
        "batch": batch,
        "steps": steps,
        **{v: sampling_seconds(variants[v], unet, batch, steps) for v in timed},
    }
    print(f"{name} sampling: {out['sampling']}", file=sys.stderr)
    timings = out["sampling"]
    out["sampling_speedup"] = {
        "eager_int_vs_fp32": timings["fp32"] / timings["int_onednn"],
        "compiled_int_vs_fp32": timings["fp32_compiled"] / timings["int_compiled"],
        "int_compiled_vs_fp32_eager": timings["fp32"] / timings["int_compiled"],
        "frozen_int_vs_fp32": timings["fp32_frozen"] / timings["int_compiled"],
        "best_int_vs_best_fp32": min(timings["fp32"], timings["fp32_compiled"], timings["fp32_frozen"])
        / min(timings["int_onednn"], timings["int_compiled"]),
    }
    return out


@torch.no_grad()
def accuracy(fake: torch.nn.Module, integer: torch.nn.Module, unet: UNet2DModel, batch: int = 8) -> dict:
    """Mean relative errors of the predicted noise (8 random inputs): integer vs fake, and the floor.

    The floor is fake quantization against itself in float64: float32 rounding flips a few
    activation codes, and a network can amplify them layer by layer (random weights do, a
    trained network much less). An integer path as exact as fake quantization has
    ``int_vs_fake64`` no larger than ``fake_vs_fake64``.
    """
    x, t = inputs(unet, batch, seed=5)  # a compiled model: its compiled batch

    def rel(y: torch.Tensor, reference: torch.Tensor) -> float:
        return float((y - reference).abs().mean() / reference.abs().mean())

    fake32 = fake(x, t).sample
    fake64 = copy.deepcopy(fake).double()(x.double(), t).sample.float()
    int_out = integer(x, t).sample
    return {
        "int_vs_fake": rel(int_out, fake32),
        "int_vs_fake64": rel(int_out, fake64),
        "fake_vs_fake64": rel(fake32, fake64),
        "fake_vs_fp32": rel(fake32, unet(x, t).sample),
    }


def trained_accuracy(model_dir: Path) -> dict | None:
    """``accuracy`` at W8A8 on the trained model of the pipeline, when ``dvc repro model`` has run."""
    if not (model_dir / "unet").exists():
        return None
    unet = load_unet(model_dir, param="--trained")
    fake = quantized(unet, 8, 8)
    integer = copy.deepcopy(fake)
    to_integer(integer)
    return accuracy(fake, integer, unet)


def size_ratios(unet: UNet2DModel) -> dict:
    """Exported W8A8 / W4A8 safetensors bytes against the FP32 safetensors of the same UNet."""
    with tempfile.TemporaryDirectory() as tmp:
        fp_path = Path(tmp) / "fp32.safetensors"
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(fp_path))
        sizes = {"fp32_bytes": fp_path.stat().st_size}
        for w_bits in (8, 4):
            path = Path(tmp) / f"w{w_bits}.safetensors"
            # the file's size does not depend on the codes: skip the range searches
            export_quantized(quantize_model(unet, QuantConfig(w_bits=w_bits), init_weights=False), path)
            sizes[f"w{w_bits}_bytes"] = path.stat().st_size
    sizes["w8_size_ratio"] = sizes["w8_bytes"] / sizes["fp32_bytes"]
    sizes["w4_size_ratio"] = sizes["w4_bytes"] / sizes["fp32_bytes"]
    return sizes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, no fake-quant sampling")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--trained", type=Path, default=Path("artifacts/model"), help="trained model for the accuracy check"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else 3
    embedded, cifar = build_embedded_unet().eval(), cifar_unet()
    output = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": args.quick,
        "embedded": bench_model("embedded", embedded, (64, 100), repeats, args.quick),
        "cifar": bench_model("cifar", cifar, (64, 10), repeats, args.quick),
    }
    cifar64 = output["cifar"]["forward"]["batch64"]
    output["speedup_int_vs_fp32"] = cifar64["fp32"] / cifar64["int_onednn"]
    output["speedup_int_vs_fake"] = cifar64["fake"] / cifar64["int_onednn"]
    output["speedup_int_compiled_vs_fp32_compiled"] = cifar64["fp32_compiled"] / cifar64["int_compiled"]
    # the targets: best integer path against best FP32 path, DDIM sampling at batch 64
    output["sampling_speedup_int_vs_fp32"] = output["cifar"]["sampling_speedup"]["best_int_vs_best_fp32"]
    output["embedded_sampling_speedup_int_vs_fp32"] = output["embedded"]["sampling_speedup"][
        "best_int_vs_best_fp32"
    ]
    output["trained_embedded_w8a8"] = trained_accuracy(args.trained)
    # the accuracy figure: on the trained model where there is one (random weights
    # amplify float-rounding code flips; see `accuracy`)
    source = output["trained_embedded_w8a8"] or output["cifar"]["accuracy"]
    output["int_vs_fake_rel_error"] = source["int_vs_fake"]
    output.update(size_ratios(cifar))
    print(json.dumps(output, indent=2))
    if args.json:
        write_json(args.json, output)
    return output


if __name__ == "__main__":
    main()
