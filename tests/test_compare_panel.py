"""The PullbackExplorer's Compare panel: each method through the evaluation's adapters,
cached per (image, target, method), only the right-hand panel redrawn; and Grad-CAM against
a slow hand-written reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pullback_widgets as pw
from pullback_widgets import figures
from pullback_widgets.evaluation import methods as ev
from pullback_widgets.widgets import explorer as explorer_module
from tests.conftest import LABELS

captum = pytest.importorskip("captum.attr")



@pytest.fixture
def explorer(net):
    made = pw.PullbackExplorer(net, "coffee", labels=LABELS, temperature=0.5)
    assert made.wait()
    yield made
    made.close()


def _z(figure) -> np.ndarray:
    return np.asarray(figure.data[0].z, dtype=np.float64)


def _synced(monkeypatch):
    synced = []
    original = explorer_module.sync_figure

    def spy(widget, figure):
        synced.append(widget)
        original(widget, figure)

    monkeypatch.setattr(explorer_module, "sync_figure", spy)
    return synced


def test_gradcam_equals_a_hand_written_grad_cam(net):
    x = torch.rand(2, 3, 32, 32)
    target = torch.tensor([1, 4])
    layer = ev._last_conv(net)
    taken = {}
    handle = dict(net.named_modules())[layer].register_forward_hook(
        lambda module, args, output: taken.setdefault("a", output))
    try:
        logits = net(x)
        activation = taken["a"]
        score = logits[torch.arange(2), target].sum()
        (grad,) = torch.autograd.grad(score, activation)
    finally:
        handle.remove()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(1, keepdim=True))
    expected = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)
    actual = ev.build_method("gradcam", net)(net, x, target)
    assert actual.shape == x.shape
    torch.testing.assert_close(actual.sum(1, keepdim=True), expected.detach(),
                               rtol=1e-5, atol=1e-6)
    assert ev.method_settings("gradcam", net) == f"layer {layer}"
    assert ev.method_settings("integrated_gradients", net) == "16 steps, black baseline"
    assert ev.method_settings("smoothgrad", net) == "8 samples, noise σ = 0.15"
    assert ev.method_settings("gradient", net) == ""


@pytest.mark.parametrize("name", ["gradient_x_input", "guided_backprop", "smoothgrad",
                                  "integrated_gradients"])
def test_each_method_is_the_evaluations_and_only_the_right_panel_is_redrawn(
        name, net, explorer, monkeypatch):
    synced = _synced(monkeypatch)
    pullback_before = _z(explorer.pullback_figure)
    explorer.compare.value = name
    assert explorer.wait() and "⚠" not in explorer.status.value
    assert synced == [explorer.gradient_figure]
    np.testing.assert_array_equal(_z(explorer.pullback_figure), pullback_before)
    image = explorer._images["coffee"]
    target = int(explorer._session.logits[0].argmax())
    expected = ev.build_method(name, net)(net, image, torch.tensor([target]))[0]
    np.testing.assert_allclose(_z(explorer.gradient_figure),
                               figures.relative_map(expected).astype(np.float32),
                               rtol=1e-4, atol=1e-5)
    title = explorer.gradient_figure.layout.title.text
    assert title.startswith(explorer_module._label(name))
    settings = ev.method_settings(name, net)
    assert settings in title
    assert " ms" in explorer.status.value


def test_expensive_methods_are_cached_and_the_temperature_recomputes_only_the_pullback(
        net, explorer, monkeypatch):
    built = []
    original = explorer_module.build_method
    monkeypatch.setattr(explorer_module, "build_method",
                        lambda name, model: built.append(name) or original(name, model))
    explorer.compare.value = "integrated_gradients"
    assert explorer.wait()
    assert built == ["integrated_gradients"]
    assert "Integrated gradients" in explorer.status.value and "pullback" in explorer.status.value
    synced = _synced(monkeypatch)
    explorer.temperature.value = 2.0
    assert explorer.wait()
    assert synced == [explorer.pullback_figure] and built == ["integrated_gradients"]
    explorer.compare.value = "gradient"
    explorer.wait()
    explorer.compare.value = "integrated_gradients"
    assert explorer.wait() and built == ["integrated_gradients"]  # from the cache
    assert "(cached)" in explorer.status.value


def test_gradcam_is_an_overlay_on_the_photo_in_every_view(net, explorer):
    explorer.compare.value = "gradcam"
    assert explorer.wait() and "⚠" not in explorer.status.value
    types = [trace.type for trace in explorer.gradient_figure.data]
    assert types[0] == "image" and "Grad-CAM (layer" in explorer.gradient_figure.layout.title.text
    explorer.view.value = "RGB"
    assert explorer.wait()
    assert [trace.type for trace in explorer.gradient_figure.data] == types


def test_units_are_compared_with_their_plain_gradient_and_say_so(net, explorer):
    explorer.layer.value = "conv4"
    explorer.channel.value = 2
    explorer.compare.value = "smoothgrad"
    assert explorer.wait()
    assert "explains classes" in explorer.status.value
    expected = pw.excitation_pullback(net, explorer._images["coffee"], pw.Unit("conv4", 2),
                                      gate="hard")[0]
    np.testing.assert_allclose(_z(explorer.gradient_figure),
                               figures.relative_map(expected).astype(np.float32), rtol=1e-5)


def test_without_captum_its_methods_are_marked_and_choosing_one_is_a_note(net, monkeypatch):
    monkeypatch.setattr(explorer_module, "captum_available", lambda: False)
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    try:
        labels = dict((value, label) for label, value in explorer.compare.options)
        assert labels["gradcam"] == "Grad-CAM (needs the compare extra)"
        assert labels["gradient_x_input"] == "gradient × input"
        explorer.compare.value = "integrated_gradients"
        assert explorer.wait()
        assert "pullback-widgets[compare]" in explorer.status.value
        assert "⚠" not in explorer.status.value
        assert explorer.gradient_figure.layout.title.text.startswith("Plain gradient")
    finally:
        explorer.close()


def test_the_strip_can_end_with_the_comparison(net, explorer):
    explorer.compare.value = "gradient_x_input"
    explorer.strip_compare.value = True
    explorer.strip_button.click()
    assert explorer.wait()
    titles = [a.text for a in explorer.strip_figure.layout.annotations]
    assert titles[:7] == [f"T = {t:.3g}" for t in pw.model_helpers.STRIP_TEMPERATURES]
    assert titles[7] == "Gradient × input"
    assert len(explorer.strip_figure.data) == 8


def test_the_default_panel_is_the_evaluations_gradient_bit_for_bit(net, explorer):
    image = explorer._images["coffee"]
    target = int(explorer._session.logits[0].argmax())
    evaluated = ev.build_method("gradient", net)(net, image, torch.tensor([target]))[0]
    shown = explorer._compare_cache[("coffee", target, "gradient")][0]
    assert torch.equal(shown, evaluated)
