"""Attribution methods under stable names, and the Quantus adapter.

An :data:`Explainer` is ``explain(model, x, target) -> (B, 3, H, W)``: ``x`` images in pixel
space [0, 1] (B, 3, H, W), ``target`` a LongTensor (B,) of class indices.

Stable method names (:data:`METHODS`), used by ``pullback-widgets evaluate --methods`` and by
:func:`build_method`; they will not change:

- ``pullback``: the excitation pullback, by default with the model's own settings (its
  default temperature, the sigmoid gate); :func:`build_method` takes other settings.
- ``gradient``: the plain input gradient of the target logit.
- ``gradient_x_input``: gradient times the image (pixel space).
- ``random``: the control, standard normal noise seeded by the image's content.
- Captum's (the ``compare`` extra): ``guided_backprop`` (run on a copy whose ReLU6 modules
  Captum can hook; refused for a model with another rectifier module, LeakyReLU, SiLU, GELU,
  Hardswish ..., or with no ReLU module, where its map would be the gradient there or
  everywhere), ``guided_backprop_captum`` (Captum as is: on a ReLU6 network such as
  Lite0 it equals the gradient), ``integrated_gradients`` (black baseline),
  ``smoothgrad`` (signed) and ``guided_gradcam`` (bilinear upsampling, last Conv2d; refused
  where ``guided_backprop`` is).

:func:`method_registry` adds a grid of pullbacks named by :func:`pullback_name`
(``"pullback sigmoid T=0.3"``) to the others; :func:`quantus_explain_func` adapts the pullback
to Quantus.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gates import (
    ATTENTION_WEIGHTS,
    GATES,
    POOL_WEIGHTS,
    TEMPERATURE_MODES,
    check_temperature,
)
from ..model_helpers import evaluation_mode
from ..session import Temperature, excitation_pullback
from ..targets import Unit, class_indices
from ..validation import (
    PullbackWidgetsError,
    PullbackWidgetsTypeError,
    check_choice,
    check_index,
    check_inputs,
    check_logits,
    check_positive,
)
from .metrics import Explainer

__all__ = [
    "CAPTUM_METHODS",
    "METHODS",
    "build_method",
    "captum_available",
    "check_methods",
    "gradient",
    "gradient_times_input",
    "method_registry",
    "method_settings",
    "pullback_method",
    "pullback_name",
    "quantus_explain_func",
    "random_attribution",
]

METHODS = {
    "pullback": "excitation pullback (the model's default settings unless set)",
    "gradient": "plain input gradient of the target logit",
    "gradient_x_input": "gradient times the image",
    "random": "control: standard normal noise, seeded by the image",
    "guided_backprop": "Captum's guided backprop on a ReLU6-hookable copy (ReLU models)",
    "guided_backprop_captum": "Captum's guided backprop as is",
    "integrated_gradients": "Captum's integrated gradients, black baseline",
    "smoothgrad": "Captum's SmoothGrad, signed",
    "guided_gradcam": "Captum's guided Grad-CAM, last Conv2d (or cam_layer)",
    "gradcam": "Captum's Grad-CAM (ReLU'd), last Conv2d (or cam_layer), upsampled bilinearly",
}
CAPTUM_METHODS = ("guided_backprop", "guided_backprop_captum", "integrated_gradients",
                  "smoothgrad", "guided_gradcam", "gradcam")
# build_method's defaults, which method_settings names.
IG_STEPS = 16
SMOOTHGRAD_SAMPLES = 8
SMOOTHGRAD_STD = 0.15


# --------------------------------------------------------------------------- methods

def explained_inputs(x: object, target: object) -> tuple[Tensor, Tensor]:
    """``x`` checked as an image batch (B, C, H, W), and ``target`` as its classes: a LongTensor
    (B,) on ``x``'s device, from one class for every image or one per image (as
    :func:`pullback_widgets.excitation_pullback` takes them). One class given for a batch of
    several was read as the first image's only (gather) or as every image's (Captum): refused,
    as the pullback refuses it. A negative class is refused (Captum read -1 as the last class);
    one past the model's classes is told by :func:`check_classes` once the logits are there."""
    x = check_inputs(x)
    if isinstance(target, Unit):
        raise PullbackWidgetsTypeError(
            "the evaluation's methods explain classes; a pw.Unit target is for the pullback "
            "(pw.excitation_pullback or a PullbackSession)")
    return x, class_indices(target, x.shape[0], None, x.device)  # the classes: not known yet


def check_classes(logits: object, target: Tensor, top: int | None = None) -> None:
    """A clear error if a class in ``target`` is past the logits' (B, C): gather would fail
    deep in torch (on a GPU, as a device-side assert that spoils the process)."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        return
    top = int(target.max()) if top is None else top
    if top >= logits.shape[1]:
        raise PullbackWidgetsError(f"target class {top} is out of range [0, {logits.shape[1]}) "
                                   "for this model")


@contextlib.contextmanager
def _classes_checked(model: nn.Module, target: Tensor):
    """Every forward of ``model`` meanwhile (Captum's) checks ``target`` against its logits."""
    top = int(target.max())
    handle = model.register_forward_hook(
        lambda module, args, output: check_classes(output, target, top))
    try:
        yield
    finally:
        handle.remove()


def gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Plain input gradient of the target logit, (B, 3, H, W)."""
    x, target = explained_inputs(x, target)
    with evaluation_mode(model), torch.enable_grad():
        inputs = x.detach().clone().requires_grad_(True)
        logits = check_logits(model(inputs), len(inputs))
        check_classes(logits, target)
        score = logits.gather(1, target.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, inputs)
    return grad


def gradient_times_input(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Gradient × input (pixel space, so a black pixel gets nothing), (B, 3, H, W)."""
    return gradient(model, x, target) * x


def _content_seed(image: Tensor) -> int:
    # The bytes as uint8: numpy has no bfloat16 (for the other dtypes, the same bytes as
    # numpy's tobytes, so the seeds are those of before).
    data = image.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little")


def random_attribution(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """A control that knows nothing: standard normal noise (B, 3, H, W).

    Each image's draw is seeded by a hash of its pixels, so an image gets the same noise
    whatever batch, shard or process it is in, and different images get different noise. A
    method that does not beat this control on a metric has shown nothing on that metric.
    """
    x, target = explained_inputs(x, target)  # the classes too: a wrong call is told here too
    noise = torch.empty(x.shape, dtype=torch.float64)
    for index, image in enumerate(x):
        generator = torch.Generator().manual_seed(_content_seed(image))
        noise[index] = torch.randn(x.shape[1:], generator=generator, dtype=torch.float64)
    return noise.to(x.device, x.dtype)


def pullback_method(temperature: Temperature = None, gate: str = "sigmoid",
                    temperature_mode: str = "absolute", *,
                    pool_temperature: float | None = None,
                    pool_weights: str | None = None,
                    attention_weights: str | None = None) -> Explainer:
    """The excitation pullback as an :data:`Explainer` (a picklable partial).

    ``temperature``: one T, a mapping kind -> T, or None for the model's defaults (as
    :func:`pullback_widgets.excitation_pullback`); ``pool_temperature=None``: the pool's T;
    ``pool_weights`` / ``attention_weights`` None: the engine's default rules.
    """
    settings = {"temperature": check_temperature(temperature),
                "gate": check_choice(gate, GATES, "gate"),
                "temperature_mode": check_choice(temperature_mode, TEMPERATURE_MODES,
                                                 "temperature_mode")}
    if pool_temperature is not None:
        settings["pool_temperature"] = check_positive(pool_temperature, "pool_temperature")
    if pool_weights is not None:
        settings["pool_weights"] = check_choice(pool_weights, POOL_WEIGHTS, "pool_weights")
    if attention_weights is not None:
        settings["attention_weights"] = check_choice(attention_weights, ATTENTION_WEIGHTS,
                                                     "attention_weights")
    return functools.partial(excitation_pullback, **settings)


def pullback_name(temperature: float, gate: str = "sigmoid", mode: str = "absolute") -> str:
    """The registry name of a pullback, e.g. ``"pullback sigmoid T=0.3 (relative)"``."""
    return f"pullback {gate} T={temperature:g}" + (" (relative)" if mode == "relative" else "")


class _HookableReLU6(nn.ReLU):
    """ReLU6 in value. Captum's guided backprop only overrides the backward of nn.ReLU modules
    (an isinstance test); ReLU6 is an nn.Hardtanh, so without this it is left as the gradient."""

    def forward(self, x: Tensor) -> Tensor:
        return F.hardtanh(x, 0.0, 6.0)


# Activations whose backward Captum's guided backprop leaves as their plain gradient (it guides
# nn.ReLU modules; ReLU6 through _HookableReLU6): a network with one of them is not guided
# backprop. Sigmoid, Tanh and the like are left out: gates, not rectifiers, in every method's
# textbook form.
_UNGUIDED_ACTIVATIONS = (nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU,
                         nn.SiLU, nn.Mish, nn.Hardswish, nn.Softplus, nn.Hardtanh, nn.Threshold)


def _check_guidable(model: nn.Module) -> None:
    """A clear error where guided backprop would not be guided backprop: a model with an
    activation module Captum does not guide, or with no nn.ReLU (ReLU6) module at all (its
    "guided" map was the plain gradient, under guided backprop's name)."""
    modules = list(model.named_modules())
    unguided = [(name, module) for name, module in modules
                if isinstance(module, _UNGUIDED_ACTIVATIONS) and type(module) is not nn.ReLU6]
    if unguided:
        name, module = unguided[0]
        raise PullbackWidgetsError(
            f"guided backprop guides nn.ReLU and nn.ReLU6 modules only; this model's "
            f"{type(module).__name__} ({name!r}) would pass its plain gradient, so the map would "
            "not be guided backprop")
    if not any(isinstance(module, nn.ReLU) or type(module) is nn.ReLU6 for _, module in modules):
        raise PullbackWidgetsError(
            "guided backprop guides nn.ReLU and nn.ReLU6 modules and this model has none: its "
            "map would be the plain gradient")


def _guidable(model: nn.Module) -> bool:
    try:
        _check_guidable(model)
    except PullbackWidgetsError:
        return False
    return True


def _guided_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every ReLU6 hookable by Captum, no ReLU in place (module backward
    hooks cannot see an in-place op's input), and each ReLU given its own copy of its input."""
    guided = copy.deepcopy(model)
    for parent in list(guided.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.ReLU6:
                setattr(parent, name, _HookableReLU6())
            elif isinstance(child, nn.ReLU):
                child.inplace = False
    for module in guided.modules():
        if isinstance(module, nn.ReLU):
            # Registered before Captum's: its hook, on the module's input, then sees the ReLU's
            # gradient alone, not the sum of every path through a pre-activation used elsewhere.
            module.register_forward_pre_hook(_own_input)
    return guided


def _own_input(module: nn.Module, args: tuple) -> tuple:
    return tuple(arg.clone() if isinstance(arg, Tensor) else arg for arg in args)


@contextlib.contextmanager
def _quiet_captum_hooks():
    # Captum warns on every call that it sets (and will remove) hooks on ReLU modules.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        yield


def _captum_guided_backprop(model, x, target, *, relu6: bool):
    from captum.attr import GuidedBackprop

    x, target = explained_inputs(x, target)
    if relu6:  # guided_backprop; guided_backprop_captum is Captum as is, whatever it guides
        _check_guidable(model)
    net = _guided_copy(model) if relu6 else model
    inputs = x.detach().clone().requires_grad_(True)
    with evaluation_mode(net), _quiet_captum_hooks(), _classes_checked(net, target):
        return GuidedBackprop(net).attribute(inputs, target=target).detach()


def _cam_output_error(layer: str) -> PullbackWidgetsError:
    return PullbackWidgetsError(
        f"Grad-CAM needs layer {layer!r} to output (B, C, H, W) in the forward; pass a "
        "convolutional layer as cam_layer")


@contextlib.contextmanager
def _cam_layer_runs(layer: str):
    """Captum's bare AssertionError where the layer never runs in the forward (GoogLeNet's
    last Conv2d is in an auxiliary head that runs in training only), as one line."""
    try:
        yield
    except AssertionError as error:
        if "did not obtain any outputs" not in str(error):
            raise
        raise PullbackWidgetsError(
            f"Grad-CAM layer {layer!r} does not run in the model's forward (an auxiliary head "
            "that runs in training only?); pass a layer that does as cam_layer") from None


def _captum_guided_gradcam(model, x, target, *, layer):
    from captum.attr import GuidedGradCam

    x, target = explained_inputs(x, target)
    _check_guidable(model)
    net = _guided_copy(model)
    modules = dict(net.named_modules())
    if layer not in modules:
        raise PullbackWidgetsError(f"Grad-CAM layer {layer!r} is not a module of the model")
    inputs = x.detach().clone().requires_grad_(True)
    with evaluation_mode(net), _quiet_captum_hooks(), _classes_checked(net, target), \
            warnings.catch_warnings(), _cam_layer_runs(layer):
        # Captum warns, and returns an empty tensor, where the layer's output is not 4-D.
        warnings.filterwarnings("ignore", message="Couldn.t appropriately interpolate GradCAM")
        attribution = GuidedGradCam(net, modules[layer]).attribute(
            inputs, target=target, interpolate_mode="bilinear").detach()
    if attribution.shape != x.shape:
        raise _cam_output_error(layer)
    return attribution


def _captum_gradcam(model, x, target, *, layer):
    """Grad-CAM: the layer's channels weighted by their mean gradient, summed, ReLU'd, and
    upsampled bilinearly to the input; spread evenly over the 3 colour channels (B, 3, H, W),
    so that its channel sum is the map."""
    from captum.attr import LayerAttribution, LayerGradCam

    x, target = explained_inputs(x, target)
    modules = dict(model.named_modules())
    if layer not in modules:
        raise PullbackWidgetsError(f"Grad-CAM layer {layer!r} is not a module of the model")
    with evaluation_mode(model), _classes_checked(model, target), _cam_layer_runs(layer):
        cam = LayerGradCam(model, modules[layer]).attribute(
            x.detach(), target=target, relu_attributions=True).detach()
    if cam.dim() != 4:
        raise _cam_output_error(layer)
    cam = LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear")
    return (cam / x.shape[1]).expand(-1, x.shape[1], -1, -1).contiguous()


def _captum_integrated_gradients(model, x, target, *, n_steps, batch_size):
    from captum.attr import IntegratedGradients

    x, target = explained_inputs(x, target)
    with evaluation_mode(model), _classes_checked(model, target):
        return IntegratedGradients(model).attribute(
            x, baselines=torch.zeros_like(x), target=target, n_steps=n_steps,
            internal_batch_size=batch_size).detach()


def _captum_smoothgrad(model, x, target, *, samples, noise_std, seed):
    from captum.attr import NoiseTunnel, Saliency

    x, target = explained_inputs(x, target)
    devices = [x.device] if x.device.type == "cuda" else []

    def forward(inputs: Tensor) -> Tensor:
        # Captum's noise is float32: a bfloat16 (float16) image plus it would reach the model
        # as float32. (A no-op for float32 and float64 images.)
        return model(inputs.to(x.dtype))

    smoothgrad = NoiseTunnel(Saliency(forward))
    maps = []
    # Captum draws the noise from the global RNG: fork it so the draw is fixed and the
    # caller's random state is left alone. One image at a time, each seeded by the run's seed
    # and its own pixels: its noise, hence its map, is the same in any batch, shard or process.
    with evaluation_mode(model), torch.random.fork_rng(devices=devices), \
            _classes_checked(model, target):
        for index in range(len(x)):
            torch.manual_seed((seed * 1_000_003 + _content_seed(x[index])) % 2 ** 63)
            maps.append(smoothgrad.attribute(
                x[index:index + 1], nt_type="smoothgrad", nt_samples=samples, stdevs=noise_std,
                target=target[index:index + 1], abs=False).detach())
    return torch.cat(maps).to(x.dtype)


def _conv_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _last_conv(model: nn.Module) -> str:
    names = _conv_names(model)
    if not names:
        raise PullbackWidgetsError("Grad-CAM and Guided Grad-CAM need a Conv2d layer; the model "
                                   "has none: pass cam_layer")
    return names[-1]


def captum_available() -> bool:
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        return False
    return True


def check_methods(names: Sequence[str]) -> list[str]:
    """``names`` if each is a stable method name (and Captum is there for Captum's); else a
    user error that names the unknown one or the missing ``compare`` extra."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise PullbackWidgetsTypeError("methods must be a non-empty list of method names")
    for name in names:
        check_choice(name, METHODS, "method")
    captum = [name for name in names if name in CAPTUM_METHODS]
    if captum and not captum_available():
        raise PullbackWidgetsError(
            f"method(s) {', '.join(captum)} need Captum: pip install "
            "'pullback-widgets[compare]' (the compare extra)")
    if len(set(names)) != len(names):
        raise PullbackWidgetsError(f"methods are listed twice: {list(names)}")
    return list(names)


def build_method(name: str, model: nn.Module, *, temperature: float | None = None,
                 gate: str = "sigmoid", temperature_mode: str = "absolute",
                 pool_temperature: float | None = None, pool_weights: str | None = None,
                 cam_layer: str | None = None, ig_steps: int = IG_STEPS,
                 smoothgrad_samples: int = SMOOTHGRAD_SAMPLES,
                 smoothgrad_std: float = SMOOTHGRAD_STD,
                 batch_size: int = 16) -> Explainer:
    """The :data:`Explainer` a stable name (:data:`METHODS`) stands for.

    The pullback settings apply to ``pullback`` only. ``ig_steps`` Gauss-Legendre points for
    integrated gradients (run ``batch_size`` at a time), ``smoothgrad_samples`` draws of
    N(0, ``smoothgrad_std``²) pixel noise for SmoothGrad (seed 0), ``cam_layer`` for Grad-CAM
    and guided Grad-CAM (default: the model's last Conv2d).
    """
    (name,) = check_methods([name])
    if name == "pullback":
        return pullback_method(temperature, gate, temperature_mode,
                               pool_temperature=pool_temperature, pool_weights=pool_weights)
    simple = {"gradient": gradient, "gradient_x_input": gradient_times_input,
              "random": random_attribution}
    if name in simple:
        return simple[name]
    partial = functools.partial
    if name in ("guided_backprop", "guided_gradcam"):
        _check_guidable(model)
    if name in ("guided_backprop", "guided_backprop_captum"):
        return partial(_captum_guided_backprop, relu6=name == "guided_backprop")
    if name == "integrated_gradients":
        return partial(_captum_integrated_gradients, n_steps=check_index(ig_steps, "ig_steps", 1),
                       batch_size=check_index(batch_size, "batch_size", 1))
    if name == "smoothgrad":
        return partial(_captum_smoothgrad,
                       samples=check_index(smoothgrad_samples, "smoothgrad_samples", 1),
                       noise_std=check_positive(smoothgrad_std, "smoothgrad_std"), seed=0)
    if cam_layer is not None and not isinstance(cam_layer, str):
        raise PullbackWidgetsTypeError(f"cam_layer must be a module's name (a str), got "
                                       f"{type(cam_layer).__name__}")
    layer = _last_conv(model) if cam_layer is None else cam_layer
    if layer not in dict(model.named_modules()):
        raise PullbackWidgetsError(f"cam_layer {layer!r} is not a module of the model")
    return partial(_captum_gradcam if name == "gradcam" else _captum_guided_gradcam,
                   layer=layer)


def method_settings(name: str, model: nn.Module, *, cam_layer: str | None = None,
                    ig_steps: int = IG_STEPS, smoothgrad_samples: int = SMOOTHGRAD_SAMPLES,
                    smoothgrad_std: float = SMOOTHGRAD_STD) -> str:
    """The settings :func:`build_method` gives ``name`` with these options, in words for a
    title ("16 steps, black baseline"); "" for methods without settings. What
    :func:`build_method` refuses is refused here too: a title never names settings no map was
    made with."""
    check_choice(name, METHODS, "method")
    if name == "integrated_gradients":
        return f"{check_index(ig_steps, 'ig_steps', 1)} steps, black baseline"
    if name == "smoothgrad":
        return (f"{check_index(smoothgrad_samples, 'smoothgrad_samples', 1)} samples, noise "
                f"σ = {check_positive(smoothgrad_std, 'smoothgrad_std'):g}")
    if name in ("gradcam", "guided_gradcam"):
        if cam_layer is not None and not isinstance(cam_layer, str):
            raise PullbackWidgetsTypeError(f"cam_layer must be a module's name (a str), got "
                                           f"{type(cam_layer).__name__}")
        return f"layer {_last_conv(model) if cam_layer is None else cam_layer}"
    return ""


def method_registry(model: nn.Module, *, temperatures: Sequence[float] = (0.1, 0.3, 1.0),
                    gates: Sequence[str] = ("sigmoid", "normal_cdf"),
                    temperature_modes: Sequence[str] = ("absolute",),
                    captum: bool | None = None, cam_layer: str | None = None,
                    ig_steps: int = IG_STEPS, smoothgrad_samples: int = SMOOTHGRAD_SAMPLES,
                    smoothgrad_std: float = SMOOTHGRAD_STD,
                    batch_size: int = 16) -> dict[str, Explainer]:
    """Name -> :data:`Explainer` for the methods compared.

    Pullbacks for every (gate, temperature, mode), named by :func:`pullback_name`; then
    ``gradient``, ``gradient_x_input`` and ``random`` and, where Captum is installed
    (``captum=None``: if importable), Captum's methods (:data:`CAPTUM_METHODS`), under their
    stable names (see the module docstring) and built by :func:`build_method` with these
    options; Grad-CAM and guided Grad-CAM only where they have a layer (``cam_layer``, else
    the model's last Conv2d), guided backprop and guided Grad-CAM only where every rectifier
    is a ReLU (ReLU6) module: a model without a Conv2d, or with SiLU, gets the other methods.
    """
    methods: dict[str, Explainer] = {}
    for mode in temperature_modes:
        for gate in gates:
            for t in temperatures:
                methods[pullback_name(t, gate, mode)] = pullback_method(t, gate, mode)
    names = ["gradient", "gradient_x_input", "random"]
    if captum_available() if captum is None else captum:
        names += [name for name in CAPTUM_METHODS if cam_layer is not None
                  or name not in ("gradcam", "guided_gradcam") or _conv_names(model)]
        if not _guidable(model):
            names = [name for name in names if name not in ("guided_backprop", "guided_gradcam")]
    options = {"cam_layer": cam_layer, "ig_steps": ig_steps,
               "smoothgrad_samples": smoothgrad_samples, "smoothgrad_std": smoothgrad_std,
               "batch_size": batch_size}
    for name in names:
        methods[name] = build_method(name, model, **options)
    return methods


# --------------------------------------------------------------------------- Quantus

_QUANTUS_KWARGS = ("temperature", "gate", "pool_temperature", "temperature_mode",
                   "pool_weights", "attention_weights", "device")


def quantus_explain_func(model: nn.Module, inputs: np.ndarray | Tensor,
                         targets: np.ndarray | Sequence[int] | int, **kwargs) -> np.ndarray:
    """A Quantus ``explain_func``: excitation pullbacks as a numpy array shaped like ``inputs``.

    ``model``: the network Quantus passes (for its randomisation metrics, the randomised
    copy: the attribution is always of the model given here). ``inputs``: (B, 3, H, W) images
    in the model's input space (pixel space [0, 1] for :func:`pullback_widgets.load_model`
    models); ``targets``: class per image. Keyword arguments (Quantus's
    ``explain_func_kwargs``): ``temperature`` (default: the model's), ``gate`` (``"hard"``
    gives the plain gradient), ``pool_temperature``, ``temperature_mode``, ``pool_weights``,
    ``attention_weights``, as :func:`pullback_widgets.excitation_pullback` takes them;
    ``device`` is accepted because Quantus passes it, and ignored: the model's own device is
    used. Returns float32.
    """
    unknown = sorted(set(kwargs) - set(_QUANTUS_KWARGS))
    if unknown:
        raise PullbackWidgetsTypeError(
            f"quantus_explain_func got unexpected keyword argument(s) {unknown}; "
            f"it takes {list(_QUANTUS_KWARGS)}")
    if isinstance(inputs, np.ndarray):
        inputs = torch.from_numpy(np.ascontiguousarray(inputs))
    if not isinstance(inputs, Tensor):
        raise PullbackWidgetsTypeError(f"inputs must be a numpy array or tensor (B, 3, H, W), "
                                       f"got {type(inputs).__name__}")
    parameter = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    if parameter is not None:
        inputs = inputs.to(parameter.device, parameter.dtype)
    if isinstance(targets, np.generic):  # a numpy scalar: one class for every example
        targets = np.asarray(targets)
    if isinstance(targets, np.ndarray):
        # Quantus may hand over labels as floats; only whole numbers name a class (a cast
        # would make 0.9 class 0 without a word).
        if targets.dtype.kind == "f" and not np.all(np.isfinite(targets)
                                                    & (targets == np.round(targets))):
            raise PullbackWidgetsTypeError(
                f"targets must be integer class indices, got {targets.dtype} values that are "
                "not whole numbers")
        if targets.dtype.kind not in "iuf":
            raise PullbackWidgetsTypeError(
                f"targets must be integer class indices, got an array of {targets.dtype}")
        # As Python ints: a cast to int64 would wrap a huge uint64 or float to another number.
        classes = [int(t) for t in targets.reshape(-1).tolist()]
        targets = classes[0] if targets.ndim == 0 else classes
    elif isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
        targets = int(targets)
    explain = pullback_method(kwargs.get("temperature"), kwargs.get("gate", "sigmoid"),
                              kwargs.get("temperature_mode", "absolute"),
                              pool_temperature=kwargs.get("pool_temperature"),
                              pool_weights=kwargs.get("pool_weights"),
                              attention_weights=kwargs.get("attention_weights"))
    # float32 first: numpy has no bfloat16.
    return explain(model, inputs, targets).detach().cpu().to(torch.float32).numpy()
