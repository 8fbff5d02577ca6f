"""ReLUs and other gates written by hand, as masks: each one is named, or softened, or no gate.

Each case below, but the two marked as guards, failed before a review of the mask routes: a
gate with a hard backward that the notice did not name (after a soft ReLU, the notice said
nothing at all), or a learned mask named as a gate of the input.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pullback_widgets as pw
from pullback_widgets.interception import MASK_GATE
from tests.reference import plain_input_gradient

MASK = {MASK_GATE: 1}


class _SoftReluThen(nn.Module):
    """A soft ReLU, then ``helper``: where the helper's gate goes unnamed, the session has
    nothing to say, so the map looks soft throughout."""

    def __init__(self, helper):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)
        self.branch = nn.Conv2d(3, 4, 3)
        self.logits = nn.Parameter(torch.tensor([1.0, -1.0, 2.0, -0.5]))
        self.helper = helper

    def forward(self, x):
        h = F.relu(self.conv(x)) - 0.3
        return self.head(self.helper(h, self, x).mean((2, 3)))


def _session(helper):
    torch.manual_seed(0)
    model = _SoftReluThen(helper).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = pw.PullbackSession(model, torch.rand(2, 3, 8, 8))
    return session, [str(w.message) for w in caught]


def _step_under_no_grad(step):
    def helper(h, model, x):
        with torch.no_grad():
            gate = step(h)
        return h * gate
    return helper


def _into_a_constant(h, model, x):
    keep = torch.zeros_like(h)
    keep[h > 0] = 1.0
    return h * keep


def _relu_then_learned_scale(h, model, x):
    y = (h > 0).float()
    y *= h
    return y * model.logits[:, None, None]


def _masks_combined_in_a_loop(h, model, x):
    mask = h > 0
    for _ in range(40):  # each | would double a mask's record of what it compared
        mask = mask | mask.roll(1, dims=3)
    return h * mask


@pytest.mark.parametrize(("helper", "named"), [
    # Casts, copies and views of a mask, and masks combined: only .float(), .to(), .type(),
    # ~ and nonzero passed a mask on.
    (lambda h, m, x: h * (h > 0).int(), MASK),
    (lambda h, m, x: h * (h > 0).long(), MASK),
    (lambda h, m, x: h * (h > 0).clone(), MASK),
    (lambda h, m, x: h * (h > 0).detach(), MASK),
    (lambda h, m, x: h * (h.mean(1) > 0)[:, None], MASK),
    (lambda h, m, x: h * ((h > 0) & (h < 0.5)), MASK),  # a ReLU6 by hand
    (lambda h, m, x: h * torch.logical_and(h > 0, h < 0.5), MASK),
    (lambda h, m, x: h * ((h > 0) * 1.0), MASK),
    (lambda h, m, x: h * (1 - (h < 0).float()), MASK),
    (lambda h, m, x: h * ((h > 0).float() * 0.9 + 0.1), MASK),  # a leaky ReLU by hand
    (lambda h, m, x: torch.zeros_like(h).index_put(torch.where(h > 0), h[torch.where(h > 0)]),
     MASK),
    (_into_a_constant, MASK),
    (_masks_combined_in_a_loop, MASK),
    # Comparisons that were not seen: ==, !=, signbit, a path value on the right.
    (lambda h, m, x: h * (h == h.amax(1, keepdim=True)), MASK),  # a max by hand
    (lambda h, m, x: h * (h != 0), MASK),
    (lambda h, m, x: h * ~torch.signbit(h), MASK),
    (lambda h, m, x: h * (torch.zeros(()) < h), MASK),
    (lambda h, m, x: h * torch.gt(torch.zeros_like(h), h), MASK),
    (_step_under_no_grad(lambda h: torch.heaviside(h, torch.tensor(0.0))), MASK),
    (_step_under_no_grad(lambda h: (torch.sign(h) + 1) / 2), MASK),
    # Applied by keyword, or by an alias.
    (lambda h, m, x: h.masked_fill(mask=h < 0, value=0.0), MASK),
    (lambda h, m, x: h.clone().masked_fill_(mask=h < 0, value=0.0), MASK),
    (lambda h, m, x: h.multiply(h > 0), MASK),
    # A mask of values that feed the mask alone is a gate of the input all the same (a guard:
    # the audit now looks for the values compared on the input's path).
    (lambda h, m, x: h * (m.branch(x) > 0), MASK),
    # Plain nodes the audit did not know: a sign's zero gradient, a clamp to a tensor bound.
    (lambda h, m, x: h * (torch.sign(h) + 1) / 2, {"sign": 1}),
    (lambda h, m, x: h.clamp_min(torch.zeros(())), {"clamp": 1}),
    (lambda h, m, x: h.clone().clamp_max_(torch.zeros(())), {"clamp": 1}),
])
def test_gates_written_by_hand_are_named_after_a_soft_relu(helper, named):
    session, caught = _session(helper)
    assert session.gated_kinds == {"relu": 1}
    assert session.plain_gate_ops == named
    assert len(caught) == 1 and all(name in caught[0] for name in named)
    # The forward and its hard backward stay the model's own.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hard = session.pullback(1, gate="hard")
    assert torch.equal(hard, plain_input_gradient(session, 1))


@pytest.mark.parametrize("helper", [
    lambda h, m, x: h * (m.logits[:, None, None] > 0),  # a view of the parameter
    lambda h, m, x: h * (m.logits[:, None, None].sigmoid() > 0.5).float(),
    lambda h, m, x: h.masked_fill(2 * m.logits[:, None, None] <= 0, 0.0),
    # A guard: masks' views were not followed before, so this one went unnamed.
    lambda h, m, x: h * (m.logits.sigmoid() > 0.5).float()[:, None, None],
])
def test_a_learned_mask_computed_from_parameters_alone_is_no_gate(helper):
    # Only a comparison of the parameter itself was known as one: its view, or a value
    # computed from it, was named as a gate of the input.
    session, caught = _session(helper)
    assert session.plain_gate_ops == {} and session.gated_kinds == {"relu": 1}
    assert caught == []


def test_a_relu_multiplied_into_its_mask_in_place_is_counted_once():
    # y = (h > 0).float(); y *= h left y remembered as a mask: y's next product was named too.
    session, _ = _session(_relu_then_learned_scale)
    assert session.plain_gate_ops == MASK
