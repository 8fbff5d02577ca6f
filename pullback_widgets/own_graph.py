"""A soft op's own copy of the model's call, recorded, for the hard gate's bit-exact backward.

Composite ops (a norm, attention with whichever kernel torch picks) have plain gradients that
are easiest to reproduce bit for bit by letting autograd pull back through the very call the
model made. :class:`OwnGraph` runs that call on detached copies of its inputs with its own
graph, in the Function's forward; the hard gate pulls back through it (re-entrant
``torch.autograd.grad``, which also works under batched targets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


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


class OwnGraph:
    """``hard_op(*inputs)`` run on detached copies with its own graph.

    ``output`` is the call's result (detach it before returning it from a Function's forward);
    ``inputs`` the detached copies, for the soft rule to read.
    """

    def __init__(self, hard_op: Callable[..., Tensor], inputs: Sequence[Tensor | None]) -> None:
        with torch.enable_grad():
            self.inputs = [None if t is None else t.detach().requires_grad_(t.requires_grad)
                           for t in inputs]
            self.output = hard_op(*self.inputs)
        self._nodes = [_gradient_node(t) for t in inputs]

    def wanted(self) -> list[bool]:
        """Which inputs the running backward needs a gradient for. A custom Function's
        ``needs_input_grad`` is fixed at forward time; a pullback wants only the image's
        gradient, so a norm's weight and bias gradients would be computed for nothing."""
        return [_will_run(node) for node in self._nodes]

    def plain_gradients(self, grad_output: Tensor) -> list[Tensor | None]:
        """Autograd's own gradients of the inputs the running backward needs (else None)."""
        indices = [i for i, wanted in enumerate(self.wanted()) if wanted]
        result: list[Tensor | None] = [None] * len(self.inputs)
        if indices:
            grads = torch.autograd.grad(self.output, [self.inputs[i] for i in indices],
                                        grad_output, retain_graph=True)
            for i, grad in zip(indices, grads):
                result[i] = grad
        return result
