"""The engine tried with empty tensors, odd call forms and odd dtypes (a third hostile review).

Each test failed on the engine before this review; its comment says how.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pullback_widgets as pw
from tests.conftest import assert_untouched, model_snapshot
from tests.reference import window_loop_pool_grad


class _RoutedNet(nn.Module):
    """Pools the examples a threshold selects, a selection that may be empty (routing, MoE,
    region heads): the pool then sees a batch of none, in a forward of a non-empty batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        picked = h[h.detach().mean((1, 2, 3)) > 1e6]  # no example: (0, 4, 8, 8)
        extra = F.max_pool2d(picked, 2).sum()
        return self.fc(h.mean((2, 3))) + extra


@pytest.mark.parametrize("pool_weights", ["differentiated", "detached"])
@pytest.mark.parametrize("call", [
    lambda t: F.max_pool2d(t, 2),
    lambda t: F.max_pool2d(t, 3, 2, 1, ceil_mode=True),
    nn.MaxPool2d(3, stride=2, padding=1, dilation=2),
])
def test_a_soft_pool_of_an_empty_batch_pulls_back_like_autograd(call, pool_weights):
    # Before: the soft pool's backward divided by the batch size (its chunk size on the CPU)
    # and raised ZeroDivisionError for a batch of none; the plain max-pool gives an empty
    # gradient.
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    with pw.soft_gating(nn.Identity(), temperature=0.5, pool_weights=pool_weights):
        y = call(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.shape == x.shape and grad.dtype == x.dtype


def test_a_model_that_pools_an_empty_selection_gets_its_pullback():
    # Before: ZeroDivisionError from the soft pool's backward, for a model whose forward pools
    # a selection of no example (the plain gradient works).
    torch.manual_seed(0)
    net = _RoutedNet().eval()
    x = torch.rand(2, 3, 8, 8)
    before = model_snapshot(net)
    grad = pw.excitation_pullback(net, x, 1, temperature=1e-30)
    assert_untouched(net, before)
    leaf = x.clone().requires_grad_()
    (plain,) = torch.autograd.grad(net(leaf)[:, 1].sum(), leaf)
    # At a tiny T the ReLU's soft gate is its hard one: the plain gradient.
    torch.testing.assert_close(grad, plain)


@pytest.mark.parametrize("op", [
    F.relu, F.silu, F.gelu, lambda t: F.leaky_relu(t, 0.1),
    lambda t: F.max_pool2d(t, 2), lambda t: F.hardtanh(t, -1.0, 2.0),
])
def test_relative_temperature_on_an_empty_batch_warns_nothing(op):
    # Before: the spread of no example was taken by torch.std over a (0, M) tensor, which
    # warned "std(): degrees of freedom is <= 0" from inside the backward.
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    with pw.soft_gating(nn.Identity(), temperature=0.5, temperature_mode="relative"):
        y = op(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.shape == x.shape


@pytest.mark.parametrize("attention_weights", ["detached", "differentiated"])
@pytest.mark.parametrize("mask", [None, "bool"])
def test_attention_over_no_keys_pulls_back_like_autograd(attention_weights, mask):
    # Before: the softened weights took each row's largest score over no keys, and the
    # backward raised IndexError ("amax(): Expected reduction dim -1 to have non-zero size");
    # torch's attention over no keys gives zeros, and a zero gradient to the queries.
    q = torch.randn(2, 2, 4, 8, requires_grad=True)
    k = torch.randn(2, 2, 0, 8, requires_grad=True)
    v = torch.randn(2, 2, 0, 8, requires_grad=True)
    attn_mask = None if mask is None else torch.ones(4, 0, dtype=torch.bool)
    with pw.soft_gating(nn.Identity(), attention_weights=attention_weights):
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    grads = torch.autograd.grad(y.sum(), (q, k, v), allow_unused=True)
    assert grads[2].shape == v.shape
    if attention_weights == "differentiated":
        assert torch.equal(grads[0], torch.zeros_like(q))
        assert grads[1].shape == k.shape


def test_soft_pool_of_a_non_empty_batch_still_matches_the_window_loop_reference():
    # The guard for empty batches leaves every other case as it was: the slow reference.
    torch.manual_seed(3)
    x = torch.randn(2, 3, 7, 9, requires_grad=True)
    with pw.soft_gating(nn.Identity(), temperature=0.4):
        y = F.max_pool2d(x, 3, 2, 1, 2, True)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    reference = window_loop_pool_grad(x.detach().double(), g.double(), 3, 2, 1, 0.4, 2, True)
    torch.testing.assert_close(grad.double(), reference, rtol=1e-5, atol=1e-6)
