"""The class-conditional embedded model (``model.embedded.conditioning: class``): its UNet, label
dropout, training, shipped weights, and the guided sampler of bench/training_curve.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import edadm.diffusion.embedded as embedded
from edadm.config import from_dict, load_params, load_section
from edadm.data import digits_split
from edadm.diffusion.embedded import (
    NULL_LABEL,
    NUM_CLASSES,
    EmbeddedConfig,
    build_embedded_unet,
    drop_labels,
    load_embedded_weights,
    shipped_weights_paths,
    train_embedded,
)
from edadm.diffusion.loading import DiffusionModel, ModelConfig, kind_from_unet, model_hash, save_model
from edadm.errors import ArtifactError, ParamError

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _script(path: Path) -> ModuleType:
    """A script of the repository (bench/) as a module, without putting its folder on sys.path."""
    spec = importlib.util.spec_from_file_location(f"_script_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits8() -> tuple[np.ndarray, np.ndarray]:
    (images, labels), _ = digits_split(0, size=8)
    return images, labels


@pytest.fixture(scope="module")
def class_config(tiny_config) -> EmbeddedConfig:
    return dataclasses.replace(tiny_config, conditioning="class", train_steps=3, log_every=1)


@pytest.fixture(scope="module")
def class_model(class_config, digits8):
    """A 3-step class model, trained once for the tests that only read it."""
    images, labels = digits8
    unet, scheduler, _ = train_embedded(images, class_config, CPU, labels=labels)
    return unet, scheduler


def test_the_class_unet_takes_digit_labels_and_the_null_label(class_config, tiny_config):
    assert NUM_CLASSES == 10 and NULL_LABEL == 10
    unet = build_embedded_unet(class_config).eval()
    assert unet.config.num_class_embeds == NUM_CLASSES + 1
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 990])
    with torch.no_grad():
        out = unet(x, t, class_labels=torch.tensor([0, 9, NULL_LABEL])).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="class_labels"):
        unet(x, t)
    # the unconditional recipe builds the UNet it always did: no class embedding
    assert build_embedded_unet(tiny_config).class_embedding is None


def test_label_dropout_is_range_checked():
    with pytest.raises(ParamError, match="model.embedded.label_dropout"):
        from_dict(EmbeddedConfig, {"label_dropout": 1.5}, "model.embedded")
    with pytest.raises(ParamError, match="never see a class"):
        EmbeddedConfig(conditioning="class", label_dropout=1.0)
    with pytest.raises(ParamError, match="model.embedded.conditioning"):
        from_dict(EmbeddedConfig, {"conditioning": "text"}, "model.embedded")


def test_drop_labels_uses_the_null_label_at_the_configured_rate():
    labels = torch.arange(20_000) % NUM_CLASSES
    dropped = drop_labels(labels, 0.1, torch.Generator().manual_seed(0))
    is_null = dropped == NULL_LABEL
    # binomial(20000, 0.1): standard deviation 0.002 of the rate
    assert abs(is_null.float().mean().item() - 0.1) < 0.01
    assert torch.equal(dropped[~is_null], labels[~is_null])  # the others keep their label
    assert torch.equal(dropped, drop_labels(labels, 0.1, torch.Generator().manual_seed(0)))
    assert torch.equal(drop_labels(labels, 0.0, torch.Generator().manual_seed(0)), labels)


def test_class_training_is_deterministic_and_learns_from_the_labels(class_config, class_model, digits8):
    images, labels = digits8
    unet, _ = class_model
    again, _, _ = train_embedded(images, class_config, CPU, labels=labels)
    assert model_hash(unet) == model_hash(again)
    # other labels, other model
    shifted, _, _ = train_embedded(images, class_config, CPU, labels=(labels + 1) % NUM_CLASSES)
    assert model_hash(shifted) != model_hash(unet)
    with pytest.raises(ValueError, match="pass train_embedded the labels"):
        train_embedded(images, class_config, CPU)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        train_embedded(images, class_config, CPU, labels=np.full(len(images), NULL_LABEL))


def test_only_the_embeddings_of_the_given_label_and_the_null_label_are_trained(class_config, digits8):
    """Every image labelled 3, half the labels dropped: rows 3 and NULL_LABEL of the class
    embedding move, the others keep their initial values exactly (they get no gradient)."""
    images, _ = digits8
    config = dataclasses.replace(class_config, label_dropout=0.5)
    unet, _, _ = train_embedded(images, config, CPU, labels=np.full(len(images), 3))
    torch.manual_seed(config.seed)  # the initialisation train_embedded starts from
    initial = build_embedded_unet(config).class_embedding.weight
    moved = (unet.class_embedding.weight != initial).any(dim=1)
    assert moved.nonzero().flatten().tolist() == [3, NULL_LABEL]


def test_the_unconditional_recipe_draws_the_same_random_stream_as_before(tiny_config, digits8):
    """The unconditional run is the one from before the class variant existed: its per-step
    losses (which depend on every batch, noise and timestep drawn) are pinned to the values the
    code before this change gave (Intel Xeon, torch 2.13 CPU, 1 thread; model hash 2db235fd).
    A changed random stream changes them at the first digit; another CPU at the sixth or later."""
    images, labels = digits8
    config = dataclasses.replace(tiny_config, train_steps=3, log_every=1)
    unet, _, log = train_embedded(images, config, CPU)
    np.testing.assert_allclose(
        log["loss"], [1.0936377048492432, 1.1004464626312256, 0.9426248669624329], atol=1e-4
    )
    # labels and label_dropout do not touch the unconditional path
    with_labels, _, _ = train_embedded(
        images, dataclasses.replace(config, label_dropout=0.5), CPU, labels=labels
    )
    assert model_hash(with_labels) == model_hash(unet)


def test_missing_class_weights_are_an_artifact_error_saying_how_to_make_them(
    tmp_path, monkeypatch, class_config
):
    monkeypatch.setattr(embedded, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ArtifactError, match="class-conditional embedded weights") as err:
        load_embedded_weights(class_config)
    message = str(err.value)
    assert str(tmp_path / "embedded_digits_class.safetensors") in message
    assert "model.source: train" in message and "bench/ship_embedded.py" in message
    assert "conditioning=class" in message


def test_shipped_class_weights_load_and_their_recipe_is_checked(tmp_path, class_config, class_model):
    ship = _script(ROOT / "bench" / "ship_embedded.py")
    unet, scheduler = class_model
    kind = kind_from_unet(unet, latent=False, null_class=NULL_LABEL)
    assert (kind.condition, kind.num_classes, kind.null_class) == ("class", NUM_CLASSES, NULL_LABEL)
    save_model(DiffusionModel(unet, scheduler, kind), tmp_path / "model")
    weights, description = ship.ship(tmp_path / "model", class_config, tmp_path / "w")
    assert (weights, description) == shipped_weights_paths(tmp_path / "w", "class")
    assert (
        weights.name == "embedded_digits_class.safetensors"
        and not (tmp_path / "w" / "embedded_digits.json").exists()
    )
    recipe = json.loads(description.read_text())["recipe"]
    assert recipe["conditioning"] == "class" and recipe["label_dropout"] == class_config.label_dropout

    loaded, _, log = load_embedded_weights(class_config, tmp_path / "w")
    assert log["source"] == "embedded (shipped weights)"
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 990]), torch.tensor([2, 7, NULL_LABEL])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, t, class_labels=y).sample, unet(x, t, class_labels=y).sample, atol=1e-2, rtol=1e-2
        )

    # the class recipe's label dropout changes the weights: a mismatch is a ParamError
    with pytest.raises(ParamError, match="model.embedded.label_dropout: params 0.2, shipped 0.1"):
        load_embedded_weights(dataclasses.replace(class_config, label_dropout=0.2), tmp_path / "w")
    # the unconditional recipe reads its own file, which this folder lacks
    with pytest.raises(ArtifactError, match="embedded_digits.safetensors"):
        load_embedded_weights(dataclasses.replace(class_config, conditioning="none"), tmp_path / "w")


def test_the_package_weights_load_with_the_new_fields_at_their_defaults():
    """The shipped unconditional recipe predates conditioning and label_dropout: absent, they
    count as their defaults; label_dropout changes no unconditional weight, so any value loads."""
    meta = json.loads(shipped_weights_paths()[1].read_text())
    recipe = from_dict(EmbeddedConfig, meta["recipe"], "model.embedded")
    assert recipe.conditioning == "none"
    unet, _, _ = load_embedded_weights(dataclasses.replace(recipe, label_dropout=0.3))
    assert unet.class_embedding is None


def test_the_package_ships_the_class_weights_and_they_take_digit_labels():
    """``model.embedded.conditioning: class`` with ``source: embedded`` loads the shipped class model."""
    meta = json.loads(shipped_weights_paths(conditioning="class")[1].read_text())
    recipe = from_dict(EmbeddedConfig, meta["recipe"], "model.embedded")
    # one param selects it: params.yaml's recipe with conditioning: class is the shipped one
    params = load_params(ROOT / "params.yaml", ["model.embedded.conditioning=class"])
    assert recipe == load_section(ModelConfig, "model", params).embedded
    unet, _, log = load_embedded_weights(recipe)
    assert unet.config.num_class_embeds == NUM_CLASSES + 1 and log["weights_sha256"] == meta["sha256"]
    # a trained class model: the label changes the noise prediction
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    with torch.no_grad():
        three, seven = (unet(x, t, class_labels=torch.tensor([y, y])).sample for y in (3, 7))
    assert (three - seven).abs().mean() > 1e-3
