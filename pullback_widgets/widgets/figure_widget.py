"""Plotly figures that reach every page: the explorers' FigureWidget and their in-place update.

Two things went wrong with Plotly's own FigureWidget on a busy 2-core machine (README,
"Limitations"; ``benchmarks/page_loads.py``):

- Plotly ships its whole 5 MB bundle as each FigureWidget's anywidget module (``_esm``), and
  anywidget evaluates every model's module afresh: 1.6 s for one figure in headless Chromium
  here, 5 s for three loaded together. anywidget gives a model 2 s to initialise, then drops
  every message sent to it for good: the figure stays blank or frozen. Here the module is a
  small loader and the bundle travels as a plain synced string (``_plotly_esm``): the loader
  imports each bundle text once per page and makes each figure its own instance of Plotly's
  widget from it.
- A page that connects while the kernel is updating a figure draws the state it fetched, and
  the update messages sent in between are lost; a drawn Plotly view ignores later state. Here
  each page's model asks the kernel for the whole figure once Plotly's model exists (it does
  not make anywidget wait for the bundle), the kernel sends it as state, and the loader redraws
  its views from state that arrives after they were drawn.
"""

from __future__ import annotations

import functools
import re
import threading
from copy import deepcopy

import plotly.graph_objects as go
import traitlets

# Plotly's bundle exports ``default``, a factory of {initialize, render} holding one figure's
# state, and sets ``window.Plotly`` as it runs.
_LOADER = """
const BUNDLES = Symbol.for("pullback-widgets/plotly-bundles");

function importBundle(source) {
  const bundles = (globalThis[BUNDLES] ??= new Map());
  let bundle = bundles.get(source);
  if (!bundle) {
    const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
    bundle = import(url)
      .then((module) => ({ module, Plotly: globalThis.Plotly }))
      .catch((error) => { bundles.delete(source); throw error; })
      .finally(() => URL.revokeObjectURL(url));
    bundles.set(source, bundle);
  }
  return bundle;
}

export default () => {
  let started;  // Plotly's widget for this figure, and Plotly, once the bundle has run
  return {
    initialize(context) {
      // Not awaited: anywidget drops a model whose initialize takes over 2 s. The messages
      // that come before Plotly's model exists are lost to it, so it then asks the kernel for
      // the whole figure.
      started = importBundle(context.model.get("_plotly_esm")).then(({ module, Plotly }) => {
        const figure = module.default();
        figure.initialize(context);
        context.model.send({ request: "whole figure" });
        return { figure, Plotly };
      });
    },
    async render(context) {
      const { figure, Plotly } = await started;
      const { model, el } = context;
      const removeView = figure.render(context);
      let queued = false;
      const redraw = () => {
        queued = false;
        const layout = structuredClone(model.get("_widget_layout"));
        layout.height ||= 360;  // as Plotly's view draws a figure without a height
        Plotly.react(el, structuredClone(model.get("_widget_data")), layout,
                     { ...model.get("_config"), editSelection: false });
      };
      // One redraw for a message that carries both the data and the layout.
      const queueRedraw = () => {
        if (!queued) { queued = true; queueMicrotask(redraw); }
      };
      model.on("change:_widget_data", queueRedraw);
      model.on("change:_widget_layout", queueRedraw);
      return () => {
        model.off("change:_widget_data", queueRedraw);
        model.off("change:_widget_layout", queueRedraw);
        removeView();
      };
    },
  };
};
"""


@functools.cache
def _plotly_bundle() -> str:
    """The text of the module the installed Plotly gives its FigureWidget (anywidget reads a
    class's file path into file contents; str() of those is the text)."""
    return str(go.FigureWidget._esm)


class SyncedFigureWidget(go.FigureWidget):
    """A ``go.FigureWidget`` whose page evaluates Plotly's bundle once for all its figures, and
    whose every page gets the whole figure, even where its views drew a stale state."""

    _esm = _LOADER
    _plotly_esm = traitlets.Unicode().tag(sync=True)

    @traitlets.default("_plotly_esm")
    def _bundle_text(self) -> str:
        return _plotly_bundle()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Held by whoever changes the figure (sync_figure, in an explorer's worker thread) and
        # by the answer to a page (in the kernel's thread): a figure half updated when it is
        # sent would be drawn so.
        self._draw_lock = threading.RLock()
        self.on_msg(self._answer_page)
        self._view_count = 0  # counted (None: not), for sync_figure

    def store_state(self) -> None:
        """Put the figure as it is now into the widget state a page draws from. Plotly keeps
        that state as it was at construction and updates pages by messages instead."""
        self._widget_layout = deepcopy(self._layout_obj._props)
        self._widget_data = deepcopy(self._data)

    def set_state(self, sync_data) -> None:
        # A page's update (a view counted; the trace deltas Plotly's view reports after each
        # draw) is applied while traitlets holds this widget's notifications: an update message
        # a worker set and reset to None meanwhile would go out as None alone, and the page
        # would never get it.
        with self._draw_lock:
            super().set_state(sync_data)

    def _repr_mimebundle_(self, *args, **kwargs):
        with self._draw_lock:  # Plotly's stores the figure as state here: never half updated
            return super()._repr_mimebundle_(*args, **kwargs)

    @traitlets.observe("_js2py_traceDeltas")
    def _handler_js2py_traceDeltas(self, change) -> None:
        # A page draws the state it fetched before the whole figure reaches it, and Plotly's
        # view reports the drawn traces by uid: where a change of view has replaced them since,
        # Plotly's handler fails on the uids (ValueError, a traceback in the kernel's log).
        uids = {trace.uid for trace in self.data}
        if any(not isinstance(delta, dict) or delta.get("uid") not in uids
               for delta in (change["new"] or {}).get("trace_deltas") or ()):
            self._js2py_traceDeltas = None
            return
        super()._handler_js2py_traceDeltas(change)

    def _answer_page(self, _widget, content, _buffers) -> None:
        if isinstance(content, dict) and content.get("request") == "whole figure":
            self._send_whole_figure()

    def _send_whole_figure(self) -> None:
        with self._draw_lock, self.hold_sync():
            self.store_state()
            self._states_to_send.update(("_widget_data", "_widget_layout"))  # also unchanged


def figure_widget() -> SyncedFigureWidget:
    """An empty figure without Plotly's mode bar, which covered the panel titles; zoom by
    dragging and reset by double-click still work."""
    widget = SyncedFigureWidget()
    widget._config = {"displayModeBar": False}
    return widget


# Layout entries a figure draws per panel: a new figure without them had fewer panels.
_DRAWN_LAYOUT_KEY = re.compile(r"[xy]axis[0-9]*|annotations|shapes|images")


def sync_figure(widget: SyncedFigureWidget, figure: go.Figure) -> None:
    """Make ``widget`` show ``figure``, in place: same-typed traces are updated, never
    re-created, unless the trace types differ (e.g. a change of view)."""
    new_types = [trace.type for trace in figure.data]
    layout = figure.layout.to_plotly_json()
    with widget._draw_lock:
        # Read before the update: a page that starts showing the figure while (or just after)
        # plotly's incremental messages go out may have missed them, and it then draws the
        # state.
        shown = bool(widget._view_count)
        # update() only sets what the new layout has: the axes of panels it no longer has
        # (three frames, then one; a strip without its comparison) would stay, drawn with
        # their titles. Only what figures draw goes: what the user set on the page (dragmode)
        # stays.
        stale = {key for key in widget._layout_obj._props or {}
                 if key not in layout and _DRAWN_LAYOUT_KEY.fullmatch(key)}
        with widget.batch_update():
            if [trace.type for trace in widget.data] == new_types:
                for old, new in zip(widget.data, figure.data):
                    old.update(new.to_plotly_json(), overwrite=True)
                layout.pop("template", None)  # unchanged between same-view updates, and large
            else:
                widget.data = ()
                widget.add_traces(list(figure.data))
            widget.layout.update(layout, overwrite=True)
        if stale:  # removed once no trace is on them any more
            widget.plotly_relayout({key: None for key in stale})
        if not shown:
            # No page showed this figure when the update went out (Voilà draws widgets after
            # the kernel has run), and plotly's incremental messages sent before that are
            # lost: the state a page reads must hold the figure.
            widget.store_state()
