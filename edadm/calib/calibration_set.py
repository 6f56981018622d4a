"""The calibration set, from the select stage's ``calib.zarr`` to the reconstruction.

One type for both sides: ``edadm.calib.store.load_calibration`` returns it and
``edadm.quant.run_reconstruction`` takes it. Tensors live on the host; ``model_inputs`` and
``batches`` move the samples asked for to the model's device as forward keyword arguments.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class CalibrationSet:
    """Model inputs x_t with their timesteps, where they came from, and any conditioning.

    x: [N, C, H, W] floating point; t: [N] (the timestep of each sample).
    traj, step: [N] int64 or None: the trajectory and sampling step each sample came from
    (None for a set that was not drawn from a trajectory dump, e.g. in tests).
    encoder_hidden_states: [N, L, D] or None (text-conditional models, e.g. SD);
    class_labels: [N] or None (class-conditional models).
    attrs: the store's attributes (how the set was chosen).
    """

    x: torch.Tensor
    t: torch.Tensor
    _: KW_ONLY
    traj: torch.Tensor | None = None
    step: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("x", "t", "traj", "step", "encoder_hidden_states", "class_labels"):
            value = getattr(self, name)
            if value is not None and not torch.is_tensor(value):
                raise TypeError(
                    f"calibration {name} must be a torch.Tensor, got {type(value).__name__} "
                    "(use torch.from_numpy for arrays)"
                )
        if self.x.ndim != 4 or not self.x.is_floating_point():
            shape = tuple(self.x.shape)
            raise ValueError(
                f"calibration x must be a floating [N, C, H, W] tensor, got {self.x.dtype} {shape}"
            )
        n = self.x.shape[0]
        if n == 0:
            raise ValueError("the calibration set is empty (0 samples): check the select stage's output")
        for name in ("t", "traj", "step", "class_labels"):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise ValueError(f"calibration {name} must be [N]=[{n}], got shape {tuple(value.shape)}")
        ehs = self.encoder_hidden_states
        if ehs is not None and (ehs.ndim != 3 or ehs.shape[0] != n):
            raise ValueError(
                f"calibration encoder_hidden_states must be [N, L, D] with N={n}, "
                f"got shape {tuple(ehs.shape)}"
            )

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index: slice | torch.Tensor) -> CalibrationSet:
        """The samples ``index`` (a slice or an index tensor) as a calibration set."""

        def take(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value[index]

        return CalibrationSet(
            self.x[index],
            self.t[index],
            traj=take(self.traj),
            step=take(self.step),
            encoder_hidden_states=take(self.encoder_hidden_states),
            class_labels=take(self.class_labels),
            attrs=self.attrs,
        )

    def model_inputs(
        self, index: slice | torch.Tensor, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        """Forward keyword arguments (``sample``, ``timestep``, and any conditioning) for ``index``."""
        inputs = {"sample": self.x[index].to(device), "timestep": self.t[index].to(device)}
        if self.encoder_hidden_states is not None:
            inputs["encoder_hidden_states"] = self.encoder_hidden_states[index].to(device)
        if self.class_labels is not None:
            inputs["class_labels"] = self.class_labels[index].to(device)
        return inputs

    def batches(self, batch_size: int, device: torch.device | str) -> Iterator[dict[str, torch.Tensor]]:
        """Forward keyword arguments for consecutive batches, in order (the last may be smaller)."""
        for start in range(0, len(self), batch_size):
            yield self.model_inputs(slice(start, start + batch_size), device)
