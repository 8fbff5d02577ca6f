"""Property tests: random small ReLU / ReLU6 / max-pool networks against the slow references."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pullback_widgets as pw
from tests.reference import frozen_gate_clamp, frozen_gate_pool

ACTIVATIONS = ("relu", "relu_inplace", "relu6")


@st.composite
def networks(draw):
    """(conv / activation / max-pool blocks ending in a linear layer, input side, seed)."""
    input_size = size = draw(st.integers(6, 12))
    channels, layers = 3, []
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(1, 4))
        layers.append(nn.Conv2d(channels, out, 3, padding=1))
        channels = out
        kind = draw(st.sampled_from(ACTIVATIONS))
        layers.append(nn.ReLU(inplace=kind == "relu_inplace") if kind != "relu6"
                      else nn.ReLU6())
        if draw(st.booleans()) and size >= 3:
            kernel = draw(st.integers(2, 3))
            stride = draw(st.integers(1, 2))
            padding = draw(st.integers(0, kernel // 2))
            ceil_mode = draw(st.booleans())
            pool = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
            layers.append(pool)
            size = pool(torch.zeros(1, 1, size, size)).shape[-1]
    layers += [nn.Flatten(), nn.Linear(channels * size * size, 3)]
    return layers, input_size, draw(st.integers(0, 2**16))


def _reference_forward(layers, x, temperature, gate, detached):
    for layer in layers:
        if isinstance(layer, nn.ReLU6):
            x = frozen_gate_clamp(x, temperature, gate, 0.0, 6.0)
        elif isinstance(layer, nn.ReLU):
            x = frozen_gate_clamp(x, temperature, gate)
        elif isinstance(layer, nn.MaxPool2d):
            x = frozen_gate_pool(x, layer.kernel_size, layer.stride, layer.padding,
                                 temperature, gate, ceil_mode=layer.ceil_mode,
                                 detached=detached)
        else:
            x = layer(x)
    return x


@settings(max_examples=40, deadline=None)
@given(net=networks(), temperature=st.floats(0.05, 5.0),
       gate=st.sampled_from(["sigmoid", "normal_cdf", "hard"]), target=st.integers(0, 2),
       pool_weights=st.sampled_from(["differentiated", "detached"]))
def test_random_networks_match_the_reference(net, temperature, gate, target, pool_weights):
    layers, size, seed = net
    torch.manual_seed(seed)
    model = nn.Sequential(*layers).double().eval()
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=0.8)  # big enough for ReLU6 to clip
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        plain = model(x)
    actual = pw.excitation_pullback(model, x, target, temperature=temperature, gate=gate,
                                    pool_weights=pool_weights)
    xg = x.clone().requires_grad_()
    out = _reference_forward(list(model), xg, temperature, gate, pool_weights == "detached")
    torch.testing.assert_close(out.detach(), plain)
    (expected,) = torch.autograd.grad(out[:, target].sum(), xg)
    torch.testing.assert_close(actual, expected)

