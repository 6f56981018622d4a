"""The integer UNet under ``torch.compile`` (inductor): element-wise work fused around the int8 kernels.

Eager integer inference (``edadm.deploy.integer``) runs every layer's input rounding (scale,
round, clamp, cast to uint8) and the float parts (GroupNorm, SiLU, residual adds, attention's
fake-quantized products) as separate passes over memory. Compiled, inductor fuses them: a
GroupNorm + SiLU + the next layer's input quantization become one kernel that writes uint8
codes. The int8 convolutions and linear layers stay the oneDNN kernels of the eager path
(opaque custom ops, ``edadm::onednn_qconv2d_channels_last`` / ``edadm::onednn_qlinear``), so the codes are
the same; inductor keeps CPU divisions as divisions (no reciprocal), so rounding matches too.
Only fused float arithmetic (GroupNorm's reductions, sin / cos of the time embedding) differs
by float round-off, with the whole-network caveat of the ``integer`` module's docstring.

``compile_integer(model)`` returns a ``CompiledUNet``: shapes are static (``dynamic=False``),
compiled on the first call for its batch size, after one eager call that packs the int8
convolutions' weights for their input shapes; a later smaller batch (the last of a sampling
run) is padded up to it by repeating its last sample and the output sliced back, so it reuses
the compiled code instead of compiling a second shape. Inductor's FX graph cache (on by
default, ``torch._inductor.config.fx_graph_cache``) keeps the generated kernels on disk
(``TORCHINDUCTOR_CACHE_DIR``, default /tmp/torchinductor_$USER): a rerun with the same model
and scales skips code generation and the C++ compiler, though dynamo still traces.
Where inductor cannot run (no C++ compiler on CPU) or compilation fails, the model runs eager
and a warning says why.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from edadm.deploy.integer import IntegerLayer

logger = logging.getLogger(__name__)


def compile_unavailable_reason(device: torch.device | str) -> str | None:
    """Why inductor cannot compile for ``device`` here (None: it can)."""
    device = torch.device(device)
    if device.type == "cpu":
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()
        except exc.InvalidCxxCompiler:
            return "no C++ compiler found (inductor's CPU backend needs g++ or clang++; set CXX)"
    return None


class CompiledUNet(nn.Module):
    """``model`` compiled on first use, with eager fallback and batch padding (module docstring).

    Attributes other than the module's own (``config``, ``dtype``) are the wrapped model's, so
    it stands in for a UNet in ``generate_samples`` and ``sample``.
    """

    def __init__(self, model: nn.Module, options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        # not a registered submodule: the state_dict and parameters stay the model's once
        object.__setattr__(self, "_compiled", torch.compile(model, dynamic=False, options=options))
        self.batch_size: int | None = None  # the compiled batch size, set by the first call
        self.fallback_reason: str | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, *args: Any, **kwargs: Any) -> Any:
        if self.fallback_reason is not None:
            return self.model(sample, timestep, *args, **kwargs)
        batch = sample.shape[0]
        if self.batch_size is None:
            self.batch_size = batch
            if any(isinstance(m, IntegerLayer) for m in self.model.modules()):
                # one eager call first: the int8 convolutions pack their weights for the shapes
                # they meet (IntegerLayer._packed_conv_weight), and the compiled code uses those
                self.model(sample, timestep, *args, **kwargs)
        if batch > self.batch_size:  # larger than compiled: one more shape, compiled once
            return self._run(sample, timestep, *args, **kwargs)
        pad = self.batch_size - batch
        if pad == 0:
            return self._run(sample, timestep, *args, **kwargs)
        args = tuple(_pad_batch(a, batch, pad) for a in args)
        kwargs = {k: _pad_batch(v, batch, pad) for k, v in kwargs.items()}
        output = self._run(_pad_batch(sample, batch, pad), _pad_batch(timestep, batch, pad), *args, **kwargs)
        return _slice_batch(output, batch)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._compiled(*args, **kwargs)
        except _compile_errors() as error:  # the eager model still runs: say why, once
            first_line = str(error).splitlines()[0] if str(error) else ""
            self.fallback_reason = f"{type(error).__name__}: {first_line}"
            logger.warning("torch.compile failed, running the integer model eager: %s", self.fallback_reason)
            return self.model(*args, **kwargs)


def _compile_errors() -> tuple[type[Exception], ...]:
    """What dynamo / inductor raise when they cannot compile (a real error in the model is
    wrapped too; the eager rerun then raises it as it is)."""
    from torch._dynamo import exc as dynamo_exc
    from torch._inductor import exc as inductor_exc

    errors = (dynamo_exc.BackendCompilerFailed, dynamo_exc.TorchRuntimeError, inductor_exc.InductorError)
    return errors + (
        (inductor_exc.InvalidCxxCompiler,) if hasattr(inductor_exc, "InvalidCxxCompiler") else ()
    )


def _pad_batch(value: Any, batch: int, pad: int) -> Any:
    """``value`` with ``pad`` copies of its last row when it is a tensor of ``batch`` rows."""
    if not torch.is_tensor(value) or value.ndim == 0 or value.shape[0] != batch:
        return value
    return torch.cat([value, value[-1:].expand(pad, *value.shape[1:])])


def _slice_batch(output: Any, batch: int) -> Any:
    """The first ``batch`` rows of a UNet's output (tensor, tuple or diffusers ``*Output``)."""
    if torch.is_tensor(output):
        return output[:batch]
    if isinstance(output, tuple):
        return (output[0][:batch], *output[1:])
    return type(output)(sample=output.sample[:batch])


def compile_integer(model: nn.Module, options: dict[str, Any] | None = None) -> nn.Module:
    """``CompiledUNet(model)``, or ``model`` itself with a warning when inductor cannot run here.

    ``model``: an integer UNet (``to_integer``), or any UNet (the benchmark compiles FP32 and
    fake-quant ones the same way). ``options``: inductor options (``torch.compile``'s), e.g.
    ``{"freezing": True}`` for the benchmark's frozen FP32 baseline.
    """
    device = next(model.parameters()).device
    reason = compile_unavailable_reason(device)
    if reason is not None:
        logger.warning(
            "sample.int_compile: torch.compile unavailable, running the integer model eager: %s", reason
        )
        return model
    return CompiledUNet(model, options)
