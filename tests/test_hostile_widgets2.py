"""A hostile user against pullback ascent, the explorers and their shared worker and figure
sync: each test failed before its fix."""

import threading

import numpy as np
import pytest
import torch

import pullback_widgets as pw
from pullback_widgets import figures
from pullback_widgets.widgets.common import LatestOnlyWorker
from pullback_widgets.widgets.figure_widget import figure_widget, sync_figure
from tests.conftest import LABELS, markup_named_cnn


def _nan_after(model, forwards: int):
    """A forward hook that turns every output after the first ``forwards`` into NaN."""
    calls = []

    def hook(module, args, output):
        calls.append(1)
        return output * float("nan") if len(calls) > forwards else output

    return model.register_forward_hook(hook)


def _fail_after(model, forwards: int):
    """A forward pre-hook that raises from the forward after the first ``forwards``."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) > forwards:
            raise RuntimeError("the model fell over")

    return model.register_forward_pre_hook(hook)


# ---------------------------------------------------------------- pullback_ascent, ascent_grid

@pytest.mark.parametrize("steps", [0, 1])
def test_a_nan_score_at_the_last_step_is_an_error_not_a_nan_gain(net, steps):
    # Only the pullbacks were checked, and none is taken at the last step: the result came
    # back with a NaN logit and gain, and no word.
    handle = _nan_after(net, steps)  # the image of the last step gives NaN
    try:
        with pytest.raises(pw.PullbackWidgetsError, match=f"logit at step {steps} holds NaN"):
            pw.pullback_ascent(net, torch.rand(1, 3, 32, 32), 1, steps=steps, progress=False)
    finally:
        handle.remove()


@pytest.mark.parametrize("target", [1, 0])
def test_an_infinite_logit_is_an_error_not_nan_probabilities_and_gain(target):
    # Only NaN was checked: a logit that overflowed to +inf (with a finite gradient) gave NaN
    # probabilities for every class, and a NaN gain, without a word (a review).
    class Overflowing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            logits = torch.relu(self.conv(x)).mean((2, 3))
            return logits * torch.tensor([0.0, 1e39, 1.0])  # class 1 is +inf

    with pytest.raises(pw.PullbackWidgetsError, match="at step 0 holds NaN or an infinity"):
        pw.pullback_ascent(Overflowing().eval(), torch.rand(1, 3, 8, 8), target, steps=2,
                           progress=False)


def test_ascent_grid_checks_every_target_before_the_first_ascent(net):
    steps_run = []
    with pytest.raises(pw.PullbackWidgetsError, match="class 9 is out of range"):
        pw.ascent_grid(net, torch.rand(2, 3, 32, 32), [1, 9], steps=2, progress=False,
                       callback=lambda step, result: steps_run.append(step))
    assert steps_run == []  # the first column's ascent was run, then thrown away


# ---------------------------------------------------------------- AscentExplorer

@pytest.fixture
def ascent(net):
    made = pw.AscentExplorer(net, "coffee", labels=LABELS, temperature=0.5)
    yield made
    made.close()


def test_a_run_that_fails_part_way_leaves_the_frame_slider_on_its_own_frames(net, ascent):
    ascent.steps.value = 10
    assert ascent.run() and ascent.wait()
    assert ascent.frame.max == 10
    handle = _fail_after(net, 3)  # the predicted class, steps 0 and 1; step 2 fails
    try:
        assert ascent.run() and ascent.wait()
    finally:
        handle.remove()
    assert "fell over" in ascent.status.value
    result = ascent.result
    # The slider spanned the last run's 10 frames, and its step 2 had an image but no score:
    # scrubbing there raised IndexError in the kernel.
    assert len(result.images) == len(result.logits) == 2
    assert ascent.frame.max == 1 and ascent.frame.value == 1 and not ascent.frame.disabled
    for index in (0, 1):
        ascent.frame.value = index
        assert f"step {index} " in ascent.frames_figure.layout.annotations[0].text


def test_a_failure_between_both_methods_leaves_the_pullbacks_frames_under_their_name(
        net, ascent):
    ascent.steps.value, ascent.method.value = 2, "both"
    assert ascent.run() and ascent.wait()
    handle = _fail_after(net, 4)  # the predicted class, the pullback's 3; the gradient's fails
    try:
        assert ascent.run() and ascent.wait()
    finally:
        handle.remove()
    assert "fell over" in ascent.status.value and len(ascent.result.images) == 3
    ascent.frame.value = 1
    image = ascent._images["coffee"]
    predicted = int(net(image).argmax())
    # The names were the gradient's as soon as its ascent began, on the pullback's frames.
    name = f"pullback: {LABELS[predicted]}"
    assert name in ascent.frames_figure.layout.annotations[0].text
    assert [t.name for t in ascent.curve_figure.data] == [figures.plain_text(name)]
    torch.testing.assert_close(ascent.result.images[-1], pw.pullback_ascent(
        net, image, predicted, steps=2, temperature=0.5, progress=False).images[-1])


def test_fewer_frames_leave_no_empty_panels_behind(ascent):
    ascent.counterfactual.value = True
    ascent.targets.value = ["ant (0)", "dog (3)", "eel (4)"]
    ascent.steps.value = 1
    assert ascent.run() and ascent.wait()
    assert "xaxis3" in ascent.frames_figure.layout.to_plotly_json()
    ascent.counterfactual.value = False
    assert ascent.run() and ascent.wait()
    drawn = ascent.frames_figure.layout.to_plotly_json()
    # The second and third frames' axes stayed: two empty panels, drawn on the template's
    # background.
    assert not {"xaxis2", "yaxis2", "xaxis3", "yaxis3"} & set(drawn)
    assert len(ascent.frames_figure.data) == 1


@pytest.mark.parametrize("shown", [False, True])
def test_sync_figure_removes_the_axes_of_panels_it_no_longer_has(shown):
    # A strip drawn with the comparison, then without: its eighth panel's axis title (the
    # comparison's range) stayed under the seventh panel.
    maps = [torch.randn(3, 8, 8) for _ in range(7)]
    temperatures = pw.model_helpers.STRIP_TEMPERATURES
    widget = figure_widget()
    widget._view_count = int(shown)
    sent = []
    widget._send_relayout_msg = lambda data, **kwargs: sent.append(data)
    sync_figure(widget, figures.temperature_strip(maps, temperatures,
                                                  extra_panel=("Gradient", maps[0])))
    plain = figures.temperature_strip(maps, temperatures)
    sync_figure(widget, plain)
    expected = set(plain.layout.to_plotly_json())
    assert set(widget.layout.to_plotly_json()) == expected
    assert {"xaxis8": None, "yaxis8": None} in sent  # the page is told to drop them
    if not shown:  # the state a page reads when it starts showing the figure
        assert set(widget._widget_layout) == expected


# ---------------------------------------------------------------- PullbackExplorer

def test_the_temperature_strip_hides_when_it_no_longer_shows_the_controls(net):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    explorer.strip_button.click()
    assert explorer.wait() and explorer.strip_box.layout.display is None
    strip = np.asarray(explorer.strip_figure.data[0].z)
    explorer.image.value = "rocket"  # the same predicted class, so the same strip title
    assert explorer.wait()
    # The strip of "coffee" stayed under the photo of "rocket", titled as before.
    assert np.array_equal(strip, np.asarray(explorer.strip_figure.data[0].z))
    assert explorer.strip_box.layout.display == "none"
    explorer.image.value = "coffee"  # what it shows again
    assert explorer.wait() and explorer.strip_box.layout.display is None
    explorer.gate.value = "normal_cdf"
    assert explorer.wait() and explorer.strip_box.layout.display == "none"
    explorer.gate.value = "sigmoid"
    explorer.temperature.value = 2.0  # the strip has its own temperatures
    assert explorer.wait() and explorer.strip_box.layout.display is None
    with torch.no_grad():
        next(net.parameters()).mul_(1.5)  # the strip is of the model as it was
    explorer.view.value = "RGB"
    assert explorer.wait() and explorer.strip_box.layout.display == "none"
    assert "⚠" not in explorer.status.value
    explorer.close()


def test_the_evidence_explorer_keeps_its_own_copy_of_the_image_and_mask(net):
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    original = image.clone()
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[4:12, 4:12] = True
    explorer = pw.PullbackExplorer(net, image, labels=LABELS, evidence=mask)
    assert explorer.wait()
    image.zero_()  # the user reuses their tensors
    mask.zero_()
    explorer.view.value = "magnitude overlay"
    explorer.show_evidence.value = True
    assert explorer.wait()
    # The heatmap was of the image as it was (one forward, at the start) and the photo under
    # it of the image as it is now: black.
    photo = np.asarray(explorer.pullback_figure.data[0].z, dtype=np.float64)
    np.testing.assert_allclose(photo, figures.to_uint8_image(original), atol=1)
    assert torch.equal(explorer._evidence[explorer.image.value][4:12, 4:12],
                       torch.ones(8, 8, dtype=torch.bool))
    explorer.close()


@pytest.mark.parametrize("size, error", [((3, 32, 32), TypeError), (None, TypeError),
                                         ("32", TypeError), (0, ValueError)])
@pytest.mark.parametrize("explorer_class", [pw.PullbackExplorer, pw.AscentExplorer])
def test_a_bad_input_size_attribute_is_a_clear_error(net, explorer_class, size, error):
    # int() of a tuple or None raised a bare TypeError, and a size of 0 a RuntimeError from
    # inside the model.
    net.input_size = size
    with pytest.raises(error, match="input_size"):
        explorer_class(net, "coffee", labels=LABELS)


# ---------------------------------------------------------------- the worker

def test_an_explorer_works_again_after_a_keyboard_interrupt_in_its_model(net, monkeypatch):
    # The interrupt ended the worker's thread: the status line said "computing" for ever, and
    # every later request (a Run, a slider) waited for a thread that was gone.
    escaped = []
    monkeypatch.setattr(threading, "excepthook", lambda hook: escaped.append(hook.exc_type))
    ascent = pw.AscentExplorer(net, "coffee", labels=LABELS)
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    assert explorer.wait()
    ascent.steps.value = 2
    interrupt = {"on": True}

    def hook(module, args):
        if interrupt["on"]:
            interrupt["on"] = False
            raise KeyboardInterrupt

    def show(image):  # a new image: a new forward
        explorer.image.value = image

    handle = net.register_forward_pre_hook(hook)
    try:
        for widget, first, then in ((ascent, ascent.run, ascent.run),
                                    (explorer, lambda: show("rocket"), lambda: show("chelsea"))):
            interrupt["on"] = True
            interrupted = widget._worker._thread
            first()
            assert widget.wait(30)
            assert "KeyboardInterrupt" in widget.status.value
            # The thread ends after the job, through threading.excepthook: on a loaded machine
            # it may not have got there when the assertions below look (escaped, threads).
            interrupted.join(60)
            assert not interrupted.is_alive()
            then()
            assert widget.wait(30)
            assert "⚠" not in widget.status.value, widget.status.value
    finally:
        handle.remove()
    assert escaped == [KeyboardInterrupt, KeyboardInterrupt]  # not swallowed
    assert not ascent.run_button.disabled and ascent.result is not None
    threads = threading.active_count()
    ascent.close()
    explorer.close()
    assert threading.active_count() == threads - 2


def test_a_worker_ended_by_an_interrupt_takes_the_next_request():
    seen, stopped = [], []

    def job(request):
        if request == "interrupt":
            raise KeyboardInterrupt
        seen.append(request)

    worker = LatestOnlyWorker(job, on_error=lambda *args: None,
                              on_interrupt=lambda error, request: stopped.append(request))
    original = threading.excepthook
    threading.excepthook = lambda hook: None
    try:
        worker.submit("interrupt")
        assert worker.wait()
        worker._thread.join(60)
        assert worker.submit("next") and worker.wait()
    finally:
        threading.excepthook = original
    assert stopped == ["interrupt"] and seen == ["next"]
    worker.close()
    assert not worker.alive


def test_sync_figure_keeps_what_the_user_set_on_the_page():
    # The pan/zoom mode chosen in the modebar is no panel's: a redraw must not reset it.
    maps = [torch.randn(3, 8, 8) for _ in range(7)]
    widget = figure_widget()
    sync_figure(widget, figures.temperature_strip(maps, pw.model_helpers.STRIP_TEMPERATURES))
    widget._js2py_relayout = {"relayout_data": {"dragmode": "pan"}, "source_view_id": "page"}
    assert widget.layout.dragmode == "pan"
    sync_figure(widget, figures.temperature_strip(maps, pw.model_helpers.STRIP_TEMPERATURES))
    assert widget.layout.dragmode == "pan"


# ---------------------------------------------------------------- a review of the explorer

def _five_class_net() -> torch.nn.Module:
    """A ReLU net whose predicted class differs between "coffee" and "rocket"."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(6, 5)).eval()
    model.input_size = 32
    return model


def _predicted(model, key: str) -> int:
    return int(model(pw.sample_image(key, size=32)).argmax())


@pytest.mark.parametrize("how", ["typed", "Top-5 button"])
def test_a_class_chosen_after_another_image_is_drawn_even_if_once_filled_in(how):
    # Image A fills the box with its class P_A; the user picks X, changes to image B, then
    # picks P_A: the explorer took P_A for its own fill-in and drew B's class (a review).
    model = _five_class_net()
    p_a, p_b = _predicted(model, "coffee"), _predicted(model, "rocket")
    assert p_a != p_b
    other = next(i for i in range(5) if i not in (p_a, p_b))
    explorer = pw.PullbackExplorer(model, "coffee", labels=LABELS)
    assert explorer.wait() and explorer.target.value == f"{LABELS[p_a]} ({p_a})"
    explorer.target.value = f"{LABELS[other]} ({other})"
    explorer.image.value = "rocket"
    assert explorer.wait()
    if how == "typed":
        explorer.target.value = f"{LABELS[p_a]} ({p_a})"
    else:
        next(b for b in explorer.top_buttons if b.class_index == p_a).click()
    assert explorer.wait()
    assert f"Pullback of ⁨{LABELS[p_a]}⁩" in explorer.pullback_figure.layout.title.text
    assert explorer.target.value == f"{LABELS[p_a]} ({p_a})"
    explorer.close()


def test_labels_with_spaces_or_empty_follow_the_predicted_class():
    # " bee" (from "ant, bee".split(",")): the box's stripped value never equalled the
    # explorer's unstripped fill-in, which then counted as the user's choice and stayed
    # on every image; an empty label could not be chosen at all (a review).
    model = _five_class_net()
    p_a, p_b = _predicted(model, "coffee"), _predicted(model, "rocket")
    labels = ["ant", " bee", " cat", " dog", " eel"]
    explorer = pw.PullbackExplorer(model, "coffee", labels=labels)
    assert explorer.wait()
    explorer.image.value = "rocket"
    assert explorer.wait()
    assert f"⁨{labels[p_b].strip()}⁩" in explorer.pullback_figure.layout.title.text
    explorer.close()
    labels = [f"c{i}" for i in range(5)]
    labels[p_a] = ""
    explorer = pw.PullbackExplorer(model, "coffee", labels=labels)
    assert explorer.wait() and explorer.target.value == f"({p_a})"
    assert "⚠" not in explorer.status.value
    explorer.image.value = "rocket"
    assert explorer.wait() and explorer.target.value == f"c{p_b} ({p_b})"
    explorer.target.value = f"({p_a})"  # the nameless class, chosen
    assert explorer.wait() and "⚠" not in explorer.status.value
    assert explorer.pullback_figure.layout.title.text.startswith("Pullback of ⁨⁩")
    explorer.close()


@pytest.mark.parametrize("gate", ["sigmoid", "paper latest"])
def test_each_strip_panel_is_the_pullback_the_slider_gives_at_its_temperature(gate):
    # The strip passed one T to every kind of gate while the slider scales each kind from
    # the model's defaults (SiLU 1.6 at ReLU's 0.3) or a preset's: its "T = 1" panel was
    # 14 % off the slider's T = 1 (a review).
    from pullback_widgets.model_helpers import STRIP_TEMPERATURES, scaled_temperatures
    from pullback_widgets.paper import PAPER_PRESETS

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.SiLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    model.input_size = 32
    explorer = pw.PullbackExplorer(model, "coffee", labels=LABELS)
    explorer.gate.value = gate
    explorer.strip_button.click()
    assert explorer.wait() and "⚠" not in explorer.status.value
    image = explorer._images["coffee"]
    preset = PAPER_PRESETS.get(gate)
    for panel, t in zip(explorer.strip_figure.data, STRIP_TEMPERATURES):
        expected = pw.excitation_pullback(
            model, image, _predicted(model, "coffee"),
            temperature=scaled_temperatures(model, t, preset.temperature if preset else None),
            gate=preset.gate if preset else gate,
            pool_weights=preset.pool_weights if preset else "differentiated")[0]
        np.testing.assert_allclose(np.asarray(panel.z, dtype=np.float64),
                                   expected.sum(0).double().numpy(), rtol=1e-5, atol=1e-7)
    explorer.close()


def test_a_failed_comparison_leaves_both_panels_of_one_target():
    # The pullback of the new target was drawn before Grad-CAM failed on a model without a
    # convolution: the two panels named different classes (a review).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 5)).eval()
    model.input_size = 32
    explorer = pw.PullbackExplorer(model, "coffee", labels=LABELS)
    assert explorer.wait()
    titles = (explorer.pullback_figure.layout.title.text,
              explorer.gradient_figure.layout.title.text)
    explorer.compare.value = "gradcam"
    shown = int(model(explorer._images["coffee"]).argmax())
    explorer.target.value = f"{LABELS[(shown + 1) % 5]} ({(shown + 1) % 5})"
    assert explorer.wait()
    assert "need a Conv2d layer" in explorer.status.value
    assert (explorer.pullback_figure.layout.title.text,
            explorer.gradient_figure.layout.title.text) == titles
    explorer.close()


def test_names_are_escaped_once_in_titles_and_status_and_modules_draw_no_markup():
    # A module named "<b>conv</b><br>FAKE" was drawn bold over two lines in the unit's title,
    # and a label "a<b&c" read "a&lt;b&amp;c" on the status line, escaped twice (a review).
    model = markup_named_cnn()
    explorer = pw.PullbackExplorer(model, "coffee", labels=["a<b&c"] * 3)
    assert explorer.wait()
    assert "⁨a&lt;b&amp;c⁩" in explorer.pullback_figure.layout.title.text
    assert "⁨a&lt;b&amp;c⁩ ·" in explorer.status.value  # shown as a<b&c
    explorer.layer.value = "<b>conv</b><br>FAKE"
    assert explorer.wait()
    assert explorer.pullback_figure.layout.title.text.startswith(
        "Pullback of ⁨&lt;b&gt;conv&lt;/b&gt;&lt;br&gt;FAKE channel 0⁩")
    assert "<b>" not in explorer.status.value
    explorer.close()


def test_a_module_named_logits_is_a_layer_whose_units_the_explorer_draws():
    # The Layer box's value for class targets was "logits": an FCN's last convolution of that
    # name could not be chosen, and choosing it explained a class instead (a review).
    class FCN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                            torch.nn.ReLU())
            self.logits = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.logits(self.body(x)).mean((2, 3))

    torch.manual_seed(0)
    model = FCN().eval()
    model.input_size = 32
    explorer = pw.PullbackExplorer(model, "coffee", labels=LABELS[:4])
    assert explorer.wait()
    explorer.layer.value = "logits"
    explorer.channel.value = 2
    assert explorer.wait() and not explorer.channel.disabled
    assert "logits channel 2" in explorer.pullback_figure.layout.title.text
    expected = pw.excitation_pullback(model, explorer._images["coffee"], pw.Unit("logits", 2),
                                      temperature=0.3)[0]
    np.testing.assert_allclose(np.asarray(explorer.pullback_figure.data[0].z, dtype=np.float64),
                               figures.relative_map(expected).astype(np.float32), rtol=1e-5,
                               atol=1e-6)
    explorer.close()
