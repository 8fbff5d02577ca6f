"""Hostile calls of the modern gates (SiLU, GELU, Hardswish, leaky, PReLU, LayerNorm,
GroupNorm): call forms, autocast and degenerate shapes, against the frozen-gate references of
tests/reference_modern.py or autograd's own gradient.

Before their fixes: ``Tensor.prelu`` kept its hard backward (only a notice named it); PReLU
under autocast crashed in the backward with ``gate="hard"`` and gated with the unrounded slope
otherwise; a 0-d PReLU input failed in the weight's gradient; ``F.group_norm`` raised an
IndexError for a 1-D input and in the soft backward of a batch of 0.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pullback_widgets as pw
from tests import reference_modern as ref
from tests.conftest import assert_untouched, model_snapshot


class _OneOp(nn.Module):
    """conv -> op -> mean -> linear, the op given as op(module, h)."""

    def __init__(self, op, channels: int = 4) -> None:
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.slope = nn.Parameter(torch.linspace(0.05, 0.4, channels))
        self.fc = nn.Linear(channels, 3)

    def forward(self, x):
        return self.fc(self.op(self, self.conv(x)).mean((2, 3)))


def _frozen_gradient(net: _OneOp, x: torch.Tensor, frozen_op, target: int = 1) -> torch.Tensor:
    leaf = x.clone().requires_grad_()
    logits = net.fc(frozen_op(net, net.conv(leaf)).mean((2, 3)))
    (grad,) = torch.autograd.grad(logits[:, target].sum(), leaf)
    return grad


def _quiet_session(net: nn.Module, x: torch.Tensor, **settings) -> pw.PullbackSession:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notices of ops left plain: checked by the caller
        return pw.PullbackSession(net, x, **settings)


def _silu_in_place_on_a_view(m, h):
    h = h * 1
    F.silu(h[:, :2], inplace=True)
    return h


T = 0.5
CALL_FORMS = {  # name: (the model's call, its frozen-gate reference at T)
    "Tensor.prelu": (lambda m, h: h.prelu(m.slope),
                     lambda m, h: ref.frozen_leaky(h, m.slope, T, "sigmoid")),
    "torch.prelu, one slope": (lambda m, h: torch.prelu(h, m.slope[:1]),
                               lambda m, h: ref.frozen_leaky(h, m.slope[:1], T, "sigmoid")),
    "F.silu in place on a view": (
        _silu_in_place_on_a_view,
        lambda m, h: torch.cat([ref.frozen_silu(h[:, :2], T), h[:, 2:]], 1)),
    "F.hardswish(inplace=True)": (lambda m, h: F.hardswish(h * 3, inplace=True),
                                  lambda m, h: ref.frozen_hardswish(h * 3, T)),
    "F.leaky_relu(h, slope, True), slope < 0": (
        lambda m, h: F.leaky_relu(h * 1, -0.5, True),
        lambda m, h: ref.frozen_leaky(h, -0.5, T, "sigmoid")),
    "F.leaky_relu, slope > 1": (lambda m, h: F.leaky_relu(h, negative_slope=2.5),
                                lambda m, h: ref.frozen_leaky(h, 2.5, T, "sigmoid")),
    "F.layer_norm over a torch.Size": (
        lambda m, h: F.layer_norm(h, h.shape[1:]),
        lambda m, h: ref.frozen_layer_norm(h, tuple(h.shape[1:]), None, None, 1e-5)),
    "F.group_norm on 5-D, groups == channels": (
        lambda m, h: F.group_norm(h[:, :, None], 4, bias=m.slope)[:, :, 0],
        lambda m, h: ref.frozen_group_norm(h[:, :, None], 4, None, m.slope, 1e-5)[:, :, 0]),
}


@pytest.mark.parametrize("form", list(CALL_FORMS))
def test_call_forms_match_the_frozen_gate_reference(form):
    op, frozen_op = CALL_FORMS[form]
    torch.manual_seed(0)
    net = _OneOp(op).double().eval()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    before = model_snapshot(net)
    session = _quiet_session(net, x, temperature=T)
    assert torch.equal(session.logits, net(x))
    assert session.plain_gate_ops == {}
    torch.testing.assert_close(session.pullback(1), _frozen_gradient(net, x, frozen_op),
                               rtol=1e-9, atol=1e-15)
    del session
    assert_untouched(net, before)


class _AutocastPReLU(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.PReLU(4, init=0.2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        with torch.autocast("cpu", dtype=self.dtype):
            return self.fc(self.act(self.conv(x)).mean((2, 3))).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prelu_under_autocast_pulls_back_as_the_op_ran(dtype):
    # Autocast runs prelu in the lower dtype, z and slope cast inside the call: the hard gate
    # is autograd's gradient bit for bit, and as T -> 0 the leaky gate reaches it too (the
    # unrounded float32 slope missed it by 1e-3).
    torch.manual_seed(0)
    net = _AutocastPReLU(dtype).eval()
    with torch.no_grad():
        net.act.weight.copy_(torch.tensor([0.1, 0.23, 0.3, 0.41]))  # not exact in bfloat16
    x = torch.rand(2, 3, 6, 6)
    leaf = x.clone().requires_grad_()
    (plain,) = torch.autograd.grad(net(leaf)[:, 1].sum(), leaf)
    assert torch.equal(pw.excitation_pullback(net, x, 1, gate="hard"), plain)
    assert torch.equal(pw.excitation_pullback(net, x, 1, temperature=1e-30), plain)


def test_prelu_of_a_0d_input_keeps_its_shape_and_the_weight_gets_its_plain_gradient():
    z = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([0.25], dtype=torch.float64, requires_grad=True)
    with pw.soft_gating(nn.Identity(), temperature=T):
        out = torch.prelu(z, weight)
    grad_z, grad_weight = torch.autograd.grad(out, (z, weight))
    (expected_z,) = torch.autograd.grad(ref.frozen_leaky(z, weight, T, "sigmoid").sum(), z)
    (plain_weight,) = torch.autograd.grad(torch.prelu(z, weight), weight)
    assert grad_z.shape == () and grad_weight.shape == (1,)
    torch.testing.assert_close(grad_z, expected_z)
    torch.testing.assert_close(grad_weight, plain_weight)


def test_group_norm_of_a_1d_input_gives_torch_own_error():
    z = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="at least 2 dimensions"):
        F.group_norm(z, 2)  # the control: torch's own message
    with pytest.raises(RuntimeError, match="at least 2 dimensions"), \
            pw.soft_gating(nn.Identity()):
        F.group_norm(z, 2)


@pytest.mark.parametrize("gate", ["sigmoid", "hard"])
def test_group_norm_of_an_empty_batch_pulls_back_like_autograd(gate):
    z = torch.randn(0, 4, 3, requires_grad=True)
    with pw.soft_gating(nn.Identity(), gate=gate):
        out = F.group_norm(z, 2)
    (grad,) = torch.autograd.grad(out, z, torch.ones_like(out))
    assert grad.shape == z.shape
