"""The model's own call of a composite op, for the hard gate's bit-exact backward.

Composite ops (a norm, attention with whichever kernel torch picks) have plain gradients that
are easiest to reproduce bit for bit by letting autograd pull back through the very call the
model made. :class:`OwnCall` runs that call on detached copies of its inputs with its own
graph: in the Function's forward, for the output; and again in the backward of the hard gate,
from the inputs the Function saved, for autograd's own gradients (re-entrant
``torch.autograd.grad``, which also works under batched targets).

The Function saves the call's inputs with ``save_for_backward``, never on ``ctx``: so a backward
that frees the graph frees them as it passes (an attribute of ``ctx`` lives as long as the
whole graph), and one changed in place since the forward is refused, not read.

Autocast picks a call's dtype and kernel: the call runs again under the autocast it first ran
under, wherever the backward runs (torch's advice is a backward outside autocast).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def autocast_state(device_type: str) -> tuple[bool, torch.dtype] | None:
    """Whether autocast is on for ``device_type`` now, and its dtype; None where that device
    type has no autocast."""
    if not torch.amp.is_autocast_available(device_type):
        return None
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def autocast_as(device_type: str, state: tuple[bool, torch.dtype] | None
                ) -> contextlib.AbstractContextManager:
    """Autocast for ``device_type`` as ``state`` (from :func:`autocast_state`) had it."""
    if state is None:
        return contextlib.nullcontext()
    enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def _gradient_node(tensor: Tensor | None):
    """The autograd node a gradient for ``tensor`` goes to; None if it needs none; True where
    this torch version does not say (then every gradient is taken as wanted)."""
    if tensor is None or not tensor.requires_grad:
        return None
    try:
        return torch.autograd.graph._get_grad_fn_or_grad_acc(tensor)
    except AttributeError:
        return True


def _will_run(node) -> bool:
    """Whether the running backward uses the gradient sent to ``node``."""
    if node is None or node is True:
        return node is True
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


class OwnCall:
    """How the model called a composite op: ``hard_op(*inputs)``, and where the inputs'
    gradients go. It holds no tensors, so a Function keeps it on ``ctx``. Make it in the
    forward, from the Function's inputs."""

    def __init__(self, hard_op: Callable[..., Tensor], inputs: Sequence[Tensor | None]) -> None:
        self.hard_op = hard_op
        self._nodes = [_gradient_node(t) for t in inputs]
        self._device_type = next(t for t in inputs if t is not None).device.type
        self._autocast = autocast_state(self._device_type)  # as the forward has it

    def run(self, inputs: Sequence[Tensor | None]) -> tuple[Tensor, list[Tensor | None]]:
        """(output, leaves): the call on ``leaves``, detached copies of ``inputs`` that require
        a gradient where those do (some kernels are picked by that), with its own graph.
        Detach the output before returning it from a Function's forward."""
        with torch.enable_grad(), autocast_as(self._device_type, self._autocast):
            leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad)
                      for t in inputs]
            return self.hard_op(*leaves), leaves

    def wanted(self) -> list[bool]:
        """Which inputs the running backward needs a gradient for. A custom Function's
        ``needs_input_grad`` is fixed at forward time; a pullback wants only the image's
        gradient, so a norm's weight and bias gradients would be computed for nothing."""
        return [_will_run(node) for node in self._nodes]

    def plain_gradients(self, grad_output: Tensor, inputs: Sequence[Tensor | None]
                        ) -> list[Tensor | None]:
        """Autograd's own gradients of the inputs the running backward needs (else None): the
        call made again on ``inputs`` (the forward's, as saved), the same kernels on the same
        tensors, hence the same bits."""
        indices = [i for i, wanted in enumerate(self.wanted()) if wanted]
        result: list[Tensor | None] = [None] * len(inputs)
        if indices:
            output, leaves = self.run(inputs)
            grads = torch.autograd.grad(output, [leaves[i] for i in indices], grad_output)
            for i, grad in zip(indices, grads):
                result[i] = grad
        return result
