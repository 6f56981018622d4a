"""The feature-extractor interface every metric reads images through, and batched extraction.

An extractor maps images ``[N, C, H, W]`` in [-1, 1] to three things in one forward pass:

- ``features``: the pooled penultimate features ``[N, D]`` (FD/FID, precision/recall);
- ``spatial``: a flattened intermediate conv map ``[N, S]`` that keeps spatial layout (sFID,
  Nash et al. 2021, who take the first 7 channels of Inception's ``mixed_6/conv``);
- ``logits``: class logits ``[N, K]`` (IS), or None for an extractor without classes.

Two extractors exist: ``DigitsClassifier`` (``classifier.py``, the embedded default) and
``FIDInceptionV3`` (``inception.py``, for real RGB data sets). ``edadm.metrics.reference``
builds and reloads them.
"""

from __future__ import annotations

import abc
import logging
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

if TYPE_CHECKING:  # only the type: the reference stage runs in one process
    from edadm.distributed import Dist

logger = logging.getLogger(__name__)


class Extracted(NamedTuple):
    """What one forward pass of an extractor gives; tensors or arrays, first dim = images."""

    features: torch.Tensor | np.ndarray  # [N, feature_dim]
    spatial: torch.Tensor | np.ndarray  # [N, spatial_dim]
    logits: torch.Tensor | np.ndarray | None  # [N, num_classes] or None


class FeatureExtractor(nn.Module, abc.ABC):
    """Base of every extractor: an ``nn.Module`` (so ``.to(device)`` and state dicts work).

    Subclasses set ``name``, ``feature_dim``, ``spatial_dim``, ``num_classes`` (None when the
    extractor has no classes) and implement ``extract``.
    """

    name: str
    feature_dim: int
    spatial_dim: int
    num_classes: int | None

    @abc.abstractmethod
    def extract(self, x: torch.Tensor) -> Extracted:
        """All three outputs for images ``x: [N, C, H, W]`` in [-1, 1]."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features ``[N, feature_dim]``."""
        return self.extract(x).features

    def spatial_features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened intermediate conv features ``[N, spatial_dim]`` for sFID."""
        return self.extract(x).spatial

    def logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """Class logits ``[N, num_classes]``, or None when the extractor has no classes."""
        return self.extract(x).logits

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


@torch.no_grad()
def extract_all(
    extractor: FeatureExtractor,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 256,
    desc: str = "features",
    dist: Dist | None = None,
) -> Extracted | None:
    """Run ``extractor`` over ``images: [N, C, H, W]`` in [-1, 1] in batches.

    Returns an ``Extracted`` of float32 numpy arrays (``logits`` None when the extractor has no
    classes). The extractor is put in eval mode; images move to its device batch by batch, so
    memory holds one batch of activations at a time. ``dist`` (under torchrun): each rank runs
    its contiguous share of the batches, the very batches one process runs, and rank 0 gets
    them all, in order; the other ranks get None.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("no images to extract features from")
    share = range(len(images)) if dist is None else dist.shard(len(images), batch_size)
    extractor.eval()
    device = extractor.device
    features, spatial, logits = [], [], []
    starts = range(share.start, share.stop, batch_size)
    show = len(starts) > 1 and (dist is None or dist.is_main)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=not show):
        batch = torch.as_tensor(np.asarray(images[start : start + batch_size]), dtype=torch.float32)
        out = extractor.extract(batch.to(device))
        features.append(out.features.float().cpu().numpy())
        spatial.append(out.spatial.float().cpu().numpy())
        if out.logits is not None:
            logits.append(out.logits.float().cpu().numpy())
    if dist is not None and dist.active:
        # rank 0 gets every rank's batches in rank order: one process's batches, in its order
        gathered = dist.gather((features, spatial, logits))
        if gathered is None:
            return None
        features = [batch for part in gathered for batch in part[0]]
        spatial = [batch for part in gathered for batch in part[1]]
        logits = [batch for part in gathered for batch in part[2]]
    return Extracted(
        features=np.concatenate(features),
        spatial=np.concatenate(spatial),
        logits=np.concatenate(logits) if logits else None,
    )
