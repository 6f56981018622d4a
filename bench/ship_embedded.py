"""Ship a trained embedded model as the package's weights (``model.source: embedded``).

    python bench/ship_embedded.py MODEL_DIR [--recipe-set model.embedded.KEY=VALUE ...]
        [--train-log PATH] [--note TEXT] [--params params.yaml] [--out edadm/diffusion/weights]

MODEL_DIR is a diffusers model directory as ``save_model`` writes it (the ``model`` stage's
``artifacts/model``, or a ``bench/training_curve.py --keep`` snapshot). The recipe recorded with
the weights is params.yaml's ``model.embedded`` with the ``--recipe-set`` overrides: it must be
the recipe MODEL_DIR was trained with (the script cannot tell; it only refuses a UNet or noise
schedule of another shape). ``--train-log``: that run's training log (``artifacts/train.json``,
or a longer constant-rate run's, whose entries after ``train_steps`` are dropped).

Writes ``embedded_digits.safetensors`` (the UNet state dict in float16, deterministic bytes)
and ``embedded_digits.json`` (sha256, recipe, train log, dtype, note) into ``--out``, then loads
them back with ``load_embedded_weights``. Rerunning with the same inputs gives the same bytes.
The class-conditional variant (``--recipe-set model.embedded.conditioning=class``) is written
as ``embedded_digits_class.*`` beside them.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from edadm.artifacts import atomic_output, file_sha256, read_json, write_json
from edadm.config import as_dict, load_params, load_section
from edadm.diffusion.embedded import (
    NULL_LABEL,
    EmbeddedConfig,
    build_embedded_scheduler,
    build_embedded_unet,
    load_embedded_weights,
    shipped_weights_paths,
)
from edadm.diffusion.loading import load_scheduler, load_unet
from edadm.errors import ArtifactError, ParamError, user_errors
from edadm.quant.state import save_safetensors
from edadm.runtime import configure_logging

logger = logging.getLogger("bench.ship_embedded")

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "model.embedded."


def _public(config: Any) -> dict[str, Any]:
    """A diffusers config without its bookkeeping keys (``_class_name``, versions), as JSON has it.

    The JSON round trip makes a built model's tuples the lists a loaded one has.
    """
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def _differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    return [
        f"{key}: recipe {ours.get(key)!r}, model {theirs.get(key)!r}"
        for key in sorted(set(ours) | set(theirs))
        if ours.get(key) != theirs.get(key)
    ]


def fp16_state_dict(model_dir: Path, recipe: EmbeddedConfig) -> dict[str, torch.Tensor]:
    """MODEL_DIR's UNet weights in float16, refused unless they are ``build_embedded_unet(recipe)``'s."""
    unet = load_unet(model_dir, param="MODEL_DIR")
    expected = build_embedded_unet(recipe)
    # sample_size changes no weight shape: compare the configs, not only the state dict
    mismatch = _differences(_public(expected.config), _public(unet.config))
    mismatch += _differences(
        _public(build_embedded_scheduler(recipe).config), _public(load_scheduler(model_dir).config)
    )
    if mismatch:
        raise ArtifactError(f"{model_dir} is not the embedded UNet of the recipe: {'; '.join(mismatch)}")
    try:
        expected.load_state_dict(unet.state_dict(), strict=True)
    except RuntimeError as err:
        raise ArtifactError(f"{model_dir}: its weights do not fit the recipe's UNet: {err}") from err
    tensors = {
        name: t.detach().to(torch.float16).contiguous() for name, t in sorted(unet.state_dict().items())
    }
    bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise ArtifactError(f"{model_dir}: {bad} overflow float16")
    # How much float16 costs: the model output at a few inputs, float32 weights against rounded ones.
    rounded = build_embedded_unet(recipe).eval()
    rounded.load_state_dict({k: v.float() for k, v in tensors.items()})
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((4, 1, recipe.image_size, recipe.image_size), generator=generator)
    t = torch.tensor([10, 250, 500, 990])
    # the class model is probed with three digits and the null label, guidance's two passes
    y = torch.tensor([0, 3, 7, NULL_LABEL]) if recipe.conditioning == "class" else None
    with torch.no_grad():
        error = (unet.eval()(x, t, class_labels=y).sample - rounded(x, t, class_labels=y).sample).abs().max()
    error = error.item()
    logger.info("float16 weights change the noise prediction by at most %.2e", error)
    return tensors


def read_train_log(path: Path, steps: int) -> dict[str, Any]:
    """The run's loss log, cut at ``steps`` (a snapshot of a longer run)."""
    log = read_json(path, "model")
    if not all(key in log for key in ("loss", "loss_steps")):
        raise ArtifactError(f"{path} is no training log: it has no loss / loss_steps")
    kept = [(s, loss) for s, loss in zip(log["loss_steps"], log["loss"], strict=True) if s <= steps]
    if not kept or log.get("steps", steps) < steps:
        raise ArtifactError(f"{path} logs {log.get('steps')} steps, the recipe has train_steps={steps}")
    return {"loss": [loss for _, loss in kept], "loss_steps": [s for s, _ in kept], "steps": steps}


def ship(
    model_dir: Path,
    recipe: EmbeddedConfig,
    out: Path,
    train_log: dict[str, Any] | None = None,
    note: str | None = None,
) -> tuple[Path, Path]:
    """Write the float16 weights and their description into ``out``; return both paths."""
    tensors = fp16_state_dict(model_dir, recipe)
    weights, description = shipped_weights_paths(out, recipe.conditioning)
    with atomic_output(weights) as tmp:
        save_safetensors(tensors, tmp, {"format": "pt"})
    sha = file_sha256(weights)
    if train_log is None:
        logger.warning("no --train-log: the shipped train_log has no loss curve")
        train_log = {"loss": [], "loss_steps": [], "steps": recipe.train_steps}
    kind = "class-conditional " if recipe.conditioning == "class" else ""
    note = note or (
        f"EMA weights of {model_dir.name} ({recipe.train_steps} steps of train_embedded with the "
        f"{kind}recipe), cast to float16 by bench/ship_embedded.py"
    )
    meta = {
        "sha256": sha,
        "recipe": as_dict(recipe),
        "train_log": train_log,
        "dtype": "float16",
        "note": note,
    }
    write_json(description, meta)
    load_embedded_weights(recipe, out)  # what the pipeline will do: fails here, not in a user's run
    logger.info(
        "wrote %s (%d tensors, %.2f MB, sha256 %s)", weights, len(tensors), weights.stat().st_size / 1e6, sha
    )
    logger.info("wrote %s: recipe %s", description, meta["recipe"])
    return weights, description


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    parser.add_argument(
        "--recipe-set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model.embedded.KEY=VALUE: the recipe where MODEL_DIR's run differs from params.yaml",
    )
    parser.add_argument("--train-log", type=Path, help="the run's training log JSON")
    parser.add_argument("--note", help="how the weights were made (default: a generated line)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=shipped_weights_paths()[0].parent)
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks of param / artifact errors")
    args = parser.parse_args(argv)
    configure_logging()
    with user_errors(args.verbose):
        outside = [o for o in args.overrides if not o.startswith(PREFIX)]
        if outside:
            raise ParamError(f"--recipe-set {outside}: only {PREFIX}KEY=VALUE is a recipe setting")
        recipe = load_section(EmbeddedConfig, "model.embedded", load_params(args.params, args.overrides))
        train_log = read_train_log(args.train_log, recipe.train_steps) if args.train_log else None
        ship(args.model_dir, recipe, args.out, train_log, args.note)


if __name__ == "__main__":
    main()
