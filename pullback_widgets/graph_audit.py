"""An audit of a gated forward's autograd graph: what on the input's path kept a plain backward.

The interception sees only the calls Python makes under its mode. Ops that run where it cannot
see (inside a ``torch.jit.script`` function or a C++ extension, or ``F.max_pool1d``, which torch
runs as a 2-D pool in C++) leave autograd's own backward node in the graph, as do the ops the
engine does not gate (ELU, Mish, Softplus, ...). Reading the graph after the forward finds them
all, whatever made them, so every pullback can say what it is not. Only the nodes the input's
gradient passes count: a gate on parameters alone, or on an extra argument, is no part of it.
A few plain ops that torch decomposes into several nodes (RMSNorm, InstanceNorm) are marked by
the interception instead, as are the soft ops (for their kinds).

Code compiled with ``torch.compile`` is different: its backward is one opaque node, and a
compiled function traced under the mode keeps the gates of the call it was traced in, so a
pullback through it cannot be trusted either way. That is an error.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from .validation import PullbackWidgetsError

# autograd's backward node -> the op people know it by: ops with a gate (the engine gates
# them where it sees the call) or a gate-like op it leaves plain (a hard choice per element).
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
    "AbsBackward0": "abs",  # its backward gates by the sign: (h + |h|) / 2 is a ReLU
    # A step, its gradient zero: h * (sign(h) + 1) / 2 is a ReLU.
    "SignBackward0": "sign",
    "SgnBackward0": "sign",
    "MaximumBackward0": "maximum/minimum",
    "MinimumBackward0": "maximum/minimum",
    "AmaxBackward0": "max/min over dims",
    "AminBackward0": "max/min over dims",
    "MaxBackward0": "max/min over dims",
    "MaxBackward1": "max/min over dims",
    "MinBackward0": "max/min over dims",
    "MinBackward1": "max/min over dims",
    "FmaxBackward0": "maximum/minimum",
    "FminBackward0": "maximum/minimum",
    "CummaxBackward0": "cumulative max/min",
    "CumminBackward0": "cumulative max/min",
    "TopkBackward0": "top-k/sort",
    "SortBackward0": "top-k/sort",
    "MedianBackward0": "median/k-th value/mode",
    "MedianBackward1": "median/k-th value/mode",
    "NanmedianBackward0": "median/k-th value/mode",
    "NanmedianBackward1": "median/k-th value/mode",
    "KthvalueBackward0": "median/k-th value/mode",
    "ModeBackward0": "median/k-th value/mode",
    "FractionalMaxPool2DBackward0": "max-pool",
    "FractionalMaxPool3DBackward0": "max-pool",
    "RreluWithNoiseBackward0": "RReLU",
    "RreluWithNoiseBackward1": "RReLU",
    "HardsigmoidBackward0": "Hardsigmoid",
    "GluBackward0": "GLU",
    "HardshrinkBackward0": "shrink",
    "SoftshrinkBackward0": "shrink",
    "LogSigmoidBackward0": "LogSigmoid",  # -softplus(-z): Softplus mirrored
    # Its statistics are the input's, differentiated (as InstanceNorm's). F.local_response_norm
    # is marked by the interception: torch writes it with ops that name nothing.
    "CrossMapLRN2dBackward": "LocalResponseNorm",
    # A norm written by hand (RMSNorm, EvoNorm, F.normalize): its statistics of the input.
    **dict.fromkeys(("VarBackward0", "VarMeanBackward0", "StdBackward0", "StdMeanBackward0",
                     "RsqrtBackward0", "LinalgVectorNormBackward0"),
                    "statistics of a norm by hand (var/std/rsqrt/norm)"),
    "ScaledDotProductFlashAttentionForCpuBackward0": "attention",
    "ScaledDotProductFlashAttentionBackward0": "attention",
    "ScaledDotProductEfficientAttentionBackward0": "attention",
    "ScaledDotProductCudnnAttentionBackward0": "attention",
}

# A sigmoid, tanh or erf is a smooth activation alone, and a gate where its output multiplies
# a tensor on the input's path (squeeze-excite, SiLU or GELU written by hand, with tanh or with
# erf as BERT's gelu, QuickGELU, LSTM cells): named there. Between it and the product, only
# reshapes and arithmetic with numbers or constants (nodes with one input that needs a
# gradient: a number is no input). A sigmoid written with exp, 1 / (1 + exp(-z)) as a factor
# or 1 + exp(-z) as a divisor, is one too (its exp is the node named).
_SMOOTH_GATE_NODES = {"SigmoidBackward0", "TanhBackward0", "ErfBackward0", "ErfcBackward0"}
_TOWARDS_A_GATE = {
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "ExpandBackward0",
    "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2",
    "PermuteBackward0", "TransposeBackward0", "ToCopyBackward0", "CloneBackward0",
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "RsubBackward0",
    "RsubBackward1", "MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1",
    "NegBackward0"}
SMOOTH_GATE = "sigmoid/tanh gate"

# Clamps: named only where they cut a value on this input (a bound that binds nowhere, such
# as F.normalize's epsilon guard, has the plain gradient's every slope 1 anyway).
_CLAMP_NODES = {"ClampBackward0", "ClampBackward1", "ClampMinBackward0", "ClampMaxBackward0",
                "ClampMinBackward1", "ClampMaxBackward1"}  # 1: a tensor bound, h.clamp_min(zero)

# Fake quantization (quantization-aware training): its straight-through backward passes the
# gradient where a value lies in the quantized range and is zero where it was clipped, a clamp
# there; named, as clamps are, only where it clipped a value of this input.
_FAKE_QUANTIZE_NODES = {"FakeQuantizePerTensorAffineCachemaskBackward0",
                        "FakeQuantizePerChannelAffineCachemaskBackward0",
                        "FakeQuantizePerTensorAffineCachemaskTensorQparamsBackward0"}
FAKE_QUANTIZE = "fake quantization (clamp)"

# Nodes whose backward runs compiled code the audit cannot read, and the node types they have
# (ApplyTemplateBackward: a torch.compile'd function, eager backend, calling a soft op).
_COMPILED_NODES = {"CompiledFunctionBackward": "torch.compile",
                   "ApplyTemplateBackward": "torch.compile",
                   "DifferentiableGraphBackward": "torch.jit.script"}
_OPAQUE_TYPES = {"CompiledFunctionBackward", "ApplyTemplateBackward", "CppFunction"}

COMPILED_IN_FORWARD = (
    "the model's forward calls code compiled with {how}, whose ops the engine cannot see: its "
    "ReLUs and other gates would stay hard, or keep the temperature of the call they were "
    "compiled in, and the pullback could not be trusted; keep the functions forward() calls "
    "eager (compile or script nothing inside the model to explain it)")

PLAIN_GATES = (
    "{count} op(s) on the input's path kept a backward the engine did not soften: {ops}. "
    "Either the engine does not gate them (ELU, Mish, Softplus, Hardsigmoid, GLU, sigmoid or "
    "tanh gates such as squeeze-excite's or SiLU written by hand, masks from comparisons such "
    "as a ReLU written torch.where(h > 0, h, 0), abs, sign, clamps, max/min, "
    "top-k, sort, median, 1-D/3-D/adaptive max-pools, max-pools returning indices, RMSNorm, "
    "InstanceNorm, LocalResponseNorm, norms written by hand, batch norms using batch "
    "statistics, fake quantization that clips, custom autograd "
    "Functions, which keep their own backward), or they ran where it cannot see (a TorchScript "
    "function, a C++ extension, or another thread: the engine gates the thread that runs the "
    "forward, not the worker threads a model's forward hands its parts to)")


def _compiled_by(node) -> str | None:
    """What compiled the code behind ``node`` (None: nothing). TorchScript's differentiable
    graphs are a generic C++ node that only ``name()`` tells apart."""
    name = type(node).__name__
    if name == "CppFunction":
        name = node.name().rsplit("::", 1)[-1]
    return _COMPILED_NODES.get(name)


def _clamp_binds(node) -> bool:
    """Whether a clamp's bound cut any value of its input (True where torch no longer has
    what it saved: an unknown clamp is named)."""
    try:
        values = node._saved_self
        low = getattr(node, "_saved_min", None)
        high = getattr(node, "_saved_max", None)
        return bool((low is not None and (values < low).any())
                    or (high is not None and (values > high).any()))
    except RuntimeError:
        return True


def _fake_quantize_clips(node) -> bool:
    """Whether a fake quantization clipped any value of its input (its mask, True where the
    gradient passes, is not all True); True where torch no longer has the mask."""
    try:
        return not bool(node._saved_mask.all())
    except RuntimeError:
        return True


def _towards_a_gate(node) -> object:
    """The node reached from ``node`` through reshapes and arithmetic with numbers."""
    while type(node).__name__ in _TOWARDS_A_GATE:
        inputs = [child for child, _ in node.next_functions if child is not None]
        if len(inputs) != 1:
            break
        node = inputs[0]
    return node


def _gate_behind(factor, divisor: bool) -> object | None:
    """The sigmoid, tanh or erf node behind a product's ``factor``, or the exp node of a
    sigmoid written with exp (the ``divisor`` of a quotient: 1 + exp(-z)); None if neither."""
    node = _towards_a_gate(factor)
    if not divisor and type(node).__name__ == "ReciprocalBackward0":  # 1 / (1 + exp(-z))
        inputs = [child for child, _ in node.next_functions if child is not None]
        if len(inputs) != 1:
            return None
        node, divisor = _towards_a_gate(inputs[0]), True
    gates = {"ExpBackward0"} if divisor else _SMOOTH_GATE_NODES
    return node if type(node).__name__ in gates else None


def _smooth_gates_of(product, on_path: set[int]) -> list:
    """The smooth gates (see :func:`_gate_behind`) a product or quotient (``MulBackward0``,
    ``DivBackward0``) on the input's path uses, reached from one factor while another factor
    is on the input's path too."""
    factors = [child for child, _ in product.next_functions
               if child is not None and id(child) in on_path]
    if len(factors) < 2:
        return []
    quotient = type(product).__name__ == "DivBackward0"
    gates = (_gate_behind(factor, divisor=quotient and index == 1)
             for index, factor in enumerate(factors))
    return [gate for gate in gates if gate is not None]


def _custom_function(node) -> str | None:
    """The name of the user's own ``autograd.Function`` behind ``node``; None for any other
    node (torch's own Functions, such as backward hooks', and the package's)."""
    function = getattr(node, "_forward_cls", None)
    module = getattr(function, "__module__", "") or ""
    if function is None or module.split(".")[0] in ("torch", "pullback_widgets"):
        return None
    return f"custom autograd.Function {function.__name__}"


@dataclass(frozen=True)
class GraphAudit:
    """What the graph holds on the input's path: the nodes the input's gradient passes.

    ``gated_kinds``: the package's soft ops by kind ("relu", "pool", "norm", ...).
    ``plain_gate_ops``: gate-like ops that kept their plain backward, by name ("ELU", ...).
    ``softmaxes``: softmaxes with their plain backward (attention written by hand).
    """

    gated_kinds: dict[str, int]
    plain_gate_ops: dict[str, int]
    softmaxes: int
    # Per output, whether its gradient reaches the input at all.
    reach_input: tuple[bool, ...]


def gradient_node(tensor: Tensor) -> object:
    """The node ``tensor``'s gradient goes to (it requires grad): its ``grad_fn``, or a leaf's
    accumulator."""
    # A view made under no_grad (or of an inference tensor) has its edge only with grad on.
    with torch.inference_mode(False), torch.enable_grad():
        return get_gradient_edge(tensor).node


def _reaching(roots: Sequence[object], target: object) -> tuple[list, tuple[bool, ...]]:
    """The nodes of the graph behind the nodes ``roots`` (None: no node) from which
    ``target``, the leaf's node, is reached, and per root whether it is."""
    reaches: dict[int, bool] = {}
    nodes = []
    # Depth first, each node settled after its inputs (a DAG, so they are settled by then).
    # The graph holds its nodes while it lives, so their ids stay unique here. Written for
    # speed: one-shot pullbacks pay for it on every call.
    stack = [(root, False) for root in roots if root is not None]
    while stack:
        node, inputs_done = stack.pop()
        key = id(node)
        if inputs_done:
            reached = node is target
            for child, _ in node.next_functions:
                if child is not None and reaches[id(child)]:
                    reached = True
                    break
            reaches[key] = reached
        elif key not in reaches:
            reaches[key] = False  # a placeholder until its inputs are settled
            nodes.append(node)
            stack.append((node, True))
            for child, _ in node.next_functions:
                if child is not None and id(child) not in reaches:
                    stack.append((child, False))
    return ([node for node in nodes if reaches[id(node)]],
            tuple(root is not None and reaches[id(root)] for root in roots))


def audit_graph(outputs: Sequence[Tensor], leaf: Tensor,
                gated: Mapping[int, tuple[object, str]] = {},
                plain: Mapping[int, tuple] = {}) -> GraphAudit:
    """Audit the graph behind ``outputs`` on the path to ``leaf`` (the input, a leaf that
    requires grad). ``gated``: id of a soft op's node -> (the node, its kind); ``plain``: id of
    a node the interception saw and left plain -> (the node, the op's name), and for a mask's
    gate the nodes its mask compared; all as the interception marks them. Raises
    PullbackWidgetsError where the path runs compiled code (``torch.compile``, a scripted
    function's differentiable graph)."""
    gated_kinds: collections.Counter[str] = collections.Counter()
    plain_ops: collections.Counter[str] = collections.Counter()
    softmaxes = 0
    target = gradient_node(leaf)
    nodes, reach_input = _reaching([t.grad_fn for t in outputs], target)
    on_path = {id(node) for node in nodes}

    def from_the_path(entry: tuple) -> bool:
        """Whether a plain node the interception marked counts: a mask's gate only where its
        mask compared values on the input's path (they may feed the mask alone)."""
        sources = entry[2] if len(entry) > 2 else ()
        return not sources or any(id(source) in on_path for source in sources) \
            or any(_reaching(sources, target)[1])

    smooth_gates: dict[int, object] = {}
    for node in nodes:
        name = type(node).__name__
        compiled = _compiled_by(node) if name in _OPAQUE_TYPES else None
        if compiled:  # first: compiled code may carry a mark
            raise PullbackWidgetsError(COMPILED_IN_FORWARD.format(how=compiled))
        if id(node) in gated:
            gated_kinds[gated[id(node)][1]] += 1
        elif id(node) in plain:
            # None: inside an op counted by its output.
            if plain[id(node)][1] is not None and from_the_path(plain[id(node)]):
                plain_ops[plain[id(node)][1]] += 1
        elif name in PLAIN_GATE_NODES:
            plain_ops[PLAIN_GATE_NODES[name]] += 1
        elif name in _CLAMP_NODES:
            if _clamp_binds(node):
                plain_ops["clamp"] += 1
        elif name in ("SoftmaxBackward0", "SafeSoftmaxBackward0"):  # Safe: SDPA's math kernel
            softmaxes += 1
        elif name in _FAKE_QUANTIZE_NODES:
            if _fake_quantize_clips(node):
                plain_ops[FAKE_QUANTIZE] += 1
        elif name in ("MulBackward0", "DivBackward0"):
            smooth_gates.update((id(gate), gate) for gate in _smooth_gates_of(node, on_path))
        elif custom := _custom_function(node):
            plain_ops[custom] += 1
    if smooth_gates:  # each once, however many products use it
        plain_ops[SMOOTH_GATE] += len(smooth_gates)
    return GraphAudit(dict(gated_kinds), dict(plain_ops), softmaxes, reach_input)


def plain_gates_notice(found: Mapping[str, int]) -> str | None:
    """The notice for :attr:`GraphAudit.plain_gate_ops`; None when there are none."""
    if not found:
        return None
    ops = ", ".join(f"{name} ×{count}" for name, count in sorted(found.items()))
    return PLAIN_GATES.format(count=sum(found.values()), ops=ops)
