"""What the model-zoo sweep (benchmarks/zoo.py) found: plain ops in place on a view, norms
written by hand, and torch's batch-norm backward for one channels-last example."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pullback_widgets as pw
from tests.conftest import plain_gradient


class _OnAView(nn.Module):
    """conv -> permute (a view) -> ``op`` (in place) -> head."""

    def __init__(self, op) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.op = op
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.op(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2)))


def _session(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pw.PullbackSession(model, x)


@pytest.mark.parametrize(("op", "named"), [
    (lambda t: F.elu(t, inplace=True), {"ELU/SELU": 1}),
    (lambda t: F.hardsigmoid(t, inplace=True), {"Hardsigmoid": 1}),
    (lambda t: F.threshold_(t, 0.1, 0.0), {"threshold": 1}),
    (lambda t: t.clamp_(0.1, 0.2), {"clamp": 1}),
    (lambda t: t.clamp_max_(max=-5.0), {"clamp": 1}),
    (lambda t: t.clip_(min=-99.0), {}),  # cuts nothing: every slope is 1
    (lambda t: F.elu(t), {"ELU/SELU": 1}),
])
def test_plain_ops_in_place_on_a_view_are_named(op, named):
    # In place on a view, autograd wraps the op's node in the base's CopySlices node, and
    # neither the node nor a notice named it: timm's resnet10t with ELU and LayerNorm2d.
    torch.manual_seed(0)
    session = _session(_OnAView(op), torch.rand(1, 3, 8, 8))
    assert session.plain_gate_ops == named
    assert all(any(name in notice for notice in session.notices) for name in named)


class _RmsNorm(nn.Module):
    def __init__(self, by_hand: bool) -> None:
        super().__init__()
        self.by_hand = by_hand
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        z = self.conv(x).permute(0, 2, 3, 1)
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) if self.by_hand \
            else F.rms_norm(z, (8,))
        return self.head(F.relu(z).mean((1, 2)))


@pytest.mark.parametrize(("by_hand", "named"), [
    (True, {"statistics of a norm by hand (var/std/rsqrt/norm)": 1}),
    (False, {"RMSNorm": 1}),  # once: its own rsqrt is counted with it
])
def test_norms_are_named_once_whether_written_by_hand_or_called(by_hand, named):
    torch.manual_seed(0)
    session = _session(_RmsNorm(by_hand), torch.rand(1, 3, 8, 8))
    assert session.plain_gate_ops == named
    assert session.gated_kinds == {"relu": 1}


class _TokensThroughBatchNorm(nn.Module):
    """Tokens (B, N, C) laid out as a (B, C, H, W) map by a transpose, then an eval-mode
    BatchNorm2d (as XCiT's and LeViT's blocks do)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 16)
        self.norm = nn.BatchNorm2d(16)
        self.mix = nn.Parameter(torch.randn(5, 16, 4, 4))
        with torch.no_grad():
            self.norm.running_mean.normal_()
            self.norm.running_var.uniform_(0.5, 2.0)
            self.norm.weight.normal_()

    def forward(self, x):  # x: (B, 3, 4, 4)
        b, _, h, w = x.shape
        tokens = self.embed(x.flatten(2).transpose(1, 2))  # (B, N, C)
        z = self.norm(tokens.transpose(1, 2).reshape(b, 16, h, w))
        return (z[:, None] * self.mix).flatten(2).sum(2)  # (B, 5): a gradient laid out NCHW


def test_one_channels_last_example_through_batch_norm_gets_the_right_gradient():
    # torch's CPU batch-norm backward is wrong for one example whose input's strides are
    # channels last and a gradient that is not; a batch of two is right, and is the check.
    torch.manual_seed(0)
    model = _TokensThroughBatchNorm().double().eval()
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    pair = torch.cat([x, torch.rand_like(x)])
    right = plain_gradient(model, pair, 2)[:1]
    assert not torch.allclose(plain_gradient(model, x, 2), right)  # torch's own error
    hard = pw.excitation_pullback(model, x, 2, gate="hard")
    torch.testing.assert_close(hard, right, rtol=1e-12, atol=1e-12)
    soft = pw.excitation_pullback(model, x, 2, temperature=0.5)
    torch.testing.assert_close(soft, pw.excitation_pullback(model, pair, 2, temperature=0.5)[:1],
                               rtol=1e-12, atol=1e-12)


def test_a_plain_op_in_place_hides_no_op_before_it():
    # Its node's inputs are the graph before it: counting them with it would hide them.
    class SoftplusThenElu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            z = F.elu(F.softplus(self.conv(x)) - 1.0, inplace=True)
            return self.head(F.rms_norm(z.mean((2, 3)), (8,)))

    torch.manual_seed(0)
    session = _session(SoftplusThenElu(), torch.rand(1, 3, 8, 8))
    assert session.plain_gate_ops == {"Softplus": 1, "ELU/SELU": 1, "RMSNorm": 1}


def test_levit_alone_gets_its_row_of_the_batchs_gradient():
    # LeViT's stem hands its last batch norm a gradient laid out channels last with an odd
    # stride for the batch of one; torch's plain gradient is then off (rel 1.4).
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False, img_size=64,
                              num_classes=10).double().eval()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    right = plain_gradient(model, x, 3)[:1]
    assert not torch.allclose(plain_gradient(model, x[:1], 3), right)  # torch's own error
    torch.testing.assert_close(pw.excitation_pullback(model, x[:1], 3, gate="hard"), right,
                               rtol=1e-9, atol=1e-12)


def test_a_batch_norm_whose_output_gets_no_gradient_is_passed_over():
    # MobileNetV4's hybrid blocks hand a batch-1 batch norm's hook None (the layout hook
    # crashed on it).
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv4_hybrid_medium", pretrained=False,
                              num_classes=10).eval()
    x = torch.rand(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pullback = pw.excitation_pullback(model, x, 3)
    assert torch.isfinite(pullback).all()


@pytest.mark.parametrize("make", ["tokens", "levit"])
def test_batched_targets_of_one_example_get_the_right_gradient_too(make):
    # Batched targets run one vmapped backward, whose gradients have no strides to copy into:
    # the layout hook let them through, and they were off (rel 1.6 and 1.3).
    torch.manual_seed(0)
    if make == "levit":
        timm = pytest.importorskip("timm")
        model = timm.create_model("levit_128s", pretrained=False, img_size=64,
                                  num_classes=10).double().eval()
        x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    else:
        model = _TokensThroughBatchNorm().double().eval()
        x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        right = pw.PullbackSession(model, x).pullbacks([2, 4], batched=False)[:, :1]
        batched = pw.PullbackSession(model, x[:1]).pullbacks([2, 4], batched=True)
    torch.testing.assert_close(batched, right, rtol=1e-9, atol=1e-12)
