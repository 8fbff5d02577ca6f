"""Attention as a gate: out_i = sum_j a_ij·v_j, with a = softmax(q·kᵀ·scale + mask).

The attention weights are data-dependent gates on the value paths. The forward is the model's
own ``F.scaled_dot_product_attention`` call, bit for bit (whatever backend it picks). The
backward softens the weights to A_T = softmax(q·kᵀ·scale / T + mask), T of the kind
``"attention"`` (default 1.0). Masks (boolean, additive, ``is_causal``) are applied to the
softened scores exactly as the model applies them to its own; a row whose every key is masked
gets no weight.

- ``attention_weights="detached"`` (default; the later code's rule for PVT): out = A_T·v with
  A_T a constant. The gradient flows to v only: grad_v = A_Tᵀ·grad_out; q and k get none.
  T -> 0 gives hard (argmax) weights, T = 1 the model's own.
- ``attention_weights="differentiated"`` (the later code's rule for nn.MultiheadAttention):
  the gradient of softmax(S/T + mask)·v with respect to q, k and v, the 1/T factor passed
  straight through (d(S/T)/dS taken as 1), S = q·kᵀ·scale.

With ``gate="hard"`` the backward is autograd's own through the model's call, bit for bit.
Dropout on the weights and grouped-query attention (``enable_gqa``) are refused.

Under autocast (attention is on its lower-precision list) the call casts q, k, v and a float
mask to the autocast dtype: the soft backward computes the weights from those rounded values,
the ones the model's weights were computed from, and the hard gate's call runs again under the
forward's autocast, wherever the backward runs (torch's advice is a backward outside autocast).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .gates import GateSettings, as_dtype, capped_reciprocal, compute_dtype, first_order
from .own_call import OwnCall
from .pre_activations import saved_tensors
from .validation import PullbackWidgetsError


@dataclass(frozen=True)
class AttentionCall:
    """The arguments of one ``scaled_dot_product_attention`` call, besides q, k, v, mask."""

    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False

    def check(self, query: Tensor) -> None:
        if self.dropout_p > 0:
            raise PullbackWidgetsError(
                f"attention dropout is on (dropout_p={self.dropout_p}): a pullback needs a "
                "deterministic forward. Sessions and excitation_pullback run the model in eval "
                "mode, so this model passes dropout_p even then: have it pass 0.0 outside "
                "training (dropout_p=self.p if self.training else 0.0)")
        if self.enable_gqa:
            raise PullbackWidgetsError("grouped-query attention (enable_gqa=True) is not "
                                       "supported by the attention gate")
        if query.is_nested:
            raise PullbackWidgetsError("nested-tensor attention is not supported by the "
                                       "attention gate")


def softened_weights(query: Tensor, key: Tensor, mask: Tensor | None, call: AttentionCall,
                     settings: GateSettings) -> tuple[Tensor, float]:
    """(A_T (..., L, S) in at least float32, the score scale).

    Each row is centred on its largest allowed score before it is scaled by 1/T (capped), a
    shift softmax does not see: so T -> 0 gives the argmax among the allowed keys, never an
    overflow or a NaN.
    """
    dtype = compute_dtype(query.dtype)
    scale = call.scale if call.scale is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = (query.to(dtype) @ key.to(dtype).transpose(-2, -1)) * scale
    if scores.shape[-1] == 0:  # no keys: no weights (torch's output is zeros)
        return scores, scale
    if mask is None and not call.is_causal:  # the common case, without the masking passes
        inverse_t = capped_reciprocal(settings.temperature_for(scores, kind="attention"), dtype)
        return torch.softmax((scores - scores.amax(-1, keepdim=True)) * inverse_t, dim=-1), \
            scale
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device)
    if call.is_causal:
        allowed = allowed.tril()
    additive = None
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        allowed = allowed & (mask != -math.inf)
        additive = mask.to(dtype).masked_fill(~allowed, 0.0)
    # A relative T measures the spread of the scores of allowed keys only: masked keys (padding)
    # take no part in the forward, and must not move the pullback.
    inverse_t = capped_reciprocal(
        settings.temperature_for(scores, kind="attention", where=allowed), dtype)
    row_max = scores.masked_fill(~allowed, -math.inf).amax(-1, keepdim=True)
    row_max = row_max.masked_fill(row_max == -math.inf, 0.0)  # a row with no key allowed
    logits = (scores - row_max) * inverse_t
    if additive is not None:
        logits = logits + additive
    logits = logits.masked_fill(~allowed, -math.inf)
    # A row with every key masked is NaN after softmax: it gets no weight at all.
    return torch.softmax(logits, dim=-1).nan_to_num(0.0), scale


class SoftAttention(torch.autograd.Function):
    """Runs the model's attention call forward; pulls back through the softened weights."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                hard_op: Callable[..., Tensor], call: AttentionCall,
                settings: GateSettings) -> Tensor:
        # The hard gate pulls back through the model's own call: bit for bit, for whichever
        # backend ran, and under the autocast it ran under.
        ctx.own = OwnCall(hard_op, (query, key, value, mask))
        output, _ = ctx.own.run((query, key, value, mask))
        ctx.save_for_backward(query, key, value, mask)
        ctx.call, ctx.settings = call, settings
        # Autocast casts q, k, v and a float mask to this dtype inside the call: the soft
        # backward must see the values the op saw.
        ctx.op_dtype = output.dtype
        return output.detach()

    @staticmethod
    @first_order
    def backward(ctx, grad_out: Tensor):
        own, settings, saved = ctx.own, ctx.settings, saved_tensors(ctx)
        if settings.gate == "hard":
            return (*own.plain_gradients(grad_out, saved), None, None, None)
        query, key, value, mask = (None if t is None else t.detach() for t in saved)
        grad_dtypes = [t.dtype for t in (query, key, value)]
        mask_dtype = None if mask is None else mask.dtype
        if ctx.op_dtype != query.dtype:  # autocast: the values the call computed with
            query, key, value = (as_dtype(t, ctx.op_dtype) for t in (query, key, value))
            if mask is not None and mask.is_floating_point():
                mask = as_dtype(mask, ctx.op_dtype)
        weights, scale = softened_weights(query, key, mask, ctx.call, settings)
        grad = grad_out.to(weights.dtype)
        grad_value = (weights.transpose(-2, -1) @ grad).sum_to_size(value.shape) \
            .to(grad_dtypes[2])
        if settings.attention_weights == "detached":
            return None, None, grad_value, None, None, None, None
        # Gradient of softmax(logits)·v at the softened logits; d logits / d scores taken as 1.
        grad_weights = grad @ value.to(weights.dtype).transpose(-2, -1)
        grad_logits = weights * (grad_weights - (grad_weights * weights).sum(-1, keepdim=True))
        grad_query = (grad_logits @ key.to(weights.dtype) * scale).sum_to_size(query.shape) \
            .to(grad_dtypes[0])
        grad_key = (grad_logits.transpose(-2, -1) @ query.to(weights.dtype) * scale
                    ).sum_to_size(key.shape).to(grad_dtypes[1])
        grad_mask = None
        if own.wanted()[3]:  # a learned additive mask (a bias on the logits)
            grad_mask = grad_logits.sum_to_size(mask.shape).to(mask_dtype)
        return grad_query, grad_key, grad_value, grad_mask, None, None, None
