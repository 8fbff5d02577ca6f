"""What a pullback starts from: a class logit or a hidden :class:`Unit`, and its gradient seed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .validation import PullbackWidgetsError, PullbackWidgetsTypeError, check_index, is_integer


@dataclass(frozen=True)
class Unit:
    """A hidden-unit target: ``layer``'s output ``channel`` at pixel (``y``, ``x``) of its
    feature map, or its spatial mean when ``y`` and ``x`` are None.

    ``layer`` is a ``model.named_modules()`` name; for a 2-D (B, C) output, ``y``/``x`` stay None.
    Any integer type is accepted (numpy's too) and stored as a Python int.
    """

    layer: str
    channel: int
    y: int | None = None
    x: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.layer, str):
            raise PullbackWidgetsTypeError(
                f"Unit layer must be a module name (str), got {self.layer!r}")
        # A str subclass (numpy's str_ from an array of names) as a plain str: messages quote
        # it as 'name', not np.str_('name').
        object.__setattr__(self, "layer", str(self.layer))
        for name in ("channel", "y", "x"):
            value = getattr(self, name)
            if isinstance(value, Tensor) and value.is_meta:
                # operator.index would fail inside torch (Tensor.item() on a meta tensor)
                raise PullbackWidgetsTypeError(
                    f"Unit {name} must be an int, got a tensor on the meta device, which holds "
                    "no value")
            if isinstance(value, Tensor) and (value.dtype == torch.bool or value.dim() != 0):
                # operator.index reads tensor(True) as 1 and tensor([3]) as 3
                raise PullbackWidgetsTypeError(
                    f"Unit {name} must be an int, got a {value.dtype} tensor of shape "
                    f"{tuple(value.shape)}")
            if value is not None or name == "channel":
                # frozen: the checked Python int replaces a numpy integer in place
                object.__setattr__(self, name, check_index(value, f"Unit {name}"))
        if (self.y is None) != (self.x is None):
            raise PullbackWidgetsError("Unit y and x must both be given or both be None")


Target = int | Sequence[int] | Tensor | Unit


def is_class_target(target: object) -> bool:
    return not isinstance(target, Unit)


def class_indices(target: object, batch: int, num_classes: int | None, device) -> Tensor:
    """One class index per example, as a LongTensor (B,).

    ``target``: one class index for every example, or one per example as a sequence, a 1-D
    integer tensor or numpy array. Any integer type counts (numpy's too), bools do not.
    ``num_classes`` None: not known yet (only negative classes are refused here).
    """
    if isinstance(target, (bool, np.bool_)):
        raise PullbackWidgetsTypeError(
            "target must be a class index, a sequence of them, or a pw.Unit; got a bool")
    # Python ints first: checked before any cast to int64 (which would overflow, or wrap a
    # uint64 to a negative index).
    if isinstance(target, np.ndarray):
        if target.dtype == np.bool_ or not np.issubdtype(target.dtype, np.integer):
            raise PullbackWidgetsTypeError(
                f"target array must hold integer class indices, got {target.dtype}")
        classes = [int(target)] * batch if target.ndim == 0 else target.reshape(-1).tolist()
    elif is_integer(target):
        classes = [int(target)] * batch
    elif isinstance(target, Tensor):
        if target.is_meta:  # reading its values below would fail deep inside torch
            raise PullbackWidgetsError(
                "target tensor is on the meta device, which holds no values")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise PullbackWidgetsTypeError(
                f"target tensor must hold integer class indices, got {target.dtype}")
        classes = [int(target)] * batch if target.dim() == 0 else target.reshape(-1).tolist()
    # bytes are a sequence of ints too: b"cat" would pass as the classes 99, 97, 116.
    elif isinstance(target, Sequence) and not isinstance(target, (str, bytes, bytearray,
                                                                    memoryview)):
        if not all(is_integer(t) for t in target):
            raise PullbackWidgetsTypeError("target sequence must hold int class indices")
        classes = [int(t) for t in target]
    else:
        raise PullbackWidgetsTypeError(
            "target must be an int class index, a sequence / LongTensor with one class per "
            f"example, or a pw.Unit; got {type(target).__name__}")
    if len(classes) != batch:
        raise PullbackWidgetsError(f"target has {len(classes)} classes for a batch of {batch}")
    bad = next((c for c in classes if c < 0 or (num_classes is not None and c >= num_classes)),
               None)
    if bad is not None and num_classes is None:
        raise PullbackWidgetsError(f"target class {bad} is negative: classes count from 0")
    if bad is not None:
        raise PullbackWidgetsError(f"target class {bad} is out of range [0, {num_classes})")
    return torch.tensor(classes, dtype=torch.long, device=device)


@dataclass(frozen=True)
class TokenGrid:
    """How a vision transformer lays out its tokens: ``prefix`` tokens (class, registers) and
    then one per image patch, row by row, on a ``height`` x ``width`` patch grid."""

    prefix: int
    height: int
    width: int

    @property
    def tokens(self) -> int:
        return self.prefix + self.height * self.width


def _token_seed(unit: Unit, activation: Tensor, grid: TokenGrid, where: str) -> Tensor:
    """The seed on a token map (B, N, C): channel ``unit.channel`` of the patch token at
    (y, x) on the patch grid, or that channel's mean over the patch tokens."""
    tokens, channels = activation.shape[1:]
    if tokens != grid.tokens:
        raise PullbackWidgetsError(
            f"{where} output has shape {tuple(activation.shape)}, not a token map of this "
            f"model ({grid.prefix} prefix + {grid.height}x{grid.width} patch tokens)")
    if unit.channel >= channels:
        raise PullbackWidgetsError(f"channel {unit.channel} is out of range for {where} "
                                   f"with {channels} channels")
    seed = torch.zeros_like(activation)
    if unit.y is None:
        seed[:, grid.prefix:, unit.channel] = 1.0 / (grid.height * grid.width)
        return seed
    if unit.y >= grid.height or unit.x >= grid.width:
        raise PullbackWidgetsError(f"(y, x) = ({unit.y}, {unit.x}) is outside {where}'s "
                                   f"{grid.height}x{grid.width} patch grid")
    seed[:, grid.prefix + unit.y * grid.width + unit.x, unit.channel] = 1.0
    return seed


def unit_seed(unit: Unit, activation: Tensor, batch: int,
              grid: TokenGrid | None = None, channels_last: bool = False,
              layer_channels_last: bool = False) -> Tensor:
    """The gradient seed on ``activation`` (B, C[, H, W]) that selects ``unit``, for a forward
    of ``batch`` examples.

    For a vision transformer (``grid`` given), a 3-D output is a token map (B, N, C): the
    Unit's channel is the last dim and (y, x) a place on the patch grid (see
    :class:`TokenGrid`); its spatial mean is the mean over the patch tokens. Other 3-D outputs
    are an error (tokens or a 1-D map cannot be told apart), as is an output whose dim 0 is not
    the batch (a sequence-first layer: dim 1 is no channel there), and a 4-D output of a model
    whose layers output channels last (``channels_last``) or of a layer that does
    (``layer_channels_last``: see :class:`~pullback_widgets.model_helpers.LayerRecorder`).
    """
    where = f"layer {unit.layer!r}"
    if activation.dim() < 2:
        raise PullbackWidgetsError(f"{where} output has shape {tuple(activation.shape)}; "
                                   "a Unit needs (B, C) or (B, C, H, W)")
    if activation.shape[0] != batch:
        raise PullbackWidgetsError(
            f"{where} output has shape {tuple(activation.shape)}, whose dim 0 is not the batch "
            f"of {batch} (a sequence-first layer, such as nn.TransformerEncoder with "
            "batch_first=False?); a Unit needs (B, C), (B, C, H, W) or a ViT's (B, N, C)")
    if activation.dim() == 3:
        if grid is not None:
            return _token_seed(unit, activation, grid, where)
        # (B, N tokens, C) of a patch model the package does not know (MLP-Mixer, LeViT) or
        # (B, C, L): the channel's dim cannot be told, and the wrong one is a silent wrong unit.
        raise PullbackWidgetsError(
            f"{where} output has shape {tuple(activation.shape)}: tokens (B, N, C) or a 1-D map "
            "(B, C, L)? A Unit cannot tell which dim holds channels on this model (it knows "
            "the token maps of timm's and torchvision's ViTs); target a class, or a 4-D layer")
    if activation.dim() == 4 and layer_channels_last:
        raise PullbackWidgetsError(
            f"{where} output has shape {tuple(activation.shape)}, laid out channels last "
            "(B, H, W, C) (a Linear or LayerNorm over its last dim, as in ConvNeXt's blocks, or "
            "a module that says so), "
            "where dim 1 is rows, not channels: pick a layer that outputs (B, C, H, W), such "
            "as the block around it")
    if grid is not None and activation.dim() == 4 and \
            tuple(activation.shape[2:]) != (grid.height, grid.width):
        # As feature_layers offers them: off the patch grid, dim 1 is no channel.
        raise PullbackWidgetsError(
            f"{where} output has shape {tuple(activation.shape)}, not a (B, C, H, W) map on "
            f"this vision transformer's {grid.height}x{grid.width} patch grid (per-head "
            "queries or keys, or a map laid out channels last): pick a block's token map")
    if channels_last and activation.dim() == 4:
        raise PullbackWidgetsError(
            f"{where} output has shape {tuple(activation.shape)} in a model whose layers output "
            "channels last (B, H, W, C), as Swin's do, where dim 1 is rows, not channels: a "
            "Unit cannot tell them apart on this model's 4-D layers; target a class instead")
    channels = activation.shape[1]
    if unit.channel >= channels:
        raise PullbackWidgetsError(f"channel {unit.channel} is out of range for {where} "
                                   f"with {channels} channels")
    seed = torch.zeros_like(activation)
    spatial = activation.shape[2:]
    if unit.y is None:
        seed[:, unit.channel] = 1.0 / max(1, spatial.numel())
        return seed
    if len(spatial) != 2:
        raise PullbackWidgetsError(f"{where} has no (H, W) map; leave y and x as None")
    if unit.y >= spatial[0] or unit.x >= spatial[1]:
        raise PullbackWidgetsError(f"(y, x) = ({unit.y}, {unit.x}) is outside {where}'s "
                                   f"{spatial[0]}x{spatial[1]} map")
    seed[:, unit.channel, unit.y, unit.x] = 1.0
    return seed
