"""Model-zoo sweep: the engine's promises checked on many real timm and torchvision models.

    python benchmarks/zoo.py [--quick | --models NAME ...] [--grep TEXT] [--threads N]
                             [--timeout S] [--out benchmarks/results/zoo.md] [--list]

Every model (random weights, see ``zoo_models.py``; batch 2, target class 3) gets one row: ok,
refused (the package's own clear error: ``PullbackWidgetsError``, or a ValueError / TypeError
raised inside the package), FAIL (a promise broken, or a crash that is not a clear package
error), skipped (the model does not build or run at the small size), or timeout. The checks:

1. forward: ``PullbackSession(model, x).logits`` is ``torch.equal`` to the plain eval forward
   (a train-mode model, as constructed, is handed to the engine), also on a strided view;
2. the default pullback: finite, the input's shape; ``excitation_pullback`` and
   ``ExcitationPullback.attribute`` give the same tensor; ``gate="hard"`` is the plain gradient
   bit for bit; ``pullbacks`` equals its single pullbacks, looped and (to rounding) batched; a
   pullback repeated after other settings is unchanged; relative T is finite or refused;
3. T -> 0 (T = 1e-30, sigmoid): finite; where every gate on the path is ReLU-family or
   max-pool, the plain gradient, or else (tied pool maxima, documented) exactly the soft
   gates' T -> 0 limit with ties shared (``zoo_reference.tie_sharing_gradient``);
4. honesty: the plain forward's gates on the input's path (its autograd graph and its gate
   function calls: ReLU family, max-pool, SiLU, GELU, Hardswish, Layer/GroupNorm, attention and
   softmax, ELU-like) are each gated by the engine or named in its notices, and the notices
   are warned; normalisation statistics computed by hand are flagged (not failed);
5. float64, against the reference (``zoo_reference.py``, built from ``tests/reference*.py``):
   where it covers every gate the engine softens, the pullback matches it at the defaults,
   T = 0.5, T = 2 with the Φ gate, and with differentiated attention or detached pool weights
   where the model has them; one example alone gets its row of the batch's pullback;
6. the model is left exactly as found (tensors bit for bit, their identity and memory, flags,
   hooks, attributes, requires_grad, grads), and so is torch's global state.

Variants run the same checks on a model in channels_last, bfloat16, under autocast, frozen,
with the user's hooks, wrapped (torch.compile, DataParallel) or refused by design
(Module.compile, activation checkpointing).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import math
import platform
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torchvision
import zoo_reference as ref
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from zoo_models import QUICK, ModelSpec, enliven, find, parameter_count, seeded_input

import pullback_widgets as pw
from pullback_widgets.graph_audit import PLAIN_GATE_NODES

OUT = Path(__file__).parent / "results" / "zoo.md"
TARGET = 3
TINY_T = 1e-30
# float64 reference: engine and reference do the same arithmetic in another order, so they
# differ by rounding, ~1e-16 per op, grown by depth to 1e-13 in most of these models; a 1 %
# change of every T moves a pullback by 2e-5 to 5e-2 (the table's "1 % T" column). Some deep
# random nets amplify rounding far more: timm's efficientnetv2_rw_t's own float64 gradient
# moves by 6e-10 when its sums are reordered (channels last), and its reference match read
# 9.8e-10. 1e-8 sits well above that and three orders of magnitude below a 1 % change of T.
REFERENCE_TOLERANCE = 1e-8
# A model that computes in float32 inside its float64 copy (timm's EfficientViT casts q, k, v)
# rounds to float32 there, in the engine's and the reference's forwards alike.
NARROW_TOLERANCE = 1e-5
REFERENCE_FORWARD_TOLERANCE = 1e-10
# T -> 0 against the plain float32 gradient: the gates are exactly 0 or 1 there, so what is
# left is the pool backward's summation order (~1e-7 relative).
TINY_T_TOLERANCE = 1e-5
# Below this the soft pullback is the plain gradient, and a reference match proves nothing.
VOID_BELOW = 1e-6


@dataclass(frozen=True)
class Setting:
    """One comparison with the reference: a temperature (None: the per-kind defaults), a gate
    and an attention rule."""

    label: str
    temperature: float | None
    gate: str = "sigmoid"
    attention_weights: str = "detached"
    pool_weights: str = "differentiated"

    def engine_arguments(self) -> dict:
        return dict(temperature=self.temperature, gate=self.gate,
                    attention_weights=self.attention_weights, pool_weights=self.pool_weights)


SETTINGS = (Setting("defaults", None), Setting("T=0.5", 0.5),
            Setting("T=2 Φ", 2.0, "normal_cdf"))
# Only where the engine gated such an op.
KIND_SETTINGS = {
    "attention": Setting("attention differentiated", None, attention_weights="differentiated"),
    "pool": Setting("T=0.5, pool weights detached", 0.5, pool_weights="detached"),
}

# The engine's names for the plain ops it reports (graph_audit), by the census's kinds.
NAMED_KINDS = {
    **dict.fromkeys(("ReLU", "ReLU6/hardtanh", "threshold", "leaky ReLU", "PReLU", "RReLU"),
                    "relu"),
    "max-pool": "pool", "SiLU": "silu", "GELU": "gelu", "Hardswish": "hardswish",
    "LayerNorm": "norm", "GroupNorm": "norm", "attention": "attention",
    **dict.fromkeys(("ELU/SELU", "CELU", "Mish", "Softplus", "Hardsigmoid", "GLU"), "other"),
}


@dataclass
class Row:
    """One model's results; ``failures`` are broken promises (any makes the row FAIL)."""

    name: str
    size: int
    note: str = ""
    params: int = 0
    status: str = "ok"
    message: str = ""
    gated: dict[str, int] = field(default_factory=dict)
    plain: dict[str, int] = field(default_factory=dict)
    plain_attention: int = 0
    reference: str = ""
    tiny_t: str = ""
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Honesty questions short of a failure: gate-like ops the engine cannot be expected to see.
    flags: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failures.append(message)


class Timeout(Exception):
    pass


# ---------------------------------------------------------------- the model as found

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called",
                 "_global_module_registration_hooks", "_global_parameter_registration_hooks",
                 "_global_buffer_registration_hooks")


@dataclass
class Snapshot:
    """Everything a model could be left changed in, as comparable values."""

    tensors: dict[str, Tensor]
    identities: dict[str, tuple[int, int]]
    per_module: list[tuple]
    per_parameter: list[tuple]

    @staticmethod
    def of(model: nn.Module) -> Snapshot:
        named = [*model.named_parameters(remove_duplicate=False),
                 *model.named_buffers(remove_duplicate=False)]
        return Snapshot(
            tensors={name: t.detach().clone() for name, t in named},
            identities={name: (id(t), t.data_ptr()) for name, t in named},
            per_module=[(name, type(m).__name__, m.training, sorted(vars(m)),
                         tuple(len(getattr(m, d, {}) or {}) for d in _HOOK_DICTS))
                        for name, m in model.named_modules(remove_duplicate=False)],
            per_parameter=[(name, p.requires_grad, p.grad is None,
                            len(p._backward_hooks or {}),
                            len(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
                           for name, p in model.named_parameters(remove_duplicate=False)])

    def differences(self, model: nn.Module) -> list[str]:
        now = Snapshot.of(model)
        found = []
        if now.tensors.keys() != self.tensors.keys():
            found.append("parameter/buffer names changed")
        changed = [n for n, t in self.tensors.items() if n in now.tensors and not (
            t.dtype == now.tensors[n].dtype and t.shape == now.tensors[n].shape
            and torch.equal(t, now.tensors[n]))]
        if changed:
            found.append(f"{len(changed)} tensor(s) changed, e.g. {changed[0]}")
        moved = [n for n, i in self.identities.items() if now.identities.get(n) != i]
        if moved:
            found.append(f"{len(moved)} tensor(s) replaced or moved, e.g. {moved[0]}")
        for before, after in zip(self.per_module, now.per_module):
            if before != after:
                found.append(f"module {before[0] or '(root)'} changed: {_diff(before, after)}")
                break
        if len(self.per_module) != len(now.per_module):
            found.append("modules added or removed")
        for before, after in zip(self.per_parameter, now.per_parameter):
            if before != after:
                found.append(f"parameter {before[0]} changed (requires_grad, grad, hooks): "
                             f"{before[1:]} -> {after[1:]}")
                break
        return found


def _diff(before: tuple, after: tuple) -> str:
    fields = ("name", "type", "training", "attributes", "hooks")
    return ", ".join(f"{f} {a!r} -> {b!r}" if f != "attributes" else
                     f"attributes +{sorted(set(b) - set(a))} -{sorted(set(a) - set(b))}"
                     for f, a, b in zip(fields, before, after) if a != b)


def global_state_problems() -> list[str]:
    """What a package call could leave switched on for everyone after it returns."""
    problems = []
    if not torch.is_grad_enabled():
        problems.append("grad mode left off")
    if torch.is_inference_mode_enabled():
        problems.append("inference mode left on")
    if torch.overrides._get_current_function_mode_stack():
        problems.append("a TorchFunctionMode left active")
    module_hooks = torch.nn.modules.module
    left = [name for name in _GLOBAL_HOOKS if getattr(module_hooks, name, None)]
    if left:
        problems.append(f"global module hooks left: {left}")
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is not None and top(False) is not None:
        problems.append("saved-tensor hooks left active")
    return problems


@contextlib.contextmanager
def flags_restored(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def plain_run(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(logits (B, K), the plain input gradient of ``logits[:, TARGET].sum()``, like x) of
    the model's own eval-mode forward; its training flags are put back after."""
    with flags_restored(model):
        model.eval()
        leaf = x.detach().clone().requires_grad_()
        logits = model(leaf)
        (grad,) = torch.autograd.grad(logits[:, TARGET].sum(), leaf)
    return logits.detach(), grad


# ---------------------------------------------------------------- comparisons

def relative_error(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (inf where expected is 0 and actual
    is not, NaN where either holds NaN)."""
    a, e = actual.double(), expected.double()
    scale = float(e.norm())
    difference = float((a - e).norm())
    if math.isnan(scale) or math.isnan(difference):
        return math.nan
    return difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf)


def engine_accounts(session: pw.PullbackSession) -> collections.Counter:
    """Per census kind, the ops the engine gated or named plain on the input's path."""
    counts: collections.Counter = collections.Counter(session.gated_kinds)
    for name, count in session.plain_gate_ops.items():
        counts[NAMED_KINDS.get(name, name)] += count
    counts["softmax"] += session.plain_attention
    return counts


def honesty(row: Row, census: collections.Counter, session: pw.PullbackSession) -> None:
    """Fail the row where the plain graph holds a gate the engine neither gated nor named.
    Attention may run as one fused node or as a softmax (backends differ): counted together."""
    accounted = engine_accounts(session)
    accounted["attention"] += accounted.pop("softmax", 0)
    named_norms = sum(session.plain_gate_ops.get(name, 0) for name in
                      ("RMSNorm", "InstanceNorm", "BatchNorm with batch statistics",
                       PLAIN_GATE_NODES["RsqrtBackward0"]))
    if census["statistics"] > named_norms:
        row.flags.append(f"normalisation statistics computed by hand on the input's path "
                         f"(rsqrt/var/std ×{census['statistics'] - named_norms}): plain, "
                         "not named")
    kinds = [k for k in ref.KINDS if k not in ("softmax", "statistics")]
    merged = {k: census[k] for k in kinds}
    engine = {k: accounted[k] for k in kinds}
    missing = {k: merged[k] - engine[k] for k in merged if merged[k] > engine[k]}
    extra = {k: engine[k] - merged[k] for k in merged if engine[k] > merged[k]}
    if missing:
        row.fail("honesty: gates on the input's path neither gated nor named: "
                 + _counts(missing))
    if extra:
        row.notes.append("engine counts more gates than the plain graph shows: "
                         + _counts(extra))


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v) or "none"


# ---------------------------------------------------------------- the engine checks

def engine_checks(row: Row, model: nn.Module, x: Tensor, plain_logits: Tensor,
                  plain_grad: Tensor) -> pw.PullbackSession:
    """Checks 1-4 on ``model`` (possibly a compiled wrapper) at ``x``; returns the session."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = pw.PullbackSession(model, x)
        oneshot = pw.excitation_pullback(model, x, TARGET)
    warned = {str(w.message) for w in caught}
    row.notes += sorted({message.split(":")[0][:90] for message in warned
                         if "torch.compile'd" in message})
    row.gated, row.plain = dict(session.gated_kinds), dict(session.plain_gate_ops)
    row.plain_attention = session.plain_attention
    notices_check(row, session, warned)
    if not torch.equal(session.logits, plain_logits):
        row.fail(f"forward differs from the plain model: max |Δ| "
                 f"{float((session.logits - plain_logits).abs().max()):.3g}")
    pullback = session.pullback(TARGET)
    if pullback.shape != x.shape or not bool(pullback.isfinite().all()):
        row.fail(f"default pullback not finite or shaped {tuple(pullback.shape)}")
    if not torch.equal(oneshot, pullback):
        row.fail(f"excitation_pullback differs from the session's pullback: rel "
                 f"{relative_error(oneshot, pullback):.3g}")
    hard = session.pullback(TARGET, gate="hard")
    if not torch.equal(hard, plain_grad):
        row.fail(f"gate='hard' is not the plain gradient bit for bit: rel "
                 f"{relative_error(hard, plain_grad):.3g}")
    tiny_t_check(row, session, plain_grad)
    both = session.pullbacks([TARGET, 5])
    if not (torch.equal(both[0], pullback) and torch.equal(both[1], session.pullback(5))):
        row.fail("pullbacks([3, 5]) differs from the single pullbacks")
    attempt(row, "batched pullbacks", lambda: batched_check(row, session, both))
    attempt(row, "relative temperature", lambda: relative_check(row, session))
    attempt(row, "Captum-style attribute", lambda: captum_check(row, model, x, pullback))
    attempt(row, "strided input view", lambda: strided_check(row, model, x))
    if not torch.equal(session.pullback(TARGET), pullback):
        row.fail("the default pullback changed after pullbacks at other settings")
    return session


def notices_check(row: Row, session: pw.PullbackSession, warned: set[str]) -> None:
    """The notices name every plain op the session counts, and the session warned them."""
    text = " ".join(session.notices)
    unnamed = [name for name in session.plain_gate_ops if name not in text]
    if session.plain_attention and "softmax" not in text:
        unnamed.append("softmax")
    if session.gated_calls == 0 and "gated no op" not in text:
        unnamed.append("'no op gated'")
    if unnamed:
        row.fail(f"notices do not say: {', '.join(unnamed)}")
    if not set(session.notices) <= warned:
        row.fail("a notice was not warned")


def attempt(row: Row, label: str, check_fn) -> None:
    """Run a secondary check: a package refusal is a note, a crash a failure."""
    try:
        check_fn()
    except Timeout:
        raise
    except Exception as error:
        if _is_package_refusal(error):
            row.notes.append(f"{label} refused: {_one_line(error)[:160]}")
        else:
            row.fail(f"{label} crash: {_one_line(error)} (at {_where(error)})")


def batched_check(row: Row, session: pw.PullbackSession, looped: Tensor) -> None:
    """``pullbacks(batched=True)`` (one vmapped backward, the default on accelerators) against
    the loop: the same to rounding."""
    batched = session.pullbacks([TARGET, 5], batched=True)
    error = relative_error(batched, looped)
    if error > _rounding(looped.dtype):
        row.fail(f"batched pullbacks differ from looped ones: rel {error:.3g}")


def captum_check(row: Row, model: nn.Module, x: Tensor, pullback: Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attribution = pw.ExcitationPullback(model).attribute(x, target=TARGET)
    if not torch.equal(attribution, pullback):
        row.fail(f"ExcitationPullback.attribute differs from the session's pullback: rel "
                 f"{relative_error(attribution, pullback):.3g}")


def alone_check(row: Row, model: nn.Module, x: Tensor, pullback: Tensor,
                plain_grad: Tensor, tolerance: float = REFERENCE_TOLERANCE) -> None:
    """The first example's pullback on its own equals its row of the batch's (float64, to
    rounding): no example leaks into another's gates. Skipped where the model's own gradient
    depends on the other examples; where only torch's plain one does (its CPU batch-norm
    backward for one channels-last example), the engine's ``gate="hard"`` must not."""
    _, plain_alone = plain_run(model, x[:1])
    mixed = relative_error(plain_alone, plain_grad[:1])
    if mixed > tolerance:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hard_alone = pw.excitation_pullback(model, x[:1], TARGET, gate="hard")
        if relative_error(hard_alone, plain_grad[:1]) > tolerance:
            row.notes.append(f"the model's own gradient depends on the other examples of the "
                             f"batch (rel {mixed:.0e}): batch check skipped")
            return
        row.notes.append(f"torch's gradient of one example alone is off its row of the "
                         f"batch's (rel {mixed:.0e}); the engine's gate='hard' is not")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = pw.excitation_pullback(model, x[:1], TARGET)
    error = relative_error(alone, pullback[:1])
    if error > tolerance:
        row.fail(f"an example's pullback depends on the other examples: rel {error:.3g}")


def strided_check(row: Row, model: nn.Module, x: Tensor) -> None:
    """A strided view as input (every other pixel of a larger picture): the session's logits
    are the model's own on that very view, bit for bit."""
    generator = torch.Generator().manual_seed(2)
    big = torch.rand(x.shape[0], 3, 2 * x.shape[2], 2 * x.shape[3], generator=generator)
    view = big.to(x.dtype)[:, :, ::2, ::2]
    eager = model._orig_mod if hasattr(model, "_orig_mod") else model
    plain_logits, _ = plain_run(eager, view)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = pw.PullbackSession(model, view)
    if not torch.equal(session.logits, plain_logits):
        row.fail("forward on a strided input view differs from the plain model's")
    if not bool(session.pullback(TARGET).isfinite().all()):
        row.fail("pullback on a strided input view is not finite")


def relative_check(row: Row, session: pw.PullbackSession) -> None:
    pullback = session.pullback(TARGET, temperature_mode="relative")
    if not bool(pullback.isfinite().all()):
        row.fail("temperature_mode='relative' gives a non-finite pullback")


def _rounding(dtype: torch.dtype) -> float:
    """A relative tolerance for two summation orders of one gradient computed in ``dtype``
    (or in autocast's dtype, where autocast is on)."""
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    return max(TINY_T_TOLERANCE, 2 * torch.finfo(dtype).eps)


def tiny_t_check(row: Row, session: pw.PullbackSession, plain_grad: Tensor) -> None:
    pullback = session.pullback(TARGET, temperature=TINY_T, gate="sigmoid")
    if not bool(pullback.isfinite().all()):
        row.fail("T=1e-30 gives a non-finite pullback")
        row.tiny_t = "non-finite"
        return
    others = sorted(set(session.gated_kinds) - {"relu", "pool"})
    if others:
        row.tiny_t = f"finite; n/a ({', '.join(others)})"
        return
    error = relative_error(pullback, plain_grad)
    row.tiny_t = f"{error:.1e}"
    tolerance = _rounding(plain_grad.dtype)
    if error <= tolerance:
        return
    # Tied pool maxima share their window's gradient as T -> 0 (the plain gradient gives it
    # all to the first), and a kink gets 1/2: documented. Anything else is a failure.
    try:
        limit = ref.tie_sharing_gradient(session.model, session.inputs, TARGET)
    except Exception as failure:  # the oracle's, not the engine's
        row.fail(f"T=1e-30 is not the plain gradient (rel {error:.3g}); the ties-shared "
                 f"limit could not be computed ({_one_line(failure)})")
        return
    from_limit = relative_error(pullback, limit)
    row.tiny_t = f"{error:.1e} from plain, {from_limit:.0e} from the ties-shared limit"
    if from_limit > tolerance:
        row.fail(f"T=1e-30 is neither the plain gradient (rel {error:.3g}) nor its "
                 f"ties-shared limit (rel {from_limit:.3g})")


# ---------------------------------------------------------------- the float64 reference

def reference_checks(row: Row, eager: nn.Module, x: Tensor) -> None:
    """Check 5 in float64 on a copy; fills ``row.reference``."""
    x = x.double()
    try:
        model = copy.deepcopy(eager).double()
        plain_logits, plain_grad = plain_run(model, x)
    except Exception as error:  # the model's own limitation, not the engine's
        row.reference = f"n/a: the model does not run in float64 ({_one_line(error)})"
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = pw.PullbackSession(model, x)
    if not torch.equal(session.logits, plain_logits):
        row.fail("float64 forward differs from the plain model")
    narrower = _narrower_inside(model, x)
    tolerance = REFERENCE_TOLERANCE if narrower is None else NARROW_TOLERANCE
    if narrower is not None:
        row.notes.append(f"computes in {narrower} inside its float64 copy: reference "
                         f"tolerance {tolerance:g}")
    attempt(row, "one example alone", lambda: alone_check(
        row, model, x, session.pullback(TARGET), plain_grad, tolerance))
    _clear_bias_caches(model)
    reasons = []
    for swap_modules in (True, False):
        try:
            expected, logits, census = ref.reference_run(model, x, TARGET, None,
                                                         swap_modules=swap_modules)
        except Exception as error:
            reasons.append(f"it cannot run ({_one_line(error)[:120]})")
            continue
        if not bool(expected.isfinite().all()):
            reasons.append("its pullback is not finite")
            continue
        error = relative_error(logits, plain_logits)
        if error > REFERENCE_FORWARD_TOLERANCE:
            reasons.append(f"its forward differs from the model's (rel {error:.0e})")
            continue
        uncovered = _uncovered(census, session)
        if uncovered:
            reasons.append(f"it leaves hard what the engine softens: {_counts(uncovered)}")
            continue
        compare_with_reference(row, session, model, x, expected, plain_grad, swap_modules,
                               tolerance)
        if not swap_modules:
            row.reference += f" (functional forms only: with module swaps {reasons[0]})"
        return
    row.reference = "n/a: " + "; without module swaps ".join(dict.fromkeys(reasons))


class _NarrowerDtypes(TorchFunctionMode):
    """Notes the floating dtypes below float64 of the outputs that need a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, Tensor) and out.requires_grad and out.is_floating_point() \
                and out.dtype != torch.float64:
            self.seen.add(out.dtype)
        return out


def _narrower_inside(model: nn.Module, x: Tensor) -> str | None:
    """Whether ``model`` (a float64 copy) computes on the input's path in a narrower float
    dtype inside, and which (None: it does not)."""
    with flags_restored(model):
        model.eval()
        with _NarrowerDtypes() as watch:
            model(x.detach().clone().requires_grad_())
    return ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in watch.seen)) or None


def _clear_bias_caches(model: nn.Module) -> None:
    """Empty the attention-bias caches of timm's LeViT-like models (on our float64 copy): an
    eval forward fills them with tensors of its graph, which ``deepcopy`` refuses to copy."""
    for module in model.modules():
        cache = getattr(module, "attention_bias_cache", None)
        if isinstance(cache, dict):
            cache.clear()


def _uncovered(census: collections.Counter, session: pw.PullbackSession) -> dict[str, int]:
    """Hard gates the reference left on its path beyond those the engine leaves plain too
    (named in its notices), by kind; the ELU-like "other" kind and statistics by hand are plain
    in both by design."""
    left_plain: collections.Counter = collections.Counter()
    for name, count in session.plain_gate_ops.items():
        left_plain[NAMED_KINDS.get(name, name)] += count
    left_plain["softmax"] += session.plain_attention
    return {k: census[k] - left_plain[k] for k in census
            if k not in ("other", "statistics") and census[k] > left_plain[k]}


def compare_with_reference(row: Row, session: pw.PullbackSession, model: nn.Module, x: Tensor,
                           expected_at_defaults: Tensor, plain_grad: Tensor,
                           swap_modules: bool, tolerance: float = REFERENCE_TOLERANCE) -> None:
    settings = SETTINGS + tuple(s for kind, s in KIND_SETTINGS.items()
                                if session.gated_kinds.get(kind))
    worst, worst_label = 0.0, ""
    for setting in settings:
        if setting.label == "defaults":
            expected = expected_at_defaults
        else:
            expected, _, _ = ref.reference_run(
                model, x, TARGET, setting.temperature, setting.gate,
                setting.attention_weights, setting.pool_weights, swap_modules)
        actual = session.pullback(TARGET, **setting.engine_arguments())
        error = relative_error(actual, expected)
        if error >= worst:
            worst, worst_label = error, setting.label
        if not error <= tolerance:
            row.fail(f"pullback differs from the float64 reference at {setting.label}: "
                     f"rel {error:.3g}")
    defaults = session.settings.defaults
    at_defaults = session.pullback(TARGET)
    nudged = session.pullback(TARGET, temperature={k: 1.01 * t for k, t in defaults.items()})
    sensitivity = relative_error(nudged, at_defaults)
    soft_vs_plain = relative_error(expected_at_defaults, plain_grad)
    row.reference = f"{worst:.1e} ({worst_label}); 1 % T moves {sensitivity:.0e}"
    if soft_vs_plain < VOID_BELOW:
        row.reference += f"; void: pullback ≈ plain gradient ({soft_vs_plain:.0e})"


# ---------------------------------------------------------------- one model

def laid_out(spec: ModelSpec, model: nn.Module, x: Tensor) -> tuple[nn.Module, Tensor]:
    """(model, x) in the variant's memory layout."""
    if spec.variant == "channels_last":
        return model.to(memory_format=torch.channels_last), \
            x.contiguous(memory_format=torch.channels_last)
    if spec.variant == "bfloat16":
        return model.to(torch.bfloat16), x.to(torch.bfloat16)
    if spec.variant == "frozen":
        model.requires_grad_(False)
    if spec.variant == "user hooks":
        model.layer2.register_forward_hook(lambda module, args, out: out * 1.5)
        model.layer3.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    if spec.variant == "grad checkpointing":
        model.set_grad_checkpointing(True)
    return model, x


def wrapped(spec: ModelSpec, model: nn.Module) -> nn.Module:
    """The model as the variant hands it to the engine. Compiling is lazy, and the engine
    unwraps or refuses before any compiled code runs."""
    if spec.variant == "torch.compile":
        return torch.compile(model, backend="eager")
    if spec.variant == "Module.compile":
        model.compile(backend="eager")
    if spec.variant == "DataParallel":
        return nn.DataParallel(model)
    return model


def _is_package_refusal(error: BaseException) -> bool:
    """The package's own error, or a ValueError / TypeError raised in its code."""
    if isinstance(error, (pw.PullbackWidgetsError, pw.PullbackWidgetsTypeError)):
        return True
    if not isinstance(error, (ValueError, TypeError)):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "pullback_widgets" in Path(frames[-1].filename).parts


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:220]}"


def _where(error: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if "pullback_widgets" in Path(f.filename).parts]
    frame = frames[-1] if frames else traceback.extract_tb(error.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"


def check(spec: ModelSpec, timeout: float = 300.0) -> Row:
    """One model's row; never raises (but KeyboardInterrupt)."""
    row = Row(spec.name, spec.size, spec.note)
    start = time.perf_counter()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if spec.variant == "autocast" \
        else contextlib.nullcontext()
    try:
        with _time_limit(timeout), autocast:
            _check(spec, row)
    except Timeout:
        row.status, row.message = "timeout", f"over {timeout:.0f} s"
    row.seconds = time.perf_counter() - start
    if row.status == "ok" and row.failures:
        row.status = "FAIL"
    return row


def _check(spec: ModelSpec, row: Row) -> None:
    try:
        torch.manual_seed(0)
        model = enliven(spec.build())
        row.params = parameter_count(model)
        eager, x = laid_out(spec, model, seeded_input(spec))
        plain_logits, plain_grad = plain_run(eager, x)
    except Timeout:
        raise
    except Exception as error:
        row.status, row.message = "skipped", f"does not run at {spec.size} px: " \
                                             f"{_one_line(error)}"
        return
    try:
        census = _plain_census(eager, x)
    except Exception as error:  # the oracle's failure, not the engine's
        census = None
        row.notes.append(f"honesty not checked: the census failed ({_one_line(error)})")
    engine_model = wrapped(spec, eager)
    before = Snapshot.of(eager)
    try:
        session = engine_checks(row, engine_model, x, plain_logits, plain_grad)
        if census is not None:
            honesty(row, census, session)
        del session
        reference_checks(row, eager, x)
    except Timeout:
        raise
    except Exception as error:
        if _is_package_refusal(error):
            row.status, row.message = "refused", _one_line(error)
        else:
            row.status = "FAIL"
            row.message = f"crash: {_one_line(error)} (at {_where(error)})"
    for problem in before.differences(eager) + global_state_problems():
        row.fail(f"left changed: {problem}")


def _plain_census(model: nn.Module, x: Tensor) -> collections.Counter:
    """The plain forward's gates on the input's path, by kind: the larger count of the graph
    census and the call census (see zoo_reference), attention and softmax counted together."""
    with flags_restored(model):
        model.eval()
        leaf = x.detach().clone().requires_grad_()
        nodes = ref.gate_census(model(leaf), leaf)
    calls = ref.call_census(model, x)
    for census in (nodes, calls):
        census["attention"] += census.pop("softmax", 0)
    return collections.Counter({k: max(nodes[k], calls[k]) for k in set(nodes) | set(calls)})


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Timeout` in this (main) thread after ``seconds``; none elsewhere."""
    def expire(signum, frame):
        raise Timeout()
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sweep(specs: list[ModelSpec], timeout: float = 300.0, echo: bool = True) -> list[Row]:
    rows = []
    for spec in specs:
        row = check(spec, timeout)
        rows.append(row)
        if echo:
            detail = "; ".join(row.failures) or row.message
            print(f"{row.status:8s} {row.name:45s} {row.seconds:6.1f}s  {detail}"[:300],
                  flush=True)
    return rows


# ---------------------------------------------------------------- the report

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _plain_cell(row: Row) -> str:
    parts = [f"{name} ×{count}" for name, count in sorted(row.plain.items())]
    if row.plain_attention:
        parts.append(f"softmax by hand ×{row.plain_attention}")
    return ", ".join(parts) or "—"


def render(rows: list[Row], seconds: float, command: str, threads: int) -> str:
    """The Markdown report: summary, how to re-run, what is not ok, then every row."""
    lines = _header(rows, seconds, command, threads) + _problems(rows) + _table(rows)
    return "\n".join(lines) + "\n"


def _header(rows: list[Row], seconds: float, command: str, threads: int) -> list[str]:
    counts = collections.Counter(row.status for row in rows)
    order = ("ok", "refused", "FAIL", "skipped", "timeout")
    summary = ", ".join(f"**{counts[s]} {s}**" for s in order if counts[s])
    flagged = sum(bool(r.flags) for r in rows)
    if flagged:
        summary += f"; {flagged} ok row(s) with an honesty flag"
    lines = [
        "# Model-zoo sweep",
        "",
        f"{len(rows)} models: {summary}. Sweep time {seconds / 60:.1f} min on "
        f"{threads} torch thread(s), CPU; torch {torch.__version__}, timm {timm.__version__}, "
        f"torchvision {torchvision.__version__}, Python {platform.python_version()}.",
        "",
        f"Re-run: `{command}` (all models), `python benchmarks/zoo.py --quick` (5 fast ones), "
        "`python benchmarks/zoo.py --models torchvision/resnet18 timm/convnext_atto` (some; a "
        "partial run prints its rows, and writes a report only with `--out FILE`); the checks "
        "are described in `benchmarks/zoo.py`'s docstring.",
        "",
        "Random weights (parameters that initialisation left constant, such as zero heads "
        "and 1e-6 layer scales, spread out: `zoo_models.enliven`), batch 2, inputs uniform in "
        "[0, 1), target class 3. *Gated*: `session.gated_kinds`. *Plain, named*: "
        "`session.plain_gate_ops` and `session.plain_attention`, the ops the notices say kept "
        "a hard backward. *vs reference*: the largest relative L2 error of the pullback "
        "against the float64 frozen-gate reference over the settings compared (defaults, "
        "T=0.5, T=2 with Φ, and differentiated attention or detached pool weights where the "
        f"model has them; tolerance {REFERENCE_TOLERANCE:g}), and how far a 1 % change of "
        "every T moves the pullback, for scale; \"functional forms only\" where the "
        "reference's module swaps do not fit the model. *T → 0*: the relative error of the "
        f"pullback at T={TINY_T:g} against the plain gradient (tolerance "
        f"{TINY_T_TOLERANCE:g} in float32), where only ReLU-family and pool gates are on the "
        "path; where they differ, also against the soft gates' T → 0 limit with tied pool "
        "maxima sharing their window's gradient (the documented exception).",
        "",
    ]
    return lines


def _problems(rows: list[Row]) -> list[str]:
    lines = []
    problems = [r for r in rows if r.status != "ok"]
    if problems:
        lines += ["## Not ok", ""]
        lines += [f"- **{r.status}** {r.name}: {'; '.join(r.failures) or r.message}"
                  for r in problems]
        lines.append("")
    flagged = [r for r in rows if r.flags]
    if flagged:
        lines += ["## Honesty flags (ok rows: ops the engine does not claim to see)", ""]
        lines += [f"- {r.name}: {'; '.join(r.flags)}" for r in flagged]
        lines.append("")
    return lines


def _table(rows: list[Row]) -> list[str]:
    lines = [
        "## All models",
        "",
        "| model | params | input | status | gated | plain, named | vs reference | T → 0 "
        "| time (s) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gated = ", ".join(f"{k} {v}" for k, v in sorted(r.gated.items())) or "—"
        notes = "; ".join(filter(None, [r.note, r.message, *r.failures,
                                        *(f"flag: {f}" for f in r.flags), *r.notes]))
        lines.append("| " + " | ".join(_cell(c) for c in (
            r.name, f"{r.params / 1e6:.2f} M" if r.params else "—", f"{r.size} px",
            r.status, gated, _plain_cell(r), r.reference or "—", r.tiny_t or "—",
            f"{r.seconds:.1f}", notes or "")) + " |")
    return lines


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="model names as listed by --list (or their unique endings)")
    parser.add_argument("--grep", metavar="TEXT",
                        help="only the models whose name contains TEXT")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the report (default: {OUT.relative_to(OUT.parents[2])} for the "
                             "full sweep, none for a partial one)")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    args = parser.parse_args(argv)
    from zoo_models import ALL
    if args.list:
        for spec in ALL:
            print(f"{spec.name:50s} {spec.size:4d} px  {spec.note}")
        return []
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = find(list(QUICK)) if args.quick else find(args.models) if args.models \
        else list(ALL)
    if args.grep:
        specs = [spec for spec in specs if args.grep in spec.name]
    start = time.perf_counter()
    rows = sweep(specs, args.timeout)
    elapsed = time.perf_counter() - start
    command = "python benchmarks/zoo.py" + (f" --threads {args.threads}" if args.threads else "")
    text = render(rows, elapsed, command, torch.get_num_threads())
    partial = args.quick or args.models or args.grep
    out = args.out or (None if partial else OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    counts = collections.Counter(row.status for row in rows)
    print(f"\n{dict(counts)} in {elapsed / 60:.1f} min" + (f" -> {out}" if out else ""))
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(row.status == "FAIL" for row in main()) else 0)
