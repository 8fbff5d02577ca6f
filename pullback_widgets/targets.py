"""What a pullback starts from: a class logit or a hidden :class:`Unit`, and its gradient seed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


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


def is_class_target(target: object) -> bool:
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


def unit_seed(unit: Unit, activation: Tensor) -> Tensor:
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


