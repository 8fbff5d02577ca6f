"""Soft gates for activations of the form z·g(z): SiLU, GELU, Hardswish, LeakyReLU, PReLU.

The forward is the model's own op, bit for bit. The backward multiplies the incoming gradient by
the activation's own gate at temperature T, held constant: the derivative of the gate itself is
dropped, as for the ReLU (z·1[z > 0]). With ``gate="hard"`` the backward is autograd's own
(the same aten backward kernel), bit for bit.

From the later version of the paper's code:

- SiLU / Swish, z·sigmoid(z):          gate sigmoid(z / T)              (kind "silu", T = 1.6)
- GELU, z·Phi(z):                      gate Phi(z / T)                  (kind "gelu", T = 1.0)
  and for ``approximate="tanh"`` the tanh form 0.5·(1 + tanh(sqrt(2/pi)·(u + 0.044715·u³))),
  u = z / T.

Ours, beyond the paper and its code:

- Hardswish, z·clamp((z + 3)/6, 0, 1): gate clamp((z/T + 3)/6, 0, 1)   (kind "hardswish", 1.0)
- LeakyReLU / PReLU with slope a:      gate a + (1 - a)·g(z / T), g the settings' gate
  (sigmoid or normal_cdf)                                               (kind "relu")
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .gates import GateSettings, as_dtype, capped_reciprocal, compute_dtype, first_order
from .pre_activations import Remake, keep_pre_activation, kept_pre_activation, saved_tensors


def _sigmoid_gate(u: Tensor) -> Tensor:
    return torch.sigmoid(u)


def _normal_cdf_gate(u: Tensor) -> Tensor:
    return torch.special.ndtr(u)


def _tanh_normal_cdf_gate(u: Tensor) -> Tensor:
    """GELU's tanh approximation of Phi(u)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u.pow(3))))


def _hardswish_gate(u: Tensor) -> Tensor:
    return ((u + 3.0) / 6.0).clamp(0.0, 1.0)


_RELU_GATES = {"sigmoid": _sigmoid_gate, "normal_cdf": _normal_cdf_gate}


@dataclass(frozen=True)
class ActivationRule:
    """One activation's soft gate and its plain backward.

    ``gate(u, gate_name)``: the gate's value at u = z / T; ``gate_name`` is the settings' gate
    (only the leaky family uses it). ``plain_backward(grad, z)``: autograd's own gradient.
    """

    kind: str
    gate: Callable[[Tensor, str], Tensor]
    plain_backward: Callable[[Tensor, Tensor], Tensor]


SILU = ActivationRule(
    "silu", lambda u, _: _sigmoid_gate(u), torch.ops.aten.silu_backward)
HARDSWISH = ActivationRule(
    "hardswish", lambda u, _: _hardswish_gate(u), torch.ops.aten.hardswish_backward)


def gelu_rule(approximate: str) -> ActivationRule:
    gate = _tanh_normal_cdf_gate if approximate == "tanh" else _normal_cdf_gate
    return ActivationRule(
        "gelu", lambda u, _: gate(u),
        lambda grad, z: torch.ops.aten.gelu_backward(grad, z, approximate=approximate))


def leaky_relu_rule(slope: float) -> ActivationRule:
    def gate(u: Tensor, gate_name: str) -> Tensor:
        return slope + (1.0 - slope) * _RELU_GATES[gate_name](u)
    return ActivationRule(
        "relu", gate,
        lambda grad, z: torch.ops.aten.leaky_relu_backward(grad, z, slope, False))


class SoftActivation(torch.autograd.Function):
    """Runs ``hard_op`` forward; pulls back through the rule's gate at the kind's T."""

    @staticmethod
    def forward(ctx, z: Tensor, hard_op: Callable[[Tensor], Tensor], rule: ActivationRule,
                inplace: bool, settings: GateSettings, remake: Remake | None = None) -> Tensor:
        keep_pre_activation(ctx, z, inplace, remake)
        out = hard_op(z)
        if inplace:
            ctx.mark_dirty(z)
        ctx.rule, ctx.settings = rule, settings
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad_out: Tensor):
        z = kept_pre_activation(ctx)
        rule, settings = ctx.rule, ctx.settings
        if settings.gate == "hard":
            grad_in = rule.plain_backward(grad_out, z)
        else:
            # At least float32, 1/T capped (see gates); out of place: grad_out may be vmapped.
            dtype = compute_dtype(z.dtype)
            u = z.to(dtype) * capped_reciprocal(settings.temperature_for(z, kind=rule.kind),
                                                dtype)
            grad_in = (grad_out.to(dtype) * rule.gate(u, settings.gate)).to(grad_out.dtype)
        return grad_in, None, None, None, None, None


class SoftPReLU(torch.autograd.Function):
    """PReLU with a learned slope per channel (dim 1) or one for all: the leaky gate.

    The weight's gradient is the plain one, sum over examples and positions of grad·min(z, 0)
    (the slope does not gate the weight's own path).
    """

    @staticmethod
    def forward(ctx, z: Tensor, weight: Tensor, hard_op: Callable[[Tensor, Tensor], Tensor],
                settings: GateSettings) -> Tensor:
        ctx.save_for_backward(z, weight)
        ctx.settings = settings
        out = hard_op(z, weight)
        # Autocast (prelu is on its lower-precision list) casts z and the weight to this dtype
        # inside the call: the backward must see the values the op saw, as autograd's does.
        ctx.op_dtype = out.dtype
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad_out: Tensor):
        z, weight = saved_tensors(ctx)
        settings = ctx.settings
        z_op, weight_op = as_dtype(z, ctx.op_dtype), as_dtype(weight, ctx.op_dtype)
        # The slope broadcast like torch.prelu does it: over dim 1 (channels) when per channel;
        # one slope as a 0-d tensor, so that a 0-d z keeps its shape.
        slope = weight_op.reshape(()) if weight.numel() == 1 \
            else weight_op.view(-1, *([1] * (z.dim() - 2)))
        if settings.gate == "hard":
            grad_in, _ = torch.ops.aten._prelu_kernel_backward(grad_out, z_op, slope)
        else:
            dtype = compute_dtype(z_op.dtype)
            u = z_op.to(dtype) * capped_reciprocal(
                settings.temperature_for(z_op, kind="relu"), dtype)
            gate = slope.to(dtype) + (1.0 - slope.to(dtype)) * _RELU_GATES[settings.gate](u)
            grad_in = grad_out.to(dtype) * gate
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * z_op.clamp(max=0)).sum_to_size(slope.shape) \
                .reshape(weight.shape).to(weight.dtype)
        return as_dtype(grad_in, z.dtype), grad_weight, None, None
