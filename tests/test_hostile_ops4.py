"""Hostile op forms, round 4: ReLUs, pools and gates written the ways users write them.

Each model is conv -> gated ReLU -> the op under test -> mean -> linear, in float64, and each
pullback is compared with a slow reference written here: the ReLU as z·sg(σ(z/T)) +
sg(relu(z) - z·σ(z/T)) (sg: detach), the op under test either by the README's soft rule or,
where the README leaves it plain, by autograd itself. The forward must be bit-identical and the
model untouched.

Before their fixes, these kept their plain backward with no notice naming them: GELU written
by hand with erf (``x * 0.5 * (1 + erf(x / √2))``, as BERT-era code writes it; ``erfc`` and
``torch.special.ndtr`` forms too), a sigmoid gate written with exp (``x / (1 + exp(-x))``),
LocalResponseNorm (``nn.LocalResponseNorm``, ``nn.CrossMapLRN2d``), LogSigmoid, ``abs_`` and
``sign_`` in place on a view, and fake quantization (``torch.ao.quantization.FakeQuantize``),
whose straight-through backward is zero where the quantization range clips a value.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pullback_widgets as pw
from pullback_widgets.graph_audit import SMOOTH_GATE
from tests.conftest import assert_untouched, model_snapshot

T = 0.5


def _frozen_relu(z: torch.Tensor, low: float = 0.0, high: float | None = None) -> torch.Tensor:
    """clamp(z, low, high) in value; gradient σ((z - low)/T)·σ((high - z)/T), the README's rule
    for ReLU, ReLU6 and hardtanh(low, high)."""
    gate = torch.sigmoid((z - low) / T)
    if high is not None:
        gate = gate * torch.sigmoid((high - z) / T)
    return z * gate.detach() + (torch.clamp(z, low, high) - z * gate).detach()


def _window_loop_pool(x: torch.Tensor, kernel: int, stride: int, padding: int = 0,
                      dilation: int = 1, ceil_mode: bool = False) -> torch.Tensor:
    """max_pool2d in value; gradient of Σ softmax(w/T)_j w_j per window (weights
    differentiated, the default rule), built one window at a time; padding takes no part."""
    hard = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    height, width = x.shape[-2:]
    rows = []
    for oy in range(hard.shape[-2]):
        row = []
        for ox in range(hard.shape[-1]):
            window = [x[:, :, y, xx]
                      for y in (oy * stride - padding + i * dilation for i in range(kernel))
                      for xx in (ox * stride - padding + j * dilation for j in range(kernel))
                      if 0 <= y < height and 0 <= xx < width]
            values = torch.stack(window, -1)
            row.append((torch.softmax(values / T, -1) * values).sum(-1))
        rows.append(torch.stack(row, -1))
    soft = torch.stack(rows, -2)
    return hard.detach() + soft - soft.detach()


class _ReluThen(nn.Module):
    """conv -> F.relu (gated) -> ``op`` -> spatial mean -> linear. ``op`` is kept out of the
    module tree, so that a reference can run the same net with another op."""

    def __init__(self, op, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.head = nn.Linear(channels, 3)
        self.__dict__["op"] = op

    def forward(self, x):
        h = self.op(F.relu(self.conv(x)) * 2.0 - 0.6)
        return self.head(h.flatten(2).mean(2))

    def reference(self, x: torch.Tensor, op, target: int) -> torch.Tensor:
        """The gradient of ``target`` with the ReLU frozen-gated and ``op`` in place of the
        net's op."""
        leaf = x.clone().requires_grad_()
        h = op(_frozen_relu(self.conv(leaf)) * 2.0 - 0.6)
        (grad,) = torch.autograd.grad(self.head(h.flatten(2).mean(2))[:, target].sum(), leaf)
        return grad


def _net(op, seed: int = 0) -> _ReluThen:
    torch.manual_seed(seed)
    return _ReluThen(op).double().eval()


def _image(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(2, 3, 9, 9, dtype=torch.float64)


def _session(model: nn.Module, x: torch.Tensor) -> tuple[pw.PullbackSession, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = pw.PullbackSession(model, x, temperature=T)
    return session, [str(w.message) for w in caught]


def _check_against(model: _ReluThen, reference_op, named: dict[str, int],
                   gated: dict[str, int]) -> None:
    """The session's pullback equals the reference, its forward the model's bit for bit, and
    the notices name exactly ``named``; the model is left as found."""
    x = _image()
    before = model_snapshot(model)
    session, caught = _session(model, x)
    assert torch.equal(session.logits, model(x))
    assert session.gated_kinds == gated
    assert session.plain_gate_ops == named
    for name in named:
        assert any(name in notice for notice in session.notices)
        assert any(name in message for message in caught)
    if not named:
        assert session.notices == ()
    expected = model.reference(x, reference_op, 1)
    torch.testing.assert_close(session.pullback(1), expected, rtol=1e-10, atol=1e-12)
    assert_untouched(model, before)


# ---------------------------------------------------------------- ops left plain, now named

def _gelu_erf(h):
    return h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))


def _gelu_erfc(h):
    return 0.5 * h * torch.erfc(-h / math.sqrt(2.0))


def _gelu_ndtr(h):
    return h * torch.special.ndtr(h)


def _silu_divided(h):
    return h / (1.0 + torch.exp(-h))


def _silu_reciprocal(h):
    return h * (1.0 / (1.0 + torch.exp(-h)))


def _silu_torch_reciprocal(h):
    return torch.reciprocal(1 + torch.exp(-1.5 * h)).mul(h)


@pytest.mark.parametrize("gate", [_gelu_erf, _gelu_erfc, _gelu_ndtr, _silu_divided,
                                  _silu_reciprocal, _silu_torch_reciprocal])
def test_gelu_and_silu_written_by_hand_with_erf_or_exp_are_named(gate):
    # The README names SiLU and GELU's tanh form written by hand ("sigmoid/tanh gate"); GELU's
    # erf form (BERT's gelu, HuggingFace's _gelu_python) and a sigmoid written with exp kept
    # their plain backward silently after a gated ReLU.
    _check_against(_net(gate), gate, {SMOOTH_GATE: 1}, {"relu": 1})


@pytest.mark.parametrize("smooth", [
    lambda h: torch.erf(h),  # alone: a smooth activation, as a sigmoid alone
    lambda h: torch.exp(h) * 0.5,  # times a number
    lambda h: torch.exp(h) / torch.exp(h).sum(1, keepdim=True),  # a softmax by hand: not a sigmoid
    lambda h: h / (h.square().mean(1, keepdim=True) + 1.0),  # a norm by hand, no exp
    # A learnt scale: its exp is off the input's path.
    lambda h: h / (1.0 + torch.exp(torch.ones((), dtype=h.dtype, requires_grad=True))),
])
def test_erf_and_exp_outside_a_gate_are_not_named_as_gates(smooth):
    session, _ = _session(_net(smooth), _image())
    assert SMOOTH_GATE not in session.plain_gate_ops


@pytest.mark.parametrize(("op", "named"), [
    (nn.LocalResponseNorm(3), "LocalResponseNorm"),
    (lambda h: F.local_response_norm(h, 2, alpha=0.5), "LocalResponseNorm"),
    (nn.CrossMapLRN2d(3, alpha=0.5), "LocalResponseNorm"),
    (nn.LogSigmoid(), "LogSigmoid"),
    (F.logsigmoid, "LogSigmoid"),
])
def test_local_response_norm_and_log_sigmoid_are_named(op, named):
    # LRN's statistics are the input's (as InstanceNorm's, which is named); LogSigmoid is
    # Softplus mirrored, -softplus(-z) (Softplus is named).
    _check_against(_net(op), op, {named: 1}, {"relu": 1})


def _in_place_on_a_slice(op):
    def apply(h):
        h = h * 1.0
        op(h[:, 1:3])
        return h
    return apply


@pytest.mark.parametrize(("op", "named"), [
    (lambda t: t.abs_(), "abs"),
    (torch.abs_, "abs"),
    (lambda t: t.sign_(), "sign"),
    (lambda t: t.sgn_(), "sign"),
])
def test_abs_and_sign_in_place_on_a_view_are_named(op, named):
    # Out of place, or in place on a whole tensor, their node names them; in place on a view,
    # autograd hides it inside the base's CopySlices node.
    forms = _in_place_on_a_slice(op)
    _check_against(_net(forms), forms, {named: 1}, {"relu": 1})


def _fake_quantize(scale: float):
    quantize = torch.ao.quantization.FakeQuantize(quant_min=0, quant_max=40)
    quantize.disable_observer()  # fixed scale: the forward changes no buffer
    quantize.scale.fill_(scale)
    return quantize


def test_fake_quantization_is_named_where_its_range_clips_a_value():
    # Its straight-through backward is zero outside [0, 40·scale]: a clamp there. A range wide
    # enough to clip nothing passes every gradient and is not named (as a clamp's).
    clipping = _fake_quantize(0.01)
    _check_against(_net(clipping), clipping, {"fake quantization (clamp)": 1}, {"relu": 1})
    wide = _fake_quantize(1.0)
    session, _ = _session(_net(lambda h: wide(h + 1.0)), _image())
    assert session.plain_gate_ops == {}


# ---------------------------------------------------------------- ops the engine gates

def _strided_slice_relu6(h):
    h = h * 3.0
    F.relu6(h[:, ::2], inplace=True)
    return h


def _strided_slice_relu6_reference(h):
    h = h * 3.0
    return torch.stack([_frozen_relu(h[:, c], 0.0, 6.0) if c % 2 == 0 else h[:, c]
                        for c in range(h.shape[1])], 1)


def _relu_on_a_view(h):
    h = h * 1.0
    F.relu_(h[:, 1:3].transpose(1, 2))
    return h


def _relu_on_a_view_reference(h):
    return torch.cat([h[:, :1], _frozen_relu(h[:, 1:3]), h[:, 3:]], 1)


GATED_FORMS = {  # name: (the model's op, the README's rule written here)
    "hardtanh(0.2, 0.8)": (lambda h: F.hardtanh(h, 0.2, 0.8),
                           lambda h: _frozen_relu(h, 0.2, 0.8)),
    "hardtanh(-0.8, -0.2)": (lambda h: F.hardtanh(h, -0.8, -0.2),
                             lambda h: _frozen_relu(h, -0.8, -0.2)),
    "hardtanh(0.1, 0.1)": (lambda h: F.hardtanh(h, 0.1, 0.1),
                           lambda h: _frozen_relu(h, 0.1, 0.1)),
    "nn.Hardtanh(0, 1), bounds by keyword": (
        nn.Hardtanh(min_val=0, max_val=1), lambda h: _frozen_relu(h, 0.0, 1.0)),
    "F.relu6 in place on a strided slice": (_strided_slice_relu6,
                                            _strided_slice_relu6_reference),
    "F.relu_ on a transposed slice": (_relu_on_a_view, _relu_on_a_view_reference),
    "max_pool2d, channels last, overlapping": (
        lambda h: F.max_pool2d(h.contiguous(memory_format=torch.channels_last), 3, 1, 1),
        lambda h: _window_loop_pool(h, 3, 1, 1)),
    "max_pool2d of a transposed view, ceil_mode": (
        lambda h: F.max_pool2d(h.transpose(2, 3), 3, 2, 1, ceil_mode=True),
        lambda h: _window_loop_pool(h.transpose(2, 3), 3, 2, 1, ceil_mode=True)),
    "nn.MaxPool2d(dilation=2, ceil_mode=True)": (
        nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True),
        lambda h: _window_loop_pool(h, 3, 2, 1, 2, True)),
    "max_pool2d by keyword, stride > kernel": (
        lambda h: F.max_pool2d(input=h, kernel_size=2, stride=3),
        lambda h: _window_loop_pool(h, 2, 3)),
}


@pytest.mark.parametrize("form", GATED_FORMS)
def test_gated_forms_follow_the_readme_rule(form):
    op, rule = GATED_FORMS[form]
    kind = "pool" if "pool" in form.lower() else "relu"
    gated = {"relu": 2} if kind == "relu" else {"relu": 1, "pool": 1}
    _check_against(_net(op), rule, {}, gated)


PLAIN_FORMS = {  # name: (the op, the name the notice gives it)
    "clamp_min(0)": (lambda h: h.clamp_min(0), "clamp"),
    "maximum with zeros": (lambda h: torch.maximum(h, torch.zeros_like(h)), "maximum/minimum"),
    "nn.Threshold": (nn.Threshold(0.0, 0.0), "threshold"),
    "where(h > 0, h, 0.01 h)": (lambda h: torch.where(h > 0, h, 0.01 * h),
                                "mask from a comparison (a ReLU written by hand)"),
    "CELU": (nn.CELU(), "CELU"),
    "Hardshrink": (nn.Hardshrink(0.3), "shrink"),
    "Softshrink": (nn.Softshrink(0.3), "shrink"),
    "RReLU in eval": (nn.RReLU().eval(), "RReLU"),
    "max_pool3d": (lambda h: F.max_pool3d(h[:, :, None], (1, 2, 2))[:, :, 0], "max-pool"),
    "adaptive_max_pool2d": (lambda h: F.adaptive_max_pool2d(h, 3), "adaptive max-pool"),
    "adaptive_max_pool1d": (lambda h: F.adaptive_max_pool1d(h.flatten(2), 5),
                            "adaptive max-pool"),
    "max-pool with indices, then unpooled": (
        lambda h: F.max_unpool2d(*nn.MaxPool2d(2, return_indices=True)(h), 2,
                                 output_size=h.shape[-2:]), "max-pool"),
}


@pytest.mark.parametrize("form", PLAIN_FORMS)
def test_plain_forms_keep_autograds_gradient_and_are_named(form):
    op, named = PLAIN_FORMS[form]
    _check_against(_net(op), op, {named: 1}, {"relu": 1})


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU6()
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.pool(self.act(self.conv(x) * 3.0))
        h = F.max_pool2d(F.relu(h - 0.5), 2, ceil_mode=True)
        return self.head(torch.flatten(h, 2).mean(2))


def test_an_fx_traced_model_pulls_back_as_the_eager_one_bit_for_bit():
    # A GraphModule's code calls the same functions and modules, which the mode catches.
    torch.manual_seed(0)
    eager, x = _Block().double().eval(), _image()
    traced = torch.fx.symbolic_trace(eager)
    before = model_snapshot(traced)
    expected = pw.excitation_pullback(eager, x, 1, temperature=T)
    session, caught = _session(traced, x)
    assert caught == [] and session.gated_kinds == {"relu": 2, "pool": 2}
    assert torch.equal(session.logits, eager(x))
    assert torch.equal(session.pullback(1), expected)
    assert_untouched(traced, before)
