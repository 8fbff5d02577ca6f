"""PullbackExplorer: sliders for temperature, gate, target and layer over live Plotly heatmaps.

The explorer holds no math: the engine computes, :mod:`pullback_widgets.figures` draws, and
this module only wires controls to them. A change of temperature, gate, target, layer, channel
or view re-runs only the backward of a :class:`~pullback_widgets.PullbackSession`; a change of
image re-runs the forward.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import ipywidgets as w
import plotly.graph_objects as go
from torch import Tensor, nn

from .. import figures
from ..gates import GATES
from ..model_helpers import STRIP_TEMPERATURES, default_temperature, feature_layers
from ..session import PullbackSession
from ..targets import Unit
from .common import (
    STYLE,
    WIDE,
    LatestOnlyWorker,
    class_options,
    describe,
    image_choices,
    load_choice,
    option_index,
    prepare_model,
    status_html,
    sync_figure,
)

VIEWS = ("signed heatmap", "magnitude overlay", "RGB")
LOGITS = "logits"
MAX_UPLOAD_BYTES = 20_000_000
MAX_UPLOAD_PIXELS = 40_000_000


@dataclass(frozen=True)
class _Request:
    """A snapshot of the controls, taken in the kernel's thread and computed on the worker."""

    image_key: str
    target: int | None
    temperature: float
    gate: str
    layer: str
    channel: int
    view: str
    strip_token: int


class PullbackExplorer(w.VBox):
    """Live excitation pullbacks of one image.

    ``model``: a :func:`~pullback_widgets.load_model` name or any ``nn.Module`` taking pixel
    space [0, 1] (B, 3, H, W); ``labels``: class names, taken from the model when it has them.
    ``image``: a sample name (see ``SAMPLE_IMAGES``) or anything :func:`load_image` accepts.
    """

    def __init__(self, model: str | nn.Module = "efficientnet_lite0",
                 image: object = "coffee", *, labels: Sequence[str] | None = None,
                 temperature: float | None = None, gate: str = "sigmoid",
                 max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 max_upload_pixels: int = MAX_UPLOAD_PIXELS) -> None:
        self.model, self.labels, self.input_size = prepare_model(model, labels)
        self.max_upload_bytes, self.max_upload_pixels = max_upload_bytes, max_upload_pixels
        self._images, first_key = image_choices(image, self.input_size)
        self.layer_shapes = feature_layers(self.model, self._images[first_key])
        self._session: PullbackSession | None = None
        self._session_key: str | None = None
        self._gradient_shown: tuple | None = None  # (image, target, view) drawn on the right
        self._strip_token = self._strip_done = 0

        self.image = w.Dropdown(description="Image", options=list(self._images),
                                value=first_key, style=STYLE)
        self.upload = w.FileUpload(accept="image/*", multiple=False,
                                   description="Upload", tooltip="your own photo")
        self.target = w.Combobox(description="Target", options=class_options(self.labels),
                                 ensure_option=True, placeholder="search the classes",
                                 style=STYLE, layout=WIDE)
        self.top_buttons = [w.Button(layout=w.Layout(width="auto")) for _ in range(5)]
        self.temperature = w.FloatLogSlider(
            description="Temperature", base=10, min=-2, max=1, step=0.05,
            value=default_temperature(self.model) if temperature is None else temperature,
            readout_format=".3g", style=STYLE, layout=WIDE)
        self.gate = w.Dropdown(description="Gate", options=list(GATES), value=gate, style=STYLE)
        self.layer = w.Dropdown(description="Layer", options=self._layer_options(),
                                value=LOGITS, style=STYLE, layout=WIDE)
        self.channel = w.BoundedIntText(description="Channel", min=0, max=0, value=0,
                                        disabled=True, style=STYLE)
        self.view = w.ToggleButtons(description="View", options=list(VIEWS), style=STYLE)
        self.strip_button = w.Button(description="Temperature strip", icon="sliders",
                                     layout=w.Layout(width="auto"))
        self.status = w.HTML()
        self.pullback_figure = go.FigureWidget()
        self.gradient_figure = go.FigureWidget()
        self.strip_figure = go.FigureWidget()
        self.strip_box = w.Box([self.strip_figure], layout=w.Layout(display="none"))

        for button in self.top_buttons:
            button.class_index = None
            button.on_click(self._choose_top_class)
        self.upload.observe(self._on_upload, names="value")
        self.layer.observe(self._on_layer, names="value")
        for control in (self.image, self.target, self.temperature, self.gate, self.layer,
                        self.channel, self.view):
            control.observe(self._on_change, names="value")
        self.strip_button.on_click(self._on_strip)

        super().__init__([
            w.HBox([self.image, self.upload]),
            w.HBox([self.target, w.Label("Top 5:"), *self.top_buttons],
                   layout=w.Layout(flex_flow="row wrap")),
            w.HBox([self.temperature, self.gate]),
            w.HBox([self.layer, self.channel]),
            self.view,
            w.HBox([self.pullback_figure, self.gradient_figure]),
            w.HBox([self.strip_button]),
            self.strip_box,
            self.status,
        ])
        self._worker = LatestOnlyWorker(self._compute, self._show_error)
        self._on_change()

    # ------------------------------------------------------------------ controls -> request

    def _layer_options(self) -> list[tuple[str, str]]:
        options = [(f"{LOGITS} ({len(self.labels)} classes)", LOGITS)]
        options += [(f"{name} ({'×'.join(map(str, shape))})", name)
                    for name, shape in self.layer_shapes.items()]
        return options

    def _request(self) -> _Request:
        return _Request(self.image.value, option_index(self.target.value), self.temperature.value,
                        self.gate.value, self.layer.value, self.channel.value, self.view.value,
                        self._strip_token)


    def _on_change(self, change=None) -> None:
        self._worker.submit(self._request())

    def _on_layer(self, change) -> None:
        if change["new"] == LOGITS:
            self.channel.disabled = True
            return
        channels = self.layer_shapes[change["new"]][0]
        self.channel.max = channels - 1
        self.channel.value = min(self.channel.value, channels - 1)
        self.channel.disabled = False

    def _choose_top_class(self, button: w.Button) -> None:
        if button.class_index is None:  # the first forward has not finished yet
            return
        self.layer.value = LOGITS
        self.target.value = class_options(self.labels)[button.class_index]

    def _on_strip(self, button=None) -> None:
        self._strip_token += 1
        self._on_change()

    def _on_upload(self, change) -> None:
        if not change["new"]:
            return
        upload = change["new"][0]
        try:
            if upload["size"] > self.max_upload_bytes:
                raise ValueError(f"upload is {upload['size'] / 1e6:.1f} MB; the limit is "
                                 f"{self.max_upload_bytes / 1e6:.0f} MB")
            data = bytes(upload["content"])
            digest = hashlib.sha1(data).hexdigest()[:6]
            key, tensor = load_choice(data, self.input_size, max_pixels=self.max_upload_pixels,
                                      name=f"upload: {upload['name']} [{digest}]")
            self._images[key] = tensor
        except Exception as error:  # the status line says what went wrong
            self._show_error(error)
            return
        finally:
            self.upload.value = ()
        self.image.options = list(self._images)
        self.image.value = key

    # ------------------------------------------------------------------ worker side

    def _ensure_session(self, image_key: str) -> PullbackSession:
        if self._session_key != image_key:
            self._session = PullbackSession(self.model, self._images[image_key],
                                            layers=list(self.layer_shapes))
            self._session_key = image_key
            self._show_top_classes(self._session.probabilities[0])
        return self._session

    def _show_top_classes(self, probabilities: Tensor) -> None:
        top = probabilities.topk(len(self.top_buttons))
        for button, p, index in zip(self.top_buttons, top.values.tolist(),
                                    top.indices.tolist()):
            button.description = f"{self.labels[index]} {p:.0%}"
            button.class_index = index

    def _compute(self, request: _Request) -> None:
        started = time.perf_counter()
        session = self._ensure_session(request.image_key)
        target_class = request.target if request.target is not None else \
            int(session.logits[0].argmax())
        target = target_class if request.layer == LOGITS else Unit(request.layer,
                                                                  request.channel)
        pullback = session.pullback(target, temperature=request.temperature,
                                    gate=request.gate)[0]
        image = self._images[request.image_key][0]
        what = f"{self.labels[target_class]}" if request.layer == LOGITS else \
            f"{request.layer} channel {request.channel}"
        sync_figure(self.pullback_figure, _view_figure(
            request.view, image, pullback,
            f"Pullback of {what} (T = {request.temperature:.3g}, {request.gate})"))
        shown = (request.image_key, target, request.view)
        if shown != self._gradient_shown:  # the plain gradient does not depend on T or gate
            gradient = session.pullback(target, gate="hard")[0]
            sync_figure(self.gradient_figure, _view_figure(
                request.view, image, gradient, f"Plain gradient of {what}"))
            self._gradient_shown = shown
        if request.strip_token != self._strip_done:
            strip_gate = "sigmoid" if request.gate == "hard" else request.gate
            strip = [session.pullback(target, temperature=t, gate=strip_gate)[0]
                     for t in STRIP_TEMPERATURES]
            sync_figure(self.strip_figure, figures.temperature_strip(
                strip, STRIP_TEMPERATURES, title=f"{what}: from gradient-like to linear"))
            self._strip_done = request.strip_token
            self.strip_box.layout.display = None
        elapsed = (time.perf_counter() - started) * 1e3
        self.status.value = status_html(
            f"{what} · T = {request.temperature:.3g} · {request.gate} · {elapsed:.0f} ms")

    def _show_error(self, error: BaseException) -> None:
        self.status.value = status_html(describe(error), error=True)

    def wait(self, timeout: float | None = 60.0) -> bool:
        """Block until the figures show the current controls (for scripts and tests)."""
        return self._worker.wait(timeout)


def _view_figure(view: str, image: Tensor, attribution: Tensor, title: str) -> go.Figure:
    if view == "magnitude overlay":
        return figures.magnitude_overlay(image, attribution, title=title)
    if view == "RGB":
        return figures.rgb_difference(attribution, title=title)
    # Relative to the map's own scale: the gradient is often tens of times larger than a
    # pullback, so on raw values one of the two panels would look blank.
    return figures.signed_heatmap(figures.relative_map(attribution), zmax=1.0, title=title)
