"""Loading and saving diffusion models in diffusers format, and what kind of model each is.

On disk a model is a diffusers pipeline directory (``model_index.json``, ``unet/``,
``scheduler/``), the layout ``DiffusionPipeline.save_pretrained`` writes; a bare UNet
directory (``config.json`` of a UNet2DModel / UNet2DConditionModel) is accepted on input.

Kinds (``ModelKind``): unconditional pixel; latent (a ``vae/`` or ``vqvae/`` folder, e.g. the
LDMPipeline layout: x_t are latents and the float VAE decodes the samples); class-conditional
(a UNet with ``num_class_embeds``, taking ``class_labels``); text-to-image (the
StableDiffusionPipeline layout: a UNet2DConditionModel with ``text_encoder/`` and
``tokenizer/``). Only the UNet is quantized (docs/method.md §0); the rest stays float. The model
stage records the kind in ``edadm_model.json`` beside ``model_index.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    SchedulerMixin,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from diffusers.utils import logging as diffusers_logging

from edadm.artifacts import atomic_output
from edadm.diffusion.embedded import EmbeddedConfig
from edadm.errors import ArtifactError, ParamError

logger = logging.getLogger(__name__)

UNET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
VAE_CLASSES = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
VAE_FOLDERS = ("vae", "vqvae")  # StableDiffusionPipeline's and LDMPipeline's name for it
KIND_FILE = "edadm_model.json"
KIND_SCHEMA = 1


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
    return _load_component(unet_dir, UNET_CLASSES, f"{param}: ", "quantizes")


def read_model_json(path: Path) -> Any:
    """A JSON file of a model directory; ArtifactError naming the file when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(
            f"{path} is not valid JSON ({err}); the model directory is damaged: save it again "
            "(DiffusionPipeline.save_pretrained) or rerun the model stage (`dvc repro -f model`)"
        ) from err


def _from_pretrained(folder: Path, load: Callable[[Path], Any]) -> Any:
    """``load(folder)``, with a missing or damaged weights file as an ArtifactError naming it.

    diffusers' own warnings while it looks for a weights file are held back: the error says it.
    """
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        return load(folder)
    except (OSError, ValueError) as err:  # diffusers / transformers: no weights file, bad shapes
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ArtifactError(
            f"{folder} could not be loaded ({first}); its weights are missing or damaged: save the "
            "model again (DiffusionPipeline.save_pretrained) or rerun the model stage (`dvc repro -f model`)"
        ) from err
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _load_component(folder: Path, classes: Mapping[str, Any], prefix: str, role: str) -> torch.nn.Module:
    """The diffusers model in ``folder`` whose config names one of ``classes``."""
    config = read_model_json(folder / "config.json")
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if class_name not in classes:
        raise ArtifactError(
            f"{prefix}{folder / 'config.json'} describes a {class_name!r}; "
            f"edadm {role} {' and '.join(classes)}"
        )
    # low_cpu_mem_usage=False: the default path wants `accelerate`, which edadm does not need.
    model_class = classes[class_name]
    return _from_pretrained(folder, lambda d: model_class.from_pretrained(d, low_cpu_mem_usage=False).eval())


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


def save_model(model: DiffusionModel, path: str | Path) -> None:
    """Write a diffusers pipeline directory atomically: unet/, scheduler/, the float parts the
    kind needs (vae/ or vqvae/, text_encoder/, tokenizer/), model_index.json and the kind."""
    unet, scheduler = model.unet, model.scheduler
    with atomic_output(path) as tmp:
        tmp.mkdir(parents=True)
        unet.save_pretrained(tmp / "unet")
        scheduler.save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": _pipeline_class(model.kind),
            "_diffusers_version": unet.config.get("_diffusers_version", ""),
            "unet": ["diffusers", type(unet).__name__],
            "scheduler": ["diffusers", type(scheduler).__name__],
        }
        parts = {
            model.vae_folder: model.vae,
            "text_encoder": model.text_encoder,
            "tokenizer": model.tokenizer,
        }
        for folder, part in parts.items():
            if part is not None:
                part.save_pretrained(tmp / folder)
                library = "diffusers" if folder in VAE_FOLDERS else "transformers"
                index[folder] = [library, type(part).__name__]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / KIND_FILE).write_text(json.dumps(model.kind.as_record(), indent=2) + "\n")


def _pipeline_class(kind: ModelKind) -> str:
    if kind.condition == "text":
        return "StableDiffusionPipeline"
    if kind.condition == "none":
        return "LDMPipeline" if kind.latent else "DDPMPipeline"
    return "DiffusionPipeline"


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


@dataclass(frozen=True)
class ModelConfig:
    """params.yaml ``model``: where the diffusion model comes from."""

    # embedded: the digits UNet whose weights the package ships; train: train that UNet from
    # scratch with ``embedded``; pretrained: a local diffusers model directory (``path``)
    source: Literal["embedded", "train", "pretrained"] = "embedded"
    path: str | None = None  # a diffusers pipeline or UNet directory, for source: pretrained
    # source: train trains this recipe; source: embedded checks that it is the shipped weights' one
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    # a class-conditional pretrained model's "no class" label (classifier-free guidance); null: none
    null_class: int | None = None

    def __post_init__(self) -> None:
        if self.source == "pretrained" and not self.path:
            raise ParamError("model.source=pretrained needs model.path: a local diffusers model directory")


# --------------------------------------------------------------------------------------------- model kinds
@dataclass(frozen=True)
class ModelKind:
    """What a diffusion model needs around its UNet: a decoder, a condition, a null condition."""

    latent: bool = False  # x_t are latents that the float VAE decodes
    condition: Literal["none", "class", "text"] = "none"
    num_classes: int | None = None  # class: labels 0..num_classes-1 are the classes to draw
    null_class: int | None = None  # class: the label trained as "no class" (classifier-free guidance)

    @property
    def name(self) -> str:
        """unconditional pixel, latent unconditional, [latent] class-conditional, text-to-image."""
        if self.condition == "text":
            return "text-to-image" if self.latent else "pixel text-to-image"
        if self.condition == "class":
            return "latent class-conditional" if self.latent else "class-conditional"
        return "latent unconditional" if self.latent else "unconditional pixel"

    def as_record(self) -> dict[str, Any]:
        return {"schema": KIND_SCHEMA, "kind": self.name, **dataclasses.asdict(self)}


@dataclass
class DiffusionModel:
    """A diffusion model as the stages use it: the UNet (the part that gets quantized), its
    training noise schedule and the float parts its kind needs."""

    unet: torch.nn.Module
    scheduler: SchedulerMixin
    kind: ModelKind = field(default_factory=ModelKind)
    vae: torch.nn.Module | None = None
    vae_folder: str = "vae"
    text_encoder: torch.nn.Module | None = None
    tokenizer: Any = None

    def to(self, device: torch.device | str) -> DiffusionModel:
        for part in (self.unet, self.vae, self.text_encoder):
            if part is not None:
                part.to(device).eval()
        return self

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in about [-1, 1] from the sampler's output (latents: the float VAE)."""
        if self.vae is None:
            return x0
        vae_device = next(self.vae.parameters()).device
        latents = x0.to(vae_device) / self.vae.config.get("scaling_factor", 1.0)
        return self.vae.decode(latents).sample


def kind_from_unet(unet: torch.nn.Module, latent: bool, null_class: int | None) -> ModelKind:
    """The kind a UNet's config implies (``null_class``: the model's "no class" label, if any)."""
    config = unet.config
    if isinstance(unet, UNet2DConditionModel) and config.get("cross_attention_dim") is not None:
        return ModelKind(latent=latent, condition="text")
    num_class_embeds = config.get("num_class_embeds")
    if num_class_embeds:
        if null_class is not None and not 0 <= null_class < num_class_embeds:
            raise ParamError(
                f"model.null_class={null_class} is not a label of this UNet (num_class_embeds="
                f"{num_class_embeds}); set it to the label the model was trained with as 'no class', or null"
            )
        # the null label is the last embedding by convention; without one every label is a class
        num_classes = num_class_embeds - 1 if null_class == num_class_embeds - 1 else num_class_embeds
        return ModelKind(latent=latent, condition="class", num_classes=num_classes, null_class=null_class)
    if config.get("class_embed_type"):
        raise ArtifactError(
            f"the UNet's class_embed_type={config.class_embed_type!r} takes continuous class inputs; edadm "
            "serves integer class labels (num_class_embeds)"
        )
    return ModelKind(latent=latent)


def load_diffusion_model(
    path: str | Path, param: str = "model.path", null_class: int | None = None
) -> DiffusionModel:
    """The UNet, scheduler and float parts of the model directory ``path``, and its kind.

    The kind is read from ``edadm_model.json`` when the model stage wrote one, else inferred
    from the layout (``null_class`` then names the model's "no class" label). A part the kind
    needs but the directory lacks is an ArtifactError naming the missing folder.
    """
    path = Path(path)
    unet = load_unet(path, param)
    scheduler = load_scheduler(path)
    record_path = path / KIND_FILE
    if record_path.exists():
        record = read_model_json(record_path)
        schema = record.get("schema") if isinstance(record, dict) else None
        if schema != KIND_SCHEMA:
            raise ArtifactError(
                f"{record_path} has schema {schema}, not {KIND_SCHEMA}: rerun the model stage"
            )
        kind = ModelKind(**{f.name: record[f.name] for f in dataclasses.fields(ModelKind)})
    else:
        latent = any((path / folder).exists() for folder in VAE_FOLDERS) or bool(_listed_vae(path))
        kind = kind_from_unet(unet, latent, null_class)
    model = DiffusionModel(unet, scheduler, kind)
    if kind.latent:
        listed = [f for f in VAE_FOLDERS if (path / f).exists()] or _listed_vae(path) or ["vae"]
        model.vae_folder = listed[0]
        model.vae = _load_part(path, model.vae_folder, param, _load_vae)
    if kind.condition == "text":
        from transformers import AutoTokenizer, CLIPTextModel

        model.text_encoder = _load_part(
            path,
            "text_encoder",
            param,
            lambda d: CLIPTextModel.from_pretrained(d, local_files_only=True).eval(),
        )
        model.tokenizer = _load_part(
            path, "tokenizer", param, lambda d: AutoTokenizer.from_pretrained(d, local_files_only=True)
        )
    return model


def _listed_vae(path: Path) -> list[str]:
    """The VAE folders model_index.json names (StableDiffusion: vae; LDMPipeline: vqvae)."""
    index = path / "model_index.json"
    return [f for f in VAE_FOLDERS if f in read_model_json(index)] if index.exists() else []


def _load_part(path: Path, folder: str, param: str, load: Any) -> Any:
    part_dir = path / folder
    if not part_dir.is_dir():
        raise ArtifactError(
            f"{param}={str(path)!r}: this model's UNet needs a {folder}/ folder, which the directory lacks; "
            "save the whole pipeline (DiffusionPipeline.save_pretrained) there"
        )
    return _from_pretrained(part_dir, load)


def _load_vae(vae_dir: Path) -> torch.nn.Module:
    return _load_component(vae_dir, VAE_CLASSES, "", "decodes with")
