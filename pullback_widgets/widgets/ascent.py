"""AscentExplorer: run pullback ascent live, watch each frame arrive, scrub the trajectory.

Run and Stop are a small state machine (idle -> running -> stopping -> idle) under a lock: a
second Run while one is going is ignored, and only the run that is current may end it. The
frame view has one writer, :meth:`AscentExplorer._draw_frame`, which both threads call under a
lock; the status line has one writer, :class:`~pullback_widgets.widgets.common.StatusLine`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import ipywidgets as w
from torch import Tensor, nn

from .. import figures
from ..ascent import (
    METHODS,
    START_DEFAULTS,
    STARTS,
    AscentResult,
    ascent_start,
    pullback_ascent,
    stack_results,
)
from ..gates import GATES
from ..model_helpers import as_model_input, predict, scaled_temperatures
from ..session import PullbackSession, notices_unwarned
from ..targets import Unit
from ..validation import PullbackWidgetsError, check_choice
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
    image_choices,
    model_source,
    parse_target,
    prepare_model,
    resend_on_new_views,
    wide,
)
from .figure_widget import figure_widget, sync_figure

IDLE, RUNNING, STOPPING = "idle", "running", "stopping"


@dataclass(frozen=True)
class _Run:
    """The controls at the moment Run was pressed, with the run's number and status event."""

    number: int = field(compare=False)
    event: int = field(compare=False)
    image_key: str
    targets: tuple[int | None, ...]  # None: the predicted class
    steps: int
    step_size: float
    eps: float
    temperature: float
    gate: str
    method: str  # one of ASCENT_METHODS
    layer: str = LOGITS  # a feature layer: the target is Unit(layer, channel)
    channel: int = 0
    start: str = "photo"
    seed: int = 0


# "both": pullback ascent and plain gradient ascent from the same start, side by side.
ASCENT_METHODS = (*METHODS, "both")
COUNTERFACTUAL_HELP = "counterfactual mode ascends classes only: the layer is not used"


class AscentExplorer(w.VBox):
    """Pullback ascent in a notebook: Run / Stop, a progress bar, frames as they are computed,
    a "Frame" slider to scrub the finished trajectory, and a counterfactual mode that ascends
    one image towards several classes at once (a row of the paper's Figure 1).

    Layer and Channel (attributes ``layer``, ``channel``) choose a hidden unit instead of a
    class: the target is ``Unit(layer, channel)``, its spatial mean, and the curve shows its
    activation. Start (``start``) is the photo, grey (0.5) or uniform noise (``seed``); from
    grey or noise a hidden unit's ascent is feature visualisation along pullbacks, and Method
    "both" runs gradient ascent from the same start beside it. Choosing a start sets Steps,
    Step size and Eps to that start's defaults (:data:`~pullback_widgets.ascent.START_DEFAULTS`).

    ``model`` and ``image`` as for :class:`PullbackExplorer`. Step size and eps are L2 distances
    in pixel space [0, 1] (the paper's values halved; see :mod:`pullback_widgets.ascent`).
    :meth:`close` stops a running ascent and the worker and closes every widget it made.
    """

    def __init__(self, model: str | nn.Module = "efficientnet_lite0", image: object = "coffee",
                 *, labels: Sequence[str] | None = None, temperature: float | None = None,
                 gate: str = "sigmoid") -> None:
        source = model_source(model, temperature)
        gate = check_choice(gate, tuple(GATES), "gate")  # before any widget is made
        prepared = prepare_model(model, labels)
        self.model, self.labels, self.input_size = \
            prepared.model, prepared.labels, prepared.input_size
        self._images, first_key = image_choices(image, self.input_size)
        self._notes = prepared.notes  # said once, in the first status line
        self._options = class_options(self.labels)
        self._stop = threading.Event()
        self._state_lock, self._draw_lock = threading.Lock(), threading.Lock()
        self._state, self._runs = IDLE, 0
        self.result: AscentResult | None = None
        self._names: list[str] = []  # one per image of the result's batch
        self._step_names: list[str] = []  # the same, for the ascent being computed
        self._steps_before = 0  # on the progress bar, for the ascent being computed
        self._unit = False  # the result's target is a hidden unit

        self.image = w.Dropdown(description="Image", options=list(self._images),
                                value=first_key, style=STYLE)
        self.target = w.Combobox(description="Target", options=self._options,
                                 ensure_option=True, placeholder="predicted class",
                                 style=STYLE, layout=wide())
        self.counterfactual = w.Checkbox(description="Counterfactual", value=False,
                                         style=STYLE)
        self.counterfactual_help = w.HTML()
        self.layer_control = LayerControl()
        self.layer, self.channel, self.all_layers = \
            self.layer_control.layer, self.layer_control.channel, self.layer_control.all_layers
        self.layer_control.set_layers(
            self.model, as_model_input(self.model, self._images[first_key]), len(self.labels))
        self.start = w.ToggleButtons(description="Start", options=list(STARTS), style=STYLE)
        self.seed = w.BoundedIntText(description="Seed", min=0, max=2**31 - 1, value=0,
                                     style=STYLE, layout=w.Layout(display="none"))
        self.targets = w.TagsInput(allowed_tags=self._options, allow_duplicates=False,
                                   layout=w.Layout(width="640px"))
        self.steps = w.IntSlider(description="Steps", min=0, max=30, value=5, style=STYLE)
        self.step_size = w.FloatSlider(description="Step size", min=0.5, max=40, step=0.5,
                                       value=10.0, style=STYLE)
        self.eps = w.FloatSlider(description="Eps", min=1, max=400, step=1, value=50.0,
                                 style=STYLE)
        self.temperature_control = TemperatureControl(source.temperature)
        self.temperature = self.temperature_control.slider
        self.gate = w.Dropdown(description="Gate", options=list(GATES),
                               value=gate, style=STYLE)
        self.method = w.ToggleButtons(description="Method", options=list(ASCENT_METHODS),
                                      style=STYLE)
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", icon="stop", disabled=True)
        self.progress = w.IntProgress(description="Progress", min=0, max=1, value=0,
                                      style=STYLE)
        self.frame = w.IntSlider(description="Frame", min=0, max=0, value=0, disabled=True,
                                 style=STYLE)
        self._status = StatusLine()
        self.status = self._status.widget
        self.frames_figure = figure_widget()
        self.diff_figure = figure_widget()
        self.curve_figure = figure_widget()

        self.run_button.on_click(lambda _: self.run())
        self.stop_button.on_click(lambda _: self.stop())
        self.frame.observe(lambda change: self._draw_frame(change["new"]), names="value")
        self.counterfactual.observe(self._on_mode, names="value")
        self.layer.observe(self._on_mode, names="value")
        self.start.observe(self._on_start, names="value")
        self._on_mode()
        super().__init__([
            w.HBox([self.image, self.target]),
            self.layer_control.box,
            w.HBox([self.start, self.seed]),
            w.HBox([self.counterfactual, self.counterfactual_help, self.targets]),
            w.HBox([self.steps, self.step_size, self.eps]),
            w.HBox([self.temperature_control.box, self.gate, self.method]),
            w.HBox([self.run_button, self.stop_button, self.progress]),
            self.frame,
            self.frames_figure,
            w.HBox([self.diff_figure, self.curve_figure]),
            self.status,
        ])
        self._worker = LatestOnlyWorker(self._run_job, self._show_error,
                                        on_interrupt=self._show_error)
        self._closed = False
        self._notices: tuple[str, ...] = ()
        try:  # the caller never gets an explorer that fails here: it must not keep its thread
            self._check_gating(self._images[first_key])
            sync_figure(self.frames_figure, figures.ascent_frames([self._images[first_key][0]],
                                                                  labels=["start"]))
            resend_on_new_views(self)
            close_earlier_runs(self)
        except BaseException:
            self.close()
            raise

    def _check_gating(self, image: Tensor) -> None:
        """One forward on the start image: where nothing is gated, pullback ascent is
        gradient ascent, so the status line says so and the controls that change nothing
        (temperature, gate, method) are disabled."""
        with notices_unwarned():  # the status line says them instead
            session = PullbackSession(self.model, as_model_input(self.model, image))
        self._notices, plain = session.notices, session.gated_calls == 0
        for control in (self.temperature, self.gate, self.method,
                        self.temperature_control.down, self.temperature_control.up):
            control.disabled = plain
        if plain:
            self.method.value = "gradient"
            self.temperature.tooltip = self.gate.tooltip = self.method.tooltip = \
                "no gated op in this model: pullback ascent is plain gradient ascent"
        message = " · ".join([*self._notes, *self._notices])
        if message:
            self._status.show(message, self._status.event())

    # ------------------------------------------------------------------ controls

    def _on_mode(self, change=None) -> None:
        counterfactual = self.counterfactual.value
        unit = self.layer.value != LOGITS
        self.targets.layout.display = None if counterfactual else "none"
        self.target.disabled = counterfactual or unit
        self.layer.disabled = counterfactual
        self.channel.disabled = counterfactual or not unit
        self.counterfactual_help.value = f"<i>{COUNTERFACTUAL_HELP}</i>" if unit else ""
        self.counterfactual.tooltip = COUNTERFACTUAL_HELP

    def _on_start(self, change) -> None:
        self.seed.layout.display = None if change["new"] == "noise" else "none"
        self.steps.value, self.step_size.value, self.eps.value = START_DEFAULTS[change["new"]]

    def _snapshot(self, number: int, event: int) -> _Run:
        if self.counterfactual.value:
            if not self.targets.value:
                raise PullbackWidgetsError(
                    "counterfactual mode: add at least one class to Targets")
            targets = tuple(parse_target(t, self.labels) for t in self.targets.value)
            layer = LOGITS
        else:
            layer = self.layer.value
            targets = (None,) if layer != LOGITS else \
                (parse_target(self.target.value, self.labels),)
        return _Run(number, event, self.image.value, targets, self.steps.value,
                    self.step_size.value, self.eps.value, self.temperature.value,
                    self.gate.value, self.method.value, layer, self.channel.value,
                    self.start.value, self.seed.value)

    def run(self) -> bool:
        """Start an ascent with the current controls (what the Run button does).

        Returns False, and changes nothing, while another run is going or after a bad target
        (which the status line names).
        """
        event = self._status.event()
        with self._state_lock:
            if self._state != IDLE or self._closed:
                return False
            try:
                run = self._snapshot(self._runs + 1, event)
            except ValueError as error:  # find_class's and our own user errors
                self._status.show_error(error, event)
                return False
            self._runs, self._state = run.number, RUNNING
            self._stop.clear()
            self.run_button.disabled, self.stop_button.disabled = True, False
            self.frame.disabled = True
        # "both" runs the steps once per method, one after the other on one bar.
        total = run.steps * (len(METHODS) if run.method == "both" else 1)
        self.progress.max, self.progress.value = max(1, total), 0
        self._status.show(f"computing {total} ascent steps …", event)
        self._worker.submit(run)
        return True

    def stop(self) -> None:
        """Stop the running ascent after its current step (what the Stop button does)."""
        with self._state_lock:
            if self._state == RUNNING:
                self._state = STOPPING
                self._stop.set()
                self.stop_button.disabled = True

    def _end_run(self, number: int) -> None:
        with self._state_lock:
            if number != self._runs:  # a stale run never touches the controls
                return
            self._state = IDLE
            self.run_button.disabled, self.stop_button.disabled = False, True
            self.frame.disabled = self.result is None

    def wait(self, timeout: float | None = 120.0) -> bool:
        """Block until the run has finished (for scripts and tests)."""
        return self._worker.wait(timeout)

    def close(self) -> None:
        """Stop any run and the worker, close every widget the explorer made, drop the result.

        Idempotent. Afterwards nothing holds the explorer: ``del`` lets it be collected.
        """
        if getattr(self, "_closed", True):  # closed, or its constructor failed (Widget.__del__)
            return
        with self._state_lock:
            self._closed = True
            self._stop.set()
        try:  # a Ctrl-C while the worker finishes its job must not leave the widgets open
            self._worker.close()
        finally:
            close_children(self)
            self.result = self.model = None  # what holds it (Out[n]) keeps no model
            self._images.clear()
            super().close()

    # ------------------------------------------------------------------ worker side

    def _run_job(self, run: _Run) -> None:
        with notices_unwarned():  # the status line says them
            self._ascend(run)

    def _ascend(self, run: _Run) -> None:
        with self._draw_lock:  # the run's names and frames replace the last run's together:
            self.result = None  # one that fails before its first step leaves no frames
        try:
            start = as_model_input(self.model, ascent_start(
                run.start, self.input_size, photo=self._images[run.image_key], seed=run.seed))
            if run.layer != LOGITS:
                targets: list = [Unit(run.layer, run.channel)]
                names = [f"{run.layer} channel {run.channel}"]
            else:
                logits = predict(self.model, start)
                if logits.shape[-1] != len(self.labels):  # a new head: the names are another's
                    raise PullbackWidgetsError(
                        f"the model now has {logits.shape[-1]} classes, not the "
                        f"{len(self.labels)} this explorer names: make a new explorer for it")
                predicted = int(logits[0].argmax())
                targets = [predicted if t is None else t for t in run.targets]
                names = [self.labels[t] for t in targets]
            self._unit = run.layer != LOGITS
            methods = METHODS if run.method == "both" else (run.method,)
            batch = start.expand(len(targets), -1, -1, -1)
            results = []
            for done, method in enumerate(methods):
                self._steps_before = done * run.steps
                # The frames' names, which _on_step shows with this method's first frame.
                self._step_names = [f"{method}: {name}" for name in names] \
                    if len(methods) > 1 else names
                self._status.show(f"{method} ascent of {', '.join(names)} from "
                                  f"{self._start_name(run)} …", run.event)
                results.append(pullback_ascent(
                    self.model, batch, targets[0] if self._unit else targets, steps=run.steps,
                    step_size=run.step_size, eps=run.eps,
                    temperature=scaled_temperatures(self.model, run.temperature),
                    gate=run.gate, method=method, callback=self._on_step, progress=False))
                if results[-1].stopped:
                    break
            with self._draw_lock:
                if self._closed:
                    return
                self._names = [f"{method}: {name}" for method in methods[:len(results)]
                               for name in names] if len(methods) > 1 else names
                self.result = results[0] if len(results) == 1 else stack_results(results)
            self._finish(self.result, run)
        except BaseException:  # a Ctrl-C too: the frames so far, under the Frame slider
            if self.result is not None:  # a run that failed part-way: its frames so far
                self._show_last_frame(self.result)
            raise
        finally:
            self._end_run(run.number)

    @staticmethod
    def _start_name(run: _Run) -> str:
        return {"photo": f"“{run.image_key}”", "grey": "grey",
                "noise": f"noise (seed {run.seed})"}[run.start]

    def _on_step(self, step: int, result: AscentResult) -> bool:
        # Its own list of images: the ascent appends the next one before it has its score, and
        # a failure there would leave a frame without one under the Frame slider. Its names
        # with it: set before, in "both" the gradient's names went on the pullback's frames.
        with self._draw_lock:
            if self._closed:  # closed meanwhile (from this thread): keep nothing
                return True
            self.result = replace(result, images=list(result.images))
            self._names = self._step_names
        self.progress.value = self._steps_before + step
        self._draw_frame(len(result.images) - 1)
        return self._stop.is_set()

    def _show_last_frame(self, result: AscentResult) -> None:
        """Let the Frame slider span ``result``'s frames, and show its last."""
        last = len(result.images) - 1
        self.frame.max = last
        if self.frame.value == last:
            self._draw_frame(last)
        else:
            self.frame.value = last  # the observer draws it

    def _finish(self, result: AscentResult, run: _Run) -> None:
        last = len(result.images) - 1
        if not result.stopped:  # full, also after 0 steps (its bar's max is 1, none ran)
            self.progress.value = self.progress.max
        self._show_last_frame(result)
        gains = ", ".join(f"{figures.isolated(name)} {gain:+.2f}" for name, gain
                          in zip(self._names, result.gain.tolist()))
        state = f"stopped after step {last}" if result.stopped else f"{last} steps"
        value = "activation gain" if self._unit else "target-logit gain"
        # The run's own settings: the controls may have moved since Run was pressed.
        gate = "plain gradient" if run.method == "gradient" else \
            f"T = {run.temperature:.3g} · {run.gate}"
        self._status.show(" · ".join([
            f"{state} from {self._start_name(run)}", gate,
            f"step size {run.step_size:g}, eps {run.eps:g}", f"{value}: {gains}",
            *self._notices]), run.event)

    def _draw_frame(self, index: int) -> None:
        """The one writer of the frame view, called by the worker and the Frame slider."""
        with self._draw_lock:
            result = self.result
            if self._closed or result is None or index >= len(result.images):
                return
            probs = result.probs
            value = "activation " if self._unit else ""
            labels = [f"{figures.plain_text(name)} · step {index} · "
                      + (f"p={float(probs[index, k]):.2f}" if probs is not None
                         else f"{value}{float(result.logits[index, k]):.2f}")
                      for k, name in enumerate(self._names)]
            frame = result.images[index]
            sync_figure(self.frames_figure, figures.ascent_frames(list(frame), labels=labels))
            sync_figure(self.diff_figure, figures.rgb_difference(
                frame[0] - result.images[0][0],
                title=f"step {index} minus start ({figures.plain_text(self._names[0])})"))
            sync_figure(self.curve_figure, figures.logit_curves(
                result.logits[:index + 1], self._names,
                value_name="unit activation (spatial mean)" if self._unit else "target logit"))

    def _show_error(self, error: BaseException, run: _Run) -> None:
        self._status.show_error(error, run.event)
