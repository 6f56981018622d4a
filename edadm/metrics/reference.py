"""The ``reference`` stage's library: what samples are compared against.

``build_reference`` writes a directory (atomically) holding:

- ``reference.json``: schema, extractor name, feature dims, classifier accuracy, number of real
  images, ``is_real`` (the real images' IS: the ceiling to read samples' IS against), the
  params, and for the digits default ``fd_real_vs_train`` / ``sfid_real_vs_train``, the
  FD / sFID between the real (test) and the training digits' features: about the floor a
  perfect generator reaches against this reference;
- ``stats.npz``: ``mu``, ``sigma`` of the real images' features, ``spatial_mu``,
  ``spatial_sigma`` for sFID, and ``real_features`` for precision/recall (float32 ``[N, D]``);
  keys are absent when the real data give no value for them (a precomputed .npz without spatial
  statistics, say);
- digits only: ``classifier.safetensors`` and ``classifier.json`` (its config). The Inception
  weights are not copied (~100 MB): ``reference.json`` records their path and SHA-256.

The directory is a DVC out: it holds nothing that changes from run to run on one machine
(no wall-clock seconds, dates, hosts or resolved paths), so the same params give the same
files. Timings are logged, and returned to the caller through ``timings``.

``load_extractor`` and ``load_reference_stats`` read it back; ``edadm.metrics.evaluation``
scores samples against it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from edadm.artifacts import atomic_output, file_sha256, read_json, write_json
from edadm.config import as_dict, from_dict
from edadm.data import digits_split
from edadm.errors import ArtifactError, ParamError
from edadm.metrics.classifier import IMAGE_SIZE, ClassifierConfig, DigitsClassifier, train_classifier
from edadm.metrics.extractors import FeatureExtractor, extract_all
from edadm.metrics.frechet import feature_stats, frechet_distance
from edadm.metrics.inception import WEIGHTS_PARAM, WEIGHTS_URL, load_fid_inception
from edadm.metrics.scores import inception_score

logger = logging.getLogger(__name__)

SECTION = "reference"
STAGE = "reference"
SCHEMA = "reference"
SCHEMA_VERSION = 1
REFERENCE_JSON = "reference.json"
STATS_NPZ = "stats.npz"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_JSON = "classifier.json"
# Spellings of the statistics accepted in a user's precomputed .npz: ours, and guided-diffusion's
# reference batches (mu_s / sigma_s are their sFID statistics). pytorch-fid writes mu / sigma.
SPATIAL_KEYS = (("spatial_mu", "spatial_sigma"), ("mu_s", "sigma_s"))


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """What the metrics compare against (``reference`` in params.yaml).

    extractor: ``digits`` trains the small classifier on the embedded digits (the default);
        ``inception`` uses the standard FID Inception-v3, for real RGB data sets.
    inception_weights: local path of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
        (needed for ``inception``; never downloaded).
    real_stats: optional precomputed .npz with ``mu``/``sigma`` (and optionally ``mu_s``/
        ``sigma_s`` or ``spatial_mu``/``spatial_sigma``) of a real data set's Inception features,
        e.g. pytorch-fid's or guided-diffusion's reference statistics (``inception`` only).
    classifier: how the digits classifier is trained (``digits`` only).
    clip_path: optional local directory holding a ``CLIPModel`` and its processor saved with
        ``save_pretrained``, for the CLIP score of text-to-image samples (``edadm.metrics.clip``;
        never downloaded). Read by the evaluate stage only: the reference directory does not
        depend on it.
    """

    extractor: Literal["digits", "inception"] = "digits"
    inception_weights: str | None = None
    real_stats: str | None = None
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    clip_path: str | None = None

    def __post_init__(self) -> None:
        if self.extractor not in ("digits", "inception"):
            raise ParamError(
                f"param {SECTION}.extractor={self.extractor!r} must be one of 'digits', 'inception'"
            )
        if self.extractor == "inception" and self.inception_weights is None:
            raise ParamError(
                f"param {WEIGHTS_PARAM} is required when {SECTION}.extractor is 'inception': set it to a "
                f"local copy of {WEIGHTS_URL} (nothing is downloaded at run time)"
            )
        if self.extractor == "digits" and self.real_stats is not None:
            raise ParamError(
                f"param {SECTION}.real_stats applies to {SECTION}.extractor: inception; the digits reference "
                f"computes its statistics from the held-out digits, so set {SECTION}.real_stats to null"
            )


def reference_config(params: dict[str, Any] | None) -> ReferenceConfig:
    """``ReferenceConfig`` from the ``reference`` section of params.yaml."""
    return from_dict(ReferenceConfig, params, SECTION)


# ---------------------------------------------------------------------------------------------
# Building the reference
# ---------------------------------------------------------------------------------------------
def build_reference(
    config: ReferenceConfig,
    out_dir: str | Path,
    real_images: np.ndarray | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Train (digits) or load (inception) the extractor and write the reference to ``out_dir``.

    ``real_images: [N, C, H, W]`` in [-1, 1] are the real data whose features the samples are
    compared with. For ``digits`` they default to the test split of
    ``digits_split(classifier.seed, classifier.test_fraction)`` (images the classifier never
    saw). For ``inception`` give them, or ``real_stats``, or both (then ``real_stats`` gives the
    Frechet statistics, and the images the precision/recall features and, when the .npz has
    none, the sFID statistics).
    Returns the contents of ``reference.json``. ``out_dir`` is replaced atomically.
    ``timings``, when given, receives the seconds of the digits classifier's training
    (``classifier_seconds``); timings are logged and kept out of the directory, a DVC out.
    """
    started = time.perf_counter()
    info: dict[str, Any] = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "extractor": config.extractor}
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        # 1. the extractor
        if config.extractor == "digits":
            classifier_started = time.perf_counter()
            extractor, digits_info = _build_digits_classifier(config.classifier, tmp, device)
            info.update(digits_info)
            if timings is not None:
                timings["classifier_seconds"] = round(time.perf_counter() - classifier_started, 1)
            if real_images is None:
                _, (real_images, _) = digits_split(
                    config.classifier.seed, config.classifier.test_fraction, IMAGE_SIZE
                )
        else:
            extractor = load_fid_inception(config.inception_weights, device)
            info["inception_weights"] = str(config.inception_weights)
            info["inception_sha256"] = file_sha256(config.inception_weights)
            if real_images is None and config.real_stats is None:
                raise ParamError(
                    f"{SECTION}.extractor is 'inception' but there are no real images to compare "
                    f"with: set param {SECTION}.real_stats to a precomputed .npz (mu, sigma) or give the "
                    "stage real images"
                )
        # Read a precomputed .npz before the (possibly long) feature extraction: fail fast.
        precomputed = _read_real_stats(config.real_stats, extractor) if config.real_stats else {}
        info.update(
            feature_dim=extractor.feature_dim,
            spatial_dim=extractor.spatial_dim,
            num_classes=extractor.num_classes,
        )

        # 2. statistics of the real images' features
        stats: dict[str, np.ndarray] = {}
        info["n_real"] = 0
        if real_images is not None:
            real = extract_all(extractor, real_images, batch_size, desc="real features")
            stats["mu"], stats["sigma"] = feature_stats(real.features)
            stats["spatial_mu"], stats["spatial_sigma"] = feature_stats(real.spatial)
            stats["real_features"] = real.features
            info["n_real"] = len(real_images)
            if real.logits is not None:
                # 10 splits, as evaluate.is_splits by default, so samples' IS reads against it.
                info["is_real"] = inception_score(real.logits, splits=min(10, len(real_images)))[0]
        if precomputed:
            stats.update(precomputed)
            info["real_stats"] = str(config.real_stats)
        if config.extractor == "digits":
            info.update(_digits_floor(config.classifier, extractor, stats, batch_size))
        np.savez(tmp / STATS_NPZ, **stats)

        # clip_path is the evaluate stage's: keeping it out leaves this DVC out the same bytes.
        info["params"] = {key: value for key, value in as_dict(config).items() if key != "clip_path"}
        write_json(tmp / REFERENCE_JSON, info)
    logger.info(
        "reference (%s, %d real images) written to %s in %.1f s",
        config.extractor,
        info["n_real"],
        out_dir,
        time.perf_counter() - started,
    )
    return info


def _build_digits_classifier(
    config: ClassifierConfig, out_dir: Path, device: torch.device | str
) -> tuple[DigitsClassifier, dict[str, Any]]:
    """Train the digits classifier and save it (safetensors + its config) into ``out_dir``."""
    model, report = train_classifier(config, device)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out_dir / CLASSIFIER_WEIGHTS))
    write_json(out_dir / CLASSIFIER_JSON, {"architecture": type(model).__name__, "config": as_dict(config)})
    return model, {
        "test_accuracy": report["test_accuracy"],
        "train_accuracy": report["train_accuracy"],
    }


def _digits_floor(
    config: ClassifierConfig, extractor: FeatureExtractor, stats: dict[str, np.ndarray], batch_size: int
) -> dict[str, float]:
    """FD and sFID between the real reference images and the classifier's training digits.

    Two samples of the same distribution still differ by a finite-sample bias: this is about
    the lowest FD a generator can reach against a reference of this size, a floor to read the
    samples' FD against.
    """
    (x_train, _), _ = digits_split(config.seed, config.test_fraction, IMAGE_SIZE)
    train = extract_all(extractor, x_train, batch_size, desc="train features")
    return {
        "fd_real_vs_train": frechet_distance(*feature_stats(train.features), stats["mu"], stats["sigma"]),
        "sfid_real_vs_train": frechet_distance(
            *feature_stats(train.spatial), stats["spatial_mu"], stats["spatial_sigma"]
        ),
    }


def _read_real_stats(path: str, extractor: FeatureExtractor) -> dict[str, np.ndarray]:
    """``mu``, ``sigma`` (and spatial statistics when present) from a user's precomputed .npz."""
    param = f"{SECTION}.real_stats"
    if not Path(path).is_file():
        raise ParamError(
            f"param {param}={path!r}: file not found; give a local .npz with arrays mu and sigma"
        )
    try:
        with np.load(path) as npz:
            arrays = {key: np.asarray(npz[key], dtype=np.float64) for key in npz.files if key != "arr_0"}
    except Exception as err:
        raise ParamError(f"param {param}={path!r} could not be read as an .npz ({err})") from err
    dim = extractor.feature_dim
    if "mu" not in arrays or "sigma" not in arrays:
        raise ParamError(f"param {param}={path!r} lacks array mu and/or sigma (it has: {', '.join(arrays)})")
    if arrays["mu"].shape != (dim,) or arrays["sigma"].shape != (dim, dim):
        raise ParamError(
            f"param {param}={path!r} holds statistics of {arrays['mu'].shape} features, "
            f"the {extractor.name} extractor gives [{dim}]: were they computed with another network?"
        )
    stats = {"mu": arrays["mu"], "sigma": arrays["sigma"]}
    for mu_key, sigma_key in SPATIAL_KEYS:
        if mu_key in arrays and sigma_key in arrays:
            if arrays[mu_key].shape != (extractor.spatial_dim,):
                raise ParamError(
                    f"param {param}={path!r}: {mu_key} has shape {arrays[mu_key].shape}, "
                    f"expected [{extractor.spatial_dim}] (first 7 channels of mixed_6/conv)"
                )
            stats["spatial_mu"], stats["spatial_sigma"] = arrays[mu_key], arrays[sigma_key]
            break
    return stats


# ---------------------------------------------------------------------------------------------
# Reading the reference back
# ---------------------------------------------------------------------------------------------
def read_reference(reference_dir: str | Path) -> dict[str, Any]:
    """``reference.json`` of a reference directory, checked to be one this edadm reads."""
    path = Path(reference_dir) / REFERENCE_JSON
    info = read_json(path, STAGE)
    if not isinstance(info, dict) or info.get("schema") != SCHEMA:
        raise ArtifactError(f"{path} is not a reference description; rerun `dvc repro -f {STAGE}`")
    if info.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema version {info.get('schema_version')}, this edadm reads {SCHEMA_VERSION}; "
            f"rerun `dvc repro -f {STAGE}`"
        )
    return info


def load_extractor(reference_dir: str | Path, device: torch.device | str = "cpu") -> FeatureExtractor:
    """The feature extractor the reference in ``reference_dir`` was built with, in eval mode."""
    reference_dir = Path(reference_dir)
    info = read_reference(reference_dir)
    if info["extractor"] == "digits":
        weights = reference_dir / CLASSIFIER_WEIGHTS
        model = DigitsClassifier()
        try:
            model.load_state_dict(load_file(str(weights)))
        except Exception as err:  # missing file, damaged file, other architecture
            raise ArtifactError(
                f"{weights} could not be loaded ({err}); rerun `dvc repro -f {STAGE}`"
            ) from err
        return model.eval().to(device)
    if info["extractor"] == "inception":
        model = load_fid_inception(info["inception_weights"], device)
        if file_sha256(info["inception_weights"]) != info["inception_sha256"]:
            raise ArtifactError(
                f"{info['inception_weights']} has changed since the reference in {reference_dir} was built "
                f"(SHA-256 differs); rerun `dvc repro -f {STAGE}`"
            )
        return model
    raise ArtifactError(f"{reference_dir / REFERENCE_JSON} names an unknown extractor {info['extractor']!r}")


def load_reference_stats(reference_dir: str | Path) -> dict[str, np.ndarray]:
    """The arrays of ``stats.npz`` (see the module docstring for their keys)."""
    path = Path(reference_dir) / STATS_NPZ
    if not path.exists():
        raise ArtifactError(f"{path} not found: it is made by the '{STAGE}' stage (run `dvc repro {STAGE}`)")
    try:
        with np.load(path) as npz:
            return {key: npz[key] for key in npz.files}
    except Exception as err:
        raise ArtifactError(f"{path} could not be read ({err}); rerun `dvc repro -f {STAGE}`") from err
