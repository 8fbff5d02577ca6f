"""Gate settings given every way the API takes them, each pullback checked against a slow
reference written here (a frozen-gate forward per op, in float64, each kind at the T the
README's rules give it): a pullback computed with other settings than those asked for is a
silent wrong answer."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pullback_widgets as pw
from tests.conftest import assert_untouched, model_snapshot

PACKAGE_DEFAULTS = {"relu": 0.3, "pool": 0.3, "silu": 1.6, "gelu": 1.0, "hardswish": 1.0,
                    "attention": 1.0}


# ---------------------------------------------------------------- the model and its reference

class PlainOps:
    """The model's own ops (what the engine intercepts)."""

    relu, relu6, silu, hardswish, gelu = F.relu, F.relu6, F.silu, F.hardswish, F.gelu

    @staticmethod
    def pool(x: Tensor) -> Tensor:
        return F.max_pool2d(x, 2)

    @staticmethod
    def group_norm(x: Tensor, norm: nn.GroupNorm) -> Tensor:
        return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)

    @staticmethod
    def layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    @staticmethod
    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    # A point in the backward between the attention and the convolutions (see MidBackward).
    @staticmethod
    def mid(h: Tensor) -> Tensor:
        return h


def _sigmoid(u: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-u))


def _normal_cdf(u: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(u / math.sqrt(2.0)))


_GATES = {"sigmoid": _sigmoid, "normal_cdf": _normal_cdf}


def _frozen(z: Tensor, value: Tensor, gate: Tensor) -> Tensor:
    """``value`` forward, ``grad * gate`` backward."""
    return z * gate.detach() + (value - z * gate).detach()


def _soft(value: Tensor, soft: Tensor) -> Tensor:
    """``value`` forward, ``soft``'s gradient backward."""
    return value.detach() + soft - soft.detach()


class ReferenceOps:
    """The README's rule per kind, by hand: each kind at ``temperatures[kind]``, times each
    example's standard deviation of the op's input in relative mode."""

    def __init__(self, temperatures: Mapping[str, float], gate: str, mode: str,
                 pool_weights: str, attention_weights: str) -> None:
        self.temperatures, self.gate, self.mode = dict(temperatures), _GATES[gate], mode
        self.pool_weights, self.attention_weights = pool_weights, attention_weights

    def t(self, kind: str, z: Tensor) -> float | Tensor:
        base = self.temperatures[kind]
        if self.mode == "absolute":
            return base
        spread = z.detach().flatten(1).std(dim=1)
        return base * spread.view(-1, *([1] * (z.dim() - 1)))

    def relu(self, z: Tensor) -> Tensor:
        return _frozen(z, F.relu(z), self.gate(z / self.t("relu", z)))

    def relu6(self, z: Tensor) -> Tensor:
        t = self.t("relu", z)
        return _frozen(z, F.relu6(z), self.gate(z / t) * self.gate((6.0 - z) / t))

    def silu(self, z: Tensor) -> Tensor:
        return _frozen(z, F.silu(z), _sigmoid(z / self.t("silu", z)))

    def hardswish(self, z: Tensor) -> Tensor:
        gate = ((z / self.t("hardswish", z) + 3.0) / 6.0).clamp(0.0, 1.0)
        return _frozen(z, F.hardswish(z), gate)

    def gelu(self, z: Tensor) -> Tensor:
        return _frozen(z, F.gelu(z), _normal_cdf(z / self.t("gelu", z)))

    def pool(self, x: Tensor) -> Tensor:
        windows = x.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)  # (B, C, Ho, Wo, 4)
        t = self.t("pool", x)
        t = t if isinstance(t, float) else t.view(-1, 1, 1, 1, 1)
        centred = windows - windows.detach().amax(-1, keepdim=True)
        weights = torch.softmax(centred / t, dim=-1)
        if self.pool_weights == "detached":
            weights = weights.detach()
        return _soft(F.max_pool2d(x, 2), (weights * windows).sum(-1))

    @staticmethod
    def group_norm(x: Tensor, norm: nn.GroupNorm) -> Tensor:
        groups = x.view(len(x), norm.num_groups, -1)
        mean = groups.detach().mean(-1, keepdim=True)
        var = groups.detach().var(-1, unbiased=False, keepdim=True)
        soft = ((groups - mean) / torch.sqrt(var + norm.eps)).view_as(x)
        soft = soft * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
        return _soft(PlainOps.group_norm(x, norm), soft)

    @staticmethod
    def layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
        mean = x.detach().mean(-1, keepdim=True)
        var = x.detach().var(-1, unbiased=False, keepdim=True)
        soft = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
        return _soft(PlainOps.layer_norm(x, norm), soft)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        t = self.t("attention", scores)
        # Centred (softmax does not see the shift), so that T = 1e-300 overflows nothing.
        scores = scores - scores.detach().amax(-1, keepdim=True)
        if self.attention_weights == "detached":
            weights = torch.softmax(scores.detach() / t, dim=-1).detach()
        else:  # the value of S/T, the gradient of S
            weights = torch.softmax(scores + (scores / t - scores).detach(), dim=-1)
        return _soft(PlainOps.attention(q, k, v), weights @ v)

    mid = staticmethod(PlainOps.mid)


class Mixed(nn.Module):
    """ReLU, max-pool, ReLU6, SiLU, GroupNorm, Hardswish, GELU, LayerNorm and one attention
    head by F.scaled_dot_product_attention, in float64; 6x6 inputs."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.group_norm = nn.GroupNorm(2, 4)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.layer_norm = nn.LayerNorm(4)
        self.qkv = nn.Linear(4, 12)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():  # affine parameters away from 1 and 0, so they matter
            for norm in (self.group_norm, self.layer_norm):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
        self.double().eval()
        self.ops = PlainOps

    def forward(self, x: Tensor) -> Tensor:
        ops = self.ops
        h = ops.pool(ops.relu(self.conv1(x)))
        h = ops.silu(ops.relu6(20.0 * self.conv2(h) + 5.5) - 3.0)
        h = ops.hardswish(4.0 * ops.group_norm(h, self.group_norm))
        h = ops.mid(ops.gelu(self.conv3(h)))
        tokens = ops.layer_norm(h.flatten(2).transpose(1, 2), self.layer_norm)  # (B, 9, 4)
        q, k, v = self.qkv(tokens).view(len(x), 9, 3, 1, 4).permute(2, 0, 3, 1, 4)
        return self.fc(ops.attention(q, k, 3.0 * v).mean(2).flatten(1))


def image(batch: int = 2, seed: int = 1) -> Tensor:
    torch.manual_seed(seed)
    return torch.rand(batch, 3, 6, 6, dtype=torch.float64)


def reference(model: Mixed, x: Tensor, target: int, temperatures: Mapping[str, float], *,
              gate: str = "sigmoid", mode: str = "absolute",
              pool_weights: str = "differentiated",
              attention_weights: str = "detached") -> Tensor:
    """The pullback of ``target`` (every example's logit) with every kind's T given."""
    assert set(temperatures) == set(PACKAGE_DEFAULTS)
    x = x.clone().requires_grad_()
    if gate == "hard":
        (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
        return grad
    model.ops = ReferenceOps(temperatures, gate, mode, pool_weights, attention_weights)
    try:
        (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
    finally:
        model.ops = PlainOps
    return grad


def kinds(base: Mapping[str, float] = PACKAGE_DEFAULTS, **changed: float) -> dict[str, float]:
    return {**base, **changed}


def assert_same(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_the_reference_tells_the_kinds_apart():
    # Each kind's T moves the pullback by far more than the tolerance, so a kind at a wrong T
    # (also at the package's default instead of the model's) cannot pass unseen.
    model, x = Mixed(), image()
    base = reference(model, x, 1, PACKAGE_DEFAULTS)
    for kind in PACKAGE_DEFAULTS:
        moved = reference(model, x, 1, kinds(**{kind: PACKAGE_DEFAULTS[kind] * 1.5}))
        assert (moved - base).abs().max() > 1e-6 * base.abs().max(), kind
    with pw.soft_gating(model) as settings:
        xg = x.clone().requires_grad_()
        logits = model(xg)
        assert torch.equal(logits, model(x))  # bit for bit inside the context
        (grad,) = torch.autograd.grad(logits[:, 1].sum(), xg)
    assert settings.temperature is None
    assert_same(grad, base)


# ---------------------------------------------------------------- the pool T's two names

@pytest.mark.parametrize("call", [
    {"temperature": 0.9},
    {"temperature": {"relu": 0.9}},
    {"temperature": {"gelu": 2.0, "attention": 0.5}},
    dict(pw.PAPER_V1),
])
def test_a_calls_temperature_replaces_the_sessions_pool_t_under_either_name(call):
    # pool_temperature is the "pool" kind's alias: a session made with pool_temperature=0.5
    # and one made with temperature={"pool": 0.5} are the same session, and a call's
    # temperature (a number sets every kind; a mapping the kinds it names, the rest at the
    # model's defaults) replaces the session's whole temperature, pool included. The first
    # kept its pool at 0.5 where the second (rightly) did not.
    model, x = Mixed(), image()
    before = model_snapshot(model)
    by_alias = pw.PullbackSession(model, x, pool_temperature=0.5)
    by_kind = pw.PullbackSession(model, x, temperature={"pool": 0.5})
    temperature = call["temperature"]
    expected_t = {kind: temperature for kind in PACKAGE_DEFAULTS} \
        if isinstance(temperature, float) else kinds(**temperature)
    expected = reference(model, x, 2, expected_t, gate=call.get("gate", "sigmoid"))
    for session in (by_kind, by_alias):
        assert_same(session.pullback(2, **call), expected)
        assert_same(session.pullbacks([2], **call)[0], expected)
        # The call changed nothing: the session's pool is at 0.5 again.
        assert_same(session.pullback(2), reference(model, x, 2, kinds(pool=0.5)))
    # configure's temperature replaces the session's the same way, under either name.
    for session in (by_kind, by_alias):
        session.configure(**call)
        assert_same(session.pullback(2), expected)
    assert_untouched(model, before)


# ---------------------------------------------------------------- sharing and threads

def test_settings_assigned_to_two_sessions_are_copies_not_one_shared_mapping():
    # "s.settings = pw.GateSettings(...) copies those settings in": the mapping was shared,
    # so a change in place to one session's temperatures changed the other's pullbacks.
    model, x = Mixed(), image()
    shared = pw.GateSettings(temperature={"relu": 0.5, "gelu": 2.0})
    first, second = pw.PullbackSession(model, x), pw.PullbackSession(model, x)
    first.settings = shared
    second.settings = shared
    expected = reference(model, x, 0, kinds(relu=0.5, gelu=2.0))
    assert_same(second.pullback(0), expected)
    first.settings.temperature["relu"] = 4.0  # first's own temperatures, changed in place
    assert_same(first.pullback(0), reference(model, x, 0, kinds(relu=4.0, gelu=2.0)))
    assert_same(second.pullback(0), expected)
    assert shared.temperature == {"relu": 0.5, "gelu": 2.0}


class MidBackward(torch.autograd.Function):
    """Identity; its backward (after the attention's, before every convolution's gates) lets
    another thread change the session's settings, and waits until it has."""

    @staticmethod
    def forward(ctx, h, reached, changed):
        ctx.reached, ctx.changed = reached, changed
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        ctx.reached.set()
        assert ctx.changed.wait(10.0)
        return grad, None, None


@pytest.mark.parametrize("change", ["in place", "update", "assign"])
def test_a_settings_change_from_another_thread_mid_backward_does_not_reach_that_backward(
        change):
    # Each call gets the result of its own settings: all old, never some layers at new ones.
    model, x = Mixed(), image()
    reached, changed = threading.Event(), threading.Event()

    def mid(h):
        return MidBackward.apply(h, reached, changed)

    model.ops = type("MidOps", (PlainOps,), {"mid": staticmethod(mid)})
    with pytest.warns(UserWarning):  # the Function's own backward is named, not gated
        session = pw.PullbackSession(model, x, temperature={"relu": 0.5, "attention": 2.0})
    model.ops = PlainOps

    def other_thread():
        assert reached.wait(10.0)
        if change == "in place":
            session.settings.temperature["relu"] = 7.0
        elif change == "update":
            session.settings.update(temperature={"relu": 7.0, "attention": 2.0})
        else:
            session.settings = pw.GateSettings(temperature={"relu": 7.0, "attention": 2.0})
        changed.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        during = session.pullback(0)
    finally:
        changed.set()
        thread.join()
    assert_same(during, reference(model, x, 0, kinds(relu=0.5, attention=2.0)))
    reached.clear()
    changed.set()  # later backwards pass straight through
    assert_same(session.pullback(0), reference(model, x, 0, kinds(relu=7.0, attention=2.0)))


# ---------------------------------------------------------------- every door, one answer

SETTINGS = [
    ({}, {}),
    ({"temperature": 0.8}, {"t": 0.8}),
    ({"temperature": {"silu": 0.4, "attention": 3.0}, "gate": "normal_cdf"},
     {"silu": 0.4, "attention": 3.0, "gate": "normal_cdf"}),
    ({"temperature": 0.7, "pool_temperature": 0.2, "pool_weights": "detached",
      "attention_weights": "differentiated"},
     {"t": 0.7, "pool": 0.2, "pool_weights": "detached", "attention_weights": "differentiated"}),
    ({"temperature": {"relu": 0.4, "hardswish": 0.6}, "temperature_mode": "relative"},
     {"relu": 0.4, "hardswish": 0.6, "mode": "relative"}),
    ({"temperature": 0.5, "gate": "hard"}, {"gate": "hard"}),
    (dict(pw.PAPER_V1), {"relu": 0.3, "pool": 0.3}),
    (dict(pw.PAPER_LATEST), {"relu": 0.6, "pool": 0.3, "silu": 1.6, "gelu": 1.0,
                             "attention": 1.0, "gate": "normal_cdf",
                             "pool_weights": "detached"}),
]


def _expected(model: Mixed, x: Tensor, target: int, spec: dict) -> Tensor:
    """The reference for ``spec``: "t" sets every kind; kind names set one; the rest keep the
    model's defaults (this model's: relu and pool 1.0, as the shapes model's)."""
    spec = dict(spec)
    every = spec.pop("t", None)
    defaults = kinds(relu=1.0, pool=1.0, gelu=0.7)
    temperatures = {kind: every if every is not None else spec.pop(kind, defaults[kind])
                    for kind in PACKAGE_DEFAULTS}
    for kind in PACKAGE_DEFAULTS:
        temperatures[kind] = spec.pop(kind, temperatures[kind])
    return reference(model, x, target, temperatures, **spec)


def _model_with_own_defaults() -> Mixed:
    model = Mixed()
    model.default_temperature = 1.0  # as load_model sets on the shapes model
    model.default_temperatures = {"gelu": 0.7}
    return model


@pytest.mark.parametrize(("settings", "spec"), SETTINGS)
def test_every_door_applies_the_settings_asked_for(settings, spec):
    model, x = _model_with_own_defaults(), image()
    before, plain = model_snapshot(model), model(x)
    expected = _expected(model, x, 1, spec)
    doors = {
        "one-shot": pw.excitation_pullback(model, x, 1, **settings),
        "session": pw.PullbackSession(model, x, **settings).pullback(1),
        "ExcitationPullback": pw.ExcitationPullback(model, **settings).attribute(x, 1),
    }
    session = pw.PullbackSession(model, x, temperature=5.0, gate="normal_cdf",
                                 pool_temperature=0.05, temperature_mode="relative",
                                 pool_weights="detached", attention_weights="differentiated")
    assert torch.equal(session.logits, plain)
    full = {"temperature": None, "gate": "sigmoid", "pool_temperature": None,
            "temperature_mode": "absolute", "pool_weights": "differentiated",
            "attention_weights": "detached", **settings}
    overrides = {name: value for name, value in full.items() if value is not None}
    # Per call: every field the session holds otherwise is given, and temperature=None (the
    # session's) can only be set through update.
    if full["temperature"] is not None or full["pool_temperature"] is not None:
        doors["per call"] = session.pullback(1, **overrides)
        doors["pullbacks looped"] = session.pullbacks([1, 0], batched=False, **overrides)[0]
        doors["pullbacks batched"] = session.pullbacks([0, 1], batched=True, **overrides)[1]
    session.settings.update(**full)
    doors["settings.update"] = session.pullback(1)
    session.settings = pw.GateSettings(**full)
    doors["settings ="] = session.pullback(1)
    with pw.soft_gating(model, **settings):
        xg = x.clone().requires_grad_()
        logits = model(xg)
        assert torch.equal(logits, plain)
        (doors["soft_gating"],) = torch.autograd.grad(logits[:, 1].sum(), xg)
    for door, pullback in doors.items():
        torch.testing.assert_close(pullback, expected, rtol=1e-10, atol=1e-12, msg=door)
    step = pw.pullback_ascent(model, x.clamp(0.01, 0.99), 1, steps=1, step_size=0.01,
                              eps=10.0, progress=False, **settings)
    direction = _expected(model, x.clamp(0.01, 0.99), 1, spec)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
    torch.testing.assert_close(step.images[1] - x.clamp(0.01, 0.99), 0.01 * direction)
    assert_untouched(model, before)


def test_per_call_settings_do_not_leak_into_later_calls_or_other_sessions():
    model, x = _model_with_own_defaults(), image()
    session = pw.PullbackSession(model, x, **pw.PAPER_LATEST)
    other = pw.PullbackSession(model, x, **pw.PAPER_LATEST)
    latest = _expected(model, x, 2, SETTINGS[-1][1])
    calls = [
        {"temperature": 3.0, "gate": "sigmoid"},
        {"pool_temperature": 0.05, "temperature_mode": "relative"},
        {"attention_weights": "differentiated", "pool_weights": "differentiated"},
        dict(pw.PAPER_V1),
        {"gate": "hard"},
    ]
    for call in calls:
        session.pullback(2, **call)
        session.pullbacks([0, 2], **call)
        assert_same(session.pullback(2), latest)
        assert_same(other.pullback(2), latest)
    assert session.settings == other.settings == pw.PullbackSession(
        model, x, **pw.PAPER_LATEST).settings


def test_relative_temperature_gives_each_example_its_own_spread():
    # Two examples a thousand times apart in scale: each must get T times its own spread per
    # op, the same pullback as alone.
    model, x = Mixed(), image()
    x = torch.cat([x[:1] * 1e-3, x[1:] * 1e3])
    for settings in ({"temperature": 0.5, "gate": "normal_cdf"},
                     {"temperature": {"pool": 0.2, "attention": 0.7},
                      "pool_weights": "detached"}):
        temperature = settings["temperature"]
        spec = {"t": temperature} if isinstance(temperature, float) else dict(temperature)
        spec.update(mode="relative", **{k: v for k, v in settings.items()
                                        if k != "temperature"})
        together = pw.excitation_pullback(model, x, 0, temperature_mode="relative", **settings)
        for i in range(2):
            alone = pw.excitation_pullback(model, x[i:i + 1], 0, temperature_mode="relative",
                                           **settings)
            assert_same(together[i:i + 1], alone)
        assert_same(together, _expected_package(model, x, 0, spec))


def _expected_package(model: Mixed, x: Tensor, target: int, spec: dict) -> Tensor:
    spec = dict(spec)
    every = spec.pop("t", None)
    temperatures = {kind: every if every is not None else spec.pop(kind, PACKAGE_DEFAULTS[kind])
                    for kind in PACKAGE_DEFAULTS}
    return reference(model, x, target, temperatures, **spec)


# ---------------------------------------------------------------- odd numbers

class Drifting(Mapping):
    """A mapping whose values change after it is handed over."""

    def __init__(self, items):
        self.items_ = dict(items)

    def __getitem__(self, key):
        return self.items_[key]

    def __iter__(self):
        return iter(self.items_)

    def __len__(self):
        return len(self.items_)


@pytest.mark.parametrize(("temperature", "as_float"), [
    (np.float32(0.75), float(np.float32(0.75))),
    (np.float64(0.4), 0.4),
    (np.int64(2), 2.0),
    (2, 2.0),
    (Fraction(1, 3), 1 / 3),
    (1e-300, 1e-300),
    (1e300, 1e300),
])
def test_odd_numbers_are_the_temperature_they_stand_for(temperature, as_float):
    model, x = Mixed(), image()
    expected = reference(model, x, 0, {kind: as_float for kind in PACKAGE_DEFAULTS})
    assert torch.isfinite(expected).all()
    session = pw.PullbackSession(model, x)
    every_kind = {kind: temperature for kind in PACKAGE_DEFAULTS}
    pool_by_alias = {kind: temperature for kind in PACKAGE_DEFAULTS if kind != "pool"}
    for pullback in (pw.excitation_pullback(model, x, 0, temperature=temperature),
                     session.pullback(0, temperature=temperature),
                     session.pullback(0, temperature=every_kind),
                     session.pullback(0, temperature=pool_by_alias,
                                      pool_temperature=temperature)):
        assert_same(pullback, expected)


@pytest.mark.parametrize("bad", [True, False, np.bool_(True), float("inf"), float("nan"), -0.0,
                                 0, torch.tensor(0.5), "0.5", 10 ** 400])
def test_odd_values_that_are_no_temperature_are_refused_everywhere(bad):
    model, x = Mixed(), image()
    session = pw.PullbackSession(model, x, temperature=0.5)
    settings = session.settings.replaced()
    for call in (lambda: session.pullback(0, temperature=bad),
                 lambda: session.pullback(0, temperature={"gelu": bad}),
                 lambda: session.pullback(0, pool_temperature=bad),
                 lambda: session.configure(temperature={"pool": bad}),
                 lambda: session.settings.update(temperature=bad),
                 lambda: pw.excitation_pullback(model, x, 0, temperature=bad),
                 lambda: pw.ExcitationPullback(model, temperature={"relu": bad})):
        with pytest.raises((pw.PullbackWidgetsError, pw.PullbackWidgetsTypeError)):
            call()
    assert session.settings == settings


def test_a_mapping_is_read_when_given_not_when_it_changes_later():
    model, x = Mixed(), image()
    drifting = Drifting({"relu": np.float64(0.5), "attention": np.float32(2.0)})
    session = pw.PullbackSession(model, x, temperature=drifting)
    with pw.soft_gating(model, temperature=drifting):
        xg = x.clone().requires_grad_()
        logits = model(xg)
    drifting.items_["relu"] = 9.0
    expected = reference(model, x, 0, kinds(relu=0.5, attention=2.0))
    assert_same(session.pullback(0), expected)
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), xg)
    assert_same(grad, expected)


class _PausingSettings(pw.GateSettings):
    """Settings whose first read of ``gate`` once armed lets another thread run an update
    (waiting at most a second for it): a reader that takes the fields one by one, outside
    the settings' lock, sees some old fields and some new."""

    def __getattribute__(self, name):
        if name == "gate" and threading.current_thread() is threading.main_thread():
            armed = object.__getattribute__(self, "__dict__").pop("armed", None)
            if armed is not None:
                reached, changed = armed
                reached.set()
                changed.wait(1.0)
        return super().__getattribute__(name)


def test_excitation_pullback_takes_its_settings_in_one_step():
    # attribute() read temperature, then gate, pool_temperature, ... one at a time: an update
    # from another thread between two reads gave the pool T 0.5, neither the old 0.2 nor the
    # new 0.7.
    model, x = Mixed(), image()
    explainer = pw.ExcitationPullback(model, temperature=0.5, pool_temperature=0.2)
    settings = _PausingSettings(0.5, pool_temperature=0.2)
    explainer._settings = settings  # the explainer's own settings object, made to pause
    reached, changed = threading.Event(), threading.Event()
    settings.__dict__["armed"] = (reached, changed)

    def other_thread():
        assert reached.wait(10.0)
        explainer.settings.update(temperature={"relu": 0.7, "pool": 0.7}, pool_temperature=None)
        changed.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        attribution = explainer.attribute(x, target=0)
    finally:
        thread.join()
    expected_old = reference(model, x, 0, {**{kind: 0.5 for kind in PACKAGE_DEFAULTS},
                                           "pool": 0.2})
    assert_same(attribution, expected_old)
    assert_same(explainer.attribute(x, target=0), reference(model, x, 0, kinds(relu=0.7,
                                                                                pool=0.7)))


def test_defaults_given_for_some_kinds_keep_the_models_own_for_the_rest():
    # settings.update(defaults={"gelu": 0.5}) put the package's 0.3 in place of the model's
    # own relu and pool defaults (1.0, as on the shapes model), and an ExcitationPullback
    # ignored its settings' defaults altogether (its sessions took the model's again).
    model, x = Mixed(), image()
    model.default_temperature = 1.0
    expected = reference(model, x, 0, kinds(relu=1.0, pool=1.0, gelu=0.5))
    session = pw.PullbackSession(model, x)
    session.settings.update(defaults={"gelu": 0.5})
    assert_same(session.pullback(0), expected)
    session.settings.defaults = {"gelu": 0.5}
    assert_same(session.pullback(0), expected)
    explainer = pw.ExcitationPullback(model)
    explainer.settings.update(defaults={"gelu": 0.5})
    assert_same(explainer.attribute(x, target=0), expected)


@pytest.mark.parametrize("preset", [pw.PAPER_V1, pw.PAPER_LATEST])
def test_a_preset_passed_to_a_relative_sessions_call_keeps_its_absolute_temperatures(preset):
    # The presets' temperatures are in units of the pre-activations; passed to a call of a
    # session made with temperature_mode="relative", they were read as relative ones.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 3, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten()).double().eval()
    x = torch.rand(1, 3, 10, 10, dtype=torch.float64)
    relative = pw.PullbackSession(model, x, temperature_mode="relative")
    got = relative.pullback(1, **preset)
    assert torch.equal(got, pw.excitation_pullback(model, x, 1, **preset))
    assert relative.settings.temperature_mode == "relative"  # the call's only
