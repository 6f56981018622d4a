"""What each generated image was conditioned on, read from a samples store.

The sample stages of class-conditional and text-to-image models write, next to ``images`` and
``seeds``:

- an array ``conditions [n]`` int64: for image k, the index of its condition in the attributes;
- the attribute ``condition``: ``{"kind": "none" | "class" | "text", "guidance_scale": float,
  "labels": [int, ...] or null, "prompts": [str, ...] or null}``.

Image k was asked for class ``labels[conditions[k]]`` or prompt ``prompts[conditions[k]]``. A
store without them (an unconditional model) reads as None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edadm.artifacts import SAMPLES, open_store, read_array
from edadm.errors import ArtifactError

CONDITIONS_ARRAY = "conditions"
CONDITION_ATTR = "condition"


@dataclass(frozen=True, eq=False)
class SampleConditions:
    """The conditions of a sample set.

    kind: ``class`` or ``text``.
    guidance_scale: the classifier-free guidance scale the images were sampled with.
    index: ``[n]`` int64, image k's index into ``labels`` (class) or ``prompts`` (text).
    labels: the distinct requested class labels (class), else None.
    prompts: the distinct prompts (text), else None.
    """

    kind: Literal["class", "text"]
    guidance_scale: float
    index: np.ndarray
    labels: tuple[int, ...] | None = None
    prompts: tuple[str, ...] | None = None

    def class_labels(self) -> np.ndarray:
        """The requested class label of every image, ``[n]`` int64."""
        if self.labels is None:
            raise ValueError(f"{self.kind} conditions have no class labels")
        return np.asarray(self.labels, dtype=np.int64)[self.index]

    def image_prompts(self) -> list[str]:
        """The prompt of every image (``n`` strings)."""
        if self.prompts is None:
            raise ValueError(f"{self.kind} conditions have no prompts")
        return [self.prompts[k] for k in self.index]

    def same_as(self, other: SampleConditions) -> bool:
        """Whether both sample sets asked for the same thing, image by image."""
        return (
            self.kind == other.kind
            and self.guidance_scale == other.guidance_scale
            and self.labels == other.labels
            and self.prompts == other.prompts
            and np.array_equal(self.index, other.index)
        )

    def describe(self) -> str:
        """One line for messages: kind, guidance scale and how many distinct conditions."""
        distinct = len(self.labels if self.kind == "class" else self.prompts)
        return f"{self.kind} conditions ({distinct} distinct, guidance scale {self.guidance_scale})"


def sample_conditions(path: str | Path, stage: str = "sample_fp") -> SampleConditions | None:
    """The conditions of the samples store ``path`` (made by ``stage``), or None if unconditional.

    Raises ArtifactError when the store's conditions are inconsistent (an array without its
    attribute, indices out of range, a kind without its labels or prompts).
    """
    store = open_store(path, SAMPLES, stage)
    attrs = dict(store.attrs)
    remedy = f"rerun the '{stage}' stage with `dvc repro -f {stage}`"
    has_array = CONDITIONS_ARRAY in set(store.array_keys())
    condition: Any = attrs.get(CONDITION_ATTR)
    if condition is None and not has_array:
        return None
    if not isinstance(condition, dict) or condition.get("kind") not in ("none", "class", "text"):
        raise ArtifactError(
            f"{path}: attribute '{CONDITION_ATTR}' must be a mapping with kind none, class or text, "
            f"got {condition!r}; {remedy}"
        )
    kind = condition["kind"]
    if kind == "none":
        return None
    if not has_array:
        raise ArtifactError(f"{path} has {kind} conditions but no '{CONDITIONS_ARRAY}' array; {remedy}")
    index = read_array(store, CONDITIONS_ARRAY, path, stage).astype(np.int64)
    n_images = store["images"].shape[0]
    if index.shape != (n_images,):
        raise ArtifactError(
            f"{path}/{CONDITIONS_ARRAY} has shape {index.shape}, expected ({n_images},) (one per image); "
            f"{remedy}"
        )
    key = "labels" if kind == "class" else "prompts"
    values = condition.get(key)
    if not isinstance(values, list) or not values:
        raise ArtifactError(
            f"{path}: {kind} conditions need a non-empty list '{key}', got {values!r}; {remedy}"
        )
    if len(index) and (index.min() < 0 or index.max() >= len(values)):
        raise ArtifactError(
            f"{path}/{CONDITIONS_ARRAY} indexes [{index.min()}, {index.max()}] into {len(values)} {key}; "
            f"{remedy}"
        )
    guidance_scale = condition.get("guidance_scale")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float):
        raise ArtifactError(
            f"{path}: conditions need a number 'guidance_scale', got {guidance_scale!r}; {remedy}"
        )
    return SampleConditions(
        kind=kind,
        guidance_scale=float(guidance_scale),
        index=index,
        labels=tuple(int(v) for v in values) if kind == "class" else None,
        prompts=tuple(str(v) for v in values) if kind == "text" else None,
    )


def check_same_conditions(
    first: SampleConditions | None,
    second: SampleConditions | None,
    first_path: str | Path,
    second_path: str | Path,
) -> None:
    """Raise ArtifactError unless two paired sample sets asked for the same conditions per image."""
    if first is None and second is None:
        return
    if first is None or second is None or not first.same_as(second):
        raise ArtifactError(
            f"{first_path} ({_describe(first)}) and {second_path} ({_describe(second)}) were not "
            "sampled with the same conditions image by image, so they cannot be compared pair by pair: "
            "rerun both sample stages with the same params (`dvc repro sample_fp sample_quant`)"
        )


def _describe(conditions: SampleConditions | None) -> str:
    return conditions.describe() if conditions is not None else "unconditional"
