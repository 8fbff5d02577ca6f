"""Hostile checks of the modern gates (attention, norms, z·g(z) activations) on the calls users
make: autocast, backward passes outside the forward's autocast, and the rule written out.

Before their fixes: under autocast (attention is on its lower-precision list, which casts q,
k, v and a float mask inside the call) the soft attention backward computed its weights from
the unrounded float32 q and k, not from the values the model's weights came from (off by
1.6e-2 in bfloat16 where the rule's answer is within 3e-7); and ``gate="hard"`` ran the
model's call again in the backward under the caller's autocast, so a backward outside the
forward's autocast (torch's advice) gave another kernel's gradient, not autograd's own.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pullback_widgets as pw

LOW = [torch.bfloat16, torch.float16]


def _qkv(seed: int = 0, queries: int = 5, keys: int = 7):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(2, 3, queries, 8, generator=g) * 3).requires_grad_()
    k, v = ((torch.randn(2, 3, keys, 8, generator=g) * 3).requires_grad_() for _ in range(2))
    return q, k, v


def _rule(q, k, v, grad_out, temperature, rule, mask=None):
    """The README's rule in float64 on the given values: A_T = softmax(S/T + mask); detached:
    A_T constant; differentiated: 1/T passed straight through."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    logits = s / temperature if rule == "detached" else s + (s / temperature - s).detach()
    if mask is not None:
        logits = logits + mask.double()
    weights = torch.softmax(logits, -1)
    if rule == "detached":
        weights = weights.detach()
    return torch.autograd.grad(weights @ v, (q, k, v), grad_out.double(), allow_unused=True,
                               materialize_grads=True)


@pytest.mark.parametrize("rule", ["detached", "differentiated"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", LOW)
def test_attention_under_autocast_pulls_back_from_the_values_the_op_saw(dtype, masked, rule):
    q, k, v = _qkv()
    mask = torch.randn(5, 7, generator=torch.Generator().manual_seed(1)) * 2 if masked else None
    with pw.soft_gating(nn.Identity(), temperature={"attention": 0.7},
                        attention_weights=rule):
        with torch.autocast("cpu", dtype=dtype):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        actual = torch.autograd.grad(out, (q, k, v), grad_out, allow_unused=True,
                                     materialize_grads=True)
    with torch.autocast("cpu", dtype=dtype):  # the forward is the model's own, bit for bit
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert out.dtype == dtype and all(a.dtype == torch.float32 for a in actual)
    # The op saw q, k, v and the mask rounded to the autocast dtype.
    expected = _rule(*(t.to(dtype) for t in (q, k, v)), grad_out, 0.7, rule,
                     None if mask is None else mask.to(dtype))
    for a, e in zip(actual, expected):
        if rule == "detached" and e.abs().max() == 0:
            assert not a.any()
            continue
        assert float((a.double() - e).norm() / e.norm()) < 1e-5


def test_soft_attention_under_autocast_at_t_1_is_the_plain_value_gradient():
    # Detached at T = 1: A_T is the model's own weights, and grad_v = Aᵀ·grad is autograd's
    # own value gradient (up to the bfloat16 rounding of autograd's own product).
    q, k, v = _qkv(3)
    with pw.soft_gating(nn.Identity(), temperature={"attention": 1.0}):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = F.scaled_dot_product_attention(q, k, v)
        grad_out = torch.ones_like(out)
        (soft,) = torch.autograd.grad(out, v, grad_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (plain,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), v, grad_out)
    unrounded = _rule(q, k, v, grad_out, 1.0, "detached")[2]
    rounded = _rule(*(t.to(torch.bfloat16) for t in (q, k, v)), grad_out, 1.0, "detached")[2]
    assert (soft.double() - rounded).abs().max() < 1e-5 < (rounded - unrounded).abs().max()
    torch.testing.assert_close(soft, plain, rtol=2e-2, atol=2e-2)


class _AutocastAttention(nn.Module):
    """A model that runs attention on float32 q, k, v under autocast (rotary embeddings in
    float32 give these), with a float bias as its mask."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.qkv = nn.Linear(8, 24)
        self.bias = nn.Parameter(torch.randn(2, 6, 6))

    def forward(self, tokens):
        if tokens.dim() == 4:  # an image (B, 8, 2, 3): its 6 pixels are the tokens
            tokens = tokens.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).view(-1, 6, 3, 2, 4).permute(2, 0, 3, 1, 4)
        with torch.autocast("cpu", dtype=self.dtype):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return out.float().mean(1).flatten(1)  # (B, 24) logits


@pytest.mark.parametrize("dtype", LOW)
def test_hard_gate_with_the_backward_outside_autocast_is_autograd_own(dtype):
    # torch's advice: autocast around the forward only. The hard gate's backward ran the call
    # again outside autocast: float32 kernels, another gradient.
    torch.manual_seed(4)
    model = _AutocastAttention(dtype).eval()
    tokens = torch.randn(3, 6, 8, requires_grad=True)
    plain = torch.autograd.grad(model(tokens)[:, 3].sum(), (tokens, model.bias))
    with pw.soft_gating(model, gate="hard"):
        out = model(tokens)
    hard = torch.autograd.grad(out[:, 3].sum(), (tokens, model.bias))
    for h, p in zip(hard, plain):
        assert torch.equal(h, p)
    # And a backward under another autocast than the forward's, the other way round.
    with pw.soft_gating(nn.Identity(), gate="hard"):
        q, k, v = _qkv(5)
        out = F.scaled_dot_product_attention(q, k, v)
        with torch.autocast("cpu", dtype=dtype):
            hard = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    plain = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v),
                                torch.ones_like(out))
    for h, p in zip(hard, plain):
        assert torch.equal(h, p)


@pytest.mark.parametrize("dtype", LOW)
def test_session_hard_gate_of_attention_under_autocast_is_autograd_own(dtype):
    torch.manual_seed(6)
    model = _AutocastAttention(dtype).eval()
    tokens = torch.randn(2, 8, 2, 3)
    leaf = tokens.clone().requires_grad_()
    logits = model(leaf)
    (plain,) = torch.autograd.grad(logits[:, 5].sum(), leaf)
    session = pw.PullbackSession(model, tokens, gate="hard")
    assert torch.equal(session.logits, logits)
    assert torch.equal(session.pullback(5), plain)
