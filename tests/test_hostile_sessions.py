"""A hostile user of one session: what it hands out edited in place, the model changed where
the parameter record cannot see it, and scaled_dot_product_attention calls the ViT tests do not
make (non-square causal, ``scale=``, a mask made from the input)."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import pullback_widgets as pw


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10)).eval()


def image(batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------- what a session hands out

def test_editing_the_logits_in_place_changes_no_later_pullback():
    session = pw.PullbackSession(small_cnn(), image())
    before, logits_before = session.pullback(3), session.logits.detach().clone()
    logits = session.logits
    logits -= logits.max(dim=1, keepdim=True).values  # a softmax made stable, in place
    # It was the backward's root: the pullback became that of logit 3 minus the largest.
    assert torch.equal(session.pullback(3), before)
    assert torch.equal(session.logits, logits_before)


def test_editing_a_recorded_activation_in_place_changes_no_later_unit_pullback():
    session = pw.PullbackSession(small_cnn(), image(), layers=["3"])
    before = session.pullback(pw.Unit("3", 2))
    session.activations["3"].mul_(2)
    assert torch.equal(session.pullback(pw.Unit("3", 2)), before)


def test_editing_the_inputs_in_place_changes_no_later_forward():
    model, x = small_cnn(), image()
    session = pw.PullbackSession(model, x)
    session.inputs.mul_(0)  # e.g. normalised in place to show it
    # A Unit on a new layer runs a new forward: it was run on the edited tensor.
    expected = pw.PullbackSession(model, x, layers=["3"]).pullback(pw.Unit("3", 1))
    assert torch.equal(session.pullback(pw.Unit("3", 1)), expected)
    assert torch.equal(session.inputs, x)


# ---------------------------------------------------------------- a new forward of another model

def test_a_new_forward_of_a_model_changed_by_a_hook_is_refused():
    model, x = small_cnn(), image()
    session = pw.PullbackSession(model, x)
    logits, before = session.logits.detach().clone(), session.pullback(3)
    ablate = torch.tensor([0.0] + [1.0] * 7)[:, None, None]
    handle = model[0].register_forward_hook(lambda module, args, out: out * ablate)
    try:
        assert session.model_unchanged()  # no parameter changed: the record cannot see it
        # The new forward would have replaced the logits and graph of every later call.
        with pytest.raises(pw.PullbackWidgetsError, match="other logits"):
            session.pullback(pw.Unit("3", 1))
        assert torch.equal(session.logits, logits) and session.layers == ()
        assert torch.equal(session.pullback(3), before)
    finally:
        handle.remove()
    expected = pw.PullbackSession(model, x, layers=["3"]).pullback(pw.Unit("3", 1))
    assert torch.equal(session.pullback(pw.Unit("3", 1)), expected)


@pytest.mark.parametrize("change", ["swap", "forward"])
def test_a_module_swapped_or_given_its_own_forward_is_a_changed_model(change):
    # Neither changes a parameter or buffer: the session pulled back through the old ReLU
    # and called the model unchanged (an explorer kept drawing the model as it was).
    model, x = small_cnn(), image()
    session = pw.PullbackSession(model, x)
    session.pullback(3)
    if change == "swap":
        model[1] = nn.Identity()
    else:
        model[4].forward = lambda value: value.abs()
    assert not session.model_unchanged()
    with pytest.raises(pw.PullbackWidgetsError, match="module replaced"):
        session.pullback(3)


def test_a_new_forward_with_timm_fused_attention_switched_off_is_refused():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                            patch_size=8, depth=2, num_classes=10).eval()
    session = pw.PullbackSession(vit, torch.rand(1, 3, 32, 32))
    before = session.pullback(3)
    for block in vit.blocks:  # its attention would be left plain by a new forward
        block.attn.fused_attn = False
    with pytest.raises(pw.PullbackWidgetsError, match="other logits"), \
            pytest.warns(UserWarning, match="by hand"):
        session.pullback(pw.Unit("blocks.1", 3))
    assert session.gated_kinds["attention"] == 2
    assert torch.equal(session.pullback(3), before)


class _OffPathBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.constant_branch = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 5)
        self.register_buffer("constant", torch.ones(1, 3, 4, 4))

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        return self.head(h + self.constant_branch(self.constant).mean())


def test_a_unit_on_a_branch_of_constants_is_refused_as_off_the_input_path():
    session = pw.PullbackSession(_OffPathBranch().eval(), image())
    # Not the no_grad message: nothing in this model runs under no_grad.
    with pytest.raises(pw.PullbackWidgetsError, match="made without the input"):
        session.pullback(pw.Unit("constant_branch", 1))


# ---------------------------------------------------------------- attention calls

def _reference(q, k, v, grad_out, temperature, rule, mask=None, is_causal=False, scale=None):
    """The README's rule written out: A_T = softmax(S/T + mask), S = q·kᵀ·scale; detached:
    constant A_T; differentiated: 1/T passed straight through. A row with no key gets none."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    mask_leaf = None
    if mask is not None and mask.is_floating_point():
        mask = mask_leaf = mask.detach().requires_grad_()
    s = q @ k.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    logits = s / temperature if rule == "detached" else s + (s / temperature - s).detach()
    allowed = torch.ones(s.shape[-2:], dtype=torch.bool)
    if is_causal:
        allowed = allowed.tril()
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        allowed = allowed & (mask != -math.inf)
        logits = logits + mask.masked_fill(~allowed, 0.0)
    weights = torch.softmax(logits.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0)
    if rule == "detached":
        weights = weights.detach()
    inputs = [q, k, v] + ([mask_leaf] if mask_leaf is not None else [])
    return torch.autograd.grad(weights @ v, inputs, grad_out, allow_unused=True,
                               materialize_grads=True)


def _attention_cases():
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(2, 1, 5, 7, generator=g) > 0.5
    keep[0, 0, 2] = False  # a row with no key
    bias = torch.randn(2, 1, 5, 7, generator=g, dtype=torch.float64)
    return {
        "causal, fewer queries than keys": dict(is_causal=True),
        "causal, more queries than keys": dict(is_causal=True, queries=9),
        "scale given": dict(scale=0.37),
        "boolean mask over heads, an empty row": dict(attn_mask=keep),
        "additive mask with -inf, an empty row": dict(attn_mask=bias.masked_fill(~keep, -math.inf)),
        "learned additive mask": dict(attn_mask=bias.clone().requires_grad_()),
    }


@pytest.mark.parametrize("rule", ["detached", "differentiated"])
@pytest.mark.parametrize("case", list(_attention_cases()))
def test_attention_calls_match_the_rule_written_out(case, rule):
    kwargs = dict(_attention_cases()[case])
    queries = kwargs.pop("queries", 5)
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 3, queries, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    grad_out = torch.randn(2, 3, queries, 4, generator=g, dtype=torch.float64)
    inputs = [q, k, v] + ([kwargs["attn_mask"]] if kwargs.get("attn_mask") is not None
                          and kwargs["attn_mask"].requires_grad else [])
    with pw.soft_gating(nn.Identity(), temperature={"attention": 0.6}, attention_weights=rule):
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        actual = torch.autograd.grad(out, inputs, grad_out, allow_unused=True,
                                     materialize_grads=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, **kwargs))
    expected = _reference(q, k, v, grad_out, 0.6, rule, kwargs.get("attn_mask"),
                          kwargs.get("is_causal", False), kwargs.get("scale"))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


class _NaNInChannelOne(nn.Module):
    """An overflow by another name: channel 1 of its input becomes NaN."""

    def forward(self, x):
        return torch.cat([x[:, :1], torch.full_like(x[:, 1:2], math.nan), x[:, 2:]], dim=1)


def test_a_unit_whose_values_are_nan_is_refused_like_a_class():
    # A class whose logit is NaN was refused, but a Unit on NaN activations had a finite
    # pullback of nothing.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _NaNInChannelOne(), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    session = pw.PullbackSession(model, image(batch=2), layers=["1"])
    with pytest.raises(ValueError, match=r"layer '1' holds NaN .* example 0"):
        session.pullback(pw.Unit("1", 1))
    assert session.pullback(pw.Unit("1", 2)).isfinite().all()
