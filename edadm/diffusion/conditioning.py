"""Conditions of class-conditional and text-to-image models, and classifier-free guidance.

A ``Conditioning`` is built once per stage from the model and params.yaml ``condition``: the
list of conditions to draw from (class labels, or prompts with their text-encoder embeddings
computed once), the guidance scale, and the unconditional input (the null label, or the empty
prompt's embedding). Every item (trajectory or sample) draws its condition from a generator
seeded by ``condition.seed`` and the item's own seed, so the FP and the quantized models see
the same conditions as they see the same x_T, whatever the batch size.

Under guidance (scale != 1) the UNet sees both branches at every step, in one batched call
on [uncond; cond] as diffusers' pipelines run it: eps = eps_u + s * (eps_c - eps_u).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edadm.config import check_range
from edadm.diffusion.loading import DiffusionModel
from edadm.errors import ArtifactError, ParamError

logger = logging.getLogger(__name__)

BUNDLED_PROMPTS = Path(__file__).parent / "prompts.txt"
# The paper's settings: LDM-4 ImageNet with guidance 3.0 (after Q-Diffusion / PTQD), Stable
# Diffusion v1.4 with 7.5 (diffusers' default); unconditional models have nothing to guide.
PAPER_GUIDANCE = {"none": 1.0, "class": 3.0, "text": 7.5}
TEXT_ENCODER_BATCH = 64  # prompts per text-encoder pass: memory only


@dataclass(frozen=True)
class ConditionConfig:
    """params.yaml ``condition``: what conditional models are conditioned on."""

    prompts: str | None = None  # a text file, one prompt a line; null: the bundled captions
    classes: tuple[int, ...] | None = None  # labels to draw uniformly; null: all of the model's classes
    guidance_scale: float | None = None  # classifier-free guidance, 1 = none; null: the paper's for the kind
    seed: int = 0

    def __post_init__(self) -> None:
        if self.guidance_scale is not None:
            check_range("condition.guidance_scale", self.guidance_scale, 0.0)
        if self.classes is not None:
            if not self.classes:
                raise ParamError("condition.classes is empty: list labels, or null for all classes")
            for label in self.classes:
                check_range("condition.classes[]", label, 0)
        check_range("condition.seed", self.seed, 0)


@dataclass
class BatchCondition:
    """The UNet's conditioning for one batch: the conditional branch's keyword inputs and,
    under guidance, the unconditional branch's."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None = None
    scale: float = 1.0

    def eps(self, unet: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The (guided) noise prediction for x_t [B, ...] at ``timestep`` [B]."""
        if self.uncond is None:
            return unet(x, timestep, **self.cond).sample
        both = {key: torch.cat([self.uncond[key], self.cond[key]]) for key in self.cond}
        eps_uncond, eps_cond = unet(torch.cat([x, x]), torch.cat([timestep, timestep]), **both).sample.chunk(
            2
        )
        return eps_uncond + self.scale * (eps_cond - eps_uncond)


class Conditioning:
    """The conditions a model draws from, their UNet inputs and the guidance scale.

    ``kind`` is ``none`` (unconditional: no inputs, scale 1), ``class`` (``labels``, UNet input
    ``class_labels``) or ``text`` (``prompts``, UNet input ``encoder_hidden_states`` from the
    float text encoder, ``embeddings`` [P, L, D] and ``null_embedding`` [1, L, D]).
    """

    def __init__(self, model: DiffusionModel, config: ConditionConfig = ConditionConfig()) -> None:
        self.kind = model.kind.condition
        self.seed = config.seed
        self.scale = PAPER_GUIDANCE[self.kind] if config.guidance_scale is None else config.guidance_scale
        self.labels: tuple[int, ...] | None = None
        self.prompts: tuple[str, ...] | None = None
        self.null_class: int | None = None
        self.embeddings: torch.Tensor | None = None
        self.null_embedding: torch.Tensor | None = None
        if self.kind == "none":
            if config.guidance_scale not in (None, 1.0):
                raise ParamError(
                    f"condition.guidance_scale={config.guidance_scale}: this model is unconditional, "
                    "there is nothing to guide; set it to 1 or null"
                )
            self.scale = 1.0
        elif self.kind == "class":
            self._init_classes(model, config)
        else:
            self._init_text(model, config)

    def _init_classes(self, model: DiffusionModel, config: ConditionConfig) -> None:
        kind = model.kind
        labels = tuple(range(kind.num_classes)) if config.classes is None else config.classes
        bad = [label for label in labels if label >= kind.num_classes or label == kind.null_class]
        if bad:
            raise ParamError(
                f"condition.classes has {bad}: this model's classes are 0..{kind.num_classes - 1}"
                + (f" ({kind.null_class} is its 'no class' label)" if kind.null_class is not None else "")
            )
        if self.guided and kind.null_class is None:
            raise ParamError(
                f"condition.guidance_scale={self.scale} needs the model's 'no class' label, and this model "
                "has none on record: set model.null_class (and rerun the model stage), or guidance_scale to 1"
            )
        self.labels, self.null_class = labels, kind.null_class

    def _init_text(self, model: DiffusionModel, config: ConditionConfig) -> None:
        self.prompts = read_prompts(config.prompts)
        self.embeddings = encode_prompts(model, list(self.prompts))
        self.null_embedding = encode_prompts(model, [""])  # classifier-free guidance's empty prompt

    @property
    def guided(self) -> bool:
        return self.kind != "none" and self.scale != 1.0

    @property
    def count(self) -> int:
        """Conditions to draw from (1 for an unconditional model)."""
        if self.kind == "class":
            return len(self.labels)
        return len(self.prompts) if self.kind == "text" else 1

    def draw(self, item_seeds: np.ndarray) -> np.ndarray:
        """The condition index of each item, from its own seed: independent of batching."""
        if self.kind == "none":
            return np.zeros(len(item_seeds), dtype=np.int64)
        return np.asarray(
            [np.random.default_rng([self.seed, int(s)]).integers(self.count) for s in item_seeds],
            dtype=np.int64,
        )

    def batch(self, index: np.ndarray | torch.Tensor, device: torch.device | str) -> BatchCondition | None:
        """The UNet's conditioning for items with condition indices ``index`` (None: unconditional)."""
        if self.kind == "none":
            return None
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return BatchCondition(
            self.cond_inputs(index, device),
            self.null_inputs(len(index), device) if self.guided else None,
            self.scale,
        )

    def cond_inputs(self, index: torch.Tensor, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The conditional branch's UNet keyword inputs for condition indices ``index``."""
        if self.kind == "class":
            labels = torch.as_tensor(self.labels, dtype=torch.long)[index]
            return {"class_labels": labels.to(device)}
        return {"encoder_hidden_states": self.embeddings[index].to(device)}

    def null_inputs(self, batch: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The unconditional branch's UNet keyword inputs for ``batch`` items."""
        if self.kind == "class":
            return {"class_labels": torch.full((batch,), self.null_class, dtype=torch.long, device=device)}
        return {"encoder_hidden_states": self.null_embedding.expand(batch, -1, -1).to(device)}

    def attrs(self) -> dict[str, Any]:
        """What a store records about its items' conditions (beside their indices)."""
        return {
            "kind": self.kind,
            "guidance_scale": self.scale,
            "seed": self.seed,
            "labels": list(self.labels) if self.labels is not None else None,
            "null_class": self.null_class,
            "prompts": list(self.prompts) if self.prompts is not None else None,
        }


def read_prompts(path: str | None) -> tuple[str, ...]:
    """The prompts of ``condition.prompts`` (one a line, blank lines skipped; null: the bundled list)."""
    source = Path(path) if path else BUNDLED_PROMPTS
    if not source.exists():
        raise ParamError(
            f"condition.prompts={path!r} does not exist: point it at a text file, one prompt a line"
        )
    prompts = tuple(line.strip() for line in source.read_text().splitlines() if line.strip())
    if not prompts:
        raise ParamError(f"condition.prompts={str(source)!r} holds no prompt: write one prompt a line")
    return prompts


@torch.no_grad()
def encode_prompts(model: DiffusionModel, prompts: list[str]) -> torch.Tensor:
    """The float text encoder's last hidden states [P, L, D] for ``prompts`` (padded to the
    tokenizer's max length, as Stable Diffusion pipelines encode them)."""
    if model.text_encoder is None or model.tokenizer is None:
        raise ArtifactError(
            "a text-to-image model needs its text_encoder/ and tokenizer/: rerun the model stage"
        )
    device = next(model.text_encoder.parameters()).device
    out = []
    for start in range(0, len(prompts), TEXT_ENCODER_BATCH):
        tokens = model.tokenizer(
            prompts[start : start + TEXT_ENCODER_BATCH],
            padding="max_length",
            max_length=model.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out.append(model.text_encoder(tokens.input_ids.to(device))[0].float().cpu())
    return torch.cat(out)
