"""A record of a model's parameters and buffers, to tell later whether they changed.

A session's graph holds one forward of the model: a backward after the user changed the model
would pull back through the new weights along the old gates, an answer about neither model.
Four things tell a change:

- versions: autograd's counter, which every in-place change it sees moves (an optimiser step,
  ``load_state_dict``, ``copy_`` under ``no_grad``);
- addresses: ``.to()``, ``.double()`` and ``p.data = ...`` swap a tensor's memory, not the
  tensor, nor its version;
- a sample of the values: in-place changes through ``.data`` (``p.data.mul_(0.9)``, an
  exponential moving average, zeroing a layer to ablate it) move neither;
- the modules themselves, their classes, and a ``forward`` set on one of them: a module swapped
  for one without weights (``net.act = nn.Identity()``), a class swapped
  (``module.__class__ = ...``) or a patched forward changes no tensor.

Other attributes (a convolution's ``padding`` set anew) are not compared: modules may set
their own as they run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .validation import submodules

# Values sampled per tensor, evenly spaced through its memory: a change to all of a tensor moves
# some of them; one to a part (a few values, one channel of many) may miss them all. More cost
# more: each sample is a read from another cache line (4096 a tensor took 16 ms on ResNet-50).
SAMPLES_PER_TENSOR = 64

# Bits compared, not values: NaN is not equal to itself, and -0.0 is equal to 0.0.
_SAME_SIZE_INTEGERS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _tensors(modules: list[nn.Module]) -> list[Tensor]:
    """Each parameter and buffer, read from each module's own dicts: ``model.parameters()``
    builds every name (0.5 against 0.15 ms on Lite0)."""
    return [t for module in modules for tensors in (module._parameters, module._buffers)
            for t in tensors.values() if t is not None]


def _structure(modules: list[nn.Module]) -> tuple[tuple[nn.Module, type, object], ...]:
    """Each module, with its class (``module.__class__ = ...`` swaps the forward and keeps
    everything else) and the ``forward`` set on it as an attribute (None where its class's
    runs)."""
    return tuple((module, type(module), module.__dict__.get("forward")) for module in modules)


def _same_structure(then: tuple[tuple[nn.Module, type, object], ...],
                    now: tuple[tuple[nn.Module, type, object], ...]) -> bool:
    return len(then) == len(now) and all(
        a is b and class_then is class_now and forward_then is forward_now
        for (a, class_then, forward_then), (b, class_now, forward_now) in zip(then, now))


def _address(tensor: Tensor) -> int | None:
    try:
        return tensor.data_ptr()
    except RuntimeError:  # no storage of its own (a tensor subclass)
        return None


def _one_block(tensor: Tensor) -> bool:
    """Whether ``tensor``'s values fill one block of memory (contiguous or channels last)."""
    return tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(
        memory_format=torch.channels_last)) or (tensor.dim() == 5 and tensor.is_contiguous(
            memory_format=torch.channels_last_3d))


def _sample(tensor: Tensor) -> Tensor:
    """Up to :data:`SAMPLES_PER_TENSOR` of ``tensor``'s values as a 1-D view of its memory
    where they fill one block (nearly every parameter), else all of them (a view of the
    tensor itself, read anew each time); floats viewed as integers of their size."""
    tensor = tensor.detach()
    count = tensor.numel()
    if count <= SAMPLES_PER_TENSOR or not _one_block(tensor):
        sample = tensor  # a view of it, flattened where it is read (reshape would copy it now)
    else:
        sample = tensor.as_strided((SAMPLES_PER_TENSOR,), (count // SAMPLES_PER_TENSOR,),
                                   tensor.storage_offset())
    return sample.view(_SAME_SIZE_INTEGERS[sample.element_size()]) \
        if sample.is_floating_point() else sample


def _sample_views(tensors: list[Tensor]) -> dict[tuple, list[Tensor]]:
    """The samples of ``tensors`` per (dtype, device). Tensors no sample can be read from
    (sparse, quantized, some subclasses) are left out: their versions and addresses are still
    compared."""
    groups: dict[tuple, list[Tensor]] = {}
    for tensor in tensors:
        try:
            sample = _sample(tensor)
        except (RuntimeError, NotImplementedError):
            continue
        groups.setdefault((sample.dtype, sample.device), []).append(sample)
    return groups


def _joined(views: dict[tuple, list[Tensor]]) -> dict[tuple, Tensor | None]:
    """The sampled values now, copied (the views see later changes): one tensor per group,
    None where they cannot be joined."""
    joined: dict[tuple, Tensor | None] = {}
    for key, samples in views.items():
        try:
            joined[key] = torch.cat([sample.reshape(-1) for sample in samples])
        except (RuntimeError, NotImplementedError):
            joined[key] = None
    return joined


@dataclass(frozen=True)
class ModelState:
    """A model's parameters and buffers as found: each tensor with its version and address,
    and views of a sample of each one's values, with those values then."""

    entries: tuple[tuple[Tensor, int, int | None], ...]
    views: dict[tuple, list[Tensor]]
    values: dict[tuple, Tensor | None]
    structure: tuple[tuple[nn.Module, type, object], ...]

    @staticmethod
    def of(model: nn.Module) -> ModelState:
        modules = submodules(model)
        tensors = _tensors(modules)
        views = _sample_views(tensors)
        return ModelState(tuple((t, t._version, _address(t)) for t in tensors), views,
                          _joined(views), _structure(modules))

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` is made of the same modules, with no forward set on one since,
        and holds the same tensors, unchanged in place (by autograd's count, or in the sampled
        values), in the same memory."""
        modules = submodules(model)
        if not _same_structure(self.structure, _structure(modules)):
            return False
        now = _tensors(modules)
        if len(now) != len(self.entries) or not all(
                a is b and version == b._version and address == _address(b)
                for (a, version, address), b in zip(self.entries, now)):
            return False
        # The same tensors in the same memory: the views made then read them now.
        return all(then is None or torch.equal(now, then) for now, then in zip(
            _joined(self.views).values(), self.values.values()))
