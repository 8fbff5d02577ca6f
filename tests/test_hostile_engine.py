"""The engine tried as a hostile or careless user would (issue 10): one test per case.

Each case failed on the engine before issue 10: a silently wrong map, a session broken by one
bad call, a model left changed, or an error that did not say what was wrong.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import pullback_widgets as pw
from pullback_widgets.labels import find_class
from pullback_widgets.model_helpers import feature_layers
from tests.conftest import (
    assert_untouched,
    every_op_net,
    model_snapshot,
    plain_gradient,
    random_image,
)
from tests.reference import EveryOpNet, reference_pullback

CASES: dict[str, Callable[[], None]] = {}


def case(function: Callable[[], None]) -> Callable[[], None]:
    CASES[function.__name__] = function
    return function


def _in_threads(work: Callable[[int], object], count: int) -> list[object]:
    """Run ``work(i)`` for i < count, each in its own thread, all released at once."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as error:  # re-raised below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    if errors:
        raise errors[0]
    return results


# ---------------------------------------------------------------- threads

@case
def threads_share_one_session_at_different_temperatures():
    net, x = every_op_net(), random_image()
    session = pw.PullbackSession(net, x)
    temperatures = [0.05, 0.3, 2.0, 7.0]
    expected = [session.pullback(1, temperature=t) for t in temperatures]
    results = _in_threads(lambda i: [session.pullback(1, temperature=temperatures[i % 4])
                                     for _ in range(6)], 8)
    for i, maps in enumerate(results):
        for pullback in maps:
            assert torch.equal(pullback, expected[i % 4])
    assert session.settings == pw.GateSettings()


@case
def threads_leave_a_train_mode_model_in_train_mode_and_never_use_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(8 * 10 * 10, 4)).double()
    x = random_image(1)
    expected = pw.excitation_pullback(model.eval(), x, 1)
    model.train()
    results = _in_threads(lambda i: [pw.excitation_pullback(model, x, 1) for _ in range(5)], 4)
    assert all(torch.equal(p, expected) for maps in results for p in maps)
    assert all(m.training for m in model.modules())


@case
def threads_pull_back_units_of_one_model():
    net, x = every_op_net(), random_image(1)
    before = model_snapshot(net)
    units = [pw.Unit("conv4", c) for c in range(4)]
    expected = [pw.excitation_pullback(net, x, u) for u in units]
    results = _in_threads(lambda i: [pw.excitation_pullback(net, x, units[i])
                                     for _ in range(4)], 4)
    for i, maps in enumerate(results):
        assert all(torch.equal(p, expected[i]) for p in maps)
    assert_untouched(net, before)


@case
def user_forward_in_another_thread_is_not_recorded():
    """The user runs the model (without the package) while a session records a layer."""
    class CallsFromElsewhere(EveryOpNet):
        during_forward: Callable[[], None] | None = None

        def forward(self, x):
            if self.during_forward is not None:
                hook, self.during_forward = self.during_forward, None
                hook()
            return super().forward(x)

    torch.manual_seed(0)
    net, x = CallsFromElsewhere().double().eval(), random_image(1)
    expected = pw.excitation_pullback(net, x, pw.Unit("conv4", 2))

    def users_forward():
        thread = threading.Thread(target=lambda: net(random_image(1, seed=7)))
        thread.start()
        thread.join()

    net.during_forward = users_forward
    assert torch.equal(pw.excitation_pullback(net, x, pw.Unit("conv4", 2)), expected)


@case
def threads_list_layers_while_another_records_a_unit():
    """The explorer lists layers (feature_layers) while a pullback records one."""
    net, x = every_op_net(), random_image(1)
    expected_map = pw.excitation_pullback(net, x, pw.Unit("conv4", 1))
    expected_layers = feature_layers(net, x)

    def work(i: int) -> list[object]:
        if i % 2:
            return [feature_layers(net, x) for _ in range(5)]
        return [pw.excitation_pullback(net, x, pw.Unit("conv4", 1)) for _ in range(5)]

    for i, results in enumerate(_in_threads(work, 4)):
        for result in results:
            if i % 2:
                assert result == expected_layers
            else:
                assert torch.equal(result, expected_map)


# ---------------------------------------------------------------- Captum's calling convention

@case
def captum_passes_a_tuple_of_inputs():
    metrics = pytest.importorskip("captum.metrics")
    net, x = every_op_net(), random_image()
    method = pw.ExcitationPullback(net)
    (attribution,) = method.attribute((x,), target=1)
    torch.testing.assert_close(attribution, pw.excitation_pullback(net, x, 1))
    sensitivity = metrics.sensitivity_max(method.attribute, x, target=1, n_perturb_samples=2)
    assert sensitivity.shape == (2,) and torch.isfinite(sensitivity).all()


@case
def captum_passes_additional_forward_args():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = every_op_net()

        def forward(self, x, bias):
            return self.net(x) + bias

    model, x = TwoInputs(), random_image()
    bias = torch.randn(2, 5, dtype=torch.float64)
    attribution = pw.ExcitationPullback(model).attribute(x, 1, additional_forward_args=(bias,))
    torch.testing.assert_close(attribution, pw.excitation_pullback(model.net, x, 1))


# ---------------------------------------------------------------- models the mode cannot see

@case
def compiled_model_follows_every_temperature():
    net, x = every_op_net(), random_image()
    compiled = torch.compile(net, backend="eager")
    with pytest.warns(UserWarning, match="compile"):
        session = pw.PullbackSession(compiled, x, temperature=0.3)
    for temperature in (0.3, 2.0, 0.05):
        torch.testing.assert_close(session.pullback(0, temperature=temperature),
                                   reference_pullback(net, x, 0, temperature, "sigmoid"))


@case
def compiled_model_one_shot_and_attribute():
    net, x = every_op_net(), random_image()
    compiled = torch.compile(net, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one_shot = pw.excitation_pullback(compiled, x, 1, temperature=0.6)
        captum = pw.ExcitationPullback(compiled, temperature=0.6).attribute(x, target=1)
        layers = feature_layers(compiled, x)
    expected = reference_pullback(net, x, 1, 0.6, "sigmoid")
    torch.testing.assert_close(one_shot, expected)
    torch.testing.assert_close(captum, expected)
    assert layers == feature_layers(net, x)


@case
def compiled_model_in_soft_gating_is_refused():
    compiled = torch.compile(every_op_net(), backend="eager")
    with pytest.raises(pw.PullbackWidgetsTypeError, match="_orig_mod"), pw.soft_gating(compiled):
        pass


@case
def model_compiled_in_place_is_refused():
    net = every_op_net()
    net.compile(backend="eager")
    with pytest.raises(pw.PullbackWidgetsTypeError, match="compiled"):
        pw.excitation_pullback(net, random_image(), 0)


@case
def scripted_model_is_refused():
    scripted = torch.jit.script(_scriptable_net())
    with pytest.raises(pw.PullbackWidgetsTypeError, match=r"eager nn\.Module"):
        pw.PullbackSession(scripted, random_image())


@case
def traced_model_is_refused_by_every_entry_point():
    net, x = every_op_net(), random_image()
    traced = torch.jit.trace(net, x)
    calls = [lambda: pw.excitation_pullback(traced, x, 0),
             lambda: pw.ExcitationPullback(traced),
             lambda: pw.pullback_ascent(traced, x, 0, steps=1, progress=False),
             lambda: feature_layers(traced, x)]
    for call in calls:
        with pytest.raises(pw.PullbackWidgetsTypeError, match="TorchScript"):
            call()
    with pytest.raises(pw.PullbackWidgetsTypeError, match="TorchScript"), pw.soft_gating(traced):
        pass


@case
def model_with_a_scripted_submodule_is_refused():
    model = nn.Sequential(torch.jit.script(_scriptable_net()))
    with pytest.raises(pw.PullbackWidgetsTypeError, match=r"submodule '0'.*TorchScript"):
        pw.excitation_pullback(model, random_image(), 0)


@case
def model_with_a_compiled_submodule_is_refused():
    # check_model looks at each type once: a compiled module among plain ones is still found.
    model = nn.Sequential(nn.Identity(), torch.compile(_scriptable_net(), backend="eager"))
    with pytest.raises(pw.PullbackWidgetsTypeError, match=r"submodule '1' is compiled"):
        pw.excitation_pullback(model, random_image(), 0)


def _scriptable_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).double().eval()


class _NoGradInside(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.body = _scriptable_net()

    def forward(self, x):
        if self.how == "no_grad":
            with torch.no_grad():
                return self.body(x)
        if self.how == "inference_mode":
            with torch.inference_mode():
                return self.body(x).clone()
        return self.body(x.detach())


@case
def forward_under_no_grad_inside_the_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no false "no ReLU" warning either
        for how in ("no_grad", "inference_mode", "detach"):
            with pytest.raises(pw.PullbackWidgetsError, match="no_grad"):
                pw.excitation_pullback(_NoGradInside(how), random_image(), 0)


@case
def session_inside_inference_mode():
    net, x = every_op_net(), random_image()
    with torch.inference_mode():
        pullback = pw.PullbackSession(net, x).pullback(0, temperature=0.5)
    torch.testing.assert_close(pullback, reference_pullback(net, x, 0, 0.5, "sigmoid"))


# ---------------------------------------------------------------- numerics

@case
def temperature_1e_minus_39_reaches_the_plain_gradient():
    net, x = every_op_net(dtype=torch.float32), random_image(dtype=torch.float32)
    pullback = pw.excitation_pullback(net, x, 2, temperature=1e-39, gate="hard")
    soft = pw.excitation_pullback(net, x, 2, temperature=1e-39, pool_temperature=1e-6)
    assert torch.equal(pullback, plain_gradient(net, x, 2))
    torch.testing.assert_close(soft, plain_gradient(net, x, 2))


@case
def relative_mode_at_tiny_temperature_is_finite():
    net, x = every_op_net(dtype=torch.float32), random_image(dtype=torch.float32)
    for temperature in (1e-39, 1e-30):
        pullback = pw.excitation_pullback(net, x, 2, temperature=temperature,
                                          temperature_mode="relative", pool_temperature=1e-6)
        assert torch.isfinite(pullback).all()
        torch.testing.assert_close(pullback, plain_gradient(net, x, 2))


@case
def huge_step_size_lands_on_the_ball():
    net = every_op_net(dtype=torch.float32)
    x = random_image(1, dtype=torch.float32) * 0.6 + 0.2
    huge = pw.pullback_ascent(net, x, 1, steps=1, step_size=1e30, eps=0.5, progress=False)
    large = pw.pullback_ascent(net, x, 1, steps=1, step_size=1e8, eps=0.5, progress=False)
    assert not torch.equal(huge.images[1], x)
    torch.testing.assert_close(huge.images[1], large.images[1])
    assert float((huge.images[1] - x).norm()) == pytest.approx(0.5, rel=1e-5)


@case
def numpy_integer_targets_everywhere():
    net, x = every_op_net(), random_image()
    expected = pw.excitation_pullback(net, x, [1, 3])
    for target in ([np.int64(1), np.int32(3)], np.array([1, 3]), torch.tensor([1, 3])):
        assert torch.equal(pw.excitation_pullback(net, x, target), expected)
    assert torch.equal(pw.excitation_pullback(net, x, np.int64(2)),
                       pw.excitation_pullback(net, x, 2))
    assert pw.Unit("conv4", np.int64(3), np.int16(1), np.uint8(0)) == pw.Unit("conv4", 3, 1, 0)
    with pytest.raises(TypeError, match="bool"):
        pw.excitation_pullback(net, x, np.bool_(True))
    assert find_class(np.int64(3), ["a", "b", "c", "d"]) == 3


@case
def test_digit_class_names_are_names_where_no_index_is_meant():
    # A digit string names a class by index or, for labels such as "7", by name: where both
    # readings are classes and differ, guessing one would explain the wrong class.
    labels = ["7", "3", "crane", "crane"]
    assert find_class("7", labels) == 0 and find_class("1", labels) == 1
    assert find_class("3 (1)", labels) == 1 and find_class("crane (3)", labels) == 3
    assert find_class("3", [str(i) for i in range(10)]) == 3  # both readings agree
    with pytest.raises(pw.PullbackWidgetsError, match=r"'1 \(0\)' or '0 \(1\)'"):
        find_class("1", ["1", "0"])
    with pytest.raises(pw.PullbackWidgetsError, match=r"'crane \(2\)' or 'crane \(3\)'"):
        find_class("crane", labels)
    with pytest.raises(pw.PullbackWidgetsError, match="unknown class"):
        find_class("crane (1)", labels)  # not the name of class 1
    for empty in ("", "   "):  # every name "contains" it: it was offered the first few classes
        with pytest.raises(pw.PullbackWidgetsError, match="class is empty"):
            find_class(empty, labels)


@case
def numpy_scalars_for_steps_temperatures_and_grid_targets():
    net, x = every_op_net(), random_image(1) * 0.8 + 0.1
    result = pw.pullback_ascent(net, x, np.int64(2), steps=np.int64(2),
                                temperature=np.float32(0.5), step_size=np.float64(0.5),
                                progress=False)
    plain = pw.pullback_ascent(net, x, 2, steps=2, temperature=float(np.float32(0.5)),
                               step_size=0.5, progress=False)
    assert len(result.images) == 3
    assert all(torch.equal(a, b) for a, b in zip(result.images, plain.images))
    grid = pw.ascent_grid(net, x, [np.int64(0), np.int64(4)], steps=1, progress=False)
    assert grid.targets == [0, 4] and all(type(t) is int for t in grid.targets)


# ---------------------------------------------------------------- a failed call changes nothing

@case
def per_call_temperature_does_not_stick():
    net, x = every_op_net(), random_image()
    session = pw.PullbackSession(net, x, temperature=0.3)
    first = session.pullback(3)
    session.pullback(3, temperature=5.0, gate="normal_cdf")
    assert torch.equal(session.pullback(3), first)


@case
def bad_gate_with_a_new_temperature_changes_nothing():
    net, x = every_op_net(), random_image()
    session = pw.PullbackSession(net, x, temperature=0.3)
    first = session.pullback(3)
    with pytest.raises(ValueError, match="gate"):
        session.pullback(3, temperature=5.0, gate="bogus")
    assert session.settings.temperature == 0.3
    assert torch.equal(session.pullback(3), first)
    with pytest.raises(ValueError, match="pool_weights"):
        session.pullbacks([3], temperature=5.0, pool_weights="bogus")
    assert torch.equal(session.pullback(3), first)


@pytest.mark.parametrize("bad", [pw.Unit("conv9", 0), pw.Unit("relu", 0), pw.Unit("conv2", 99),
                                 pw.Unit("conv2", 0, 99, 0)],
                         ids=["unknown layer", "layer runs twice", "channel", "pixel"])
def test_bad_unit_leaves_the_session_usable(bad):
    """Hostile case: a bad Unit raised and then broke the session for good."""
    net, x = every_op_net(), random_image()
    session = pw.PullbackSession(net, x, layers=["conv4"])
    before = model_snapshot(net)
    first, unit = session.pullback(1), session.pullback(pw.Unit("conv4", 0))
    with pytest.raises(pw.PullbackWidgetsError):
        session.pullback(bad)
    with pytest.raises(pw.PullbackWidgetsError):
        session.pullbacks([1, bad])
    assert session.layers == ("conv4",)
    assert torch.equal(session.pullback(1), first)
    assert torch.equal(session.pullback(pw.Unit("conv4", 0)), unit)
    assert_untouched(net, before)


@case
def model_raising_in_a_second_forward_leaves_the_session_usable():
    class FailsLater(EveryOpNet):
        forwards = 0

        def forward(self, x):
            self.forwards += 1
            if self.forwards > 1:
                raise RuntimeError("second forward fails")
            return super().forward(x)

    torch.manual_seed(0)
    net, x = FailsLater().double().train(), random_image()
    session = pw.PullbackSession(net, x)
    first = session.pullback(0)
    before = model_snapshot(net)
    with pytest.raises(RuntimeError, match="second forward"):
        session.pullback(pw.Unit("conv2", 0))  # needs a new forward
    assert torch.equal(session.pullback(0), first)
    assert session.layers == ()
    assert_untouched(net, before)


@case
def failed_configure_changes_nothing():
    session = pw.PullbackSession(every_op_net(), random_image(), temperature=0.4)
    with pytest.raises(ValueError, match="temperature_mode"):
        session.configure(temperature=3.0, gate="normal_cdf", temperature_mode="per-layer")
    assert session.settings == pw.GateSettings(0.4)


@case
def settings_assigned_by_hand_are_checked():
    session = pw.PullbackSession(every_op_net(), random_image())
    with pytest.raises(pw.PullbackWidgetsError, match="temperature"):
        session.settings.temperature = float("nan")
    with pytest.raises(pw.PullbackWidgetsError, match="gate"):
        session.settings.gate = "relu"
    assert session.settings == pw.GateSettings()


@case
def a_forward_that_switches_modes_leaves_them_as_found():
    # The model came in eval mode, so nothing needed setting before the forward; what its
    # forward switches is still put back afterwards. A forward that switched a module to
    # train mode was not the eval forward the pullback needs: an error, not a result.
    class SwitchesToTraining(EveryOpNet):
        def forward(self, x):
            self.bn1.train()
            return super().forward(x)

    torch.manual_seed(0)
    model = SwitchesToTraining().double().eval()
    with pytest.raises(pw.PullbackWidgetsError, match="put in train mode while"):
        pw.excitation_pullback(model, random_image(), 1)
    assert not any(module.training for module in model.modules())


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", sorted(CASES), ids=lambda name: name.replace("_", " "))
def test_hostile_case(name):
    CASES[name]()
