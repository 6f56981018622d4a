"""FAISS, from whichever build is installed (the ``cpu`` or the ``gpu`` extra), and its GPU check.

Both builds provide ``import faiss`` and must not be installed together, so edadm depends on
neither directly; without one, importing this module says which extra to install.
"""

from __future__ import annotations

try:
    import faiss
except ImportError as err:  # neither extra installed
    raise ImportError(
        "edadm needs FAISS (TDAC's knn mode, precision / recall): install the `cpu` extra "
        "(pip install -e '.[cpu]') or, on a CUDA machine, the `gpu` extra (pip install -e '.[gpu]')"
    ) from err

__all__ = ["faiss", "gpu_available"]


def gpu_available() -> bool:
    """True when the installed FAISS has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
