"""The self-contained HTML report that ``pullback-widgets explain`` and ``grid`` write.

plotly.js is embedded once in the page (no CDN), so a report opens offline.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import plotly.graph_objects as go
import plotly.io as pio
import torch
from torch import Tensor, nn

from . import figures
from .ascent import AscentGrid, AscentResult, pullback_ascent
from .model_helpers import STRIP_TEMPERATURES
from .session import PullbackSession


@dataclass
class Explanation:
    """Everything the explain report shows, for one image (1, 3, H, W) in [0, 1]."""

    image: Tensor
    probabilities: Tensor  # (num_classes,)
    target: int
    pullback: Tensor  # (3, H, W)
    gradient: Tensor  # (3, H, W)
    strip: list[Tensor]  # one (3, H, W) pullback per STRIP_TEMPERATURES entry
    ascent: AscentResult
    gradient_ascent: AscentResult
    parameters: dict[str, object] = field(default_factory=dict)


def explain_work(steps: int) -> int:
    """How many times :func:`explain` calls ``on_progress`` for ``steps`` ascent steps."""
    return 3 + 2 * steps


def explain(model: nn.Module, image: Tensor, target: int | None = None, *,
            temperature: float, gate: str = "sigmoid", steps: int = 5,
            step_size: float = 10.0, eps: float = 50.0,
            on_progress: Callable[[str], None] = lambda done: None) -> Explanation:
    """Run everything the report needs. ``target=None`` explains the predicted class.

    ``on_progress(what)`` runs after each unit of work, :func:`explain_work` times in all:
    the forward, the two maps, the temperature strip and every step of both ascents.
    """
    session = PullbackSession(model, image, temperature=temperature, gate=gate)
    probabilities = session.probabilities[0]
    target = int(probabilities.argmax()) if target is None else target
    on_progress("forward pass")
    pullback = session.pullback(target)[0]
    gradient = session.pullback(target, gate="hard")[0]
    on_progress("pullback and gradient")
    strip_gate = "sigmoid" if gate == "hard" else gate
    strip = [session.pullback(target, temperature=t, gate=strip_gate)[0]
             for t in STRIP_TEMPERATURES]
    on_progress("temperature strip")
    ascent_args = dict(steps=steps, step_size=step_size, eps=eps, temperature=temperature,
                       progress=False)
    ascent = pullback_ascent(model, image, target, gate=gate, **ascent_args, callback=lambda
                             step, _: on_progress(f"pullback ascent step {step}/{steps}"))
    gradient_ascent = pullback_ascent(model, image, target, method="gradient", **ascent_args,
                                      callback=lambda step, _: on_progress(
                                          f"gradient ascent step {step}/{steps}"))
    return Explanation(image[0], probabilities, target, pullback, gradient, strip, ascent,
                       gradient_ascent)


def _frame_labels(result: AscentResult) -> list[str]:
    labels = []
    for step, logit in enumerate(result.logits[:, 0].tolist()):
        prob = "" if result.probs is None else f" · p={float(result.probs[step, 0]):.2f}"
        labels.append(f"step {step} · logit {logit:.2f}{prob}")
    return labels


def _section(title: str, body: str, note: str = "") -> str:
    note_html = f"<p class='note'>{html.escape(note)}</p>" if note else ""
    heading = f"<h2>{html.escape(title)}</h2>" if title else ""
    return f"<section>{heading}{note_html}{body}</section>"


def _parameters_table(parameters: dict[str, object]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in parameters.items())
    return f"<table class='params'>{rows}</table>"


def render_html(title: str, sections: Sequence[tuple[str, go.Figure | str, str]],
                parameters: dict[str, object]) -> str:
    """A whole HTML page: ``sections`` are (heading, figure or HTML, note)."""
    parts, plotly_js_included = [], False
    for heading, content, note in sections:
        if isinstance(content, go.Figure):
            content = pio.to_html(content, full_html=False,
                                  include_plotlyjs=not plotly_js_included,
                                  config={"displaylogo": False})
            plotly_js_included = True
        parts.append(_section(heading, content, note))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.6em; }} h2 {{ font-size: 1.2em; margin-top: 1.6em; }}
.note {{ color: #555; max-width: 60em; }}
table.params th {{ text-align: left; padding-right: 1em; font-weight: 600; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">Made by pullback-widgets on {stamp}. Excitation pullbacks: the forward pass is
the model's own; in the backward pass every ReLU's hard gate 1[z&gt;0] is replaced by a soft gate
of its pre-activation and max-pooling by a soft pool (arXiv 2507.22832).</p>
{_parameters_table(parameters)}
{''.join(parts)}
</body></html>
"""


def explain_html(explanation: Explanation, labels: Sequence[str]) -> str:
    """The explain report for ``explanation``; class names from ``labels``."""
    e = explanation
    name = labels[e.target]
    pullback_gain = float(e.ascent.gain[0])
    gradient_gain = float(e.gradient_ascent.gain[0])
    sections = [
        ("Photo and top-5 predictions",
         figures.ascent_frames([e.image], labels=["input"]),
         ""),
        ("", figures.topk_bar(e.probabilities, labels, k=5, highlight=e.target), ""),
        (f"Pullback and plain gradient for “{name}”",
         figures.side_by_side({"excitation pullback": e.pullback, "plain gradient": e.gradient},
                              normalize=True),
         "Both maps summed over RGB, each divided by its own 99.5th percentile of |value| and "
         "drawn on one colour scale (red: raising the pixel raises the logit). Raw scales: "
         f"pullback {figures.signed_range(figures.channel_sum(e.pullback)):.3g}, gradient "
         f"{figures.signed_range(figures.channel_sum(e.gradient)):.3g}."),
        ("Where the pullback is large",
         figures.magnitude_overlay(e.image, e.pullback), ""),
        ("Pullback ascent, step by step",
         figures.ascent_frames(e.ascent.images_of(0), labels=_frame_labels(e.ascent)),
         f"Target-logit gain: pullback ascent {pullback_gain:+.2f}, gradient ascent "
         f"{gradient_gain:+.2f} (same steps, step size and eps)."),
        ("What the ascent changed (final minus start)",
         figures.rgb_difference(e.ascent.diff[0]), "Per-image min–max scaled, as in the paper."),
        ("Gradient ascent, for comparison",
         figures.ascent_frames(e.gradient_ascent.images_of(0),
                               labels=_frame_labels(e.gradient_ascent)), ""),
        ("Temperature strip",
         figures.temperature_strip(e.strip, STRIP_TEMPERATURES),
         "The same target from T = 0.01 (close to the plain gradient) to T = 10 (close to a "
         "model that is linear in path space); each panel on its own colour scale."),
    ]
    return render_html(f"Excitation pullback: {name}", sections, e.parameters)


def grid_html(grid: AscentGrid, row_labels: Sequence[str], labels: Sequence[str],
              parameters: dict[str, object]) -> str:
    """The counterfactual grid report (the paper's Figure 1)."""
    columns = [labels[t] for t in grid.targets]
    images = [[grid.images[i, j] for j in range(len(columns))] for i in range(len(row_labels))]
    diffs = [[torch.from_numpy(figures.rgb_difference_image(grid.diffs[i, j])).permute(2, 0, 1)
              .float() / 255 for j in range(len(columns))] for i in range(len(row_labels))]
    gains = ", ".join(f"{r}→{c}: {float(grid.gains[i, j]):+.2f}"
                      for i, r in enumerate(row_labels) for j, c in enumerate(columns))
    sections = [
        ("Images after pullback ascent", figures.labelled_grid(
            images, row_labels=row_labels, col_labels=columns), f"Target-logit gains: {gains}."),
        ("Final minus start", figures.labelled_grid(
            diffs, row_labels=row_labels, col_labels=columns), "Per-image min–max scaled."),
    ]
    return render_html("Counterfactual grid", sections, parameters)
