"""``edadm.load``: a quantized denoiser from disk, ready to drop into its diffusers pipeline.

Reads either artifact a run leaves: the reconstruct stage's directory (``artifacts/quant``,
with the float model it was made for, ``artifacts/model``) or an ``edadm export`` file
(``artifacts/export/model.safetensors``, self-contained). The result is the diffusers model
class the pipeline expects (``UNet2DModel``, ``UNet2DConditionModel``) with its Conv2d / Linear
layers quantized, so ``pipe.unet = edadm.load(path)`` is all a pipeline needs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edadm.deploy.export import load_exported
from edadm.deploy.integer import to_integer
from edadm.errors import ArtifactError
from edadm.quant.state import load_quant_model


def load(
    path: str | Path,
    model_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    *,
    integer: bool = False,
    backend: str = "auto",
) -> nn.Module:
    """The quantized denoiser stored at ``path``, in eval mode on ``device``.

    Args:
        path: a reconstruct artifact directory (holding ``manifest.json`` and
            ``state.safetensors``) or an export file (``*.safetensors``).
        model_dir: for a reconstruct directory, the float diffusers pipeline directory it was
            made from (default: ``model`` beside it, as ``artifacts/quant`` and
            ``artifacts/model``); its weights are checked against the manifest's hash. Not
            used for an export.
        device: where the model lives.
        integer: put the quantized layers on integer kernels (``edadm.deploy.integer``, as
            ``sample.mode: int``); default: fake quantization.
        backend: the integer backend (``auto``, ``onednn``, ``int_mm``).

    Raises:
        ArtifactError: ``path`` is neither artifact, or is damaged, or ``model_dir`` is missing
            or holds other weights; the message names the file and the fix.
    """
    path = Path(path)
    if path.is_file():
        model = load_exported(path, device)
    elif (path / "manifest.json").is_file():
        model_dir = Path(model_dir) if model_dir is not None else path.parent / "model"
        if not model_dir.exists():
            raise ArtifactError(
                f"{path} is a reconstruct artifact: loading it needs the float model it was made from, "
                f"and {model_dir} does not exist; pass model_dir= (the model stage's output)"
            )
        model = load_quant_model(model_dir, path, device)
    elif not path.exists():
        raise ArtifactError(f"{path} not found: pass a reconstruct directory or an export file")
    else:
        raise ArtifactError(
            f"{path} is neither a reconstruct artifact (a directory with manifest.json, made by "
            "`dvc repro reconstruct`) nor an export (a .safetensors file, made by `edadm export`)"
        )
    if integer:
        to_integer(model, backend)
    return model.eval()
