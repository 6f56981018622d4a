"""Process-level settings shared by every stage: device, seeding, logging."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from edadm.config import load_section
from edadm.errors import ParamError

SECTION = "device"
#: Device types a stage can run on: the pipeline is tested on CPU and CUDA; MPS is torch's.
DEVICE_TYPES = ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class DeviceConfig:
    """Where the stages run (``device`` in params.yaml).

    Attributes:
        name: ``auto`` (CUDA where a GPU is present, else CPU), ``cpu``, ``cuda``, ``cuda:N``
            or ``mps``. Availability is checked when the device is resolved
            (``resolve_device``), so a params file written on a GPU machine still parses on a
            CPU one.
    """

    name: str = "auto"

    def __post_init__(self) -> None:
        if self.name == "auto":
            return
        try:
            device = torch.device(self.name)
        except RuntimeError:
            device = None
        if device is None or device.type not in DEVICE_TYPES:
            raise ParamError(f"param {SECTION}.name={self.name!r} must be auto, cpu, cuda, cuda:N or mps")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``device.name``; raises ParamError naming it when it is not present.

    ``auto`` picks CUDA where a GPU is present, else CPU.
    """
    device_name = DeviceConfig(name).name  # checks the spelling
    if device_name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ParamError(
                f"param {SECTION}.name={name!r} asks for a GPU but {count} CUDA device(s) are "
                "available; set device.name to auto or cpu"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ParamError(
            f"param {SECTION}.name={name!r}: MPS is not available; set device.name to auto or cpu"
        )
    return device


def load_device(params: Mapping[str, Any]) -> torch.device:
    """The torch device of the ``device`` section of loaded params (what every stage calls)."""
    value = params.get(SECTION)
    if value is not None and not isinstance(value, Mapping):  # the old spelling `device: cpu`
        raise ParamError(f"param {SECTION}={value!r} must be a section: write `{SECTION}: {{name: {value}}}`")
    return resolve_device(load_section(DeviceConfig, SECTION, params).name)


def configure_logging(level: int = logging.INFO) -> None:
    """Logging for stage scripts and the CLI (the library itself only logs)."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def cpu_name() -> str:
    """The CPU model, for benchmark reports (figures are only comparable on one machine)."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
