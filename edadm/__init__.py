"""edadm: post-training quantization of diffusion models with EDA-DM (TDAC + FBR)."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
