"""What both explorers share: a latest-only worker, in-place figure sync, labelled controls."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable, Sequence
from copy import deepcopy
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go
import torch
from torch import Tensor, nn

from ..images import SAMPLE_IMAGES, load_image, sample_image
from ..model_helpers import predict
from ..models import load_model

# Wide enough for "Temperature" and "Step size": ipywidgets' default cuts them to "Temperat…".
DESCRIPTION_WIDTH = "90px"
STYLE = {"description_width": DESCRIPTION_WIDTH}
WIDE = w.Layout(width="420px")


class LatestOnlyWorker:
    """Runs ``job(request)`` on a background thread, always for the latest request only.

    A slider drag submits many requests while one is being computed; those in between are
    dropped, so there is never a queue. The kernel stays responsive meanwhile, because torch
    releases the GIL. Exceptions go to ``on_error`` and the worker carries on.
    """

    def __init__(self, job: Callable[[Any], None], on_error: Callable[[BaseException], None]):
        self._job, self._on_error = job, on_error
        self._lock = threading.Condition()
        self._pending: Any = None
        self._has_pending = False
        self._busy = False
        self.completed = 0  # jobs run to the end, for tests and the status line
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="pullback-widgets-worker")
        self._thread.start()

    def submit(self, request: Any) -> None:
        with self._lock:
            self._pending, self._has_pending = request, True
            self._lock.notify_all()

    def wait(self, timeout: float | None = 60.0) -> bool:
        """Block until nothing is pending or running; True if that happened in time."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._has_pending and not self._busy,
                                       timeout)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._busy or self._has_pending

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._has_pending)
                request, self._pending, self._has_pending = self._pending, None, False
                self._busy = True
            try:
                self._job(request)
                self.completed += 1
            except BaseException as error:  # a widget must survive any failure of a job
                try:
                    self._on_error(error)
                except BaseException:
                    traceback.print_exc()
            finally:
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()


def sync_figure(widget: go.FigureWidget, figure: go.Figure) -> None:
    """Make ``widget`` show ``figure``, in place: same-typed traces are updated, never
    re-created, unless the trace types differ (e.g. a change of view)."""
    new_types = [trace.type for trace in figure.data]
    layout = figure.layout.to_plotly_json()
    with widget.batch_update():
        if [trace.type for trace in widget.data] == new_types:
            for old, new in zip(widget.data, figure.data):
                old.update(new.to_plotly_json(), overwrite=True)
            layout.pop("template", None)  # unchanged between same-view updates, and large
        else:
            widget.data = ()
            widget.add_traces(list(figure.data))
        widget.layout.update(layout, overwrite=True)
    if not widget._view_count:
        # No page shows this figure yet (Voilà draws widgets after the kernel has run), and
        # plotly's incremental messages sent before that are lost: put the figure into the
        # widget state the page will read, as plotly itself does when a figure is displayed.
        widget._widget_layout = deepcopy(widget._layout_obj._props)
        widget._widget_data = deepcopy(widget._data)


def prepare_model(model: str | nn.Module, labels: Sequence[str] | None
                  ) -> tuple[nn.Module, list[str], int]:
    """(model, class names, input size in pixels) for a registry name or a user's module."""
    if isinstance(model, str):
        model = load_model(model)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be a model name or a torch.nn.Module, "
                        f"got {type(model).__name__}")
    input_size = int(getattr(model, "input_size", 224))
    labels = labels if labels is not None else getattr(model, "labels", None)
    if labels is None:  # a user's model without names: number its classes
        parameter = next(model.parameters(), torch.empty(0))
        probe = torch.zeros(1, 3, input_size, input_size, device=parameter.device)
        num_classes = predict(model, probe).shape[-1]
        labels = [f"class {i}" for i in range(num_classes)]
    return model, list(labels), input_size


def class_options(labels: Sequence[str]) -> list[str]:
    """Unique, searchable option strings "name (index)": ImageNet has two "crane"s."""
    return [f"{name} ({index})" for index, name in enumerate(labels)]


def option_index(option: str) -> int | None:
    """The class index in a :func:`class_options` string; None when none is chosen yet."""
    if not option.endswith(")") or "(" not in option:
        return None
    return int(option.rsplit("(", 1)[1][:-1])


def load_choice(source: object, size: int, name: str | None = None,
                max_pixels: int | None = None) -> tuple[str, Tensor]:
    """(dropdown key, image (1, 3, size, size) in [0, 1]) for a sample name or any image."""
    if isinstance(source, str) and source in SAMPLE_IMAGES:
        return source, sample_image(source, size=size)
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
    import html

    colour = "#b00020" if error else "#555"
    icon = "⚠ " if error else ""
    return f"<span style='color:{colour}'>{icon}{html.escape(message)}</span>"


def describe(error: BaseException) -> str:
    """One line for the status bar; the type only when the message says nothing."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, (ValueError, TypeError)) and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
