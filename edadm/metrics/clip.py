"""CLIP score of text-to-image samples: how well each image matches its prompt.

CLIPScore (Hessel et al. 2021) with w = 100, as torchmetrics scales it: the mean over images of
``100 * max(cos(E_image, E_text), 0)``, the embeddings being a CLIP model's projected image and
text features. (torchmetrics clamps the mean rather than each image; the two agree unless some
cosine is negative, which real CLIP models practically never give an image and its prompt.)

The CLIP model is a local directory (``reference.clip_path``) holding a ``CLIPModel`` and its
processor (or at least its tokenizer and image-processor config) saved with ``save_pretrained``;
nothing is ever downloaded. Images are preprocessed in torch as CLIP's image processor does:
[-1, 1] to [0, 1], shortest edge resized (bicubic, antialiased) to the vision model's image size,
centre crop, normalised with the processor's ``image_mean`` / ``image_std``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edadm.errors import ArtifactError

logger = logging.getLogger(__name__)

CLIP_PARAM = "reference.clip_path"
SCALE = 100.0  # w of CLIPScore, as torchmetrics uses it
SAVE_HINT = (
    "save one there with `CLIPModel.from_pretrained(NAME).save_pretrained(DIR)` and "
    "`CLIPProcessor.from_pretrained(NAME).save_pretrained(DIR)` on a machine that has it"
)


class CLIPScorer:
    """A CLIP model, its tokenizer and image normalisation, ready to score images against prompts.

    Build it with ``CLIPScorer.load(path, device)``.
    """

    def __init__(
        self, model: Any, tokenizer: Any, image_mean: Sequence[float], image_std: Sequence[float]
    ) -> None:
        self.model = model.float().eval()
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.image_mean = torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.image_std = torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> CLIPScorer:
        """Load the CLIP model and processor saved in the local directory ``path``.

        Raises ArtifactError naming ``reference.clip_path`` when ``path`` is not a directory or
        does not hold a CLIP model with its tokenizer and image-processor config.
        """
        from transformers import AutoConfig, AutoTokenizer, CLIPModel
        from transformers.image_processing_utils import ImageProcessingMixin

        where = f"param {CLIP_PARAM}={str(path)!r}"
        if not Path(path).is_dir():
            raise ArtifactError(f"{where} is not a directory; {SAVE_HINT}, or set {CLIP_PARAM} to null")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as err:  # no config.json, unreadable JSON, no model_type
            raise ArtifactError(f"{where} holds no transformers model config ({err}); {SAVE_HINT}") from err
        if config.model_type != "clip":
            raise ArtifactError(f"{where} holds a '{config.model_type}' model, not a CLIP model; {SAVE_HINT}")
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            # Only the normalisation is needed: the config dict, not the (PIL / torchvision) processor.
            processor, _ = ImageProcessingMixin.get_image_processor_dict(path, local_files_only=True)
        except Exception as err:  # missing weights, tokenizer files or preprocessor config
            raise ArtifactError(
                f"{where}: the CLIP model, tokenizer or processor could not be loaded ({err}); {SAVE_HINT}"
            ) from err
        if "image_mean" not in processor or "image_std" not in processor:
            raise ArtifactError(
                f"{where}: its image-processor config has no image_mean / image_std; {SAVE_HINT}"
            )
        scorer = cls(model, tokenizer, processor["image_mean"], processor["image_std"])
        return scorer.to(device)

    def to(self, device: torch.device | str) -> CLIPScorer:
        self.model.to(device)
        self.image_mean, self.image_std = self.image_mean.to(device), self.image_std.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``images: [N, C, H, W]`` in [-1, 1] (C = 1 or 3) -> CLIP's ``pixel_values [N, 3, S, S]``."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"CLIP scores [N, 1 or 3, H, W] images, got shape {tuple(images.shape)}")
        x = ((images.float() + 1) / 2).clamp(0, 1)
        if x.shape[1] == 1:  # grayscale to RGB, as the processor's do_convert_rgb
            x = x.expand(-1, 3, -1, -1)
        height, width = x.shape[-2:]
        size = self.image_size
        if min(height, width) != size:
            # Shortest edge to `size`, the long edge in proportion (truncated), as CLIPImageProcessor.
            scale = size / min(height, width)
            new_size = (size, int(width * scale)) if height <= width else (int(height * scale), size)
            x = F.interpolate(x, size=new_size, mode="bicubic", antialias=True, align_corners=False)
            # The processor resizes 8-bit images: bicubic overshoot is clipped to the pixel range.
            x = x.clamp(0, 1)
            height, width = new_size
        top, left = (height - size) // 2, (width - size) // 2
        x = x[:, :, top : top + size, left : left + size]
        return (x - self.image_mean) / self.image_std

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``[N, D]`` of ``images: [N, C, H, W]`` in [-1, 1]."""
        pixel_values = self.preprocess(images.to(self.device))
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=pixel_values)), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[P, D]``; prompts longer than the text model's context
        (77 tokens for CLIP) are truncated, as CLIPScore implementations do."""
        lengths = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        if max(lengths) > self.max_length:
            logger.warning(
                "CLIP score: %d of %d prompts are longer than %d tokens and are truncated",
                sum(n > self.max_length for n in lengths),
                len(prompts),
                self.max_length,
            )
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return F.normalize(_pooled(features), dim=-1)

    def scores(self, images: np.ndarray, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Per-image CLIP score ``[N]``, ``100 * max(cos, 0)``, of ``images [N, C, H, W]`` in [-1, 1]
        against their ``prompts`` (N strings; each distinct prompt is encoded once)."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        distinct = sorted(set(prompts))
        position = {prompt: k for k, prompt in enumerate(distinct)}
        prompt_index = torch.tensor([position[p] for p in prompts], dtype=torch.long)
        text = torch.cat(
            [self.text_embeddings(distinct[s : s + batch_size]) for s in range(0, len(distinct), batch_size)]
        )  # [P, D]
        out = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="CLIP score", unit="batch", leave=False, disable=len(starts) < 2):
            batch = torch.as_tensor(np.asarray(images[start : start + batch_size]), dtype=torch.float32)
            cosine = (
                self.image_embeddings(batch) * text[prompt_index[start : start + batch_size].to(text.device)]
            ).sum(-1)
            out.append((SCALE * cosine.clamp(min=0)).double().cpu().numpy())
        return np.concatenate(out)


def _pooled(output: Any) -> torch.Tensor:
    """Projected features: a tensor in transformers 4, a ModelOutput's pooler_output in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_score(
    images: np.ndarray,
    prompts: Sequence[str],
    clip_path: str | Path,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> float:
    """Mean CLIP score of ``images [N, C, H, W]`` in [-1, 1] against their ``prompts`` (one each)."""
    scorer = CLIPScorer.load(clip_path, device)
    return float(scorer.scores(images, prompts, batch_size).mean())
