"""Metrics as pure functions on toy data with known answers, and the FID Inception with random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edadm.errors import ParamError
from edadm.metrics.frechet import feature_stats, frechet_distance
from edadm.metrics.inception import FIDInceptionV3, load_fid_inception
from edadm.metrics.precision_recall import precision_recall
from edadm.metrics.scores import inception_score, paired_agreement


# --------------------------------------------------------------------------------------------- Frechet
def test_frechet_distance_of_identical_sets_is_zero():
    features = np.random.default_rng(0).standard_normal((500, 16))
    mu, sigma = feature_stats(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    s1, s2 = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_closed_form_for_rotated_gaussians():
    # Covariances sharing eigenvectors commute: the closed form holds on their eigenvalues.
    rng = np.random.default_rng(2)
    rotation, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    s1, s2 = rng.uniform(0.1, 2.0, 6), rng.uniform(0.1, 2.0, 6)
    sigma1, sigma2 = rotation @ np.diag(s1) @ rotation.T, rotation @ np.diag(s2) @ rotation.T
    expected = 4.0 + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()  # ||mu1 - mu2||^2 = 4
    mu2 = np.zeros(6)
    mu2[0] = 2.0
    assert frechet_distance(np.zeros(6), sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_with_fewer_samples_than_dims():
    # 10 samples in 32 dims: a singular covariance. The set against itself is ~0; a shifted copy
    # has the same covariance, so its distance is ||shift||^2 alone, and grows with the shift.
    rng = np.random.default_rng(3)
    features = rng.standard_normal((10, 32))
    stats = feature_stats(features)
    assert frechet_distance(*stats, *stats) == pytest.approx(0.0, abs=1e-5)
    for size in (0.5, 1.0, 2.0):
        shift = np.zeros(32)
        shift[:4] = size  # ||shift||^2 = 4 size^2
        expected = 4 * size**2
        assert frechet_distance(*stats, *feature_stats(features + shift)) == pytest.approx(expected, abs=1e-4)
    other = feature_stats(rng.standard_normal((10, 32)))
    assert frechet_distance(*stats, *other) > 10.0  # another draw: the covariances differ too


def test_feature_stats_is_float64_mean_and_unbiased_covariance():
    features = np.random.default_rng(4).standard_normal((100, 3)).astype(np.float32)
    mu, sigma = feature_stats(features)
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (3,) and sigma.shape == (3, 3)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False))


# ------------------------------------------------------------------------------------- precision / recall
def _brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    def inside(q, c, r):
        return (((q[:, None] - c[None]) ** 2).sum(-1) <= r[None]).any(axis=1)

    return inside(fake, real, radii(real)).mean(), inside(real, fake, radii(fake)).mean()


def test_precision_recall_of_identical_sets_is_one():
    features = np.random.default_rng(5).standard_normal((200, 8))
    assert precision_recall(features, features) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_of_far_apart_clusters_is_zero():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((150, 8))
    fake = rng.standard_normal((120, 8)) + 100.0
    assert precision_recall(real, fake) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_when_fakes_cover_half_the_real_modes():
    # Real data: two far clusters; the fakes are exactly the first cluster (mode dropping).
    rng = np.random.default_rng(7)
    cluster_a, cluster_b = rng.standard_normal((100, 4)), rng.standard_normal((100, 4)) + 50.0
    result = precision_recall(np.concatenate([cluster_a, cluster_b]), cluster_a)
    assert result == {"precision": 1.0, "recall": 0.5}


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(8)
    real = rng.standard_normal((300, 5))
    fake = 1.3 * rng.standard_normal((250, 5)) + 0.5
    expected = _brute_force_precision_recall(real, fake, k=3)
    result = precision_recall(real, fake, k=3, batch_size=64)  # several query batches
    assert (result["precision"], result["recall"]) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < result["precision"] < 1.0 and 0.0 < result["recall"] < 1.0


# --------------------------------------------------------------------------------------------- IS, PSNR
def test_inception_score_of_confident_uniform_classes_is_the_number_of_classes():
    labels = np.tile(np.arange(10), 100)  # every split of 100 holds each class 10 times
    logits = np.full((1000, 10), -1e4)
    logits[np.arange(1000), labels] = 0.0
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_of_constant_predictions_is_one():
    logits = np.tile(np.random.default_rng(9).standard_normal(10), (200, 1))
    mean, std = inception_score(logits, splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_paired_agreement_of_a_known_offset_and_noise_level():
    images = np.random.default_rng(10).uniform(-1, 1, (50, 3, 8, 8))
    offset = paired_agreement(images + 0.1, images)
    assert offset["mse"] == pytest.approx(0.01)
    assert offset["psnr"] == pytest.approx(10 * np.log10(4 / 0.01))  # 26.02 dB
    noisy = images + 0.05 * np.random.default_rng(11).standard_normal(images.shape)
    noise = paired_agreement(noisy, images)
    assert noise["mse"] == pytest.approx(0.0025, rel=0.05)
    assert noise["psnr"] == pytest.approx(10 * np.log10(4 / 0.0025), abs=0.25)  # 32.04 dB


def test_paired_agreement_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        paired_agreement(np.zeros((2, 1, 4, 4)), np.zeros((3, 1, 4, 4)))


# --------------------------------------------------------------------------------------------- FID Inception
@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(FIDInceptionV3().state_dict(), path)
    return path


def test_fid_inception_loads_and_gives_standard_feature_shapes(random_inception_weights):
    model = load_fid_inception(random_inception_weights)
    # The parameter count of pytorch-fid's FID Inception (torchvision trunk, 1008 classes, no aux).
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    grey = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        out = model.extract(grey)
        rgb = model.extract(grey.repeat(1, 3, 1, 1))
    assert out.features.shape == (2, 2048)
    assert out.spatial.shape == (2, 7 * 17 * 17)
    assert out.logits.shape == (2, 1008)
    # Grey input is repeated to 3 channels, so it matches the same RGB image.
    torch.testing.assert_close(out.features, rgb.features)


def test_missing_inception_weights_error_names_the_param(tmp_path):
    with pytest.raises(ParamError, match=r"reference\.inception_weights.*not found"):
        load_fid_inception(tmp_path / "absent.pth")
    with pytest.raises(ParamError, match=r"reference\.inception_weights is not set"):
        load_fid_inception(None)


def test_wrong_inception_weights_error_names_the_param(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(1000, 2048), "conv.weight": torch.zeros(1)}, path)
    with pytest.raises(
        ParamError, match=r"reference\.inception_weights.*does not match.*wrong shape: fc\.weight"
    ):
        load_fid_inception(path)
