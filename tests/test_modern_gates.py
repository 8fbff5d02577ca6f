"""Gates beyond ReLU (SiLU, GELU, Hardswish, leaky, LayerNorm, GroupNorm) and per-kind
temperatures, against the slow frozen-gate references of tests/reference_modern.py."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import pullback_widgets as pw
from pullback_widgets.gates import GateSettings
from pullback_widgets.model_helpers import default_temperatures
from tests import reference_modern as ref

KIND_MAP = {"silu": 0.7, "gelu": 2.5, "relu": 0.2, "hardswish": 0.5}  # the rest: defaults


class ModernOpNet(nn.Module):
    """A small CNN that calls every modern gate in every supported form (see forward)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.silu = nn.SiLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.gelu = nn.GELU()
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.hardswish = nn.Hardswish(inplace=True)
        self.prelu = nn.PReLU(8, init=0.2)
        self.ln = nn.LayerNorm(8)
        self.leaky = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(8, num_classes)
        with torch.no_grad():
            self.prelu.weight.uniform_(0.05, 0.4)
            for norm in (self.gn, self.ln):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = self.silu(self.conv1(x))                                 # nn.SiLU(inplace=True)
        x = self.gelu(self.gn(self.conv2(x)))                        # nn.GroupNorm, nn.GELU
        x = F.silu(x * 1.5) + F.gelu(x, approximate="tanh")          # functional, tanh GELU
        x = self.hardswish(self.conv3(x) * 3)                        # nn.Hardswish(inplace)
        x = self.prelu(x - 0.3)                                      # nn.PReLU per channel
        x = F.group_norm(x, 4, eps=1e-3)                             # functional, no affine
        x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)       # LayerNorm2d style
        x = F.leaky_relu_(x * 2 - 0.5, 0.2)                          # functional, in place
        x = self.leaky(F.layer_norm(x, x.shape[-2:]))                # over (H, W); module
        x = F.hardswish(x)                                           # functional
        return self.fc(x.mean((2, 3)))


def modern_reference(net: ModernOpNet, x, temperature, gate):
    t = {kind: ref.kind_temperature(temperature, kind) for kind in ref.DEFAULTS}
    x = ref.frozen_silu(net.conv1(x), t["silu"])
    x = ref.frozen_gelu(ref.frozen_group_norm(net.conv2(x), 2, net.gn.weight, net.gn.bias,
                                              net.gn.eps), t["gelu"])
    x = ref.frozen_silu(x * 1.5, t["silu"]) + ref.frozen_gelu(x, t["gelu"], "tanh")
    x = ref.frozen_hardswish(net.conv3(x) * 3, t["hardswish"])
    x = ref.frozen_leaky(x - 0.3, net.prelu.weight, t["relu"], gate)
    x = ref.frozen_group_norm(x, 4, None, None, 1e-3)
    x = ref.frozen_layer_norm(x.permute(0, 2, 3, 1), (8,), net.ln.weight, net.ln.bias,
                              net.ln.eps).permute(0, 3, 1, 2)
    x = ref.frozen_leaky(x * 2 - 0.5, 0.2, t["relu"], gate)
    x = ref.frozen_leaky(ref.frozen_layer_norm(x, tuple(x.shape[-2:]), None, None, 1e-5),
                         0.1, t["relu"], gate)
    x = ref.frozen_hardswish(x, t["hardswish"])
    return net.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def modern_net():
    torch.manual_seed(0)
    return ModernOpNet().double().eval()


@pytest.mark.parametrize("temperature", [0.25, 1.0, 4.0, KIND_MAP])
@pytest.mark.parametrize("gate", ["sigmoid", "normal_cdf"])
def test_every_form_matches_the_frozen_gate_reference(modern_net, temperature, gate):
    x = torch.rand(2, 3, 9, 9, dtype=torch.float64)
    actual = pw.excitation_pullback(modern_net, x, 1, temperature=temperature, gate=gate)
    reference = ref.input_gradient(
        lambda t: modern_reference(modern_net, t, temperature, gate), x, 1)
    torch.testing.assert_close(actual, reference, rtol=1e-9, atol=1e-12)


def test_every_form_is_intercepted(modern_net):
    session = pw.PullbackSession(modern_net, torch.rand(1, 3, 8, 8, dtype=torch.float64))
    assert session.gated_kinds == {"silu": 2, "gelu": 2, "hardswish": 2, "relu": 3, "norm": 4}


def test_hard_gate_and_forward_are_the_model_own_bit_for_bit():
    torch.manual_seed(1)
    net = ModernOpNet().eval()
    x = torch.rand(2, 3, 10, 10)
    leaf = x.clone().requires_grad_()
    plain_logits = net(leaf)
    (plain,) = torch.autograd.grad(plain_logits[:, 2].sum(), leaf)
    session = pw.PullbackSession(net, x, gate="hard")
    assert torch.equal(session.logits, plain_logits)
    assert torch.equal(session.pullback(2), plain)


@pytest.mark.parametrize("op", [
    lambda x, w, b: F.group_norm(x, 3, w, b),
    lambda x, w, b: F.layer_norm(x, (5,), w[:5], b[:5]),
    lambda x, w, b: F.prelu(x, w),
])
def test_model_weights_get_their_plain_gradients(op):
    # Norm weights and biases and PReLU slopes are not gates: given the gradient arriving at
    # the op, theirs is autograd's own (the norm's statistics do not depend on them).
    torch.manual_seed(2)
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(6, dtype=torch.float64, requires_grad=True)
    bias = torch.rand(6, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    with pw.soft_gating(nn.Identity(), temperature=0.5):
        soft = torch.autograd.grad(op(x, weight, bias), (weight, bias), grad_out,
                                   allow_unused=True, materialize_grads=True)
    plain = torch.autograd.grad(op(x, weight, bias), (weight, bias), grad_out,
                                allow_unused=True, materialize_grads=True)
    for s, p in zip(soft, plain):
        torch.testing.assert_close(s, p)


@pytest.mark.parametrize(("name", "kwargs"), [
    ("efficientnet_b0", {}),
    ("convnext_atto", {"ls_init_value": 1.0}),  # layer scale 1e-6 would hide every branch
])
def test_timm_models_match_the_frozen_gate_reference(name, kwargs):
    torch.manual_seed(3)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.rand(1, 3, 64, 64)
    session = pw.PullbackSession(model, x)
    assert session.gated_calls > 0
    for temperature in (0.5, 2.0, {"silu": 0.8, "gelu": 0.4}, None):
        actual = session.pullback(3, temperature=temperature) if temperature is not None \
            else pw.PullbackSession(model, x).pullback(3)
        expected = ref.input_gradient(ref.frozen_copy(model, temperature or {}), x, 3)
        ref.assert_matches(actual, expected, relative_error=1e-5)  # float32; T * 1.01: 1e-3
    plain = ref.input_gradient(model, x, 3)
    assert torch.equal(session.pullback(3, gate="hard"), plain)


# ---------------------------------------------------------------- per-kind temperatures

def test_a_kind_not_named_takes_the_model_default():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.SiLU())
    model.default_temperature = 0.7
    assert default_temperatures(model) == {**ref.DEFAULTS, "relu": 0.7, "pool": 0.7}
    model.default_temperatures = {"silu": 2.0}
    settings = GateSettings({"gelu": 0.1}, defaults=default_temperatures(model))
    assert [settings.temperature_of(k) for k in ("relu", "pool", "silu", "gelu")] \
        == [0.7, 0.7, 2.0, 0.1]
    assert GateSettings(0.4).temperature_of("attention") == 0.4  # a float sets every kind
    assert GateSettings({"relu": 0.4}, pool_temperature=0.9).temperature_of("pool") == 0.9


def test_paper_latest_pins_the_later_code_temperatures():
    torch.manual_seed(5)
    net = ModernOpNet().double().eval()
    net.default_temperatures = {"silu": 0.4, "gelu": 3.0, "hardswish": 0.7}
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    expected = pw.excitation_pullback(
        net, x, 0, gate="normal_cdf", temperature={"relu": 0.6, "silu": 1.6, "gelu": 1.0,
                                                   "hardswish": 0.7})
    assert torch.equal(pw.excitation_pullback(net, x, 0, **pw.PAPER_LATEST), expected)


def test_temperature_none_gives_each_kind_its_default():
    torch.manual_seed(4)
    net = ModernOpNet().double().eval()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    expected = pw.excitation_pullback(net, x, 0, temperature=dict(ref.DEFAULTS))
    assert torch.equal(pw.excitation_pullback(net, x, 0), expected)
    assert not torch.allclose(pw.excitation_pullback(net, x, 0, temperature=0.3), expected)


@pytest.mark.parametrize(("temperature", "pool_temperature", "message"), [
    ({"sílu": 1.0}, None, "did you mean 'silu'"),
    ({"gelu": 0.0}, None, "temperature\\['gelu'\\] must be a finite number > 0"),
    ({"pool": 0.3}, 0.5, "pool_temperature is an alias"),
    ("1.0", None, "temperature must be a number"),
    (10 ** 400, None, "temperature must be a finite number > 0, got one beyond float's range"),
    ({"relu": 0.3}, -(10 ** 400), "pool_temperature must be a finite number > 0"),
])
def test_bad_temperatures_are_refused_and_change_nothing(temperature, pool_temperature,
                                                        message):
    settings = GateSettings(0.5)
    with pytest.raises(pw.PullbackWidgetsError, match=message):
        settings.update(temperature, "normal_cdf", pool_temperature)
    assert (settings.temperature, settings.gate, settings.pool_temperature) == \
        (0.5, "sigmoid", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("op", "slope"), [
    (F.silu, 0.0), (F.gelu, 0.0), (lambda z: F.gelu(z, approximate="tanh"), 0.0),
    (F.hardswish, 0.0), (lambda z: F.leaky_relu(z, 0.1), 0.1),
])
def test_tiny_temperatures_give_the_step_gate(op, slope, dtype):
    z = torch.linspace(-3, 3, 40, dtype=dtype).requires_grad_()  # 0 is not on the grid
    with pw.soft_gating(nn.Identity(), temperature=1e-30):
        (grad,) = torch.autograd.grad(op(z), z, torch.ones_like(z))
    step = torch.where(z > 0, 1.0, slope).to(dtype)
    assert torch.equal(grad, step)
