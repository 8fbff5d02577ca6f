"""Models users bring that are built in unusual ways: each gets the right pullback, or a clear
error, and is left as it was."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import pullback_widgets as pw
from tests.conftest import plain_gradient


class _Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool | None):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 5)
        self.use_reentrant = use_reentrant

    def block(self, z):
        return F.relu(self.conv2(z))

    def forward(self, x):
        z = F.relu(self.conv1(x))
        z = self.block(z) if self.use_reentrant is None \
            else checkpoint(self.block, z, use_reentrant=self.use_reentrant)
        return self.fc(z.mean((2, 3)))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_is_refused_clearly(use_reentrant):
    # The checkpoint runs its block again in the backward, outside the soft gates: the plain
    # ops' saved tensors would feed the soft ones (a wrong pullback without a word).
    torch.manual_seed(0)
    model = _Checkpointed(use_reentrant).eval()
    x = torch.rand(1, 3, 12, 12)
    with pytest.raises(pw.PullbackWidgetsError, match="activation checkpointing"):
        pw.excitation_pullback(model, x, 0)
    model.use_reentrant = None  # the control
    pw.excitation_pullback(model, x, 0)


def test_callers_own_saved_tensor_hooks_still_work():
    # Checkpoints are refused by refusing saved-tensor hooks, but not the caller's own.
    torch.manual_seed(0)
    model = _Checkpointed(None).eval()
    x = torch.rand(1, 3, 12, 12)
    expected = pw.excitation_pullback(model, x, 2)
    with torch.autograd.graph.save_on_cpu():
        assert torch.equal(pw.excitation_pullback(model, x, 2), expected)


class _Keywords(nn.Module):
    def __init__(self, keyword: bool):
        super().__init__()
        self.conv, self.fc, self.keyword = nn.Conv2d(3, 8, 3), nn.Linear(8, 5), keyword

    def forward(self, x):
        z = self.conv(x)
        if self.keyword:
            z = torch.relu(input=z)
            z = torch.max_pool2d(input=z, kernel_size=2)
            tokens = torch.layer_norm(input=z.flatten(2).transpose(1, 2), normalized_shape=(8,))
            tokens = F.scaled_dot_product_attention(query=tokens, key=tokens, value=tokens)
        else:
            z = torch.relu(z)
            z = torch.max_pool2d(z, 2)
            tokens = torch.layer_norm(z.flatten(2).transpose(1, 2), (8,))
            tokens = F.scaled_dot_product_attention(tokens, tokens, tokens)
        return self.fc(tokens.mean(1))


def test_gated_ops_called_with_keywords_are_gated_like_positional_calls():
    # C builtins pass keyword arguments on as written; the interception reads the input by
    # position, and keyword calls were left plain without a word.
    torch.manual_seed(0)
    positional, keyword = _Keywords(False).eval(), _Keywords(True).eval()
    keyword.load_state_dict(positional.state_dict())
    x = torch.rand(2, 3, 12, 12)
    sessions = [pw.PullbackSession(model, x) for model in (positional, keyword)]
    assert sessions[0].gated_kinds == sessions[1].gated_kinds == {
        "relu": 1, "pool": 1, "norm": 1, "attention": 1}
    assert torch.equal(sessions[0].pullback(1, temperature=1.0),
                       sessions[1].pullback(1, temperature=1.0))


class _WidthOneGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gate, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 1), nn.Linear(4, 5)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        return self.fc(h * F.relu(self.gate(h)))


def test_relative_temperature_of_a_one_value_input_is_the_step_gate_not_nan():
    torch.manual_seed(0)
    model = _WidthOneGate().double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "degrees of freedom" warning included
        relative = pw.excitation_pullback(model, x, 0, temperature_mode="relative")
    assert torch.isfinite(relative).all()
    # A spread of 0 gives T ~ 0 at the one-value gate; the other gate's T is its own spread.
    with pw.soft_gating(model, temperature_mode="relative") as settings:
        leaf = x.clone().requires_grad_()
        logits = model(leaf)
        settings.temperature = 0.3
    (expected,) = torch.autograd.grad(logits[:, 0].sum(), leaf)
    torch.testing.assert_close(relative, expected)


class _MergesInEval(nn.Linear):
    """loralib's pattern: eval() merges a low-rank update into the weight, train() unmerges."""

    def __init__(self):
        super().__init__(8, 5)
        self.update = nn.Parameter(torch.full((5, 8), 0.25))
        self.merged = False

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.merged:
            self.weight.data -= self.update
        elif not mode and not self.merged:
            self.weight.data += self.update
        self.merged = not mode
        return self

    def forward(self, x):
        return F.linear(x, self.weight if self.merged else self.weight + self.update, self.bias)


def test_training_flags_are_restored_through_each_modules_own_train():
    torch.manual_seed(0)
    shared = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), shared, nn.Sequential(nn.Dropout(), shared),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), _MergesInEval()).train()
    model[2][0].eval()  # mixed flags, restored exactly
    flags = [m.training for m in model.modules()]
    x = torch.rand(1, 3, 12, 12)
    pw.excitation_pullback(model, x, 0)
    assert [m.training for m in model.modules()] == flags
    assert not model[5].merged  # its own train() ran: unmerged, as in train mode


def test_empty_batch_and_model_changed_after_the_forward_are_clear_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.GroupNorm(2, 4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    with pytest.raises(pw.PullbackWidgetsError, match="at least one image"):
        pw.excitation_pullback(model, torch.rand(0, 3, 8, 8), 0)
    session = pw.PullbackSession(model, torch.rand(1, 3, 8, 8))
    with torch.no_grad():
        model[6].weight.mul_(0.5)  # a plain layer after the forward, like an optimiser step
    with pytest.raises(pw.PullbackWidgetsError, match="changed in place after the forward"):
        session.pullback(0)


class _HeadDeclaredFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.head, self.stem = nn.Conv2d(8, 5, 1), nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.head(F.relu(self.stem(x))).mean((2, 3))


class _Grayscale(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.stem(x.expand(-1, 3, -1, -1))).mean((2, 3)))


@pytest.mark.parametrize("model, channels", [(_HeadDeclaredFirst(), 3), (_Grayscale(), 1)])
def test_inputs_are_judged_by_the_forward_not_by_the_first_declared_convolution(model, channels):
    x = torch.rand(1, channels, 8, 8, dtype=torch.float64)
    model = model.double().eval()
    assert torch.equal(pw.excitation_pullback(model, x, 1, gate="hard"),
                       plain_gradient(model, x, 1))
    with pytest.raises(pw.PullbackWidgetsError,
                       match=r"may not suit this model.*; the model's forward failed: "):
        pw.excitation_pullback(model, torch.rand(1, 2, 8, 8, dtype=torch.float64), 1)


def test_a_model_that_changes_its_input_in_place_is_pulled_back_and_the_input_kept():
    class Normalises(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)

        def forward(self, x):
            x.sub_(0.5)
            return self.fc(F.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = Normalises().double().eval()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    original = x.clone()
    pullback = pw.excitation_pullback(model, x, 1, gate="hard")
    assert torch.equal(x, original)
    out_of_place = nn.Sequential()  # the same model, normalising out of place
    out_of_place.forward = lambda t: Normalises.forward(model, t.clone())
    assert torch.equal(pullback, plain_gradient(out_of_place, x, 1))


def test_an_input_reaching_attention_only_through_queries_says_which_rule_to_use():
    class QueryFromImage(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 5)
            self.memory = nn.Parameter(torch.randn(1, 6, 8))

        def forward(self, x):
            q = self.embed(x).flatten(2).transpose(1, 2)
            return self.head(F.scaled_dot_product_attention(q, self.memory, self.memory).mean(1))

    torch.manual_seed(0)
    model, x = QueryFromImage().eval(), torch.rand(1, 3, 16, 16)
    with pytest.raises(pw.PullbackWidgetsError, match="attention_weights='differentiated'"):
        pw.excitation_pullback(model, x, 0)
    assert pw.excitation_pullback(model, x, 0, attention_weights="differentiated").norm() > 0
