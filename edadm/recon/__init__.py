"""Reconstruction of a quantized model (docs/method.md §3): FBR (EDA-DM), BRECQ, layer-wise.

One concept a module: ``config`` (``ReconConfig``), ``plan`` (``Phase``, the steps of a
method), ``losses`` (lp, FBR's L_b + gamma * L_m), ``qdrop`` (QDrop), ``caching`` (a unit's
cached inputs and float targets), ``unit`` (learning one unit), ``network`` (the run over the
network: ``reconstruct``, ``run_reconstruction``), ``artifact`` (manifest and checkpoints),
``data_parallel`` (the work split over the ranks of a torchrun).

Import from the modules; this file imports nothing, so a stage depends only on what it runs.
"""
