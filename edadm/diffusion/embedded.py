"""The embedded default: a small UNet2DModel trained on scikit-learn's digits.

It exists so that a fresh clone runs end to end with no download. Its architecture has what
EDA-DM needs: ResNet blocks, attention at the middle resolution (8x8) and a mid-block
attention at 4x4 whose input TDAC hooks (features [B, 64, 4, 4]).

A converged model takes thousands of steps (the shipped 8000-step run: 64 min on 2 cores),
so the package ships its weights (``weights/embedded_digits.safetensors``, float16, with a
JSON of its sha256 and recipe; ``bench/ship_embedded.py`` writes them):
``load_embedded_weights`` loads them and ``train_embedded`` trains the recipe from scratch
(``model.source: train``).

``conditioning: class`` is the class-conditional variant for classifier-free guidance (Ho &
Salimans 2022): the same UNet with a class embedding of ``NUM_CLASSES + 1`` rows, the digits
0..9 and ``NULL_LABEL`` (no class), trained with a ``label_dropout`` share of labels replaced
by ``NULL_LABEL``. Its converged weights ship too, as ``weights/embedded_digits_class.*``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file
from tqdm.auto import tqdm

from edadm.artifacts import file_sha256
from edadm.config import as_dict, check_range
from edadm.errors import ArtifactError, ParamError

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
# One shipped file pair per conditioning: the variants are different models.
WEIGHTS_NAMES = {"none": "embedded_digits", "class": "embedded_digits_class"}
# Recipe fields that do not change the weights: a mismatch there is no reason to retrain.
RECIPE_IGNORED = frozenset({"log_every"})

NUM_CLASSES = 10  # the digits 0..9
# The "no class" label: what the unconditional pass of classifier-free guidance is given.
NULL_LABEL = NUM_CLASSES


@dataclass(frozen=True)
class EmbeddedConfig:
    """Training knobs of the embedded default (params.yaml ``model.embedded``)."""

    train_steps: int = 8000  # the shipped weights' run (training curve: docs/embedded-models.md)
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999  # ~1000-step horizon over the constant-rate run
    # constant: lr after the warm-up, so that a snapshot at step k of a longer run is the model
    # of a k-step run (bench/training_curve.py); cosine: decay to 10 % of lr over train_steps
    lr_schedule: Literal["cosine", "constant"] = "constant"
    image_size: int = 16
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    num_train_timesteps: int = 1000
    # none: unconditional; class: labels 0..9 and NULL_LABEL, for classifier-free guidance
    conditioning: Literal["none", "class"] = "none"
    # class only: the share of training labels replaced by NULL_LABEL, so that one model also
    # learns the unconditional eps guidance needs (Ho & Salimans 2022 use 0.1 to 0.2)
    label_dropout: float = 0.1
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        check_range("model.embedded.train_steps", self.train_steps, 1)
        check_range("model.embedded.batch_size", self.batch_size, 1)
        check_range("model.embedded.lr", self.lr, 0.0)
        check_range("model.embedded.ema_decay", self.ema_decay, 0.0, 1.0)
        check_range("model.embedded.warmup_steps", self.warmup_steps, 0)
        check_range("model.embedded.label_dropout", self.label_dropout, 0.0, 1.0)
        if self.conditioning == "class" and self.label_dropout == 1.0:
            raise ParamError(
                "model.embedded.label_dropout=1 replaces every label by the null label: the class model "
                "would never see a class; use a value below 1 (0.1 is the usual one)"
            )
        if len(self.block_out_channels) != 3:
            raise ParamError("model.embedded.block_out_channels must list 3 widths (one per resolution)")
        if self.image_size % 4:
            raise ParamError("model.embedded.image_size must be divisible by 4 (two downsamplings)")


def build_embedded_unet(config: EmbeddedConfig = EmbeddedConfig()) -> UNet2DModel:
    """The embedded default architecture (random weights).

    With ``conditioning: class`` it takes ``class_labels`` [B] in 0..NULL_LABEL, added to the time
    embedding (diffusers' ``num_class_embeds``); otherwise it takes none.
    """
    return UNet2DModel(
        sample_size=config.image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=config.block_out_channels[1] // 2,  # two heads at every width
        num_class_embeds=NUM_CLASSES + 1 if config.conditioning == "class" else None,
    )


def build_embedded_scheduler(config: EmbeddedConfig = EmbeddedConfig()) -> DDPMScheduler:
    """DDPM schedule: 1000 linear-beta steps, epsilon prediction (Ho et al. 2020)."""
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=2e-2,
        prediction_type="epsilon",
        clip_sample=True,
    )


def _lr_factor(step: int, config: EmbeddedConfig) -> float:
    """Linear warm-up, then constant or cosine decay to 10% of the peak rate."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.train_steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def drop_labels(labels: torch.Tensor, dropout: float, generator: torch.Generator) -> torch.Tensor:
    """``labels`` [B] with each one replaced by ``NULL_LABEL`` with probability ``dropout``.

    Classifier-free guidance's training (Ho & Salimans 2022, Algorithm 1): the model learns the
    unconditional eps from the dropped examples. The draw comes from ``generator`` (CPU).
    """
    dropped = torch.rand(labels.shape, generator=generator) < dropout
    return torch.where(dropped, torch.full_like(labels, NULL_LABEL), labels)


def _check_labels(
    labels: np.ndarray | None, images: np.ndarray, config: EmbeddedConfig
) -> torch.Tensor | None:
    """The training labels as a tensor [N] for the class model, None for the unconditional one."""
    if config.conditioning == "none":
        return None
    if labels is None:
        raise ValueError(
            "model.embedded.conditioning=class trains on labelled digits: pass train_embedded the labels "
            "(edadm.data.digits_split returns them)"
        )
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be [N] = [{len(images)}], one per image; got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(
            f"labels must lie in 0..{NUM_CLASSES - 1} (the digits); got {labels.min()}..{labels.max()}"
        )
    return torch.from_numpy(labels.astype(np.int64))


def train_embedded(
    images: np.ndarray,
    config: EmbeddedConfig,
    device: torch.device,
    snapshot_steps: Sequence[int] = (),
    on_snapshot: Callable[[int, UNet2DModel], None] | None = None,
    labels: np.ndarray | None = None,
) -> tuple[UNet2DModel, DDPMScheduler, dict]:
    """Train the embedded UNet on ``images`` [N, 1, H, W] in [-1, 1] with the DDPM loss.

    ``labels`` [N] (digits 0..9) are needed with ``conditioning: class`` and ignored otherwise.
    Returns the EMA weights (what gets saved and sampled), the scheduler, and a training log
    ``{"loss": [...], "loss_steps": [...], "steps": ...}`` (no timings: it is an artifact).
    ``on_snapshot(step, ema)`` is called after each of ``snapshot_steps`` (a training curve
    from one run; with ``lr_schedule: constant`` each snapshot is a shorter run's model).
    """
    class_labels = _check_labels(labels, images, config)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    unet = build_embedded_unet(config).to(device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = build_embedded_scheduler(config)
    data = torch.from_numpy(images).float()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    alphas_cumprod = scheduler.alphas_cumprod.to(device)

    losses, loss_steps, running = [], [], []
    start = time.perf_counter()
    progress = tqdm(range(config.train_steps), desc="train embedded UNet", unit="step")
    for step in progress:
        # 1. a batch of clean images, noise and timesteps (all from the seeded generator)
        index = torch.randint(0, len(data), (config.batch_size,), generator=generator)
        x0 = data[index].to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, config.num_train_timesteps, (config.batch_size,), generator=generator).to(device)
        # the label dropout draws after the rest, so the unconditional recipe's stream is unchanged
        y = None
        if class_labels is not None:
            y = drop_labels(class_labels[index], config.label_dropout, generator).to(device)
        # 2. forward diffusion q(x_t | x_0) and the epsilon-prediction loss (Ho et al. eq. 14)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t, class_labels=y).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        # 3. EMA of the weights; warmed up so early steps are not frozen in
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        running.append(loss.item())
        if on_snapshot is not None and step + 1 in snapshot_steps:
            on_snapshot(step + 1, ema)
        if (step + 1) % config.log_every == 0 or step + 1 == config.train_steps:
            losses.append(float(np.mean(running)))
            loss_steps.append(step + 1)
            running = []
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    logger.info("trained %d steps in %.0f s, final loss %.4f", config.train_steps, seconds, losses[-1])
    log = {
        "loss": losses,
        "loss_steps": loss_steps,
        "steps": config.train_steps,
    }
    return ema.cpu(), scheduler, log


def shipped_weights_paths(
    weights_dir: str | Path | None = None, conditioning: str = "none"
) -> tuple[Path, Path]:
    """The shipped weights file and its JSON description for ``conditioning`` (none | class), in
    ``weights_dir`` (default the package's)."""
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    name = WEIGHTS_NAMES[conditioning]
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def recipe_differences(config: EmbeddedConfig, recipe: dict[str, Any]) -> list[str]:
    """``key: params X, shipped Y`` for each recipe field where ``config`` differs from ``recipe``.

    A field the shipped recipe lacks was added after those weights were made, with a default
    that keeps the old behaviour: it counts as that default.
    """
    given = as_dict(config)
    defaults = as_dict(EmbeddedConfig())
    ignored = set(RECIPE_IGNORED)
    if config.conditioning == "none":
        ignored.add("label_dropout")  # no labels, nothing to drop: the weights do not depend on it
    out = []
    for key in sorted((set(given) | set(recipe)) - ignored):
        ours, theirs = given.get(key, "<missing>"), recipe.get(key, defaults.get(key, "<missing>"))
        if ours != theirs:
            out.append(f"model.embedded.{key}: params {ours!r}, shipped {theirs!r}")
    return out


def load_embedded_weights(
    config: EmbeddedConfig, weights_dir: str | Path | None = None
) -> tuple[UNet2DModel, DDPMScheduler, dict]:
    """The shipped embedded model (``model.source: embedded``), checked against its sha256 and recipe.

    ``config.conditioning`` picks the file pair (``shipped_weights_paths``): the package ships
    both the unconditional and the class-conditional weights.
    Returns the UNet (float32), the scheduler and the shipped training log plus ``source`` and
    ``weights_sha256``. A damaged file is an ArtifactError; ``config`` (params ``model.embedded``)
    other than the recipe the weights were trained with is a ParamError (the weights would not
    be the model the params describe).
    """
    weights, description = shipped_weights_paths(weights_dir, config.conditioning)
    if config.conditioning == "class":
        what = "class-conditional embedded weights"
        fix = (
            f"reinstall edadm or `git checkout -- {weights.parent}`, train the class model instead with "
            "model.source: train, or ship a trained one's weights "
            "with `python bench/ship_embedded.py MODEL_DIR --recipe-set model.embedded.conditioning=class "
            f"--out {weights.parent}`"
        )
    else:
        what = "embedded weights"
        fix = f"reinstall edadm or `git checkout -- {weights.parent}`, or use model.source: train"
    for path in (weights, description):
        if not path.exists():
            raise ArtifactError(f"the shipped {what} {path} are missing: {fix}")
    try:
        meta = json.loads(description.read_text())
        expected, recipe, train_log = meta["sha256"], meta["recipe"], meta["train_log"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ArtifactError(f"{description} is damaged ({err!r}): {fix}") from err
    sha = file_sha256(weights)
    if sha != expected:
        raise ArtifactError(
            f"{weights} has sha256 {sha}, {description} records {expected}: the file is damaged; {fix}"
        )
    differences = recipe_differences(config, recipe)
    if differences:
        raise ParamError(
            "model.source: embedded loads weights trained with another model.embedded recipe ("
            + "; ".join(differences)
            + "): set them back, or use model.source: train to train with the changed recipe"
        )
    unet = build_embedded_unet(config)
    tensors = {name: tensor.float() for name, tensor in load_file(weights).items()}
    try:
        unet.load_state_dict(tensors, strict=True)
    except RuntimeError as err:  # sha and recipe agree, so the shipped pair itself is wrong
        raise ArtifactError(f"{weights} does not fit its recipe's UNet ({err}); {fix}") from err
    logger.info("loaded the shipped embedded weights %s (sha256 %s)", weights, sha[:12])
    log = {**train_log, "source": "embedded (shipped weights)", "weights_sha256": sha}
    return unet.eval(), build_embedded_scheduler(config), log
