"""edadm: post-training quantization of diffusion models with EDA-DM (TDAC + FBR).

The Python API, two calls:
- ``edadm.quantize(denoiser, calibration, quant=..., recon=...)``: the reconstructed,
  quantized denoiser, in memory (``edadm.recon.api``);
- ``edadm.load(path)``: a reconstruct artifact or an export, as the diffusers model, quantized
  (``edadm.deploy.load``).
"""

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Imported on first use, not here: every stage imports this package, and a stage's DVC deps are
# the modules it runs (tests/test_stage_deps.py), so `import edadm` must not pull in the library.
_API = {"quantize": "edadm.recon.api", "load": "edadm.deploy.load"}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'edadm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
