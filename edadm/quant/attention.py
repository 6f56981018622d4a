"""QuantAttnProcessor: a diffusers attention processor that quantizes q, k, v and the softmax output.

docs/method.md §0: in attention, q, k and v are quantized at the activation bit-width
(``quant.qkv_bits`` overrides it), the softmax output at 8 bit (``quant.attn_bits``), and the
QK^T and softmax * V products run on the fake-quantized operands. The projections (to_q, to_k,
to_v, to_out.0) are QuantLayers, so their inputs are quantized there. The processor is set on
each ``Attention`` with ``set_processor`` (no patching of diffusers internals); it keeps the
processor it replaces and calls it whenever its quantization is off, so
``set_quant_state(model, False, False)`` reproduces the float model exactly.

It follows diffusers' ``AttnProcessor`` step by step (the explicit softmax is what lets us
quantize the attention probabilities). Attention modules with features it does not
reproduce (q / k norms, added kv projections, other processors) keep their processor and
are reported as unsupported by ``quantize_model``.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from edadm.quant.quantizer import UniformAffineQuantizer
from edadm.quant.timestep_groups import TimestepGroups

SUPPORTED_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


def unsupported_reason(attn: Attention) -> str | None:
    """Why this Attention's products cannot be quantized by QuantAttnProcessor (None: they can)."""
    if type(attn.processor) not in SUPPORTED_PROCESSORS:
        return f"processor {type(attn.processor).__name__} is not AttnProcessor / AttnProcessor2_0"
    if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
        return "q / k normalisation"
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        return "added kv projections"
    return None


class QuantAttnProcessor(nn.Module):
    """Quantizes q, k, v (``act_quantizer_q/k/v``) and the softmax output (``act_quantizer_w``).

    ``qkv_bits`` / ``softmax_bits`` of None leave those tensors in float. ``timestep_groups``:
    one range per group of sampling steps in each of them.
    """

    def __init__(
        self,
        original_processor: object,
        qkv_bits: int | None,
        softmax_bits: int | None,
        symmetric: bool = True,
        timestep_groups: TimestepGroups | None = None,
    ) -> None:
        super().__init__()
        self.original_processor = original_processor
        self.qkv_bits, self.softmax_bits = qkv_bits, softmax_bits

        def qkv() -> UniformAffineQuantizer | None:
            return (
                UniformAffineQuantizer(qkv_bits, symmetric, timestep_groups=timestep_groups)
                if qkv_bits
                else None
            )

        self.act_quantizer_q, self.act_quantizer_k, self.act_quantizer_v = qkv(), qkv(), qkv()
        # the softmax output lies in [0, 1]: one-sided [0, tau] grid
        self.act_quantizer_w = (
            UniformAffineQuantizer(softmax_bits, symmetric, one_sided=True, timestep_groups=timestep_groups)
            if softmax_bits
            else None
        )
        self.use_act_quant = True

    def act_quantizers(self) -> list[UniformAffineQuantizer]:
        quantizers = [self.act_quantizer_q, self.act_quantizer_k, self.act_quantizer_v, self.act_quantizer_w]
        return [q for q in quantizers if q is not None]

    @staticmethod
    def _quantize(
        quantizer: UniformAffineQuantizer | None, x: torch.Tensor, group_repeats: int = 1
    ) -> torch.Tensor:
        return x if quantizer is None else quantizer(x, group_repeats)

    def attend(
        self,
        attn: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """softmax(q k^T * scale) v on the fake-quantized operands, per head.

        query [B, T, C], key / value [B, S, C] (projections' outputs); returns [B x heads, T, C /
        heads]. q, k, v are quantized per tensor, so before or after the head split is the same;
        before it, dim 0 is the batch, as timestep groups need. The softmax output's dim 0 is
        batch x heads (sample-major).
        """
        query = attn.head_to_batch_dim(self._quantize(self.act_quantizer_q, query))
        key = attn.head_to_batch_dim(self._quantize(self.act_quantizer_k, key))
        value = attn.head_to_batch_dim(self._quantize(self.act_quantizer_v, value))
        scores = attn.get_attention_scores(query, key, attention_mask)
        attention_probs = self._quantize(self.act_quantizer_w, scores, attn.heads)
        return torch.bmm(attention_probs, value)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.use_act_quant:
            return self.original_processor(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                temb=temb,
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        # 1. projections (QuantLayers: their inputs are quantized there)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        # 2-3. the products of the quantized q, k, v and softmax output
        hidden_states = attn.batch_to_head_dim(self.attend(attn, query, key, value, attention_mask))

        # 4. output projection and dropout
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
