"""The errors a user fixes, and the one place that reports them.

A leaf module (it imports nothing of edadm), so every other module can raise these without
an import cycle. ``ParamError`` and ``ArtifactError`` messages name what is wrong and the
fix; ``user_errors`` turns them into one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


class EdadmError(Exception):
    """Base of the errors whose message tells the user what to change."""


class ParamError(EdadmError, ValueError):
    """A param is missing, unknown, of the wrong type or out of range, or params.yaml is unreadable."""


class ArtifactError(EdadmError, RuntimeError):
    """An input artifact (a store, a model directory, a quantization state) is missing, damaged or
    of another schema."""


DEBUG_ENV = "EDADM_DEBUG"  # EDADM_DEBUG=1: user errors show their traceback too
VERBOSE_HELP = f"show tracebacks of param and artifact errors (or {DEBUG_ENV}=1)"


@contextlib.contextmanager
def user_errors(verbose: bool = False) -> Iterator[None]:
    """Turn a ParamError or ArtifactError into one ``error: ...`` line on stderr and exit code 2.

    These errors are the user's to fix (a param, a missing artifact) and their message says how;
    a traceback would bury it. ``verbose`` (``-v``) or ``EDADM_DEBUG=1`` shows the traceback.
    """
    try:
        yield
    except EdadmError as err:
        if verbose or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)
