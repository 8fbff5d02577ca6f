"""The engine against the slow references, and every promise it makes about the model."""

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.overrides import _get_current_function_mode_stack

import pullback_widgets as pw
from pullback_widgets.interception import _active_gating_mode
from pullback_widgets.validation import submodules
from tests.conftest import (
    assert_untouched,
    every_op_net,
    model_snapshot,
    plain_gradient,
    random_image,
)
from tests.reference import EveryOpNet, path_sum_pullback, reference_pullback

# tests/test_widgets.py imports these two names from here.
_model_snapshot, _assert_untouched = model_snapshot, assert_untouched


# ---------------------------------------------------------------- against the references

@pytest.mark.parametrize("gate", ["sigmoid", "normal_cdf", "hard"])
@pytest.mark.parametrize("temperature", [0.1, 0.6, 2.0])
def test_pullback_equals_frozen_gate_reference(gate, temperature):
    net, x = every_op_net(), random_image()
    actual = pw.excitation_pullback(net, x, 3, temperature=temperature, gate=gate)
    expected = reference_pullback(net, x, 3, temperature, gate)
    torch.testing.assert_close(actual, expected)


def test_pool_temperature_is_separate():
    net, x = every_op_net(), random_image()
    actual = pw.excitation_pullback(net, x, 1, temperature=0.4, pool_temperature=2.5)
    torch.testing.assert_close(actual, reference_pullback(net, x, 1, 0.4, "sigmoid", 2.5))
    assert not torch.allclose(actual, reference_pullback(net, x, 1, 0.4, "sigmoid"))


@pytest.mark.parametrize("gate", ["sigmoid", "normal_cdf"])
def test_path_sum_form_on_bias_free_mlp(gate):
    torch.manual_seed(3)
    widths = [4, 3, 3, 2]
    weights = [torch.randn(o, i, dtype=torch.float64) for i, o in itertools.pairwise(widths)]
    mlp = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 3, bias=False),
                        nn.ReLU(), nn.Linear(3, 2, bias=False)).double()
    for layer, w in zip(mlp[::2], weights):
        layer.weight.data.copy_(w)
    x = torch.randn(1, 4, dtype=torch.float64)
    with pw.soft_gating(mlp, temperature=0.8, gate=gate):
        xg = x.clone().requires_grad_()
        (actual,) = torch.autograd.grad(mlp(xg)[0, 1], xg)
    expected = path_sum_pullback(weights, x[0], 1, 0.8, gate)
    torch.testing.assert_close(actual[0], expected)


def test_sigmoid_gate_matches_zennit_relu_beta_smooth():
    zennit_core = pytest.importorskip("zennit.core")
    from zennit.rules import ReLUBetaSmooth

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 5, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(5 * 6 * 6, 4)).double().eval()
    x = random_image(1, 10)
    temperature = 0.25
    composite = zennit_core.Composite(module_map=lambda ctx, name, module: (
        ReLUBetaSmooth(beta_smooth=1 / temperature) if isinstance(module, nn.ReLU) else None))
    with composite.context(model) as modified:
        xg = x.clone().requires_grad_()
        (expected,) = torch.autograd.grad(modified(xg)[0, 2], xg)
    actual = pw.excitation_pullback(model, x, 2, temperature=temperature)
    torch.testing.assert_close(actual, expected)


# ---------------------------------------------------------------- forward and limits

def test_forward_is_bit_identical_inside_and_outside():
    net, x = every_op_net(dtype=torch.float32), random_image(dtype=torch.float32)
    with torch.no_grad():
        plain = net(x)
    with pw.soft_gating(net, temperature=0.3):
        inside = net(x.clone().requires_grad_())
    assert torch.equal(inside, plain)
    session = pw.PullbackSession(net, x)
    assert torch.equal(session.logits, plain)
    with torch.no_grad():
        assert torch.equal(net(x), plain)


def test_forward_of_resnet_is_bit_identical():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
    session = pw.PullbackSession(model, x)
    assert torch.equal(session.logits, plain)
    assert session.gated_calls == 1 + 1 + 8 * 2  # stem ReLU, stem max-pool, 2 per block


@pytest.mark.parametrize("gate", ["sigmoid", "normal_cdf"])
def test_small_temperature_gives_the_plain_gradient(gate):
    net, x = every_op_net(), random_image()
    pullback = pw.excitation_pullback(net, x, 2, temperature=1e-7, gate=gate)
    torch.testing.assert_close(pullback, plain_gradient(net, x, 2), rtol=1e-5, atol=1e-9)


def test_hard_gate_is_the_plain_gradient_bit_for_bit():
    net, x = every_op_net(dtype=torch.float32), random_image(dtype=torch.float32)
    pullback = pw.excitation_pullback(net, x, 2, gate="hard")
    assert torch.equal(pullback, plain_gradient(net, x, 2))


def test_large_temperature_makes_the_pullback_input_independent():
    net = every_op_net()
    a = pw.excitation_pullback(net, random_image(1, seed=5), 0, temperature=1e7)
    b = pw.excitation_pullback(net, random_image(1, seed=6), 0, temperature=1e7)
    # Gates deviate from 1/2 by O(z / T): compare at that scale.
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(a.abs().max()))
    c = pw.excitation_pullback(net, random_image(1, seed=5), 0, temperature=0.3)
    d = pw.excitation_pullback(net, random_image(1, seed=6), 0, temperature=0.3)
    assert not torch.allclose(c, d, rtol=1e-2)


# ---------------------------------------------------------------- every form of ReLU

def test_densenet_functional_relu_is_gated():
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8,
                                        bn_size=2, num_classes=5).eval()
    relu_module_calls = []
    handles = [m.register_forward_hook(lambda *a: relu_module_calls.append(1))
               for m in model.modules() if isinstance(m, nn.ReLU)]
    session = pw.PullbackSession(model, torch.rand(1, 3, 32, 32))
    for handle in handles:
        handle.remove()
    # every nn.ReLU call, the stem max-pool, and the final functional F.relu in forward()
    assert session.gated_calls == len(relu_module_calls) + 1 + 1


def test_functional_relu_changes_the_result():
    """A module-swapping implementation would miss DenseNet-style functional calls."""
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1, self.lin2 = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.lin2(F.relu(self.lin1(x.flatten(1)), inplace=True))

    torch.manual_seed(2)
    model = Functional().double()
    x = torch.rand(1, 6, 1, 1, dtype=torch.float64)
    soft = pw.excitation_pullback(model, x, 0, temperature=1.0)
    hard = plain_gradient(model, x, 0)
    assert not torch.allclose(soft, hard)


# ---------------------------------------------------------------- targets

def test_per_example_targets_equal_single_example_pullbacks():
    net, x = every_op_net(), random_image(3)
    together = pw.excitation_pullback(net, x, [0, 4, 2], temperature=0.5)
    for i, target in enumerate([0, 4, 2]):
        alone = pw.excitation_pullback(net, x[i:i + 1], target, temperature=0.5)
        torch.testing.assert_close(together[i:i + 1], alone)
    as_tensor = pw.excitation_pullback(net, x, torch.tensor([0, 4, 2]), temperature=0.5)
    torch.testing.assert_close(as_tensor, together)


def test_unit_target_matches_the_reference_hidden_unit():
    net, x = every_op_net(), random_image(1)
    unit_map = pw.excitation_pullback(net, x, pw.Unit("conv4", 3), temperature=0.5)
    unit_px = pw.excitation_pullback(net, x, pw.Unit("conv4", 3, y=1, x=2), temperature=0.5)

    def reference(select):
        from tests.reference import frozen_gate_clamp, frozen_gate_pool
        xg = x.clone().requires_grad_()
        h = frozen_gate_clamp(net.bn1(net.conv1(xg)), 0.5, "sigmoid")
        h = frozen_gate_pool(h, 3, 2, 1, 0.5, "sigmoid")
        y = frozen_gate_clamp(net.conv2(h), 0.5, "sigmoid")
        y = frozen_gate_clamp(net.conv3(y) * 4, 0.5, "sigmoid", 0.0, 6.0)
        h = frozen_gate_clamp(h + y, 0.5, "sigmoid")
        h = frozen_gate_pool(h, 2, 2, 0, 0.5, "sigmoid", ceil_mode=True)
        (grad,) = torch.autograd.grad(select(net.conv4(h)), xg)
        return grad

    torch.testing.assert_close(unit_map, reference(lambda a: a[0, 3].mean()))
    torch.testing.assert_close(unit_px, reference(lambda a: a[0, 3, 1, 2]))


def test_unit_on_a_layer_whose_output_is_overwritten_in_place():
    """bn1's output is overwritten by ReLU(inplace=True); the Unit must see the pre-ReLU value."""
    net, x = every_op_net(), random_image(1)
    session = pw.PullbackSession(net, x, layers=["bn1"])
    with torch.no_grad():
        expected = net.bn1(net.conv1(x))
    torch.testing.assert_close(session.activations["bn1"], expected)
    assert (expected < 0).any()


def test_session_update_equals_fresh_computation():
    net, x = every_op_net(), random_image()
    session = pw.PullbackSession(net, x, temperature=0.3, layers=["conv5"])
    session.pullback(1)
    for temperature, gate, target in [(0.05, "sigmoid", 4), (3.0, "normal_cdf", 0),
                                      (1.0, "hard", 2), (0.7, "sigmoid", pw.Unit("conv5", 1))]:
        updated = session.pullback(target, temperature=temperature, gate=gate)
        fresh = pw.excitation_pullback(net, x, target, temperature=temperature, gate=gate)
        torch.testing.assert_close(updated, fresh)


def test_batched_targets_equal_a_loop():
    net, x = every_op_net(), random_image(2)
    session = pw.PullbackSession(net, x, layers=["conv4"])
    targets = [0, [1, 3], pw.Unit("conv4", 2), pw.Unit("conv4", 5, 0, 1), 4]
    batched = session.pullbacks(targets, temperature=0.4, batched=True)
    looped = session.pullbacks(targets, temperature=0.4, batched=False)
    assert batched.shape == looped.shape == (5, *x.shape)
    for k, target in enumerate(targets):
        single = session.pullback(target, temperature=0.4)
        torch.testing.assert_close(batched[k], single)
        assert torch.equal(looped[k], single)


def test_unit_on_unrecorded_layer_costs_one_more_forward():
    net, x = every_op_net(), random_image(1)
    session = pw.PullbackSession(net, x)
    result = session.pullback(pw.Unit("conv2", 0))
    assert session.layers == ("conv2",)
    torch.testing.assert_close(result, pw.excitation_pullback(
        net, x, pw.Unit("conv2", 0), temperature=pw.model_helpers.default_temperature(net)))


def test_captum_style_attribute():
    net, x = every_op_net(), random_image(2)
    method = pw.ExcitationPullback(net, temperature=0.5, gate="normal_cdf")
    torch.testing.assert_close(method.attribute(x, target=[1, 2]),
                               pw.excitation_pullback(net, x, [1, 2], temperature=0.5,
                                                      gate="normal_cdf"))
    predicted = net(x).argmax(1)
    torch.testing.assert_close(method.attribute(x),
                               pw.excitation_pullback(net, x, predicted, temperature=0.5,
                                                      gate="normal_cdf"))
    assert method.has_convergence_delta() is False


# ---------------------------------------------------------------- the model is never harmed

def test_model_untouched_after_use():
    net, x = every_op_net(), random_image()
    net.fc.weight.requires_grad_(False)
    before = model_snapshot(net)
    pw.excitation_pullback(net, x, 1)
    session = pw.PullbackSession(net, x, layers=["conv3", "bn1"])
    session.pullbacks([1, pw.Unit("conv3", 0)])
    assert_untouched(net, before)


def test_model_untouched_after_exception_in_forward():
    class Exploding(EveryOpNet):
        def forward(self, x):
            F.relu(self.conv1(x))
            raise RuntimeError("boom")

    torch.manual_seed(0)
    net = Exploding().double().train()
    before = model_snapshot(net)
    with pytest.raises(RuntimeError, match="boom"):
        pw.PullbackSession(net, random_image(), layers=["conv1", "bn1"])
    assert_untouched(net, before)
    assert net.training  # train mode was restored


def test_model_untouched_after_exception_inside_context():
    net, x = every_op_net(), random_image()
    before = model_snapshot(net)
    with pytest.raises(KeyError), pw.soft_gating(net, temperature=0.5):
        net(x.clone().requires_grad_())
        raise KeyError("user code failed")
    assert_untouched(net, before)
    with torch.no_grad():
        assert torch.equal(net(x), before_logits(net, x))


def before_logits(net, x):
    with torch.no_grad():
        return net(x)


def test_train_mode_model_is_run_in_eval_and_restored():
    net, x = every_op_net(), random_image()
    expected = pw.excitation_pullback(net, x, 0)
    net.train()
    running_mean = net.bn1.running_mean.clone()
    actual = pw.excitation_pullback(net, x, 0)
    torch.testing.assert_close(actual, expected)
    assert net.training and net.bn1.training
    assert torch.equal(net.bn1.running_mean, running_mean)


class _StubbornOnce(nn.Module):
    """Its train(False) raises once (a LoRA-style train() that fails, or a Ctrl-C)."""

    def __init__(self, error: type[BaseException]):
        super().__init__()
        self.error = error

    def train(self, mode: bool = True):
        if not mode and self.error is not None:
            error, self.error = self.error, None
            raise error("stubborn")
        return super().train(mode)

    def forward(self, x):
        return x


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_training_flags_come_back_when_switching_to_eval_mode_fails_half_way(error):
    # model.eval() ran before the try whose finally restores the flags: the modules it had
    # switched before the failure stayed in eval mode (found by a hostile review).
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(), _StubbornOnce(error),
                        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).train()
    net[2].eval()  # mixed flags
    before = [m.training for m in net.modules()]
    with pytest.raises(error, match="stubborn"):
        pw.excitation_pullback(net, random_image(1, 6), 0)
    assert [m.training for m in net.modules()] == before


def test_a_ctrl_c_right_after_the_mode_is_pushed_leaves_no_mode_behind(monkeypatch):
    # TorchFunctionMode.__enter__ pushes the mode, then returns: an interrupt in between left
    # it on the stack for good, gating every later call in the thread (a hostile review).
    import torch.overrides

    push = torch.overrides._push_mode

    def push_then_interrupt(mode):
        push(mode)
        raise KeyboardInterrupt

    net, x = every_op_net(), random_image()
    monkeypatch.setattr(torch.overrides, "_push_mode", push_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        pw.excitation_pullback(net, x, 0)
    monkeypatch.undo()
    assert _get_current_function_mode_stack() == []
    torch.testing.assert_close(pw.excitation_pullback(net, x, 0),
                               pw.excitation_pullback(net, x, 0))


def test_nested_soft_gating_is_a_clear_error():
    net, x = every_op_net(), random_image()
    with pw.soft_gating(net), pytest.raises(pw.PullbackWidgetsError, match="already active"):
        pw.excitation_pullback(net, x, 0)
    assert _active_gating_mode() is None


def test_model_without_relu_gives_gradient_with_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(3)).double()
    x = random_image(1, 6)
    model(x)
    with pytest.warns(UserWarning, match="gated no op"):
        pullback = pw.excitation_pullback(model, x, 1)
    torch.testing.assert_close(pullback, plain_gradient(model, x, 1))


def test_no_grad_context_does_not_gate_or_break():
    net, x = every_op_net(), random_image()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            pullback = pw.excitation_pullback(net, x, 0)
    torch.testing.assert_close(pullback, reference_pullback(net, x, 0, 0.3, "sigmoid"))


def test_two_sessions_on_one_model_do_not_interfere():
    net, x = every_op_net(), random_image()
    a = pw.PullbackSession(net, x, temperature=0.2)
    b = pw.PullbackSession(net, x, temperature=2.0)
    first = a.pullback(0)
    b.pullback(0)
    torch.testing.assert_close(a.pullback(0), first)
    torch.testing.assert_close(b.pullback(0), reference_pullback(net, x, 0, 2.0, "sigmoid"))


def test_copy_of_model_behaves_the_same_after_use():
    net, x = every_op_net(), random_image()
    pristine = copy.deepcopy(net)
    pw.PullbackSession(net, x).pullbacks([0, 1])
    with torch.no_grad():
        assert torch.equal(net(x), pristine(x))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": -2.0}, ValueError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"temperature": float("inf")}, ValueError, "temperature"),
    ({"pool_temperature": 0.0}, ValueError, "pool_temperature"),
    ({"gate": "softplus"}, ValueError, "gate"),
    ({"gate": 3}, TypeError, "gate"),
])
def test_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        pw.excitation_pullback(every_op_net(), random_image(), 0, **kwargs)


@pytest.mark.parametrize(("target", "error", "match"), [
    (5, ValueError, "out of range"),
    (-1, ValueError, "out of range"),
    ([0], ValueError, "batch of 2"),
    (True, TypeError, "bool"),
    (1.5, TypeError, "target"),
    ("cat", TypeError, "target"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer"),
    (pw.Unit("conv9", 0), ValueError, "unknown layer 'conv9'.*conv"),
    (pw.Unit("conv2", 6), ValueError, "channel 6 is out of range"),
    (pw.Unit("conv2", 0, 99, 0), ValueError, "outside"),
    (pw.Unit("relu", 0), ValueError, "ran 2 times"),
])
def test_bad_targets(target, error, match):
    with pytest.raises(error, match=match):
        pw.excitation_pullback(every_op_net(), random_image(), target)


def _one_value_replaced(value: float) -> torch.Tensor:
    inputs = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    inputs[1, 2, 5, 7] = value
    return inputs


@pytest.mark.parametrize(("inputs", "error", "match"), [
    (torch.rand(3, 12, 12, dtype=torch.float64), ValueError, r"\(B, C, H, W\)"),
    (torch.rand(1, 4, 12, 12, dtype=torch.float64), ValueError, "3 channels"),
    ((torch.rand(1, 3, 12, 12) * 255).to(torch.uint8), TypeError, "floating-point"),
    (torch.full((1, 3, 12, 12), float("nan"), dtype=torch.float64), ValueError, "NaN"),
    *[(_one_value_replaced(bad), ValueError, "NaN or infinite")
      for bad in (float("nan"), float("inf"), -float("inf"))],
    ([[0.0]], TypeError, "torch.Tensor"),
])
def test_bad_inputs(inputs, error, match):
    with pytest.raises(error, match=match):
        pw.excitation_pullback(every_op_net(), inputs, 0)


def test_submodules_is_modules_without_names():
    shared = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.Sequential(shared, nn.Identity()))
    model.register_module("absent", None)
    found = submodules(model)
    assert len(found) == len({id(m) for m in found}) == len(list(model.modules())) == 5
    assert {id(m) for m in found} == {id(m) for m in model.modules()}


def test_bad_unit_and_model_arguments():
    with pytest.raises(TypeError, match="model"):
        pw.excitation_pullback(lambda x: x, random_image(), 0)
    with pytest.raises(ValueError, match="y and x"):
        pw.Unit("conv2", 0, y=3)
    with pytest.raises(TypeError, match="channel"):
        pw.Unit("conv2", "0")
    with pytest.raises(TypeError, match="list of targets"):
        pw.PullbackSession(every_op_net(), random_image()).pullbacks(0)


def test_relative_temperature_scales_each_op_by_its_input_spread():
    """T_rel on one ReLU equals absolute T * std(z) of that example's pre-activation."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(2, 6, 1, 1, dtype=torch.float64)
    relative = pw.excitation_pullback(model, x, 1, temperature=0.5,
                                      temperature_mode="relative")
    for i in range(2):
        with torch.no_grad():
            spread = float(model[1](x[i:i + 1].flatten(1)).std())
        absolute = pw.excitation_pullback(model, x[i:i + 1], 1, temperature=0.5 * spread)
        torch.testing.assert_close(relative[i:i + 1], absolute)
    with pytest.raises(ValueError, match="temperature_mode"):
        pw.excitation_pullback(model, x, 1, temperature_mode="per-layer")


def test_relative_temperature_on_every_op_net_matches_per_example_reference():
    net, x = every_op_net(), random_image(2)
    batched = pw.excitation_pullback(net, x, 3, temperature=0.3, temperature_mode="relative")
    single = torch.cat([pw.excitation_pullback(net, x[i:i + 1], 3, temperature=0.3,
                                               temperature_mode="relative") for i in range(2)])
    torch.testing.assert_close(batched, single)


def test_wrong_device_and_dtype_are_clear_errors():
    net = every_op_net()
    with pytest.raises(TypeError, match="float32 but the model's parameters are"):
        pw.excitation_pullback(net, random_image(dtype=torch.float32), 0)
    meta = EveryOpNet().to("meta")  # moving the inputs there would not help: no weights
    with pytest.raises(ValueError, match="meta device, which holds no weights"):
        pw.excitation_pullback(meta, torch.rand(1, 3, 12, 12), 0)


def test_model_untouched_after_exception_in_backward():
    class FailingBackward(EveryOpNet):
        fail = True

        def forward(self, x):
            h = F.relu(self.conv1(x))
            if self.fail:
                h.register_hook(lambda grad: (_ for _ in ()).throw(RuntimeError("bad grad")))
            return self.fc(F.relu(self.conv4(h)).mean((2, 3)))

    torch.manual_seed(0)
    net = FailingBackward().double().eval()
    before = model_snapshot(net)
    session = pw.PullbackSession(net, random_image())
    with pytest.raises(RuntimeError, match="bad grad"):
        session.pullback(0)
    assert_untouched(net, before)


def test_model_untouched_after_exception_in_ascent_callback():
    net, x = every_op_net(), random_image(1)
    before = model_snapshot(net)

    def callback(step, result):
        raise KeyError("stop here")

    with pytest.raises(KeyError):
        pw.pullback_ascent(net, x, 0, steps=3, callback=callback, progress=False)
    assert_untouched(net, before)


# ---------------------------------------------------------------- one answer per question

@pytest.mark.parametrize("own_temperature", [None, 0.7])
def test_every_door_gives_the_same_map(own_temperature):
    """temperature=None is the model's own T (else 0.3) through every entry point."""
    net, x = every_op_net(), random_image(1) * 0.8 + 0.1
    if own_temperature is not None:
        net.default_temperature = own_temperature
    expected = reference_pullback(net, x, 2, own_temperature or 0.3, "sigmoid")
    _assert_every_door_gives(expected, net, x, 2)


def _assert_every_door_gives(expected, net, x, target, **settings):
    """Every entry point, given ``settings``, pulls back ``target`` at x (1, 3, H, W) to
    ``expected``; the ascent's first step moves along it (normalised) inside a wide ball."""
    doors = {
        "excitation_pullback": pw.excitation_pullback(net, x, target, **settings),
        "session": pw.PullbackSession(net, x, **settings).pullback(target),
        "per call": pw.PullbackSession(net, x).pullback(target, **settings),
        "pullbacks": pw.PullbackSession(net, x).pullbacks([target], **settings)[0],
        "ExcitationPullback": pw.ExcitationPullback(net, **settings).attribute(x, target),
    }
    with pw.soft_gating(net, **settings):
        xg = x.clone().requires_grad_()
        (doors["soft_gating"],) = torch.autograd.grad(net(xg)[0, target], xg)
    for door, pullback in doors.items():
        torch.testing.assert_close(pullback, expected, msg=door)
    step = pw.pullback_ascent(net, x, target, steps=1, step_size=0.01, eps=10.0,
                              progress=False, **settings)
    torch.testing.assert_close(step.images[1] - x, 0.01 * expected / expected.norm())


def test_per_call_settings_apply_to_that_call_only():
    net, x = every_op_net(), random_image()
    session = pw.PullbackSession(net, x, temperature=0.4)
    before = session.pullback(1)
    hot = session.pullback(1, temperature=5.0, gate="normal_cdf", pool_temperature=2.0)
    torch.testing.assert_close(hot, reference_pullback(net, x, 1, 5.0, "normal_cdf", 2.0))
    assert session.settings == pw.GateSettings(0.4)
    assert torch.equal(session.pullback(1), before)
    session.pullbacks([0, 1], gate="hard")
    assert torch.equal(session.pullback(1), before)


def test_configure_changes_the_session_for_later_calls():
    net, x = every_op_net(), random_image()
    session = pw.PullbackSession(net, x, temperature=0.4)
    assert session.configure(temperature=2.0, gate="normal_cdf") is session.settings
    torch.testing.assert_close(session.pullback(0),
                               reference_pullback(net, x, 0, 2.0, "normal_cdf"))
    session.settings.update(temperature=0.5, gate="sigmoid")
    torch.testing.assert_close(session.pullback(0), reference_pullback(net, x, 0, 0.5, "sigmoid"))
    with pytest.raises(ValueError, match="gate"):
        session.configure(temperature=9.0, gate="bogus")
    assert session.settings == pw.GateSettings(0.5)


def test_gate_settings_check_every_field_and_update_all_or_nothing():
    settings = pw.GateSettings(0.4)
    with pytest.raises(pw.PullbackWidgetsError, match="temperature"):
        settings.temperature = -1.0
    with pytest.raises(pw.PullbackWidgetsError, match="pool_weights"):
        settings.update(temperature=2.0, pool_weights="frozen")
    with pytest.raises(pw.PullbackWidgetsTypeError, match="did you mean 'temperature'"):
        settings.update(temprature=2.0)
    assert settings == pw.GateSettings(0.4)
    settings.update(2.0, "hard", 0.5)  # positional, in field order
    assert (settings.temperature, settings.gate, settings.pool_temperature) == (2.0, "hard", 0.5)
    assert settings.replaced(gate="sigmoid", temperature=None) == pw.GateSettings(2.0, "sigmoid",
                                                                                  0.5)


# ---------------------------------------------------------------- Captum's conventions

def _wobble(inputs):
    """A deterministic perturbation (Captum's metrics repeat each example n times)."""
    return 0.01 * torch.sin(37.0 * inputs)


def test_attribute_takes_and_returns_captum_tuples():
    net, x = every_op_net(), random_image()
    method = pw.ExcitationPullback(net, temperature=0.5)
    expected = reference_pullback(net, x, 1, 0.5, "sigmoid")
    as_tuple = method.attribute((x,), target=1)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], expected)
    torch.testing.assert_close(method.attribute(x, target=1), expected)
    with pytest.raises(pw.PullbackWidgetsError, match="tuple of 2"):
        method.attribute((x, x), target=1)
    with pytest.raises(pw.PullbackWidgetsTypeError, match="'baselines'"):
        method.attribute(x, target=1, baselines=torch.zeros_like(x))


def test_additional_forward_args_reach_the_model():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = every_op_net()

        def forward(self, x, scale, shift=0.0):
            return self.net(x) * scale + shift

    model, x = Scaled(), random_image()
    method = pw.ExcitationPullback(model, temperature=0.5)
    expected = reference_pullback(model.net, x, 2, 0.5, "sigmoid")
    torch.testing.assert_close(method.attribute(x, 2, additional_forward_args=3.0), 3 * expected)
    torch.testing.assert_close(method.attribute(x, 2, additional_forward_args=(2.0, 5.0)),
                               2 * expected)


def test_captum_sensitivity_max_runs_on_attribute():
    metrics = pytest.importorskip("captum.metrics")
    net, x = every_op_net(), random_image()
    method = pw.ExcitationPullback(net, temperature=0.5)
    sensitivity = metrics.sensitivity_max(
        method.attribute, x, perturb_func=lambda inputs: inputs + _wobble(inputs),
        n_perturb_samples=3, target=1)
    moved = pw.excitation_pullback(net, x + _wobble(x), 1, temperature=0.5)
    still = pw.excitation_pullback(net, x, 1, temperature=0.5)
    expected = (moved - still).flatten(1).norm(dim=1) / still.flatten(1).norm(dim=1)
    torch.testing.assert_close(sensitivity, expected)


def test_captum_infidelity_runs_on_attribute():
    metrics = pytest.importorskip("captum.metrics")
    net, x = every_op_net(), random_image()
    (attribution,) = pw.ExcitationPullback(net, temperature=0.5).attribute((x,), target=1)
    infidelity = metrics.infidelity(net, lambda inputs: (_wobble(inputs),
                                                         inputs - _wobble(inputs)),
                                    x, attribution, target=1, n_perturb_samples=3)
    with torch.no_grad():
        drop = net(x)[:, 1] - net(x - _wobble(x))[:, 1]
    expected = ((_wobble(x) * attribution).flatten(1).sum(1) - drop) ** 2
    torch.testing.assert_close(infidelity, expected)


# ---------------------------------------------------------------- the soft pool's rule

def test_pool_weights_reach_the_pool_through_every_door():
    net, x = every_op_net(), random_image(1) * 0.8 + 0.1
    detached = reference_pullback(net, x, 3, 0.5, "sigmoid", detached=True)
    assert not torch.allclose(detached, reference_pullback(net, x, 3, 0.5, "sigmoid"))
    _assert_every_door_gives(detached, net, x, 3, temperature=0.5, pool_weights="detached")


# ---------------------------------------------------------------- the paper's versions

@pytest.mark.parametrize("own_temperature", [None, 0.7])  # the model's own T is overridden
def test_paper_versions_splat_into_every_door(own_temperature):
    net, x = every_op_net(), random_image(1) * 0.8 + 0.1
    if own_temperature is not None:
        net.default_temperature = own_temperature
    _assert_every_door_gives(reference_pullback(net, x, 3, 0.3, "sigmoid"), net, x, 3,
                             **pw.PAPER_V1)
    latest = reference_pullback(net, x, 3, 0.6, "normal_cdf", pool_temperature=0.3,
                                detached=True)
    _assert_every_door_gives(latest, net, x, 3, **pw.PAPER_LATEST)
    grid = pw.ascent_grid(net, x, [3], steps=1, progress=False, **pw.PAPER_LATEST)
    assert grid.images.shape == (1, 1, *x.shape[1:])


def test_paper_versions_are_frozen_mappings():
    assert dict(pw.PAPER_V1) == {"gate": "sigmoid", "temperature": {"relu": 0.3, "pool": 0.3},
                                 "pool_weights": "differentiated",
                                 "temperature_mode": "absolute"}
    assert dict(pw.PAPER_LATEST) == {"gate": "normal_cdf",
                                     "temperature": {"relu": 0.6, "pool": 0.3, "silu": 1.6,
                                                     "gelu": 1.0, "attention": 1.0},
                                     "pool_weights": "detached", "temperature_mode": "absolute"}
    with pytest.raises(AttributeError):
        pw.PAPER_V1.gate = "hard"
    with pytest.raises(TypeError):
        pw.PAPER_V1.temperature["relu"] = 1.0
    with pytest.raises(pw.PullbackWidgetsError, match="pool_weights"):
        pw.PaperSettings(gate="sigmoid", temperature={"relu": 0.3}, pool_weights="frozen")


@pytest.mark.parametrize("second_order", ["autograd.grad", "jvp", "hvp", "backward"])
def test_differentiating_a_pullback_again_is_refused_not_missing_terms(second_order):
    # once_differentiable left its error to a node a targeted autograd.grad skips: the second
    # derivative's terms through the gates came back None, and jvp/hvp/hessian gave zeros (a
    # review). A pullback is first order.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with pw.soft_gating(model, temperature=0.5), \
            pytest.raises(pw.PullbackWidgetsError, match="a pullback is first order"):
        if second_order == "jvp":
            torch.autograd.functional.jvp(lambda t: model(t).sum(0), x, torch.ones_like(x))
        elif second_order == "hvp":
            torch.autograd.functional.hvp(lambda t: model(t).square().sum(), x,
                                          torch.ones_like(x))
        else:
            (g,) = torch.autograd.grad(model(x)[:, 0].sum(), x, create_graph=True)
            if second_order == "backward":
                g.square().sum().backward()
            else:
                torch.autograd.grad(g.square().sum(), model[2].weight, allow_unused=True)
