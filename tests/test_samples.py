"""Evaluation samples: per-image seeds make FP and quantized samples paired, whatever the batch."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

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
    picture = np.asarray(Image.open(tmp_path / "grid.png"))
    # Each panel: 2 rows x 3 columns of 8x8 images scaled 4x, 1-pixel padding -> 67 x 100;
    # two panels with an 8-pixel gap -> 67 x 208.
    assert picture.shape == (67, 208)
    first = np.clip((a[0, 0] + 1) * 127.5, 0, 255).astype(np.uint8).repeat(4, axis=0).repeat(4, axis=1)
    np.testing.assert_array_equal(picture[1:33, 1:33], first)  # sample 0 of FP, top left
