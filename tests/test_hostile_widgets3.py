"""A third hostile review of the explorer's Python side: a model changed under an open
explorer, uploads, the steps on the way of a change of several controls, and closing."""

import datetime
import io
import threading
import time
import types

import pytest
import torch
from PIL import Image

import pullback_widgets as pw
from pullback_widgets import figures
from pullback_widgets.widgets import explorer as explorer_module
from pullback_widgets.widgets.common import LOGITS
from tests.conftest import LABELS


def _sequential(*channels: int) -> torch.nn.Sequential:
    """Conv + ReLU per width in ``channels``, then a 5-class head; flat, so its leaves are
    the explorer's layers ("0", "1", ...)."""
    torch.manual_seed(0)
    layers, width = [], 3
    for out in channels:
        layers += [torch.nn.Conv2d(width, out, 3, padding=1), torch.nn.ReLU()]
        width = out
    model = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(width, 5)).eval()
    model.input_size = 32
    return model


def _png(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _upload(explorer, data: bytes, name="mine.png", declared: int | None = None) -> None:
    explorer.upload.value = ({"name": name, "type": "image/png",
                              "size": len(data) if declared is None else declared,
                              "content": memoryview(data),
                              "last_modified": datetime.datetime.now(datetime.timezone.utc)},)


def _record_requests(explorer) -> list:
    sent, submit = [], explorer._worker.submit
    explorer._worker.submit = lambda request: (sent.append(request), submit(request))[1]
    return sent


def _workers() -> int:
    return sum(t.name == "pullback-widgets-worker" for t in threading.enumerate())


# ---------------------------------------------------------------- the model changes meanwhile

def test_a_model_given_a_new_head_is_a_clear_error_not_the_old_class_names(net):
    # The user fine-tunes a 2-class head in a later cell: the explorer drew its class 0
    # under the old name "ant" (and kept three Top-5 buttons of the old head); with 10
    # classes it said "IndexError: list index out of range".
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    assert explorer.wait()
    for classes in (2, 10):
        net.fc = torch.nn.Linear(8, classes)
        explorer.temperature_control.up.click()
        assert explorer.wait()
        assert "⚠" in explorer.status.value
        assert f"now has {classes} classes, not the 5" in explorer.status.value
    explorer.close()


def test_layers_gone_from_a_changed_model_are_no_longer_offered():
    # The user shortens their model: the explorer passed its old list of layers to every new
    # forward, so every request, the logits' too, failed with "layer '7' produced no tensor
    # output", and the Layer box kept offering the layers gone.
    model = _sequential(6, 6, 6, 8)
    explorer = pw.PullbackExplorer(model, "coffee", labels=LABELS)
    assert explorer.wait()
    assert "7" in explorer.layer_shapes
    explorer.layer.value = "6"  # the last conv: 8 channels
    explorer.channel.value = 7
    assert explorer.wait() and "⚠" not in explorer.status.value
    del model[2:6]  # two conv + ReLU pairs: "7" and "8" are gone, "6" is the Linear now
    explorer.temperature_control.up.click()
    assert explorer.wait()
    assert "⚠" not in explorer.status.value, explorer.status.value
    assert list(explorer.layer_shapes) == ["0", "1", "2", "3", "4"]  # "4": the pool
    assert [value for _, value in explorer.layer.options] == [LOGITS, "0", "1", "2", "3", "4"]
    assert explorer.layer.value == LOGITS and explorer.channel.disabled
    predicted = int(model(explorer._images["coffee"]).argmax())
    assert explorer.pullback_figure.layout.title.text.startswith(
        f"Pullback of ⁨{LABELS[predicted]}⁩")
    explorer.close()


def test_a_layer_whose_channels_changed_bounds_its_channel_box_anew():
    # Layer "2" goes from 8 channels to 4: the Channel box still went up to 7.
    model = _sequential(6, 8)
    explorer = pw.PullbackExplorer(model, "coffee", labels=LABELS)
    assert explorer.wait()
    explorer.layer.value = "2"
    explorer.channel.value = 7
    assert explorer.wait()
    model[2], model[-1] = torch.nn.Conv2d(6, 4, 3, padding=1), torch.nn.Linear(4, 5)
    explorer.view.value = "RGB"
    assert explorer.wait() and "⚠" not in explorer.status.value, explorer.status.value
    assert explorer.layer_shapes["2"][0] == 4
    assert (explorer.channel.max, explorer.channel.value) == (3, 3)
    assert "2 channel 3" in explorer.pullback_figure.layout.title.text
    explorer.close()


# ---------------------------------------------------------------- steps on the way

def test_an_upload_requests_no_forward_of_the_first_image(net):
    # New options select the first image before the upload is: the worker was sent a
    # request (a forward, a flash of its maps) for an image nobody chose.
    explorer = pw.PullbackExplorer(net, "rocket", labels=LABELS)
    explorer.image.value = "chelsea"
    assert explorer.wait()
    sent = _record_requests(explorer)
    _upload(explorer, _png())
    assert explorer.wait()
    assert [request.image_key for request in sent] == [explorer.image.value]
    assert explorer.image.value.startswith("upload: mine.png")
    explorer.close()


class _Block(torch.nn.Module):
    def __init__(self, width: int, out: int):
        super().__init__()
        self.conv, self.relu = torch.nn.Conv2d(width, out, 3, padding=1), torch.nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x))


def test_showing_all_layers_requests_only_the_layer_kept():
    # The new list of layers selected the logits on the way: a request for them was sent
    # (a pullback computed and drawn, the Target box filled in) before the layer kept.
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block(3, 6), _Block(6, 8), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    model.input_size = 32
    explorer = pw.PullbackExplorer(model, "coffee", labels=LABELS)
    assert explorer.wait()
    explorer.layer.value = "1"  # a block
    explorer.channel.value = 5
    assert explorer.wait()
    sent = _record_requests(explorer)
    explorer.all_layers.value = True
    assert "1.conv" in explorer.layer_shapes  # the layers inside the blocks are offered now
    explorer.all_layers.value = False
    assert explorer.wait()
    assert sent == []  # the same layer and channel: nothing new to compute
    assert (explorer.layer.value, explorer.channel.value) == ("1", 5)
    explorer.all_layers.value = True
    explorer.layer.value = "1.conv"
    explorer.all_layers.value = False  # a layer no longer offered goes back to the logits
    assert [(request.layer, request.channel) for request in sent] == [
        ("1.conv", 5), (LOGITS, 5)]
    assert explorer.wait() and "⚠" not in explorer.status.value
    explorer.close()


# ---------------------------------------------------------------- uploads

def test_an_upload_is_measured_by_its_bytes_not_by_the_size_it_declares(net):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS, max_upload_bytes=1_000)
    assert explorer.wait()
    _upload(explorer, b"\x89PNG" + b"x" * 5_000, declared=10)
    assert "limit is" in explorer.status.value
    explorer.close()


@pytest.mark.parametrize("limits, error", [
    (dict(max_upload_bytes="20MB"), TypeError), (dict(max_upload_bytes=0), ValueError),
    (dict(max_upload_pixels=1.5e6), TypeError), (dict(max_upload_pixels=-1), ValueError)])
def test_bad_upload_limits_are_refused_when_the_explorer_is_made(net, limits, error):
    # They were taken as given, and every upload then failed ("'>' not supported ...").
    threads = _workers()
    with pytest.raises(error, match="max_upload"):
        pw.PullbackExplorer(net, "coffee", labels=LABELS, **limits)
    assert _workers() == threads


def test_an_upload_after_close_decodes_nothing(net):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    assert explorer.wait()
    explorer.close()
    options = explorer.image.options
    _upload(explorer, _png())
    assert explorer.image.options == options and explorer._images == {}


# ---------------------------------------------------------------- closing

def test_a_ctrl_c_while_closing_still_closes_every_widget(net):
    # Ctrl-C while close() waited for the worker's job left the explorer marked closed with
    # all its widgets open, and a second close() returned at once.
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    assert explorer.wait()
    close_worker = explorer._worker.close

    def interrupted(timeout=None):
        close_worker()
        raise KeyboardInterrupt

    explorer._worker.close = interrupted
    with pytest.raises(KeyboardInterrupt):
        explorer.close()
    assert explorer.comm is None
    assert explorer.status.comm is None and explorer.pullback_figure.comm is None
    assert explorer._session is None
    explorer.close()  # a second close is harmless


def test_a_ctrl_c_in_the_constructor_leaves_no_worker_running(net, monkeypatch):
    # Closing the explorer of a cell's earlier run waits for its worker; a Ctrl-C there
    # left the new explorer, which the caller never got, with its thread running.
    threads = _workers()

    def interrupted(explorer):
        raise KeyboardInterrupt

    monkeypatch.setattr(explorer_module, "close_earlier_runs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pw.PullbackExplorer(net, "coffee", labels=LABELS)
    assert _workers() == threads


# ---------------------------------------------------------------- the classroom app

def test_a_ctrl_c_while_the_app_waits_for_voilas_kernels_still_kills_them(monkeypatch):
    # Ctrl-C, then the terminal closed (SIGHUP, a KeyboardInterrupt here) while the app gave
    # Voilà's kernels their grace: the interrupt escaped and left them running, orphaned.
    from pullback_widgets import app

    class Kernel:
        killed = False

        def is_running(self):
            return not self.killed

        def status(self):
            return "running"

        def kill(self):
            self.killed = True

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(app, "time", types.SimpleNamespace(monotonic=time.monotonic,
                                                           sleep=interrupted))
    kernels = [Kernel(), Kernel()]
    try:
        app._reap(kernels)
    except KeyboardInterrupt:  # not let through to pytest, which would stop the whole run
        pytest.fail("the interrupt escaped _reap")
    assert all(kernel.killed for kernel in kernels)


# ---------------------------------------------------------------- models of other dtypes

@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_an_explorer_feeds_its_photos_in_the_models_dtype(dtype):
    # The photos are float32: a float64 or bfloat16 model refused them when the explorer was
    # made ("inputs are torch.float32 but the model's parameters are torch.float64").
    model = _sequential(6, 8).to(dtype)
    explorer = pw.PullbackExplorer(model, "coffee", labels=LABELS, temperature=0.5)
    try:
        assert explorer.wait()
        assert "⚠" not in explorer.status.value, explorer.status.value
        image = explorer._images["coffee"].to(dtype)
        predicted = int(model(image).argmax())
        expected = figures.relative_map(pw.excitation_pullback(
            model, image, predicted, temperature=0.5)[0].float())
        drawn = torch.tensor(explorer.pullback_figure.data[0].z, dtype=torch.float64)
        torch.testing.assert_close(drawn, torch.from_numpy(expected).double(),
                                   rtol=1e-5, atol=1e-6)
    finally:
        explorer.close()


def test_an_ascent_explorer_runs_on_a_float64_model():
    model = _sequential(6, 8).double()
    explorer = pw.AscentExplorer(model, "coffee", labels=LABELS, temperature=0.5)
    try:
        explorer.steps.value = 2
        assert explorer.run() and explorer.wait()
        assert "⚠" not in explorer.status.value, explorer.status.value
        assert explorer.result.images[-1].dtype == torch.float64
    finally:
        explorer.close()


def test_an_explorer_follows_a_module_swapped_for_one_without_weights():
    # No parameter or buffer changes: the explorer kept drawing the old model's pullback.
    model = _sequential(6, 8)
    explorer = pw.PullbackExplorer(model, "coffee", labels=LABELS, temperature=0.5)
    try:
        assert explorer.wait()
        model[3] = torch.nn.Identity()  # the last ReLU
        explorer.target.value = explorer.target.options[2]
        assert explorer.wait() and "⚠" not in explorer.status.value, explorer.status.value
        image = explorer._images["coffee"]
        expected = figures.relative_map(pw.excitation_pullback(model, image, 2,
                                                               temperature=0.5)[0])
        drawn = torch.tensor(explorer.pullback_figure.data[0].z, dtype=torch.float64)
        torch.testing.assert_close(drawn, torch.from_numpy(expected).double(),
                                   rtol=1e-5, atol=1e-6)
    finally:
        explorer.close()


def test_a_pullback_that_fails_for_a_new_image_leaves_the_photo_of_the_maps_on_show(
        net, monkeypatch):
    # The new image's forward succeeded, its pullback failed: the photo and the top classes
    # showed the new image beside the old image's maps.
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    try:
        assert explorer.wait()
        photo, classes = explorer.photo.value, [b.description for b in explorer.top_buttons]
        pullback = pw.PullbackSession.pullback

        def failing(self, *args, **kwargs):
            raise pw.PullbackWidgetsError("no pullback today")

        monkeypatch.setattr(pw.PullbackSession, "pullback", failing)
        explorer.image.value = "chelsea"
        assert explorer.wait() and "no pullback today" in explorer.status.value
        assert explorer.photo.value == photo
        assert [b.description for b in explorer.top_buttons] == classes
        monkeypatch.setattr(pw.PullbackSession, "pullback", pullback)
        explorer.temperature_control.up.click()
        assert explorer.wait() and "⚠" not in explorer.status.value
        assert explorer.photo.value != photo  # drawn with chelsea's maps
    finally:
        explorer.close()
