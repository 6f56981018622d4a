"""Every model kind through every stage: class-conditional (with guidance), latent, and a
Stable Diffusion layout (text-to-image), each a tiny pipeline saved with ``save_pretrained``.

The stage scripts run in this process (click's test runner) on a tiny params file, in the
order `dvc repro` runs them: model, reference, dump, select, reconstruct, sample (fake and
int), evaluate.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from stage_runner import run_stage
from tiny_pipelines import NULL_CLASS, NUM_CLASSES, save_class_conditional, save_latent, save_text_to_image

from edadm.calib.store import load_calibration
from edadm.diffusion.conditioning import ConditionConfig, Conditioning
from edadm.diffusion.loading import load_diffusion_model
from edadm.errors import ArtifactError, ParamError
from edadm.inspect import describe

ROOT = Path(__file__).resolve().parents[1]


def _params(model_dir: Path, **model: object) -> dict:
    params = yaml.safe_load((ROOT / "tests" / "profiles" / "tiny.yaml").read_text())
    params["model"] = {"source": "pretrained", "path": str(model_dir), **model}
    params["reference"]["classifier"]["epochs"] = 1
    params["sampler"]["steps"] = 4
    params["dump"].update(trajectories=12, batch_size=6)
    params["select"]["size"] = 8
    params["recon"].update(iters=2, batch_size=4, init_batch_size=8, cache_batch_size=8, eval_samples=8)
    params["sample"].update(n=8, batch_size=4)
    return params


SAVERS = {"class": save_class_conditional, "latent": save_latent, "text": save_text_to_image}
KIND_NAMES = {"class": "class-conditional", "latent": "latent unconditional", "text": "text-to-image"}


@pytest.mark.parametrize("kind", sorted(SAVERS))
def test_each_model_kind_runs_through_every_stage(kind, tmp_path, monkeypatch):
    source = SAVERS[kind](tmp_path / "source")
    params = _params(source, null_class=NULL_CLASS if kind == "class" else None)
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params))

    run_stage("model")
    assert f"kind: {KIND_NAMES[kind]}" in describe("artifacts/model")
    run_stage("reference")
    run_stage("dump")
    run_stage("selection")
    run_stage("reconstruct")
    run_stage("sample_fp")
    run_stage("sample_quant")
    run_stage("sample_quant", "--set", "sample.mode=int", "--out", "artifacts/samples/int.zarr")
    run_stage("evaluate")

    dump = zarr.open_group("artifacts/trajectories.zarr", mode="r")
    calib = load_calibration("artifacts/calib.zarr")
    fp, quant, integer = (
        zarr.open_group(f"artifacts/samples/{n}.zarr", mode="r") for n in ("fp", "quant", "int")
    )
    metrics = yaml.safe_load(Path("metrics/eval.json").read_text())
    assert fp["images"].shape == (8, 1, 16, 16)  # latent models: the float VAE's decoding

    if kind == "latent":
        assert dump["x"].shape[2:] == (2, 8, 8)  # x_t are latents
        assert "condition" not in dump and fp.attrs["condition"] is None
        assert calib.class_labels is None and calib.encoder_hidden_states is None
    else:
        # each trajectory and image draws a condition; FP and quantized share them
        assert dump["condition"].shape == (12,)
        np.testing.assert_array_equal(fp["conditions"][:], quant["conditions"][:])
        np.testing.assert_array_equal(fp["conditions"][:], integer["conditions"][:])
        # under guidance every selected x_t is calibrated with its condition and with the null one
        half = len(calib) // 2
        torch.testing.assert_close(calib.x[:half], calib.x[half:])
    if kind == "class":
        assert fp.attrs["condition"]["guidance_scale"] == 3.0  # the paper's for class models
        assert set(calib.class_labels[: len(calib) // 2].tolist()) <= set(range(NUM_CLASSES))
        assert set(calib.class_labels[len(calib) // 2 :].tolist()) == {NULL_CLASS}
        assert 0.0 <= metrics["quant"]["class_consistency"] <= 1.0
    if kind == "text":
        assert fp.attrs["condition"]["guidance_scale"] == 7.5
        assert dump["prompt_embeddings"].shape == (100, 8, 8)  # the bundled prompts, embedded once
        half = len(calib) // 2
        null = torch.from_numpy(np.asarray(dump["null_embedding"]))
        torch.testing.assert_close(calib.encoder_hidden_states[half:], null.expand(half, -1, -1))
        assert metrics["quant"]["clip_score"] is None  # no reference.clip_path
    assert 0.0 < metrics["quant"]["ssim_vs_fp"] <= 1.0

    # integer kernels: the same codes as fake quantization, up to a code that float round-off
    # flips and the steps carry (edadm.deploy.integer): far closer to fake quant than it is to FP
    assert _psnr(integer["images"][:], quant["images"][:]) > _psnr(quant["images"][:], fp["images"][:]) + 5.0


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(4.0 / max(float(np.mean((a - b) ** 2)), 1e-20)))  # [-1, 1]: peak-to-peak 2


def test_a_pipeline_without_a_part_its_kind_needs_names_the_missing_folder(tmp_path):
    path = save_text_to_image(tmp_path / "sd")
    shutil.rmtree(path / "text_encoder")
    with pytest.raises(ArtifactError, match=r"text_encoder/ folder"):
        load_diffusion_model(path)
    latent = save_latent(tmp_path / "ldm")
    shutil.rmtree(latent / "vqvae")
    with pytest.raises(ArtifactError, match=r"vqvae/ folder"):
        load_diffusion_model(latent)


def test_conditions_are_drawn_per_item_whatever_the_batch(tmp_path):
    model = load_diffusion_model(save_class_conditional(tmp_path / "c"), null_class=NULL_CLASS)
    conditioning = Conditioning(model, ConditionConfig(classes=(0, 2), seed=5))
    seeds = np.arange(40)
    drawn = conditioning.draw(seeds)
    np.testing.assert_array_equal(drawn[10:20], conditioning.draw(seeds[10:20]))
    assert set(drawn.tolist()) == {0, 1}  # indices into (0, 2)
    assert not np.array_equal(drawn, Conditioning(model, ConditionConfig(classes=(0, 2), seed=6)).draw(seeds))
    batch = conditioning.batch(drawn[:4], "cpu")
    assert batch.cond["class_labels"].tolist() == [(0, 2)[i] for i in drawn[:4]]
    assert batch.uncond["class_labels"].tolist() == [NULL_CLASS] * 4 and batch.scale == 3.0


def test_condition_params_out_of_reach_are_clear_errors(tmp_path):
    classes = load_diffusion_model(save_class_conditional(tmp_path / "c"), null_class=NULL_CLASS)
    with pytest.raises(ParamError, match=r"condition.classes has \[3\]"):
        Conditioning(classes, ConditionConfig(classes=(0, 3)))
    no_null = load_diffusion_model(tmp_path / "c")  # no model.null_class: guidance impossible
    with pytest.raises(ParamError, match="model.null_class"):
        Conditioning(no_null, ConditionConfig(guidance_scale=3.0))
    assert Conditioning(no_null, ConditionConfig(guidance_scale=1.0)).batch([0], "cpu").uncond is None
    with pytest.raises(ParamError, match="condition.prompts"):
        Conditioning(
            load_diffusion_model(save_text_to_image(tmp_path / "t")), ConditionConfig(prompts="nope.txt")
        )
