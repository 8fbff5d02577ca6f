"""Hostile numerics of the soft gates (issue 10, section 4), one test per case.

The README promises that T -> 0 gives the plain gradient. These cases hold it to that down to
T = 1e-30, in float32 and float16, for the soft max-pool and the ReLU-family gates, and feed them
huge activations, ties and -inf entries. Before the pool was centred on each window's maximum
(and the gates computed in float32 with a capped 1/T), the pool cases returned wrong or all-zero
maps or NaN, and the tiny-T gate cases raised or returned NaN.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pullback_widgets as pw
from pullback_widgets.gates import (
    GateSettings,
    PoolGeometry,
    SoftClamp,
    SoftMaxPool2d,
    soft_max_pool_backward,
)
from tests.reference import window_loop_pool_grad

TINY_TEMPERATURES = [1e-8, 1e-12, 1e-20, 1e-30]
CLAMPS = {  # name: (hard op, low, high)
    "relu": (torch.relu, 0.0, None),
    "relu6": (F.relu6, 0.0, 6.0),
    "hardtanh": (F.hardtanh, -1.0, 1.0),
}


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())


def _small_cnn(dtype: torch.dtype) -> nn.Module:
    """Conv / ReLU / padded max-pool / conv / ReLU6 / ceil-mode max-pool / linear."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU6(), nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 4))
    nn.init.normal_(net[0].weight, std=3.0)  # first pool's inputs in the tens
    nn.init.normal_(net[3].weight, std=0.1)  # ReLU6 inputs on both sides of 0 and 6
    return net.to(dtype).eval()


def _plain_gradient(model, x, target):
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
    assert grad.abs().amax() > 0  # a live path, or the comparison says nothing
    return grad


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_network_pullback_reaches_the_plain_gradient_at_tiny_temperature(dtype, temperature):
    # The old pool lost the 1 of (s_j - sum p s + 1) once s = w / T was large: relative error
    # 0.94 at T = 1e-8 and an all-zero map from 1e-12 on.
    model = _small_cnn(dtype)
    x = torch.rand(2, 3, 11, 11, generator=torch.Generator().manual_seed(1)).to(dtype)
    plain = _plain_gradient(model, x, 2)
    pullback = pw.excitation_pullback(model, x, 2, temperature=temperature)
    assert torch.isfinite(pullback).all()
    assert _relative_error(pullback, plain) < (1e-6 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("detached", [False, True])
def test_soft_pool_alone_reaches_the_hard_pool_at_tiny_temperature(detached, dtype,
                                                                   temperature):
    torch.manual_seed(2)
    x = (40 + torch.randn(2, 3, 9, 9) * 4).to(dtype)  # distinct values around 40
    geometry = PoolGeometry.of(3, 2, 1, 1, True)
    grad_out = torch.randn(F.max_pool2d(x.float(), *geometry.as_args()).shape).to(dtype)
    actual = soft_max_pool_backward(grad_out, x, geometry, temperature, detached)
    xg = x.float().requires_grad_()
    (expected,) = torch.autograd.grad(F.max_pool2d(xg, *geometry.as_args()), xg,
                                      grad_out.float())
    assert actual.dtype == dtype
    assert _relative_error(actual, expected) < 1e-3


def test_float16_pool_inputs_near_40_at_the_slider_minimum_match_float32():
    # The old code, in float16 at T = 0.01: relative error 0.3-0.9 against float32.
    torch.manual_seed(3)
    x32 = 40 + torch.randn(2, 4, 12, 12)
    x16 = x32.half()
    geometry = PoolGeometry.of(3, 2, 1)
    grad_out = torch.randn(2, 4, 6, 6)
    half = soft_max_pool_backward(grad_out.half(), x16, geometry, 0.01)
    full = window_loop_pool_grad(x16.double(), grad_out.half().double(), 3, 2, 1, 0.01)
    assert _relative_error(half, full) < 2e-3


def test_float16_pool_at_t_1e_5_is_finite_and_hard():
    # The old code gave NaN here.
    torch.manual_seed(4)
    x = (40 + torch.randn(1, 2, 8, 8) * 2).half()
    geometry = PoolGeometry.of(2)
    grad_out = torch.randn(1, 2, 4, 4).half()
    actual = soft_max_pool_backward(grad_out, x, geometry, 1e-5)
    xg = x.float().requires_grad_()
    (expected,) = torch.autograd.grad(F.max_pool2d(xg, 2), xg, grad_out.float())
    assert torch.isfinite(actual).all()
    assert _relative_error(actual, expected) < 1e-3


@pytest.mark.parametrize("temperature", [1e-8, 1e-30, 1e-39, 1e-45])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("clamp", list(CLAMPS))
@pytest.mark.parametrize("gate", ["sigmoid", "normal_cdf"])
def test_relu_family_gates_are_the_hard_gates_at_tiny_temperature(gate, clamp, dtype,
                                                                   temperature):
    # The old gates raised "value cannot be converted to type float without overflow" below
    # T = 3e-39 (float32) or 1.5e-5 (float16), or returned NaN.
    hard_op, low, high = CLAMPS[clamp]
    # Pre-activations on both sides of both kinks, none exactly at a kink, some tiny.
    z = torch.tensor([-50.0, -7.0, -1.5, -1e-3, 3e-5, 0.4, 0.99, 1.01, 5.9, 6.1, 30.0])
    z = z.to(dtype).requires_grad_()
    grad_out = torch.linspace(0.5, 2.0, len(z)).to(dtype)
    settings = GateSettings(1.0, gate)
    settings.temperature = temperature  # below any floor a constructor may apply
    out = SoftClamp.apply(z, hard_op, low, high, False, settings)
    (soft,) = torch.autograd.grad(out, z, grad_out)
    (plain,) = torch.autograd.grad(hard_op(z), z, grad_out)
    assert torch.isfinite(soft).all()
    assert torch.equal(soft, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_relative_mode_at_tiny_temperature_is_the_plain_gradient(dtype):
    # The old code: NaN, silently (T times the spread underflowed to 0, 0 * inf).
    model = _small_cnn(dtype)
    x = torch.rand(2, 3, 11, 11, generator=torch.Generator().manual_seed(5)).to(dtype)
    plain = _plain_gradient(model, x, 1)
    pullback = pw.excitation_pullback(model, x, 1, temperature=1e-30,
                                      temperature_mode="relative")
    assert torch.isfinite(pullback).all()
    assert _relative_error(pullback, plain) < (1e-6 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("scale", [1e-6, 1e-13, 1e-20, 1e-200, 1e100])
def test_relative_mode_does_not_depend_on_the_input_scale(scale):
    # A bias-free ReLU net is positively homogeneous: each gate sees z / (T std z), whatever
    # the input's scale. The old code floored the spread at 1e-12, so tiny activations got
    # gates near 1/2 (cosine 0.71 with the unscaled pullback at 1e-20).
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 4, 3, padding=1, bias=False), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 5, bias=False)).eval().double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    settings = dict(temperature=0.3, temperature_mode="relative")
    base = pw.excitation_pullback(model, x, 1, **settings)
    scaled = pw.excitation_pullback(model, x * scale, 1, **settings)
    # The pool's T is relative too, so the map only scales (by the product of the layers'
    # homogeneity: here 1, a linear map of the input).
    torch.testing.assert_close(scaled, base, rtol=1e-9, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relative_spread_of_values_near_the_largest_float_is_measured_not_capped(dtype):
    # Squares of values near 1e37 (float32) overflow in std: the spread was inf, turned into
    # the largest float, T ~ 1e38 and gates near 1/2 (off by 0.46).
    top = torch.finfo(dtype).max
    z = (torch.randn(2, 1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
         * (top / 20)).to(dtype).requires_grad_()
    with pw.soft_gating(torch.nn.Identity(), temperature=0.3, temperature_mode="relative"):
        out = torch.relu(z)
    (gates,) = torch.autograd.grad(out, z, torch.ones_like(z))
    spread = (z.detach().double() / top).std(dim=1, keepdim=True) * top
    expected = torch.sigmoid(z.detach().double() / (0.3 * spread))
    torch.testing.assert_close(gates.double(), expected, rtol=0, atol=1e-6)


def test_huge_pool_activations_with_small_differences_match_the_centred_reference():
    # Values near 1e6 in float32, differences comparable to T = 1: the soft pool is invariant to
    # a common shift, so the reference works on x - 1e6, exact in float64. The old code lost
    # the 1 of (s - y + 1) to float32 rounding at s = 1e6.
    torch.manual_seed(6)
    x = 1e6 + torch.randn(2, 3, 8, 8) * 2
    geometry = PoolGeometry.of(3, 2, 1)
    grad_out = torch.randn(2, 3, 4, 4)
    actual = soft_max_pool_backward(grad_out, x, geometry, 1.0)
    expected = window_loop_pool_grad(x.double() - 1e6, grad_out.double(), 3, 2, 1, 1.0)
    assert _relative_error(actual, expected) < 1e-4


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 1e30), (torch.float32, 3e38),
                                              (torch.float16, 6e4)])
def test_huge_pool_activations_at_the_top_of_the_range_give_the_hard_gradient(dtype, scale):
    # Differences far above T: the soft pool is the hard one. float32 3e38 also tests the
    # clipping at a quarter of the range (ties among values above 8.5e37).
    torch.manual_seed(7)
    x = (scale * (1 - torch.rand(1, 2, 6, 6) * 0.2)).to(dtype)
    geometry = PoolGeometry.of(2)
    grad_out = torch.randn(1, 2, 3, 3).to(dtype)
    actual = soft_max_pool_backward(grad_out, x, geometry, 0.3)
    assert torch.isfinite(actual).all()
    xg = x.float().requires_grad_()
    (hard,) = torch.autograd.grad(F.max_pool2d(xg, 2), xg, grad_out.float())
    if scale > 1e38:  # every window ties at the clip: each keeps its total gradient
        windows = F.avg_pool2d(actual.float(), 2) * 4
        torch.testing.assert_close(windows, grad_out.float())
    else:
        assert _relative_error(actual, hard) < 1e-3


def test_tied_maxima_share_the_window_gradient_at_tiny_temperature():
    # Two equal maxima at 40 with T = 1e-12: each gets half. The old code gave 0 to both
    # (the 1 of s - y + 1 lost at s = 4e13).
    x = torch.tensor([[[[40.0, 40.0], [12.0, 39.0]]]])
    grad_out = torch.tensor([[[[3.0]]]])
    actual = soft_max_pool_backward(grad_out, x, PoolGeometry.of(2), 1e-12)
    torch.testing.assert_close(actual, torch.tensor([[[[1.5, 1.5], [0.0, 0.0]]]]))


@pytest.mark.parametrize("temperature", [0.3, 1e-20])
def test_minus_inf_entries_with_ceil_mode_give_no_nan(temperature):
    # A model that pads with -inf before a ceil-mode pool: the old code returned NaN (0 * -inf).
    torch.manual_seed(8)
    # 7 + 1 columns of -inf, and the last ceil-mode window hangs over the edge as well.
    x = F.pad(torch.randn(1, 2, 7, 7, dtype=torch.float64), (0, 1, 0, 1), value=-float("inf"))
    geometry = PoolGeometry.of(3, 2, 0, 1, True)
    grad_out = torch.randn(F.max_pool2d(x, *geometry.as_args()).shape, dtype=torch.float64)
    actual = soft_max_pool_backward(grad_out, x, geometry, temperature)
    assert torch.isfinite(actual).all()
    finite = torch.where(torch.isinf(x), -1e30, x)  # weight 0 either way
    expected = window_loop_pool_grad(finite, grad_out, 3, 2, 0, temperature, 1, True)
    torch.testing.assert_close(actual, expected)


def test_minus_inf_entries_at_tiny_temperature_are_the_plain_gradient_through_the_op():
    x = F.pad(torch.randn(1, 2, 6, 6), (1, 1, 1, 1), value=-float("inf")).requires_grad_()
    settings = GateSettings(1e-20, "sigmoid")
    geometry = PoolGeometry.of(3, 2, 0, 1, True)
    out = SoftMaxPool2d.apply(x, lambda t: F.max_pool2d(t, 3, 2, ceil_mode=True), geometry,
                              settings)
    grad_out = torch.randn_like(out)
    (soft,) = torch.autograd.grad(out, x, grad_out)
    (plain,) = torch.autograd.grad(F.max_pool2d(x, 3, 2, ceil_mode=True), x, grad_out)
    torch.testing.assert_close(soft, plain)


def test_a_class_whose_logit_is_nan_is_a_clear_error_and_units_before_it_still_work():
    # A finite input whose activations overflow: every logit NaN, yet the pullback came out
    # finite, with no notice (found by a hostile review).
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(4 * 2 * 2, 5)).eval()
    with torch.no_grad():
        model[0].weight.mul_(100)
    x = torch.rand(2, 3, 4, 4) * 1e37
    x[0] = torch.rand(3, 4, 4)  # example 0 is fine
    with pytest.raises(pw.PullbackWidgetsError, match=r"example 1, class 3, holds NaN"):
        pw.excitation_pullback(model, x, 3)
    with pytest.raises(pw.PullbackWidgetsError, match="holds NaN"):
        pw.ExcitationPullback(model).attribute(x)
    fine = pw.excitation_pullback(model, x[:1], 3)
    assert torch.isfinite(fine).all()
    unit = pw.excitation_pullback(model, x, pw.Unit("0", 1, 2, 2))  # before the overflow
    assert torch.isfinite(unit).all()
