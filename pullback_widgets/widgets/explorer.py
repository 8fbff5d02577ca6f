"""PullbackExplorer: sliders for temperature, gate, target and layer over live Plotly heatmaps.

The explorer holds no math: the engine computes, :mod:`pullback_widgets.figures` draws, and
this module only wires controls to them. A change of temperature, gate, target, layer, channel
or view re-runs only the backward of a :class:`~pullback_widgets.PullbackSession`; a change of
image re-runs the forward.

Threads. Controls are read in the kernel's thread, which turns each change into a request; the
worker thread computes the latest request and draws it. The worker writes the figures, the
photo, the Top-5 buttons and the Target box's automatic value; the status line has one writer,
:class:`~pullback_widgets.widgets.common.StatusLine`, which both threads go through.
"""

from __future__ import annotations

import hashlib
import html
import io
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import ipywidgets as w
import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image
from torch import Tensor, nn

from .. import figures
from ..evaluation.methods import CAPTUM_METHODS, build_method, captum_available, method_settings
from ..gates import GATES
from ..images import SAMPLE_IMAGES
from ..model_helpers import (
    STRIP_TEMPERATURES,
    as_model_input,
    describe_temperatures,
    scaled_temperatures,
)
from ..model_state import ModelState
from ..paper import PAPER_PRESETS
from ..session import PullbackSession, notices_unwarned
from ..targets import Target, Unit
from ..validation import (
    PullbackWidgetsError,
    PullbackWidgetsTypeError,
    check_choice,
    check_finite,
    check_index,
)
from .cell_reruns import close_earlier_runs
from .common import (
    LOGITS,
    STYLE,
    LatestOnlyWorker,
    LayerControl,
    StatusLine,
    TemperatureControl,
    class_options,
    close_children,
    load_choice,
    model_source,
    parse_target,
    prepare_model,
    resend_on_new_views,
    wide,
)
from .figure_widget import figure_widget, sync_figure

VIEWS = ("signed heatmap", "magnitude overlay", "RGB")
# The right-hand panel's methods: label -> the evaluation's method name, so that what the
# explorer shows is what `pullback-widgets evaluate` benchmarks.
COMPARE_METHODS = {"plain gradient": "gradient", "gradient × input": "gradient_x_input",
                   "guided backprop": "guided_backprop",
                   "integrated gradients": "integrated_gradients", "SmoothGrad": "smoothgrad",
                   "Grad-CAM": "gradcam"}
NEEDS_CAPTUM = "needs the compare extra: pip install 'pullback-widgets[compare]'"
COMPARE_CACHE_SIZE = 32  # maps kept, per (image, target, method)
MAX_UPLOAD_BYTES = 20_000_000
MAX_UPLOAD_PIXELS = 40_000_000
PHOTO_SIDE_PX = 112  # small enough that the two maps still fit side by side


@dataclass(frozen=True)
class _Request:
    """A snapshot of the controls, taken in the kernel's thread and computed on the worker.

    ``target_text`` is the Target box as typed ("" for the predicted class); ``event`` numbers
    the status-line message and is not part of what is drawn.
    """

    event: int = field(compare=False)
    image_key: str
    target_text: str
    temperature: float
    gate: str
    layer: str
    channel: int
    view: str
    strip_token: int
    evidence: bool = False
    compare: str = "gradient"  # an evaluation method name, see COMPARE_METHODS
    strip_compare: bool = False


class PullbackExplorer(w.VBox):
    """Live excitation pullbacks of one image.

    ``model``: a :func:`~pullback_widgets.load_model` name or any ``nn.Module`` taking pixel
    space [0, 1] (B, 3, H, W); ``labels``: class names, taken from the model when it has them.
    ``image``: a sample name (see ``SAMPLE_IMAGES``) or anything :func:`load_image` accepts.
    ``evidence``: the pixels that hold the evidence in ``image``, bool (H, W), e.g. a mask of
    :func:`pullback_widgets.synthetic.make_dataset`; then ``image`` must be a tensor (3, H, W)
    or (1, 3, H, W) at the model's input size, used as it is (no resize, so the mask fits),
    and a "Show the evidence mask" toggle draws the mask's outline on the heatmaps.
    ``temperature``: the ReLU family's T (default: the model's); the slider scales every other
    kind of gate by the same factor. ``gate``: a raw gate of ``GATES`` or a paper version
    ("paper v1", "paper latest": :data:`pullback_widgets.PAPER_V1` / ``PAPER_LATEST``, exact
    at the slider's first value).

    The explorer shows once the model is loaded, and loads the photo and the model's layers on
    its worker thread, saying so in its status line. :meth:`close` stops the worker, closes
    every widget it made and drops the session, so that a closed explorer can be
    garbage-collected.
    """

    def __init__(self, model: str | nn.Module = "efficientnet_lite0",
                 image: object = "coffee", *, labels: Sequence[str] | None = None,
                 temperature: float | None = None, gate: str = "sigmoid",
                 evidence: Tensor | None = None,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 max_upload_pixels: int = MAX_UPLOAD_PIXELS) -> None:
        source = model_source(model, temperature)
        gates = (*GATES, *PAPER_PRESETS)  # the raw gates, then the paper versions' settings
        gate = check_choice(gate, gates, "gate")  # before any widget is made
        # The model loads here, in the kernel's thread: loaded on another thread, every later
        # backward on the worker ran 4 to 8 times slower (measured; cause not found).
        self._prepared = prepare_model(model, labels)
        self.model: nn.Module | None = None  # loaded on the worker
        self.labels: list[str] = []
        self.input_size = source.input_size
        # Checked now: a bad limit would otherwise turn every upload into a TypeError.
        self.max_upload_bytes = check_index(max_upload_bytes, "max_upload_bytes", minimum=1)
        self.max_upload_pixels = check_index(max_upload_pixels, "max_upload_pixels", minimum=1)
        self._evidence: dict[str, Tensor] = {}  # image key -> its evidence mask (H, W)
        if evidence is None:
            first_key, first_image = load_choice(image, self.input_size, lazy=True)
        else:
            first_key = "image with evidence"
            first_image, self._evidence[first_key] = _image_with_evidence(
                image, evidence, self.input_size)
        self._images: dict[str, Tensor | None] = {first_key: first_image}
        self._images.update({name: None for name in SAMPLE_IMAGES if name != first_key})
        self._session: PullbackSession | None = None
        self._session_key: str | None = None
        self._gradient_shown: tuple | None = None  # (image, target, view) drawn on the right
        self._strip_token = self._strip_done = 0
        self._strip_shown: tuple | None = None  # (image, target, gate, ...) the strip is of
        self._submitted: _Request | None = None
        # A new forward's photo and class probabilities, until its maps are drawn.
        self._photo_pending: tuple[Tensor, Tensor] | None = None
        self._submit_lock = threading.Lock()
        self._auto_target = ""  # the Target box's value when the explorer filled it in
        self._notes: list[str] = []  # said once, with the first picture
        self._notices: tuple[str, ...] = ()  # the engine's, for the image shown

        self.image = w.Dropdown(description="Image", options=list(self._images),
                                value=first_key, style=STYLE)
        self.upload = w.FileUpload(accept="image/*", multiple=False,
                                   description="Upload", tooltip="your own photo")
        self.target = w.Combobox(description="Target", ensure_option=True,
                                 placeholder="search the classes", style=STYLE, layout=wide())
        self.top_buttons = [w.Button(layout=w.Layout(width="auto")) for _ in range(5)]
        self.temperature_control = TemperatureControl(source.temperature)
        self.temperature = self.temperature_control.slider
        self.gate = w.Dropdown(description="Gate", options=list(gates), value=gate, style=STYLE)
        self.layer_control = LayerControl()
        self.layer, self.channel, self.all_layers = \
            self.layer_control.layer, self.layer_control.channel, self.layer_control.all_layers
        # Changes of several controls at once (new options, then the value meant) request
        # only their end state.
        self._settling = self.layer_control.settling
        self.view = w.ToggleButtons(description="View", options=list(VIEWS), style=STYLE)
        self.strip_button = w.Button(description="Temperature strip", icon="sliders",
                                     layout=w.Layout(width="auto"))
        self.show_evidence = w.Checkbox(
            description="Show the evidence mask", value=False, indent=False,
            layout=w.Layout(width="auto", display=None if self._evidence else "none"))
        captum = captum_available()
        self.compare = w.Dropdown(
            description="Compare", style=STYLE, value="gradient",
            options=[(label if captum or name not in CAPTUM_METHODS
                      else f"{label} (needs the compare extra)", name)
                     for label, name in COMPARE_METHODS.items()])
        self.strip_compare = w.Checkbox(description="comparison at the end of the strip",
                                        value=False, indent=False,
                                        layout=w.Layout(width="auto"))
        self._compare_cache: dict[tuple, tuple[Tensor, float]] = {}
        self._pullback_shown: tuple | None = None
        self._pullback_time = ""
        self._status = StatusLine()
        self.status = self._status.widget
        self.photo = w.Image(format="png", layout=w.Layout(width=f"{PHOTO_SIDE_PX}px",
                                                           height=f"{PHOTO_SIDE_PX}px"))
        self.pullback_figure = figure_widget()
        self.gradient_figure = figure_widget()
        self.strip_figure = figure_widget()
        self.strip_box = w.Box([self.strip_figure], layout=w.Layout(display="none"))

        for button in self.top_buttons:
            button.class_index = None
            button.on_click(self._choose_top_class)
        self.upload.observe(self._on_upload, names="value")
        for control in (self.image, self.target, self.temperature, self.gate, self.layer,
                        self.channel, self.view, self.show_evidence, self.compare):
            control.observe(self._on_change, names="value")
        # After the layer control's own observer has put in the new list of layers.
        self.all_layers.observe(lambda change: self._on_change(), names="value")
        self.strip_button.on_click(self._on_strip)

        super().__init__([
            w.HBox([self.image, self.upload]),
            w.HBox([self.target, w.Label("Top 5:"), *self.top_buttons],
                   layout=w.Layout(flex_flow="row wrap")),
            w.HBox([self.temperature_control.box, self.gate]),
            self.layer_control.box,
            w.HBox([self.view, w.Label("Photo:"), self.photo],
                   layout=w.Layout(align_items="flex-end", flex_flow="row wrap")),
            w.HBox([self.pullback_figure, self.gradient_figure]),
            w.HBox([self.compare, self.strip_button, self.strip_compare, self.show_evidence]),
            self.strip_box,
            self.status,
        ])
        self._worker = LatestOnlyWorker(self._compute, self._show_error,
                                        on_interrupt=self._show_error)
        self._closed = False
        try:
            self._status.show(f"loading the photo “{first_key}” and the layers of "
                              f"{source.name} …", self._status.event())
            self._submit(self._request(), announce=False)
            resend_on_new_views(self)
            # Closing an earlier run's explorer waits for its worker: a Ctrl-C there must not
            # leave this one, which the caller never gets, running with its thread.
            close_earlier_runs(self)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ controls -> request

    def _request(self) -> _Request:
        typed = self.target.value.strip()
        return _Request(self._status.event(), self.image.value,
                        "" if typed == self._auto_target else typed,
                        float(f"{self.temperature.value:.12g}"), self.gate.value,
                        self.layer.value, self.channel.value, self.view.value,
                        self._strip_token, self.show_evidence.value, self.compare.value,
                        self.strip_compare.value)

    def _submit(self, request: _Request, announce: bool = True) -> None:
        if request == self._submitted:  # e.g. the Target box now names the class drawn
            return
        self._submitted = request
        if announce:
            self._status.show(f"computing {self._describe(request)} …", request.event)
        self._worker.submit(request)

    def _describe(self, request: _Request) -> str:
        if request.layer != LOGITS:
            what = f"{request.layer} channel {request.channel}"
        else:
            what = request.target_text or "the predicted class"
        if request.image_key != self._session_key:
            what += f" on “{request.image_key}”"
        if request.strip_token != self._strip_done:
            what += " and the temperature strip"
        return f"{what} · T = {request.temperature:.3g} · {request.gate}"

    def _on_change(self, change=None, force: bool = False) -> None:
        # The worker changes the Target box too (to name the class it drew), which calls this
        # on its thread: the snapshot and its submission are one step, or an older snapshot
        # could replace a newer one in the worker's slot, and its status event with it.
        if self._settling.active:  # a step on the way: its end state is requested
            return
        with self._submit_lock:
            if change is not None and change["owner"] is self.target \
                    and change["new"].strip() != self._auto_target:
                # The user's value from now on, even where it names the class the explorer
                # once filled in: the predicted class of another image may be another.
                self._auto_target = ""
            if not self._closed:
                if force:
                    self._submitted = None
                self._submit(self._request())

    def _choose_top_class(self, button: w.Button) -> None:
        if button.class_index is None:  # the first forward has not finished yet
            return
        option = class_options(self.labels)[button.class_index]
        # Two controls, one request: the logits of the old target are no map the user chose.
        with self._settling():
            self.layer.value = LOGITS
            self.target.value = option
        self._on_change({"owner": self.target, "new": option})

    def _on_strip(self, button=None) -> None:
        self._strip_token += 1
        self._on_change()

    def _on_upload(self, change) -> None:
        if not change["new"] or self._closed:  # closed: nobody would see the image
            return
        event = self._status.event()
        upload = change["new"][0]
        try:
            # The bytes received, not the size the page declares for them.
            size = len(upload["content"])
            if size > self.max_upload_bytes:
                raise PullbackWidgetsError(f"upload is {size / 1e6:.1f} MB; the limit is "
                                           f"{self.max_upload_bytes / 1e6:.0f} MB")
            data = bytes(upload["content"])
            digest = hashlib.sha1(data).hexdigest()[:6]
            key, tensor = load_choice(data, self.input_size, max_pixels=self.max_upload_pixels,
                                      name=f"upload: {upload['name']} [{digest}]")
            self._images[key] = tensor
        except Exception as error:  # the status line says what went wrong
            self._status.show_error(error, event)
            return
        finally:
            self.upload.value = ()
        with self._settling():  # new options select the first image: no forward of that one
            self.image.options = list(self._images)
            self.image.value = key
        # Requested even where the controls are those drawn (the photo on show uploaded
        # again): its status line replaces the error of an upload that failed before it.
        self._on_change(force=True)

    # ------------------------------------------------------------------ worker side

    def _load(self) -> None:
        """Load the model and learn its classes and layers (once, on the worker)."""
        if self.model is not None:
            return
        prepared = self._prepared
        self.layer_control.set_layers(prepared.model, as_model_input(
            prepared.model, self._image(self.image.value)), len(prepared.labels))
        self.model, self.labels = prepared.model, prepared.labels
        self._notes = prepared.notes
        self.target.options = class_options(self.labels)

    @property
    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """The layers offered now, with their shapes (C, H, W)."""
        return self.layer_control.shapes

    def _image(self, key: str) -> Tensor:
        if self._images.get(key) is None:  # a sample, loaded when first shown
            self._images[key] = load_choice(key, self.input_size)[1]
        return self._images[key]

    def _ensure_session(self, request: _Request) -> PullbackSession | None:
        """The session of the request's image; None where the request no longer describes
        the controls (a model changed since lost the request's layer: the controls' end state
        is requested instead)."""
        image_key = request.image_key
        # A new forward also where the user changed the model since (trained it, loaded
        # weights, converted it): the explorer follows the model.
        changed = self._session is not None and not self._session.model_unchanged()
        if self._session_key != image_key or changed:
            image = as_model_input(self.model, self._image(image_key))
            if changed:  # what is drawn, and every cached map, is of the model as it was
                self._pullback_shown = self._gradient_shown = self._strip_shown = None
                self._compare_cache.clear()
                # Its layers too (a block removed, a Sequential shortened): a layer gone would
                # fail every forward, the logits' too, and a renamed one keep its old shape.
                self.layer_control.set_layers(self.model, image, len(self.labels))
                self._on_change()  # the Layer box may have gone back to the logits
                if self._submitted != request:
                    return None
            session = self._forward(image)
            # -inf logits (masked classes) are fine; NaN or +inf makes the probabilities NaN.
            if bool(session.probabilities.isnan().any()):
                raise PullbackWidgetsError("the model's output for this image holds NaN or "
                                           "+inf: there is nothing to explain")
            classes = session.logits.shape[-1]
            if classes != len(self.labels):  # a new head: the names would be another's
                raise PullbackWidgetsError(
                    f"the model now has {classes} classes, not the {len(self.labels)} this "
                    "explorer names: make a new explorer for it")
            self._session, self._session_key = session, image_key
            self._show_notices(self._session.notices, self._session.gated_calls == 0)
            # Shown with the maps, once they are drawn: a pullback that fails leaves the photo
            # and classes of the maps still on show, not the new image's beside the old maps.
            self._photo_pending = (image[0], self._session.probabilities[0])
        return self._session

    def _forward(self, image: Tensor) -> PullbackSession:
        """A session of ``image``. The session records the model as its forward left it: a
        change made meanwhile (a training cell run while the worker computes) would be in that
        record but not in the graph, and every later map of the image would fail or, for a
        change through ``.data``, pull back through the new weights along the old gates. So
        the forward is made once more then; a model that changes itself as it runs keeps its
        second session."""
        for _ in range(2):
            before = ModelState.of(self.model)
            session = PullbackSession(self.model, image,
                                      layers=list(self.layer_control.short_list))
            if before.matches(self.model):
                break
        return session

    def _show_notices(self, notices: tuple[str, ...], plain: bool) -> None:
        """Keep the engine's notices for the status line; where nothing is gated, the
        temperature and gate change nothing: say so on the controls and disable them."""
        self._notices = notices
        for control in (self.temperature, self.gate, self.temperature_control.down,
                        self.temperature_control.up, self.strip_button):
            control.disabled = plain
        hint = "no gated op in this model: the pullback is the plain gradient" if plain else ""
        self.temperature.tooltip = self.gate.tooltip = hint or None
        self.strip_button.tooltip = hint or "the same target from T = 0.01 to T = 10"

    def _show_photo(self, image: Tensor) -> None:
        pixels = (image.detach().permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu()
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels.numpy())).save(buffer, format="PNG")
        self.photo.value = buffer.getvalue()

    def _show_top_classes(self, probabilities: Tensor) -> None:
        top = probabilities.topk(min(len(self.top_buttons), len(probabilities)))
        for button, p, index in zip(self.top_buttons, top.values.tolist(),
                                    top.indices.tolist()):
            button.description = f"{self.labels[index]} {p:.0%}"
            button.class_index = index
        for button in self.top_buttons[len(top.indices):]:  # a model with under 5 classes
            button.layout.display = "none"

    def _show_target(self, request: _Request, target_class: int) -> None:
        """Let the Target box name the class drawn when the explorer chose it (the predicted
        class), unless the box was changed since the request was taken."""
        if request.target_text or request.layer != LOGITS:
            return
        option = class_options(self.labels)[target_class]
        if self.target.value.strip() in ("", self._auto_target) and \
                self.target.value != option:
            self._auto_target = option.strip()
            self.target.value = option  # its request equals this one: nothing is recomputed

    def _compute(self, request: _Request) -> None:
        with notices_unwarned():  # the status line says them
            self._draw(request)

    def _draw(self, request: _Request) -> None:
        started = time.perf_counter()
        self._load()
        session = self._ensure_session(request)
        if session is None:  # the request of the controls' end state follows
            return
        target_class = parse_target(request.target_text, self.labels)
        if target_class is None:
            target_class = int(session.logits[0].argmax())
        self._show_target(request, target_class)
        target = target_class if request.layer == LOGITS else Unit(request.layer,
                                                                  request.channel)
        image = self._images[request.image_key][0]
        mask = self._evidence.get(request.image_key) if request.evidence else None
        # A class or module name as written: escaped for the figures' titles (Plotly reads
        # some HTML), not for the status line, which escapes its whole message itself.
        name = self.labels[target_class] if request.layer == LOGITS else \
            f"{request.layer} channel {request.channel}"
        what = figures.plain_text(name)
        plain = session.gated_calls == 0
        shown = (request.image_key, target, request.temperature, request.gate, request.view,
                 mask is not None)
        # One slider moves every kind of gate by the same factor on the model's defaults (or
        # on a paper preset's temperatures).
        preset = PAPER_PRESETS.get(request.gate)
        gate = preset.gate if preset else request.gate
        pool_weights = preset.pool_weights if preset else "differentiated"
        temperatures = scaled_temperatures(self.model, request.temperature,
                                           preset.temperature if preset else None)
        described = describe_temperatures(temperatures, session.gated_kinds)
        pullback = None
        if shown != self._pullback_shown:
            began = time.perf_counter()
            pullback = check_finite(session.pullback(target, temperature=temperatures,
                                                     gate=gate, pool_weights=pool_weights)[0],
                                    "the pullback")
            pullback_time = f"pullback {_ms(began)}"
        # Both maps before either is drawn: a comparison that fails leaves both panels as
        # they were, of one target, not the pullback of the new one beside the old.
        compared = self._comparison(request, session, target, target_class)
        label, attribution, seconds, cached, note = compared
        check_finite(attribution, f"the {label}")
        if pullback is not None:
            title = f"Plain gradient of {what} (nothing to gate)" if plain else \
                f"Pullback of {what} ({described}, {request.gate})"
            sync_figure(self.pullback_figure,
                        _view_figure(request.view, image, pullback, title, mask))
            self._pullback_shown, self._pullback_time = shown, pullback_time
        shown = (request.image_key, target, request.view, label, mask is not None)
        if shown != self._gradient_shown:
            title = f"{label} of {what}"
            if label.startswith("Grad-CAM"):  # a coarse map: over the photo, in any view
                figure = figures.magnitude_overlay(image, attribution, title=title)
                figure = figure if mask is None else figures.mask_outline(figure, mask)
            else:
                figure = _view_figure(request.view, image, attribution, title, mask)
            sync_figure(self.gradient_figure, figure)
            self._gradient_shown = shown
        if self._photo_pending is not None:  # the maps of its forward are on show
            photo, probabilities = self._photo_pending
            self._show_photo(photo)
            self._show_top_classes(probabilities)
            self._photo_pending = None
        # Each panel's time: what its map took to compute, when it was computed.
        times = [self._pullback_time, f"{label.split(' (')[0]} {seconds * 1e3:.0f} ms"
                 + (" (cached)" if cached else "")]
        strip_gate = "sigmoid" if gate == "hard" else gate
        strip_shown = (request.image_key, target, strip_gate, pool_weights,
                       request.gate if preset else None,  # a preset's own temperatures
                       label if request.strip_compare else None)
        if request.strip_token != self._strip_done:
            # Asked for once: a strip that fails (or is interrupted) is not computed again, and
            # failed again, with every later change of the controls. Until the new one is
            # drawn, an older strip shows only where it is of these settings.
            self._strip_done = request.strip_token
            self.strip_box.layout.display = None if strip_shown == self._strip_shown else "none"
            # Each panel as the slider at its T gives it: every kind of gate scaled alike.
            strip = [check_finite(session.pullback(
                target, temperature=scaled_temperatures(
                    self.model, t, preset.temperature if preset else None),
                gate=strip_gate, pool_weights=pool_weights)[0], f"the pullback at T = {t}")
                     for t in STRIP_TEMPERATURES]
            extra = (label, attribution) if request.strip_compare else None
            sync_figure(self.strip_figure, figures.temperature_strip(
                strip, STRIP_TEMPERATURES, extra_panel=extra,
                title=f"{what}: from gradient-like to linear"))
            self._strip_shown = strip_shown
            self.strip_box.layout.display = None
        else:  # shown while it is of this image, target and gate (and of the model as it is)
            self.strip_box.layout.display = None if strip_shown == self._strip_shown else "none"
        settings = "plain gradient" if plain else f"{described} · {request.gate}"
        notes, self._notes = self._notes, []
        self._status.show(" · ".join([figures.isolated(name), settings, *times,
                                      f"drawn in {_ms(started)}", *([note] if note else []),
                                      *notes, *self._notices]),
                          request.event)

    def _comparison(self, request: _Request, session: PullbackSession, target: Target,
                    target_class: int) -> tuple[str, Tensor, float, bool, str]:
        """(panel label, map (3, H, W), seconds, whether cached, note) of the Compare method,
        through the evaluation's adapters, cached per (image, target, method)."""
        method, note = request.compare, ""
        if method in CAPTUM_METHODS and not captum_available():
            method, note = "gradient", f"{_label(request.compare)} {NEEDS_CAPTUM}"
        if isinstance(target, Unit):  # the evaluation's methods explain classes
            if method != "gradient":
                note = f"{_label(method)} explains classes; the unit's plain gradient is shown"
            method = "gradient"
        key = (request.image_key, target, method)
        cached = key in self._compare_cache
        if not cached:
            began = time.perf_counter()
            if method == "gradient":
                # The session's hard gates give autograd's gradient bit for bit (the engine's
                # promise, tested), so this is the evaluation's "gradient" without another
                # forward, and it is drawn together with the pullback.
                attribution = session.pullback(target, gate="hard")[0]
            else:
                image = as_model_input(self.model, self._images[request.image_key])
                explain = build_method(method, self.model)
                attribution = explain(self.model, image, torch.tensor(
                    [target_class], device=image.device))[0].detach()
            if len(self._compare_cache) >= COMPARE_CACHE_SIZE:
                self._compare_cache.pop(next(iter(self._compare_cache)))
            self._compare_cache[key] = (attribution, time.perf_counter() - began)
        attribution, seconds = self._compare_cache[key]
        settings = method_settings(method, self.model)
        # Escaped for the titles (Plotly reads some HTML): Grad-CAM's settings name a module.
        label = _label(method) + (f" ({html.escape(settings, quote=False)})" if settings else "")
        return label, attribution, seconds, cached, note

    def _show_error(self, error: BaseException, request: _Request) -> None:
        self._status.show_error(error, request.event)

    # ------------------------------------------------------------------ lifecycle

    def wait(self, timeout: float | None = 60.0) -> bool:
        """Block until the figures show the current controls (for scripts and tests)."""
        return self._worker.wait(timeout)

    def close(self) -> None:
        """Stop the worker, close every widget the explorer made and drop the session.

        Idempotent. Afterwards nothing holds the explorer: ``del`` lets it be collected.
        """
        if getattr(self, "_closed", True):  # closed, or its constructor failed (Widget.__del__)
            return
        self._closed = True
        try:  # a Ctrl-C while the worker finishes its job must not leave the widgets open
            self._worker.close()
        finally:
            close_children(self)
            # What still holds the explorer (Out[n], a list) keeps no model.
            self.model = self._prepared = self._photo_pending = None
            self._evidence.clear()
            self._session = self._session_key = None
            self._images.clear()
            self._compare_cache.clear()
            super().close()


def _label(method: str) -> str:
    label = next(label for label, name in COMPARE_METHODS.items() if name == method)
    return label[0].upper() + label[1:]


def _ms(since: float) -> str:
    return f"{(time.perf_counter() - since) * 1e3:.0f} ms"


def _view_figure(view: str, image: Tensor, attribution: Tensor, title: str,
                 mask: Tensor | None = None) -> go.Figure:
    if view == "magnitude overlay":
        figure = figures.magnitude_overlay(image, attribution, title=title)
    elif view == "RGB":
        figure = figures.rgb_difference(attribution, title=title)
    else:
        # Relative to the map's own scale: the gradient is often tens of times larger than a
        # pullback, so on raw values one of the two panels would look blank.
        figure = figures.signed_heatmap(figures.relative_map(attribution), zmax=1.0,
                                        title=title)
        # Its numbers are the map's over its own 99.5th percentile of |value|, not raw units.
        figure.update_traces(colorbar_title_text="rel.")
    return figure if mask is None else figures.mask_outline(figure, mask)


def _image_with_evidence(image: object, evidence: object, size: int) -> tuple[Tensor, Tensor]:
    """(image (1, 3, size, size), mask (size, size) bool), checked, for the ``evidence``
    option: the image is taken as it is, so that the mask's pixels stay on the object's."""
    if not isinstance(image, Tensor) or not isinstance(evidence, Tensor):
        raise PullbackWidgetsTypeError("with evidence=, image and evidence must be tensors")
    batch = image.unsqueeze(0) if image.dim() == 3 else image
    if batch.shape != (1, 3, size, size) or not batch.is_floating_point():
        raise PullbackWidgetsError(f"with evidence=, image must be float (3, {size}, {size}) "
                                   f"(the model's input size), got {tuple(image.shape)}")
    if not torch.isfinite(batch).all() or batch.min() < 0 or batch.max() > 1:
        raise PullbackWidgetsError("image must be in pixel space [0, 1]")
    if evidence.shape != (size, size) or evidence.dtype != torch.bool:
        raise PullbackWidgetsError(f"evidence must be a bool mask ({size}, {size}), got "
                                   f"{evidence.dtype} {tuple(evidence.shape)}")
    # Copies: the caller's tensors may change after this, and the session's forward would
    # not see it while the photo, the outline and the Compare methods did.
    return batch.detach().float().clone(), evidence.detach().cpu().clone()
