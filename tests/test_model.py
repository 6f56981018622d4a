"""The model stage's library: embedded training, diffusers save/load, the pretrained path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, UNet2DConditionModel, UNet2DModel
from tiny_models import tiny_cond_unet

from edadm.artifacts import ArtifactError
from edadm.config import ParamError, from_dict
from edadm.data import digits_images, digits_split
from edadm.diffusion.embedded import EmbeddedConfig, train_embedded
from edadm.diffusion.loading import ModelConfig, load_scheduler, load_unet, model_hash, save_model


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
    save_model(tiny_unet, tiny_scheduler, tmp_path / "model")
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
