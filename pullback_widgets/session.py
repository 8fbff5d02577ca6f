"""The session: one forward, many pullbacks; and the one-shot and Captum-style entry points."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import types
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from .gates import GateSettings
from .graph_audit import audit_graph, plain_gates_notice
from .interception import _gating, checkpointing_error
from .model_helpers import (
    LayerRecorder,
    default_temperatures,
    evaluation_mode,
    outputs_channels_last,
    token_grid,
)
from .model_state import ModelState
from .own_call import autocast_as, autocast_state
from .pre_activations import changed_in_place_error
from .targets import Target, Unit, class_indices, is_class_target, unit_seed
from .validation import (
    PullbackWidgetsError,
    PullbackWidgetsTypeError,
    check_inputs,
    check_logits,
    check_model,
    explained_errors,
    explained_forward_errors,
    submodules,
)

# One number for every kind of gated op, a mapping kind -> T, or None: the model's defaults.
Temperature = float | Mapping[str, float] | None

_NO_GRADIENT_PATH = (
    "the model's {what} does not depend on its input through autograd: its forward runs "
    "(at least in part) under torch.no_grad() or torch.inference_mode(), or detaches the "
    "input. A pullback needs the whole gradient path; remove that from forward().")

# The model's output reaches its input (checked first): a layer that does not is most often
# on a branch of constants or parameters alone, not under no_grad.
_LAYER_OFF_THE_PATH = (
    "layer {layer!r} does not depend on the model's input through autograd: it runs on "
    "values made without the input (buffers, parameters, constants), or under "
    "torch.no_grad() or torch.inference_mode(), or on a detached input; a Unit there has no "
    "pullback: pick a layer the input reaches")

_NO_PATH_THROUGH_DETACHED_ATTENTION = (
    "no gradient reaches the input: with attention_weights='detached' the attention weights "
    "are constants and only the values carry a gradient, so an input that reaches the output "
    "only through attention queries or keys gets none; use attention_weights='differentiated'")


NO_GATED_OP = (
    "the engine gated no op on the input's path (it gates ReLU-family and max-pool ops, SiLU, "
    "GELU, Hardswish, leaky ReLU, LayerNorm, GroupNorm and attention where the model calls "
    "them from Python): the pullback equals the plain gradient")
PLAIN_ATTENTION = (
    "the model computes {count} softmax(es) by hand on the input's path (attention written as "
    "matmul-softmax-matmul, e.g. timm with fused attention off, or nn.MultiheadAttention with "
    "need_weights=True): attention there stays plain, not gated; F.scaled_dot_product_attention "
    "is gated (and nn.MultiheadAttention with need_weights=False, which calls it)")


def gating_notices(gated_calls: int, plain_attention: int,
                   plain_gate_ops: Mapping[str, int]) -> tuple[str, ...]:
    """The honest notices for a forward that gated ``gated_calls`` ops and left
    ``plain_attention`` softmaxes and ``plain_gate_ops`` (op name -> count, see
    :func:`.graph_audit.plain_gates_notice`) plain: every place that shows a pullback shows them."""
    notices = []
    if gated_calls == 0:
        notices.append(NO_GATED_OP)
    if plain_attention:
        notices.append(PLAIN_ATTENTION.format(count=plain_attention))
    plain_ops = plain_gates_notice(plain_gate_ops)
    if plain_ops:
        notices.append(plain_ops)
    return tuple(notices)


# Where a widget's status line shows the notices, its thread does not warn them too (a warning
# from a worker thread lands under whichever notebook cell ran last). Per thread: the user's
# own calls elsewhere still warn.
_QUIET = threading.local()


@contextlib.contextmanager
def notices_unwarned() -> Iterator[None]:
    """Inside this context, sessions made in this thread keep their notices
    (:attr:`PullbackSession.notices`) without warning them."""
    before = getattr(_QUIET, "on", False)
    _QUIET.on = True
    try:
        yield
    finally:
        _QUIET.on = before


def _stacklevel_outside_package() -> int:
    """``warnings.warn``'s stacklevel, from the function that calls this, that names the first
    frame outside the package: the user's line, however deep the package called in."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


_CHANGED_SINCE_THE_FORWARD = (
    "the model changed since this session's forward (its parameters or buffers in place, also "
    "through .data, replaced, or converted or moved with .to(), .double(), .cuda(); or a "
    "module replaced, or given a forward of its own): the session's logits and graph are of "
    "the model as it was; make a new PullbackSession")


_ANOTHER_FORWARD = (
    "a Unit on {layers} needs a new forward, and the model's forward now gives other logits "
    "than this session's (a hook, a setting or an attribute of the model changed, or its "
    "forward is not deterministic): make a new PullbackSession, or name the layers when "
    "making one (layers=[...])")


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Equal shapes and values, NaN equal to NaN (a NaN logit does not stop a Unit)."""
    a, b = a.detach(), b.detach()
    return a.shape == b.shape and a.dtype == b.dtype and \
        bool(((a == b) | (a.isnan() & b.isnan())).all())


def _copy_as_laid_out(tensor: Tensor) -> Tensor:
    """A copy with ``tensor``'s own strides (``clone()`` makes a crop or a strided slice
    contiguous): a model's reductions add in memory order, and the forward must be the model's
    own on these inputs, bit for bit. Differentiable. An expanded dim (stride 0) gets a stride
    past all the others. A plain clone where no copy can have them (other overlapping strides)
    or where their span would cost far more memory than the values (a sparse subsample of a
    huge tensor): past 4 times the values and 2**26 elements."""
    strides = list(tensor.stride())
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, strides))
    for dim, size in enumerate(tensor.shape):
        if strides[dim] == 0 and size > 1:
            strides[dim], span = span, span * size
    if span > max(4 * tensor.numel(), 1 << 26):
        return tensor.clone()
    try:
        copy = torch.empty_strided(tensor.shape, strides, dtype=tensor.dtype,
                                   device=tensor.device)
        return copy.copy_(tensor)
    except RuntimeError:
        return tensor.clone()


def _has_backward_hooks(model: nn.Module) -> bool:
    """Whether a module backward hook (its own, or a global one) would see the backward."""
    hooks = torch.nn.modules.module
    return bool(hooks._global_backward_hooks or hooks._global_backward_pre_hooks) or any(
        module._backward_hooks or module._backward_pre_hooks for module in submodules(model))


def _copied_arguments(arguments: tuple) -> tuple:
    """The model's further arguments with every tensor in them (in tuples, lists, dicts)
    copied as laid out, ``requires_grad`` kept: a forward that runs later (for new layers, or
    again for remakes) must see what the first one saw, not what the caller's tensors hold by
    then, nor what a forward changed in them in place."""
    return tree_map_only(Tensor, _copy_argument, arguments) if arguments else arguments


def _copy_argument(tensor: Tensor) -> Tensor:
    try:
        copy = _copy_as_laid_out(tensor.detach())
    except RuntimeError:  # no strides (a sparse tensor)
        copy = tensor.detach().clone()
    return copy.requires_grad_(tensor.requires_grad)


@contextlib.contextmanager
def _autograd_on() -> Iterator[None]:
    with torch.inference_mode(False), torch.enable_grad():
        yield


class _OwnSettings:
    """The ``settings`` of a session or an :class:`ExcitationPullback`: its own GateSettings,
    made with the model's own defaults. Assigning a GateSettings copies its settings into that
    object, the model's defaults kept: a new ``GateSettings()`` holds the package's defaults,
    and assigned whole it silently turned ``temperature=None`` from the model's own T (0.7 on
    Lite0) into 0.3; anything else assigned broke every later call."""

    def __get__(self, owner: object, kind: type | None = None) -> GateSettings:
        return self if owner is None else owner._settings

    def __set__(self, owner: object, value: object) -> None:
        if not isinstance(value, GateSettings):
            raise PullbackWidgetsTypeError(
                f"settings must be a pw.GateSettings, got {type(value).__name__}; or change "
                "them with configure(...) or settings.update(...)")
        owner._settings.assign(value, defaults=False)


@dataclass(frozen=True)
class _Forward:
    """One recorded forward: the leaf it starts at, its outputs, and the retained graph."""

    input: Tensor
    logits: Tensor
    activations: dict[str, Tensor]
    layers: tuple[str, ...]
    gated_calls: int
    gated_kinds: dict[str, int]
    plain_attention: int
    plain_gate_ops: dict[str, int]
    channels_last_layers: frozenset[str]


class PullbackSession:
    """One forward pass, then as many pullbacks of it as you like.

    The forward runs once (in eval mode, the model's flags restored after), with its graph
    retained. :meth:`pullback` and :meth:`pullbacks` re-run only the backward.

    ``inputs``: (B, C, H, W) float, in whatever space the model takes (pixel space [0, 1] for
    :func:`load_model` models). ``temperature=None`` is the model's own default per kind of op
    (:func:`default_temperatures`), as everywhere in the package. ``layers``: names of layers
    whose outputs ``Unit`` targets may use; a Unit on another layer costs one more forward,
    which then records it too.
    ``forward_args``: further positional arguments to the model, after ``inputs``.

    Settings. ``session.settings`` holds the session's own settings. Settings passed to
    :meth:`pullback` or :meth:`pullbacks` apply to that call only; :meth:`configure` changes
    the session's own settings for every later call. A call that raises changes nothing.

    Threads. A session may be used from several threads at once: each call gets the result
    of its own settings (the backward passes of one session take turns), and every forward
    of the package holds one lock, so mode flags and layer recording never interleave, even
    on models that share modules. Your own forward calls in another thread are not locked, but
    the training flags are the model's: while the package runs a forward on a train-mode
    model, your forwards there run in eval mode, and switching it to train mode meanwhile is
    an error. Do not train and explain one model at once; explain a copy.
    """

    # Whether the session records the model's tensors, to refuse pullbacks once they change
    # (:mod:`.model_state`).
    _records_model = True

    settings = _OwnSettings()

    def __init__(self, model: nn.Module, inputs: Tensor, *, temperature: Temperature = None,
                 gate: str = "sigmoid", pool_temperature: float | None = None,
                 temperature_mode: str = "absolute", attention_weights: str = "detached",
                 pool_weights: str = "differentiated", layers: Iterable[str] = (),
                 forward_args: Sequence[object] = ()) -> None:
        model = check_model(model)
        # A copy: a forward for new layers runs later, on these inputs, not on what the
        # caller's tensor holds by then.
        inputs = _copy_as_laid_out(check_inputs(inputs).detach())
        if type(inputs) is not Tensor:
            # A subclass whose operations keep it (torch's default __torch_function__; not
            # nn.Parameter, nor tv_tensors.Image, whose copies are plain): autograd finds its
            # leaf through that __torch_function__, a view, so the input's gradient path was
            # reported missing, as if the forward ran under no_grad.
            raise PullbackWidgetsTypeError(
                f"inputs are a {type(inputs).__name__}, a tensor subclass whose operations "
                "return that subclass: pass a plain tensor, inputs.as_subclass(torch.Tensor)")
        names = None if isinstance(layers, str) or not isinstance(layers, Iterable) \
            else tuple(layers)
        if names is None or not all(isinstance(name, str) for name in names):
            raise PullbackWidgetsTypeError("layers must be a list of layer names (str)")
        if isinstance(forward_args, str) or not isinstance(forward_args, Sequence):
            raise PullbackWidgetsTypeError(
                "forward_args must be a list or tuple of the model's further arguments")
        layers = tuple(dict.fromkeys(names))
        self._settings = GateSettings(temperature, gate, pool_temperature, temperature_mode,
                                      attention_weights, pool_weights,
                                      defaults=default_temperatures(model))
        self.model = model
        self._inputs = inputs
        self._forward_args = _copied_arguments(tuple(forward_args))
        # What the graph's gated ops read when a backward runs: each call sets it, under the
        # lock, to that call's settings.
        self._live = self.settings.replaced()
        self._live.batch_size = len(inputs)
        self._lock = threading.RLock()
        # Backward passes of this session running now (in this thread: the lock is held).
        self._backwards = 0
        # A ViT's token layout: Units on its (B, N, C) token maps address patches.
        self.token_grid = token_grid(model, inputs)
        self.channels_last = outputs_channels_last(model)
        # The session's forwards and backwards run under autocast as the caller had it now,
        # not as it is at a later call: under a caller's bfloat16 autocast the soft backward's
        # products (attention's) ran in bfloat16, and a new forward for new layers too.
        self._autocast = autocast_state(inputs.device.type)
        self._state = self._run_forward(layers)
        # As left by the forward.
        self._model_state = ModelState.of(model) if self._records_model else None

    # ------------------------------------------------------------ the recorded forward

    # The properties hand out copies (differentiable ones, for the graph's tensors): the
    # session's own tensors are the roots of its backward passes and what a new forward runs
    # on, so an edit in place of what a caller got (``logits -= logits.max()``) would change
    # every later pullback without a word.

    @property
    def inputs(self) -> Tensor:
        """A copy of the inputs the session's forward ran on."""
        return _copy_as_laid_out(self._inputs)

    @property
    def logits(self) -> Tensor:
        """The model's logits (B, num_classes), bit-identical to its plain forward; a copy,
        still on the forward's graph."""
        return self._state.logits.clone()

    @property
    def activations(self) -> dict[str, Tensor]:
        """Recorded layer outputs by name; copies, still on the forward's graph."""
        return {name: output.clone() for name, output in self._state.activations.items()}

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the recorded layers."""
        return self._state.layers

    @property
    def gated_calls(self) -> int:
        """How many soft ops the input's gradient passes (gated calls off its path, on
        parameters alone, do not count)."""
        return self._state.gated_calls

    @property
    def gated_kinds(self) -> dict[str, int]:
        """:attr:`gated_calls` per kind of op ("relu", "pool", "silu", ..., "norm",
        "attention")."""
        return dict(self._state.gated_kinds)  # a copy: the session's own picks its errors

    @property
    def channels_last_layers(self) -> frozenset[str]:
        """Recorded layers whose outputs are laid out (B, H, W, C) in a model whose layers are
        otherwise (B, C, H, W) (ConvNeXt's blocks): Units are refused there."""
        return self._state.channels_last_layers

    @property
    def plain_attention(self) -> int:
        """Softmaxes on the input's path, left plain (attention computed by hand)."""
        return self._state.plain_attention

    @property
    def plain_gate_ops(self) -> dict[str, int]:
        """Gate-like ops on the input's path that kept their plain backward, by name ("ELU",
        "max-pool", ...): ops the engine does not gate, or gated ops it could not see."""
        return dict(self._state.plain_gate_ops)  # a copy: the session's own makes notices

    @property
    def notices(self) -> tuple[str, ...]:
        """What the forward's pullbacks are not (see :func:`gating_notices`); the session
        also warns them once. Empty when every op on the input's path is gated."""
        return gating_notices(self.gated_calls, self.plain_attention, self.plain_gate_ops)

    @property
    def probabilities(self) -> Tensor:
        """Softmax of the logits, (B, num_classes), detached."""
        return self._state.logits.detach().softmax(dim=1)

    def _run_forward(self, layers: tuple[str, ...]) -> _Forward:
        """A new forward recording ``layers``; checked, and not yet the session's."""
        # A forward that changes in place, after a gate, a tensor that gate's pre-activation is
        # remade from cannot be remade: it runs again, keeping every pre-activation.
        for remake in (True, False):
            # Pullbacks need autograd even when the caller is inside no_grad or inference_mode.
            with _autograd_on(), autocast_as(self._inputs.device.type, self._autocast), \
                    evaluation_mode(self.model, graph_kept=True), \
                    LayerRecorder(self.model, layers) as recorder, \
                    _gating(self._live, remake) as mode, \
                    explained_forward_errors(self.model, self._inputs):
                leaf = _copy_as_laid_out(self._inputs).requires_grad_(True)
                # Not the leaf itself: a model may change its input in place.
                logits = self.model(_copy_as_laid_out(leaf),
                                    *_copied_arguments(self._forward_args))
            if mode.remakes_intact():
                break
        check_logits(logits, len(self._inputs))
        audit = audit_graph([logits, *recorder.outputs.values()], leaf, mode.gated_nodes,
                            mode.plain_nodes)
        if not audit.reach_input[0]:
            raise PullbackWidgetsError(_NO_GRADIENT_PATH.format(what="output"))
        reach_input = dict(zip(recorder.outputs, audit.reach_input[1:]))
        for name in layers:
            if recorder.calls.get(name, 0) == 0 or name not in recorder.outputs:
                raise PullbackWidgetsError(
                    f"layer {name!r} produced no tensor output in the forward pass")
            if recorder.calls[name] > 1:
                raise PullbackWidgetsError(
                    f"layer {name!r} ran {recorder.calls[name]} times in one forward pass, so "
                    "its output is ambiguous; pick a layer that runs once")
            if not reach_input[name]:
                raise PullbackWidgetsError(_LAYER_OFF_THE_PATH.format(layer=name))
        gated_calls = sum(audit.gated_kinds.values())
        if not getattr(_QUIET, "on", False):
            for notice in gating_notices(gated_calls, audit.softmaxes, audit.plain_gate_ops):
                warnings.warn(notice, stacklevel=_stacklevel_outside_package())
        return _Forward(leaf, logits, recorder.outputs, layers, gated_calls, audit.gated_kinds,
                        audit.softmaxes, audit.plain_gate_ops, frozenset(recorder.channels_last))

    def _state_for(self, targets: Sequence[Target]) -> _Forward:
        """The recorded forward, or a new one that also records the Units' layers."""
        state = self._state
        missing = tuple(dict.fromkeys(t.layer for t in targets if isinstance(t, Unit)
                                      and t.layer not in state.activations))
        if not missing:
            return state
        new = self._run_forward(state.layers + missing)
        # The new forward replaces the session's logits and graph: it must be the same forward.
        # A change the record of the parameters cannot see (a hook, a Python attribute such as
        # timm's fused_attn, randomness in forward()) would otherwise switch every later answer,
        # class targets too, to another model's. Its logits tell, bit for bit: another path to
        # them (timm's attention unfused, one op more) rounds differently. Gate counts are not
        # compared: a new layer off the logits' path adds its own.
        if not _same_values(new.logits, state.logits):
            raise PullbackWidgetsError(
                _ANOTHER_FORWARD.format(layers=", ".join(map(repr, missing))))
        return new

    # ------------------------------------------------------------ settings

    def configure(self, *, temperature: Temperature = None, gate: str | None = None,
                  pool_temperature: float | None = None, temperature_mode: str | None = None,
                  attention_weights: str | None = None,
                  pool_weights: str | None = None) -> GateSettings:
        """Change the session's own settings for every later call; returns them.

        Arguments left as None keep their value. All are checked before any changes, so a bad
        one changes nothing. (``session.settings.update(...)`` does the same, and can also set a
        setting back to None: ``temperature`` to the model's defaults, ``pool_temperature`` to
        "same as temperature".)
        """
        changes = dict(temperature=temperature, gate=gate, pool_temperature=pool_temperature,
                       temperature_mode=temperature_mode, attention_weights=attention_weights,
                       pool_weights=pool_weights)
        with self._lock:
            # The pool T given here replaces the session's under either name (GateSettings.
            # overriding), as a per-call one does.
            self.settings.update(**self.settings.overriding(changes))
            return self.settings

    def _call_settings(self, **overrides: object) -> GateSettings:
        """The session's settings with this call's overrides (None = the session's)."""
        with self._lock:
            return self.settings.replaced(**overrides)

    # ------------------------------------------------------------ pullbacks

    def _seed(self, state: _Forward, target: Target) -> tuple[Tensor, Tensor]:
        """(output tensor, gradient seed on it) that selects ``target``."""
        if is_class_target(target):
            batch, num_classes = state.logits.shape
            classes = class_indices(target, batch, num_classes, state.logits.device)
            rows = torch.arange(batch, device=state.logits.device)
            picked = state.logits.detach()[rows, classes]
            if bool(picked.isnan().any()):  # its gradient would still come out finite
                example = int(picked.isnan().nonzero()[0, 0])
                raise PullbackWidgetsError(
                    f"the model's output for example {example}, class {int(classes[example])}, "
                    "holds NaN (an overflow inside the model?): there is nothing to explain")
            seed = torch.zeros_like(state.logits)
            seed[rows, classes] = 1.0
            return state.logits, seed
        activation = state.activations[target.layer]
        seed = unit_seed(target, activation, len(self._inputs), self.token_grid,
                         self.channels_last, target.layer in state.channels_last_layers)
        undefined = ((seed != 0) & activation.detach().isnan()).flatten(1).any(1)
        if bool(undefined.any()):  # as for a class: its gradient would still come out finite
            raise PullbackWidgetsError(
                f"layer {target.layer!r} holds NaN in the unit's values for example "
                f"{int(undefined.nonzero()[0, 0])} (an overflow inside the model?): there is "
                "nothing to explain")
        return activation, seed

    def model_unchanged(self) -> bool:
        """Whether the model's modules, parameters and buffers are still those of this
        session's forward: no module replaced or given a forward of its own, no tensor changed
        in place (also through ``.data``, as far as a sample of each tensor's values shows),
        replaced, converted or moved. Pullbacks are refused once they are not."""
        return self._model_state is None or self._model_state.matches(self.model)

    def _backward(self, targets: Sequence[Target], call: GateSettings, batched: bool,
                  retain_graph: bool = True) -> Tensor:
        """Pullbacks (k, B, C, H, W) of ``targets`` under ``call``'s settings.

        Everything that can fail on bad input (a new forward for new layers, the seeds) runs
        before the session's state changes. ``retain_graph=False`` frees the graph as the
        backward goes (less peak memory); the session is then spent.
        """
        with self._lock:
            if not self.model_unchanged():
                # Its graph would pull back through the new weights, or fail on their dtype,
                # and a forward for new layers would explain another model than the logits'.
                raise PullbackWidgetsError(_CHANGED_SINCE_THE_FORWARD)
            state = self._state_for(targets)
            seeds = [self._seed(state, t) for t in targets]
            if state is not self._state:
                self._state = state
                self._model_state = ModelState.of(self.model) if self._records_model else None
            # A call from inside this session's own backward (a backward hook of the model's
            # calls it; the lock is this thread's) must hand the graph back with the outer
            # call's settings: set back to the session's, the outer backward's later gates ran
            # at the session's T, not its call's.
            outer = self.settings if self._backwards == 0 else self._live.replaced()
            self._live.assign(call)
            self._backwards += 1
            try:
                with _autograd_on(), autocast_as(self._inputs.device.type, self._autocast), \
                        explained_errors(changed_in_place_error, checkpointing_error):
                    grads = self._grads(state, seeds, batched, retain_graph)
            finally:
                self._backwards -= 1
                self._live.assign(outer)
        if grads is None:
            if state.gated_kinds.get("attention") and call.attention_weights == "detached":
                raise PullbackWidgetsError(_NO_PATH_THROUGH_DETACHED_ATTENTION)
            raise PullbackWidgetsError(_NO_GRADIENT_PATH.format(what="output"))
        return grads

    @staticmethod
    def _grads(state: _Forward, seeds: list[tuple[Tensor, Tensor]],
               batched: bool, retain_graph: bool) -> Tensor | None:
        if not batched:
            grads = [torch.autograd.grad(output, state.input, seed, retain_graph=retain_graph,
                                         allow_unused=True)[0] for output, seed in seeds]
            return None if any(g is None for g in grads) else torch.stack(grads)
        outputs: list[Tensor] = []
        for output, _ in seeds:
            if not any(output is o for o in outputs):
                outputs.append(output)
        stacked = [torch.stack([seed if out is output else torch.zeros_like(output)
                                for out, seed in seeds]) for output in outputs]
        (grads,) = torch.autograd.grad(outputs, state.input, stacked, retain_graph=retain_graph,
                                       is_grads_batched=True, allow_unused=True)
        return grads

    def pullback(self, target: Target, *, temperature: Temperature = None,
                 gate: str | None = None, pool_temperature: float | None = None,
                 temperature_mode: str | None = None, attention_weights: str | None = None,
                 pool_weights: str | None = None) -> Tensor:
        """The excitation pullback of ``target``: (B, C, H, W), like ``inputs``.

        Settings given here apply to this call only; those left as None are the session's.
        """
        call = self._call_settings(temperature=temperature, gate=gate,
                                   pool_temperature=pool_temperature,
                                   temperature_mode=temperature_mode,
                                   attention_weights=attention_weights, pool_weights=pool_weights)
        return self._backward([target], call, batched=False)[0]

    def pullbacks(self, targets: Sequence[Target], *, temperature: Temperature = None,
                  gate: str | None = None, pool_temperature: float | None = None,
                  temperature_mode: str | None = None, attention_weights: str | None = None,
                  pool_weights: str | None = None, batched: bool | None = None) -> Tensor:
        """Pullbacks of k targets: (k, B, C, H, W). Settings as in :meth:`pullback`.

        ``batched=True`` runs one vmapped backward for all k; ``False`` a loop of k backward
        passes. The default batches on accelerators, where that is the win, and loops on the
        CPU, where the backward is compute-bound and vmap's batching rules cost more than they
        save (benchmarks/speed.py measures both), and for models with module backward hooks,
        which a batched backward would call once, on batched tensors, instead of k times.
        """
        # bytes are a sequence of ints: b"cat" was three pullbacks, of classes 99, 97, 116.
        if isinstance(targets, (str, bytes, bytearray, memoryview, Unit, Tensor)) \
                or not isinstance(targets, Sequence) or len(targets) == 0:
            raise PullbackWidgetsTypeError("targets must be a non-empty list of targets")
        call = self._call_settings(temperature=temperature, gate=gate,
                                   pool_temperature=pool_temperature,
                                   temperature_mode=temperature_mode,
                                   attention_weights=attention_weights, pool_weights=pool_weights)
        if not (batched is None or isinstance(batched, (bool, np.bool_))):
            # bool("no") is True: a string or a number here was read as a choice it was not.
            raise PullbackWidgetsTypeError(
                f"batched must be True, False or None, got {type(batched).__name__}")
        if batched is None:
            # A backward hook of the model's would run once, on vmap's batched tensors.
            batched = self._inputs.device.type != "cpu" and not _has_backward_hooks(self.model)
        return self._backward(list(targets), call, batched=bool(batched))


def excitation_pullback(model: nn.Module, inputs: Tensor, target: Target, *,
                        temperature: Temperature = None, gate: str = "sigmoid",
                        pool_temperature: float | None = None,
                        temperature_mode: str = "absolute",
                        attention_weights: str = "detached",
                        pool_weights: str = "differentiated") -> Tensor:
    """The excitation pullback of ``target`` at ``inputs`` (B, C, H, W): same shape as inputs.

    The forward is the model's own, bit for bit; every gated op's backward is soft (ReLU
    family and max-pool: :mod:`.gates`; SiLU, GELU, Hardswish, leaky: :mod:`.activation_gates`;
    LayerNorm, GroupNorm: :mod:`.norm_gates`; attention: :mod:`.attention_gates`).
    ``temperature=None`` is the model's own default per kind of op.
    """
    layers = (target.layer,) if isinstance(target, Unit) else ()
    session = _OneShotSession(model, inputs, temperature=temperature, gate=gate,
                              pool_temperature=pool_temperature,
                              temperature_mode=temperature_mode,
                              attention_weights=attention_weights, pool_weights=pool_weights,
                              layers=layers)
    # One backward of a session nobody else sees: let it free the graph as it goes.
    return session._backward([target], session.settings, batched=False, retain_graph=False)[0]


class _OneShotSession(PullbackSession):
    """A session for one backward, right after its forward, in the same call: no code of the
    caller's runs in between but the model's own ``train()`` as its flags are set back, which
    :func:`.evaluation_mode` checks, so the model is not recorded (0.8 ms on Lite0). Another
    thread changing the model could as well do so during the forward or the backward, where no
    record sees it; the graph's saved tensors still refuse in-place changes to what they hold."""

    _records_model = False


def _one_class_for_all(target: object) -> object:
    """Captum's forms of one class for every example, as the class itself: a tensor of one
    element, or a 1-tuple (an index into the logits' last dim). Captum's wrappers (NoiseTunnel,
    sensitivity_max) expand the batch but leave these as they are."""
    if isinstance(target, Tensor) and target.dim() > 0 and target.numel() == 1:
        return target.reshape(())
    if isinstance(target, tuple) and len(target) == 1:
        return target[0]
    return target


class ExcitationPullback:
    """Captum-style attribution: ``ExcitationPullback(model).attribute(inputs, target=...)``.

    ``target=None`` pulls back each example's predicted class. ``temperature=None`` is the
    model's own default per kind of op.
    """

    multiplies_by_inputs = False
    settings = _OwnSettings()

    def __init__(self, model: nn.Module, temperature: Temperature = None,
                 gate: str = "sigmoid", pool_temperature: float | None = None,
                 temperature_mode: str = "absolute", attention_weights: str = "detached",
                 pool_weights: str = "differentiated") -> None:
        self.forward_func = check_model(model)
        self._settings = GateSettings(temperature, gate, pool_temperature, temperature_mode,
                                      attention_weights, pool_weights,
                                      defaults=default_temperatures(self.forward_func))

    def attribute(self, inputs: Tensor | tuple[Tensor], target: Target | None = None,
                  additional_forward_args: object = None, **unsupported: object
                  ) -> Tensor | tuple[Tensor]:
        """The pullback of ``target`` at ``inputs``, in the form given.

        ``inputs``: a tensor (B, C, H, W) or, as Captum passes it, a 1-tuple of one; the
        result has the same form. ``target``: as for :meth:`PullbackSession.pullback`, or None
        for each example's predicted class; Captum's one-class forms (a one-element tensor, a
        1-tuple) are that class for every example. ``additional_forward_args``: one object or
        a tuple of them, passed to the model after the input.
        """
        if unsupported:
            raise PullbackWidgetsTypeError(
                f"ExcitationPullback.attribute takes no {', '.join(map(repr, unsupported))}: "
                "it needs no baselines, steps or samples; it takes inputs, target and "
                "additional_forward_args")
        as_tuple = isinstance(inputs, tuple)
        if as_tuple:
            if len(inputs) != 1:
                raise PullbackWidgetsError(
                    f"ExcitationPullback takes one input tensor, got a tuple of {len(inputs)}")
            (inputs,) = inputs
        if additional_forward_args is None:
            forward_args = ()
        elif isinstance(additional_forward_args, tuple):
            forward_args = additional_forward_args
        else:
            forward_args = (additional_forward_args,)
        target = _one_class_for_all(target)
        # One copy, taken under the settings' lock: read field by field, an update from
        # another thread in between mixed old and new settings.
        s = self.settings.replaced()
        session = PullbackSession(
            self.forward_func, inputs, temperature=s.temperature, gate=s.gate,
            pool_temperature=s.pool_temperature, temperature_mode=s.temperature_mode,
            attention_weights=s.attention_weights, pool_weights=s.pool_weights,
            forward_args=forward_args,
            layers=(target.layer,) if isinstance(target, Unit) else ())
        session.settings.update(defaults=s.defaults)  # the explainer's, where they were changed
        if target is None:
            target = session.logits.detach().argmax(dim=1)
        attribution = session.pullback(target)
        return (attribution,) if as_tuple else attribution

    # Captum's wrappers (NoiseTunnel) call ``attribute.__wrapped__``, which Captum's own
    # methods get from their logging decorator: here a copy of the function itself.
    attribute.__wrapped__ = types.FunctionType(
        attribute.__code__, attribute.__globals__, attribute.__name__, attribute.__defaults__,
        attribute.__closure__)

    def has_convergence_delta(self) -> bool:
        return False
