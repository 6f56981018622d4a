"""The model stage's library: the shipped embedded weights, embedded training, diffusers
save/load, the pretrained path, and bench/ship_embedded.py that makes the shipped weights."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, UNet2DConditionModel, UNet2DModel
from tiny_models import tiny_cond_unet

import edadm.diffusion.embedded as embedded
from edadm.config import as_dict, from_dict
from edadm.data import digits_images, digits_split
from edadm.diffusion.embedded import (
    EmbeddedConfig,
    load_embedded_weights,
    shipped_weights_paths,
    train_embedded,
)
from edadm.diffusion.loading import (
    DiffusionModel,
    ModelConfig,
    load_scheduler,
    load_unet,
    model_hash,
    save_model,
)
from edadm.errors import ArtifactError, ParamError

ROOT = Path(__file__).resolve().parents[1]


def _script(path: Path) -> ModuleType:
    """A script of the repository (stages/, bench/) as a module, without putting its folder on sys.path."""
    spec = importlib.util.spec_from_file_location(f"_script_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shipped_recipe() -> EmbeddedConfig:
    meta = json.loads(shipped_weights_paths()[1].read_text())
    return from_dict(EmbeddedConfig, meta["recipe"], "model.embedded")


def test_shipped_weights_pass_their_checks_and_run():
    weights, description = shipped_weights_paths()
    meta = json.loads(description.read_text())
    assert meta["dtype"] == "float16" and set(meta["train_log"]) >= {"loss", "loss_steps", "steps"}
    recipe = _shipped_recipe()
    assert meta["recipe"] == as_dict(recipe)  # every field, in params.yaml's spelling
    # log_every changes no weight: a different one still loads
    unet, scheduler, log = load_embedded_weights(dataclasses.replace(recipe, log_every=7))
    assert log["source"] == "embedded (shipped weights)" and log["weights_sha256"] == meta["sha256"]
    assert log["steps"] == recipe.train_steps
    assert all(p.dtype == torch.float32 for p in unet.parameters()) and not unet.training
    assert scheduler.config.num_train_timesteps == recipe.num_train_timesteps
    x = torch.randn(2, 1, recipe.image_size, recipe.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 900])).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    # a trained model predicts the noise of a noised digit far better than chance (MSE 1)
    images, _ = digits_images(recipe.image_size)
    x0, noise, t = (
        torch.from_numpy(images[:64]),
        torch.randn(64, 1, recipe.image_size, recipe.image_size),
        500,
    )
    a = scheduler.alphas_cumprod[t]
    with torch.no_grad():
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, torch.full((64,), t)).sample
    assert torch.mean((pred - noise) ** 2) < 0.5


def test_damaged_shipped_weights_are_an_artifact_error_naming_the_file(tmp_path, monkeypatch):
    weights, description = shipped_weights_paths()
    shutil.copy(description, tmp_path / description.name)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / weights.name).write_bytes(bytes(data))
    monkeypatch.setattr(embedded, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ArtifactError, match="damaged") as err:
        load_embedded_weights(_shipped_recipe())
    message = str(err.value)
    assert str(tmp_path / weights.name) in message
    assert "reinstall" in message and "git checkout" in message and "model.source: train" in message
    (tmp_path / weights.name).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_embedded_weights(_shipped_recipe())


def test_a_changed_recipe_is_a_param_error_naming_the_key_and_both_values():
    recipe = _shipped_recipe()
    changed = dataclasses.replace(recipe, lr=recipe.lr * 2, seed=recipe.seed + 1)
    with pytest.raises(ParamError, match="model.embedded.lr") as err:
        load_embedded_weights(changed)
    message = str(err.value)
    assert f"params {recipe.lr * 2!r}, shipped {recipe.lr!r}" in message and "model.embedded.seed" in message
    assert "set them back" in message and "model.source: train" in message
    assert "batch_size" not in message  # only the keys that differ


def test_the_model_stage_trains_with_source_train_and_loads_with_source_embedded(tiny_config):
    stage = _script(ROOT / "stages" / "model.py")
    tiny = dataclasses.replace(tiny_config, train_steps=6, log_every=3)
    model, log = stage.build_model(ModelConfig(source="train", embedded=tiny), torch.device("cpu"))
    assert log["source"] == "train" and log["steps"] == 6 and log["loss_steps"] == [3, 6]
    assert tuple(model.unet.config.block_out_channels) == tiny.block_out_channels
    assert model.kind.name == "unconditional pixel"
    model, log = stage.build_model(ModelConfig(embedded=_shipped_recipe()), torch.device("cpu"))
    assert log["source"] == "embedded (shipped weights)"
    assert from_dict(ModelConfig, {"source": "train"}, "model").source == "train"
    with pytest.raises(ParamError, match="model.source"):
        from_dict(ModelConfig, {"source": "trained"}, "model")


def test_ship_embedded_writes_files_the_loader_accepts(tmp_path, tiny_config, tiny_unet, tiny_scheduler):
    ship = _script(ROOT / "bench" / "ship_embedded.py")
    save_model(DiffusionModel(tiny_unet, tiny_scheduler), tmp_path / "model")
    (tmp_path / "train.json").write_text(
        json.dumps({"loss": [1.0, 0.9, 0.8], "loss_steps": [2, 4, 6], "steps": 6, "model_hash": "x"})
    )
    sets = [
        a
        for k, v in as_dict(tiny_config).items()
        for a in ("--recipe-set", f"model.embedded.{k}={json.dumps(v)}")
    ]
    args = [str(tmp_path / "model"), *sets, "--train-log", str(tmp_path / "train.json")]
    ship.main([*args, "--out", str(tmp_path / "w")])
    unet, _, log = load_embedded_weights(tiny_config, tmp_path / "w")
    assert (
        log["loss"] == [1.0, 0.9] and log["loss_steps"] == [2, 4] and log["steps"] == tiny_config.train_steps
    )
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, tiny_unet(x, t).sample, atol=1e-2, rtol=1e-2)
    # a rerun gives the same bytes: a new snapshot is the only reason for a diff
    ship.main([*args, "--out", str(tmp_path / "again")])
    for name in ("embedded_digits.safetensors", "embedded_digits.json"):
        assert (tmp_path / "w" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    # a recipe whose UNet is another shape is refused
    with pytest.raises(ArtifactError, match="not the embedded UNet of the recipe"):
        ship.ship(
            tmp_path / "model",
            dataclasses.replace(tiny_config, block_out_channels=(8, 16, 32)),
            tmp_path / "x",
        )
    with pytest.raises(SystemExit) as exit_:
        ship.main([str(tmp_path / "model"), "--recipe-set", "quant.w_bits=8", "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2 and not (tmp_path / "x").exists()


def test_digits_are_scaled_and_split_deterministically():
    images, labels = digits_images(16)
    assert images.shape == (1797, 1, 16, 16) and images.dtype == np.float32
    assert images.min() >= -1 and images.max() <= 1 and labels.max() == 9
    (a, _), (b, _) = digits_split(0)
    (c, _), (d, _) = digits_split(0)
    assert len(a) + len(b) == 1797 and np.array_equal(a, c) and np.array_equal(b, d)


def test_a_few_training_steps_lower_the_loss_and_are_reproducible(tiny_config):
    images, _ = digits_images(tiny_config.image_size)
    config = EmbeddedConfig(**{**tiny_config.__dict__, "train_steps": 30, "batch_size": 32, "log_every": 10})
    unet, scheduler, log = train_embedded(images, config, torch.device("cpu"))
    assert log["steps"] == 30 and len(log["loss"]) == 3
    assert log["loss"][-1] < log["loss"][0]
    again, _, _ = train_embedded(images, config, torch.device("cpu"))
    assert model_hash(unet) == model_hash(again)
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"


def test_save_load_round_trip_is_exact(tmp_path, tiny_unet, tiny_scheduler):
    save_model(DiffusionModel(tiny_unet, tiny_scheduler), tmp_path / "model")
    assert (tmp_path / "model" / "model_index.json").exists()
    loaded = load_unet(tmp_path / "model")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.equal(tiny_unet(x, t).sample, loaded(x, t).sample)
    assert load_scheduler(tmp_path / "model").config.beta_end == tiny_scheduler.config.beta_end
    # the standard diffusers pipeline reads what we wrote
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "model")
    assert isinstance(pipeline.unet, UNet2DModel)


def test_pretrained_path_accepts_a_diffusers_pipeline_and_a_bare_unet(tmp_path, tiny_unet, tiny_scheduler):
    DDPMPipeline(unet=tiny_unet, scheduler=tiny_scheduler).save_pretrained(tmp_path / "pipe")
    tiny_unet.save_pretrained(tmp_path / "bare")
    for path in (tmp_path / "pipe", tmp_path / "bare"):
        assert model_hash(load_unet(path)) == model_hash(tiny_unet)
    cond = tiny_cond_unet()
    cond.save_pretrained(tmp_path / "cond")
    assert isinstance(load_unet(tmp_path / "cond"), UNet2DConditionModel)


def test_bad_model_paths_get_errors_naming_the_param(tmp_path):
    with pytest.raises(ArtifactError, match="model.path"):
        load_unet(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(ArtifactError, match="not a diffusers model"):
        load_unet(tmp_path / "junk")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ArtifactError, match="AutoencoderKL"):
        load_unet(tmp_path / "vae")
    with pytest.raises(ParamError, match="model.path"):
        from_dict(ModelConfig, {"source": "pretrained"}, "model")
    with pytest.raises(ParamError, match="model.embedded.train_step"):
        from_dict(ModelConfig, {"embedded": {"train_step": 3}}, "model")
    with pytest.raises(ParamError, match="model.embedded.lr"):
        from_dict(ModelConfig, {"embedded": {"lr": -1}}, "model")
