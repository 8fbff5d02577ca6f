"""The widgets without a browser: set controls, check the figures against the engine."""

import datetime
import io
import re
import threading
import time
import warnings

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
import traitlets
from PIL import Image

import pullback_widgets as pw
from pullback_widgets import figures
from pullback_widgets.widgets.common import LOGITS, LatestOnlyWorker
from pullback_widgets.widgets.figure_widget import figure_widget, sync_figure
from tests.conftest import LABELS
from tests.test_engine import _assert_untouched, _model_snapshot


def _heatmap_z(figure) -> np.ndarray:
    return np.asarray(figure.data[0].z, dtype=np.float64)


def _expected_relative(model, image, target, **settings) -> np.ndarray:
    pullback = pw.excitation_pullback(model, image, target, **settings)[0]
    return figures.relative_map(pullback).astype(np.float32).astype(np.float64)


def _forward_counter(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


def test_heatmap_equals_the_engine_for_each_setting(net):
    explorer = pw.PullbackExplorer(net, "chelsea", labels=LABELS, temperature=0.5)
    assert explorer.wait()
    image = explorer._images["chelsea"]
    predicted = int(net(image).argmax())
    np.testing.assert_allclose(_heatmap_z(explorer.pullback_figure),
                               _expected_relative(net, image, predicted, temperature=0.5),
                               rtol=1e-5, atol=1e-6)
    figure_before = explorer.pullback_figure
    z_before = _heatmap_z(explorer.pullback_figure)
    explorer.temperature.value = 2.0
    explorer.gate.value = "normal_cdf"
    explorer.target.value = "eel (4)"
    assert explorer.wait()
    assert explorer.pullback_figure is figure_before
    z_after = _heatmap_z(explorer.pullback_figure)
    assert not np.allclose(z_before, z_after)
    np.testing.assert_allclose(
        z_after, _expected_relative(net, image, 4, temperature=2.0, gate="normal_cdf"),
        rtol=1e-5, atol=1e-6)
    gradient = pw.excitation_pullback(net, image, 4, gate="hard")[0]
    np.testing.assert_allclose(_heatmap_z(explorer.gradient_figure),
                               figures.relative_map(gradient).astype(np.float32), rtol=1e-5)
    assert "eel" in explorer.status.value and "⚠" not in explorer.status.value


def test_layer_and_channel_make_a_unit_target(net):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS, temperature=0.7)
    explorer.wait()
    assert "conv4" in explorer.layer_shapes
    explorer.layer.value = "conv4"
    assert not explorer.channel.disabled and explorer.channel.max == 7
    explorer.channel.value = 5
    explorer.wait()
    image = explorer._images["coffee"]
    np.testing.assert_allclose(
        _heatmap_z(explorer.pullback_figure),
        _expected_relative(net, image, pw.Unit("conv4", 5), temperature=0.7),
        rtol=1e-5, atol=1e-6)


def test_only_the_image_reruns_the_forward(net):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    explorer.wait()
    calls, handle = _forward_counter(net)
    try:
        explorer.temperature.value = 0.05
        explorer.wait()
        explorer.gate.value = "hard"
        explorer.wait()
        explorer.layer.value = "conv5"
        explorer.wait()
        explorer.channel.value = 3
        explorer.wait()
        explorer.view.value = "RGB"
        explorer.wait()
        assert calls == []
        explorer.image.value = "rocket"
        explorer.wait()
        assert len(calls) == 1
    finally:
        handle.remove()


def test_figures_carry_plotlys_bundle_as_data_under_a_small_loader():
    # The loader imports the bundle once per page (tests/browser check that in Chromium).
    widget = figure_widget()
    try:
        state = widget.get_state()
        assert state["_plotly_esm"] == str(go.FigureWidget._esm)
        assert len(state["_esm"]) < 4_000 < 4_000_000 < len(state["_plotly_esm"])
        assert state["_config"] == {"displayModeBar": False}
    finally:
        widget.close()


def test_a_page_that_asks_for_the_figure_gets_it_whole_as_state():
    # Plotly updates a shown figure by messages and leaves its state as it was: a page that
    # connected meanwhile drew that stale state and missed the messages, so each page's model
    # asks for the whole figure once Plotly's model exists.
    widget = figure_widget()
    try:
        sync_figure(widget, go.Figure(go.Heatmap(z=[[0.0, 1.0]])))
        widget._view_count = 1
        sync_figure(widget, go.Figure(go.Heatmap(z=[[2.0, 3.0]])))
        assert list(widget._widget_data[0]["z"][0]) == [0.0, 1.0]  # messages only
        sent = []
        widget.send_state = lambda key=None: sent.append(set(key))
        widget._handle_custom_msg({"request": "whole figure"}, [])
        assert sent == [{"_widget_data", "_widget_layout"}]
        assert list(widget._widget_data[0]["z"][0]) == [2.0, 3.0]
        widget._handle_custom_msg({"request": "whole figure"}, [])  # sent, though unchanged
        widget._handle_custom_msg({"request": "something else"}, [])
        widget._handle_custom_msg(["whole figure"], [])
        assert sent == [{"_widget_data", "_widget_layout"}] * 2
    finally:
        widget.close()


def test_a_figure_update_sent_while_a_page_update_is_applied_reaches_the_page():
    # ipywidgets applies a page's update (a view counted; the trace deltas Plotly's view
    # reports after each draw) while traitlets holds the widget's notifications: a worker's
    # update message, set and then reset to None meanwhile, went out as None alone.
    from pullback_widgets.widgets.figure_widget import SyncedFigureWidget

    meanwhile = []

    class Widget(SyncedFigureWidget):
        @traitlets.validate("_view_count")
        def _run_meanwhile(self, proposal):  # inside set_state's hold on notifications
            for worker in meanwhile:
                worker.start()
                worker.join(timeout=1.0)  # waits for the figure's lock, once fixed
            meanwhile.clear()
            return proposal.value

    widget = Widget(go.Heatmap(z=[[0.0, 1.0]]))
    try:
        widget._view_count = 1
        sent = []
        widget.send_state = lambda key=None: sent.append(widget.get_state(key))
        worker = threading.Thread(target=sync_figure,
                                  args=(widget, go.Figure(go.Heatmap(z=[[5.0, 6.0]]))))
        meanwhile.append(worker)
        widget.set_state({"_view_count": 2})
        worker.join()
        updates = [state["_py2js_update"] for state in sent
                   if state.get("_py2js_update") is not None]
        assert [np.asarray(update["style_data"]["z"]).tolist() for update in updates] == [
            [[[5.0, 6.0]]]]
    finally:
        widget.close()


def test_a_figure_displayed_while_a_worker_updates_it_is_stored_whole():
    # Plotly's _repr_mimebundle_ stores the figure as the state pages draw from: a display in
    # the kernel's thread must wait for the worker's update, not store it half done.
    import contextlib

    from plotly.subplots import make_subplots

    from pullback_widgets.widgets.figure_widget import SyncedFigureWidget

    displays = []

    class Widget(SyncedFigureWidget):
        @contextlib.contextmanager
        def batch_update(self):
            with super().batch_update():
                yield
            while displays:  # the traces are new, the old panels' axes not yet gone
                display = displays.pop()
                display.start()
                display.join(timeout=1.0)

    three = make_subplots(rows=1, cols=3)
    for col in (1, 2, 3):
        three.add_trace(go.Heatmap(z=[[0.0, 1.0]]), row=1, col=col)
    widget = Widget()
    try:
        sync_figure(widget, three)
        widget._view_count = 1
        display = threading.Thread(target=widget._repr_mimebundle_)
        displays.append(display)
        sync_figure(widget, go.Figure(go.Heatmap(z=[[2.0, 3.0]])))
        display.join()
        assert len(widget._widget_data) == 1
        assert not {"xaxis2", "xaxis3"} & set(widget._widget_layout)
    finally:
        widget.close()


def test_a_page_that_drew_traces_since_replaced_does_not_fail_the_kernel():
    # A page draws the state it fetched before the whole figure reaches it, and Plotly's view
    # then reports the drawn traces by uid; a change of view since (new trace types) made new
    # uids, and Plotly's handler failed on the old ones (ValueError).
    widget = figure_widget()
    try:
        sync_figure(widget, go.Figure(go.Heatmap(z=[[0.0, 1.0]])))
        widget._view_count = 1
        sync_figure(widget, go.Figure(go.Scatter(y=[1.0, 2.0])))
        state = widget.get_state()
        edit = state["_last_trace_edit_id"]
        drawn = state["_widget_data"][0]["uid"]
        assert drawn != widget.data[0].uid
        widget.set_state({"_js2py_traceDeltas": {
            "trace_deltas": [{"uid": drawn, "type": "heatmap"}], "trace_edit_id": edit}})
        assert widget._js2py_traceDeltas is None
        widget.set_state({"_js2py_traceDeltas": {  # a page showing the figure as it is
            "trace_deltas": [{"uid": widget.data[0].uid, "type": "scatter"}],
            "trace_edit_id": edit}})
        assert not widget._trace_edit_in_process
    finally:
        widget.close()


def test_views_switch_trace_types_in_the_same_figure_widget(net):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    explorer.wait()
    widget = explorer.pullback_figure
    assert [t.type for t in widget.data] == ["heatmap"]
    explorer.view.value = "magnitude overlay"
    explorer.wait()
    assert [t.type for t in widget.data] == ["image", "heatmap"]
    explorer.view.value = "RGB"
    explorer.wait()
    assert [t.type for t in widget.data] == ["image"]
    assert explorer.pullback_figure is widget


def test_top5_buttons_and_strip(net):
    explorer = pw.PullbackExplorer(net, "astronaut", labels=LABELS)
    explorer.wait()
    probabilities = pw.PullbackSession(net, explorer._images["astronaut"]).probabilities[0]
    order = probabilities.argsort(descending=True).tolist()
    assert [b.class_index for b in explorer.top_buttons] == order
    assert explorer.top_buttons[0].description.startswith(LABELS[order[0]])
    explorer.top_buttons[2].click()
    explorer.wait()
    assert explorer.target.value == f"{LABELS[order[2]]} ({order[2]})"
    assert len(explorer.strip_figure.data) == 0
    explorer.strip_button.click()
    explorer.wait()
    assert len(explorer.strip_figure.data) == len(pw.model_helpers.STRIP_TEMPERATURES)


def test_labels_are_wide_enough_to_read(net):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    for control in (explorer.image, explorer.target, explorer.temperature, explorer.gate,
                    explorer.layer, explorer.channel, explorer.view):
        assert control.style.description_width == "90px", control.description
    assert [c.description for c in (explorer.image, explorer.target, explorer.temperature,
                                    explorer.gate, explorer.layer, explorer.channel,
                                    explorer.view)] == [
        "Image", "Target", "Temperature", "Gate", "Layer", "Channel", "View"]


def _png_bytes(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _upload(explorer, data: bytes, name="mine.png"):
    explorer.upload.value = ({"name": name, "type": "image/png", "size": len(data),
                              "content": memoryview(data),
                              "last_modified": datetime.datetime.now(datetime.timezone.utc)},)


def test_upload_adds_an_image_and_bad_uploads_show_in_the_status_line(net):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS, max_upload_bytes=10_000,
                                   max_upload_pixels=5_000)
    explorer.wait()
    _upload(explorer, _png_bytes())
    explorer.wait()
    assert explorer.image.value.startswith("upload: mine.png")
    assert "⚠" not in explorer.status.value
    _upload(explorer, b"this is not a picture", name="notes.png")
    assert "⚠" in explorer.status.value and "notes" not in explorer.image.value
    _upload(explorer, _png_bytes((200, 100)), name="big.png")
    assert "⚠" in explorer.status.value and "max_pixels" in explorer.status.value
    _upload(explorer, b"x" * 20_000, name="huge.png")
    assert "limit" in explorer.status.value
    explorer.temperature.value = 0.2  # still usable afterwards
    explorer.wait()
    assert "⚠" not in explorer.status.value


def test_errors_during_compute_become_a_status_line(net):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    explorer.wait()
    broken = {"on": True}

    def explode(module, args):
        if broken["on"]:
            raise RuntimeError("the model fell over")

    handle = net.register_forward_pre_hook(explode)
    try:
        explorer.image.value = "rocket"
        explorer.wait()
        assert "⚠" in explorer.status.value and "fell over" in explorer.status.value
        broken["on"] = False
        explorer.image.value = "chelsea"
        explorer.wait()
        assert "⚠" not in explorer.status.value
    finally:
        handle.remove()


def test_bad_constructor_arguments_raise_clear_errors(net):
    with pytest.raises(TypeError, match="model"):
        pw.PullbackExplorer(42)
    with pytest.raises(ValueError, match=r"sample|image"):
        pw.PullbackExplorer(net, "no-such-photo.png", labels=LABELS)


def test_the_explorer_follows_a_model_changed_while_it_is_open(net):
    # A user trains the model in another cell, then moves a slider: the explorer makes a new
    # forward, and neither panel shows a map of the model as it was (the gradient panel's
    # cache held one).
    explorer = pw.PullbackExplorer(net, "chelsea", labels=LABELS, temperature=0.5)
    explorer.target.value = "eel (4)"
    assert explorer.wait()
    image = explorer._images["chelsea"]
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(1.5).add_(0.01)
    explorer.temperature.value = 0.7
    assert explorer.wait()
    assert explorer.target.value == "eel (4)"  # the same class: its gradient was cached
    shown = 4
    assert "⚠" not in explorer.status.value, explorer.status.value
    np.testing.assert_allclose(_heatmap_z(explorer.pullback_figure),
                               _expected_relative(net, image, shown, temperature=0.7),
                               rtol=1e-5, atol=1e-6)
    gradient = pw.excitation_pullback(net, image, shown, gate="hard")[0]
    np.testing.assert_allclose(_heatmap_z(explorer.gradient_figure),
                               figures.relative_map(gradient).astype(np.float32), rtol=1e-5)
    explorer.close()


def test_two_explorers_on_one_model_do_not_interfere(net):
    before = _model_snapshot(net)
    a = pw.PullbackExplorer(net, "coffee", labels=LABELS, temperature=0.1)
    b = pw.PullbackExplorer(net, "coffee", labels=LABELS, temperature=3.0)
    a.wait()
    b.wait()
    image = a._images["coffee"]
    predicted = int(net(image).argmax())
    np.testing.assert_allclose(_heatmap_z(a.pullback_figure),
                               _expected_relative(net, image, predicted, temperature=0.1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_heatmap_z(b.pullback_figure),
                               _expected_relative(net, image, predicted, temperature=3.0),
                               rtol=1e-5, atol=1e-6)
    _assert_untouched(net, before)


def test_worker_computes_only_the_latest_of_a_burst():
    seen, entered, release = [], threading.Event(), threading.Event()

    def job(request):
        entered.set()
        assert release.wait(60), "the test never released the job"
        seen.append(request)

    worker = LatestOnlyWorker(job, on_error=lambda error, request: None)
    worker.submit(0)
    # Not a sleep: on a loaded machine the worker may not take job 0 within 50 ms; the burst
    # then replaces it, and the worker computes [49] alone.
    assert entered.wait(60)  # the worker is now blocked inside job(0)
    for value in range(1, 50):
        worker.submit(value)
    release.set()
    assert worker.wait()
    assert seen == [0, 49]
    worker.close()


def test_worker_survives_a_failing_job():
    errors = []

    def job(request):
        if request == "bad":
            raise ValueError("nope")

    worker = LatestOnlyWorker(job, on_error=lambda error, request: errors.append(error))
    worker.submit("bad")
    assert worker.wait()
    worker.submit("good")
    assert worker.wait()
    assert [str(e) for e in errors] == ["nope"] and worker.completed == 1



@pytest.mark.parametrize("views", ["none", "appears during the update", "already there"])
def test_a_figure_update_reaches_a_page_that_starts_showing_it_meanwhile(views):
    # plotly's incremental messages are lost where no page shows the figure yet; the state a
    # page draws from must then hold the update, also where the page appears mid-update.
    import contextlib

    from pullback_widgets.widgets.figure_widget import SyncedFigureWidget, sync_figure

    class Widget(SyncedFigureWidget):
        @contextlib.contextmanager
        def batch_update(self):
            with super().batch_update():
                yield
            if views == "appears during the update":
                self._view_count = 1

    widget = Widget(go.Figure(go.Heatmap(z=[[0.0, 0.0]])))
    widget._view_count = 1 if views == "already there" else 0
    sync_figure(widget, go.Figure(go.Heatmap(z=[[1.0, 2.0]])))
    assert list(widget.data[0].z[0]) == [1.0, 2.0]
    drawn = list(widget._widget_data[0]["z"][0])
    assert drawn == ([0.0, 0.0] if views == "already there" else [1.0, 2.0])


@pytest.mark.parametrize("make", ["PullbackExplorer", "AscentExplorer"])
def test_a_new_page_gets_every_widgets_state_again(net, make):
    # A Voilà page reads the states, then connects: what was sent in between is lost (a status
    # line stuck at "loading …"). A view of the explorer appearing sends it all again.
    explorer = getattr(pw, make)(net, "coffee", labels=LABELS, temperature=0.5)
    assert explorer.wait()
    sent = []
    for widget in (explorer.status, explorer.temperature):
        widget.send_state = lambda key=None, widget=widget: sent.append(widget)
    explorer._view_count = 1  # the page's first view of the explorer
    assert {id(widget) for widget in sent} == {id(explorer.status), id(explorer.temperature)}
    sent.clear()
    explorer._view_count = 0  # a view went: nothing to send
    assert sent == []
    explorer._view_count = 1  # a page again (a reload)
    assert len(sent) == 2
    explorer.close()


# ---------------------------------------------------------------- AscentExplorer

def test_ascent_explorer_streams_frames_and_matches_the_engine(net):
    explorer = pw.AscentExplorer(net, "coffee", labels=LABELS, temperature=0.5)
    explorer.steps.value, explorer.step_size.value, explorer.eps.value = 3, 2.0, 4.0
    explorer.target.value = "cat (2)"
    frames_seen = []
    original = explorer._on_step

    def spy(step, result):
        frames_seen.append((step, len(explorer.frames_figure.layout.annotations)))
        return original(step, result)

    explorer._on_step = spy
    explorer.run()
    assert explorer.wait()
    assert [s for s, _ in frames_seen] == [1, 2, 3]
    expected = pw.pullback_ascent(net, explorer._images["coffee"], 2, steps=3, step_size=2.0,
                                  eps=4.0, temperature=0.5, progress=False)
    torch.testing.assert_close(explorer.result.images[-1], expected.images[-1])
    assert explorer.progress.value == 3 and explorer.frame.max == 3
    assert not explorer.frame.disabled and explorer.run_button.disabled is False
    explorer.frame.value = 1
    assert "step 1" in explorer.frames_figure.layout.annotations[0].text
    assert len(explorer.curve_figure.data[0].y) == 2
    assert "gain" in explorer.status.value


def test_ascent_explorer_counterfactual_and_stop(net):
    explorer = pw.AscentExplorer(net, "chelsea", labels=LABELS)
    explorer.counterfactual.value = True
    explorer.run()
    assert "⚠" in explorer.status.value and "Targets" in explorer.status.value
    explorer.targets.value = ["ant (0)", "dog (3)", "eel (4)"]
    explorer.steps.value = 2
    explorer.run()
    explorer.wait()
    assert explorer.result.images[-1].shape[0] == 3
    assert len(explorer.frames_figure.data) == 3
    explorer.counterfactual.value = False
    explorer.steps.value = 30
    # The run's forwards wait for Stop: on a loaded machine the worker could run all 30 steps
    # before this thread pressed it.
    stop_pressed = threading.Event()

    def wait_for_stop(module, args):
        if threading.current_thread() is not threading.main_thread():
            assert stop_pressed.wait(60), "the test never pressed Stop"

    hold = net.register_forward_pre_hook(wait_for_stop)
    try:
        explorer.run()
        explorer.stop()
        stop_pressed.set()
        assert explorer.wait()
    finally:
        hold.remove()
    assert explorer.result.stopped and len(explorer.result.images) < 31
    assert "stopped" in explorer.status.value


def test_real_model_explorer_end_to_end():
    """The embedded EfficientNet-Lite0 on a sample photo: espresso, and live updates."""
    explorer = pw.PullbackExplorer()
    explorer.wait()
    assert explorer.top_buttons[0].description.startswith("espresso")
    z_before = _heatmap_z(explorer.pullback_figure)
    explorer.temperature.value = 0.1
    explorer.wait()
    assert not np.allclose(z_before, _heatmap_z(explorer.pullback_figure))
    assert explorer.layer.options[0][1] == LOGITS
    assert any(value == "blocks.5" for _, value in explorer.layer.options)


# ---------------------------------------------------------------- the explorer's first seconds


def _hold_forwards(model):
    entered, release = threading.Event(), threading.Event()

    def hold(module, args):
        if threading.current_thread() is threading.main_thread():
            return  # the constructor's own probe forward runs here
        entered.set()
        assert release.wait(30)

    return entered, release, model.register_forward_pre_hook(hold)


def test_explorer_shows_at_once_and_says_it_is_loading(net):
    entered, release, handle = _hold_forwards(net)
    try:
        explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
        assert entered.wait(30)  # the constructor returned while the worker loads
        assert "loading the photo “coffee” and the layers of EveryOpNet" in explorer.status.value
        assert "coffee" in explorer.status.value
        release.set()
        assert explorer.wait()
    finally:
        handle.remove()
    assert "drawn in" in explorer.status.value
    explorer.close()


def test_busy_state_names_the_request_at_once_and_the_time_when_done(net):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    explorer.wait()
    entered, release, handle = _hold_forwards(net)
    try:
        explorer.image.value = "rocket"
        assert entered.wait(30)
        assert "computing the predicted class on “rocket”" in explorer.status.value
        release.set()
        assert explorer.wait()
    finally:
        handle.remove()
    # The worker may not take the request before we have read the status line: on a loaded
    # machine it could compute the map, and say "drawn in", before this thread looked.
    with explorer._worker._lock:
        explorer.temperature.value = 2.0
        assert "computing" in explorer.status.value and "T = 2" in explorer.status.value
    assert explorer.wait()
    # Each panel's time; the plain gradient does not depend on T and comes from the cache.
    assert re.search(r"T = 2 · sigmoid · pullback \d+ ms · Plain gradient \d+ ms \(cached\) · "
                     r"drawn in \d+ ms", explorer.status.value)
    explorer.close()


def test_the_photo_being_explained_is_shown(net):
    explorer = pw.PullbackExplorer(net, "astronaut", labels=LABELS)
    explorer.wait()
    shown = np.asarray(Image.open(io.BytesIO(explorer.photo.value)))
    expected = (explorer._images["astronaut"][0].permute(1, 2, 0) * 255).round().byte().numpy()
    np.testing.assert_array_equal(shown, expected)
    explorer.image.value = "rocket"
    explorer.wait()
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(explorer.photo.value))), shown)
    explorer.close()


def test_target_box_names_the_class_drawn_and_follows_top5_and_image(net):
    explorer = pw.PullbackExplorer(net, "astronaut", labels=LABELS)
    explorer.wait()
    completed = explorer._worker.completed
    predicted = explorer.top_buttons[0].class_index
    assert explorer.target.value == f"{LABELS[predicted]} ({predicted})"
    assert explorer._worker.completed == completed  # naming it recomputed nothing
    explorer.top_buttons[3].click()
    explorer.wait()
    chosen = explorer.top_buttons[3].class_index
    assert explorer.target.value == f"{LABELS[chosen]} ({chosen})"
    assert LABELS[chosen] in explorer.pullback_figure.layout.title.text
    explorer.target.value = ""  # back to the prediction, which the box then names
    explorer.wait()
    assert explorer.target.value == f"{LABELS[predicted]} ({predicted})"
    explorer.image.value = "chelsea"  # an automatic target follows the new prediction
    explorer.wait()
    new = int(net(explorer._images["chelsea"]).argmax())
    assert explorer.target.value == f"{LABELS[new]} ({new})"
    explorer.close()


def test_temperature_shows_the_default_exactly_and_draws_it_once(net):
    net.default_temperature = 0.7
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    explorer.wait()
    slider = explorer.temperature
    assert slider.value == 0.7 and slider.readout_format == ".3"  # d3 then shows "0.7"
    steps = (np.log10(0.7) - slider.min) / slider.step
    assert abs(steps - round(steps)) < 1e-9  # the log grid passes through 0.7
    assert slider.base ** slider.min <= 0.01 and slider.base ** slider.max >= 10
    assert explorer._worker.completed == 1
    slider.value = slider.base ** (slider.min + round(steps) * slider.step)  # a browser's echo
    explorer.wait()
    assert explorer._worker.completed == 1
    explorer.close()


def test_step_buttons_move_the_temperature_one_grid_step(net):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS, temperature=0.5)
    explorer.wait()
    z_before = _heatmap_z(explorer.pullback_figure)
    explorer.temperature_control.up.click()
    assert explorer.temperature.value == pytest.approx(0.5 * 10 ** 0.05, rel=1e-9)
    explorer.wait()
    assert not np.allclose(z_before, _heatmap_z(explorer.pullback_figure))
    for _ in range(3):
        explorer.temperature_control.down.click()
    assert explorer.temperature.value == pytest.approx(0.5 * 10 ** -0.1, rel=1e-9)
    for _ in range(200):
        explorer.temperature_control.down.click()
    assert explorer.temperature.value == pytest.approx(10 ** explorer.temperature.min)
    explorer.temperature.value = float("nan")  # from Python: a status line, and then
    explorer.wait()
    assert "must be a finite number" in explorer.status.value
    explorer.temperature_control.up.click()  # the buttons still work (a ValueError before)
    assert explorer.temperature.value == pytest.approx(10 ** (explorer.temperature.min + 0.05))
    explorer.wait()
    explorer.close()


def test_plotly_mode_bar_is_hidden_so_titles_stay_readable(net):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    ascent = pw.AscentExplorer(net, "coffee", labels=LABELS)
    for figure in (explorer.pullback_figure, explorer.gradient_figure, explorer.strip_figure,
                   ascent.frames_figure, ascent.diff_figure, ascent.curve_figure):
        assert figure._config.get("displayModeBar") is False
    explorer.close()
    ascent.close()


def _silu_relu_net():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.SiLU(), torch.nn.Conv2d(6, 6, 3), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(6, 5)).eval()
    model.input_size = 32
    return model


@pytest.mark.parametrize("explorer_class", ["PullbackExplorer", "AscentExplorer"])
def test_one_temperature_slider_scales_every_kind_of_gate(explorer_class):
    """At its first value the slider gives the model's per-kind defaults (SiLU 1.6, not the
    ReLU's 0.3); moved, every kind moves by the same factor (issue 15: one slider, a factor)."""
    net = _silu_relu_net()
    explorer = getattr(pw, explorer_class)(net, "chelsea", labels=LABELS)
    try:
        assert explorer.wait()
        assert explorer.temperature.value == pytest.approx(0.3)
        if explorer_class == "AscentExplorer":
            explorer.steps.value = 1
            explorer.run_button.click()
            assert explorer.wait()
            expected = pw.pullback_ascent(net, explorer.result.images[0], int(
                net(explorer.result.images[0]).argmax()), steps=1,
                step_size=explorer.step_size.value, eps=explorer.eps.value, progress=False)
            torch.testing.assert_close(explorer.result.images[-1], expected.images[-1])
            return
        image = explorer._images["chelsea"]
        predicted = int(net(image).argmax())
        np.testing.assert_allclose(_heatmap_z(explorer.pullback_figure),
                                   _expected_relative(net, image, predicted),
                                   rtol=1e-5, atol=1e-6)
        assert "silu 1.6" in explorer.status.value
        explorer.temperature.value = 0.6
        assert explorer.wait()
        doubled = {"relu": 0.6, "pool": 0.6, "silu": 3.2}
        np.testing.assert_allclose(_heatmap_z(explorer.pullback_figure),
                                   _expected_relative(net, image, predicted,
                                                      temperature=doubled),
                                   rtol=1e-5, atol=1e-6)
        assert "silu 3.2" in explorer.status.value
    finally:
        explorer.close()


@pytest.mark.parametrize("preset", ["paper v1", "paper latest"])
def test_gate_control_offers_the_paper_versions(net, preset):
    """At the slider's first value a preset is exactly that version's settings (issue 12)."""
    explorer = pw.PullbackExplorer(net, "chelsea", labels=LABELS, gate=preset)
    try:
        assert explorer.wait()
        assert list(explorer.gate.options)[-2:] == ["paper v1", "paper latest"]
        image = explorer._images["chelsea"]
        predicted = int(net(image).argmax())
        settings = pw.PAPER_V1 if preset == "paper v1" else pw.PAPER_LATEST
        np.testing.assert_allclose(_heatmap_z(explorer.pullback_figure),
                                   _expected_relative(net, image, predicted, **settings),
                                   rtol=1e-5, atol=1e-6)
        assert f"T = {settings.temperature['relu']:.3g}" in explorer.status.value
    finally:
        explorer.close()


class _NaNOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.input_size = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 3), 16

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3))) * float("nan")


def test_a_model_whose_output_is_nan_gets_a_status_line_not_nan_maps():
    explorer = pw.PullbackExplorer(_NaNOutput().eval(), "coffee", labels=["a", "b", "c"])
    explorer.wait()
    assert "holds NaN" in explorer.status.value
    assert explorer.pullback_figure.data == ()  # nothing drawn as if it meant something
    explorer.close()
    ascent = pw.AscentExplorer(_NaNOutput().eval(), "coffee", labels=["a", "b", "c"])
    ascent.run()
    ascent.wait()
    assert "holds NaN" in ascent.status.value
    ascent.close()


def test_a_change_made_while_the_worker_names_the_target_is_not_lost(net, monkeypatch):
    # The worker fills in the Target box after its first forward, which takes a snapshot of
    # the controls on its thread. A change the user makes between that snapshot and its
    # submission must win: before, the older snapshot replaced it and the explorer stayed on
    # the old temperature, its status at "computing …" for ever.
    from pullback_widgets.widgets import explorer as explorer_module

    entered = threading.Event()
    request = explorer_module.PullbackExplorer._request

    def slow_on_the_worker(self):
        snapshot = request(self)
        if threading.current_thread().name == "pullback-widgets-worker":
            entered.set()
            time.sleep(0.3)  # a thread switch at the worst moment
        return snapshot

    monkeypatch.setattr(explorer_module.PullbackExplorer, "_request", slow_on_the_worker)
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS, temperature=0.5)
    assert entered.wait(60)
    explorer.temperature_control.up.click()  # the user's last action
    explorer.wait()
    shown = f"T = {explorer.temperature.value:.3g}"
    assert shown in explorer.pullback_figure.layout.title.text
    assert "computing" not in explorer.status.value and shown in explorer.status.value
    explorer.close()


def test_explorers_show_notices_on_their_status_line_without_warning_them():
    # A warning from a worker thread lands under whichever notebook cell ran last.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 30 * 30, 3)).eval()
    model.input_size = 32
    with pytest.warns(UserWarning, match="gated no op"):  # the user's own session still warns
        pw.PullbackSession(model, torch.rand(1, 3, 32, 32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explorer = pw.PullbackExplorer(model, "coffee", labels=["a", "b", "c"])
        explorer.wait()
        ascent = pw.AscentExplorer(model, "coffee", labels=["a", "b", "c"])
        ascent.steps.value = 1
        assert ascent.run() and ascent.wait()
    assert "gated no op" in explorer.status.value and "gated no op" in ascent.status.value
    assert not [w for w in caught if "gated no op" in str(w.message)]
    explorer.close()
    ascent.close()
