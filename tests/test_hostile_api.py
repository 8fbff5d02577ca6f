"""The engine's public API tried as a careless user would: each test failed before its fix
(a refused per-call setting, a silently lost default, a crash on an odd shape, a choice read
from a string, a session's own state handed out)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pullback_widgets as pw
from tests.conftest import (
    assert_untouched,
    every_op_net,
    model_snapshot,
    plain_gradient,
    random_image,
)
from tests.reference import reference_pullback


def test_a_calls_pool_temperature_wins_over_the_sessions_under_either_name():
    # pool_temperature is the "pool" kind's alias: a session made with **PAPER_LATEST (which
    # names "pool" in its temperature mapping) refused pullback(..., pool_temperature=0.5) as
    # "disagreeing", and a session's pool_temperature refused a call's temperature={"pool": ..}.
    net, x = every_op_net(), random_image()
    before = model_snapshot(net)
    latest = pw.PullbackSession(net, x, **pw.PAPER_LATEST)
    settings = latest.settings.replaced()
    torch.testing.assert_close(
        latest.pullback(1, pool_temperature=0.5),
        reference_pullback(net, x, 1, 0.6, "normal_cdf", pool_temperature=0.5, detached=True))
    assert latest.settings == settings
    torch.testing.assert_close(latest.pullbacks([1], pool_temperature=0.5)[0],
                               latest.pullback(1, pool_temperature=0.5))

    session = pw.PullbackSession(net, x, temperature=0.4, pool_temperature=0.1)
    torch.testing.assert_close(session.pullback(2, temperature={"relu": 0.4, "pool": 0.7}),
                               reference_pullback(net, x, 2, 0.4, "sigmoid", 0.7))
    assert session.settings == pw.GateSettings(0.4, pool_temperature=0.1)
    session.configure(temperature={"relu": 0.5, "pool": 0.9})
    torch.testing.assert_close(session.pullback(2),
                               reference_pullback(net, x, 2, 0.5, "sigmoid", 0.9))
    # Both names in one call must still agree, and a refused call changes nothing.
    with pytest.raises(pw.PullbackWidgetsError, match="disagree"):
        session.pullback(2, temperature={"pool": 0.2}, pool_temperature=0.3)
    with pytest.raises(pw.PullbackWidgetsError, match="disagree"):
        session.configure(temperature={"pool": 0.2}, pool_temperature=0.3)
    torch.testing.assert_close(session.pullback(2),
                               reference_pullback(net, x, 2, 0.5, "sigmoid", 0.9))
    assert_untouched(net, before)


class _PerExampleScale(nn.Module):
    """Logits scaled by a ReLU of one number per example, (B,): its only gate."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x)
        scale = F.relu(h.mean((1, 2, 3)) + 1.0)  # (B,), > 0 here
        return self.fc(h.mean((2, 3))) * scale[:, None]


def test_relative_mode_reads_a_per_example_vector_as_one_value_each():
    # A gate on a (B,) tensor was refused as "one spread over all its values" for B > 1,
    # though each example has one value there: no spread, the step gate (the README's rule).
    model, x = _PerExampleScale().double().eval(), random_image(3, size=6)
    before = model_snapshot(model)
    relative = pw.excitation_pullback(model, x, 1, temperature_mode="relative")
    torch.testing.assert_close(relative, plain_gradient(model, x, 1))
    for i in range(len(x)):
        assert torch.equal(relative[i:i + 1], pw.excitation_pullback(
            model, x[i:i + 1], 1, temperature_mode="relative"))
    assert_untouched(model, before)


class _EmptyBranch(nn.Module):
    """A gate on an empty slice of channels, on the input's path."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x)
        empty = F.relu(h[:, :0]).sum((1, 2, 3))  # zeros, (B,)
        return self.fc(h.mean((2, 3))) + empty[:, None]


@pytest.mark.parametrize("batch", [1, 2])
def test_relative_mode_on_an_empty_gate_is_no_spread_not_a_crash(batch):
    # The spread of no values was NaN, and its fallback's amax raised an IndexError from
    # inside the backward.
    model, x = _EmptyBranch().double().eval(), random_image(batch, size=6)
    before = model_snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the empty ReLU is the only gate
        pullback = pw.excitation_pullback(model, x, 0, temperature_mode="relative")
    torch.testing.assert_close(pullback, plain_gradient(model, x, 0))
    assert_untouched(model, before)


def test_assigning_settings_keeps_the_models_own_defaults():
    # ``s.settings = pw.GateSettings(...)`` replaced the session's settings, model's defaults
    # and all: temperature=None silently became 0.3 instead of the model's own 0.7.
    net, x = every_op_net(), random_image()
    net.default_temperature = 0.7
    expected = reference_pullback(net, x, 1, 0.7, "normal_cdf")
    session = pw.PullbackSession(net, x)
    own = session.settings
    session.settings = pw.GateSettings(gate="normal_cdf")
    assert session.settings is own and own.gate == "normal_cdf"
    torch.testing.assert_close(session.pullback(1), expected)
    method = pw.ExcitationPullback(net)
    method.settings = pw.GateSettings(gate="normal_cdf")
    torch.testing.assert_close(method.attribute(x, target=1), expected)
    # Anything else broke every later call with an AttributeError; now it is refused.
    for holder in (session, method):
        with pytest.raises(pw.PullbackWidgetsTypeError, match="GateSettings"):
            holder.settings = {"gate": "hard"}
    torch.testing.assert_close(session.pullback(1), expected)


def test_batched_takes_a_bool_not_any_truthy_value():
    net, x = every_op_net(), random_image()
    session = pw.PullbackSession(net, x)
    for bad in ("no", "False", 0.0):
        with pytest.raises(pw.PullbackWidgetsTypeError, match="batched"):
            session.pullbacks([1], batched=bad)
    assert torch.equal(session.pullbacks([1], batched=False)[0], session.pullback(1))


def test_the_sessions_gate_counts_are_handed_out_as_copies():
    # plain_gate_ops and gated_kinds were the session's own dicts: an edit of what a caller
    # got changed the session's notices (and which error a failed backward names).
    net, x = every_op_net(), random_image()
    session = pw.PullbackSession(net, x)
    kinds, notices = dict(session.gated_kinds), session.notices
    session.plain_gate_ops["ELU"] = 3
    session.gated_kinds.clear()
    assert session.notices == notices == ()
    assert session.gated_kinds == kinds and session.plain_gate_ops == {}


def _small_vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, depth=2, num_classes=10).eval()


def test_a_sessions_backward_ignores_the_callers_autocast_at_a_later_call():
    # Under the caller's bfloat16 autocast the soft attention backward's products ran in
    # bfloat16: the same session gave another pullback (6e-3 of its size off).
    vit, x = _small_vit(), torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    session = pw.PullbackSession(vit, x, layers=["blocks.0"])
    plain = session.pullback(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(session.pullback(3), plain)
        unit = session.pullback(pw.Unit("blocks.0", 5))
    assert torch.equal(unit, session.pullback(pw.Unit("blocks.0", 5)))


def test_a_session_made_under_autocast_keeps_it_for_its_later_calls():
    # Made under autocast, its later backwards and the new forward a Unit on a new layer
    # needs ran without it: the new forward's logits differed, and the Unit was refused.
    vit, x = _small_vit(), torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        session = pw.PullbackSession(vit, x)
        inside = session.pullback(3)
        one_shot = pw.excitation_pullback(vit, x, 3)
        unit_inside = pw.PullbackSession(vit, x, layers=["blocks.1"]).pullback(
            pw.Unit("blocks.1", 2))
    assert torch.equal(inside, one_shot)
    assert torch.equal(session.pullback(3), inside)
    assert torch.equal(session.pullback(pw.Unit("blocks.1", 2)), unit_inside)
