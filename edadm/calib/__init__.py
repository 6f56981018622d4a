"""Calibration-set selection: TDAC (EDA-DM, METHOD.md section 2), its knn extension, baselines.

Entry point: ``choose_calibration(SelectConfig, ...) -> Selection`` (``selection``), which
dispatches to ``tdac`` (``TDACConfig``, ``tdac_selection`` and its steps), ``knn`` (the knn
mode's per-step choice) or ``baselines`` (uniform, ndtc, random).
"""

from edadm.calib.baselines import NDTCConfig, UniformConfig
from edadm.calib.knn import KNNConfig
from edadm.calib.selection import SelectConfig, Selection, allocation_chart, choose_calibration
from edadm.calib.tdac import (
    TDACConfig,
    allocate_counts,
    auto_radius,
    pairwise_step_mse,
    tdac_allocation,
    tdac_scores,
    tdac_selection,
)

__all__ = [
    "KNNConfig",
    "NDTCConfig",
    "SelectConfig",
    "Selection",
    "TDACConfig",
    "UniformConfig",
    "allocate_counts",
    "allocation_chart",
    "auto_radius",
    "choose_calibration",
    "pairwise_step_mse",
    "tdac_allocation",
    "tdac_scores",
    "tdac_selection",
]
