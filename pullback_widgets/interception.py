"""The interception: a ``TorchFunctionMode`` that routes gated ops to the soft autograd ops.

Every gated call made while :func:`soft_gating` is active, whether through a module
(``nn.ReLU``, reused or inplace) or a functional call inside ``forward()`` (``F.relu``,
``torch.relu_``, ``Tensor.relu``, ...), is intercepted and routed through the soft-gated ops:
ReLU family and 2-D max-pool (:mod:`.gates`), SiLU, GELU, Hardswish, LeakyReLU and PReLU
(:mod:`.activation_gates`), LayerNorm and GroupNorm (:mod:`.norm_gates`), and attention
(:mod:`.attention_gates`). A mode sees the calls the model makes, not those made inside a
function it handles, so each route sits at the level models call. The model itself is never
touched: no hooks, no swapped modules.
Eval-mode ``F.batch_norm`` and residual sums run as they are, and are remembered so that a gate
taking their output can remake it in the backward instead of keeping a copy (only in a forward
the session runs, and checks afterwards: see :class:`.pre_activations.Remake`).
The mode is thread-local and gates every such call made in this thread inside the context, the
model's and any other.
"""

from __future__ import annotations

import contextlib
import sys
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack, _pop_mode

from .activation_gates import (
    HARDSWISH,
    SILU,
    ActivationRule,
    SoftActivation,
    SoftPReLU,
    gelu_rule,
    leaky_relu_rule,
)
from .attention_gates import AttentionCall, SoftAttention
from .gates import GateSettings, PoolGeometry, SoftClamp, SoftMaxPool2d, is_plain
from .graph_audit import gradient_node
from .model_helpers import default_temperatures
from .norm_gates import ConstantStatisticsNorm, group_norm_statistics, layer_norm_statistics
from .pre_activations import Remake
from .validation import PullbackWidgetsError, check_model, explained_errors


def _relu_call(inplace: bool, low: float = 0.0, high: float | None = None):
    def parse(args, kwargs):
        return args[0], inplace, low, high
    return parse


def _functional_relu(args, kwargs):
    return args[0], _arg(args, kwargs, 1, "inplace", False), 0.0, None


def _functional_relu6(args, kwargs):
    return args[0], _arg(args, kwargs, 1, "inplace", False), 0.0, 6.0


def _functional_hardtanh(args, kwargs, inplace_default=False):
    low = float(_arg(args, kwargs, 1, "min_val", -1.0))
    high = float(_arg(args, kwargs, 2, "max_val", 1.0))
    return args[0], _arg(args, kwargs, 3, "inplace", inplace_default), low, high


def _arg(args, kwargs, position, name, default):
    if len(args) > position:
        return args[position]
    return kwargs.get(name, default)


_CLAMP_PARSERS: dict[Callable, Callable] = {
    F.relu: _functional_relu,
    torch.relu: _relu_call(inplace=False),
    torch.Tensor.relu: _relu_call(inplace=False),
    torch.relu_: _relu_call(inplace=True),
    torch.Tensor.relu_: _relu_call(inplace=True),
    F.relu6: _functional_relu6,
    F.hardtanh: _functional_hardtanh,
    F.hardtanh_: lambda args, kwargs: _functional_hardtanh(args, kwargs, inplace_default=True),
}


def _pool_geometry(args, kwargs) -> PoolGeometry | None:
    """The pool's geometry, or None where the call must stay hard (it asks for indices)."""
    if _arg(args, kwargs, 6, "return_indices", False):
        return None  # indices feed max-unpooling; those calls keep the plain gradient
    return PoolGeometry.of(
        _arg(args, kwargs, 1, "kernel_size", None),
        _arg(args, kwargs, 2, "stride", None),
        _arg(args, kwargs, 3, "padding", 0),
        _arg(args, kwargs, 4, "dilation", 1),
        _arg(args, kwargs, 5, "ceil_mode", False),
    )


# ---- one route per function: route(mode, func, args, kwargs) -> the op's result, gated.

def _clamp_route(parse: Callable):
    def route(mode, func, args, kwargs):
        z, inplace, low, high = parse(args, kwargs)
        return mode.gated("relu", SoftClamp.apply(
            z, lambda t: func(t, *args[1:], **kwargs), low, high, bool(inplace), mode.settings,
            mode.remake_for(z)))
    return route


def _pool_route(mode, func, args, kwargs):
    geometry = _pool_geometry(args, kwargs)
    if geometry is None:
        return func(*args, **kwargs)
    return mode.gated("pool", SoftMaxPool2d.apply(
        args[0], lambda t: func(t, *args[1:], **kwargs), geometry, mode.settings))


def _activation_route(rule_of: Callable[[tuple, dict], ActivationRule],
                      inplace_of: Callable[[tuple, dict], bool]):
    def route(mode, func, args, kwargs):
        rule = rule_of(args, kwargs)
        return mode.gated(rule.kind, SoftActivation.apply(
            args[0], lambda t: func(t, *args[1:], **kwargs), rule, bool(inplace_of(args, kwargs)),
            mode.settings, mode.remake_for(args[0])))
    return route


def _inplace_argument(position: int):
    return lambda args, kwargs: _arg(args, kwargs, position, "inplace", False)


def _leaky_rule(args, kwargs) -> ActivationRule:
    return leaky_relu_rule(float(_arg(args, kwargs, 1, "negative_slope", 0.01)))


def _prelu_route(mode, func, args, kwargs):
    weight = _arg(args, kwargs, 1, "weight", None)
    return mode.gated("relu", SoftPReLU.apply(args[0], weight, func, mode.settings))


def _layer_norm_route(mode, func, args, kwargs):
    shape = _arg(args, kwargs, 1, "normalized_shape", None)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    weight, bias = _arg(args, kwargs, 2, "weight", None), _arg(args, kwargs, 3, "bias", None)
    eps = float(_arg(args, kwargs, 4, "eps", 1e-5))
    return mode.gated("norm", ConstantStatisticsNorm.apply(
        args[0], weight, bias, lambda x, w, b: func(x, shape, w, b, eps),
        lambda x: layer_norm_statistics(x, shape, eps), shape, mode.settings))


def _group_norm_route(mode, func, args, kwargs):
    x = args[0]
    if x.dim() < 2:  # no channels: torch's own error, not one from reading x.shape[1] here
        return func(*args, **kwargs)
    groups = int(_arg(args, kwargs, 1, "num_groups", None))
    weight, bias = _arg(args, kwargs, 2, "weight", None), _arg(args, kwargs, 3, "bias", None)
    eps = float(_arg(args, kwargs, 4, "eps", 1e-5))
    return mode.gated("norm", ConstantStatisticsNorm.apply(
        x, weight, bias, lambda x, w, b: func(x, groups, w, b, eps),
        lambda x: group_norm_statistics(x, groups, eps), (x.shape[1],) + (1,) * (x.dim() - 2),
        mode.settings))


def _batch_norm_arguments(input, running_mean, running_var, weight=None, bias=None,
                          training=False, momentum=0.1, eps=1e-5):
    """``F.batch_norm``'s arguments by position, its defaults filled in."""
    return input, running_mean, running_var, weight, bias, training, momentum, eps


def _batch_norm_route(mode, func, args, kwargs):
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
    eps)`` runs as it is. With batch statistics (``training=True``, as eval-mode batch norms
    without running statistics call it) its statistics are differentiated, plainly: the node
    is named for the notices. In eval mode its output is remembered as remakable, so that a
    gate taking it next need not keep a copy (see :class:`.pre_activations.Remake`)."""
    out = func(*args, **kwargs)
    *tensors, training, momentum, eps = _batch_norm_arguments(*args, **kwargs)
    if isinstance(out, Tensor) and out.requires_grad and out.dim() > 2 and out.shape[0] == 1:
        # On the norm's node, where a hook on ``out`` would fire too (also after ``out`` is
        # changed in place), at half a tensor hook's cost.
        out.grad_fn.register_prehook(_laid_out_as(out))
    if training:
        return mode.plain("BatchNorm with batch statistics", out)
    # Under autocast the backward's remake would not run in the forward's dtype.
    if mode.remake and isinstance(out, Tensor) \
            and not torch.is_autocast_enabled(out.device.type):
        mode.remember(out, Remake.of(tuple(tensors), lambda x, mean, var, weight, bias: func(
            x, mean, var, weight, bias, False, momentum, eps)))
    return out


def _laid_out_as(out: Tensor) -> Callable[[tuple], tuple | None]:
    """A pre-hook for ``out``'s node that gives ``out``'s gradient ``out``'s strides. torch's
    CPU batch-norm backward (2.14) is wrong for one example whose input and gradient differ in
    layout, one channels last by its strides and the other not (tokens laid out as a map or
    back, as XCiT and LeViT do): off by up to 6 in a check whose exact answer is 1."""
    shape, strides, index = out.shape, out.stride(), out.output_nr
    # vmap's batched gradients (batched targets) have no strides to copy into, nor memory
    # formats: laid out by a permuted contiguous copy instead.
    channels_last = out.dim() == 4 and not out.is_contiguous() \
        and out.is_contiguous(memory_format=torch.channels_last)

    def laid_out(grad: Tensor) -> Tensor:
        if not is_plain(grad):
            return grad.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) \
                if channels_last else grad.contiguous()
        if grad.stride() == strides or grad.shape != shape:
            return grad
        return torch.empty_strided(shape, strides, dtype=grad.dtype,
                                   device=grad.device).copy_(grad)

    def hook(grads: tuple) -> tuple | None:
        grad = grads[index]
        if grad is None:  # none reaches it (MobileNetV4's hybrid blocks)
            return None
        new = laid_out(grad)
        return None if new is grad else (*grads[:index], new, *grads[index + 1:])
    return hook


def _residual_sum_route(mode, func, args, kwargs):
    """``a + b`` or ``a += b`` (a residual connection) with ``a`` remakable and ``b`` a tensor of
    its shape and dtype: runs as it is, and the sum is remembered as remakable in turn, from
    ``a``'s remake and ``b``. (Float addition is correctly rounded, so the remake's in-place
    add gives the same bits.)"""
    a, b = args[0], args[1] if len(args) == 2 and not kwargs else None
    remake = mode.remake_for(a) if isinstance(b, Tensor) and b.shape == a.shape \
        and b.dtype == a.dtype and b.device == a.device else None
    # b's version before the sum: if an in-place sum changes b too (a += a), no remake holds.
    b_version = None if remake is None else b._version
    out = func(*args, **kwargs)
    if remake is not None:
        # The closure takes a's op alone: a gate keeps it until the graph goes, and the tensors
        # a's remake holds must be freed as the backward passes them (the gate saves them).
        remake_a = remake.op
        mode.remember(out, Remake((*remake.tensors, b), lambda *tensors: remake_a(
            *tensors[:-1]).add_(tensors[-1]), (*remake.versions, b_version)))
    return out


def _attention_route(mode, func, args, kwargs):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
    enable_gqa)``, called again with the same arguments by keyword."""
    call = AttentionCall(float(_arg(args, kwargs, 4, "dropout_p", 0.0)),
                         bool(_arg(args, kwargs, 5, "is_causal", False)),
                         _arg(args, kwargs, 6, "scale", None),
                         bool(_arg(args, kwargs, 7, "enable_gqa", False)))
    call.check(args[0])

    def hard_op(query, key, value, mask):
        return func(query, key, value, attn_mask=mask, dropout_p=call.dropout_p,
                    is_causal=call.is_causal, scale=call.scale, enable_gqa=call.enable_gqa)

    return mode.gated("attention", SoftAttention.apply(
        args[0], args[1], args[2], _arg(args, kwargs, 3, "attn_mask", None), hard_op, call,
        mode.settings))


def _without_dispatch(function: Callable) -> Callable | None:
    """A copy of a torch Python function whose own ``has_torch_function`` check is off, so
    that its body runs under the active mode, which then sees the calls the body makes; None
    where the function does not dispatch that way (another torch version)."""
    if "has_torch_function" not in function.__code__.co_names:
        return None
    namespace = {**function.__globals__, "has_torch_function": lambda tensors: False}
    copy = types.FunctionType(function.__code__, namespace, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


_MULTI_HEAD_ATTENTION_BODY = _without_dispatch(F.multi_head_attention_forward)


def _multi_head_attention_route(mode, func, args, kwargs):
    """``F.multi_head_attention_forward`` (nn.MultiheadAttention). With ``need_weights=False``
    it calls scaled_dot_product_attention inside, which a mode handling the outer call cannot
    see: its body runs once more under this mode, its dispatch check off, and the mode gates
    that inner call. With ``need_weights=True`` it computes the weights by hand: left plain,
    and the session says so (its softmax is in the graph)."""
    if _arg(args, kwargs, 15, "need_weights", True) or _MULTI_HEAD_ATTENTION_BODY is None:
        return func(*args, **kwargs)
    with mode:
        return _MULTI_HEAD_ATTENTION_BODY(*args, **kwargs)


def _plain_route(name: str, decomposed: bool = False):
    """An op the engine leaves plain whose node the graph audit could not name itself: one
    torch decomposes (``decomposed``: its own nodes are counted as one op), or one in place on
    a view. Its output's node is marked for the audit."""
    def route(mode, func, args, kwargs):
        # Read before the call: an op in place on its input would change it.
        inside_from = args[0].grad_fn if decomposed else None
        return mode.plain(name, func(*args, **kwargs), inside_from, decomposed)
    return route


def _clamp_in_place_route(mode, func, args, kwargs):
    """``clamp_`` and kin, which the audit names by their node where a bound cut a value: in
    place on a view, that node is inside the base's CopySlices, so the call is named here,
    where a bound cuts one."""
    x = args[0]
    if x._base is None:
        return func(*args, **kwargs)
    if func in (torch.Tensor.clamp_max_, torch.clamp_max_):
        low, high = None, _arg(args, kwargs, 1, "max", None)
    else:
        low, high = _arg(args, kwargs, 1, "min", None), _arg(args, kwargs, 2, "max", None)
    with torch.no_grad():
        binds = bool((low is not None and (x < low).any())
                     or (high is not None and (x > high).any()))
    out = func(*args, **kwargs)
    return mode.plain("clamp", out) if binds else out


# ReLUs written as masks: a comparison of values that require grad makes a mask, and
# torch.where, masked_fill, a product or indexing with it gates those values, keeping a hard
# backward.
# The mask carries no node of its own: the nodes of the values compared are remembered
# instead, and the audit names the gate only where one of them is on the input's path (a
# comparison of parameters alone, viewed or scaled, is a learned mask, not a gate).
MASK_GATE = "mask from a comparison (a ReLU written by hand)"
_COMPARISONS = (torch.Tensor.__gt__, torch.Tensor.__ge__, torch.Tensor.__lt__,
                torch.Tensor.__le__, torch.Tensor.gt, torch.Tensor.ge, torch.Tensor.lt,
                torch.Tensor.le, torch.gt, torch.ge, torch.lt, torch.le, torch.greater,
                torch.greater_equal, torch.less, torch.less_equal,
                # h * (h == h.amax(1, keepdim=True)) is a max by hand; ~signbit(h) is h >= 0.
                torch.Tensor.__eq__, torch.Tensor.__ne__, torch.Tensor.eq, torch.Tensor.ne,
                torch.eq, torch.ne, torch.not_equal, torch.Tensor.not_equal,
                torch.signbit, torch.Tensor.signbit, torch.heaviside, torch.Tensor.heaviside,
                # Under no_grad (with grad, its node is named): h * (sign(h) + 1) / 2.
                torch.sign, torch.Tensor.sign, torch.sgn, torch.Tensor.sgn)
# Calls whose output does not depend on their argument's values: a mask passed to them makes
# no mask (every other call on a mask does: a cast, a view, &, 1 - mask, mask * 0.9 + 0.1).
_NOT_FROM_VALUES = frozenset((
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
    torch.randn_like, torch.randint_like, torch.Tensor.new_zeros, torch.Tensor.new_ones,
    torch.Tensor.new_empty, torch.Tensor.new_full, torch.Tensor.new_tensor))
# Calls that apply a mask, with the positions a mask may take.
_MASK_USES = {
    torch.where: (0,), torch.Tensor.where: (1,), torch.Tensor.masked_fill: (1,),
    torch.Tensor.masked_fill_: (1,), torch.masked_fill: (1,), torch.masked_select: (1,),
    torch.Tensor.masked_select: (1,), torch.Tensor.masked_scatter: (1,),
    torch.Tensor.masked_scatter_: (1,), torch.masked_scatter: (1,),
    **dict.fromkeys((torch.mul, torch.Tensor.mul, torch.Tensor.mul_, torch.Tensor.__mul__,
                     torch.Tensor.__rmul__, torch.Tensor.__imul__, torch.multiply,
                     torch.Tensor.multiply, torch.Tensor.multiply_), (0, 1)),
}
# Indexing, whose index (or any index in a tuple or list of them) may be a mask:
# ``h[h > 0]``, ``h[h < 0] = 0``; whether it works in place on its first argument.
_MASK_INDEXING = {
    torch.Tensor.__getitem__: False, torch.Tensor.__setitem__: True,
    torch.Tensor.index_put: False, torch.index_put: False, torch.Tensor.index_put_: True,
    torch.index_put_: True,
}


def _distinct(nodes: Iterable) -> tuple:
    """``nodes`` without repeats: masks combined in a loop (m = m | m.roll(1)) would double
    them each time."""
    return tuple({id(node): node for node in nodes}.values())


def _comparison_route(mode, func, args, kwargs):
    out = func(*args, **kwargs)
    compared = (*args[:2], kwargs.get("other"))
    # A comparison of parameters alone is the same mask for every input (a learned channel
    # mask): no gate of the input's path.
    if all(isinstance(t, nn.Parameter) or not (isinstance(t, Tensor) and t.requires_grad)
           for t in compared):
        return out
    return mode.remember_mask(out, _distinct((*mode.mask_sources(args, kwargs), *(
        gradient_node(t) for t in compared if isinstance(t, Tensor) and t.requires_grad))))


def _mask_use_route(mode, func, args, kwargs):
    # By keyword too: h.masked_fill(mask=h < 0, value=0).
    sources = mode.mask_sources(
        [args[position] for position in _MASK_USES[func] if position < len(args)],
        {name: kwargs[name] for name in ("mask", "condition") if name in kwargs})
    out = func(*args, **kwargs)
    return mode.plain(MASK_GATE, out, sources=sources) if sources else out


def _mask_indexing_route(mode, func, args, kwargs):
    index = args[1] if len(args) > 1 else kwargs.get("indices")
    sources = mode.mask_sources((index,), {}) if mode._masks else ()
    out = func(*args, **kwargs)
    if sources:  # in place: the node the op left on its first argument
        mode.plain(MASK_GATE, args[0] if _MASK_INDEXING[func] else out, sources=sources)
    return out


# Plain gate-like ops with an in-place form: named by their node as a rule, but in place on a
# view that node is inside the base's CopySlices node, which the audit cannot name.
_PLAIN_ACTIVATIONS = {
    F.elu: "ELU/SELU", F.elu_: "ELU/SELU", F.selu: "ELU/SELU", F.selu_: "ELU/SELU",
    F.celu: "CELU", F.celu_: "CELU", F.hardsigmoid: "Hardsigmoid", F.mish: "Mish",
    F.rrelu: "RReLU", F.rrelu_: "RReLU", F.threshold: "threshold", F.threshold_: "threshold",
    # Gates too: (h + h.abs_()) / 2 is a ReLU, as is h * (h.sign_() + 1) / 2.
    torch.Tensor.abs_: "abs", torch.abs_: "abs", torch.Tensor.sign_: "sign",
    torch.Tensor.sgn_: "sign",
}
_CLAMPS_IN_PLACE = (torch.Tensor.clamp_, torch.clamp_, torch.Tensor.clip_, torch.clip_,
                    torch.Tensor.clamp_min_, torch.clamp_min_, torch.Tensor.clamp_max_,
                    torch.clamp_max_)

_ROUTES: dict[Callable, Callable] = {
    **{func: _plain_route(name) for func, name in _PLAIN_ACTIVATIONS.items()},
    **dict.fromkeys(_CLAMPS_IN_PLACE, _clamp_in_place_route),
    F.scaled_dot_product_attention: _attention_route,
    F.multi_head_attention_forward: _multi_head_attention_route,
    F.rms_norm: _plain_route("RMSNorm", decomposed=True),
    torch.rms_norm: _plain_route("RMSNorm", decomposed=True),
    F.instance_norm: _plain_route("InstanceNorm", decomposed=True),
    torch.instance_norm: _plain_route("InstanceNorm", decomposed=True),
    # Its statistics (a mean of squares over neighbouring channels) are differentiated.
    F.local_response_norm: _plain_route("LocalResponseNorm", decomposed=True),
    F.silu: _activation_route(lambda a, k: SILU, _inplace_argument(1)),
    F.hardswish: _activation_route(lambda a, k: HARDSWISH, _inplace_argument(1)),
    F.gelu: _activation_route(lambda a, k: gelu_rule(_arg(a, k, 1, "approximate", "none")),
                              lambda a, k: False),
    F.leaky_relu: _activation_route(_leaky_rule, _inplace_argument(2)),
    F.leaky_relu_: _activation_route(_leaky_rule, lambda a, k: True),
    F.prelu: _prelu_route,  # F.prelu is torch.prelu: the method form needs its own entry
    torch.Tensor.prelu: _prelu_route,
    F.layer_norm: _layer_norm_route,
    torch.layer_norm: _layer_norm_route,
    F.group_norm: _group_norm_route,
    torch.group_norm: _group_norm_route,
    F.batch_norm: _batch_norm_route,
    torch.Tensor.add_: _residual_sum_route,
    torch.Tensor.add: _residual_sum_route,
    torch.add: _residual_sum_route,
    F.max_pool2d: _pool_route,
    torch.max_pool2d: _pool_route,
    **{func: _clamp_route(parse) for func, parse in _CLAMP_PARSERS.items()},
    **dict.fromkeys(_COMPARISONS, _comparison_route),
    **dict.fromkeys(_MASK_USES, _mask_use_route),
    **dict.fromkeys(_MASK_INDEXING, _mask_indexing_route),
}
# The leading arguments that put a call on the input's path, by name: attention is when q, k
# or v is (a fixed query still gates v); everything else when its first argument is.
_PATH_ARGUMENTS = {func: ("query", "key", "value") if func in (
    F.scaled_dot_product_attention, F.multi_head_attention_forward) else ("input",)
    for func in _ROUTES}
# A mask is applied to values on the path in any argument: where(mask, x, 0), 0.5 * mask.
_PATH_ARGUMENTS.update({torch.where: ("condition", "input", "other"),
                        torch.Tensor.where: ("input", "condition", "other")})
_PATH_ARGUMENTS.update(dict.fromkeys(
    (func for func in _MASK_USES if func not in (torch.where, torch.Tensor.where)),
    ("input", "other")))
# Either side of a comparison: torch.zeros(()) < h is h > 0.
_PATH_ARGUMENTS.update(dict.fromkeys(_COMPARISONS, ("input", "other")))


def _leading_by_position(func: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """(args, kwargs) with the path arguments given by keyword moved to their positions: C
    builtins pass ``torch.relu(input=z)`` on as it was written, and the routes read them by
    position."""
    names = _PATH_ARGUMENTS[func]
    if len(args) >= len(names) or not any(name in kwargs for name in names):
        return args, kwargs
    kwargs = dict(kwargs)
    for name in names[len(args):]:
        if name not in kwargs:
            break
        args = (*args, kwargs.pop(name))
    return args, kwargs


# How many remakable outputs the mode remembers: a block's last norm, its shortcut's norm, and
# their sum come before the gate.
_REMEMBERED = 4


class _SoftGatingMode(TorchFunctionMode):
    """Routes every gated call to its soft-gated autograd op."""

    def __init__(self, settings: GateSettings, remake: bool = True) -> None:
        super().__init__()
        self.settings = settings
        self.remake = remake
        # The nodes of the soft ops, and of the plain ops the graph audit could not name
        # itself: id -> (the node, kept alive so that its id stays its own; kind or name, None
        # for a node inside a plain op that is counted as that op).
        self.gated_nodes: dict[int, tuple[object, str]] = {}
        # A mask's gate adds the nodes its mask was compared from (see plain()).
        self.plain_nodes: dict[int, tuple] = {}
        # The last few remakable outputs, by id: (weak reference, its version then, how to
        # remake it); and the remakes handed out.
        self._remakable: dict[int, tuple[weakref.ref, int, Remake]] = {}
        self._handed_out: list[Remake] = []
        # Masks made by comparing values that require grad, and what is made from them, by id:
        # (weak reference, the nodes of the values compared). An entry goes with its mask, so
        # that calls pay for looking for masks only while one lives.
        self._masks: dict[int, tuple[weakref.ref, tuple]] = {}
        # The caller's saved-tensor hooks where they were active as the mode began (see
        # _refusing_checkpoints); None otherwise.
        self.callers_hooks: tuple | None = None

    def gated(self, kind: str, out: Tensor) -> Tensor:
        """``out``, a soft op's output, its node marked as a gate of ``kind``."""
        node = out.grad_fn
        if getattr(node, "_forward_cls", None) is None and out._base is not None:
            # In place on a view (y[:, :2].relu_()): autograd wraps the soft op in the base's
            # CopySlices node, the one the graph passes through.
            node = out._base.grad_fn
        self.gated_nodes[id(node)] = (node, kind)
        return out

    def plain(self, name: str, out: object, input_node: object = None,
              decomposed: bool = False, sources: tuple = ()) -> object:
        """``out``, a plain op's output, its node (if any) marked with the op's ``name``. A
        ``decomposed`` op's own nodes, down to ``input_node`` (its input's node before the
        call), are marked as counted with it (RMSNorm's rsqrt). A mask's gate has the
        ``sources`` of its mask: the audit names it only where one is on the input's path."""
        node = getattr(out, "grad_fn", None)
        base = getattr(out, "_base", None)
        if base is not None and type(base.grad_fn).__name__ == "CopySlices":
            node = base.grad_fn  # in place on a view: as in gated()
        if node is None:
            return out
        self.plain_nodes[id(node)] = (node, name, sources) if sources else (node, name)
        inside = [child for child, _ in node.next_functions] if decomposed else []
        while inside:
            child = inside.pop()
            if child is not None and child is not input_node and type(child).__name__ != \
                    "AccumulateGrad" and id(child) not in self.plain_nodes \
                    and id(child) not in self.gated_nodes:
                self.plain_nodes[id(child)] = (child, None)
                inside.extend(grandchild for grandchild, _ in child.next_functions)
        return out

    def check_hooks(self) -> None:
        """Refuse a call made under saved-tensor hooks pushed since the mode began over the
        caller's own: activation checkpointing's (compared by identity: the same functions)."""
        now = _saved_tensors_hooks()
        if now is not None and any(a is not b for a, b in zip(now, self.callers_hooks)):
            raise PullbackWidgetsError(CHECKPOINTING)

    def remember_mask(self, mask: object, sources: tuple) -> object:
        """``mask``, made from a comparison of values whose nodes are ``sources`` (or a tuple or
        list of them, as ``nonzero(as_tuple=True)`` gives): a gate where it is applied."""
        masks = self._masks
        for tensor in mask if isinstance(mask, (tuple, list)) else (mask,):
            # A tensor that requires grad is no mask: y = (h > 0).float(); y *= h is a ReLU's
            # output, named once, where the mask was applied.
            if isinstance(tensor, Tensor) and not tensor.requires_grad:
                key = id(tensor)
                masks[key] = (weakref.ref(tensor, lambda reference, key=key: masks.pop(
                    key) if masks.get(key, (None,))[0] is reference else None), sources)
        return mask

    def mask_sources(self, args: Iterable, kwargs: Mapping) -> tuple:
        """The nodes compared to make the masks among ``args`` and ``kwargs``' values (each
        also in a tuple or list: an index); () where none is a mask."""
        sources: list = []
        for value in (*args, *kwargs.values()):
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                entry = self._masks.get(id(tensor))
                if entry is not None and entry[0]() is tensor and not tensor.requires_grad:
                    sources.extend(entry[1])
        return _distinct(sources)

    def remember(self, out: Tensor, remake: Remake) -> None:
        self._remakable.pop(id(out), None)  # an in-place sum: its entry moves to the end
        if len(self._remakable) >= _REMEMBERED:  # the oldest goes (dicts keep insertion order)
            del self._remakable[next(iter(self._remakable))]
        self._remakable[id(out)] = (weakref.ref(out), out._version, remake)

    def remake_for(self, z: Tensor) -> Remake | None:
        """How to remake ``z`` in the backward: for the last few remembered outputs, and only
        while nothing has changed it, or what it is remade from, in place since."""
        entry = self._remakable.get(id(z))
        if entry is None:
            return None
        reference, version, remake = entry
        if reference() is not z or z._version != version or not remake.intact():
            return None
        self._handed_out.append(remake)
        return remake

    def remakes_intact(self) -> bool:
        """Whether every remake handed out still holds (the forward changed nothing they need
        in place after the gate took them)."""
        return all(remake.intact() for remake in self._handed_out)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None:
            if kwargs:
                args, kwargs = _leading_by_position(func, args, kwargs)
            if not torch.is_grad_enabled():
                if _inside_reentrant_checkpoint():
                    raise PullbackWidgetsError(CHECKPOINTING)
                if route is _comparison_route and _on_path(func, args):
                    # A mask made under no_grad still gates the values it is applied to.
                    return route(self, func, args, kwargs)
            elif _on_path(func, args):
                if self.callers_hooks is not None:
                    self.check_hooks()
                return route(self, func, args, kwargs)
        out = func(*args, **kwargs)
        if self._masks and func not in _NOT_FROM_VALUES:
            # What a call makes of a mask, off the path, is a mask: a cast, a view, its
            # indices, two masks combined, 1 - mask, mask * 0.9 + 0.1 (a leaky ReLU's gate).
            sources = self.mask_sources(args, kwargs)
            if sources:
                self.remember_mask(args[0] if func is torch.Tensor.__setitem__ else out, sources)
        return out


def _on_path(func: Callable, args: tuple) -> bool:
    """Whether a routed call takes a value on the input's path (one that requires grad) in one
    of its path arguments."""
    return any(isinstance(t, Tensor) and t.requires_grad
               for t in args[:len(_PATH_ARGUMENTS[func])])


def _inside_reentrant_checkpoint() -> bool:
    """Whether the calling code runs inside the forward of a reentrant activation checkpoint
    (torch.utils.checkpoint, use_reentrant=True), which runs its function under no_grad and
    again in the backward, where no mode sees it: one whose inputs require grad (not known:
    assumed). Nothing is, where nobody imported torch.utils.checkpoint."""
    function = getattr(sys.modules.get("torch.utils.checkpoint"), "CheckpointFunction", None)
    code = getattr(getattr(function, "forward", None), "__code__", None)
    if code is None:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            inputs = frame.f_locals.get("args")
            return inputs is None or any(isinstance(t, Tensor) and t.requires_grad
                                         for t in inputs)
        frame = frame.f_back
    return False


def _active_gating_mode() -> _SoftGatingMode | None:
    return next((m for m in _get_current_function_mode_stack()
                 if isinstance(m, _SoftGatingMode)), None)


CHECKPOINTING = (
    "the model uses activation checkpointing (torch.utils.checkpoint), which runs parts of the "
    "forward again during the backward, outside the soft gates, so the pullback would be "
    "wrong; turn it off to explain the model (timm: model.set_grad_checkpointing(False))")


def checkpointing_error(error: BaseException) -> PullbackWidgetsError | None:
    """The clear error for activation checkpointing met in a gated forward, or for a
    reentrant checkpoint's refusal of ``torch.autograd.grad``; None for other errors."""
    message = str(error)
    if isinstance(error, RuntimeError) and (
            message == CHECKPOINTING or "torch.utils.checkpoint is incompatible" in message):
        return PullbackWidgetsError(CHECKPOINTING)
    return None


def _saved_tensors_hooks() -> tuple | None:
    """The innermost saved-tensor hooks now active in this thread (pack, unpack), or None."""
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return None if top_hooks is None else top_hooks(False)


@contextlib.contextmanager
def _refusing_checkpoints(mode: _SoftGatingMode) -> Iterator[None]:
    """Non-reentrant activation checkpointing drops what the ops save and runs them again in
    the backward, unmoded, so plain ops' saved tensors would feed the soft gates. It pushes
    saved-tensor hooks of its own: refused here by disabling them. Where the caller has hooks
    active (``save_on_cpu``), torch cannot disable them; the mode then refuses every routed
    call made under other hooks than the caller's (:meth:`_SoftGatingMode.check_hooks`)."""
    callers = _saved_tensors_hooks()
    if callers is not None:
        mode.callers_hooks = callers
        yield
        return
    with torch.autograd.graph.disable_saved_tensors_hooks(CHECKPOINTING):
        yield


@contextlib.contextmanager
def _gating(settings: GateSettings, remake: bool = True) -> Iterator[_SoftGatingMode]:
    if _active_gating_mode() is not None:
        raise PullbackWidgetsError(
            "soft_gating is already active in this thread; nesting it would gate every ReLU "
            "twice. Leave the outer context first (excitation_pullback and PullbackSession "
            "open their own).")
    mode = _SoftGatingMode(settings, remake)
    try:
        with explained_errors(checkpointing_error), mode, _refusing_checkpoints(mode):
            yield mode
    finally:
        # A Ctrl-C between the mode's push and the with statement holding it (or in its exit,
        # before its pop) would leave it on this thread's stack, gating every later call here.
        stack = _get_current_function_mode_stack()
        if stack and stack[-1] is mode:
            _pop_mode()
        # Each entry's weak reference calls back into the table: a cycle that would keep the
        # graph's nodes its masks came from alive (a mask the model keeps) until a collection.
        mode._masks.clear()


@contextlib.contextmanager
def soft_gating(model: nn.Module, temperature: float | Mapping[str, float] | None = None,
                gate: str = "sigmoid", pool_temperature: float | None = None,
                temperature_mode: str = "absolute", attention_weights: str = "detached",
                pool_weights: str = "differentiated") -> Iterator[GateSettings]:
    """Inside this context, gated ops run with soft backwards: any backward through them is an
    excitation pullback, wherever it runs (the gating is fixed as the forward runs; a graph
    built outside stays plain). A pullback is first order: ``create_graph=True`` is refused.

    The forward is unchanged bit for bit, and ``model`` is not modified in any way. Yields the
    live :class:`GateSettings`; the soft backward reads them when it runs, so changing them
    between backward passes of one graph changes the temperature. ``temperature=None`` is the
    model's own default per kind of op (see :func:`default_temperatures`), as everywhere in the
    package; a float sets every kind, a mapping kind -> T the kinds it names.

    ``model`` may not be ``torch.compile``'d or TorchScript: you run it yourself inside the
    context, and compiled code would not be gated (pass the eager module).
    """
    model = check_model(model, unwrap_compiled=False)
    settings = GateSettings(temperature, gate, pool_temperature, temperature_mode,
                            attention_weights, pool_weights,
                            defaults=default_temperatures(model))
    # The user runs the forward, and it cannot be checked and run again: no remakes (see
    # PullbackSession).
    with _gating(settings, remake=False):
        yield settings
