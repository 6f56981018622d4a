"""Shared fixtures: tiny models built in the test, never downloaded."""

from __future__ import annotations

import pytest
import torch

from edadm.diffusion.embedded import EmbeddedConfig, build_embedded_scheduler, build_embedded_unet

# Tests share 2 cores: one torch thread each keeps runs predictable.
torch.set_num_threads(1)

TINY = EmbeddedConfig(
    train_steps=4, batch_size=8, warmup_steps=2, block_out_channels=(8, 16, 16), image_size=8, log_every=2
)


@pytest.fixture(scope="session")
def tiny_config() -> EmbeddedConfig:
    return TINY


@pytest.fixture()
def tiny_unet():
    torch.manual_seed(0)
    return build_embedded_unet(TINY).eval()


@pytest.fixture()
def tiny_scheduler():
    return build_embedded_scheduler(TINY)
