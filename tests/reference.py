"""Slow, textbook forms of the excitation pullback, written independently of the package.

Nothing here imports pullback_widgets: these are the oracles the engine is compared with.
"""

from __future__ import annotations

import itertools
import math
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gate_value(z: Tensor, temperature: float, gate: str) -> Tensor:
    if gate == "sigmoid":
        return torch.sigmoid(z / temperature)
    if gate == "normal_cdf":
        return 0.5 * (1 + torch.erf(z / (temperature * math.sqrt(2.0))))
    return (z > 0).to(z.dtype)


# ---------------------------------------------------------------- path-sum form

def path_sum_pullback(weights: list[Tensor], x: Tensor, output: int, temperature: float,
                      gate: str) -> Tensor:
    """Pullback of a bias-free MLP ``W_L relu(... relu(W_1 x))`` as an explicit sum over paths.

    Every input-to-output path contributes the product of its weights and of the gates of the
    hidden neurons it passes through; x is (D,), the result is (D,).
    """
    gates, h = [], x
    for w in weights[:-1]:
        z = w @ h
        gates.append(gate_value(z, temperature, gate))
        h = torch.relu(z)
    widths = [w.shape[0] for w in weights[:-1]]
    result = torch.zeros_like(x)
    for i in range(x.shape[0]):
        total = 0.0
        for hidden in itertools.product(*[range(n) for n in widths]):
            nodes = (i, *hidden, output)
            term = 1.0
            for layer, w in enumerate(weights):
                term = term * w[nodes[layer + 1], nodes[layer]]
                if layer < len(hidden):
                    term = term * gates[layer][hidden[layer]]
            total = total + term
        result[i] = total
    return result


# ---------------------------------------------------------------- frozen-gate ops

def frozen_gate_clamp(z: Tensor, temperature: float, gate: str, low: float = 0.0,
                      high: float | None = None) -> Tensor:
    """clamp(z, low, high) in value, gradient g(z - low) g(high - z): z sg(g) + sg(f(z) - z g)."""
    g = gate_value(z - low, temperature, gate)
    if high is not None:
        g = g * gate_value(high - z, temperature, gate)
    if gate == "hard":
        g = ((z > low) & (z < high if high is not None else True)).to(z.dtype)
    hard = torch.clamp(z, low, high)
    return z * g.detach() + (hard - z * g).detach()


def soft_pool_autograd(x: Tensor, kernel: int, stride: int, padding: int, temperature: float,
                       dilation: int = 1, ceil_mode: bool = False,
                       detached: bool = False) -> Tensor:
    """Soft pool sum softmax(w/T) w per window, built from unfolded windows so autograd
    differentiates it (the weights too, unless ``detached``); padding is -inf. Same output
    size as max_pool2d."""
    n, c, h, w = x.shape
    out_h, out_w = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode).shape[-2:]
    span = dilation * (kernel - 1) + 1
    extra_h = max(0, (out_h - 1) * stride + span - (h + 2 * padding))
    extra_w = max(0, (out_w - 1) * stride + span - (w + 2 * padding))
    padded = F.pad(x, (padding, padding + extra_w, padding, padding + extra_h), value=-math.inf)
    windows = F.unfold(padded, kernel, dilation=dilation, stride=stride)
    windows = windows.view(n, c, kernel * kernel, out_h * out_w)
    p = torch.softmax(windows / temperature, dim=2)
    if detached:
        p = p.detach()
    soft = (p * torch.where(torch.isinf(windows), 0.0, windows)).sum(2)
    return soft.view(n, c, out_h, out_w)


def frozen_gate_pool(x: Tensor, kernel: int, stride: int, padding: int, temperature: float,
                     gate: str, dilation: int = 1, ceil_mode: bool = False,
                     detached: bool = False) -> Tensor:
    """Hard max-pool in value, soft-pool gradient."""
    hard = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    if gate == "hard":
        return hard
    soft = soft_pool_autograd(x, kernel, stride, padding, temperature, dilation, ceil_mode,
                              detached)
    return hard.detach() + soft - soft.detach()


def window_loop_pool_grad(x: Tensor, grad_out: Tensor, kernel: int | tuple[int, int],
                          stride: int | tuple[int, int], padding: int | tuple[int, int],
                          temperature: float, dilation: int | tuple[int, int] = 1,
                          ceil_mode: bool = False, detached: bool = False) -> Tensor:
    """The soft-pool gradient one window position at a time (all examples and channels at
    once), each by autograd through an explicit softmax, exp / sum, detached when ``detached``.
    Each geometry argument is one int or an (h, w) pair.
    """
    def pair(v):
        return (v, v) if isinstance(v, int) else tuple(v)

    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(pair, (kernel, stride, padding, dilation))
    h, w = x.shape[-2:]
    out_h, out_w = grad_out.shape[-2:]
    grad = torch.zeros_like(x)
    for oy, ox in itertools.product(range(out_h), range(out_w)):
        coords = []
        for ky, kx in itertools.product(range(kh), range(kw)):
            yy = oy * sh - ph + ky * dh
            xx = ox * sw - pw + kx * dw
            if 0 <= yy < h and 0 <= xx < w:  # padded positions take no part
                coords.append((yy, xx))
        values = torch.stack([x[:, :, yy, xx] for yy, xx in coords], dim=-1)
        values = values.detach().requires_grad_()
        with torch.enable_grad():  # also when called from inside a backward
            scaled = values / temperature
            exp = torch.exp(scaled - scaled.amax(dim=-1, keepdim=True).detach())
            weights = exp / exp.sum(dim=-1, keepdim=True)
            soft = ((weights.detach() if detached else weights) * values).sum(dim=-1)
            (local,) = torch.autograd.grad(soft, values, grad_out[:, :, oy, ox])
        for (yy, xx), d in zip(coords, local.unbind(-1)):
            grad[:, :, yy, xx] += d
    return grad


class FrozenGateReLU(nn.Module):
    """Stands in for nn.ReLU / nn.ReLU6 in a copied model: hard value, frozen-gate gradient."""

    def __init__(self, temperature: float, gate: str, high: float | None = None) -> None:
        super().__init__()
        self.temperature, self.gate, self.high = temperature, gate, high

    def forward(self, z: Tensor) -> Tensor:
        return frozen_gate_clamp(z, self.temperature, self.gate, 0.0, self.high)


class WindowLoopPool(nn.Module):
    """Stands in for nn.MaxPool2d (square, int arguments) in a copied model: hard value, the
    gradient of :func:`window_loop_pool_grad` (one window at a time)."""

    def __init__(self, pool: nn.MaxPool2d, temperature: float, detached: bool) -> None:
        super().__init__()
        self.pool, self.temperature, self.detached = pool, temperature, detached

    def forward(self, x: Tensor) -> Tensor:
        return _WindowLoopPoolFunction.apply(x, self.pool, self.temperature, self.detached)


class _WindowLoopPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pool, temperature, detached):
        ctx.save_for_backward(x)
        ctx.pool, ctx.temperature, ctx.detached = pool, temperature, detached
        return pool(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        p = ctx.pool
        grad = window_loop_pool_grad(x, grad_out, p.kernel_size, p.stride, p.padding,
                                     ctx.temperature, p.dilation, p.ceil_mode, ctx.detached)
        return grad, None, None, None


def frozen_gate_copy(model: nn.Module, temperature: float, gate: str, pool_temperature: float,
                     detached: bool) -> nn.Module:
    """A deep copy of a module-built model with every nn.ReLU / nn.ReLU6 / nn.MaxPool2d replaced
    by its slow reference (functional calls in forward() are not seen: wrap those yourself)."""
    copy = deepcopy(model)
    for parent in list(copy.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, FrozenGateReLU(temperature, gate, 6.0))
            elif isinstance(child, nn.ReLU):
                setattr(parent, name, FrozenGateReLU(temperature, gate))
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, name, WindowLoopPool(child, pool_temperature, detached))
    return copy


# ---------------------------------------------------------------- a network with every op form

class EveryOpNet(nn.Module):
    """Small CNN that calls ReLU and max-pool in every supported form (see forward)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)  # reused below
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.relu6 = nn.ReLU6()
        self.conv4 = nn.Conv2d(6, 8, 1)
        self.conv5 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)
        with torch.no_grad():  # non-trivial eval-mode batch norm
            self.bn1.running_mean.uniform_(-0.2, 0.2)
            self.bn1.running_var.uniform_(0.5, 2.0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))            # nn.ReLU(inplace=True)
        x = self.pool(x)                                  # nn.MaxPool2d with padding
        y = self.relu(self.conv2(x))                      # the same module again
        y = self.relu6(self.conv3(y) * 4)                 # nn.ReLU6
        x = torch.relu_(x + y)                            # functional, in place, residual
        x = F.max_pool2d(x, 2, ceil_mode=True)            # functional, ceil_mode
        x = self.conv4(x).relu()                          # Tensor.relu
        x = F.hardtanh(self.conv5(x) * 3, 0.0, 6.0)       # hardtanh(0, 6)
        x = F.relu(x - 0.5)                               # F.relu
        return self.fc(x.mean((2, 3)))


def every_op_reference(net: EveryOpNet, x: Tensor, temperature: float, gate: str,
                       pool_temperature: float | None = None, detached: bool = False) -> Tensor:
    """EveryOpNet's forward with frozen-gate ops: its input gradient is the pullback.
    ``detached``: the soft pools' softmax weights are constants."""
    tp = temperature if pool_temperature is None else pool_temperature

    def clamp(z, low=0.0, high=None):
        return frozen_gate_clamp(z, temperature, gate, low, high)

    x = clamp(net.bn1(net.conv1(x)))
    x = frozen_gate_pool(x, 3, 2, 1, tp, gate, detached=detached)
    y = clamp(net.conv2(x))
    y = clamp(net.conv3(y) * 4, 0.0, 6.0)
    x = clamp(x + y)
    x = frozen_gate_pool(x, 2, 2, 0, tp, gate, ceil_mode=True, detached=detached)
    x = clamp(net.conv4(x))
    x = clamp(net.conv5(x) * 3, 0.0, 6.0)
    x = clamp(x - 0.5)
    return net.fc(x.mean((2, 3)))


def reference_pullback(net: EveryOpNet, x: Tensor, target: int, temperature: float,
                       gate: str, pool_temperature: float | None = None,
                       detached: bool = False) -> Tensor:
    x = x.detach().clone().requires_grad_()
    logits = every_op_reference(net, x, temperature, gate, pool_temperature, detached)
    (grad,) = torch.autograd.grad(logits[:, target].sum(), x)
    return grad


def plain_input_gradient(session, target: int) -> Tensor:
    """Autograd's gradient of ``target``'s logits (summed over the batch) at the session's
    inputs, through a fresh forward of its model: what ``gate="hard"`` must give bit for bit."""
    leaf = session.inputs.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(session.model(leaf)[:, target].sum(), leaf)
    return gradient
