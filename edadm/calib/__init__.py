"""Calibration-set selection: TDAC (EDA-DM, METHOD.md section 2), its knn extension, baselines.

Entry point: ``choose_calibration(SelectConfig, ...) -> Selection``.
"""

from edadm.calib.baselines import NDTCConfig, UniformConfig
from edadm.calib.knn import KNNConfig
from edadm.calib.selection import (
    SelectConfig,
    Selection,
    TDACConfig,
    allocation_chart,
    choose_calibration,
)
from edadm.calib.tdac import auto_radius, pairwise_step_mse, tdac_allocation, tdac_scores

__all__ = [
    "KNNConfig",
    "NDTCConfig",
    "SelectConfig",
    "Selection",
    "TDACConfig",
    "UniformConfig",
    "allocation_chart",
    "auto_radius",
    "choose_calibration",
    "pairwise_step_mse",
    "tdac_allocation",
    "tdac_scores",
]
