"""AscentExplorer: run pullback ascent live, watch each frame arrive, scrub the trajectory."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import ipywidgets as w
import plotly.graph_objects as go
from torch import nn

from .. import figures
from ..ascent import METHODS, AscentResult, pullback_ascent
from ..gates import GATES
from ..model_helpers import default_temperature, predict
from .common import (
    STYLE,
    WIDE,
    LatestOnlyWorker,
    class_options,
    describe,
    image_choices,
    option_index,
    prepare_model,
    status_html,
    sync_figure,
)


@dataclass(frozen=True)
class _Run:
    """The controls at the moment Run was pressed."""

    image_key: str
    targets: tuple[int | None, ...]  # None: the predicted class
    steps: int
    step_size: float
    eps: float
    temperature: float
    gate: str
    method: str


class AscentExplorer(w.VBox):
    """Pullback ascent in a notebook: Run / Stop, a progress bar, frames as they are computed,
    a "Frame" slider to scrub the finished trajectory, and a counterfactual mode that ascends
    one image towards several classes at once (a row of the paper's Figure 1).

    ``model`` and ``image`` as for :class:`PullbackExplorer`. Step size and eps are L2 distances
    in pixel space [0, 1] (the paper's values halved; see :mod:`pullback_widgets.ascent`).
    """

    def __init__(self, model: str | nn.Module = "efficientnet_lite0", image: object = "coffee",
                 *, labels: Sequence[str] | None = None, temperature: float | None = None,
                 gate: str = "sigmoid") -> None:
        self.model, self.labels, self.input_size = prepare_model(model, labels)
        self._images, first_key = image_choices(image, self.input_size)
        self._options = class_options(self.labels)
        self._stop = threading.Event()
        self.result: AscentResult | None = None
        self._names: list[str] = []

        self.image = w.Dropdown(description="Image", options=list(self._images),
                                value=first_key, style=STYLE)
        self.target = w.Combobox(description="Target", options=self._options,
                                 ensure_option=True, placeholder="predicted class",
                                 style=STYLE, layout=WIDE)
        self.counterfactual = w.Checkbox(description="Counterfactual", value=False,
                                         style=STYLE)
        self.targets = w.TagsInput(allowed_tags=self._options, allow_duplicates=False,
                                   layout=w.Layout(width="640px"))
        self.steps = w.IntSlider(description="Steps", min=0, max=30, value=5, style=STYLE)
        self.step_size = w.FloatSlider(description="Step size", min=0.5, max=40, step=0.5,
                                       value=10.0, style=STYLE)
        self.eps = w.FloatSlider(description="Eps", min=1, max=200, step=1, value=50.0,
                                 style=STYLE)
        self.temperature = w.FloatLogSlider(
            description="Temperature", base=10, min=-2, max=1, step=0.05, readout_format=".3g",
            value=default_temperature(self.model) if temperature is None else temperature,
            style=STYLE, layout=WIDE)
        self.gate = w.Dropdown(description="Gate", options=list(GATES), value=gate, style=STYLE)
        self.method = w.ToggleButtons(description="Method", options=list(METHODS), style=STYLE)
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", icon="stop", disabled=True)
        self.progress = w.IntProgress(description="Progress", min=0, max=1, value=0,
                                      style=STYLE)
        self.frame = w.IntSlider(description="Frame", min=0, max=0, value=0, disabled=True,
                                 style=STYLE)
        self.status = w.HTML()
        self.frames_figure = go.FigureWidget()
        self.diff_figure = go.FigureWidget()
        self.curve_figure = go.FigureWidget()

        self.run_button.on_click(lambda _: self.run())
        self.stop_button.on_click(lambda _: self.stop())
        self.frame.observe(lambda change: self._show_frame(change["new"]), names="value")
        self.counterfactual.observe(self._on_mode, names="value")
        self._on_mode()
        super().__init__([
            w.HBox([self.image, self.target]),
            w.HBox([self.counterfactual, self.targets]),
            w.HBox([self.steps, self.step_size, self.eps]),
            w.HBox([self.temperature, self.gate, self.method]),
            w.HBox([self.run_button, self.stop_button, self.progress]),
            self.frame,
            self.frames_figure,
            w.HBox([self.diff_figure, self.curve_figure]),
            self.status,
        ])
        self._worker = LatestOnlyWorker(self._run_job, self._show_error)
        sync_figure(self.frames_figure, figures.ascent_frames([self._images[first_key][0]],
                                                              labels=["start"]))

    # ------------------------------------------------------------------ controls

    def _on_mode(self, change=None) -> None:
        self.targets.layout.display = None if self.counterfactual.value else "none"
        self.target.disabled = self.counterfactual.value

    def _snapshot(self) -> _Run:
        if self.counterfactual.value:
            if not self.targets.value:
                raise ValueError("counterfactual mode: add at least one class to Targets")
            targets = tuple(option_index(t) for t in self.targets.value)
        else:
            targets = (option_index(self.target.value),)
        return _Run(self.image.value, targets, self.steps.value, self.step_size.value,
                    self.eps.value, self.temperature.value, self.gate.value, self.method.value)

    def run(self) -> None:
        """Start an ascent with the current controls (what the Run button does)."""
        try:
            run = self._snapshot()
        except ValueError as error:
            self._show_error(error)
            return
        self._stop.clear()
        self.run_button.disabled, self.stop_button.disabled = True, False
        self.frame.disabled = True
        self.progress.max, self.progress.value = max(1, run.steps), 0
        self._worker.submit(run)

    def stop(self) -> None:
        """Stop the running ascent after its current step (what the Stop button does)."""
        self._stop.set()

    def wait(self, timeout: float | None = 120.0) -> bool:
        """Block until the run has finished (for scripts and tests)."""
        return self._worker.wait(timeout)

    # ------------------------------------------------------------------ worker side

    def _run_job(self, run: _Run) -> None:
        try:
            start = self._images[run.image_key]
            if any(t is None for t in run.targets):
                predicted = int(predict(self.model, start).argmax())
            targets = [predicted if t is None else t for t in run.targets]
            self._names = [self.labels[t] for t in targets]
            batch = start.expand(len(targets), -1, -1, -1)
            self.status.value = status_html(f"ascending towards {', '.join(self._names)} …")
            self.result = pullback_ascent(
                self.model, batch, targets, steps=run.steps, step_size=run.step_size,
                eps=run.eps, temperature=run.temperature, gate=run.gate, method=run.method,
                callback=self._on_step, progress=False)
            self._finish(self.result)
        finally:
            self.run_button.disabled, self.stop_button.disabled = False, True

    def _on_step(self, step: int, result: AscentResult) -> bool:
        self.result = result
        self.progress.value = step
        self._show_frame(len(result.images) - 1)
        return self._stop.is_set()

    def _finish(self, result: AscentResult) -> None:
        last = len(result.images) - 1
        self.frame.max, self.frame.disabled = last, False
        if self.frame.value == last:
            self._show_frame(last)
        else:
            self.frame.value = last  # the observer draws it
        gains = ", ".join(f"{name} {gain:+.2f}" for name, gain
                          in zip(self._names, result.gain.tolist()))
        state = f"stopped after step {last}" if result.stopped else f"{last} steps"
        self.status.value = status_html(f"{state} · target-logit gain: {gains}")

    def _show_frame(self, index: int) -> None:
        result = self.result
        if result is None or index >= len(result.images):
            return
        probs = result.probs
        labels = [f"{name} · step {index} · " + (f"p={float(probs[index, k]):.2f}"
                                                 if probs is not None else
                                                 f"{float(result.logits[index, k]):.2f}")
                  for k, name in enumerate(self._names)]
        frame = result.images[index]
        sync_figure(self.frames_figure, figures.ascent_frames(list(frame), labels=labels))
        sync_figure(self.diff_figure, figures.rgb_difference(
            frame[0] - result.images[0][0], title=f"step {index} minus start ({self._names[0]})"))
        sync_figure(self.curve_figure, figures.logit_curves(result.logits[:index + 1],
                                                            self._names))

    def _show_error(self, error: BaseException) -> None:
        self.status.value = status_html(describe(error), error=True)
