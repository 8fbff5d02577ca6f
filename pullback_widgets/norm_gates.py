"""LayerNorm and GroupNorm with their statistics held constant in the backward.

The later version of the paper's code treats a normalisation's mean and variance as constants
in the backward, like a gate: y = w·(x - mean)/sqrt(var + eps) + b gives
grad_x = w·grad_y/sqrt(var + eps), with no terms through the statistics. The forward is the
model's own op, bit for bit; with ``gate="hard"`` the backward is autograd's own (statistics
differentiated), bit for bit. The weight and bias get their plain gradients either way.

Eval-mode BatchNorm needs nothing: its statistics are running buffers, constants already.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .gates import GateSettings, compute_dtype


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
    _, mean, rstd = torch.ops.aten.native_group_norm(
        x.contiguous(), None, None, n, c, x[0, 0].numel(), num_groups, eps)
    trailing = (1,) * (x.dim() - 2)
    per_channel = c // num_groups

    def spread(stat: Tensor) -> Tensor:  # (N, G) -> (N, C, 1, ...)
        return stat.repeat_interleave(per_channel, dim=1).view(n, c, *trailing)

    return spread(mean), spread(rstd)


def _gradient_node(tensor: Tensor | None):
    """The autograd node a gradient for ``tensor`` goes to, or None if it needs none."""
    if tensor is None or not tensor.requires_grad:
        return None
    try:
        return torch.autograd.graph._get_grad_fn_or_grad_acc(tensor)
    except AttributeError:  # another torch version: assume every gradient is wanted
        return True


def _will_run(node) -> bool:
    """Whether the running backward uses the gradient sent to ``node``. A custom Function's
    ``needs_input_grad`` is fixed at forward time; a pullback wants only the input's gradient,
    so the norm's weight and bias gradients would be computed for nothing."""
    if node is None or node is True:
        return node is True
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


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
        # The op runs on detached copies with its own graph, which the hard gate pulls back
        # through: autograd's own backward, bit for bit.
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad)
                      for t in (x, weight, bias)]
            out = hard_op(*leaves)
        ctx.inner = (out, leaves)
        ctx.nodes = [_gradient_node(t) for t in (x, weight, bias)]
        ctx.statistics, ctx.affine_shape, ctx.settings = statistics, affine_shape, settings
        ctx.cached_statistics = None
        return out.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        out, leaves = ctx.inner
        needed = [_will_run(node) for node in ctx.nodes]
        if ctx.settings.gate == "hard":
            wanted = [i for i in range(3) if needed[i]]
            if not wanted:
                return None, None, None, None, None, None, None
            grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad_out,
                                        retain_graph=True)
            result: list[Tensor | None] = [None, None, None]
            for i, grad in zip(wanted, grads):
                result[i] = grad
            return (*result, None, None, None, None)
        # At least float32 (see gates), each gradient cast back to its input's dtype.
        dtype = compute_dtype(leaves[0].dtype)
        x, weight, bias = (None if t is None else t.detach() for t in leaves)
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
