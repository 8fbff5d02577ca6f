"""The self-contained HTML report that ``pullback-widgets explain`` and ``grid`` write.

One file that opens offline: plotly.js is embedded once (no CDN), gzip-compressed (4.8 MB of
JavaScript become 2 MB of base64, unpacked by the browser's ``DecompressionStream``), and the
figures are compact (:func:`figures.compact`: images as PNG, heatmaps as one byte a pixel) and
no wider than the page's column.
"""

from __future__ import annotations

import base64
import functools
import gzip
import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import plotly.graph_objects as go
import plotly.io as pio
import torch
from plotly.offline import get_plotlyjs
from torch import Tensor, nn

from . import figures
from .ascent import AscentGrid, AscentResult, pullback_ascent
from .labels import class_names
from .model_helpers import STRIP_TEMPERATURES
from .session import PullbackSession, Temperature
from .validation import PullbackWidgetsError, check_index, check_inputs, check_positive


@dataclass
class Explanation:
    """Everything the explain report shows, for one image (1, 3, H, W) in [0, 1]."""

    image: Tensor
    probabilities: Tensor  # (num_classes,)
    target: int
    pullback: Tensor  # (3, H, W)
    gradient: Tensor  # (3, H, W)
    strip: list[Tensor]  # one (3, H, W) pullback per STRIP_TEMPERATURES entry
    strip_gate: str
    ascent: AscentResult
    gradient_ascent: AscentResult
    parameters: dict[str, object] = field(default_factory=dict)
    notices: tuple[str, ...] = ()  # the engine's (see PullbackSession.notices), on the page


def explain_work(steps: int) -> int:
    """How many times :func:`explain` calls ``on_progress`` for ``steps`` ascent steps."""
    return 3 + 2 * steps


def explain(model: nn.Module, image: Tensor, target: int | None = None, *,
            temperature: Temperature = None, gate: str = "sigmoid",
            pool_weights: str = "differentiated", steps: int = 5,
            step_size: float = 10.0, eps: float = 50.0,
            on_progress: Callable[[str], None] = lambda done: None) -> Explanation:
    """Run everything the report needs. ``target=None`` explains the predicted class.

    ``on_progress(what)`` runs after each unit of work, :func:`explain_work` times in all:
    the forward, the two maps, the temperature strip and every step of both ascents.
    ``temperature=None`` is the model's own default per kind of op, as everywhere; the strip
    sets every kind to each of its temperatures.
    """
    # One image: the report shows the first of a batch, and would run every ascent on all.
    if check_inputs(image).shape[0] != 1:
        raise PullbackWidgetsError(f"the report explains one image (1, C, H, W), got a batch of "
                                   f"shape {tuple(image.shape)}; pass image[:1]")
    # The explanation's own copy, off any graph: the caller may reuse theirs.
    image = image.detach().clone()
    if image.min() < 0 or image.max() > 1:  # before the maps, not at the ascent after them
        raise PullbackWidgetsError("image must be in pixel space [0, 1] (see pw.load_image)")
    # A class index: a Unit or a list passed the maps and ascents and failed only in the page.
    target = None if target is None else check_index(target, "target")
    # The ascents' settings too, which they would refuse only after the maps and the strip.
    steps, step_size, eps = check_index(steps, "steps"), \
        check_positive(step_size, "step_size"), check_positive(eps, "eps")
    session = PullbackSession(model, image, temperature=temperature, gate=gate,
                              pool_weights=pool_weights)
    probabilities = session.probabilities[0]
    if target is not None and target >= len(probabilities):
        raise PullbackWidgetsError(
            f"target class {target} is out of range [0, {len(probabilities)})")
    target = int(probabilities.argmax()) if target is None else target
    on_progress("forward pass")
    pullback = session.pullback(target)[0]
    gradient = session.pullback(target, gate="hard")[0]
    on_progress("pullback and gradient")
    strip_gate = "sigmoid" if gate == "hard" else gate  # the hard gate has no temperature
    strip = [session.pullback(target, temperature=t, gate=strip_gate)[0]
             for t in STRIP_TEMPERATURES]
    on_progress("temperature strip")
    ascent_args = dict(steps=steps, step_size=step_size, eps=eps, temperature=temperature,
                       pool_weights=pool_weights, progress=False)

    def progress_of(method: str) -> Callable[[int, AscentResult], bool]:
        # on_progress only counts: what it returns must not stop the ascent (tqdm's update()
        # returns True whenever it redraws, which cut the report's ascents short).
        def step_done(step: int, _: AscentResult) -> bool:
            on_progress(f"{method} ascent step {step}/{steps}")
            return False
        return step_done

    ascent = pullback_ascent(model, image, target, gate=gate, **ascent_args,
                             callback=progress_of("pullback"))
    gradient_ascent = pullback_ascent(model, image, target, method="gradient", **ascent_args,
                                      callback=progress_of("gradient"))
    return Explanation(image[0], probabilities, target, pullback, gradient, strip, strip_gate,
                       ascent, gradient_ascent, notices=session.notices)


def _number(value: float, sign: str = "") -> str:
    """``value`` with two decimals where they hold it, else three significant digits: a logit
    of 1e-7 read "0.00" (and its gain "+0.00"), one of 1.2e7 "12345678.00"."""
    return f"{value:{sign}.2f}" if value == 0 or 0.01 <= abs(value) < 1e5 else \
        f"{value:{sign}.3g}"


def _raw_scale(attribution: Tensor) -> str:
    """The map's :func:`figures.signed_range`, or that it is 0 everywhere (the range's
    fallback, 1e-12, is no value of the map's)."""
    summed = figures.channel_sum(attribution)
    return f"{figures.signed_range(summed):.3g}" if summed.any() else "0 (0 everywhere)"


def _frame_labels(result: AscentResult) -> list[str]:
    labels = []
    for step, logit in enumerate(result.logits[:, 0].tolist()):
        prob = "" if result.probs is None else f" · p={float(result.probs[step, 0]):.2f}"
        labels.append(f"step {step}<br>logit {_number(logit)}{prob}")
    return labels


# Frames a report row shows: more, scaled to the page, ran their titles into each other (a
# step's logit read against its neighbour's) and shrank to a few pixels at 100 steps.
FRAMES_SHOWN = 6


def shown_steps(steps: int, most: int = FRAMES_SHOWN) -> list[int]:
    """The steps a row of at most ``most`` frames shows out of 0 … ``steps``: the start, the
    end and evenly spaced ones between."""
    if steps + 1 <= most:
        return list(range(steps + 1))
    return sorted({round(i * steps / (most - 1)) for i in range(most)})


def _frames(result: AscentResult) -> go.Figure:
    """The ascent's frames in a row (at most :data:`FRAMES_SHOWN`), titled on two small lines,
    so that they fit the page."""
    images, labels = result.images_of(0), _frame_labels(result)
    steps = shown_steps(len(images) - 1)
    figure = figures.ascent_frames([images[k] for k in steps], labels=[labels[k] for k in steps])
    return figure.update_annotations(font_size=13)


def _frames_note(result: AscentResult) -> str:
    """What a row of frames leaves out, if anything."""
    last = len(result.logits) - 1
    steps = shown_steps(last)
    return "" if len(steps) == last + 1 else \
        f"Steps {', '.join(map(str, steps))} of {last} shown."


def _section(title: str, body: str, note: str = "") -> str:
    note_html = f"<p class='note'>{html.escape(note)}</p>" if note else ""
    heading = f"<h2>{html.escape(title)}</h2>" if title else ""
    return f"<section>{heading}{note_html}{body}</section>"


def _parameters_table(parameters: dict[str, object]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td><bdi>{html.escape(str(v))}</bdi>"
                   "</td></tr>"
                   for k, v in parameters.items())
    return f"<table class='params'>{rows}</table>"


# The page's column (CSS max-width); wider figures are scaled down to it, so that a 1280-px
# browser window never scrolls sideways.
PAGE_PX = 1100
PLOTLY_CONFIG = {"displaylogo": False}
PAGE_CSS = f"""
body {{ font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em;
       max-width: {PAGE_PX}px; color: #222; }}
h1 {{ font-size: 1.6em; }} h2 {{ font-size: 1.2em; margin-top: 1.6em; }}
.note {{ color: #555; max-width: 60em; }}
table.params th {{ text-align: left; padding-right: 1em; font-weight: 600; }}
"""
# Unpacks plotly.js, then draws every figure from its JSON block. A browser too old for
# DecompressionStream gets a sentence instead of a blank page.
PAGE_JS = """
(async () => {
  const status = document.getElementById("drawing");
  try {
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this browser cannot unpack the embedded plotly.js; it needs Chrome 80, "
                      + "Firefox 113, Safari 16.4 or newer");
    }
    const packed = atob(document.getElementById("plotly-js-gzip").textContent.trim());
    const bytes = new Uint8Array(packed.length);
    for (let i = 0; i < packed.length; i++) bytes[i] = packed.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    const plotly = document.createElement("script");
    plotly.textContent = await new Response(stream).text();
    document.head.appendChild(plotly);
    const figures = document.querySelectorAll("div.figure");
    for (const div of figures) {
      const figure = JSON.parse(document.getElementById(div.id + "-data").textContent);
      await Plotly.newPlot(div, figure.data, figure.layout, __PLOTLY_CONFIG__);
    }
    status.remove();
    document.body.dataset.figuresDrawn = String(figures.length);
  } catch (error) {
    status.textContent = "The figures could not be drawn: " + error.message;
  }
})();
"""


@functools.lru_cache(maxsize=1)
def _packed_plotly_js() -> str:
    """plotly.js as bundled with plotly.py, gzip-compressed and base64-encoded (ASCII)."""
    return base64.b64encode(gzip.compress(get_plotlyjs().encode(), mtime=0)).decode("ascii")


def _figure_html(figure: go.Figure, element_id: str) -> str:
    """An empty div the page script draws ``figure`` into, and the figure's JSON beside it."""
    compact = figures.fit_width(figures.compact(figure), PAGE_PX)
    # "</" would end the script element early; JSON reads "<\/" as "</".
    data = pio.to_json(compact, validate=False).replace("</", "<\\/")
    return (f'<div class="figure" id="{element_id}"></div>'
            f'<script type="application/json" id="{element_id}-data">{data}</script>')


def render_html(title: str, sections: Sequence[tuple[str, go.Figure | str, str]],
                parameters: dict[str, object]) -> str:
    """A whole HTML page: ``sections`` are (heading, figure or HTML, note)."""
    parts = []
    for index, (heading, content, note) in enumerate(sections):
        if isinstance(content, go.Figure):
            content = _figure_html(content, f"figure-{index}")
        parts.append(_section(heading, content, note))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    script = PAGE_JS.replace("__PLOTLY_CONFIG__", json.dumps(PLOTLY_CONFIG))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{PAGE_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">Made by pullback-widgets on {stamp}. Excitation pullbacks: the forward pass is
the model's own; in the backward pass every ReLU's hard gate 1[z&gt;0] is replaced by a soft gate
of its pre-activation and max-pooling by a soft pool (arXiv 2507.22832).</p>
<p class="note" id="drawing">Drawing the figures …</p>
<noscript><p class="note">This report draws its figures with JavaScript; allow it to see
them.</p></noscript>
{_parameters_table(parameters)}
{''.join(parts)}
<script type="application/octet-stream" id="plotly-js-gzip">{_packed_plotly_js()}</script>
<script>{script}</script>
</body></html>
"""


def explain_html(explanation: Explanation, labels: Sequence[str] | None = None) -> str:
    """The explain report for ``explanation``; class names from ``labels`` (None: see
    :func:`~pullback_widgets.labels.class_names`, ImageNet-1k's for 1000 classes, and the
    page says it assumed them)."""
    e = explanation
    labels, assumed = class_names(len(e.probabilities), labels)
    name = figures.isolated(labels[e.target])  # escaped where it is written
    pullback_gain = float(e.ascent.gain[0])
    gradient_gain = float(e.gradient_ascent.gain[0])
    notices = [notice for notice in (*e.notices, assumed) if notice]
    sections = [("Notice", "", " ".join(f"{n[0].upper()}{n[1:]}." for n in notices))] \
        if notices else []
    sections += [
        ("Photo and top-5 predictions",
         figures.ascent_frames([e.image], labels=["input"]),
         ""),
        ("", figures.topk_bar(e.probabilities, labels, k=5, highlight=e.target), ""),
        (f"Pullback and plain gradient for “{name}”",
         figures.side_by_side({"excitation pullback": e.pullback, "plain gradient": e.gradient},
                              normalize=True),
         "Both maps summed over RGB, each divided by its own 99.5th percentile of |value| and "
         "drawn on one colour scale (red: raising the pixel raises the logit). Raw scales: "
         f"pullback {_raw_scale(e.pullback)}, gradient {_raw_scale(e.gradient)}."),
        ("Where the pullback is large",
         figures.magnitude_overlay(e.image, e.pullback),
         "|pullback| summed over RGB, divided by its 99.5th percentile; pixels above it are "
         "drawn at 1."),
        ("Pullback ascent, step by step",
         _frames(e.ascent),
         f"Target-logit gain: pullback ascent {_number(pullback_gain, '+')}, gradient ascent "
         f"{_number(gradient_gain, '+')} (same steps, step size and eps). {_frames_note(e.ascent)}"
         .strip()),
        ("What the ascent changed (final minus start)",
         figures.rgb_difference(e.ascent.diff[0]), "Per-image min–max scaled, as in the paper."),
        ("Gradient ascent, for comparison",
         _frames(e.gradient_ascent), _frames_note(e.gradient_ascent)),
        ("Temperature strip",
         figures.temperature_strip(e.strip, STRIP_TEMPERATURES),
         f"The same target from T = 0.01 (close to the plain gradient) to T = 10 (close to a "
         f"model that is linear in path space), gate {e.strip_gate}"
         + (" (the hard gate has no temperature)" if e.strip_gate != e.parameters.get("gate",
                                                                                  e.strip_gate)
            else "") + "; each panel on its own colour scale, ± its 99.5th percentile of "
         "|value| (beyond it the colour saturates)."),
    ]
    return render_html(f"Excitation pullback: {name}", sections, e.parameters)


def grid_html(grid: AscentGrid, row_labels: Sequence[str], labels: Sequence[str],
              parameters: dict[str, object]) -> str:
    """The counterfactual grid report (the paper's Figure 1): ``row_labels`` name the grid's
    images, ``labels`` the model's classes."""
    rows = grid.images.shape[0]
    if isinstance(row_labels, str) or len(row_labels) != rows:  # fewer dropped rows unsaid
        raise PullbackWidgetsError(f"row_labels must name each of the grid's {rows} images, "
                                   f"got {1 if isinstance(row_labels, str) else len(row_labels)}")
    highest = max(grid.targets, default=-1)
    if isinstance(labels, str) or highest >= len(labels):
        raise PullbackWidgetsError(f"labels must name every class up to the grid's target "
                                   f"{highest}, got {len(labels)} names")
    columns = [labels[t] for t in grid.targets]
    images = [[grid.images[i, j] for j in range(len(columns))] for i in range(len(row_labels))]
    diffs = [[torch.from_numpy(figures.rgb_difference_image(grid.diffs[i, j])).permute(2, 0, 1)
              .float() / 255 for j in range(len(columns))] for i in range(len(row_labels))]
    gains = ", ".join(f"{figures.isolated(r)}→{figures.isolated(c)}: "
                      f"{float(grid.gains[i, j]):+.2f}"
                      for i, r in enumerate(row_labels) for j, c in enumerate(columns))
    sections = [
        ("Images after pullback ascent", figures.labelled_grid(
            images, row_labels=row_labels, col_labels=columns), f"Target-logit gains: {gains}."),
        ("Final minus start", figures.labelled_grid(
            diffs, row_labels=row_labels, col_labels=columns), "Per-image min–max scaled."),
    ]
    return render_html("Counterfactual grid", sections, parameters)
