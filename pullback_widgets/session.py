"""The session: one forward, many pullbacks; and the one-shot and Captum-style entry points."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .gates import GateSettings
from .interception import _gating
from .model_helpers import LayerRecorder, default_temperatures, evaluation_mode
from .targets import Target, Unit, class_indices, is_class_target, unit_seed
from .validation import check_inputs, check_model

# One number for every kind of gated op, a mapping kind -> T, or None: the model's defaults.
Temperature = float | Mapping[str, float] | None


class PullbackSession:
    """One forward pass, then as many pullbacks of it as you like.

    The forward runs once (in eval mode, the model's flags restored after), with its graph
    retained. :meth:`pullback` and :meth:`pullbacks` re-run only the backward; the temperature and
    gate are read when that backward runs.

    ``inputs``: (B, C, H, W) float, in whatever space the model takes (pixel space [0, 1] for
    :func:`load_model` models). ``layers``: names of layers whose outputs ``Unit`` targets may use;
    a Unit on another layer costs one more forward, which then records it too.
    """

    def __init__(self, model: nn.Module, inputs: Tensor, *, temperature: Temperature = None,
                 gate: str = "sigmoid", pool_temperature: float | None = None,
                 temperature_mode: str = "absolute", attention_weights: str = "detached",
                 layers: Iterable[str] = ()) -> None:
        check_model(model)
        self.model = model
        self.inputs = check_inputs(model, inputs).detach()
        self.settings = GateSettings(temperature, gate, pool_temperature, temperature_mode,
                                     attention_weights, defaults=default_temperatures(model))
        self._forward(tuple(dict.fromkeys(layers)))

    def _forward(self, layers: tuple[str, ...]) -> None:
        self.layers = layers
        self._input = self.inputs.clone().requires_grad_(True)
        recorder = LayerRecorder(self.model, layers)
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
            warnings.warn("the model has no ReLU-family or max-pool op, nor any other gated op "
                          "(SiLU, GELU, Hardswish, leaky ReLU, LayerNorm, GroupNorm, attention) "
                          "on the input's path: the pullback equals the plain gradient",
                          stacklevel=3)
        self.gated_calls = mode.gated_calls
        self.gated_kinds = dict(mode.gated_kinds)
        self.logits = logits
        self.activations = recorder.outputs

    @property
    def probabilities(self) -> Tensor:
        """Softmax of the logits, (B, num_classes), detached."""
        return self.logits.detach().softmax(dim=1)

    def _configure(self, temperature, gate, pool_temperature, temperature_mode,
                   attention_weights=None) -> None:
        current = self.settings
        current.update(
            current.temperature if temperature is None else temperature,
            current.gate if gate is None else gate,
            current.pool_temperature if pool_temperature is None else pool_temperature,
            current.temperature_mode if temperature_mode is None else temperature_mode,
            current.attention_weights if attention_weights is None else attention_weights)

    def _record_layers_of(self, targets: Iterable[Target]) -> None:
        """Re-run the forward once if a Unit target names a layer this session did not record."""
        missing = tuple(dict.fromkeys(t.layer for t in targets if isinstance(t, Unit)
                                      and t.layer not in self.activations))
        if missing:
            self._forward(self.layers + missing)

    def _seed(self, target: Target) -> tuple[Tensor, Tensor]:
        """(output tensor, gradient seed on it) that selects ``target``."""
        if is_class_target(target):
            batch, num_classes = self.logits.shape
            classes = class_indices(target, batch, num_classes, self.logits.device)
            seed = torch.zeros_like(self.logits)
            seed[torch.arange(batch, device=seed.device), classes] = 1.0
            return self.logits, seed
        activation = self.activations[target.layer]
        return activation, unit_seed(target, activation)

    def pullback(self, target: Target, *, temperature: Temperature = None,
                 gate: str | None = None, pool_temperature: float | None = None,
                 temperature_mode: str | None = None, attention_weights: str | None = None
                 ) -> Tensor:
        """The excitation pullback of ``target``: (B, C, H, W), like ``inputs``.

        Settings left as None keep the session's current ones.
        """
        self._configure(temperature, gate, pool_temperature, temperature_mode,
                        attention_weights)
        self._record_layers_of([target])
        output, seed = self._seed(target)
        (grad,) = torch.autograd.grad(output, self._input, seed, retain_graph=True)
        return grad

    def pullbacks(self, targets: Sequence[Target], *, temperature: Temperature = None,
                  gate: str | None = None, pool_temperature: float | None = None,
                  temperature_mode: str | None = None, attention_weights: str | None = None,
                  batched: bool | None = None) -> Tensor:
        """Pullbacks of k targets: (k, B, C, H, W).

        ``batched=True`` runs one vmapped backward for all k; ``False`` a loop of k backward
        passes. The default batches on accelerators, where that is the win, and loops on the
        CPU, where the backward is compute-bound and vmap's batching rules cost more than they
        save (benchmarks/speed.py measures both).
        """
        if isinstance(targets, (str, Unit, Tensor)) or not isinstance(targets, Sequence) \
                or len(targets) == 0:
            raise TypeError("targets must be a non-empty list of targets")
        self._configure(temperature, gate, pool_temperature, temperature_mode,
                        attention_weights)
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
                        temperature: Temperature = None, gate: str = "sigmoid",
                        pool_temperature: float | None = None,
                        temperature_mode: str = "absolute",
                        attention_weights: str = "detached") -> Tensor:
    """The excitation pullback of ``target`` at ``inputs`` (B, C, H, W): same shape as inputs.

    The forward is the model's own, bit for bit; every gated op's backward is soft (ReLU
    family and max-pool: :mod:`.gates`; SiLU, GELU, Hardswish, leaky: :mod:`.activation_gates`;
    LayerNorm, GroupNorm: :mod:`.norm_gates`; attention: :mod:`.attention_gates`).
    """
    layers = (target.layer,) if isinstance(target, Unit) else ()
    session = PullbackSession(model, inputs, temperature=temperature, gate=gate,
                              pool_temperature=pool_temperature,
                              temperature_mode=temperature_mode,
                              attention_weights=attention_weights, layers=layers)
    return session.pullback(target)


class ExcitationPullback:
    """Captum-style attribution: ``ExcitationPullback(model).attribute(inputs, target=...)``.

    ``target=None`` pulls back each example's predicted class.
    """

    multiplies_by_inputs = False

    def __init__(self, model: nn.Module, temperature: Temperature = None,
                 gate: str = "sigmoid", pool_temperature: float | None = None,
                 temperature_mode: str = "absolute", attention_weights: str = "detached"
                 ) -> None:
        check_model(model)
        self.forward_func = model
        self.settings = GateSettings(temperature, gate, pool_temperature, temperature_mode,
                                     attention_weights, defaults=default_temperatures(model))

    def attribute(self, inputs: Tensor, target: Target | None = None) -> Tensor:
        layers = (target.layer,) if isinstance(target, Unit) else ()
        settings = self.settings
        session = PullbackSession(
            self.forward_func, inputs, temperature=settings.temperature, gate=settings.gate,
            pool_temperature=settings.pool_temperature,
            temperature_mode=settings.temperature_mode,
            attention_weights=settings.attention_weights, layers=layers)
        if target is None:
            target = session.logits.detach().argmax(dim=1)
        return session.pullback(target)

    def has_convergence_delta(self) -> bool:
        return False
