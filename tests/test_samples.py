"""Evaluation samples: per-image seeds make FP and quantized samples paired, whatever the batch."""

from __future__ import annotations

import numpy as np
import torch

from edadm.diffusion.samples import SampleConfig, generate_samples, load_samples
from edadm.diffusion.sampling import SamplerConfig
from edadm.inspect import describe
from edadm.plots import save_grids_side_by_side


def test_samples_depend_on_seed_not_on_batch_size(tmp_path, tiny_unet, tiny_scheduler):
    sampler = SamplerConfig(steps=4)
    cpu = torch.device("cpu")
    generate_samples(
        tiny_unet, tiny_scheduler, sampler, SampleConfig(n=6, batch_size=4), tmp_path / "a.zarr", cpu
    )
    generate_samples(
        tiny_unet, tiny_scheduler, sampler, SampleConfig(n=6, batch_size=3), tmp_path / "b.zarr", cpu
    )
    generate_samples(tiny_unet, tiny_scheduler, sampler, SampleConfig(n=6, seed=1), tmp_path / "c.zarr", cpu)
    a, seeds_a = load_samples(tmp_path / "a.zarr")
    b, seeds_b = load_samples(tmp_path / "b.zarr")
    c, seeds_c = load_samples(tmp_path / "c.zarr")
    assert a.shape == (6, 1, 8, 8) and np.abs(a).max() <= 1
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.array_equal(seeds_a, seeds_b) and not np.intersect1d(seeds_a, seeds_c).size
    assert not np.allclose(a, c)
    summary = describe(str(tmp_path / "c.zarr"))
    assert "samples: 6 images, seeds 1000003..1000008" in summary and '"seed": 1' in summary
    save_grids_side_by_side([a, c], tmp_path / "grid.png", nrow=3)
    assert (tmp_path / "grid.png").stat().st_size > 0
