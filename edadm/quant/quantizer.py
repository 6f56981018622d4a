"""Uniform affine quantization (docs/method.md §0): pure arithmetic plus one module.

The grid is the unsigned integers [0, 2^b - 1] with a zero-point:

    q  = clamp(round(x / scale) + zero_point, 0, 2^b - 1)
    x^ = (q - zero_point) * scale

A range [min, max] maps to ``(scale, zero_point)`` by ``qparams_from_range``:
- symmetric, [-tau, tau]: scale = 2 tau / (2^b - 1), zero_point = 2^(b-1) (the grid's middle);
- non-negative, [0, tau] (softmax output, or any tensor that is >= 0): scale = tau / (2^b - 1),
  zero_point = 0;
- asymmetric, [min, max] (``symmetric=False``): scale = (max - min) / (2^b - 1),
  zero_point = round(-min / scale).

Ranges come from a search over 100 candidates (i / 100) * extreme, i = 1..100, minimising the
mean |x - x^|^p with p = 2.4 (LAPQ's L_p criterion, as Q-Diffusion / EDA-DM do).

Granularity is one notion, ``channel_axis``: None is per tensor, an int is one (scale,
zero_point) per index along that axis (weights: axis 0, the output channels). An activation
quantizer with timestep groups (``edadm.quant.timestep_groups``) keeps one pair per group and
quantizes every sample with its group's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from edadm.quant.timestep_groups import TimestepGroups


class ElementMixer(Protocol):
    """What a quantizer calls while a unit is reconstructed: QDrop (``edadm.recon.qdrop``)."""

    def mix(self, x_float: torch.Tensor, x_quant: torch.Tensor) -> torch.Tensor: ...


SEARCH_CANDIDATES = 100  # docs/method.md §0: tau = (i / 100) * max|x|, i = 1..100
SEARCH_P = 2.4  # docs/method.md §0: L_p error with p = 2.4
EMA_MOMENTUM = 0.9  # docs/method.md §0: running = 0.9 * running + 0.1 * new
SCALE_EPS = 1e-8
_SEARCH_BUDGET = 1 << 24  # elements per candidate chunk (x 4 bytes, a few temporaries)


# ---------------------------------------------------------------------------------------------
# Pure arithmetic
# ---------------------------------------------------------------------------------------------
def grid_max(bits: int) -> int:
    """The largest integer of the unsigned ``bits``-bit grid: 2^b - 1."""
    return (1 << bits) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity gradient in the backward pass (straight-through)."""
    return (x.round() - x).detach() + x


def broadcast_to_axis(values: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """Reshape per-channel ``values`` [C] to broadcast against a tensor of ``ndim`` dims along ``axis``."""
    if axis is None or values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def qparams_from_range(
    min_val: torch.Tensor, max_val: torch.Tensor, bits: int, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of the grid covering [min_val, max_val] (element-wise, any shape).

    A range with min_val >= 0 is one-sided ([0, max], zero_point 0). Otherwise, when
    ``symmetric``, the range is [-tau, tau] with tau = max(-min, max) and zero_point 2^(b-1);
    when not, the affine range [min(min, 0), max(max, 0)] with zero_point round(-min / scale).
    The zero_point is returned as a float tensor holding integers.
    """
    qmax = grid_max(bits)
    min_val = torch.minimum(min_val, torch.zeros_like(min_val))
    max_val = torch.maximum(max_val, torch.zeros_like(max_val))
    one_sided = min_val >= 0
    if symmetric:
        tau = torch.maximum(-min_val, max_val)
        scale = torch.where(one_sided, max_val / qmax, 2 * tau / qmax).clamp_min(SCALE_EPS)
        zero_point = torch.where(one_sided, torch.zeros_like(scale), torch.full_like(scale, 1 << (bits - 1)))
    else:
        scale = ((max_val - min_val) / qmax).clamp_min(SCALE_EPS)
        zero_point = (-min_val / scale).round().clamp(0, qmax)
    return scale, zero_point


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, channel_axis: int | None = None
) -> torch.Tensor:
    """Integer codes q = clamp(round(x / scale) + zero_point, 0, 2^b - 1) (same float dtype as x)."""
    scale = broadcast_to_axis(scale, x.ndim, channel_axis)
    zero_point = broadcast_to_axis(zero_point, x.ndim, channel_axis)
    return torch.clamp(torch.round(x / scale) + zero_point, 0, grid_max(bits))


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, channel_axis: int | None = None
) -> torch.Tensor:
    """x^ = (q - zero_point) * scale."""
    scale = broadcast_to_axis(scale, q.ndim, channel_axis)
    zero_point = broadcast_to_axis(zero_point, q.ndim, channel_axis)
    return (q - zero_point) * scale


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, channel_axis: int | None = None
) -> torch.Tensor:
    """dequantize(quantize(x)) with a straight-through estimator for the rounding.

    Gradients reach ``x`` (inside the clamp range) and ``scale`` (LSQ-style learnable step).
    """
    scale = broadcast_to_axis(scale, x.ndim, channel_axis)
    zero_point = broadcast_to_axis(zero_point, x.ndim, channel_axis)
    q = torch.clamp(round_ste(x / scale) + zero_point, 0, grid_max(bits))
    return (q - zero_point) * scale


def search_min_max(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    channel_axis: int | None = None,
    p: float = SEARCH_P,
    one_sided: bool | None = None,
    max_elements: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The range [min, max] minimising mean |x - x^|^p over 100 shrunk candidates.

    Candidates are (i / 100) times the extremes, i = 1..100: [-tau_i, tau_i] with tau_i from
    max|x| (symmetric), [0, tau_i] from max(x) (one-sided), or both extremes scaled
    (asymmetric). ``one_sided=None`` picks one-sided when the whole tensor is >= 0.
    ``max_elements`` > 0 (per tensor only) estimates the error from at most that many
    elements: the largest |x| eighth exactly plus a seeded uniform sample of the rest,
    reweighted so the estimate stays unbiased (0: every element, as the reference).
    Returns ``(min, max)``: scalars, or [C] along ``channel_axis``.
    """
    x = x.detach().float()
    flat = (
        x.reshape(1, -1)
        if channel_axis is None
        else x.movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1)
    )
    if one_sided is None:
        one_sided = bool(flat.min() >= 0)
    x_min, x_max = flat.amin(dim=1), flat.amax(dim=1)  # [C]
    if one_sided:
        low, high = torch.zeros_like(x_max), x_max.clamp_min(0)
    elif symmetric:
        high = torch.maximum(x_min.abs(), x_max.abs())
        low = -high
    else:
        low, high = x_min.clamp_max(0), x_max.clamp_min(0)

    # candidate i has extremes (i / 100) * (low, high): [K, C]
    fractions = (
        torch.arange(1, SEARCH_CANDIDATES + 1, device=x.device, dtype=torch.float32) / SEARCH_CANDIDATES
    )
    cand_min, cand_max = fractions[:, None] * low[None], fractions[:, None] * high[None]
    scale, zero_point = qparams_from_range(cand_min, cand_max, bits, symmetric)  # [K, C]
    values, weights = flat, None
    if channel_axis is None and 0 < max_elements < flat.shape[1]:
        values, weights = _error_sample(flat[0], max_elements)
    chunk = max(1, min(SEARCH_CANDIDATES, _SEARCH_BUDGET // max(1, values.numel())))
    errors = []
    for start in range(0, SEARCH_CANDIDATES, chunk):
        s = scale[start : start + chunk, :, None]
        z = zero_point[start : start + chunk, :, None]
        x_hat = values[None] / s  # [k, C, M], in place from here on
        x_hat.round_().add_(z).clamp_(0, grid_max(bits)).sub_(z).mul_(s).sub_(values[None]).abs_().pow_(p)
        errors.append(x_hat.mean(dim=2) if weights is None else (x_hat * weights).sum(dim=2))
    best = torch.cat(errors).argmin(dim=0)  # first minimum, like the reference's strict '<'
    channels = torch.arange(flat.shape[0], device=x.device)
    best_min, best_max = cand_min[best, channels], cand_max[best, channels]
    if channel_axis is None:
        return best_min[0], best_max[0]
    return best_min, best_max


def search_range(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    channel_axis: int | None = None,
    p: float = SEARCH_P,
    one_sided: bool | None = None,
    max_elements: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of the best of 100 candidate ranges (see ``search_min_max``).

    Per tensor (``channel_axis=None``) both are scalars; otherwise one value per index along
    ``channel_axis``. zero_point is a float tensor holding integers in [0, 2^b - 1].
    """
    best_min, best_max = search_min_max(x, bits, symmetric, channel_axis, p, one_sided, max_elements)
    return qparams_from_range(best_min, best_max, bits, symmetric)


def _error_sample(flat: torch.Tensor, max_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weighted subset of ``flat`` [M] whose weighted error sum estimates the mean error.

    The top k = max_elements / 8 elements by |x| (they decide the clipping error) enter with
    weight 1 / M; a seeded uniform sample of m = max_elements - k elements, from which those
    top ones are dropped, with weight 1 / m (unbiased for the mean error over the others).
    Returns ``(values [1, n], weights [n])``.
    """
    total = flat.numel()
    top = max(1, max_elements // 8)
    magnitude = flat.abs()
    top_values, top_index = magnitude.topk(top, sorted=False)
    threshold = top_values.min()
    generator = torch.Generator(device=flat.device).manual_seed(0)
    sample = flat[torch.randint(total, (max_elements - top,), generator=generator, device=flat.device)]
    rest = sample[sample.abs() < threshold]
    values = torch.cat([flat[top_index], rest])
    weights = torch.cat(
        [
            torch.full((top,), 1.0 / total, device=flat.device),
            torch.full((rest.numel(),), 1.0 / max(1, max_elements - top), device=flat.device),
        ]
    )
    return values[None], weights


# ---------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------
class UniformAffineQuantizer(nn.Module):
    """Fake-quantizes a tensor on the grid above (BRECQ / Q-Diffusion's name for it).

    Weights: ``channels`` = output channels (axis 0); ranges from ``init_range(weight)``.
    Activations: per tensor; ranges initialised batch by batch with ``calibrating = True``
    (search on each batch, exponential moving average of min / max, docs/method.md §0), then the
    step size ``scale`` may be learned (a Parameter; straight-through rounding, LSQ-style)
    while the zero-point stays fixed. ``qdrop`` (set only while a unit is reconstructed, see
    ``edadm.recon.qdrop``) mixes the float input back into the output element-wise.

    ``timestep_groups`` (activations only): G (scale, zero_point) pairs, [G] each, one per
    group of sampling steps; sample b of a batch uses its group's (dim 0 is the batch).
    """

    def __init__(
        self,
        bits: int,
        symmetric: bool = True,
        channels: int | None = None,
        one_sided: bool | None = None,
        timestep_groups: TimestepGroups | None = None,
    ) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"UniformAffineQuantizer: bits={bits} outside 2..8")
        if timestep_groups is not None and channels is not None:
            raise ValueError("timestep groups are for per-tensor (activation) quantizers")
        self.bits = bits
        self.symmetric = symmetric
        self.channel_axis = None if channels is None else 0
        self.one_sided = one_sided  # None: decided on the first calibration batch, then fixed
        self.timestep_groups = timestep_groups
        shape = () if channels is None else (channels,)
        if timestep_groups is not None:
            shape = (timestep_groups.count,)
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(shape))
        self.initialized = False
        self.calibrating = False
        self.running_min: torch.Tensor | None = None
        self.running_max: torch.Tensor | None = None
        self.calibrated_groups: torch.Tensor | None = None  # [G] bool while calibrating with groups
        self.qdrop: ElementMixer | None = None
        self.search_max_elements = 0  # >0: subsampled error in the calibration search

    @property
    def group_count(self) -> int:
        """Sets of (scale, zero_point) over timesteps: 1, or G with timestep groups."""
        return 1 if self.timestep_groups is None else self.timestep_groups.count

    def extra_repr(self) -> str:
        granularity = "per-tensor" if self.channel_axis is None else f"per-channel({self.scale.numel()})"
        if self.timestep_groups is not None:
            granularity += f", timestep-groups({self.group_count})"
        return f"bits={self.bits}, symmetric={self.symmetric}, {granularity}, one_sided={self.one_sided}"

    @torch.no_grad()
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.initialized = True

    @torch.no_grad()
    def init_range(self, x: torch.Tensor) -> None:
        """Set the range from one tensor (a weight) by the 100-candidate search."""
        self.set_qparams(
            *search_range(x, self.bits, self.symmetric, self.channel_axis, one_sided=self.one_sided)
        )

    def start_calibration(self) -> None:
        """Forget the range; the next forwards (``calibrating``) rebuild it by EMA over batches."""
        self.calibrating = True
        self.initialized = False
        self.running_min = self.running_max = self.calibrated_groups = None

    def finish_calibration(self) -> None:
        self.calibrating = False
        self.running_min = self.running_max = self.calibrated_groups = None

    def uncalibrated_groups(self) -> list[int]:
        """The timestep groups no calibration sample reached (while calibrating; [] without groups)."""
        if self.timestep_groups is None or not self.calibrating:
            return []
        if self.calibrated_groups is None:
            return list(range(self.group_count))
        return [g for g, seen in enumerate(self.calibrated_groups.tolist()) if not seen]

    @torch.no_grad()
    def observe(self, x: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        """Search this batch's range and fold it into the running range (EMA, docs/method.md §0).

        ``groups`` [B]: the timestep group of each sample (dim 0 of ``x``); each group's range
        is searched on its own samples and folded into its own running range.
        """
        if self.one_sided is None:
            self.one_sided = bool(x.min() >= 0)
        if groups is not None:
            self._observe_groups(x, groups)
            return
        new_min, new_max = search_min_max(
            x,
            self.bits,
            self.symmetric,
            self.channel_axis,
            one_sided=self.one_sided,
            max_elements=self.search_max_elements,
        )
        if self.running_min is None:
            self.running_min, self.running_max = new_min, new_max
        else:
            self.running_min = EMA_MOMENTUM * self.running_min + (1 - EMA_MOMENTUM) * new_min
            self.running_max = EMA_MOMENTUM * self.running_max + (1 - EMA_MOMENTUM) * new_max
        self.set_qparams(*qparams_from_range(self.running_min, self.running_max, self.bits, self.symmetric))

    def _observe_groups(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        if self.running_min is None:
            self.running_min = torch.zeros(self.group_count, device=x.device)
            self.running_max = torch.zeros(self.group_count, device=x.device)
            self.calibrated_groups = torch.zeros(self.group_count, dtype=torch.bool)
        for g in groups.unique().tolist():
            new_min, new_max = search_min_max(
                x[groups == g],
                self.bits,
                self.symmetric,
                one_sided=self.one_sided,
                max_elements=self.search_max_elements,
            )
            if self.calibrated_groups[g]:
                new_min = EMA_MOMENTUM * self.running_min[g] + (1 - EMA_MOMENTUM) * new_min
                new_max = EMA_MOMENTUM * self.running_max[g] + (1 - EMA_MOMENTUM) * new_max
            self.running_min[g], self.running_max[g] = new_min, new_max
            self.calibrated_groups[g] = True
        # groups not seen yet get a placeholder range; no sample of this batch uses it
        self.set_qparams(*qparams_from_range(self.running_min, self.running_max, self.bits, self.symmetric))

    def forward(self, x: torch.Tensor, group_repeats: int = 1) -> torch.Tensor:
        """Fake-quantize ``x``; with timestep groups its dim 0 is the batch, or the batch times
        ``group_repeats`` (attention heads folded into it, sample-major)."""
        groups = None
        if self.timestep_groups is not None:
            groups = self.timestep_groups.batch_index(x.shape[0], x.device, group_repeats)
        if self.calibrating:
            self.observe(x, groups)
        if not self.initialized:
            raise RuntimeError(
                "an activation quantizer has no range yet: run edadm.quant.calibrate_activations(model, ...) "
                "or load a reconstructed state (load_quant_model) before a quantized forward"
            )
        if groups is None:
            x_hat = fake_quantize(x, self.scale, self.zero_point, self.bits, self.channel_axis).to(x.dtype)
        else:
            # gather: each sample's loss gradient reaches its own group's step
            scale, zero_point = self.scale[groups], self.zero_point[groups]
            x_hat = fake_quantize(x, scale, zero_point, self.bits, channel_axis=0).to(x.dtype)
        if self.qdrop is not None:
            x_hat = self.qdrop.mix(x, x_hat)
        return x_hat
