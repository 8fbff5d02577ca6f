"""An audit of a gated forward's autograd graph: what on the input's path kept a plain backward.

The interception sees only the calls Python makes under its mode. Ops that run where it cannot
see (inside a ``torch.jit.script`` function or a C++ extension, or ``F.max_pool1d``, which torch
runs as a 2-D pool in C++) leave autograd's own backward node in the graph, as do the ops the
engine does not gate (ELU, Mish, Softplus, ...). Reading the graph after the forward finds them
all, whatever made them, so every pullback can say what it is not.

Code compiled with ``torch.compile`` is different: its backward is one opaque node, and a
compiled function traced under the mode keeps the gates of the call it was traced in, so a
pullback through it cannot be trusted either way. That is an error.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

from torch import Tensor

from .validation import PullbackWidgetsError

# autograd's backward node -> the op people know it by: ops with a gate (the engine gates
# them where it sees the call) or a gate-like nonlinearity it leaves plain.
PLAIN_GATE_NODES = {
    "ReluBackward0": "ReLU",
    "ReluBackward1": "ReLU",
    "HardtanhBackward0": "ReLU6/hardtanh",
    "HardtanhBackward1": "ReLU6/hardtanh",
    "ThresholdBackward0": "threshold",
    "MaxPool2DWithIndicesBackward0": "max-pool",
    "MaxPool3DWithIndicesBackward0": "max-pool",
    "AdaptiveMaxPool2DBackward0": "adaptive max-pool",
    "AdaptiveMaxPool3DBackward0": "adaptive max-pool",
    "SiluBackward0": "SiLU",
    "GeluBackward0": "GELU",
    "HardswishBackward0": "Hardswish",
    "LeakyReluBackward0": "leaky ReLU",
    "LeakyReluBackward1": "leaky ReLU",
    "PreluKernelBackward0": "PReLU",
    "NativeLayerNormBackward0": "LayerNorm",
    "NativeGroupNormBackward0": "GroupNorm",
    "EluBackward0": "ELU/SELU",
    "EluBackward1": "ELU/SELU",
    "CeluBackward0": "CELU",
    "MishBackward0": "Mish",
    "SoftplusBackward0": "Softplus",
    "ScaledDotProductFlashAttentionForCpuBackward0": "attention",
    "ScaledDotProductFlashAttentionBackward0": "attention",
    "ScaledDotProductEfficientAttentionBackward0": "attention",
    "ScaledDotProductCudnnAttentionBackward0": "attention",
}

# Nodes whose backward runs compiled code the audit cannot read, and the node types they have.
_COMPILED_NODES = {"CompiledFunctionBackward": "torch.compile",
                   "DifferentiableGraphBackward": "torch.jit.script"}
_OPAQUE_TYPES = {"CompiledFunctionBackward", "CppFunction"}

COMPILED_IN_FORWARD = (
    "the model's forward calls code compiled with {how}, whose ops the engine cannot see: its "
    "ReLUs and other gates would stay hard, or keep the temperature of the call they were "
    "compiled in, and the pullback could not be trusted; keep the functions forward() calls "
    "eager (compile or script nothing inside the model to explain it)")

PLAIN_GATES = (
    "{count} op(s) on the input's path kept their plain backward, not gated: {ops}. Either the "
    "engine does not gate them (ELU, Mish, Softplus, 1-D/3-D/adaptive max-pools, max-pools "
    "returning indices), or they ran where it cannot see (a TorchScript function, a C++ "
    "extension)")


def _compiled_by(node) -> str | None:
    """What compiled the code behind ``node`` (None: nothing). TorchScript's differentiable
    graphs are a generic C++ node that only ``name()`` tells apart."""
    name = type(node).__name__
    if name == "CppFunction":
        name = node.name().rsplit("::", 1)[-1]
    return _COMPILED_NODES.get(name)


def plain_gates(outputs: Iterable[Tensor]) -> collections.Counter[str]:
    """The gate-like ops on the graph behind ``outputs`` that kept autograd's own backward,
    counted by the name people know them by. Raises PullbackWidgetsError where the graph runs
    compiled code (``torch.compile``, a scripted function's differentiable graph)."""
    found: collections.Counter[str] = collections.Counter()
    stack = list({id(t.grad_fn): t.grad_fn for t in outputs if t.grad_fn is not None}.values())
    # The graph holds its nodes while it lives, so their ids stay unique here. The loop is
    # written for speed: one-shot pullbacks pay for it on every call.
    seen = {id(node) for node in stack}
    while stack:
        node = stack.pop()
        name = type(node).__name__
        if name in PLAIN_GATE_NODES:
            found[PLAIN_GATE_NODES[name]] += 1
        elif name in _OPAQUE_TYPES and _compiled_by(node):
            raise PullbackWidgetsError(COMPILED_IN_FORWARD.format(how=_compiled_by(node)))
        for next_node, _ in node.next_functions:
            if next_node is not None and id(next_node) not in seen:
                seen.add(id(next_node))
                stack.append(next_node)
    return found


def plain_gates_notice(found: Mapping[str, int]) -> str | None:
    """The notice for :func:`plain_gates`' findings; None when there are none."""
    if not found:
        return None
    ops = ", ".join(f"{name} ×{count}" for name, count in sorted(found.items()))
    return PLAIN_GATES.format(count=sum(found.values()), ops=ops)
