"""Quantization of diffusion UNets and FBR block reconstruction (METHOD.md sections 0 and 3).

Modules, one concept each: ``quantizer`` (grid arithmetic, UniformAffineQuantizer),
``adaround`` (learned rounding), ``layers`` (QuantLayer), ``attention`` (QuantAttnProcessor),
``blocks`` (units in execution order), ``model`` (quantize_model, set_quant_state),
``losses`` (lp, FBR's L_b + gamma * L_m), ``qdrop`` (QDrop), ``caching`` (units' cached
inputs and float targets), ``block_reconstruction`` (Phase, learning one unit),
``reconstruction`` (FBR / BRECQ / layer-wise over the network: plan, resume, report),
``state`` (artifacts), ``packing`` (integer codes into bytes), ``export`` (one
self-contained file), ``timestep_groups`` (activation ranges per group of sampling steps),
``data_parallel`` (reconstruction split over the ranks of a torchrun).
The calibration set they take is ``CalibrationSet`` from ``edadm.calib.calibration_set``
(what ``edadm.calib.store.load_calibration`` returns).
"""

from edadm.quant.adaround import AdaRoundQuantizer
from edadm.quant.attention import QuantAttnProcessor
from edadm.quant.block_reconstruction import Phase
from edadm.quant.blocks import ModelLayout, Unit, trace_model
from edadm.quant.config import QuantConfig, ReconConfig
from edadm.quant.export import export_quantized, fp32_size_bytes, load_exported
from edadm.quant.layers import QuantLayer
from edadm.quant.losses import fbr_loss, lp_loss
from edadm.quant.model import (
    UnsupportedLayerWarning,
    calibrate_activations,
    describe_units,
    quantize_model,
    set_quant_state,
)
from edadm.quant.packing import pack_codes, unpack_codes
from edadm.quant.qdrop import QDrop
from edadm.quant.quantizer import (
    UniformAffineQuantizer,
    dequantize,
    fake_quantize,
    qparams_from_range,
    quantize,
    search_range,
)
from edadm.quant.reconstruction import ReconResult, reconstruct, report_rows, run_reconstruction
from edadm.quant.state import load_quant_model, load_quant_state, quant_state_dict
from edadm.quant.timestep_groups import TimestepGroups, timestep_groups

__all__ = [
    "AdaRoundQuantizer",
    "ModelLayout",
    "Phase",
    "QDrop",
    "QuantAttnProcessor",
    "QuantConfig",
    "QuantLayer",
    "ReconConfig",
    "ReconResult",
    "TimestepGroups",
    "UniformAffineQuantizer",
    "Unit",
    "UnsupportedLayerWarning",
    "calibrate_activations",
    "dequantize",
    "describe_units",
    "export_quantized",
    "fake_quantize",
    "fbr_loss",
    "fp32_size_bytes",
    "load_exported",
    "load_quant_model",
    "load_quant_state",
    "lp_loss",
    "pack_codes",
    "qparams_from_range",
    "quant_state_dict",
    "quantize",
    "quantize_model",
    "reconstruct",
    "report_rows",
    "run_reconstruction",
    "search_range",
    "set_quant_state",
    "timestep_groups",
    "trace_model",
    "unpack_codes",
]
