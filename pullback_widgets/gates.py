"""Soft-gated autograd ops: the hard op runs forward bit for bit; only the backward is soft.

Each op keeps a reference to a :class:`GateSettings` object and reads it when its backward runs,
so one retained forward graph can be pulled back at many temperatures.

ReLU family (ReLU, ReLU6, hardtanh): the incoming gradient is multiplied by a gate of the
pre-activation ``z`` instead of the hard indicator ``1[low < z < high]``:

- ``sigmoid``:    g(z) = sigmoid(z / T)                      (the paper's first version, T = 0.3)
- ``normal_cdf``: g(z) = Phi(z / T)                          (the paper's later version, T = 0.6)
- ``hard``:       g(z) = 1[z > 0]                            (the plain gradient)

A two-sided clamp such as ReLU6 gets g(z - low) * g(high - z).

Max-pool: the backward is the gradient of the soft pool ``y = sum_j softmax(w / T)_j * w_j`` over
each window ``w``, the softmax weights differentiated too (``pool_weights="differentiated"``, the
paper's first version): per window entry, ``dy/dw_j = p_j * (1 + (w_j - y) / T)``. With
``pool_weights="detached"`` (its later version) the weights are constants: ``dy/dw_j = p_j``.
Padded positions get zero weight.

Numerics: every soft backward computes in at least float32 (float16 and bfloat16 inputs are
promoted, the result cast back), the pool centres each window on its own maximum before it
scales by 1/T, and 1/T is capped at the largest finite number, so no temperature overflows or
gives NaN. As T -> 0 the gates become the hard ones, hence the plain gradient, except at exact
kinks and ties, where the soft rule's limit is the symmetric one: g(0) = 1/2 for a
pre-activation exactly at ``low`` or ``high``, and tied maxima of a window share its gradient
equally (the plain gradient gives it all to the first).

Memory: a gate needs its pre-activation in the backward; :mod:`.pre_activations` keeps it, or
remakes it bit for bit where the interception knows how it was made.
"""

from __future__ import annotations

import functools
import math
import operator
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .pre_activations import Remake, keep_pre_activation, kept_pre_activation, saved_tensors
from .validation import (
    PullbackWidgetsError,
    PullbackWidgetsTypeError,
    check_choice,
    check_positive,
    suggest,
)

GATES = ("sigmoid", "normal_cdf", "hard")
TEMPERATURE_MODES = ("absolute", "relative")
ATTENTION_WEIGHTS = ("detached", "differentiated")
# The soft pool's rule: its softmax weights differentiated (the paper's first version) or
# constants (its later version).
POOL_WEIGHTS = ("differentiated", "detached")
# The package's default temperature per kind of gated op. relu and pool keep the paper's first
# version (0.3); silu, gelu and attention are the later code's defaults; hardswish is ours.
KIND_TEMPERATURES = {"relu": 0.3, "pool": 0.3, "silu": 1.6, "gelu": 1.0, "hardswish": 1.0,
                     "attention": 1.0}
KINDS = tuple(KIND_TEMPERATURES)


def check_temperature(temperature: object) -> float | dict[str, float] | None:
    """None (the model's default per kind), one number for every kind, or a mapping
    kind -> T over :data:`KINDS` (missing kinds take the model's default)."""
    if temperature is None:
        return None
    if isinstance(temperature, Mapping):
        return {check_choice(kind, KINDS, "temperature key"):
                check_positive(value, f"temperature[{kind!r}]")
                for kind, value in temperature.items()}
    return check_positive(temperature, "temperature")


_FIELD_CHECKS = {
    "temperature": check_temperature,
    "gate": lambda value: check_choice(value, GATES, "gate"),
    "pool_temperature": lambda value: (
        None if value is None else check_positive(value, "pool_temperature")),
    "temperature_mode": lambda value: check_choice(value, TEMPERATURE_MODES, "temperature_mode"),
    "attention_weights": lambda value: check_choice(value, ATTENTION_WEIGHTS,
                                                    "attention_weights"),
    "pool_weights": lambda value: check_choice(value, POOL_WEIGHTS, "pool_weights"),
    # The kinds given; update() keeps the current defaults (the model's) for the rest.
    "defaults": lambda value: {
        check_choice(kind, KINDS, "defaults key"): check_positive(t, f"defaults[{kind!r}]")
        for kind, t in value.items()},
}


# Updates and copies of settings are single steps: a session copies its settings under its own
# lock, while ``session.settings.update(...)`` may run in another thread.
_SETTINGS_LOCK = threading.RLock()

RELATIVE_NEEDS_BATCH_FIRST = (
    "temperature_mode='relative' takes each gated op's spread per example, over dim 0, but "
    "a gate of kind {kind!r} on the input's path sees a tensor of shape {shape} for a batch of "
    "{batch} (a sequence-first layout, such as nn.TransformerEncoderLayer with "
    "batch_first=False, or windows or tokens folded into dim 0): the spread would mix examples "
    "or split them. Use temperature_mode='absolute', or a batch-first model")


@dataclass
class GateSettings:
    """What the soft backward of every gated op reads at the moment it runs.

    ``temperature`` is in the units of the pre-activations (``temperature_mode="absolute"``),
    or in units of each layer's own spread (``"relative"``: T times the standard deviation of
    that op's input, per example). It is one number for every kind of op, a mapping kind -> T
    (kinds in :data:`KINDS`), or None; a kind it does not name takes ``defaults[kind]`` (the
    model's own per-kind defaults). ``pool_temperature`` is an alias for the ``"pool"`` kind.
    ``attention_weights`` picks the attention rule (see :mod:`.attention_gates`).
    ``pool_weights``: ``"differentiated"`` (the paper's first version: the soft pool's softmax
    weights are differentiated too) or ``"detached"`` (its later version: they are constants).

    Every field is checked when it is set, so a GateSettings never holds a bad value;
    :meth:`update` checks all its arguments before it changes any.
    """

    temperature: float | Mapping[str, float] | None = None
    gate: str = "sigmoid"
    pool_temperature: float | None = None
    temperature_mode: str = "absolute"
    attention_weights: str = "detached"
    pool_weights: str = "differentiated"
    defaults: Mapping[str, float] = field(default_factory=lambda: dict(KIND_TEMPERATURES))
    # Not a setting: the batch size of the forward whose gates read these settings, where it
    # is known (a session's), so that relative T can refuse tensors whose dim 0 is not it.
    batch_size: int | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "batch_size":
            super().__setattr__(name, value)
        else:  # checked; a typo is refused (it would be a new attribute that nothing reads)
            self.update(**{name: value})

    def update(self, *args: object, **changes: object) -> None:
        """Change some fields; all are checked first, so a bad value changes none of them.

        Fields may be given by keyword or positionally, in declaration order.
        """
        names = list(_FIELD_CHECKS)
        if len(args) > len(names):
            raise PullbackWidgetsTypeError(
                f"update() takes at most {len(names)} positional arguments")
        for name, value in zip(names, args):
            if name in changes:
                raise PullbackWidgetsTypeError(f"update() got {name!r} twice")
            changes[name] = value
        unknown = [name for name in changes if name not in _FIELD_CHECKS]
        if unknown:
            raise PullbackWidgetsTypeError(
                f"unknown setting {unknown[0]!r}{suggest(unknown[0], names)}; "
                f"the settings are {tuple(names)}")
        checked = {name: _FIELD_CHECKS[name](value) for name, value in changes.items()}
        # One step: the fields checked together are those written, whatever another thread
        # updates meanwhile, and its assign() sees all of the update or none.
        with _SETTINGS_LOCK:
            if "defaults" in checked:  # a partial mapping put the package's T in the model's
                checked["defaults"] = {**getattr(self, "defaults", KIND_TEMPERATURES),
                                       **checked["defaults"]}
            temperature = checked.get("temperature", getattr(self, "temperature", None))
            pool_temperature = checked.get("pool_temperature",
                                           getattr(self, "pool_temperature", None))
            if isinstance(temperature, dict) and "pool" in temperature \
                    and pool_temperature not in (None, temperature["pool"]):
                raise PullbackWidgetsError(
                    f"pool_temperature={pool_temperature} and temperature['pool']="
                    f"{temperature['pool']} disagree; pool_temperature is an alias, give one")
            for name, value in checked.items():
                super().__setattr__(name, value)

    def replaced(self, **changes: object) -> GateSettings:
        """A new GateSettings: these fields changed (None values skipped), the rest copied."""
        copy = GateSettings(defaults=self.defaults)
        copy.assign(self)
        copy.update(**self.overriding(changes))
        return copy

    def overriding(self, changes: Mapping[str, object]) -> dict[str, object]:
        """``changes`` (None values skipped) as they override these settings: the pool kind
        given under one name (``pool_temperature``, or a ``temperature`` mapping's "pool")
        replaces what these settings hold under the other, where :meth:`update` would refuse
        the two as disagreeing. A call's own pool T must win over the session's, as every
        other per-call setting does (a session made with ``**PAPER_LATEST`` refused
        ``pullback(..., pool_temperature=0.5)``). A ``temperature`` in ``changes`` replaces
        these settings' whole temperature, the pool T under its alias included: a number sets
        every kind, a mapping the kinds it names, the rest at their defaults (a session made
        with ``pool_temperature=0.5`` kept that pool T under ``pullback(..., temperature=0.9)``,
        where one made with ``temperature={"pool": 0.5}`` took 0.9). Both names in ``changes``
        still must agree."""
        changes = {name: value for name, value in changes.items() if value is not None}
        if "pool_temperature" in changes and "temperature" not in changes \
                and isinstance(self.temperature, Mapping) and "pool" in self.temperature:
            rest = {kind: t for kind, t in self.temperature.items() if kind != "pool"}
            changes["temperature"] = rest or None  # None: every kind at its default
        elif "temperature" in changes:
            changes.setdefault("pool_temperature", None)
        return changes

    def assign(self, other: GateSettings, defaults: bool = True) -> None:
        """Copy every field of ``other`` (already checked) into this object, as one step
        against another thread's :meth:`update` of either; ``defaults=False`` keeps this
        object's own ``defaults``."""
        with _SETTINGS_LOCK:
            for name in _FIELD_CHECKS:
                if defaults or name != "defaults":
                    value = getattr(other, name)
                    # Mappings copied: one shared dict let a change in place to one session's
                    # temperatures change another's, and reach a backward already running.
                    super().__setattr__(name, dict(value) if isinstance(value, Mapping)
                                        else value)

    def temperature_of(self, kind: str) -> float:
        """The base temperature of one kind of op (before ``temperature_mode``)."""
        if kind == "pool" and self.pool_temperature is not None:
            return self.pool_temperature
        if self.temperature is not None and not isinstance(self.temperature, Mapping):
            return self.temperature
        # Checked again where read: a mapping can be changed in place after it was set.
        given = self.temperature is not None and kind in self.temperature
        return check_positive(self.temperature[kind] if given else self.defaults[kind],
                              f"{'temperature' if given else 'defaults'}[{kind!r}]")

    def temperature_for(self, x: Tensor, pool: bool = False, kind: str | None = None,
                        where: Tensor | None = None) -> float | Tensor:
        """The temperature an op of ``kind`` (default "relu", or "pool" with ``pool=True``)
        with input ``x`` uses: a float, or per example (B, 1, ...). It may underflow to 0;
        the ops cap 1/T (:func:`capped_reciprocal`).

        In relative mode an example's spread is the standard deviation over dims 1 and on (so
        dim 0 must be the batch: where ``batch_size`` is known, another dim 0 is an error; a
        1-D tensor is one value per example if it has ``batch_size`` of them, else one spread),
        over the values where ``where`` (bool, broadcasting to ``x``) is True if given (the
        keys attention may use: masked ones do not count); one value has none (0, as have
        values that are not all finite): T ~ 0 there, the step gate."""
        base = self.temperature_of(kind or ("pool" if pool else "relu"))
        if self.temperature_mode == "absolute":
            return base
        # Below 2-D, one spread over all values; but a 1-D tensor of one value per example of
        # a known batch, (B,), is batch first: each example has one value, no spread (it was
        # refused as if its one spread mixed the examples).
        per_example = x.dim() >= 2 or (x.dim() == 1 and self.batch_size is not None
                                        and len(x) == self.batch_size)
        leading = x.shape[0] if per_example else 1
        if self.batch_size is not None and leading != self.batch_size:
            raise PullbackWidgetsError(RELATIVE_NEEDS_BATCH_FIRST.format(
                kind=kind or ("pool" if pool else "relu"), batch=self.batch_size,
                shape=tuple(x.shape) if x.dim() >= 2
                else f"{tuple(x.shape)}, whose one spread is over all its values,"))
        values = x.detach().to(compute_dtype(x.dtype))
        values = values.flatten(1) if x.dim() >= 2 \
            else values[:, None] if per_example else values.flatten()[None]
        if where is not None:
            where = where.expand(x.shape).reshape(values.shape)
            values = values.masked_fill(~where, 0.0)  # what is masked may be infinite
        # No floor: T is relative at any scale (1/T is capped where it is 0).
        spread = _spread(values, where)
        numbers = torch.finfo(values.dtype)
        # (An empty tensor has a spread of 0, and no largest size.)
        if values.shape[1] and \
                not bool((spread.isfinite() & (spread > numbers.tiny ** 0.5 / numbers.eps)).all()):
            # Squares of values near the dtype's largest overflow, and of tiny ones lose their
            # digits: measured on the values divided by their largest size. Values that are
            # not all finite have a spread of 0.
            size = values.abs().amax(dim=1, keepdim=True)
            spread = (_spread(values / size, where) * size[:, 0]) \
                .nan_to_num(0.0, posinf=numbers.max)
        if not per_example:
            return base * float(spread)
        return base * spread.view(-1, *([1] * (x.dim() - 1)))


# Past this, sigmoid(x) is 1 to within float64 rounding.
_SIGMOID_SATURATION = 40.0


def _spread(values: Tensor, where: Tensor | None) -> Tensor:
    """The standard deviation of each row of ``values`` (N, M), over the entries where
    ``where`` (N, M) is True if given (masked entries hold 0); one value has none (0)."""
    if values.numel() == 0:  # an empty tensor (its std would be NaN; of no rows, a warning)
        return values.new_zeros(len(values))
    if where is None:
        return values.std(dim=1, correction=1 if values.shape[1] > 1 else 0)
    count = where.sum(1)
    mean = values.sum(1) / count.clamp_min(1)
    deviations = (values - mean[:, None]).masked_fill(~where, 0.0)
    return (deviations.square().sum(1) / (count - 1).clamp_min(1)).sqrt()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the soft backward computes in: at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def capped_reciprocal(temperature: float | Tensor, dtype: torch.dtype) -> float | Tensor:
    """1 / T, capped at ``dtype``'s largest finite number, so that 0 * (1 / T) stays 0.

    A T below 1 / max (3e-39 in float32) acts as that bound: the gates are then the hard step
    for every pre-activation above about 1e-37 in size.
    """
    largest = torch.finfo(dtype).max
    if isinstance(temperature, Tensor):
        return temperature.to(dtype).reciprocal().clamp_max(largest)
    return largest if temperature * largest <= 1.0 else 1.0 / temperature


def gate_times(grad: Tensor, x: Tensor, scale: float | Tensor, gate: str,
               out: Tensor | None = None) -> Tensor:
    """``grad * g(scale * x)`` for a soft gate; ``scale`` a finite float or a tensor that
    broadcasts against ``x``. ``out``: a tensor of the result's shape to write it into (it may
    be ``grad`` or ``x`` themselves), else a new tensor.

    softplus's backward is exactly ``grad * sigmoid(beta * x)``, fused into one pass.
    """
    if gate == "sigmoid":
        if isinstance(scale, Tensor):
            x, scale = x * scale, 1.0
        if out is None:
            return torch.ops.aten.softplus_backward(grad, x, scale, _SIGMOID_SATURATION)
        if torch.autograd.graph._allow_mutation_on_saved_tensors_enabled:
            # That context's dispatch mode takes every written argument to be named "out"
            # (KeyError on grad_input), so this write goes through copy_.
            return out.copy_(torch.ops.aten.softplus_backward(grad, x, scale,
                                                              _SIGMOID_SATURATION))
        return torch.ops.aten.softplus_backward.grad_input(
            grad, x, scale, _SIGMOID_SATURATION, grad_input=out)
    return torch.mul(grad, torch.special.ndtr(x * scale), **({} if out is None else {"out": out}))


FIRST_ORDER_ONLY = (
    "a pullback is first order: the soft gates' backward cannot be differentiated again "
    "(create_graph=True, as in a double backward, a gradient penalty, or "
    "torch.autograd.functional's jvp, hvp and hessian)")


def first_order(backward: Callable) -> Callable:
    """A soft op's ``backward``, refused where autograd would differentiate it again
    (``create_graph=True`` runs a backward with grad mode on). torch's ``once_differentiable``
    defers that error to a node that a targeted ``autograd.grad`` skips: it returned None, or
    zeros in ``torch.autograd.functional``, for the terms through the gates."""
    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise PullbackWidgetsError(FIRST_ORDER_ONLY)
        return backward(ctx, *grads)
    return checked


# torch's tests for the wrappers vmap puts on tensors; None in a torch without them.
_IS_BATCHED, _IS_WRAPPED = (getattr(torch._C._functorch, name, None)
                            for name in ("is_legacy_batchedtensor", "is_functorch_wrapped_tensor"))


def is_plain(tensor: Tensor) -> bool:
    """Not a batched tensor (``is_grads_batched`` and ``vmap`` wrap gradients), so results made
    from it may be written into ordinary tensors. False where torch cannot tell."""
    if _IS_BATCHED is None or _IS_WRAPPED is None:
        return False
    return not (_IS_BATCHED(tensor) or _IS_WRAPPED(tensor))


def as_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)``, skipping the call where it would return ``tensor`` itself (a gate's
    backward makes three such casts: a few microseconds each, on every gate)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class SoftClamp(torch.autograd.Function):
    """ReLU-family op: runs ``hard_op`` forward, pulls back through g(z - low) * g(high - z).

    ``remake``: how to remake z in the backward instead of keeping it (see :class:`Remake`).
    """

    @staticmethod
    def forward(ctx, z: Tensor, hard_op: Callable[[Tensor], Tensor], low: float,
                high: float | None, inplace: bool, settings: GateSettings,
                remake: Remake | None = None) -> Tensor:
        keep_pre_activation(ctx, z, inplace, remake)
        out = hard_op(z)
        if inplace:
            ctx.mark_dirty(z)
        ctx.low, ctx.high, ctx.settings = low, high, settings
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad_out: Tensor):
        z = kept_pre_activation(ctx)
        low, high, settings = ctx.low, ctx.high, ctx.settings
        if settings.gate == "hard":
            # Autograd's own kernels for ReLU and hardtanh, so the result is theirs bit for bit
            # (a NaN pre-activation passes the gradient, as there).
            grad_in = torch.ops.aten.threshold_backward(grad_out, z, low) if high is None \
                else torch.ops.aten.hardtanh_backward(grad_out, z, low, high)
        else:
            dtype = compute_dtype(z.dtype)
            # A remade or promoted z is this call's own, and its buffer can take the results
            # (fewer big allocations), unless grad_out is vmapped (batched targets): then
            # everything is out of place.
            own = (ctx.remake_op is not None or z.dtype != dtype) and is_plain(grad_out)
            z, grad = as_dtype(z, dtype), as_dtype(grad_out, dtype)
            scale = capped_reciprocal(settings.temperature_for(z), dtype)
            if high is None:
                below = (z.sub_(low) if own else z - low) if low else z
                grad_in = gate_times(grad, below, scale, settings.gate,
                                     out=below if own else None)
            else:  # g(high - z) = g(-(z - high))
                grad_in = gate_times(grad, z - low if low else z, scale, settings.gate)
                above = z.sub_(high) if own else z - high
                grad_in = gate_times(grad_in, above, -scale, settings.gate,
                                     out=grad_in if own else None)
            grad_in = as_dtype(grad_in, grad_out.dtype)
        return grad_in, None, None, None, None, None, None


@dataclass(frozen=True)
class PoolGeometry:
    """A 2-D max-pool's arguments, each as an (h, w) pair."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool

    @staticmethod
    def of(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False) -> PoolGeometry:
        """From ``F.max_pool2d``'s arguments: each an int (numpy's too) or a sequence of one or
        two; ``stride`` None or empty means the kernel size."""
        def pair(value) -> tuple[int, int]:
            try:
                return (operator.index(value),) * 2
            except TypeError:
                values = [operator.index(v) for v in value]
                return values[0], values[-1]

        def empty(value) -> bool:
            try:
                return len(value) == 0
            except TypeError:
                return False

        kernel = pair(kernel_size)
        stride = kernel if stride is None or empty(stride) else pair(stride)
        return PoolGeometry(kernel, stride, pair(padding), pair(dilation), bool(ceil_mode))

    def as_args(self) -> tuple:
        return self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode


# The soft pool's working set per channel chunk on the CPU: small enough to stay in cache
# (measured on a 2-core CPU: 2-8 MiB chunks ran 3-5x faster than one pass over a batch of 8).
# Accelerators take all channels at once: there every chunk costs kernel launches.
_POOL_CHUNK_BYTES = 4 << 20


def soft_max_pool_backward(grad_out: Tensor, x: Tensor, geometry: PoolGeometry,
                           temperature: float | Tensor, detached: bool = False) -> Tensor:
    """Gradient of the soft pool at ``x`` (N, C, H, W), given ``grad_out`` (N, C, Ho, Wo);
    ``temperature`` a float or per example (N, 1, 1, 1); ``detached``: the softmax weights are
    constants. Returns (N, C, H, W) in ``x``'s dtype.

    Each window is centred on its own maximum m before anything is scaled by 1/T:
    s_j = (w_j - m) / T <= 0, p = softmax(s), and the local gradient is p_j (detached) or
    p_j (1 + s_j - sum_i p_i s_i) (differentiated). s is floored at -1000, where exp(s) is 0 in
    every dtype, so that a weight that underflows to 0 gives 0, never 0 * inf. Values beyond a
    quarter of the compute dtype's range (8.5e37 in float32) are clipped to it, so differences
    cannot overflow.

    Layout: the padded input is split into stride-phase planes (row mod stride, column mod
    stride), where one kernel offset's entries of every window are a plain slice, rows and
    columns contiguous; strided views of the input itself make every op several times slower.
    On the CPU the planes hold one cache-sized chunk of channels at a time; each chunk's
    gradient is gathered in them and put back in place before the next chunk's input goes in.
    """
    n, c, h, w = x.shape
    out_h, out_w = grad_out.shape[-2:]
    if x.numel() == 0 or grad_out.numel() == 0:  # an empty batch (a selection of no example)
        return grad_out.new_zeros((n, c, h, w))
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry.as_args()[:4]
    dtype = compute_dtype(x.dtype)
    bound = torch.finfo(dtype).max / 4
    # The planes cover the padded input and every window (ceil_mode's last one may hang over
    # the edge), (sh, sw, N, C, plane_h, plane_w): plane (a, b) holds padded rows a::sh and
    # columns b::sw. -bound pads: below every window's maximum by far more than 100 T, finite.
    plane_h = -(-max(h + 2 * ph, (out_h - 1) * sh + dh * (kh - 1) + 1) // sh)
    plane_w = -(-max(w + 2 * pw, (out_w - 1) * sw + dw * (kw - 1) + 1) // sw)
    phases = [(a, b, *_phase_slices(h, ph, sh, a), *_phase_slices(w, pw, sw, b))
              for a in range(sh) for b in range(sw)]
    inverse_t = capped_reciprocal(temperature, dtype)
    offsets = [(i * dh, j * dw) for i in range(kh) for j in range(kw)]
    # The -bound fill gives padding no weight while each window's maximum stands 1000 T above it
    # (exp(-1000) is 0 in every dtype). Beyond that (T past about 1e35 in float32, or maxima
    # near -bound), padded entries are masked out explicitly: ``padding`` marks them in the
    # planes, made when first needed.
    smallest_inverse = float(inverse_t.min()) if isinstance(inverse_t, Tensor) else inverse_t
    padding: Tensor | None = None

    def windows_at(t: Tensor, top: int, left: int) -> Tensor:
        """Entry (top, left) of every window of planes ``t``: (N, c, Ho, Wo), a slice."""
        return t[top % sh, left % sw, :, :, top // sh:top // sh + out_h,
                 left // sw:left // sw + out_w]

    result_dtype, grad_out = grad_out.dtype, grad_out.to(dtype)
    # Under batched targets grad_out is vmapped: the gradient is made from it, so the scatter
    # adds into a tensor of its kind, and only out-of-place products enter it.
    plain = is_plain(grad_out)
    step = max(1, _POOL_CHUNK_BYTES // (len(offsets) * n * out_h * out_w
                                        * torch.finfo(dtype).bits // 8)) \
        if x.device.type == "cpu" else c
    # One chunk's planes, reused: no planes the size of the whole input (at batch 8, 26 MB of
    # fresh pages for ResNet-50's pool), and the chunk stays in cache from input to gradient.
    chunk_planes = torch.empty((sh, sw, n, min(step, c), plane_h, plane_w), dtype=dtype,
                               device=x.device)
    # Per window entry, s and (differentiated) exp(s), for one chunk: reused like the planes.
    chunk_scaled = torch.empty((len(offsets), n, min(step, c), out_h, out_w), dtype=dtype,
                               device=x.device)
    chunk_exp = None if detached else torch.empty_like(chunk_scaled)
    grad = grad_out.new_empty((n, c, h, w), dtype=result_dtype)
    for first in range(0, c, step):
        def channels(t: Tensor, dim: int, first: int = first) -> Tensor:
            # Whole tensors when one chunk covers them (vmap cannot slice a batched grad_out
            # whole: that is an alias).
            return t if step >= c else t.narrow(dim, first, min(step, c - first))

        planes = chunk_planes.narrow(3, 0, min(step, c - first)).fill_(-bound)
        x_chunk = channels(x, 1).to(dtype)
        for a, b, rows, x_rows, cols, x_cols in phases:
            torch.clamp(x_chunk[:, :, x_rows, x_cols], -bound, bound,
                        out=planes[a, b, :, :, rows, cols])
        entries = [windows_at(planes, top, left) for top, left in offsets]
        maximum = torch.maximum(entries[0], entries[1]) if len(entries) > 1 \
            else entries[0].clone()
        for entry in entries[2:]:
            torch.maximum(maximum, entry, out=maximum)
        # A contiguous prefix of the buffer, not a narrowed view: a partial last chunk laid out
        # with the full chunk's strides sums over its entries in another order (other bits).
        scaled = _prefix(chunk_scaled, maximum.shape)
        for k, entry in enumerate(entries):
            torch.sub(entry, maximum, out=scaled[k])
        scaled.mul_(inverse_t)  # (k*k, N, c, Ho, Wo): s = (w - m) / T
        if (float(maximum.min()) + bound) * smallest_inverse < 1000.0:
            if padding is None:
                padding = torch.ones((sh, sw, 1, 1, plane_h, plane_w), dtype=torch.bool,
                                     device=x.device)
                for a, b, rows, _, cols, _ in phases:
                    padding[a, b, :, :, rows, cols] = False
            has_real = maximum > -bound  # a window of padding alone keeps its weights
            for k, (top, left) in enumerate(offsets):
                scaled[k].masked_fill_(has_real & windows_at(padding, top, left), -1000.0)
        if detached:
            weights = scaled.exp_()  # unnormalised; each window's maximum is 1
            total = weights.sum(dim=0)  # >= 1
        else:
            scaled.clamp_min_(-1000.0)
            weights = torch.exp(scaled, out=_prefix(chunk_exp, maximum.shape))
            total = weights.sum(dim=0)
            mean = torch.mul(weights[0], scaled[0], out=maximum)  # maximum is spent
            for k in range(1, len(entries)):
                mean.addcmul_(weights[k], scaled[k])
            weights = scaled.sub_(mean.div_(total).sub_(1.0)).mul_(weights)  # (1 + s - mean) e^s
        share = channels(grad_out, 1) / total
        # The chunk's gradient gathers in its planes, once their windows are read.
        grad_planes = planes.zero_() if plain else grad_out.new_zeros(planes.shape)
        for k, (top, left) in enumerate(offsets):
            target = windows_at(grad_planes, top, left)
            if plain:
                target.addcmul_(weights[k], share)
            else:
                target.add_(weights[k] * share)
        grad_chunk = channels(grad, 1)
        for a, b, rows, x_rows, cols, x_cols in phases:
            grad_chunk[:, :, x_rows, x_cols] = grad_planes[a, b, :, :, rows, cols]
    return grad


def _prefix(buffer: Tensor, shape: torch.Size) -> Tensor:
    """The first (len(buffer), *shape) of contiguous ``buffer``'s memory, contiguous."""
    full = (buffer.shape[0], *shape)
    return buffer.view(-1)[:math.prod(full)].view(full)


def _phase_slices(size: int, pad: int, stride: int, phase: int) -> tuple[slice, slice]:
    """The rows (or columns) of an input of ``size``, padded by ``pad``, that fall in stride
    phase ``phase``: (their slice in the phase's plane, their slice in the input)."""
    first = max(0, -(-(pad - phase) // stride))
    last = -(-(size + pad - phase) // stride)
    return slice(first, last), slice(first * stride + phase - pad, size, stride)


def hard_max_pool_backward(grad_out: Tensor, x: Tensor, geometry: PoolGeometry) -> Tensor:
    """Autograd's own max-pool gradient (all of it to each window's first maximum)."""
    _, indices = torch.ops.aten.max_pool2d_with_indices(x, *geometry.as_args())
    return torch.ops.aten.max_pool2d_with_indices_backward(
        grad_out, x, *geometry.as_args(), indices)


class SoftMaxPool2d(torch.autograd.Function):
    """Max-pool: runs ``hard_op`` forward, pulls back through the soft pool."""

    @staticmethod
    def forward(ctx, x: Tensor, hard_op: Callable[[Tensor], Tensor], geometry: PoolGeometry,
                settings: GateSettings) -> Tensor:
        ctx.save_for_backward(x)
        ctx.geometry, ctx.settings = geometry, settings
        return hard_op(x)

    @staticmethod
    @first_order
    def backward(ctx, grad_out: Tensor):
        (x,) = saved_tensors(ctx)
        unbatched = x.dim() == 3
        if unbatched:
            x, grad_out = x.unsqueeze(0), grad_out.unsqueeze(0)
        if ctx.settings.gate == "hard":
            grad_in = hard_max_pool_backward(grad_out, x, ctx.geometry)
        else:
            # In relative mode, the spread measured in the dtype the backward computes in.
            temperature = ctx.settings.temperature_for(x.to(compute_dtype(x.dtype)), pool=True)
            grad_in = soft_max_pool_backward(grad_out, x, ctx.geometry, temperature,
                                             ctx.settings.pool_weights == "detached")
        return (grad_in.squeeze(0) if unbatched else grad_in), None, None, None
