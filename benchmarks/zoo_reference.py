"""The zoo sweep's oracle: the textbook frozen-gate network of ``tests/reference*.py``, made to
reach every gate of a real architecture, and a census of the gates an autograd graph holds.

Nothing here imports pullback_widgets. The reference is a deep copy of the model with its gate
modules swapped (``reference_modern.frozen_copy`` for the modern gates; ``reference.py``'s
``FrozenGateReLU`` and ``WindowLoopPool`` for ReLU, ReLU6 and ``nn.MaxPool2d``), the paper's way.
Module swaps miss functional calls inside ``forward()`` (torchvision's GoogLeNet and DenseNet
call ``F.relu``, timm's blocks call ``F.layer_norm`` and ``F.scaled_dot_product_attention``),
so while the reference runs, those functions are replaced in ``torch.nn.functional`` (and
``torch.relu``, ``Tensor.relu``) by the same textbook forms: a monkeypatch, a technique unlike
the engine's ``TorchFunctionMode``. Whatever still runs hard is found by :func:`gate_census` on
the reference's own graph, so a comparison is only claimed where the reference covers the model.

Also here: the censuses of a plain forward's gates that the honesty check counts against the
engine's notices (:func:`gate_census` on the autograd graph, :func:`call_census` on the gate
functions called, which sees an op in place on a view that the graph hides in a CopySlices
node), and :func:`tie_sharing_gradient`, the soft gates' T -> 0 limit, which differs from the
plain gradient only at tied pool maxima and exact kinks.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import math
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's tests/

from tests import reference as relu_ref
from tests import reference_modern as modern_ref

Temperature = float | Mapping[str, float] | None

# ---------------------------------------------------------------- the census of gates

# autograd node name -> the kind of gate it is the hard backward of. "softmax" is attention's
# gate when written by hand (and any other softmax); "other" the gate-like ops the engine
# leaves plain by design (it names them).
NODE_KINDS = {
    **dict.fromkeys(("ReluBackward0", "ReluBackward1", "HardtanhBackward0", "HardtanhBackward1",
                     "ThresholdBackward0", "ThresholdBackward1", "LeakyReluBackward0",
                     "LeakyReluBackward1", "PreluKernelBackward0", "RreluWithNoiseBackward0",
                     "RreluWithNoiseBackward1"), "relu"),
    "MaxPool2DWithIndicesBackward0": "pool",
    "SiluBackward0": "silu",
    "GeluBackward0": "gelu",
    "HardswishBackward0": "hardswish",
    "NativeLayerNormBackward0": "norm",
    "NativeGroupNormBackward0": "norm",
    **dict.fromkeys(("ScaledDotProductFlashAttentionForCpuBackward0",
                     "ScaledDotProductFlashAttentionBackward0",
                     "ScaledDotProductEfficientAttentionBackward0",
                     "ScaledDotProductCudnnAttentionBackward0"), "attention"),
    "SoftmaxBackward0": "softmax",
    "SafeSoftmaxBackward0": "softmax",
    **dict.fromkeys(("EluBackward0", "EluBackward1", "CeluBackward0", "MishBackward0",
                     "SoftplusBackward0", "HardsigmoidBackward0", "GluBackward0"), "other"),
    # A normalisation written by hand (RMSNorm, EvoNorm, ...): its statistics' nodes.
    **dict.fromkeys(("RsqrtBackward0", "VarMeanBackward0", "VarBackward0", "StdBackward0",
                     "StdMeanBackward0"), "statistics"),
}
KINDS = ("relu", "pool", "silu", "gelu", "hardswish", "norm", "attention", "softmax", "other",
         "statistics")


def nodes_on_input_path(output: Tensor, leaf: Tensor) -> list:
    """The autograd nodes behind ``output`` from which the gradient reaches ``leaf`` (a leaf
    tensor that requires grad): the nodes a pullback passes. Iterative: graphs of real
    networks are thousands of nodes deep."""
    target = torch.autograd.graph.get_gradient_edge(leaf).node
    reaches: dict[int, bool] = {}
    order, stack = [], [(output.grad_fn, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            reaches[id(node)] = node is target or any(
                child is not None and reaches[id(child)] for child, _ in node.next_functions)
        elif id(node) not in reaches:
            reaches[id(node)] = False  # settled after its children
            order.append(node)
            stack.append((node, True))
            stack.extend((child, False) for child, _ in node.next_functions
                         if child is not None and id(child) not in reaches)
    return [node for node in order if reaches[id(node)]]


def gate_census(output: Tensor, leaf: Tensor) -> collections.Counter:
    """Hard gate nodes on the input's path, by kind (:data:`KINDS`)."""
    return collections.Counter(NODE_KINDS[type(node).__name__]
                               for node in nodes_on_input_path(output, leaf)
                               if type(node).__name__ in NODE_KINDS)


def _call_kinds() -> dict:
    """Python-level gate functions by kind, keyed as a TorchFunctionMode sees them."""
    kinds = {
        "relu": (F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_,
                 F.relu6, F.hardtanh, F.hardtanh_, F.leaky_relu, F.leaky_relu_, F.prelu,
                 F.threshold, F.threshold_, F.rrelu, F.rrelu_),
        "pool": (F.max_pool2d, torch.max_pool2d, F.max_pool2d_with_indices),
        "silu": (F.silu,), "gelu": (F.gelu,), "hardswish": (F.hardswish,),
        "norm": (F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm),
        "attention": (F.scaled_dot_product_attention, F.multi_head_attention_forward),
        "softmax": (F.softmax, torch.softmax, torch.Tensor.softmax),
        "other": (F.elu, F.elu_, F.selu, F.selu_, F.celu, F.celu_, F.mish, F.softplus,
                  F.hardsigmoid),
    }
    return {func: kind for kind, funcs in kinds.items() for func in funcs}


class _GateCallCounter(TorchFunctionMode):
    """Records gate function calls whose input (attention: q, k or v) requires grad, with
    their outputs (the first tensor of a tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds = _call_kinds()
        self.calls: list[tuple[str, Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self.kinds.get(func)
        out = func(*args, **kwargs)
        if kind is not None:
            leading = [*args[:3], *(kwargs.get(k) for k in ("input", "query", "key", "value"))]
            if any(isinstance(t, Tensor) and t.requires_grad for t in
                   (leading if kind == "attention" else leading[:1] + leading[3:4])):
                first = out if isinstance(out, Tensor) else next(
                    (t for t in out if isinstance(t, Tensor)), None)
                if first is not None:
                    self.calls.append((kind, first))
        return out


def _node_of(tensor: Tensor) -> object:
    """The node a tensor's gradient enters: in place on a view, its base's (CopySlices)."""
    base = tensor._base
    return base.grad_fn if base is not None and base.grad_fn is not None else tensor.grad_fn


def call_census(model: nn.Module, x: Tensor) -> collections.Counter:
    """Gate function calls of the model's eval forward on tensors that depend on ``x``, by
    kind: its parameters are frozen meanwhile (restored after), so requiring grad means
    depending on the input. It sees what the graph census cannot: an op in place on a view
    hides in autograd's CopySlices node. (Only calls Python makes; the graph census sees the
    rest.) Only calls whose output's node is on the logits' path to the input count: a branch
    whose output the model drops (timm's DLA computes one) is no part of the pullback."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = [(m, m.training) for m in model.modules()]
    try:
        model.requires_grad_(False)
        model.eval()
        leaf = x.detach().clone().requires_grad_()
        with torch.enable_grad(), _GateCallCounter() as counter:
            logits = model(leaf)
        on_path = {id(node) for node in nodes_on_input_path(logits, leaf)}
        return collections.Counter(kind for kind, out in counter.calls
                                   if id(_node_of(out)) in on_path)
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for module, flag in training:
            module.training = flag


# ---------------------------------------------------------------- the reference network

def _kind_temperature(temperature: Temperature, kind: str) -> float:
    return modern_ref.kind_temperature({} if temperature is None else temperature, kind)


def _swap_relu_and_pool(model: nn.Module, temperature: Temperature, gate: str,
                        pool_detached: bool) -> None:
    """reference.py's ReLU / ReLU6 / window-loop pool in place of the modules (exact types:
    a subclass such as timm's MaxPool2dSame pads first, which the window loop would not see)."""
    t_relu, t_pool = (_kind_temperature(temperature, k) for k in ("relu", "pool"))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU6:
                setattr(parent, name, relu_ref.FrozenGateReLU(t_relu, gate, 6.0))
            elif type(child) is nn.ReLU:
                setattr(parent, name, relu_ref.FrozenGateReLU(t_relu, gate))
            elif type(child) is nn.MaxPool2d:
                setattr(parent, name, relu_ref.WindowLoopPool(child, t_pool, pool_detached))


def reference_network(model: nn.Module, temperature: Temperature, gate: str = "sigmoid",
                      attention_weights: str = "detached", pool_weights: str = "differentiated",
                      swap_modules: bool = True) -> nn.Module:
    """A frozen-gate copy of ``model`` (eval mode): the modern gates by ``frozen_copy``, then
    ReLU and max-pool modules by reference.py's textbook forms. Run it inside
    :func:`functional_reference` to reach the functional calls too. ``swap_modules=False``:
    a plain copy, for models whose modules ``frozen_copy`` swaps wrongly (a subclass that does
    more than its base, such as timm's GroupNormAct), reached by the functional forms alone."""
    if not swap_modules:
        return copy.deepcopy(model).eval()
    network = modern_ref.frozen_copy(model, {} if temperature is None else temperature, gate,
                                     attention_weights)
    _swap_relu_and_pool(network, temperature, gate, pool_weights == "detached")
    return network


_INSIDE = threading.local()


def _reentrant_safe(reference: Callable, original: Callable) -> Callable:
    """``reference``, except inside another reference call (whose own hard value is wanted:
    ``frozen_silu`` calls ``F.silu``), where ``original`` runs."""
    def call(*args, **kwargs):
        if getattr(_INSIDE, "depth", 0):
            return original(*args, **kwargs)
        _INSIDE.depth = 1
        try:
            return reference(*args, **kwargs)
        finally:
            _INSIDE.depth = 0
    return call


def _functional_forms(temperature: Temperature, gate: str, attention_weights: str,
                      pool_weights: str, originals: Mapping[str, Callable]
                      ) -> dict[str, Callable]:
    """Textbook replacements of the gated functions, by attribute name of ``F``."""
    t = {kind: _kind_temperature(temperature, kind) for kind in modern_ref.DEFAULTS}

    def clamp(low: float = 0.0, high: float | None = None):
        return lambda input, *_, **__: relu_ref.frozen_gate_clamp(input, t["relu"], gate, low,
                                                                  high)

    def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
        return relu_ref.frozen_gate_clamp(input, t["relu"], gate, min_val, max_val)

    def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                   return_indices=False):
        geometry = tuple(_square(v) for v in (kernel_size, stride or kernel_size, padding,
                                              dilation))
        if return_indices or None in geometry:  # left hard: the census says so
            return originals["max_pool2d"](input, kernel_size, stride, padding, dilation,
                                           ceil_mode, return_indices)
        return _UnfoldedSoftPool.apply(input, geometry, ceil_mode, t["pool"],
                                       pool_weights == "detached", originals["max_pool2d"])

    def leaky_relu(input, negative_slope=0.01, inplace=False):
        return modern_ref.frozen_leaky(input, negative_slope, t["relu"], gate)

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                  scale=None, enable_gqa=False):
        if dropout_p or enable_gqa:
            return originals["scaled_dot_product_attention"](
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if scale is not None:  # the reference scales by 1/sqrt(d): fold the model's scale in
            query = query * (scale * math.sqrt(query.shape[-1]))
        return modern_ref.reference_attention(query, key, value, t["attention"],
                                              attention_weights, attn_mask, is_causal)

    return {
        "relu": clamp(), "relu6": clamp(0.0, 6.0), "hardtanh": hardtanh,
        "max_pool2d": max_pool2d, "leaky_relu": leaky_relu,
        "silu": lambda input, inplace=False: modern_ref.frozen_silu(input, t["silu"]),
        "gelu": lambda input, approximate="none": modern_ref.frozen_gelu(
            input, t["gelu"], approximate),
        "hardswish": lambda input, inplace=False: modern_ref.frozen_hardswish(
            input, t["hardswish"]),
        "prelu": lambda input, weight: modern_ref.frozen_leaky(input, weight, t["relu"], gate),
        "layer_norm": lambda input, normalized_shape, weight=None, bias=None, eps=1e-5:
            modern_ref.frozen_layer_norm(input, tuple(normalized_shape), weight, bias, eps),
        "group_norm": lambda input, num_groups, weight=None, bias=None, eps=1e-5:
            modern_ref.frozen_group_norm(input, num_groups, weight, bias, eps),
        "scaled_dot_product_attention": attention,
    }


def _square(value) -> int | None:
    """One int for an int or a square pair; None for a pair of two sizes."""
    if isinstance(value, int):
        return value
    value = tuple(value)
    return value[0] if len(value) == 2 and value[0] == value[1] else None


class _UnfoldedSoftPool(torch.autograd.Function):
    """The hard max-pool in value; in the backward, the gradient of reference.py's unfolded
    soft pool (which takes -inf entries, as timm's 'same' padding makes them). An autograd
    Function, so the soft pool's own softmax stays out of the census."""

    @staticmethod
    def forward(ctx, x, geometry, ceil_mode, temperature, detached, hard_pool):
        ctx.save_for_backward(x)
        ctx.geometry, ctx.ceil_mode = geometry, ceil_mode
        ctx.temperature, ctx.detached = temperature, detached
        kernel, stride, padding, dilation = geometry
        return hard_pool(x, kernel, stride, padding, dilation, ceil_mode)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        kernel, stride, padding, dilation = ctx.geometry
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            soft = relu_ref.soft_pool_autograd(leaf, kernel, stride, padding, ctx.temperature,
                                               dilation, ctx.ceil_mode, ctx.detached)
            (grad,) = torch.autograd.grad(soft, leaf, grad_out)
        return grad, None, None, None, None, None


@contextlib.contextmanager
def functional_reference(temperature: Temperature, gate: str = "sigmoid",
                         attention_weights: str = "detached",
                         pool_weights: str = "differentiated") -> Iterator[None]:
    """While inside, ``F.relu``, ``F.silu``, ..., ``torch.relu`` and ``Tensor.relu`` compute
    their frozen-gate reference forms (process-wide: run nothing else meanwhile)."""
    names = ("relu", "relu6", "hardtanh", "max_pool2d", "leaky_relu", "silu", "gelu",
             "hardswish", "prelu", "layer_norm", "group_norm", "scaled_dot_product_attention")
    originals = {name: getattr(F, name) for name in names}
    with _patched(_functional_forms(temperature, gate, attention_weights, pool_weights,
                                    originals), originals):
        yield


@contextlib.contextmanager
def _patched(forms: Mapping[str, Callable], originals: Mapping[str, Callable]
             ) -> Iterator[None]:
    """``F``'s functions named in ``forms`` replaced by them, and ``torch.relu``,
    ``torch.relu_``, ``Tensor.relu`` and ``Tensor.relu_`` by ``forms["relu"]``, while inside
    (each falls back to its original inside itself: see :func:`_reentrant_safe`)."""
    patches = [(F, name, _reentrant_safe(form, originals[name]))
               for name, form in forms.items()]
    patches += [(owner, name, _reentrant_safe(forms["relu"], getattr(owner, name)))
                for owner in (torch, torch.Tensor) for name in ("relu", "relu_")]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def reference_run(model: nn.Module, x: Tensor, target: int, temperature: Temperature,
                  gate: str = "sigmoid", attention_weights: str = "detached",
                  pool_weights: str = "differentiated", swap_modules: bool = True
                  ) -> tuple[Tensor, Tensor, collections.Counter]:
    """(the reference pullback (like x), the reference's logits (B, K), the hard gates left on
    its input's path by kind). The pullback is the input gradient of the frozen-gate network,
    ``logits[:, target].sum()`` pulled back (each example's own, examples being independent)."""
    network = reference_network(model, temperature, gate, attention_weights, pool_weights,
                                swap_modules)
    leaf = x.detach().clone().requires_grad_()
    with torch.enable_grad(), functional_reference(temperature, gate, attention_weights,
                                                   pool_weights):
        logits = network(leaf)
        census = gate_census(logits, leaf)
        (grad,) = torch.autograd.grad(logits[:, target].sum(), leaf)
    return grad, logits.detach(), census


# ---------------------------------------------------------------- the T -> 0 limit, ties shared

def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def tie_sharing_pool_grad(x: Tensor, grad_out: Tensor, kernel, stride, padding, dilation,
                          ceil_mode: bool) -> Tensor:
    """The soft pool's gradient as T -> 0 (either weight rule): each window's gradient split
    equally among its entries equal to its maximum. x (N, C, H, W), grad_out the pool's output
    shape; geometry as max_pool2d takes it; padded positions take no part."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel, stride, padding, dilation))
    n, c, h, w = x.shape
    out_h, out_w = grad_out.shape[-2:]
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    extra_h = max(0, (out_h - 1) * sh + span_h - (h + 2 * ph))  # ceil mode's last windows
    extra_w = max(0, (out_w - 1) * sw + span_w - (w + 2 * pw))
    padded = F.pad(x, (pw, pw + extra_w, ph, ph + extra_h), value=-math.inf)
    geometry = dict(kernel_size=(kh, kw), dilation=(dh, dw), stride=(sh, sw))
    windows = F.unfold(padded, **geometry).view(n, c, kh * kw, -1)
    assert windows.shape[-1] == out_h * out_w, "window count differs from max_pool2d's"
    tied = (windows == windows.amax(2, keepdim=True)).to(x.dtype)
    shares = tied / tied.sum(2, keepdim=True) * grad_out.reshape(n, c, 1, -1)
    folded = F.fold(shares.view(n, c * kh * kw, -1), padded.shape[-2:], **geometry)
    return folded[..., ph:ph + h, pw:pw + w]


def _step(u: Tensor) -> Tensor:
    """The soft gates' T -> 0 limit: 1 above 0, 0 below, 1/2 at 0."""
    return (u > 0).to(u.dtype) + 0.5 * (u == 0).to(u.dtype)


class _HardValueLimitGradient(torch.autograd.Function):
    """``op(z)`` bit for bit; the gradient ``grad · gate(z)`` (``gate`` the T -> 0 limit)."""

    @staticmethod
    def forward(ctx, z, op, gate):
        ctx.save_for_backward(z)
        ctx.gate = gate
        return op(z)

    @staticmethod
    def backward(ctx, grad_out):
        (z,) = ctx.saved_tensors
        return grad_out * ctx.gate(z), None, None


class _HardPoolTieSharing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pool, geometry, ceil_mode):
        ctx.save_for_backward(x)
        ctx.geometry, ctx.ceil_mode = geometry, ceil_mode
        return pool(x, *geometry, ceil_mode)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return tie_sharing_pool_grad(x, grad_out, *ctx.geometry, ctx.ceil_mode), \
            None, None, None


@contextlib.contextmanager
def tie_sharing_limit() -> Iterator[None]:
    """While inside, the ReLU family and 2-D max-pool (functional and ``torch.relu`` /
    ``Tensor.relu`` calls, which their modules make) compute their hard values bit for bit and
    pull back with the soft gates' T -> 0 limit: a step with 1/2 at each kink, and tied pool
    maxima sharing their window's gradient. (Process-wide: run nothing else meanwhile.)"""
    originals = {name: getattr(F, name) for name in
                 ("relu", "relu6", "hardtanh", "leaky_relu", "prelu", "max_pool2d")}

    def clamp(z, low, high, op):
        gate = (lambda t: _step(t - low)) if high is None \
            else (lambda t: _step(t - low) * _step(high - t))
        return _HardValueLimitGradient.apply(z, op, gate)

    def leaky(z, slope, op):
        return _HardValueLimitGradient.apply(z, op, lambda t: slope + (1 - slope) * _step(t))

    def prelu(z, weight):
        slope = weight.view(-1, *([1] * (z.dim() - 2))) if weight.numel() > 1 else weight
        return leaky(z, slope.detach(), lambda t: originals["prelu"](t, weight))

    def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                   return_indices=False):
        if return_indices:
            return originals["max_pool2d"](input, kernel_size, stride, padding, dilation,
                                           ceil_mode, return_indices)
        geometry = (kernel_size, stride or kernel_size, padding, dilation)
        return _HardPoolTieSharing.apply(input, originals["max_pool2d"], geometry, ceil_mode)

    def relu(input, *_, **__):
        return clamp(input, 0.0, None, originals["relu"])

    forms = {
        "relu": relu,
        "relu6": lambda input, inplace=False: clamp(input, 0.0, 6.0, originals["relu6"]),
        "hardtanh": lambda input, min_val=-1.0, max_val=1.0, inplace=False: clamp(
            input, min_val, max_val, lambda t: originals["hardtanh"](t, min_val, max_val)),
        "leaky_relu": lambda input, negative_slope=0.01, inplace=False: leaky(
            input, negative_slope, lambda t: originals["leaky_relu"](t, negative_slope)),
        "prelu": prelu,
        "max_pool2d": max_pool2d,
    }
    with _patched(forms, originals):
        yield


def tie_sharing_gradient(model: nn.Module, x: Tensor, target: int) -> Tensor:
    """The input gradient of ``logits[:, target].sum()`` with the ReLU family and max-pools
    pulling back as their soft gates do at T -> 0 (:func:`tie_sharing_limit`), like x. Eval
    mode; the model's flags are put back after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    leaf = x.detach().clone().requires_grad_()
    try:
        with torch.enable_grad(), tie_sharing_limit():
            (grad,) = torch.autograd.grad(model(leaf)[:, target].sum(), leaf)
    finally:
        for module, training in flags:
            module.training = training
    return grad
