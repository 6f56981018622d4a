"""The trajectory dump: a real Zarr v3 store from a tiny UNet, its schema and its failure modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from edadm.artifacts import TRAJECTORIES, open_store, read_array
from edadm.diffusion.hooks import InputRecorder
from edadm.diffusion.sampling import SamplerConfig, sample
from edadm.diffusion.trajectories import DumpConfig, dump_trajectories
from edadm.errors import ArtifactError, ParamError

LAYER = "mid_block.attentions.0"
SAMPLER = SamplerConfig(steps=5)


def _dump(unet, scheduler, path, **overrides):
    config = DumpConfig(**{"trajectories": 6, "batch_size": 4, **overrides})
    dump_trajectories(unet, scheduler, SAMPLER, config, LAYER, path, torch.device("cpu"))
    return open_store(path, TRAJECTORIES)


def test_dump_writes_every_step_and_the_hooked_features(tmp_path, tiny_unet, tiny_scheduler):
    store = _dump(tiny_unet, tiny_scheduler, tmp_path / "traj.zarr", feature_batch=5)
    x, t = store["x"][...], store["t"][...]
    assert x.shape == (5, 6, 1, 8, 8) and x.dtype == np.float16
    assert list(t) == [800, 600, 400, 200, 0]
    assert store["features"].shape == (5, 5, 16, 2, 2)
    assert store.attrs["feature_layer"] == LAYER and len(store.attrs["model_hash"]) == 64

    # Recompute trajectory 0 directly: x_t and the mid-block attention input must match the store.
    noise = torch.randn((6, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    seen_x, seen_f = [], []
    with InputRecorder(tiny_unet, LAYER) as recorder:

        def on_step(i, t_value, x_t):
            if i:
                seen_f.append(recorder.last[:1].clone())
            seen_x.append(x_t[:1].clone())

        x0 = sample(tiny_unet, tiny_scheduler, noise[:4], SAMPLER, on_step=on_step)
        seen_f.append(recorder.last[:1].clone())
    np.testing.assert_allclose(x[:, 0].astype(np.float32), torch.cat(seen_x).numpy(), atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(
        store["features"][:, 0].astype(np.float32), torch.cat(seen_f).numpy(), atol=2e-3, rtol=1e-3
    )
    np.testing.assert_allclose(store["x0"][0], x0[0].numpy(), atol=1e-5)


def test_same_seed_same_store_and_batch_size_does_not_matter(tmp_path, tiny_unet, tiny_scheduler):
    a = _dump(tiny_unet, tiny_scheduler, tmp_path / "a.zarr")
    again = _dump(tiny_unet, tiny_scheduler, tmp_path / "again.zarr")
    b = _dump(tiny_unet, tiny_scheduler, tmp_path / "b.zarr", batch_size=3)
    c = _dump(tiny_unet, tiny_scheduler, tmp_path / "c.zarr", seed=1)
    assert np.array_equal(a["x"][...], again["x"][...])  # same params: bitwise the same store
    assert np.array_equal(a["features"][...], again["features"][...])
    # Another batch size: the same trajectories (per-trajectory noise), up to float rounding, which
    # some CPUs' kernels (seen on AMD EPYC, not on Intel Xeon) change with the batch's shape.
    np.testing.assert_allclose(a["x"][...].astype(np.float32), b["x"][...].astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(
        a["features"][...].astype(np.float32), b["features"][...].astype(np.float32), atol=2e-3, rtol=1e-3
    )
    assert not np.allclose(a["x"][...].astype(np.float32), c["x"][...].astype(np.float32), atol=0.1)


def test_a_killed_dump_leaves_no_store(tmp_path, tiny_unet, tiny_scheduler, monkeypatch):
    import edadm.diffusion.trajectories as trajectories

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trajectories, "finish_store", killed)
    with pytest.raises(KeyboardInterrupt):
        _dump(tiny_unet, tiny_scheduler, tmp_path / "traj.zarr")
    assert list(tmp_path.iterdir()) == []


def test_missing_layer_names_the_param(tmp_path, tiny_unet, tiny_scheduler):
    config = DumpConfig(trajectories=2, batch_size=2)
    with pytest.raises(ParamError, match=r"select.tdac.feature_layer.*mid_block.attentions.0"):
        dump_trajectories(
            tiny_unet,
            tiny_scheduler,
            SAMPLER,
            config,
            "mid_block.nope",
            tmp_path / "t.zarr",
            torch.device("cpu"),
        )


def test_bad_stores_get_errors_naming_the_file_and_the_stage(tmp_path, tiny_unet, tiny_scheduler):
    with pytest.raises(ArtifactError, match=r"missing.zarr not found.*dvc repro dump"):
        open_store(tmp_path / "missing.zarr", TRAJECTORIES)
    other = zarr.open_group(store=str(tmp_path / "other.zarr"), mode="w")
    other.attrs.update({"edadm_schema": "samples", "schema_version": 1, "complete": True})
    with pytest.raises(ArtifactError, match="holds a 'samples' store"):
        open_store(tmp_path / "other.zarr", TRAJECTORIES)
    store = _dump(tiny_unet, tiny_scheduler, tmp_path / "traj.zarr")
    store = zarr.open_group(store=str(tmp_path / "traj.zarr"), mode="r+")
    store.attrs["schema_version"] = 99
    with pytest.raises(ArtifactError, match="schema version 99"):
        open_store(tmp_path / "traj.zarr", TRAJECTORIES)
    store.attrs["schema_version"] = 1
    # truncate: delete the chunks of x
    import shutil

    shutil.rmtree(tmp_path / "traj.zarr" / "x" / "c")
    with pytest.raises(ArtifactError, match=r"traj.zarr/x could not be read|truncated"):
        group = open_store(tmp_path / "traj.zarr", TRAJECTORIES)
        read_array(group, "x", tmp_path / "traj.zarr", "dump")
