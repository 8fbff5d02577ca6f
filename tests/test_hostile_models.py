"""Models users bring that are built in unusual ways: each gets the right pullback, or a clear
error, and is left as it was."""

import copy
import threading
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


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_under_the_callers_saved_tensor_hooks_is_refused(
        use_reentrant):
    # Under the caller's save_on_cpu() the guard stood aside (torch was expected to refuse):
    # every door returned a map 47 % off the pullback, without a word (a review).
    torch.manual_seed(0)
    model = _Checkpointed(use_reentrant).eval()
    x = torch.rand(1, 3, 12, 12)
    with torch.autograd.graph.save_on_cpu():
        for door in (lambda: pw.excitation_pullback(model, x, 0),
                     lambda: pw.ExcitationPullback(model).attribute(x, target=0),
                     lambda: pw.PullbackSession(model, x)):
            with pytest.raises(pw.PullbackWidgetsError, match="activation checkpointing"):
                door()
        with pytest.raises(pw.PullbackWidgetsError, match="activation checkpointing"), \
                pw.soft_gating(model):
            leaf = x.clone().requires_grad_()
            torch.autograd.grad(model(leaf)[0, 0], leaf)


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
    weights = copy.deepcopy(model.state_dict())
    # Its train() unmerges through .data, which autograd does not see: the backward would pull
    # back through other weights than the forward's (rel. error 0.78 against the gradient).
    with pytest.raises(pw.PullbackWidgetsError, match="train"):
        pw.excitation_pullback(model, x, 0, gate="hard")
    with pytest.raises(pw.PullbackWidgetsError, match="train"):
        pw.PullbackSession(model, x)
    assert [m.training for m in model.modules()] == flags
    assert not model[5].merged  # its own train() ran: unmerged, as in train mode
    # As after the user's own model.eval(); model.train(): w + u - u, rounded.
    torch.testing.assert_close(model.state_dict(), weights)
    model.eval()  # as the message says: in eval mode, nothing changes as the flags go back
    leaf = x.clone().requires_grad_()
    (plain,) = torch.autograd.grad(model(leaf)[:, 0].sum(), leaf)
    assert torch.equal(pw.excitation_pullback(model, x, 0, gate="hard"), plain)


def test_empty_batch_and_model_changed_after_the_forward_are_clear_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.GroupNorm(2, 4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    with pytest.raises(pw.PullbackWidgetsError, match="at least one image"):
        pw.excitation_pullback(model, torch.rand(0, 3, 8, 8), 0)
    session = pw.PullbackSession(model, torch.rand(1, 3, 8, 8))
    with torch.no_grad():
        model[6].weight.mul_(0.5)  # a plain layer after the forward, like an optimiser step
    with pytest.raises(pw.PullbackWidgetsError, match="changed since this session's forward"):
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


def test_captum_noise_tunnel_wraps_the_pullback():
    # NoiseTunnel calls attribute.__wrapped__ (Captum's logging decorator provides it).
    import inspect

    from captum.attr import NoiseTunnel, Saliency

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 14 * 14, 10)).eval()
    x = torch.rand(2, 3, 16, 16)
    torch.manual_seed(1)
    ours = NoiseTunnel(pw.ExcitationPullback(model, gate="hard")).attribute(
        x, nt_type="smoothgrad", nt_samples=4, target=3)
    torch.manual_seed(1)
    saliency = NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=4,
                                                      target=3, abs=False)
    assert torch.equal(ours, saliency)
    assert "target" in inspect.signature(pw.ExcitationPullback.attribute).parameters


class _Pause(nn.Module):
    """Holds the forward of thread "first" until ``first_may_go``, and that of thread "second"
    until ``first_done`` (each at most 60 s, against a hang). With holds of 2 s, a main thread
    delayed 1.5 s on a loaded machine let "first" go on by itself before it had checked that
    "second" waits; "second" then got inside, and the check failed as if no lock held it."""

    def __init__(self):
        super().__init__()
        self.first_inside, self.first_may_go = threading.Event(), threading.Event()
        self.second_inside, self.first_done = threading.Event(), threading.Event()

    def forward(self, x):
        name = threading.current_thread().name
        if name == "first":
            self.first_inside.set()
            self.first_may_go.wait(60)
        elif name == "second":
            self.second_inside.set()
            self.first_done.wait(60)
        return x


def test_two_models_sharing_a_backbone_take_turns_and_keep_their_flags():
    # A lock per model let two package forwards interleave their flag changes on the shared
    # modules: the second saved the backbone's flags as the first had set them (eval) and
    # restored those after the first had finished, leaving a train-mode backbone in eval.
    torch.manual_seed(0)
    pause = _Pause()
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             pause, nn.Flatten())
    heads = [nn.Sequential(backbone, nn.Linear(4 * 8 * 8, n)).train() for n in (3, 5)]
    x = torch.rand(2, 3, 8, 8)
    first = threading.Thread(target=pw.excitation_pullback, args=(heads[0], x, 0), name="first")
    second = threading.Thread(target=pw.excitation_pullback, args=(heads[1], x, 0),
                              name="second")
    first.start()
    try:
        assert pause.first_inside.wait(60)
        second.start()
        # The second forward must wait for the first: it may not get inside meanwhile.
        assert not pause.second_inside.wait(0.5)
        pause.first_may_go.set()
        first.join()
    finally:  # a failure above must not leave the threads held for a minute
        pause.first_may_go.set()
        pause.first_done.set()
        first.join()
        if second.ident is not None:  # started
            second.join()
    assert all(module.training for head in heads for module in head.modules())


def test_a_switch_to_train_mode_during_the_forward_is_an_error():
    class SwitchesTheModel(nn.Module):
        def forward(self, x):
            model.train()  # as another thread's training loop would
            return x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), SwitchesTheModel(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with pytest.raises(pw.PullbackWidgetsError, match="put in train mode while"):
        pw.excitation_pullback(model, torch.rand(1, 3, 8, 8), 0)
    assert not model.training  # left as it was found


def test_a_settings_update_is_one_step_for_a_thread_copying_them():
    # session.settings.update() in one thread and a session copying its settings in another
    # gave torn settings (a temperature of one update with the gate of another).
    from pullback_widgets import gates

    settings = pw.GateSettings(0.3, "sigmoid")
    with gates._SETTINGS_LOCK:  # a copy in progress
        writer = threading.Thread(target=settings.update,
                                  kwargs=dict(temperature=2.0, gate="hard"))
        writer.start()
        writer.join(0.3)
        assert writer.is_alive() and (settings.temperature, settings.gate) == (0.3, "sigmoid")
    writer.join()
    copy = pw.GateSettings()
    copy.assign(settings)
    assert (copy.temperature, copy.gate) == (2.0, "hard")


class _Encoder(nn.Module):
    """Patches as tokens through one transformer encoder layer, either layout."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        if not self.batch_first:
            tokens = tokens.transpose(0, 1)  # (N, B, C)
        tokens = self.layer(tokens)
        return self.head(tokens.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch", [1, 3])
def test_relative_temperature_refuses_sequence_first_tensors_instead_of_mixing_examples(batch):
    torch.manual_seed(0)
    x = torch.rand(batch, 3, 16, 16)
    seq_first = _Encoder(batch_first=False).eval()
    session = pw.PullbackSession(seq_first, x)
    session.pullback(0)  # absolute T has no per-example spread: fine
    (vmapped,) = session.pullbacks([0], batched=True)
    torch.testing.assert_close(vmapped, session.pullback(0))
    with pytest.raises(pw.PullbackWidgetsError, match=rf"shape \(16, {batch}, .*batch of {batch} "):
        session.pullback(0, temperature_mode="relative")
    with pytest.raises(pw.PullbackWidgetsError, match="batch_first=False"):
        pw.excitation_pullback(seq_first, x, 0, temperature_mode="relative")
    with pytest.raises(pw.PullbackWidgetsError, match="batch_first=False"):
        session.pullbacks([0, 1], temperature_mode="relative", batched=True)
    # The same weights batch-first: each example's pullback is its own.
    batch_first = _Encoder(batch_first=True).eval()
    batch_first.load_state_dict(seq_first.state_dict())
    together = pw.excitation_pullback(batch_first, x, 0, temperature_mode="relative")
    alone = torch.cat([pw.excitation_pullback(batch_first, x[i:i + 1], 0,
                                              temperature_mode="relative")
                       for i in range(batch)])
    torch.testing.assert_close(together, alone)


def test_relative_temperature_ignores_gates_off_the_input_path():
    # A gate on parameters alone (a position-bias MLP, as in SwinV2) has no batch dim, and its
    # backward never runs for the input's gradient: not a reason to refuse.
    class ParameterGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.table = nn.Conv2d(3, 4, 3), nn.Parameter(torch.randn(5, 4))

        def forward(self, x):
            bias = F.relu(self.table).sum(0)  # (4,), from parameters only
            return F.relu(self.conv(x)).mean((2, 3)) + bias

    torch.manual_seed(0)
    model, x = ParameterGate().double().eval(), torch.rand(3, 3, 8, 8, dtype=torch.float64)
    together = pw.excitation_pullback(model, x, 1, temperature_mode="relative")
    alone = torch.cat([pw.excitation_pullback(model, x[i:i + 1], 1, temperature_mode="relative")
                       for i in range(3)])
    torch.testing.assert_close(together, alone)


def test_reentrant_checkpointing_under_soft_gating_is_refused_in_the_forward():
    # A reentrant checkpoint runs its block again in the backward, where no mode sees it:
    # backward() (which torch does not refuse, unlike autograd.grad) would give the plain
    # gradient through the block without a word. Its forward runs the block under no_grad.
    torch.manual_seed(0)
    model = _Checkpointed(True).eval()
    x = torch.rand(1, 3, 12, 12, requires_grad=True)
    with pytest.raises(pw.PullbackWidgetsError, match="activation checkpointing"), \
            pw.soft_gating(model):
        model(x)[:, 0].sum().backward()
    with pw.soft_gating(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's: no input requires grad
        model(x)  # no gradient wanted: nothing to refuse


def test_a_unit_on_a_sequence_first_layer_is_refused():
    # Dim 1 of (N, B, C) is the batch, not a channel: the seed would pick an example.
    torch.manual_seed(0)
    session = pw.PullbackSession(_Encoder(batch_first=False).eval(), torch.rand(2, 3, 16, 16),
                                 layers=["layer"])
    with pytest.raises(pw.PullbackWidgetsError, match=r"\(16, 2, 8\), whose dim 0 is not the "
                                                      "batch of 2"):
        session.pullback(pw.Unit("layer", 1))
    with pytest.raises(pw.PullbackWidgetsError, match="dim 0 is not the batch"):
        pw.pullback_ascent(session.model, torch.rand(2, 3, 16, 16), pw.Unit("layer", 1),
                           steps=1, progress=False)


def test_a_max_pool_built_from_numpy_integers_is_gated():
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    as_ints = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2, 2, 1),
                            nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).eval()
    x = torch.rand(2, 3, 11, 11)
    as_numpy = nn.Sequential(*as_ints[:2], nn.MaxPool2d(np.int64(2), np.int64(2), np.int32(1)),
                             *as_ints[3:]).eval()
    for gate in ("sigmoid", "hard"):
        assert torch.equal(pw.excitation_pullback(as_numpy, x, 1, gate=gate),
                           pw.excitation_pullback(as_ints, x, 1, gate=gate))


class _TupleOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.input_size = nn.Conv2d(3, 4, 3), nn.Linear(4, 3), 16

    def forward(self, x):
        return (self.fc(F.relu(self.conv(x)).mean((2, 3))),)


def test_a_model_that_returns_no_logits_is_a_clear_error_everywhere():
    model, x = _TupleOutput().eval(), torch.rand(1, 3, 16, 16)
    message = r"must return logits of shape \(B, num_classes\), got tuple"
    with pytest.raises(pw.PullbackWidgetsError, match=message):
        pw.PullbackSession(model, x)
    with pytest.raises(pw.PullbackWidgetsError, match=message):
        pw.model_helpers.predict(model, x)
    for explorer in (pw.PullbackExplorer, pw.AscentExplorer):  # AttributeError before
        with pytest.raises(pw.PullbackWidgetsError, match=message):
            explorer(model=model, image=torch.rand(3, 16, 16))


def test_a_unit_on_a_channels_last_swin_layer_is_refused():
    # Swin's stages output (B, H, W, C): dim 1 is rows, and a Unit read row 5 as "channel 5".
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2], num_heads=[2],
                            window_size=[4, 4], num_classes=3).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its attention is written by hand: a notice
        session = pw.PullbackSession(model, torch.rand(1, 3, 32, 32), layers=["features.1"])
    with pytest.raises(pw.PullbackWidgetsError, match=r"channels last \(B, H, W, C\)"):
        session.pullback(pw.Unit("features.1", 5))
    session.pullback(1)  # classes are fine
    # Nor do the explorers offer its 4-D layers (they were listed as rows x columns x
    # channels, the Channel box bounded by the rows, and then refused).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        offered = pw.model_helpers.feature_layers(model, torch.rand(1, 3, 32, 32), every=True)
    assert offered == {}


class _UnknownTokens(nn.Module):
    """Patch tokens (B, N, C) of a model the package does not know as a ViT (Mixer-like)."""

    def __init__(self):
        super().__init__()
        self.patches = nn.Conv2d(3, 32, 4, stride=4)
        self.mix = nn.Sequential(nn.Linear(32, 32), nn.GELU())
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2)  # (B, 16 tokens, 32 channels)
        return self.head(self.mix(tokens).mean(1))


def test_a_unit_on_tokens_of_a_model_not_known_as_a_vit_is_refused():
    # (B, N, C) was read as (B, C, L): "channel 5" was token 5 averaged over every channel,
    # silently (timm's Mixer, LeViT; found by a hostile review).
    torch.manual_seed(0)
    model, x = _UnknownTokens().eval(), torch.rand(1, 3, 16, 16)
    with pytest.raises(pw.PullbackWidgetsError, match=r"tokens \(B, N, C\) or a 1-D map"):
        pw.excitation_pullback(model, x, pw.Unit("mix", 5))
    assert "mix" not in pw.model_helpers.feature_layers(model, x, every=True)
    assert "patches" in pw.model_helpers.feature_layers(model, x, every=True)


def test_timm_vit_token_grids_follow_timm_padding_and_hybrid_strides():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    for model, x, grid in (
            (timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                               patch_size=8, num_classes=3, depth=1, dynamic_img_size=True,
                               dynamic_img_pad=True), torch.rand(1, 3, 30, 30), (4, 4)),
            (timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=64,
                               num_classes=3, depth=1), torch.rand(1, 3, 64, 64), (2, 2))):
        session = pw.PullbackSession(model.eval(), x, layers=["blocks.0"])
        assert (session.token_grid.height, session.token_grid.width) == grid
        x_leaf = x.clone().requires_grad_()
        tokens = model.blocks[0](model._pos_embed(model.patch_embed(x_leaf)))
        (expected,) = torch.autograd.grad(tokens[0, 1 + grid[1] + 1, 3], x_leaf)
        torch.testing.assert_close(session.pullback(pw.Unit("blocks.0", 3, 1, 1), gate="hard"),
                                   expected)


def test_devices_this_machine_lacks_and_meta_tensors_are_clear_errors():
    if not torch.cuda.is_available():
        with pytest.raises(pw.PullbackWidgetsError, match="'cuda' is not available here"):
            pw.load_model("shapes", weights=None, device="cuda")
    with pytest.raises(pw.PullbackWidgetsError, match="meta"):
        pw.load_model("shapes", weights=None, device="meta")
    with pytest.raises(pw.PullbackWidgetsError, match="meta device"):
        pw.excitation_pullback(pw.load_model("shapes", weights=None),
                               torch.rand(1, 3, 32, 32, device="meta"), 0)


@pytest.mark.parametrize("layout", ["sparse COO", "sparse CSR"])
def test_sparse_inputs_are_a_clear_error_at_every_door(layout):
    # They passed every check, then failed deep inside with NotImplementedError (a review).
    model = pw.load_model("shapes", weights=None)
    dense = torch.rand(1, 3, 32, 32)
    sparse = dense.to_sparse() if layout == "sparse COO" else dense.to_sparse_csr()
    for door in (lambda: pw.excitation_pullback(model, sparse, 0),
                 lambda: pw.PullbackSession(model, sparse),
                 lambda: pw.ExcitationPullback(model).attribute(sparse, target=0)):
        with pytest.raises(pw.PullbackWidgetsTypeError, match=r"dense tensor.*to_dense"):
            door()


class _SumFirst(nn.Module):
    """Global sums first: their order of addition follows the input's memory layout."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.sum(dim=(2, 3)))))


@pytest.mark.parametrize("view", ["crop", "every other column", "channels last", "expanded"])
def test_the_forward_on_a_view_is_the_models_own_bit_for_bit(view):
    # The session copied its inputs with clone(), which makes a crop contiguous: the sums then
    # added in another order (logits off by 0.03 at 1e5; found by a hostile review).
    torch.manual_seed(0)
    model = _SumFirst().eval()
    photo = torch.rand(1, 3, 600, 900)
    x = {"crop": photo[:, :, 50:550, 100:800], "every other column": photo[..., ::2],
         "channels last": photo.contiguous(memory_format=torch.channels_last),
         "expanded": photo[:, :, :300, :300].expand(2, -1, -1, -1)}[view]
    session = pw.PullbackSession(model, x)
    assert torch.equal(session.logits, model(x))
    leaf = x.detach().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(leaf)[:, 1].sum(), leaf)
    assert torch.equal(session.pullback(1, gate="hard"), plain)


def test_a_sparse_view_of_a_huge_tensor_is_not_copied_with_its_whole_span():
    from pullback_widgets.session import _copy_as_laid_out

    huge = torch.empty(1, 3, 6000, 6000)  # 432 MB, never touched
    sparse = huge[:, :, ::300, ::300].fill_(0.5)
    copy = _copy_as_laid_out(sparse)
    assert torch.equal(copy, sparse) and copy.untyped_storage().nbytes() == sparse.numel() * 4
    crop = torch.rand(1, 3, 60, 90)[:, :, 5:55, 10:80]
    assert _copy_as_laid_out(crop).stride() == crop.stride()  # a crop keeps its layout


def test_a_session_keeps_its_own_inputs_and_refuses_a_forward_on_a_changed_model():
    # A Unit on a layer not recorded yet needs one more forward: it must be of the session's
    # inputs (not of what the caller's tensor holds by then) and of the same model.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    x = torch.rand(2, 3, 8, 8)
    session = pw.PullbackSession(model, x)
    logits = session.logits.detach().clone()
    x.mul_(0.5)  # the caller reuses its buffer
    unit = session.pullback(pw.Unit("1", 2))
    assert torch.equal(session.logits, logits)
    torch.testing.assert_close(
        unit, pw.excitation_pullback(model, x / 0.5, pw.Unit("1", 2)), rtol=0, atol=0)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    with pytest.raises(pw.PullbackWidgetsError, match="changed since this session's forward"):
        session.pullback(pw.Unit("3", 0))
    assert torch.equal(session.logits, logits)


@pytest.mark.parametrize("change", ["parameter replaced", "bias added", "buffer changed",
                                    "buffer replaced"])
def test_a_forward_for_new_layers_is_refused_after_any_parameter_or_buffer_change(change):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).eval()
    session = pw.PullbackSession(model, torch.rand(2, 3, 8, 8))
    if change == "parameter replaced":
        model[3].weight = nn.Parameter(model[3].weight.detach().clone())
    elif change == "bias added":
        model[0].bias = nn.Parameter(torch.zeros(4))
    elif change == "buffer changed":
        model[1].running_mean.add_(1.0)
    else:
        model[1].running_var = model[1].running_var.clone()
    with pytest.raises(pw.PullbackWidgetsError, match="changed since this session's forward"):
        session.pullback(pw.Unit("4", 0))
    assert not session.model_unchanged()


@pytest.mark.parametrize("change", [".double()", ".to(float16)", ".data = a copy",
                                    "in place", "load_state_dict", ".data in place (an EMA)",
                                    ".data: one channel zeroed", ".data: a bias nudged",
                                    ".data: a channels-last weight scaled",
                                    ".data: a transposed weight scaled"])
def test_a_session_refuses_pullbacks_once_its_model_is_converted_or_changed(change):
    # .to() and .data = swap a parameter's memory, not the parameter nor its version: the
    # retained graph then failed on the dtype with a raw RuntimeError, or (same dtype) pulled
    # back silently through the new weights while the logits came from the old (a hostile
    # review).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).eval()
    session = pw.PullbackSession(model, torch.rand(2, 3, 8, 8))
    session.pullback(1)
    assert session.model_unchanged()
    if change == ".double()":
        model.double()
    elif change == ".to(float16)":
        model.to(torch.float16)
    elif change == ".data = a copy":
        model[3].weight.data = model[3].weight.data * 2
    elif change == "in place":
        with torch.no_grad():
            model[0].bias.add_(1.0)
    elif change == "load_state_dict":
        model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
    # Through .data, autograd's versions do not move (a moving average, an ablation): the
    # session answered with the old gates and the new weights (a hostile review).
    elif change == ".data in place (an EMA)":
        model[3].weight.data.mul_(0.9).add_(0.01)
    elif change == ".data: one channel zeroed":
        model[0].weight.data[2].zero_()
    elif change == ".data: a bias nudged":
        model[3].bias.data[1] += 0.5
    elif change == ".data: a channels-last weight scaled":
        model[0].weight.data = model[0].weight.data.to(memory_format=torch.channels_last)
        session = pw.PullbackSession(model, torch.rand(2, 3, 8, 8))
        model[0].weight.data.mul_(-3.0)
    else:  # its values fill no one block: their sample was a copy, never read again (a review)
        model[3].weight = nn.Parameter(model[3].weight.detach().t().contiguous().t())
        session = pw.PullbackSession(model, torch.rand(2, 3, 8, 8))
        model[3].weight.data.mul_(0.5)
    assert not session.model_unchanged()
    for call in (lambda: session.pullback(1), lambda: session.pullbacks([0, 1]),
                 lambda: session.pullback(pw.Unit("0", 1))):
        with pytest.raises(pw.PullbackWidgetsError, match="changed since this session's forward"):
            call()


def test_a_session_over_weights_holding_nan_and_negative_zero_stays_usable():
    # The record compares the sampled values' bits: NaN is not equal to itself as a value.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).eval()
    model.register_buffer("spare", torch.full((100,), float("nan")))  # unused by forward
    with torch.no_grad():
        model[3].weight.zero_().neg_()
    session = pw.PullbackSession(model, torch.rand(2, 3, 8, 8))
    assert session.model_unchanged()
    session.pullback(1)
    assert session.model_unchanged()


def test_class_indices_beyond_int64_and_temperatures_changed_in_place_are_clear_errors():
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    session = pw.PullbackSession(model, torch.rand(2, 3, 8, 8), temperature={"relu": 0.5})
    for target in (2 ** 70, np.uint64(2 ** 63), [2 ** 70, 1],
                   np.array([2 ** 63, 1], dtype=np.uint64)):
        with pytest.raises(pw.PullbackWidgetsError, match="out of range"):
            session.pullback(target)
    session.settings.temperature["relu"] = -0.5  # around update()'s checks
    with pytest.raises(pw.PullbackWidgetsError, match=r"temperature\['relu'\] must be"):
        session.pullback(1)


def test_bad_session_arguments_typos_in_settings_and_mixed_sizes_are_clear_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.rand(1, 3, 8, 8)
    for kwargs in ({"layers": None}, {"layers": [1]}, {"layers": "0"}, {"forward_args": 5}):
        with pytest.raises(pw.PullbackWidgetsTypeError, match=r"layers|forward_args"):
            pw.PullbackSession(model, x, **kwargs)
    session = pw.PullbackSession(model, x, layers=(name for name in ["1"]))
    with pytest.raises(pw.PullbackWidgetsTypeError, match="did you mean 'temperature'"):
        session.settings.temprature = 0.05  # a new attribute that nothing read, before
    with pytest.raises(pw.PullbackWidgetsError, match="gate must be one of"):
        pw.pullback_ascent(model, x, 0, method="gradient", gate="bogus", progress=False)
    small = pw.pullback_ascent(model, x, 0, steps=1, progress=False)
    large = pw.pullback_ascent(model, torch.rand(1, 3, 10, 10), 0, steps=1, progress=False)
    with pytest.raises(pw.PullbackWidgetsError, match="one size"):
        pw.ascent.stack_results(iter([small, large]))
    assert pw.ascent.stack_results(iter([small, small])).images[0].shape[0] == 2
