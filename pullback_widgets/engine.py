"""The excitation pullback: soft_gating(), PullbackSession, excitation_pullback, ExcitationPullback.

Every ReLU-family and 2-D max-pool call made while :func:`soft_gating` is active, whether through
a module (``nn.ReLU``, reused or inplace) or a functional call inside ``forward()`` (``F.relu``,
``torch.relu_``, ``Tensor.relu``, ...), is intercepted by a ``TorchFunctionMode`` and routed
through the soft-gated ops of :mod:`pullback_widgets.gates`. The model itself is never touched:
no hooks, no swapped modules. The mode is thread-local and gates every such call made in this
thread inside the context, the model's and any other.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from .gates import GateSettings, PoolGeometry, SoftClamp, SoftMaxPool2d

DEFAULT_TEMPERATURE = 0.3
# The temperature strip's walk from gradient-like (0.01) to nearly linear in path space (10).
STRIP_TEMPERATURES = (0.01, 0.0316, 0.1, 0.316, 1.0, 3.16, 10.0)


@dataclass(frozen=True)
class Unit:
    """A hidden-unit target: ``layer``'s output ``channel`` at pixel (``y``, ``x``) of its
    feature map, or its spatial mean when ``y`` and ``x`` are None.

    ``layer`` is a ``model.named_modules()`` name; for a 2-D (B, C) output, ``y``/``x`` stay None.
    """

    layer: str
    channel: int
    y: int | None = None
    x: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.layer, str):
            raise TypeError(f"Unit layer must be a module name (str), got {self.layer!r}")
        for name in ("channel", "y", "x"):
            value = getattr(self, name)
            if value is None and name != "channel":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Unit {name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"Unit {name} must be >= 0, got {value}")
        if (self.y is None) != (self.x is None):
            raise ValueError("Unit y and x must both be given or both be None")


Target = int | Sequence[int] | Tensor | Unit


# --------------------------------------------------------------------------- interception

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

_POOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d)


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


class _SoftGatingMode(TorchFunctionMode):
    """Routes ReLU-family and max-pool calls to the soft-gated autograd ops."""

    def __init__(self, settings: GateSettings) -> None:
        super().__init__()
        self.settings = settings
        self.gated_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        parse = _CLAMP_PARSERS.get(func)
        is_pool = parse is None and func in _POOL_FUNCTIONS
        if (parse is None and not is_pool) or not torch.is_grad_enabled() \
                or not isinstance(args[0], Tensor) or not args[0].requires_grad:
            return func(*args, **kwargs)

        def hard_op(tensor: Tensor) -> Tensor:
            return func(tensor, *args[1:], **kwargs)

        if is_pool:
            geometry = _pool_geometry(args, kwargs)
            if geometry is None:
                return func(*args, **kwargs)
            self.gated_calls += 1
            return SoftMaxPool2d.apply(args[0], hard_op, geometry, self.settings)
        z, inplace, low, high = parse(args, kwargs)
        self.gated_calls += 1
        return SoftClamp.apply(z, hard_op, low, high, bool(inplace), self.settings)


def _active_gating_mode() -> _SoftGatingMode | None:
    return next((m for m in _get_current_function_mode_stack()
                 if isinstance(m, _SoftGatingMode)), None)


@contextlib.contextmanager
def _gating(settings: GateSettings) -> Iterator[_SoftGatingMode]:
    if _active_gating_mode() is not None:
        raise RuntimeError(
            "soft_gating is already active in this thread; nesting it would gate every ReLU "
            "twice. Leave the outer context first (excitation_pullback and PullbackSession "
            "open their own).")
    mode = _SoftGatingMode(settings)
    with mode:
        yield mode


@contextlib.contextmanager
def soft_gating(model: nn.Module, temperature: float = DEFAULT_TEMPERATURE,
                gate: str = "sigmoid", pool_temperature: float | None = None,
                temperature_mode: str = "absolute") -> Iterator[GateSettings]:
    """Inside this context, any backward through ReLUs and max-pools is an excitation pullback.

    The forward is unchanged bit for bit, and ``model`` is not modified in any way. Yields the
    live :class:`GateSettings`; the soft backward reads them when it runs, so changing them
    between backward passes of one graph changes the temperature.
    """
    _check_model(model)
    settings = GateSettings(temperature, gate, pool_temperature, temperature_mode)
    with _gating(settings):
        yield settings


# --------------------------------------------------------------------------- model helpers

def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def default_temperature(model: nn.Module) -> float:
    """The model's own default T (set by :func:`pullback_widgets.load_model`), else 0.3."""
    return float(getattr(model, "default_temperature", DEFAULT_TEMPERATURE))


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards.

    Train-mode BatchNorm would both mix the examples of a batch and update running statistics,
    which would change the user's model.
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def predict(model: nn.Module, inputs: Tensor) -> Tensor:
    """Plain logits (B, num_classes) for ``inputs``, in eval mode, without gradients."""
    with evaluation_mode(model), torch.no_grad():
        return model(inputs)


def _expected_channels(model: nn.Module) -> int | None:
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first_conv is None else first_conv.in_channels


def check_inputs(model: nn.Module, inputs: object) -> Tensor:
    """Validate an image batch (B, C, H, W), floating point, finite, on the model's device."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor of shape (B, C, H, W), "
                        f"got {type(inputs).__name__}")
    if inputs.dim() != 4:
        raise ValueError(f"inputs must have shape (B, C, H, W), got {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor (pixel values in [0, 1]), "
                        f"got {inputs.dtype}")
    channels = _expected_channels(model)
    if channels is not None and inputs.shape[1] != channels:
        raise ValueError(f"inputs must have {channels} channels for this model, "
                         f"got shape {tuple(inputs.shape)}")
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device != inputs.device:
        raise ValueError(f"inputs are on {inputs.device} but the model is on "
                         f"{parameter.device}; move one of them")
    if parameter is not None and parameter.dtype != inputs.dtype:
        raise TypeError(f"inputs are {inputs.dtype} but the model's parameters are "
                        f"{parameter.dtype}; convert one of them")
    if not torch.isfinite(inputs).all():
        raise ValueError("inputs contain NaN or infinite values")
    return inputs


# --------------------------------------------------------------------------- targets

def _is_class_target(target: object) -> bool:
    return not isinstance(target, Unit)


def class_indices(target: object, batch: int, num_classes: int, device) -> Tensor:
    """One class index per example, as a LongTensor (B,)."""
    if isinstance(target, bool):
        raise TypeError("target must be a class index, a sequence of them, or a pw.Unit; "
                        "got a bool")
    if isinstance(target, int):
        indices = torch.full((batch,), target, dtype=torch.long)
    elif isinstance(target, Tensor):
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"target tensor must hold integer class indices, got {target.dtype}")
        indices = target.reshape(-1).to(torch.long).cpu()
        if target.dim() == 0:
            indices = indices.expand(batch)
    elif isinstance(target, Sequence) and not isinstance(target, str):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in target):
            raise TypeError("target sequence must hold int class indices")
        indices = torch.tensor(list(target), dtype=torch.long)
    else:
        raise TypeError("target must be an int class index, a sequence / LongTensor with one "
                        f"class per example, or a pw.Unit; got {type(target).__name__}")
    if indices.numel() != batch:
        raise ValueError(f"target has {indices.numel()} classes for a batch of {batch}")
    bad = (indices < 0) | (indices >= num_classes)
    if bad.any():
        raise ValueError(f"target class {int(indices[bad][0])} is out of range "
                         f"[0, {num_classes})")
    return indices.to(device)


def _unit_seed(unit: Unit, activation: Tensor) -> Tensor:
    """The gradient seed on ``activation`` (B, C[, H, W]) that selects ``unit``."""
    if activation.dim() < 2:
        raise ValueError(f"layer {unit.layer!r} output has shape {tuple(activation.shape)}; "
                         "a Unit needs (B, C) or (B, C, H, W)")
    channels = activation.shape[1]
    if unit.channel >= channels:
        raise ValueError(f"channel {unit.channel} is out of range for layer {unit.layer!r} "
                         f"with {channels} channels")
    seed = torch.zeros_like(activation)
    spatial = activation.shape[2:]
    if unit.y is None:
        seed[:, unit.channel] = 1.0 / max(1, spatial.numel())
        return seed
    if len(spatial) != 2:
        raise ValueError(f"layer {unit.layer!r} has no (H, W) map; leave y and x as None")
    if unit.y >= spatial[0] or unit.x >= spatial[1]:
        raise ValueError(f"(y, x) = ({unit.y}, {unit.x}) is outside layer {unit.layer!r}'s "
                         f"{spatial[0]}x{spatial[1]} map")
    seed[:, unit.channel, unit.y, unit.x] = 1.0
    return seed


# --------------------------------------------------------------------------- the session

class _LayerRecorder:
    """Forward hooks that keep a copy of chosen layers' outputs; removed by ``close()``."""

    def __init__(self, model: nn.Module, layers: Iterable[str]) -> None:
        modules = dict(model.named_modules())
        self.outputs: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {}
        self._handles = []
        try:
            for name in layers:
                if name not in modules:
                    raise ValueError(f"unknown layer {name!r}; {_suggest(name, modules)}")
                self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        except BaseException:
            self.close()
            raise

    def _hook(self, name: str):
        def record(module, args, output):
            self.calls[name] = self.calls.get(name, 0) + 1
            if isinstance(output, Tensor):
                # A copy, because the parent may overwrite this output in place (ReLU(inplace)).
                self.outputs[name] = output.clone()
        return record

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def feature_layers(model: nn.Module, inputs: Tensor) -> dict[str, tuple[int, ...]]:
    """Layers worth pulling back from, with their output shapes (C, H, W) for ``inputs``.

    Top-level modules and containers (blocks, stages) that run exactly once and return a
    (B, C, H, W) tensor, in ``named_modules()`` order. Runs one plain forward, no gradients.
    """
    _check_model(model)
    check_inputs(model, inputs)
    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}

    def hook(name):
        def record(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, Tensor) and output.dim() == 4:
                shapes[name] = tuple(output.shape[1:])
        return record

    handles = [module.register_forward_hook(hook(name))
               for name, module in model.named_modules()
               if name and ("." not in name or next(module.children(), None) is not None)]
    try:
        with evaluation_mode(model), torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: shapes[name] for name, _ in model.named_modules()
            if name in shapes and calls[name] == 1}


def _suggest(name: str, choices: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, [c for c in choices if c], n=3)
    return f"did you mean {', '.join(map(repr, close))}?" if close else \
        "see model.named_modules() for the names"


class PullbackSession:
    """One forward pass, then as many pullbacks of it as you like.

    The forward runs once (in eval mode, the model's flags restored after), with its graph
    retained. :meth:`pullback` and :meth:`pullbacks` re-run only the backward; the temperature and
    gate are read when that backward runs.

    ``inputs``: (B, C, H, W) float, in whatever space the model takes (pixel space [0, 1] for
    :func:`load_model` models). ``layers``: names of layers whose outputs ``Unit`` targets may use;
    a Unit on another layer costs one more forward, which then records it too.
    """

    def __init__(self, model: nn.Module, inputs: Tensor, *, temperature: float | None = None,
                 gate: str = "sigmoid", pool_temperature: float | None = None,
                 temperature_mode: str = "absolute", layers: Iterable[str] = ()) -> None:
        _check_model(model)
        self.model = model
        self.inputs = check_inputs(model, inputs).detach()
        self.settings = GateSettings(
            default_temperature(model) if temperature is None else temperature,
            gate, pool_temperature, temperature_mode)
        self._forward(tuple(dict.fromkeys(layers)))

    def _forward(self, layers: tuple[str, ...]) -> None:
        self.layers = layers
        self._input = self.inputs.clone().requires_grad_(True)
        recorder = _LayerRecorder(self.model, layers)
        try:
            with evaluation_mode(self.model), _gating(self.settings) as mode, \
                    torch.enable_grad():
                logits = self.model(self._input)
        finally:
            recorder.close()
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise ValueError("the model must return logits of shape (B, num_classes), got "
                             f"{getattr(logits, 'shape', type(logits).__name__)}")
        for name in layers:
            if recorder.calls.get(name, 0) == 0 or name not in recorder.outputs:
                raise ValueError(f"layer {name!r} produced no tensor output in the forward pass")
            if recorder.calls[name] > 1:
                raise ValueError(f"layer {name!r} ran {recorder.calls[name]} times in one "
                                 "forward pass, so its output is ambiguous; pick a layer "
                                 "that runs once")
        if mode.gated_calls == 0:
            warnings.warn("the model has no ReLU-family or max-pool op on the input's path: "
                          "the pullback equals the plain gradient", stacklevel=3)
        self.gated_calls = mode.gated_calls
        self.logits = logits
        self.activations = recorder.outputs

    @property
    def probabilities(self) -> Tensor:
        """Softmax of the logits, (B, num_classes), detached."""
        return self.logits.detach().softmax(dim=1)

    def _configure(self, temperature, gate, pool_temperature, temperature_mode) -> None:
        current = self.settings
        current.update(
            current.temperature if temperature is None else temperature,
            current.gate if gate is None else gate,
            current.pool_temperature if pool_temperature is None else pool_temperature,
            current.temperature_mode if temperature_mode is None else temperature_mode)

    def _record_layers_of(self, targets: Iterable[Target]) -> None:
        """Re-run the forward once if a Unit target names a layer this session did not record."""
        missing = tuple(dict.fromkeys(t.layer for t in targets if isinstance(t, Unit)
                                      and t.layer not in self.activations))
        if missing:
            self._forward(self.layers + missing)

    def _seed(self, target: Target) -> tuple[Tensor, Tensor]:
        """(output tensor, gradient seed on it) that selects ``target``."""
        if _is_class_target(target):
            batch, num_classes = self.logits.shape
            classes = class_indices(target, batch, num_classes, self.logits.device)
            seed = torch.zeros_like(self.logits)
            seed[torch.arange(batch, device=seed.device), classes] = 1.0
            return self.logits, seed
        activation = self.activations[target.layer]
        return activation, _unit_seed(target, activation)

    def pullback(self, target: Target, *, temperature: float | None = None,
                 gate: str | None = None, pool_temperature: float | None = None,
                 temperature_mode: str | None = None) -> Tensor:
        """The excitation pullback of ``target``: (B, C, H, W), like ``inputs``.

        Settings left as None keep the session's current ones.
        """
        self._configure(temperature, gate, pool_temperature, temperature_mode)
        self._record_layers_of([target])
        output, seed = self._seed(target)
        (grad,) = torch.autograd.grad(output, self._input, seed, retain_graph=True)
        return grad

    def pullbacks(self, targets: Sequence[Target], *, temperature: float | None = None,
                  gate: str | None = None, pool_temperature: float | None = None,
                  temperature_mode: str | None = None, batched: bool | None = None
                  ) -> Tensor:
        """Pullbacks of k targets: (k, B, C, H, W).

        ``batched=True`` runs one vmapped backward for all k; ``False`` a loop of k backward
        passes. The default batches on accelerators, where that is the win, and loops on the
        CPU, where the backward is compute-bound and vmap's batching rules cost more than they
        save (benchmarks/speed.py measures both).
        """
        if isinstance(targets, (str, Unit, Tensor)) or not isinstance(targets, Sequence) \
                or len(targets) == 0:
            raise TypeError("targets must be a non-empty list of targets")
        self._configure(temperature, gate, pool_temperature, temperature_mode)
        self._record_layers_of(targets)
        seeds = [self._seed(t) for t in targets]
        if batched is None:
            batched = self._input.device.type != "cpu"
        if not batched:
            return torch.stack([torch.autograd.grad(output, self._input, seed,
                                                    retain_graph=True)[0]
                                for output, seed in seeds])
        outputs: list[Tensor] = []
        for output, _ in seeds:
            if not any(output is o for o in outputs):
                outputs.append(output)
        stacked = []
        for output in outputs:
            stacked.append(torch.stack([
                seed if out is output else torch.zeros_like(output) for out, seed in seeds]))
        grads = torch.autograd.grad(outputs, self._input, stacked, retain_graph=True,
                                    is_grads_batched=True)
        return grads[0]


def excitation_pullback(model: nn.Module, inputs: Tensor, target: Target, *,
                        temperature: float = DEFAULT_TEMPERATURE, gate: str = "sigmoid",
                        pool_temperature: float | None = None,
                        temperature_mode: str = "absolute") -> Tensor:
    """The excitation pullback of ``target`` at ``inputs`` (B, C, H, W): same shape as inputs.

    The forward is the model's own, bit for bit; every ReLU's backward gate becomes g(z) and
    every max-pool's backward the soft pool's (see :mod:`pullback_widgets.gates`).
    """
    layers = (target.layer,) if isinstance(target, Unit) else ()
    session = PullbackSession(model, inputs, temperature=temperature, gate=gate,
                              pool_temperature=pool_temperature,
                              temperature_mode=temperature_mode, layers=layers)
    return session.pullback(target)


class ExcitationPullback:
    """Captum-style attribution: ``ExcitationPullback(model).attribute(inputs, target=...)``.

    ``target=None`` pulls back each example's predicted class.
    """

    multiplies_by_inputs = False

    def __init__(self, model: nn.Module, temperature: float | None = None,
                 gate: str = "sigmoid", pool_temperature: float | None = None,
                 temperature_mode: str = "absolute") -> None:
        _check_model(model)
        self.forward_func = model
        self.settings = GateSettings(
            default_temperature(model) if temperature is None else temperature,
            gate, pool_temperature, temperature_mode)

    def attribute(self, inputs: Tensor, target: Target | None = None) -> Tensor:
        layers = (target.layer,) if isinstance(target, Unit) else ()
        session = PullbackSession(
            self.forward_func, inputs, temperature=self.settings.temperature,
            gate=self.settings.gate, pool_temperature=self.settings.pool_temperature,
            temperature_mode=self.settings.temperature_mode, layers=layers)
        if target is None:
            target = session.logits.detach().argmax(dim=1)
        return session.pullback(target)

    def has_convergence_delta(self) -> bool:
        return False
