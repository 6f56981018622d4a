"""Activation ranges per group of sampling steps (``quant.act_timestep_groups``; ours).

The official code keeps one set of activation ranges for all timesteps (docs/method.md §0). With
G > 1 groups, every activation quantizer keeps G (scale, zero_point) pairs, one per group of
consecutive sampling steps; weights are unaffected.

- Groups: the sampler's timesteps, in step order (noisiest first), are cut into G groups of
  equal step counts (``np.array_split``). The group of a timestep t is found from G - 1
  thresholds, the smallest timestep of every group but the last (ascending): t belongs to
  group G - 1 - #{thresholds <= t}, so any t maps to a group, also one the sampler never
  visits. The thresholds are part of the quantization state.
- Per sample: a batch may mix timesteps (calibration batches do). ``TimestepGroups.index``
  [B] holds the group of every sample of the current forward: a pre-hook on the quantized
  UNet sets it from the ``timestep`` argument (``install_hooks``), and ``timestep_groups``
  sets it for forwards of a single unit (reconstruction). A quantizer gathers scale[index].
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from edadm.errors import ParamError

PARAM = "quant.act_timestep_groups"
BOUNDARIES_KEY = "act_timestep_groups.boundaries"  # its name in state.safetensors and the export


class TimestepGroups:
    """G groups of sampling steps, told apart by ``boundaries`` [G - 1] (float64, ascending).

    One object is shared by every activation quantizer of a model; ``index`` [B] (int64, on
    the batch's device) is the group of each sample of the forward in progress, None outside,
    and ``present`` the groups in it (known on the host: no device sync to split a batch).
    """

    def __init__(self, count: int, boundaries: torch.Tensor | None = None) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 2:
            raise ValueError(f"TimestepGroups needs at least 2 groups, got {count!r}")
        self.count = count
        self.boundaries: torch.Tensor | None = None  # None until set (a model about to load a state)
        if boundaries is not None:
            self.set_boundaries(boundaries)
        self.index: torch.Tensor | None = None
        self.present: list[int] = []
        self._saved: list[tuple[torch.Tensor | None, list[int]]] = []  # outside each whole-model forward

    @classmethod
    def from_timesteps(cls, timesteps: Sequence[float], count: int) -> TimestepGroups:
        """Cut the sampler's ``timesteps`` (step order, noisiest first) into ``count`` groups.

        Raises ParamError naming ``quant.act_timestep_groups`` when ``count`` exceeds the steps,
        or when a cut falls between two steps of the same timestep (a timestep cannot tell
        them apart; repeats come from the official quadratic spacing's last steps).
        """
        steps = np.asarray(timesteps, dtype=np.float64)
        if steps.ndim != 1 or len(steps) == 0:
            raise ValueError(f"timesteps must be a non-empty sequence, got shape {steps.shape}")
        if not 1 <= count <= len(steps):
            raise ParamError(
                f"param {PARAM}={count} must lie in [1, {len(steps)}]: the sampler has {len(steps)} steps"
            )
        if np.any(np.diff(steps) > 0):
            raise ValueError("timesteps must be in sampling order, noisiest (largest) first")
        chunks = np.array_split(steps, count)
        thresholds = []
        for g in range(count - 1):
            last, first_next = chunks[g][-1], chunks[g + 1][0]
            if last <= first_next:
                raise ParamError(
                    f"param {PARAM}={count} cuts between two steps of timestep {last:g}; a timestep "
                    f"cannot tell them apart: choose another number of groups"
                )
            thresholds.append(last)  # the smallest timestep of group g
        return cls(count, torch.tensor(thresholds[::-1], dtype=torch.float64))

    def set_boundaries(self, boundaries: torch.Tensor) -> None:
        """Set the G - 1 ascending thresholds (a loaded state's); ValueError when they do not fit."""
        boundaries = torch.as_tensor(boundaries).detach().to("cpu", torch.float64).reshape(-1)
        if boundaries.numel() != self.count - 1:
            raise ValueError(
                f"{BOUNDARIES_KEY} holds {boundaries.numel()} thresholds; {self.count} groups need "
                f"{self.count - 1} ({PARAM} differs?)"
            )
        if not torch.isfinite(boundaries).all() or (boundaries.diff() <= 0).any():
            raise ValueError(
                f"{BOUNDARIES_KEY} must be finite and strictly ascending, got {boundaries.tolist()}"
            )
        self.boundaries = boundaries

    def group_of(self, t: torch.Tensor | float) -> torch.Tensor:
        """The group of every timestep in ``t`` (any shape, flattened): int64 on the CPU."""
        if self.boundaries is None:
            raise RuntimeError(
                "the timestep groups have no boundaries: build the model with quantize_model(timesteps=...) "
                "or load a quantization state"
            )
        t = torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1)
        return (self.count - 1) - torch.searchsorted(self.boundaries, t, right=True)

    def describe(self, group: int) -> str:
        """Group ``group``'s timestep range, e.g. "group 1 of 2 (timesteps < 500)"."""
        low = None if group == self.count - 1 else float(self.boundaries[self.count - 2 - group])
        high = None if group == 0 else float(self.boundaries[self.count - 1 - group])
        if low is None:
            span = f"timesteps < {high:g}"
        elif high is None:
            span = f"timesteps >= {low:g}"
        else:
            span = f"{low:g} <= timesteps < {high:g}"
        return f"group {group} of {self.count} ({span})"

    def check_covers(self, t: torch.Tensor) -> None:
        """ValueError naming every group that none of the timesteps ``t`` (a calibration set's) falls in."""
        present = set(self.group_of(t).tolist())
        missing = [g for g in range(self.count) if g not in present]
        if missing:
            raise ValueError(no_samples_message(self, missing))

    def batch_index(self, batch_size: int, device: torch.device, repeats: int = 1) -> torch.Tensor:
        """The current groups [batch_size] on ``device``, each repeated ``repeats`` times (heads)."""
        if self.index is None:
            raise RuntimeError(
                f"an activation quantizer with {self.count} timestep groups ran without groups set: run the "
                "whole quantized UNet (its pre-hook reads `timestep`), or wrap a forward of a part of it in "
                "`with edadm.quant.timestep_groups(module, t):`"
            )
        if self.index.device != device:
            self.index = self.index.to(device)  # once a forward (a unit's groups come from the host)
        index = self.index if repeats == 1 else self.index.repeat_interleave(repeats)
        if index.shape[0] != batch_size:
            raise RuntimeError(
                f"timestep groups are set for {index.shape[0]} samples, the tensor has {batch_size} "
                "(a batch dimension that is not the UNet's?)"
            )
        return index

    def set_timesteps(self, t: torch.Tensor | float, batch_size: int, device: torch.device) -> None:
        """Set ``index`` [batch_size] from the timesteps ``t`` ([batch_size], or one for all)."""
        groups = self.group_of(t)
        if groups.numel() == 1:
            groups = groups.expand(batch_size)
        self.present = groups.unique().tolist()
        self.index = groups.to(device)

    # --- hooks on the quantized UNet ------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Set the groups from the forward's ``timestep`` ([B], scalar or number) for its ``sample``."""
        self._saved.append((self.index, self.present))  # first: the post-hook runs even if this raises
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        self.set_timesteps(t, sample.shape[0], sample.device)

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self._saved:
            self.index, self.present = self._saved.pop()


def no_samples_message(groups: TimestepGroups, missing: Sequence[int]) -> str:
    names = "; ".join(groups.describe(g) for g in missing)
    return (
        f"the calibration set has no sample in timestep {names}: a calibration set must cover every "
        f"group of {PARAM}={groups.count} (lower it, or calibrate on samples from those steps)"
    )


def install_hooks(model: nn.Module, groups: TimestepGroups) -> None:
    """Make every forward of ``model`` (a UNet) set the groups from its ``timestep`` argument."""
    model.register_forward_pre_hook(groups.pre_hook, with_kwargs=True)
    # always_call: a forward stopped by an exception (caching stops early) still restores them
    model.register_forward_hook(groups.post_hook, with_kwargs=True, always_call=True)


def find_timestep_groups(module: nn.Module) -> TimestepGroups | None:
    """The TimestepGroups the activation quantizers in ``module`` share (None: one set of ranges)."""
    for m in module.modules():
        groups = getattr(m, "timestep_groups", None)
        if isinstance(groups, TimestepGroups):
            return groups
    return None


@contextlib.contextmanager
def timestep_groups(module: nn.Module, t: torch.Tensor | None) -> Iterator[None]:
    """Within the block, ``module``'s quantizers use the groups of the timesteps ``t`` [B].

    For forwards of a part of the quantized UNet (a block in reconstruction); a forward of the
    whole UNet sets them itself. A no-op for a model with one set of ranges.
    """
    groups = find_timestep_groups(module)
    if groups is None or t is None:
        yield
        return
    saved = groups.index, groups.present
    t = torch.as_tensor(t)
    groups.set_timesteps(t, t.numel(), t.device)
    try:
        yield
    finally:
        groups.index, groups.present = saved


def sampler_timesteps(calib: Any) -> list[float]:
    """The sampler's timesteps (step order) of the dump a calibration set was drawn from.

    The select stage keeps the dump's attributes in ``calib.attrs["dump"]``. ValueError when
    the set does not carry them (pass ``timesteps=`` to ``run_reconstruction`` then).
    """
    timesteps = (calib.attrs.get("dump") or {}).get("timesteps")
    if not timesteps:
        raise ValueError(
            f"{PARAM} > 1 needs the sampler's timesteps: this calibration set does not carry its dump's "
            "(attrs['dump']['timesteps']); pass timesteps= to run_reconstruction"
        )
    return [float(t) for t in timesteps]
