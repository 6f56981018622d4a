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

Import from the modules; this file imports nothing, so a stage depends only on what it runs.
"""
