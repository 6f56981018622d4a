"""Sample-quality metrics and the feature extractors and real-data reference they compare against.

- ``frechet``: ``feature_stats``, ``frechet_distance`` (FD / FID / sFID).
- ``precision_recall``: improved precision and recall (k-NN manifolds, FAISS).
- ``scores``: ``inception_score``, ``paired_agreement`` (MSE / PSNR against FP samples),
  ``class_consistency`` (the reference classifier against the requested class labels).
- ``ssim``: ``structural_similarity`` (SSIM against FP samples).
- ``clip``: ``CLIPScorer``, ``clip_score`` (text-to-image samples against their prompts).
- ``conditions``: ``SampleConditions``, ``sample_conditions``: what each sample was conditioned on.
- ``extractors``: the ``FeatureExtractor`` interface and batched ``extract_all``.
- ``classifier``: the digits CNN (embedded default); ``inception``: the FID Inception-v3.
- ``reference``: ``ReferenceConfig``, ``build_reference``, ``load_extractor``: what samples are
  compared against (the ``reference`` stage).
- ``evaluation``: ``EvaluateConfig``, ``evaluate_samples``: the comparison (the ``evaluate`` stage).
- ``step_error``: ``noise_error_by_step``, where along the trajectory a quantized model drifts.
"""

from edadm.metrics.classifier import ClassifierConfig, DigitsClassifier, train_classifier
from edadm.metrics.clip import CLIPScorer, clip_score
from edadm.metrics.conditions import SampleConditions, check_same_conditions, sample_conditions
from edadm.metrics.evaluation import EvaluateConfig, evaluate_samples
from edadm.metrics.extractors import Extracted, FeatureExtractor, extract_all
from edadm.metrics.frechet import feature_stats, frechet_distance
from edadm.metrics.inception import FIDInceptionV3, load_fid_inception
from edadm.metrics.precision_recall import precision_recall
from edadm.metrics.reference import (
    ReferenceConfig,
    build_reference,
    load_extractor,
    load_reference_stats,
    read_reference,
    reference_config,
)
from edadm.metrics.scores import class_consistency, inception_score, paired_agreement
from edadm.metrics.ssim import ssim_per_image, structural_similarity
from edadm.metrics.step_error import noise_error_by_step

__all__ = [
    "CLIPScorer",
    "ClassifierConfig",
    "DigitsClassifier",
    "EvaluateConfig",
    "Extracted",
    "FIDInceptionV3",
    "FeatureExtractor",
    "ReferenceConfig",
    "SampleConditions",
    "build_reference",
    "check_same_conditions",
    "class_consistency",
    "clip_score",
    "evaluate_samples",
    "extract_all",
    "feature_stats",
    "frechet_distance",
    "inception_score",
    "load_extractor",
    "load_fid_inception",
    "load_reference_stats",
    "noise_error_by_step",
    "paired_agreement",
    "precision_recall",
    "read_reference",
    "reference_config",
    "sample_conditions",
    "ssim_per_image",
    "structural_similarity",
    "train_classifier",
]
