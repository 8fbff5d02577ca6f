"""The soft-gated ops against textbook forms: window loops, frozen gates, autograd."""

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm

import pullback_widgets as pw
from pullback_widgets.gates import (
    GateSettings,
    PoolGeometry,
    SoftClamp,
    SoftMaxPool2d,
    soft_max_pool_backward,
)
from tests.reference import FrozenGateReLU, frozen_gate_copy, gate_value, window_loop_pool_grad

POOL_CASES = [
    # kernel, stride, padding, dilation, ceil_mode, (H, W)
    (2, 2, 0, 1, False, (6, 6)),
    (3, 2, 1, 1, False, (7, 7)),
    (3, 2, 1, 1, True, (8, 8)),
    (3, 1, 1, 2, False, (6, 5)),
    (2, 2, 0, 1, True, (5, 7)),
    (3, 3, 0, 1, True, (7, 8)),
    (3, 3, 0, 1, False, (8, 7)),  # the last rows and columns in no window
    (2, 3, 1, 2, False, (9, 10)),
    ((3, 2), (2, 1), (1, 0), (1, 2), False, (7, 9)),  # every argument an (h, w) pair
    ((1, 3), (3, 2), 0, 1, True, (8, 6)),
]


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "ceil_mode", "hw"),
                         POOL_CASES)
@pytest.mark.parametrize("temperature", [0.05, 0.5, 3.0])
def test_soft_pool_backward_equals_window_loop(kernel, stride, padding, dilation, ceil_mode,
                                               hw, temperature):
    torch.manual_seed(0)
    x = torch.randn(2, 2, *hw, dtype=torch.float64)
    out = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    grad_out = torch.randn_like(out)
    expected = window_loop_pool_grad(x, grad_out, kernel, stride, padding, temperature,
                                     dilation, ceil_mode)
    geometry = PoolGeometry.of(kernel, stride, padding, dilation, ceil_mode)
    actual = soft_max_pool_backward(grad_out, x, geometry, temperature)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "ceil_mode", "hw"),
                         POOL_CASES)
@pytest.mark.parametrize("temperature", [0.05, 0.5, 3.0])
def test_detached_soft_pool_backward_equals_window_loop(kernel, stride, padding, dilation,
                                                        ceil_mode, hw, temperature):
    torch.manual_seed(0)
    x = torch.randn(2, 2, *hw, dtype=torch.float64)
    out = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    grad_out = torch.randn_like(out)
    expected = window_loop_pool_grad(x, grad_out, kernel, stride, padding, temperature,
                                     dilation, ceil_mode, detached=True)
    geometry = PoolGeometry.of(kernel, stride, padding, dilation, ceil_mode)
    actual = soft_max_pool_backward(grad_out, x, geometry, temperature, detached=True)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("detached", [False, True])
@pytest.mark.parametrize("chunk_bytes", [1, 700, 1 << 40])  # a channel per chunk, a few, one
def test_soft_pool_in_channel_chunks_equals_window_loop(monkeypatch, chunk_bytes, detached):
    # The backward works through the channels in cache-sized chunks: every chunking gives the
    # window loop's result, for a per-example temperature and for a vmapped grad_out (batched
    # targets), where the last chunk is a partial one.
    monkeypatch.setattr(pw.gates, "_POOL_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 7, dtype=torch.float64)
    geometry = PoolGeometry.of(3, 2, 1)
    grad_outs = torch.randn(3, 2, 5, 4, 4, dtype=torch.float64)
    temperature = torch.tensor([0.2, 0.7], dtype=torch.float64).view(2, 1, 1, 1)
    batched = torch.func.vmap(
        lambda g: soft_max_pool_backward(g, x, geometry, temperature, detached))(grad_outs)
    for grad_out, actual in zip(grad_outs, batched):
        expected = torch.cat([window_loop_pool_grad(x[i:i + 1], grad_out[i:i + 1], 3, 2, 1,
                                                    float(temperature[i]), detached=detached)
                              for i in range(2)])
        torch.testing.assert_close(actual, expected)
        torch.testing.assert_close(
            soft_max_pool_backward(grad_out, x, geometry, temperature, detached), expected)


@pytest.mark.parametrize("detached", [False, True])
@pytest.mark.parametrize("shape", [(4, 7, 28, 28), (3, 10, 56, 56)])
def test_each_soft_pool_chunk_is_computed_as_a_call_of_its_own(monkeypatch, shape, detached):
    # The chunks' buffers are reused: each chunk, the partial last one too, must be laid out as
    # it would be alone. Cut from the full buffers as a strided view, the last one summed its
    # window entries in another order (a review: 1-4 ulp at batch 3-8 on 56 x 56 maps).
    torch.manual_seed(0)
    x = torch.randn(shape)
    geometry = PoolGeometry.of(3, 2, 1)
    grad_out = torch.randn_like(F.max_pool2d(x, 3, 2, 1))
    channel_bytes = 9 * shape[0] * (shape[2] // 2) ** 2 * 4
    monkeypatch.setattr(pw.gates, "_POOL_CHUNK_BYTES", 3 * channel_bytes)  # 3 channels a chunk
    whole = soft_max_pool_backward(grad_out, x, geometry, 0.3, detached)
    for first in range(0, shape[1], 3):
        part = slice(first, min(first + 3, shape[1]))
        alone = soft_max_pool_backward(grad_out[:, part], x[:, part], geometry, 0.3, detached)
        assert torch.equal(whole[:, part], alone)


@pytest.mark.parametrize("detached", [False, True])
@pytest.mark.parametrize(("dtype", "temperature"), [
    (torch.float32, 1e37), (torch.float32, 1e300), (torch.float64, 1e307),
    (torch.bfloat16, 1e38)])
def test_padding_gets_no_weight_at_huge_temperatures(dtype, temperature, detached):
    # Padding was filled with -bound, which gave it no weight only while (-bound - m) / T
    # stayed far below -1: from T ~ 1e36 in float32 (or relative T at activations ~ 1e35) the
    # edge windows shared their gradient with it (a review: 13.2 of 16 at T = 1e38).
    torch.manual_seed(0)
    x = torch.rand(2, 3, 5, 5, dtype=dtype)
    geometry = PoolGeometry.of(3, 2, 1, 1, True)
    grad_out = torch.ones_like(F.max_pool2d(x, 3, 2, 1, ceil_mode=True))
    actual = soft_max_pool_backward(grad_out, x, geometry, temperature, detached)
    expected = window_loop_pool_grad(x.double(), grad_out.double(), 3, 2, 1,
                                     min(temperature, 1e300), ceil_mode=True, detached=detached)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-2, atol=1e-2)
    # Each window's weights sum to 1, padding left out: the gradient sums to the windows' count.
    assert abs(float(actual.double().sum()) - grad_out.numel()) < 1e-3 * grad_out.numel()


def test_detached_soft_pool_gives_each_window_its_gradient_as_weights():
    # Backward = sum_j p_j * delta_j: a window's entries get p_j * g, summing to g; as T -> 0
    # all of it goes to the window's maximum, tied maxima sharing it.
    x = torch.tensor([[[[1.0, 3.0, 5.0, 5.0], [2.0, 0.0, 4.0, 1.0]]]], dtype=torch.float64)
    grad_out = torch.tensor([[[[2.0, 6.0]]]], dtype=torch.float64)
    geometry = PoolGeometry.of(2)
    warm = soft_max_pool_backward(grad_out, x, geometry, 1.0, detached=True)
    p_left = torch.softmax(torch.tensor([1.0, 3.0, 2.0, 0.0], dtype=torch.float64), 0)
    torch.testing.assert_close(warm[0, 0, :, :2].flatten(), 2 * p_left[[0, 1, 2, 3]])
    cold = soft_max_pool_backward(grad_out, x, geometry, 1e-30, detached=True)
    torch.testing.assert_close(cold, torch.tensor([[[[0.0, 2.0, 3.0, 3.0],
                                                     [0.0, 0.0, 0.0, 0.0]]]],
                                                  dtype=torch.float64))


def _vgg11_bn_ceil_mode():
    net = tvm.vgg11_bn(weights=None)
    for layer in net.features:
        if isinstance(layer, torch.nn.MaxPool2d):
            layer.ceil_mode = True  # 40 -> 20 -> 10 -> 5 -> 3 -> 2: two ceil-mode pools
    # The pools are all in the features; a small head instead of the 120M-parameter one.
    net.classifier = torch.nn.Linear(512 * 7 * 7, 10)
    return net


class _DenseNetReference(torch.nn.Module):
    """torchvision DenseNet's forward, its functional final ReLU frozen-gated as well."""

    def __init__(self, reference, temperature, gate):
        super().__init__()
        self.net, self.final_relu = reference, FrozenGateReLU(temperature, gate)

    def forward(self, x):
        out = self.final_relu(self.net.features(x))
        return self.net.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


TORCHVISION_CNNS = {  # name: (builder, input side): padding pools in ResNet and DenseNet
    "resnet18": (lambda: tvm.resnet18(weights=None), 64),
    "vgg11_bn_ceil_mode": (_vgg11_bn_ceil_mode, 40),
    "densenet121": (lambda: tvm.densenet121(weights=None), 48),
}


@pytest.mark.parametrize("pool_weights", ["detached", "differentiated"])
@pytest.mark.parametrize("name", list(TORCHVISION_CNNS))
def test_pool_weights_match_the_window_loop_reference_on_torchvision_cnns(name, pool_weights):
    # The paper's later version (Phi gate at T = 0.6, pool at T = 0.3) against module copies
    # whose ReLUs are frozen-gate references and whose pools loop over windows.
    builder, side = TORCHVISION_CNNS[name]
    torch.manual_seed(0)
    model = builder().double().eval()
    x = torch.rand(1, 3, side, side, dtype=torch.float64)
    actual = pw.excitation_pullback(model, x, 7, temperature=0.6, gate="normal_cdf",
                                    pool_temperature=0.3, pool_weights=pool_weights)
    reference = frozen_gate_copy(model, 0.6, "normal_cdf", 0.3, pool_weights == "detached")
    if name == "densenet121":
        reference = _DenseNetReference(reference, 0.6, "normal_cdf")
    xg = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(reference(xg)[:, 7].sum(), xg)
    cosine = F.cosine_similarity(actual.flatten(), expected.flatten(), dim=0)
    assert cosine >= 0.99999
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("gate", ["sigmoid", "normal_cdf"])
def test_soft_clamp_backward_is_gate_times_grad(gate):
    z = torch.linspace(-8, 14, 101, dtype=torch.float64, requires_grad=True)
    settings = GateSettings(0.7, gate)
    out = SoftClamp.apply(z, lambda t: F.hardtanh(t, 0.0, 6.0), 0.0, 6.0, False, settings)
    assert torch.equal(out, F.relu6(z))
    grad_out = torch.randn_like(z)
    (grad,) = torch.autograd.grad(out, z, grad_out)
    expected = gate_value(z, 0.7, gate) * gate_value(6 - z, 0.7, gate) * grad_out
    torch.testing.assert_close(grad, expected.detach())


def test_settings_are_read_when_the_backward_runs():
    z = torch.randn(50, dtype=torch.float64, requires_grad=True)
    settings = GateSettings(0.3, "sigmoid")
    out = SoftClamp.apply(z, torch.relu, 0.0, None, False, settings)
    settings.update(2.0, "normal_cdf", None)
    (grad,) = torch.autograd.grad(out.sum(), z)
    torch.testing.assert_close(grad, gate_value(z, 2.0, "normal_cdf").detach())


def test_hard_gate_equals_autograd_bit_for_bit():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    settings = GateSettings(0.3, "hard")
    geometry = PoolGeometry.of(3, 2, 1, 1, True)
    pooled = SoftMaxPool2d.apply(x, lambda t: F.max_pool2d(t, 3, 2, 1, ceil_mode=True),
                                 geometry, settings)
    out = SoftClamp.apply(pooled - 0.1, torch.relu, 0.0, None, False, settings)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    (plain,) = torch.autograd.grad(F.relu(F.max_pool2d(x, 3, 2, 1, ceil_mode=True) - 0.1), x,
                                   grad_out)
    assert torch.equal(grad, plain)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("low, high, plain_op", [
    (0.0, None, torch.relu), (0.0, 6.0, F.relu6), (-1.0, 1.0, F.hardtanh)])
def test_hard_clamp_gate_is_autograd_at_kinks_and_nan(inplace, low, high, plain_op):
    values = [float("nan"), -0.0, 0.0, low, high or 3.0, -2.0, 0.5, 7.0, float("inf"),
              -float("inf")]
    base = torch.tensor(values, requires_grad=True)
    settings = GateSettings(0.3, "hard")
    if inplace:
        def hard_op(t):
            return F.hardtanh_(t, low, high) if high is not None else torch.relu_(t)
    else:
        hard_op = plain_op
    out = SoftClamp.apply(base * 1.0, hard_op, low, high, inplace, settings)
    grad_out = torch.arange(1.0, len(values) + 1)
    (grad,) = torch.autograd.grad(out, base, grad_out)
    (plain,) = torch.autograd.grad(plain_op(base * 1.0), base, grad_out)
    assert torch.equal(grad, plain)


def test_inplace_clamp_keeps_the_pre_activation_for_the_gate():
    base = torch.randn(30, dtype=torch.float64, requires_grad=True)
    z = base * 1.0
    settings = GateSettings(0.5, "sigmoid")
    out = SoftClamp.apply(z, torch.relu_, 0.0, None, True, settings)
    assert out is z and torch.equal(z, torch.relu(base))
    (grad,) = torch.autograd.grad(out.sum(), base)
    torch.testing.assert_close(grad, gate_value(base, 0.5, "sigmoid").detach())


def test_unbatched_pool_input():
    x = torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True)
    settings = GateSettings(0.4, "sigmoid")
    out = SoftMaxPool2d.apply(x, lambda t: F.max_pool2d(t, 2), PoolGeometry.of(2), settings)
    assert torch.equal(out, F.max_pool2d(x, 2))
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    expected = window_loop_pool_grad(x[None].detach(), grad_out[None], 2, 2, 0, 0.4)[0]
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize(("temperature", "gate", "error"), [
    (0.0, "sigmoid", ValueError), (-1.0, "sigmoid", ValueError),
    (float("nan"), "sigmoid", ValueError), (float("inf"), "sigmoid", ValueError),
    ("0.3", "sigmoid", TypeError), (0.3, "relu", ValueError), (0.3, None, TypeError),
])
def test_settings_reject_bad_values(temperature, gate, error):
    with pytest.raises(error, match=r"temperature|gate"):
        GateSettings(temperature, gate)
