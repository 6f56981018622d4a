"""Calibration-set selection: TDAC (EDA-DM, docs/method.md §2), its knn extension, baselines.

Entry point: ``choose_calibration(SelectConfig, ...) -> Selection`` (``selection``), which
dispatches to ``tdac`` (``TDACConfig``, ``tdac_selection`` and its steps, the step scores in
``step_scores``), ``knn`` (the knn mode's per-step choice) or ``baselines`` (uniform, ndtc,
random). ``calibration_set`` and ``store`` are the chosen set in memory and on disk.

Import from the modules; this file imports nothing, so a stage depends only on what it runs.
"""
