"""LayerNorm and GroupNorm with their statistics held constant in the backward.

The later version of the paper's code treats a normalisation's mean and variance as constants
in the backward, like a gate: y = w·(x - mean)/sqrt(var + eps) + b gives
grad_x = w·grad_y/sqrt(var + eps), with no terms through the statistics. The forward is the
model's own op, bit for bit; with ``gate="hard"`` the backward is autograd's own (statistics
differentiated), bit for bit. The weight and bias get their plain gradients either way.

Eval-mode BatchNorm needs nothing: its statistics are running buffers, constants already.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .gates import GateSettings, compute_dtype, first_order
from .own_call import OwnCall
from .pre_activations import saved_tensors


def layer_norm_statistics(x: Tensor, normalized_shape: Sequence[int], eps: float
                          ) -> tuple[Tensor, Tensor]:
    """(mean, 1/sqrt(var + eps)) over the last ``len(normalized_shape)`` dims, kept as size-1
    dims so that both broadcast against ``x``: layer_norm's own kernel computes them."""
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, list(normalized_shape), None, None, eps)
    return mean, rstd


def group_norm_statistics(x: Tensor, num_groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, 1/sqrt(var + eps)) over each example's channel groups, as (N, C, 1, ...) so that
    both broadcast against ``x`` (N, C, ...): group_norm's own kernel computes them."""
    n, c = x.shape[:2]
    _, mean, rstd = torch.ops.aten.native_group_norm(  # a batch of 0 has no x[0, 0]
        x.contiguous(), None, None, n, c, math.prod(x.shape[2:]), num_groups, eps)
    trailing = (1,) * (x.dim() - 2)
    per_channel = c // num_groups

    def spread(stat: Tensor) -> Tensor:  # (N, G) -> (N, C, 1, ...)
        return stat.repeat_interleave(per_channel, dim=1).view(n, c, *trailing)

    return spread(mean), spread(rstd)


class ConstantStatisticsNorm(torch.autograd.Function):
    """Runs ``hard_op(x, weight, bias)`` forward; pulls back with constant statistics.

    ``statistics(x)`` gives (mean, rstd) broadcastable to x; ``affine_shape`` is the shape the
    weight and bias broadcast as against x (``normalized_shape`` for LayerNorm, (C, 1, ...)
    for GroupNorm).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                hard_op: Callable[..., Tensor], statistics: Callable[[Tensor], tuple],
                affine_shape: tuple[int, ...], settings: GateSettings) -> Tensor:
        # The hard gate pulls back through the model's own call: bit for bit, under the
        # autocast it ran under (CUDA's autocast runs norms in float32).
        ctx.own = OwnCall(hard_op, (x, weight, bias))
        output, _ = ctx.own.run((x, weight, bias))
        ctx.save_for_backward(x, weight, bias)
        ctx.statistics, ctx.affine_shape, ctx.settings = statistics, affine_shape, settings
        ctx.cached_statistics = None
        return output.detach()

    @staticmethod
    @first_order
    def backward(ctx, grad_out: Tensor):
        own, saved = ctx.own, saved_tensors(ctx)
        if ctx.settings.gate == "hard":
            return (*own.plain_gradients(grad_out, saved), None, None, None, None)
        needed = own.wanted()
        # At least float32 (see gates), each gradient cast back to its input's dtype.
        dtype = compute_dtype(saved[0].dtype)
        x, weight, bias = (None if t is None else t.detach() for t in saved)
        if ctx.cached_statistics is None:  # the statistics do not change between pullbacks
            ctx.cached_statistics = ctx.statistics(x.to(dtype))
        mean, rstd = ctx.cached_statistics
        shape = ctx.affine_shape
        grad = grad_out.to(dtype)
        grad_x = grad * rstd
        grad_weight = grad_bias = None
        if weight is not None and needed[1]:
            grad_weight = (grad_x * (x.to(dtype) - mean)).sum_to_size(shape) \
                .view(weight.shape).to(weight.dtype)
        if bias is not None and needed[2]:
            grad_bias = grad.sum_to_size(shape).view(bias.shape).to(bias.dtype)
        if weight is not None:
            grad_x = grad_x * weight.to(dtype).view(shape)
        return grad_x.to(x.dtype), grad_weight, grad_bias, None, None, None, None
