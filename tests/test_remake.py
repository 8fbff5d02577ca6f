"""Pre-activations remade in the backward (an eval-mode batch norm, then residual sums) instead of
kept: the same bits as keeping them, and kept wherever a remake could differ."""

import weakref

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

import pullback_widgets as pw
from pullback_widgets import interception
from pullback_widgets.graph_audit import audit_graph
from tests.conftest import random_image
from tests.reference import FrozenGateReLU


def _remakes(monkeypatch) -> list[bool]:
    """Spy on the gates: one entry per gated call, True where it was handed a remake."""
    seen: list[bool] = []

    def spy(original):
        class Spy:
            @staticmethod
            def apply(*args):
                seen.append(args[-1] is not None)  # the routes pass the remake last
                return original.apply(*args)
        return Spy

    for name in ("SoftClamp", "SoftActivation"):
        monkeypatch.setattr(interception, name, spy(getattr(interception, name)))
    return seen


def _pullbacks(model, x):
    """One-shot pullbacks at two gates, and a session's at two settings (one retained graph)."""
    session = pw.PullbackSession(model, x)
    return [pw.excitation_pullback(model, x, 3),
            pw.excitation_pullback(model, x, 3, gate="normal_cdf", temperature=0.6),
            session.pullback(3, temperature=0.2), session.pullback(3, gate="hard")]


@pytest.mark.parametrize("builder", [tvm.resnet18, tvm.mobilenet_v3_small])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_remade_pre_activations_give_the_kept_ones_bit_for_bit(monkeypatch, builder, dtype):
    # ResNet: BN -> ReLU and BN + identity -> ReLU; MobileNetV3: BN -> Hardswish / ReLU.
    torch.manual_seed(0)
    model = builder(num_classes=10).to(dtype).eval()
    x = random_image(2, 64, dtype=dtype)
    seen = _remakes(monkeypatch)
    remade = _pullbacks(model, x)
    assert sum(seen) >= 17
    monkeypatch.setattr(interception._SoftGatingMode, "remake_for", lambda mode, z: None)
    kept = _pullbacks(model, x)
    for a, b in zip(remade, kept):
        assert torch.equal(a, b)


def test_every_relu_of_a_resnet_is_remade(monkeypatch):
    model = tvm.resnet18(num_classes=10).eval()
    seen = _remakes(monkeypatch)
    pw.PullbackSession(model, random_image(1, 64, dtype=torch.float32))
    assert len(seen) == 17 and all(seen)  # the stem, and BN -> ReLU, sum -> ReLU per block


class _BatchNormThenGate(nn.Module):
    """conv -> BN -> (something in between) -> ReLU -> pool -> linear."""

    def __init__(self, between) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu, self.fc = nn.ReLU(inplace=True), nn.Linear(4, 5)
        self.between = between
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.fc(self.relu(self.between(self.bn(self.conv(x)))).mean((2, 3)))


def _frozen(model: _BatchNormThenGate, temperature: float) -> _BatchNormThenGate:
    reference = _BatchNormThenGate(model.between).double().eval()
    reference.load_state_dict(model.state_dict())
    reference.relu = FrozenGateReLU(temperature, "sigmoid")
    return reference


def _scaled_in_place(t):
    return t.mul_(2.0)


def _plus_offsets(t):  # a residual sum whose other operand broadcasts
    return t + torch.linspace(-1, 1, t.shape[-1], dtype=t.dtype)


def _doubled_in_place(t):  # a += a: the sum changes its own operand
    t += t
    return t


@pytest.mark.parametrize("between", [_scaled_in_place, _plus_offsets, _doubled_in_place])
def test_a_pre_activation_a_remake_could_not_give_is_kept(monkeypatch, between):
    # Changed in place after the norm, or summed with a broadcast operand: no remake, and the
    # pullback is still the frozen-gate reference's gradient.
    model = _BatchNormThenGate(between).double().eval()
    x = random_image(2, 8)
    seen = _remakes(monkeypatch)
    actual = pw.excitation_pullback(model, x, 1, temperature=0.4)
    assert seen and not any(seen)
    reference = _frozen(model, 0.4)
    leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(reference(leaf)[:, 1].sum(), leaf)
    torch.testing.assert_close(actual, expected)


def _residual_then_changed(t):  # the sum's operand changes in place before the gate
    shortcut = t * 0.5
    total = t + shortcut
    shortcut.mul_(2.0)
    return total


def test_a_sum_whose_operand_changed_before_the_gate_is_kept(monkeypatch):
    model = _BatchNormThenGate(_residual_then_changed).double().eval()
    x = random_image(2, 8)
    seen = _remakes(monkeypatch)
    actual = pw.excitation_pullback(model, x, 1, temperature=0.4)
    assert seen == [False]
    reference = _frozen(model, 0.4)
    leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(reference(leaf)[:, 1].sum(), leaf)
    torch.testing.assert_close(actual, expected)


def test_a_forward_that_changes_a_remake_source_after_the_gate_runs_again(monkeypatch):
    # The sum's operand changes after the gate took the sum: the session sees it when the
    # forward ends and runs it again keeping every pre-activation; the result is right.
    calls = []

    class ChangesItsShortcut(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            calls.append(1)
            shortcut = x * 1.0
            out = F.relu(self.bn(self.conv(x)) + shortcut)
            shortcut.mul_(2.0)
            return out.mean((2, 3))

    model = ChangesItsShortcut().double().eval()
    x = random_image(1, 8)
    actual = pw.excitation_pullback(model, x, 0, temperature=0.4)
    assert len(calls) == 2
    monkeypatch.setattr(interception._SoftGatingMode, "remake_for", lambda mode, z: None)
    torch.testing.assert_close(actual, pw.excitation_pullback(model, x, 0, temperature=0.4))
    assert len(calls) == 3


def test_a_model_changed_after_the_forward_is_a_clear_error():
    model = _BatchNormThenGate(nn.Identity()).double().eval()
    session = pw.PullbackSession(model, random_image(1, 8))
    with torch.no_grad():
        model.bn.bias.add_(1.0)
    with pytest.raises(pw.PullbackWidgetsError, match="changed since this session's forward"):
        session.pullback(0)


def test_batch_statistics_and_autocast_are_not_remade(monkeypatch):
    # A norm without running statistics normalises by the batch's (training=True), and under
    # autocast the backward would not remake in the forward's dtype: both are kept.
    model = _BatchNormThenGate(nn.Identity()).eval()
    model.bn = nn.BatchNorm2d(4, track_running_stats=False)
    x = random_image(2, 8, dtype=torch.float32)
    seen = _remakes(monkeypatch)
    with pytest.warns(UserWarning, match="BatchNorm with batch statistics"):  # and named
        pw.excitation_pullback(model, x, 1)
    model = _BatchNormThenGate(nn.Identity()).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pw.excitation_pullback(model, x, 1)
    pw.excitation_pullback(model, x, 1)  # the control: remade
    assert seen == [False, False, True]


def test_soft_gating_keeps_every_pre_activation(monkeypatch):
    # The user runs that forward, so it cannot be checked and run again: nothing is remade.
    model = tvm.resnet18(num_classes=10).eval()
    x = random_image(1, 32, dtype=torch.float32).requires_grad_()
    seen = _remakes(monkeypatch)
    with pw.soft_gating(model):
        out = model(x)
    torch.autograd.grad(out[:, 1].sum(), x)
    assert len(seen) == 17 and not any(seen)


def test_a_residual_remake_frees_what_it_was_made_from_as_the_backward_passes():
    # out = relu(bn(conv(x)) + x): the gate remakes its pre-activation from the batch norm's
    # input and the identity. Those must be freed once the backward has passed them, not kept
    # by the gate's remake until the whole graph goes (memory that the rest of the backward
    # would otherwise allocate around).
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = F.relu(self.bn(self.conv(x)) + x)
            return self.head(h.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Block().eval()
    normalised = []
    model.bn.register_forward_hook(
        lambda module, inputs, output: normalised.append(weakref.ref(inputs[0])))
    x = torch.rand(2, 4, 8, 8)
    leaf = torch.rand(2, 4, 8, 8).requires_grad_()
    alive_at_the_end = []
    with interception._gating(pw.GateSettings(0.3)) as mode:
        logits = model(leaf * 1.0 + x)
    assert audit_graph([logits], leaf, mode.gated_nodes).gated_kinds == {"relu": 1}
    assert mode._handed_out  # the gate took a remake
    del mode  # (it remembers the remakes it handed out)
    leaf.register_hook(lambda grad: alive_at_the_end.append(normalised[0]() is not None))
    torch.autograd.grad(logits[:, 1].sum(), leaf)
    assert alive_at_the_end == [False]
