"""Metrics of conditional models and the paired SSIM: SSIM, class consistency, CLIP score, the
conditions of a samples store, and the evaluate stage that reports them.

The CLIP model is a tiny one built and saved here (a CLIP config with 1-layer text and vision
towers, a tokenizer from a vocabulary written here); the digits reference trains its classifier
for 3 epochs (enough to read real digits: 94.7% of the held-out ones), once for the module.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from edadm.artifacts import SAMPLES, create_array, create_store, finish_store
from edadm.data import digits_split
from edadm.errors import ArtifactError
from edadm.metrics.clip import CLIPScorer, clip_score
from edadm.metrics.conditions import SampleConditions, sample_conditions
from edadm.metrics.evaluation import evaluate_samples, reference_class_consistency
from edadm.metrics.reference import build_reference, reference_config
from edadm.metrics.scores import class_consistency
from edadm.metrics.ssim import K1, K2, gaussian_window, ssim_per_image, structural_similarity

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- SSIM
def _ssim_window_by_window(x: np.ndarray, y: np.ndarray, size: int = 11) -> float:
    """SSIM of one [C, H, W] pair in [-1, 1], window position by window position (the definition)."""
    x, y = (x.astype(np.float64) + 1) / 2, (y.astype(np.float64) + 1) / 2
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = K1**2, K2**2
    values = []
    for channel in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                a, b = x[channel, i : i + size, j : j + size], y[channel, i : i + size, j : j + size]
                mu_a, mu_b = (w * a).sum(), (w * b).sum()
                var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
                cov = (w * (a - mu_a) * (b - mu_b)).sum()
                values.append(
                    (2 * mu_a * mu_b + c1)
                    * (2 * cov + c2)
                    / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
                )
    return float(np.mean(values))


def _noisy_pair(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, shape)
    return images, np.clip(images + 0.3 * rng.standard_normal(shape), -1, 1)


def test_ssim_of_identical_images_is_one():
    images = np.random.default_rng(0).uniform(-1, 1, (3, 3, 16, 16))
    np.testing.assert_allclose(ssim_per_image(images, images), 1.0, atol=1e-12)


def test_ssim_of_constant_images_is_their_luminance_term():
    # Constant images have no variance: SSIM = (2ab + C1) / (a^2 + b^2 + C1) on the [0, 1] values.
    a, b = 0.2, 0.7
    x, y = np.full((2, 1, 16, 16), 2 * a - 1), np.full((2, 1, 16, 16), 2 * b - 1)
    expected = (2 * a * b + K1**2) / (a**2 + b**2 + K1**2)  # 0.28 / 0.5301 = 0.52820
    assert structural_similarity(x, y) == pytest.approx(expected, rel=1e-12)


def test_ssim_matches_the_window_by_window_definition():
    x, y = _noisy_pair(1, (2, 3, 14, 13))
    expected = [_ssim_window_by_window(x[k], y[k]) for k in range(2)]
    np.testing.assert_allclose(ssim_per_image(x, y), expected, rtol=1e-10)
    assert gaussian_window(11).sum().item() == pytest.approx(1.0)


def test_ssim_is_symmetric_and_falls_with_noise():
    x, y = _noisy_pair(2, (4, 1, 16, 16))
    assert structural_similarity(x, y) == pytest.approx(structural_similarity(y, x), rel=1e-12)
    less_noisy = np.clip(x + 0.05 * np.random.default_rng(3).standard_normal(x.shape), -1, 1)
    assert structural_similarity(x, y) < structural_similarity(x, less_noisy) < 1.0


def test_ssim_regression_value():
    x, y = _noisy_pair(4, (8, 3, 32, 32))
    # float64 throughout: only summation order differs across CPUs.
    assert structural_similarity(x, y) == pytest.approx(0.8891136501, abs=1e-8)


def test_ssim_of_images_smaller_than_the_window_uses_the_largest_window_that_fits(caplog):
    x, y = _noisy_pair(5, (2, 1, 8, 9))
    with caplog.at_level(logging.WARNING, logger="edadm.metrics.ssim"):
        values = ssim_per_image(x, y)
    assert "7-pixel window" in caplog.text
    np.testing.assert_allclose(
        values, [_ssim_window_by_window(x[k], y[k], size=7) for k in range(2)], rtol=1e-10
    )
    with pytest.raises(ValueError, match="same shape"):
        ssim_per_image(x, y[:1])


# ------------------------------------------------------------------------------------- class consistency
def test_class_consistency_counts_the_classifier_against_the_requested_labels():
    labels = np.array([0, 0, 1, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0, 2])
    logits = np.eye(3)[predicted] * 5.0 + 0.1
    result = class_consistency(logits, labels)
    assert result["class_consistency"] == pytest.approx(4 / 6)
    assert result["class_consistency_per_class"] == pytest.approx({"0": 0.5, "1": 2 / 3, "2": 1.0})
    with pytest.raises(ValueError, match="3 classes"):
        class_consistency(logits, np.array([0, 0, 1, 1, 1, 3]))


def test_class_consistency_is_null_without_a_classifier_of_the_models_classes(caplog):
    conditions = SampleConditions(kind="class", guidance_scale=3.0, index=np.arange(4), labels=(1, 5, 7, 9))
    inception_logits = np.random.default_rng(0).standard_normal((4, 1008))
    with caplog.at_level(logging.WARNING, logger="edadm.metrics.evaluation"):
        result = reference_class_consistency(inception_logits, conditions, "inception")
    assert result == {"class_consistency": None, "class_consistency_per_class": None}
    assert "class_consistency is null" in caplog.text and "inception" in caplog.text


# -------------------------------------------------------------------------------------- digits reference
@pytest.fixture(scope="module")
def digits_reference(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("reference") / "reference"
    build_reference(reference_config({"classifier": {"epochs": 3}}), out_dir)
    return out_dir


@pytest.fixture(scope="module")
def train_digits():
    """200 training digits (not the reference's held-out ones) and their labels."""
    (x_train, y_train), _ = digits_split(0, 0.2)
    return x_train[:200], y_train[:200].astype(np.int64)


def test_evaluate_samples_reports_class_consistency_of_digits(digits_reference, train_digits):
    images, labels = train_digits
    correct = SampleConditions(kind="class", guidance_scale=1.0, index=labels, labels=tuple(range(10)))
    # The same images asked for the next class: a model that ignores its labels.
    wrong = SampleConditions(
        kind="class", guidance_scale=1.0, index=(labels + 1) % 10, labels=tuple(range(10))
    )
    good = evaluate_samples(images, digits_reference, conditions=correct)
    bad = evaluate_samples(images, digits_reference, conditions=wrong)
    # Margins wide enough for another CPU's classifier (3 epochs is not converged).
    assert good["class_consistency"] > 0.85 and bad["class_consistency"] < 0.15
    assert sorted(good["class_consistency_per_class"], key=int) == [str(k) for k in range(10)]
    assert min(good["class_consistency_per_class"].values()) > 0.5
    assert "clip_score" not in good and "ssim_vs_fp" not in good


# --------------------------------------------------------------------------------------------- CLIP score
PROMPT_WORDS = ("a", "digit", "zero", "one", "two", "three", "seven")


def _write_bpe_vocabulary(directory: Path, words: tuple[str, ...]) -> tuple[str, str]:
    """vocab.json and merges.txt of a byte-pair tokenizer that reads each word as one token.

    Each word is merged left to right: (d, i) -> di, (di, g) -> dig, ..., (digi, t</w>) -> digit</w>.
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[str] = []
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        for part in parts:
            vocab.setdefault(part, len(vocab))
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    return str(directory / "vocab.json"), str(directory / "merges.txt")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP model and its processor saved with save_pretrained; returns the directory."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    work = tmp_path_factory.mktemp("clip")
    tokenizer = CLIPTokenizer(*_write_bpe_vocabulary(work, PROMPT_WORDS))
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    path = work / "clip"
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def _prompt_of(label: int) -> str:
    return f"a digit {PROMPT_WORDS[2 + label % 5]}"


def test_tiny_clip_tokenizer_reads_each_word_as_one_token(tiny_clip):
    scorer = CLIPScorer.load(tiny_clip)
    ids = scorer.tokenizer("a digit seven")["input_ids"]
    assert len(ids) == 5 and ids[0] == 0 and ids[-1] == 1 and 1 not in ids[1:-1]


def test_clip_score_matches_a_direct_computation_with_the_processor(tiny_clip, train_digits):
    from transformers import CLIPModel, CLIPProcessor

    images, labels = train_digits
    images, prompts = images[:12], [_prompt_of(int(k)) for k in labels[:12]]
    # 8-bit images, so that the processor (which rescales uint8 by 1/255) sees the same pixels.
    pixels = np.round((images + 1) * 127.5).astype(np.uint8)
    images = pixels.astype(np.float32) / 127.5 - 1
    model = CLIPModel.from_pretrained(tiny_clip, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip, local_files_only=True)
    inputs = processor(
        text=prompts,
        images=[np.repeat(p.transpose(1, 2, 0), 3, axis=2) for p in pixels],  # grey [H, W, 1] -> RGB
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        out = model(**inputs)
    cosine = (out.image_embeds * out.text_embeds).sum(-1).double().numpy()  # pair k: image k, prompt k
    expected = 100 * np.maximum(cosine, 0)

    per_image = CLIPScorer.load(tiny_clip).scores(images, prompts, batch_size=5)
    np.testing.assert_allclose(per_image, expected, rtol=1e-4, atol=1e-4)
    score = clip_score(images, prompts, tiny_clip)
    assert 0.0 <= score <= 100.0 and score == pytest.approx(expected.mean(), abs=1e-4)
    assert (cosine < 0).any() == (per_image == 0).any()  # negative cosines count as 0


def test_clip_score_resizes_larger_images_as_the_processor_does(tiny_clip):
    from transformers import CLIPProcessor

    rng = np.random.default_rng(6)
    # Smooth 40x48 RGB images (bicubic overshoot is small on smooth content), 8-bit values.
    base = rng.uniform(0, 255, (3, 3, 5, 6))
    smooth = torch.nn.functional.interpolate(torch.from_numpy(base), size=(40, 48), mode="bilinear").numpy()
    pixels = np.round(smooth).astype(np.uint8)
    images = pixels.astype(np.float32) / 127.5 - 1
    processor = CLIPProcessor.from_pretrained(tiny_clip, local_files_only=True).image_processor
    expected = processor(images=[p.transpose(1, 2, 0) for p in pixels], return_tensors="pt")["pixel_values"]
    scorer = CLIPScorer.load(tiny_clip)
    ours = scorer.preprocess(torch.from_numpy(images))
    assert ours.shape == expected.shape == (3, 3, 16, 16)
    # PIL resizes and rounds 8-bit pixels, torch floats: they differ by about one level of 255,
    # 1 / 255 / std ~ 0.015 after normalising (measured: 0.0138 at most, 0.004 on average).
    assert (ours - expected).abs().max().item() < 0.02


def test_clip_path_that_holds_no_clip_model_is_an_error_naming_the_param(tiny_clip, tmp_path):
    with pytest.raises(
        ArtifactError, match=r"reference\.clip_path=.*nowhere.*is not a directory.*save_pretrained"
    ):
        CLIPScorer.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match=r"reference\.clip_path=.*empty.*no transformers model config"):
        CLIPScorer.load(tmp_path / "empty")
    from transformers import BertConfig

    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(ArtifactError, match=r"'bert' model, not a CLIP model"):
        CLIPScorer.load(tmp_path / "bert")


# --------------------------------------------------------------------------------------------- sample stores
def _write_samples(
    path: Path, images: np.ndarray, condition: dict | None = None, index: np.ndarray | None = None
) -> Path:
    """A finished samples store as the sample stages write it (seeds 0..n-1)."""
    store = create_store(path, SAMPLES, {"model": "test", "condition": condition})
    create_array(store, "images", images.shape, np.float32, data=images)
    create_array(store, "seeds", (len(images),), np.int64, data=np.arange(len(images)))
    if index is not None:
        create_array(store, "conditions", (len(images),), np.int64, data=index)
    finish_store(store)
    return path


def _class_condition(labels: list[int], scale: float = 3.0) -> dict:
    return {"kind": "class", "guidance_scale": scale, "seed": 0, "labels": labels, "prompts": None}


def test_sample_conditions_reads_class_and_text_stores_and_none_for_unconditional(tmp_path):
    images = np.zeros((4, 1, 16, 16), dtype=np.float32)
    assert sample_conditions(_write_samples(tmp_path / "u.zarr", images)) is None
    none = {"kind": "none", "guidance_scale": 1.0, "labels": None, "prompts": None}
    assert sample_conditions(_write_samples(tmp_path / "n.zarr", images, none)) is None

    classes = sample_conditions(
        _write_samples(tmp_path / "c.zarr", images, _class_condition([3, 8]), np.array([1, 0, 0, 1]))
    )
    assert classes.kind == "class" and classes.guidance_scale == 3.0
    assert classes.class_labels().tolist() == [8, 3, 3, 8]
    text = {"kind": "text", "guidance_scale": 7.5, "labels": None, "prompts": ["a one", "a two"]}
    prompts = sample_conditions(_write_samples(tmp_path / "t.zarr", images, text, np.array([1, 1, 0, 1])))
    assert prompts.image_prompts() == ["a two", "a two", "a one", "a two"]

    out_of_range = _write_samples(
        tmp_path / "bad.zarr", images, _class_condition([3, 8]), np.array([0, 2, 0, 1])
    )
    with pytest.raises(ArtifactError, match=r"indexes \[0, 2\] into 2 labels.*sample_quant"):
        sample_conditions(out_of_range, "sample_quant")
    without_array = _write_samples(tmp_path / "noarray.zarr", images, _class_condition([3, 8]))
    with pytest.raises(ArtifactError, match="no 'conditions' array"):
        sample_conditions(without_array)


# --------------------------------------------------------------------------------------------- evaluate stage
def _stage(name: str) -> ModuleType:
    path = ROOT / "stages" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_stages_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_evaluate(tmp_path: Path, reference: Path, fp: Path, quant: Path, *settings: str):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"device": {"name": "cpu"}, "evaluate": {"batch_size": 128}}))
    args = ["--params", str(params), "--reference", str(reference), "--fp", str(fp), "--quant", str(quant)]
    args += ["--out", str(tmp_path / "eval.json"), "--grid", str(tmp_path / "grid.png"), "-v"]
    for setting in settings:
        args += ["--set", setting]
    return CliRunner().invoke(_stage("evaluate").main, args, catch_exceptions=True)


def test_evaluate_stage_reports_class_consistency_and_ssim(tmp_path, digits_reference, train_digits):
    images, labels = train_digits
    quantized = np.clip(images + 0.1 * np.random.default_rng(7).standard_normal(images.shape), -1, 1)
    condition = _class_condition(list(range(10)))
    fp = _write_samples(tmp_path / "fp.zarr", images, condition, labels)
    quant = _write_samples(tmp_path / "quant.zarr", quantized.astype(np.float32), condition, labels)
    result = _run_evaluate(tmp_path, digits_reference, fp, quant)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval.json").read_text())
    for row in ("fp", "quant"):
        assert metrics[row]["class_consistency"] > 0.85
        assert len(metrics[row]["class_consistency_per_class"]) == 10 and "clip_score" not in metrics[row]
    assert "ssim_vs_fp" not in metrics["fp"]
    assert 0.5 < metrics["quant"]["ssim_vs_fp"] < 0.999 and metrics["quant"]["psnr"] > 15
    assert metrics["quant"]["ssim_vs_fp"] == pytest.approx(structural_similarity(quantized, images), abs=1e-6)
    assert (tmp_path / "grid.png").exists()


def test_evaluate_stage_refuses_samples_of_other_conditions(tmp_path, digits_reference, train_digits):
    images, labels = train_digits
    fp = _write_samples(tmp_path / "fp.zarr", images, _class_condition(list(range(10))), labels)
    other_labels = _write_samples(
        tmp_path / "q1.zarr", images, _class_condition(list(range(10))), labels[::-1]
    )
    other_scale = _write_samples(tmp_path / "q2.zarr", images, _class_condition(list(range(10)), 1.0), labels)
    unconditional = _write_samples(tmp_path / "q3.zarr", images)
    for quant in (other_labels, other_scale, unconditional):
        result = _run_evaluate(tmp_path, digits_reference, fp, quant)
        assert isinstance(result.exception, ArtifactError), result.output
        assert "not sampled with the same conditions" in str(result.exception) and "sample_quant" in str(
            result.exception
        )


def test_evaluate_stage_reports_clip_score_of_text_samples(
    tmp_path, digits_reference, train_digits, tiny_clip, caplog
):
    images, labels = train_digits
    images, labels = images[:40], labels[:40]
    prompts = [_prompt_of(k) for k in range(5)]
    condition = {"kind": "text", "guidance_scale": 7.5, "labels": None, "prompts": prompts}
    fp = _write_samples(tmp_path / "fp.zarr", images, condition, labels % 5)
    quant = _write_samples(tmp_path / "quant.zarr", images[::-1].copy(), condition, labels % 5)

    result = _run_evaluate(tmp_path, digits_reference, fp, quant, f"reference.clip_path={tiny_clip}")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval.json").read_text())
    scorer = CLIPScorer.load(tiny_clip)
    image_prompts = [prompts[k] for k in labels % 5]
    assert metrics["fp"]["clip_score"] == pytest.approx(scorer.scores(images, image_prompts).mean(), abs=1e-4)
    assert metrics["quant"]["clip_score"] == pytest.approx(
        scorer.scores(images[::-1].copy(), image_prompts).mean(), abs=1e-4
    )
    assert "class_consistency" not in metrics["fp"]

    with caplog.at_level(logging.WARNING, logger="edadm.metrics.evaluation"):
        result = _run_evaluate(tmp_path, digits_reference, fp, quant)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["fp"]["clip_score"] is None and metrics["quant"]["clip_score"] is None
    assert "set param reference.clip_path" in caplog.text

    result = _run_evaluate(
        tmp_path, digits_reference, fp, quant, f"reference.clip_path={tmp_path / 'absent'}"
    )
    assert isinstance(result.exception, ArtifactError) and "reference.clip_path" in str(result.exception)
