"""A fifth hostile review of the widgets' Python side: a model changed while the worker's
forward runs, an overflowing logit, an upload after a failed one, and markup in the name of
Grad-CAM's layer. Each test failed before its fix."""

import datetime
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import pullback_widgets as pw
from pullback_widgets import figures
from tests.conftest import LABELS, every_op_net, markup_named_cnn


def _net() -> torch.nn.Module:
    model = every_op_net(dtype=torch.float32)
    model.input_size = 32
    return model


def _relative_z(figure) -> np.ndarray:
    return np.asarray(figure.data[0].z, dtype=np.float64)


@pytest.mark.parametrize("change", ["through .data", "in place"])
def test_a_model_changed_while_the_workers_forward_runs_is_not_drawn_along_the_old_gates(
        change):
    # The user runs a training cell while the worker makes the forward of a new image. The
    # session recorded the model as its forward left it, the change included, while its graph
    # held the forward before the change: every later map of that image was silently pulled
    # back through the new weights along the old gates (a change through .data), or failed
    # with autograd's in-place error until another image was chosen (a review).
    net = _net()
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS, temperature=0.5)
    try:
        assert explorer.wait()
        armed = threading.Event()
        armed.set()

        def change_meanwhile(module, args, output):
            # conv1 has run: its weights change while the rest of the forward goes on, as a
            # cell run in the kernel's thread changes them during the worker's forward.
            if armed.is_set() and threading.current_thread().name == "pullback-widgets-worker":
                armed.clear()
                with torch.no_grad():
                    if change == "in place":
                        net.conv1.weight.mul_(1.5)
                    else:
                        net.conv1.weight.data.mul_(1.5)

        handle = net.conv4.register_forward_hook(change_meanwhile)
        try:
            explorer.image.value = "rocket"
            assert explorer.wait()
        finally:
            handle.remove()
        assert not armed.is_set()  # the change did happen during a forward of the worker
        explorer.temperature.value = 1.0  # a later change of the controls, same image
        assert explorer.wait()
        assert "⚠" not in explorer.status.value, explorer.status.value
        image = explorer._images["rocket"]
        shown = int(net(image).argmax())
        expected = pw.excitation_pullback(net, image, shown, temperature=1.0)[0]
        np.testing.assert_allclose(_relative_z(explorer.pullback_figure),
                                   figures.relative_map(expected).astype(np.float32),
                                   rtol=1e-5, atol=1e-6)
    finally:
        explorer.close()


class _Overflowing(torch.nn.Module):
    """Three classes; class 2's logit overflows to +inf (its gradient stays finite)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)
        self.input_size = 32

    def forward(self, x):
        logits = self.fc(torch.relu(self.conv(x)).mean((2, 3)))
        return logits + torch.tensor([0.0, 0.0, float("inf")])


def test_an_infinite_logit_is_a_status_line_not_nan_percent_buttons():
    # Only NaN logits were refused: a logit of +inf made every class probability NaN, and the
    # Top-5 buttons read "a nan%", "b nan%", "c nan%" (in no order) under a clean status line;
    # the ascent explorer refuses such a model.
    explorer = pw.PullbackExplorer(_Overflowing().eval(), "coffee", labels=["a", "b", "c"])
    try:
        assert explorer.wait()
        assert "⚠" in explorer.status.value and "holds NaN or +inf" in explorer.status.value
        assert not any("nan" in button.description for button in explorer.top_buttons)
        assert explorer.pullback_figure.data == ()  # nothing drawn as if it meant something
    finally:
        explorer.close()


def _png(colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _upload(explorer, data: bytes, name: str) -> None:
    explorer.upload.value = ({"name": name, "type": "image/png", "size": len(data),
                              "content": memoryview(data),
                              "last_modified": datetime.datetime.now(datetime.timezone.utc)},)


def test_a_good_upload_after_a_bad_one_clears_its_error_also_when_it_is_the_photo_shown():
    # The photo on show uploaded again after a failed upload: its controls were those already
    # drawn, so nothing was requested, and "⚠ could not read bytes as an image" stayed under
    # the good upload's maps.
    explorer = pw.PullbackExplorer(_net(), "coffee", labels=LABELS)
    try:
        assert explorer.wait()
        _upload(explorer, _png(), "mine.png")
        assert explorer.wait() and explorer.image.value.startswith("upload: mine.png")
        _upload(explorer, b"not a picture", "bad.png")
        assert "⚠" in explorer.status.value
        _upload(explorer, _png(), "mine.png")
        assert explorer.wait()
        assert "⚠" not in explorer.status.value, explorer.status.value
        assert "drawn in" in explorer.status.value
    finally:
        explorer.close()


def test_the_name_of_grad_cams_layer_draws_no_markup_in_titles():
    # Class and module names were escaped for Plotly, but not the layer in Grad-CAM's
    # settings: a last convolution named "<b>conv</b><br>FAKE" was drawn bold over two lines
    # in the right panel's title and the strip's last panel.
    model = markup_named_cnn()
    explorer = pw.PullbackExplorer(model, "coffee", labels=["a", "b", "c"])
    try:
        explorer.compare.value = "gradcam"
        explorer.strip_compare.value = True
        explorer.strip_button.click()
        assert explorer.wait() and "⚠" not in explorer.status.value, explorer.status.value
        escaped = "Grad-CAM (layer &lt;b&gt;conv&lt;/b&gt;&lt;br&gt;FAKE)"
        assert explorer.gradient_figure.layout.title.text.startswith(escaped)
        assert explorer.strip_figure.layout.annotations[-1].text == escaped
    finally:
        explorer.close()


def test_the_signed_views_colour_bar_says_its_numbers_are_relative():
    # It read -1 … 1 with no title, as if those were the attribution's own units.
    from pullback_widgets.widgets.explorer import _view_figure

    attribution = torch.full((1, 3, 8, 8), 250.0)
    figure = _view_figure("signed heatmap", torch.rand(1, 3, 8, 8), attribution, "t")
    assert figure.data[0].colorbar.title.text == "rel."
