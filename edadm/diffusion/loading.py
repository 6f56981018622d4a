"""Loading and saving diffusion models in diffusers format.

On disk a model is a diffusers pipeline directory (``model_index.json``, ``unet/``,
``scheduler/``), the layout ``DiffusionPipeline.save_pretrained`` writes; a bare UNet
directory (``config.json`` of a UNet2DModel / UNet2DConditionModel) is accepted on input.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin, UNet2DConditionModel, UNet2DModel

from edadm.artifacts import ArtifactError, atomic_output
from edadm.config import ParamError
from edadm.diffusion.embedded import EmbeddedConfig

logger = logging.getLogger(__name__)

UNET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}


def _unet_dir(path: Path) -> Path:
    """The directory holding the UNet's config.json inside a pipeline or bare UNet directory."""
    if (path / "unet" / "config.json").exists():
        return path / "unet"
    if (path / "config.json").exists():
        return path
    raise FileNotFoundError(path)


def load_unet(path: str | Path, param: str = "model.path") -> UNet2DModel | UNet2DConditionModel:
    """Load the UNet of a diffusers pipeline directory or a bare UNet directory.

    ``param`` names the setting that chose ``path``, for the error message.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{param}={str(path)!r} does not exist; point it at a diffusers model directory")
    try:
        unet_dir = _unet_dir(path)
    except FileNotFoundError:
        raise ArtifactError(
            f"{param}={str(path)!r} is not a diffusers model: expected model_index.json with a unet/ "
            "folder (DiffusionPipeline.save_pretrained) or a UNet config.json"
        ) from None
    config = json.loads((unet_dir / "config.json").read_text())
    class_name = config.get("_class_name")
    if class_name not in UNET_CLASSES:
        raise ArtifactError(
            f"{param}: {unet_dir / 'config.json'} describes a {class_name!r}; edadm quantizes "
            f"{' and '.join(UNET_CLASSES)}"
        )
    # low_cpu_mem_usage=False: the default path wants `accelerate`, which edadm does not need.
    return UNET_CLASSES[class_name].from_pretrained(unet_dir, low_cpu_mem_usage=False).eval()


def load_scheduler(path: str | Path) -> SchedulerMixin:
    """The training noise schedule stored with the model (DDPM linear 1000 steps if none is)."""
    path = Path(path)
    scheduler_dir = path / "scheduler"
    if (scheduler_dir / "scheduler_config.json").exists():
        return scheduler_from_config(DDPMScheduler.load_config(scheduler_dir))
    logger.warning("%s has no scheduler/ folder: assuming DDPM, 1000 linear-beta steps", path)
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


def scheduler_from_config(config: Mapping[str, Any]) -> SchedulerMixin:
    """The training noise schedule from its config (a model directory's, or an export's metadata)."""
    return DDPMScheduler.from_config(dict(config))


def save_model(unet: torch.nn.Module, scheduler: SchedulerMixin, path: str | Path) -> None:
    """Write a diffusers pipeline directory atomically (unet/, scheduler/, model_index.json)."""
    with atomic_output(path) as tmp:
        tmp.mkdir(parents=True)
        unet.save_pretrained(tmp / "unet")
        scheduler.save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": "DDPMPipeline" if isinstance(unet, UNet2DModel) else "DiffusionPipeline",
            "_diffusers_version": unet.config.get("_diffusers_version", ""),
            "unet": ["diffusers", type(unet).__name__],
            "scheduler": ["diffusers", type(scheduler).__name__],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def update_digest(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Feed a named tensor (dtype, shape and raw bytes: exact for any dtype) into ``digest``."""
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_hash(model: torch.nn.Module) -> str:
    """sha256 of a model's state_dict, recorded in the artifacts made from it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        update_digest(digest, name, tensor)
    return digest.hexdigest()


def ddim_from(scheduler: SchedulerMixin) -> DDIMScheduler:
    """A DDIM sampler sharing the model's training noise schedule."""
    return DDIMScheduler.from_config(scheduler.config)


@dataclass(frozen=True)
class ModelConfig:
    """params.yaml ``model``: where the diffusion model comes from."""

    # embedded: the digits UNet whose weights the package ships; train: train that UNet from
    # scratch with ``embedded``; pretrained: a local diffusers model directory (``path``)
    source: Literal["embedded", "train", "pretrained"] = "embedded"
    path: str | None = None  # a diffusers pipeline or UNet directory, for source: pretrained
    # source: train trains this recipe; source: embedded checks that it is the shipped weights' one
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)

    def __post_init__(self) -> None:
        if self.source == "pretrained" and not self.path:
            raise ParamError("model.source=pretrained needs model.path: a local diffusers model directory")
