"""What both explorers share: a latest-only worker, one writer for the status line, labelled
controls, and closing every widget an explorer made."""

from __future__ import annotations

import contextlib
import html
import math
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go
import torch
from torch import Tensor, nn

from ..images import SAMPLE_IMAGES, load_image, sample_image
from ..labels import class_names, find_class
from ..model_helpers import as_model_input, default_temperature, feature_layers, predict
from ..models import MODELS, load_model
from ..validation import (
    PullbackWidgetsError,
    PullbackWidgetsTypeError,
    check_choice,
    check_index,
    check_positive,
)

# Wide enough for "Temperature" and "Step size": ipywidgets' default cuts them to "Temperat…".
DESCRIPTION_WIDTH = "90px"
STYLE = {"description_width": DESCRIPTION_WIDTH}
# A worker still inside a job when its explorer closes gets this long to finish it.
CLOSE_TIMEOUT_S = 60.0


def wide() -> w.Layout:
    """A fresh 420 px layout: a shared one would be closed by the first explorer to close."""
    return w.Layout(width="420px")


class LatestOnlyWorker:
    """Runs ``job(request)`` on a background thread, always for the latest request only.

    A slider drag submits many requests while one is being computed; those in between are
    dropped, so there is never a queue. The kernel stays responsive meanwhile, because torch
    releases the GIL. An ``Exception`` from a job goes to ``on_error`` and the worker carries
    on; KeyboardInterrupt and SystemExit are not caught: they go to ``on_interrupt`` and end
    the thread, and the next request starts another. :meth:`close` ends the thread.
    """

    def __init__(self, job: Callable[[Any], None], on_error: Callable[[Exception, Any], None],
                 on_interrupt: Callable[[BaseException, Any], None] | None = None):
        self._job, self._on_error, self._on_interrupt = job, on_error, on_interrupt
        self._lock = threading.Condition()
        self._pending: Any = None
        self._has_pending = False
        self._busy = False
        self._closed = False
        self._ended = False  # the thread ended with a KeyboardInterrupt or SystemExit
        self.completed = 0  # jobs run to the end, for tests and the status line
        self._thread = self._start()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, daemon=True, name="pullback-widgets-worker")
        thread.start()
        return thread

    def submit(self, request: Any) -> bool:
        """Queue ``request`` in place of any pending one; False once the worker is closed."""
        with self._lock:
            if self._closed:
                return False
            if self._ended:  # else the request would wait for a thread that is gone
                self._ended, self._thread = False, self._start()
            self._pending, self._has_pending = request, True
            self._lock.notify_all()
            return True

    def wait(self, timeout: float | None = 60.0) -> bool:
        """Block until nothing is pending or running; True if that happened in time."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._has_pending and not self._busy,
                                       timeout)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._busy or self._has_pending

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float | None = CLOSE_TIMEOUT_S) -> None:
        """Drop any pending request and end the thread once its current job is done.

        Idempotent. Called from inside a job it cannot wait for itself, so it only asks.
        """
        with self._lock:
            self._closed, self._pending, self._has_pending = True, None, False
            if self._ended:  # no thread is left to let go of the owner
                self._job = self._on_error = self._on_interrupt = None
            self._lock.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._has_pending or self._closed)
                if self._closed:
                    # the owner may now be collected
                    self._job = self._on_error = self._on_interrupt = None
                    self._lock.notify_all()
                    return
                request, self._pending, self._has_pending = self._pending, None, False
                self._busy = True
            try:
                self._job(request)
                self.completed += 1
            except Exception as error:  # a widget must survive any failure of a job
                try:
                    self._on_error(error, request)
                except Exception:
                    traceback.print_exc()
            except BaseException as error:  # not swallowed: it ends this thread
                with self._lock:
                    self._ended = True
                if self._on_interrupt is not None:  # the status line says it stopped
                    try:
                        self._on_interrupt(error, request)
                    except Exception:
                        traceback.print_exc()
                raise
            finally:
                with self._lock:
                    self._busy = False
                    if self._ended and self._has_pending and not self._closed:
                        # submitted while the interrupt unwound the job, before this thread
                        # was marked as ended: it would wait for a thread that is gone
                        self._ended, self._thread = False, self._start()
                    self._lock.notify_all()


class StatusLine:
    """The one writer of an explorer's status line, from any thread.

    Every message belongs to an event (a control change, an upload, a Run), numbered in the
    order the kernel saw them. A message of an older event never replaces one of a newer
    event, so a computation that finishes late cannot hide an upload's error.
    """

    def __init__(self) -> None:
        self.widget = w.HTML()
        self._lock = threading.Lock()
        self._last_event = self._shown_event = 0

    def event(self) -> int:
        """A number for a new event, larger than every earlier one."""
        with self._lock:
            self._last_event += 1
            return self._last_event

    def show(self, message: str, event: int, *, error: bool = False) -> bool:
        """Show ``message`` unless a newer event's message is up; True if it was shown."""
        with self._lock:
            if event < self._shown_event:
                return False
            self._shown_event = event
            self.widget.value = status_html(message, error=error)
            return True

    def show_error(self, error: BaseException, event: int) -> bool:
        return self.show(describe(error), event, error=True)


def parse_target(text: str, labels: Sequence[str]) -> int | None:
    """The class a Target box names: "" is the predicted class (None); anything else goes
    through :func:`find_class` ("name (index)" as the box offers it, a bare index or a class
    name), which refuses unknown names with suggestions rather than silently explaining
    another class."""
    text = text.strip()
    return find_class(text, labels) if text else None


def widget_tree(root: w.Widget) -> Iterator[w.Widget]:
    """``root`` and every widget reachable from its synced traits (children, layout, style)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        widget = stack.pop()
        if id(widget) in seen:
            continue
        seen.add(id(widget))
        yield widget
        for name in widget.keys:
            value = getattr(widget, name, None)
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, w.Widget):
                    stack.append(item)


def close_children(root: w.Widget) -> None:
    """Close every widget in ``root``'s tree but ``root`` itself (whose own ``close`` is the
    caller), so that ipywidgets' registry keeps none of them alive."""
    for widget in list(widget_tree(root))[1:]:
        widget.close()


def resend_on_new_views(root: w.Box) -> None:
    """Each time a page starts showing ``root``, send it the state of every widget inside once
    more (Plotly's figures apart: their pages ask for them, see
    :class:`~pullback_widgets.widgets.figure_widget.SyncedFigureWidget`).

    A Voilà page asks the kernel for every widget's state, then connects to each widget: an
    update the worker sends in between is lost, and a status line stayed at "loading …" (2
    page loads in 8 on a busy machine). Sent again, a widget's state reaches its model and its
    views."""
    root._view_count = 0  # None: the page would not count its views

    def resend(change) -> None:
        if (change.new or 0) <= (change.old or 0) or root.comm is None:  # a view went, or closed
            return
        for widget in list(widget_tree(root))[1:]:
            if widget.comm is not None and not isinstance(widget, go.FigureWidget):
                widget.send_state()

    root.observe(resend, names="_view_count")


class TemperatureControl:
    """The Temperature slider (log scale) with − and + buttons that move it one step.

    A log slider snaps to ``min + k * step``; its grid is laid through ``value`` so that the
    model's default shows exactly (0.7, not 0.708) and is not computed a second time at the
    snapped value. The readout format ".3" (no type) trims trailing zeros in d3: "0.7", not
    "0.700". The buttons are there because in Notebook 7 the arrow keys do not reach a focused
    slider (the notebook's shortcuts take them).
    """

    STEP = 0.05  # in decades

    def __init__(self, value: float, low: float = 0.01, high: float = 10.0) -> None:
        centre = math.log10(value)
        below = math.ceil((centre - math.log10(min(low, value))) / self.STEP - 1e-9)
        above = math.ceil((math.log10(max(high, value)) - centre) / self.STEP - 1e-9)
        self.slider = w.FloatLogSlider(
            description="Temperature", base=10, min=centre - below * self.STEP,
            max=centre + above * self.STEP, step=self.STEP, value=value, readout_format=".3",
            style=STYLE, layout=wide())
        self.down = w.Button(description="−", tooltip="one step colder",
                             layout=w.Layout(width="32px"))
        self.up = w.Button(description="+", tooltip="one step warmer",
                           layout=w.Layout(width="32px"))
        self.down.on_click(lambda _: self.nudge(-1))
        self.up.on_click(lambda _: self.nudge(1))
        self.box = w.HBox([self.slider, self.down, self.up])

    def nudge(self, steps: int) -> None:
        """Move the slider ``steps`` grid steps (negative: colder), within its range. A value
        that is no finite number > 0 (set from Python: the status line says so) counts as
        the range's low end."""
        slider = self.slider
        last = round((slider.max - slider.min) / slider.step)
        value = slider.value
        exponent = math.log10(value) if math.isfinite(value) and value > 0 else slider.min
        index = round((exponent - slider.min) / slider.step) + steps
        exponent = slider.min + min(max(index, 0), last) * slider.step
        slider.value = float(f"{slider.base ** exponent:.12g}")


def model_input_size(model: nn.Module) -> int:
    """The side in pixels of the square pictures ``model`` takes: its ``input_size``
    attribute (an int, as the registry's models have), else 224."""
    return check_index(getattr(model, "input_size", 224), "model.input_size (pixels, square)",
                       minimum=1)


@dataclass(frozen=True)
class ModelSource:
    """What an explorer knows about its model before loading it."""

    name: str
    input_size: int  # pixels, square
    temperature: float  # the slider's first value: the given T, else the model's default


def model_source(model: object, temperature: object) -> ModelSource:
    """Check an explorer's ``model`` (a registry name or an ``nn.Module``) and ``temperature``
    without loading anything."""
    if isinstance(model, str):
        spec = MODELS[check_choice(model, tuple(MODELS), "model")]
        name, size, default = spec.name, spec.input_size, spec.default_temperature
    elif isinstance(model, nn.Module):
        name, size = type(model).__name__, model_input_size(model)
        default = default_temperature(model)
    else:
        raise PullbackWidgetsTypeError(f"model must be a model name or a torch.nn.Module, "
                                       f"got {type(model).__name__}")
    chosen = default if temperature is None else check_positive(temperature, "temperature")
    return ModelSource(name, size, chosen)


@dataclass
class PreparedModel:
    """A model ready for an explorer: its class names, input size, and the notes the status
    line says once (names assumed, gates that do nothing)."""

    model: nn.Module
    labels: list[str]
    input_size: int  # pixels, square
    notes: list[str]


def prepare_model(model: str | nn.Module, labels: Sequence[str] | None) -> PreparedModel:
    """A registry name or a user's module, with its class names (:func:`class_names`: given
    ``labels`` win) and input size."""
    if isinstance(model, str):
        model = load_model(model)
    elif not isinstance(model, nn.Module):
        raise PullbackWidgetsTypeError(f"model must be a model name or a torch.nn.Module, "
                        f"got {type(model).__name__}")
    input_size = model_input_size(model)
    known = labels if labels is not None else getattr(model, "labels", None)
    if known is not None and labels is None:
        num_classes = len(known)  # a registry model: its names are its classes
    else:
        probe = as_model_input(model, torch.zeros(1, 3, input_size, input_size))
        num_classes = predict(model, probe).shape[-1]
    names, note = class_names(num_classes, labels, model)
    return PreparedModel(model, names, input_size, [note] if note else [])


# The Layer box's value for the logits (class targets): no module's name, not even one named
# "logits" (an FCN's last convolution), whose Units must stay reachable. The root's name "" is
# never offered as a layer.
LOGITS = ""


def layer_options(layer_shapes: dict[str, tuple[int, ...]], num_classes: int
                  ) -> list[tuple[str, str]]:
    """Layer dropdown options (label, value): the logits, then each layer with its shape
    (C×H×W), indented by its depth in the model so that a block's layers sit under it."""
    options = [(f"logits ({num_classes} classes)", LOGITS)]
    for name, shape in layer_shapes.items():
        indent = "\u00a0\u00a0" * name.count(".")  # plain spaces collapse in a <select>
        options.append((f"{indent}{name} ({'×'.join(map(str, shape))})", name))
    return options


class Settling:
    """Marks, in the thread that makes it, a change of several controls whose steps on the way
    are no request: ipywidgets' selection boxes jump to their first option when their options
    change, before the value meant is set. A live explorer skips its requests while
    :attr:`active` and takes one of the end state."""

    def __init__(self) -> None:
        self._local = threading.local()  # the other thread's changes are the user's own

    @property
    def active(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1


class LayerControl:
    """Layer, Channel and "all layers", as both explorers offer them.

    Layer is "logits" or one of the model's feature layers (:func:`feature_layers`, shapes
    in the labels); Channel is enabled, and bounded by the layer's channels, when a layer is
    chosen; "all layers" switches to every layer, those inside blocks too. While a new list of
    layers is put in, :attr:`settling` is active.
    """

    def __init__(self) -> None:
        self.layer = w.Dropdown(description="Layer", options=[("logits", LOGITS)], value=LOGITS,
                                style=STYLE, layout=wide())
        self.channel = w.BoundedIntText(description="Channel", min=0, max=0, value=0,
                                        disabled=True, style=STYLE)
        self.all_layers = w.Checkbox(description="all layers", value=False, indent=False,
                                     tooltip="also the layers inside each block",
                                     layout=w.Layout(width="auto"))
        self.box = w.HBox([self.layer, self.channel, self.all_layers])
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._lists: dict[bool, dict[str, tuple[int, ...]]] = {}
        self._num_classes = 0
        self.settling = Settling()
        self.layer.observe(self._on_layer, names="value")
        self.all_layers.observe(lambda change: self._show(), names="value")

    @property
    def short_list(self) -> dict[str, tuple[int, ...]]:
        """The layers offered without "all layers" (what a session records up front)."""
        return self._lists.get(False, {})

    def set_layers(self, model: nn.Module, image: Tensor, num_classes: int) -> None:
        """Learn ``model``'s layers from a forward of ``image`` (two: short and full list);
        again when the model changed: a layer gone is no longer offered (the box goes back to
        the logits), and a layer's new shape bounds its Channel."""
        self._lists = {every: feature_layers(model, image, every=every)
                       for every in (False, True)}
        self._num_classes = num_classes
        self._show()

    def _show(self) -> None:
        if not self._lists:  # the model is still loading; set_layers reads the box
            return
        with self.settling():
            self.shapes = self._lists[self.all_layers.value]
            chosen = self.layer.value if self.layer.value in self.shapes else LOGITS
            self.layer.options = layer_options(self.shapes, self._num_classes)
            self.layer.value = chosen  # new options reset the value; keep the layer if offered
            self._bound_channel(chosen)  # its shape may be new

    def _on_layer(self, change) -> None:
        self._bound_channel(change["new"])

    def _bound_channel(self, layer: str) -> None:
        if layer == LOGITS or layer not in self.shapes:
            self.channel.disabled = True
            return
        channels = self.shapes[layer][0]
        self.channel.max = channels - 1
        self.channel.value = min(self.channel.value, channels - 1)
        self.channel.disabled = False


def class_options(labels: Sequence[str]) -> list[str]:
    """Unique, searchable option strings "name (index)": ImageNet has two "crane"s. Names
    lose surrounding whitespace (labels read with ``readlines()``), as the box's values do."""
    return [f"{name.strip()} ({index})".lstrip() for index, name in enumerate(labels)]


def load_choice(source: object, size: int, name: str | None = None,
                max_pixels: int | None = None, lazy: bool = False
                ) -> tuple[str, Tensor | None]:
    """(dropdown key, image (1, 3, size, size) in [0, 1]) for a sample name or any image;
    with ``lazy``, a sample's image is None (to be loaded when shown)."""
    if isinstance(source, str) and source in SAMPLE_IMAGES:
        return source, None if lazy else sample_image(source, size=size)
    limits = {} if max_pixels is None else {"max_pixels": max_pixels}
    key = name or (str(source) if isinstance(source, str) else "your image")
    return key, load_image(source, size=size, **limits)


def image_choices(first: object, size: int) -> tuple[dict[str, Tensor], str]:
    """Every sample photo plus ``first`` (a sample name or any image), and ``first``'s key."""
    key, tensor = load_choice(first, size)
    choices = {key: tensor}
    for name in SAMPLE_IMAGES:
        if name not in choices:
            choices[name] = sample_image(name, size=size)
    return choices, key


def status_html(message: str, *, error: bool = False) -> str:
    colour = "#b00020" if error else "#555"
    icon = "⚠ " if error else ""
    return f"<span style='color:{colour}'>{icon}{html.escape(message)}</span>"


def describe(error: BaseException) -> str:
    """One line for the status bar: a user error's message; for anything else (a bug, or a
    failure inside the user's model) its type too, so that it does not pass for a user error."""
    try:  # a user's exception class whose __str__ fails must not leave "computing …" up
        text = str(error).strip()
    except Exception:
        text = ""
    message = text.splitlines()[0] if text else ""
    if isinstance(error, PullbackWidgetsError) and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
