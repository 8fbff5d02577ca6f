"""The quality table and the temperature curves, through `pullback-widgets evaluate`.

    python benchmarks/quality.py             # full run (see benchmarks/results for its time)
    python benchmarks/quality.py --quick     # tiny settings, well under a minute (CI smoke test)
    python benchmarks/quality.py --out-dir /tmp/results --threads 1
    python benchmarks/quality.py --report-only   # rebuild the curve reports from the CSV

EfficientNet-Lite0 with its real ImageNet weights (offline, from a pip package), on the 8
photos that ship with packages, never fetched: scikit-image's 5 samples (pw.SAMPLE_IMAGES),
scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg, written to a folder
as PNG. Every photo is explained for its 5 most probable classes. Needs the ``dev`` and
``compare`` extras (scikit-learn, matplotlib, Captum).

1. **The quality table** is the command itself, run in a subprocess::

       pullback-widgets evaluate photos --targets top-5 --methods ... --metrics ... \\
           --out OUT_DIR/quality.csv

   giving ``quality.csv`` (one row per photo, target, method, metric),
   ``quality.summary.md`` (mean ± s.e., paired differences against the gradient and the
   random control with 95% intervals) and ``quality.settings.json``.
2. **The temperature curves**: the same runner (:func:`pullback_widgets.evaluation.evaluate`)
   over a grid of pullbacks (sigmoid and normal_cdf gates at absolute T, sigmoid at relative
   T) next to the gradient and the random control, giving ``temperature_curves.csv``,
   ``temperature_curves.md`` (with the relative-or-absolute verdict) and ``.html``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image
from plotly.subplots import make_subplots

import pullback_widgets as pw
from pullback_widgets import evaluation as ev

ROOT = Path(__file__).resolve().parents[1]
PACKAGED_PHOTOS = ("china", "flower", "grace_hopper")
CONTROL = "random"
# Captum's guided backprop as is equals the gradient on Lite0's ReLU6 (a test shows it).
TABLE_METHODS = tuple(m for m in ev.METHODS if m != "guided_backprop_captum")
CURVE_METRICS = ("deletion", "insertion", "infidelity", "ascent_gain")


@dataclass(frozen=True)
class Settings:
    """What sets the cost and the noise of a run; recorded in every output."""

    photos: tuple[str, ...] = (*pw.SAMPLE_IMAGES, *PACKAGED_PHOTOS)
    image_size: int = 224
    targets: str = "top-5"
    table_methods: tuple[str, ...] = TABLE_METHODS
    table_metrics: tuple[str, ...] = tuple(ev.METRICS)
    # 0.7: Lite0's default, against which the relative temperatures are judged
    curve_temperatures: tuple[float, ...] = (0.03, 0.1, 0.3, 0.7, 1.0, 3.0, 10.0)
    relative_temperatures: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    curve_metrics: tuple[str, ...] = CURVE_METRICS
    batch_size: int = 8


FULL = Settings()
QUICK = Settings(photos=("chelsea", "coffee"), image_size=64, targets="top-2",
                 table_methods=("gradient", "pullback", "random"),
                 table_metrics=("deletion", "insertion"), curve_temperatures=(0.1, 0.7),
                 relative_temperatures=(0.3, 1.0), curve_metrics=("deletion", "ascent_gain"))


# --------------------------------------------------------------------------- photos

def photo_array(name: str) -> np.ndarray:
    """A packaged photo as uint8 RGB (H, W, 3)."""
    if name in pw.SAMPLE_IMAGES:
        return pw.images.sample_image_array(name)
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image  # the dev extra

        return load_sample_image(f"{name}.jpg")
    if name == "grace_hopper":
        from matplotlib.cbook import get_sample_data

        return np.asarray(Image.open(get_sample_data("grace_hopper.jpg", asfileobj=False))
                          .convert("RGB"))
    raise ValueError(f"unknown photo {name!r}")


def write_photos(folder: Path, names: Sequence[str]) -> list[Path]:
    """The photos as lossless PNG files ``folder/NAME.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.png"
        Image.fromarray(photo_array(name)).save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- the two runs

def run_table(settings: Settings, workdir: Path, out_dir: Path, threads: int | None) -> str:
    """The command in a subprocess, from ``workdir`` (so images are named photos/NAME.png)."""
    command = ["pullback-widgets", "evaluate", "photos", "--targets", settings.targets,
               "--image-size", str(settings.image_size), "--batch-size",
               str(settings.batch_size), "--methods", *settings.table_methods,
               "--metrics", *settings.table_metrics, "--out", str(out_dir / "quality.csv")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    for stale in (out_dir / "quality.csv", out_dir / "quality.csv.parts"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    subprocess.run([sys.executable, "-m", "pullback_widgets.cli", *command[1:]], cwd=workdir,
                   env=env, check=True)
    return " ".join(command)


def curve_methods(settings: Settings) -> dict[str, ev.Explainer]:
    methods: dict[str, ev.Explainer] = {"gradient": ev.gradient}
    for gate in ("sigmoid", "normal_cdf"):
        for t in settings.curve_temperatures:
            methods[ev.pullback_name(t, gate)] = ev.pullback_method(t, gate)
    for t in settings.relative_temperatures:
        methods[ev.pullback_name(t, "sigmoid", "relative")] = \
            ev.pullback_method(t, "sigmoid", "relative")
    methods[CONTROL] = ev.random_attribution
    return methods


def run_curves(settings: Settings, workdir: Path, out_dir: Path) -> None:
    run_settings = ev.EvaluationSettings(metrics=settings.curve_metrics,
                                         targets=settings.targets,
                                         image_size=settings.image_size,
                                         batch_size=settings.batch_size)
    items = [ev.Item(f"photos/{name}.png", workdir / "photos" / f"{name}.png")
             for name in settings.photos]
    out = out_dir / "temperature_curves.csv"
    for stale in (out, out.with_name(out.name + ".parts")):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    ev.evaluate(items, run_settings, out, methods=curve_methods(settings))


# --------------------------------------------------------------------------- curve report

@dataclass
class Curves:
    """Per method and metric, one value per photo (the mean over its targets)."""

    settings: Settings
    photos: list[str]
    results: dict[str, dict[str, torch.Tensor]]
    default_temperature: float
    note: str

    @classmethod
    def from_rows(cls, rows: Sequence[tuple], settings: Settings, note: str) -> Curves:
        by: dict[tuple[str, str], dict[str, list[float]]] = {}
        photos = list(dict.fromkeys(r[0] for r in rows))
        for image, _, method, metric, value in rows:
            by.setdefault((method, metric), {}).setdefault(image, []).append(value)
        results: dict[str, dict[str, torch.Tensor]] = {}
        for (method, metric), per_image in by.items():
            results.setdefault(method, {})[metric] = torch.tensor(
                [float(np.nanmean(per_image[p])) for p in photos], dtype=torch.float64)
        default = float(pw.models.MODELS["efficientnet_lite0"].default_temperature)
        return cls(settings, photos, results, default, note)


def _direction(metric: str) -> bool:
    return ev.METRICS[metric]


def _stats(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    values = values[~values.isnan()]
    if values.numel() == 0:
        return math.nan, math.nan
    se = float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else math.nan
    return float(values.mean()), se


def _cell(values: torch.Tensor | None, digits: int = 3) -> str:
    if values is None:
        return "—"
    mean, se = _stats(values)
    return f"{mean:.{digits}g} ±{se:.1g}" if math.isfinite(se) else f"{mean:.{digits}g}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def relative_verdict(run: Curves) -> list[str]:
    """Relative vs absolute temperature, with the rule that decides the recommendation.

    A relative T is recommended over the model's default (absolute) T only if, in paired
    per-photo differences, it is clearly better (by more than two standard errors) on at least
    one metric, clearly worse on none, and no worse on average in the ascent gain.
    """
    s, metrics = run.settings, list(run.settings.curve_metrics)
    default = run.results.get(ev.pullback_name(run.default_temperature))
    if default is None:
        return [f"(The default T = {run.default_temperature:g} is not on the grid.)"]
    lines = [f"Paired per-photo differences, relative sigmoid T minus the default absolute "
             f"sigmoid T={run.default_temperature:g} (mean ± s.e.; ✓ clearly better, ✗ "
             "clearly worse: by more than 2 s.e.; unmarked: within the noise of "
             f"{len(run.photos)} photos):", ""]
    rows, candidates = [], []
    for t in s.relative_temperatures:
        rel = run.results[ev.pullback_name(t, "sigmoid", "relative")]
        cells, better, worse = [], 0, 0
        for metric in metrics:
            mean, se = _stats(rel[metric] - default[metric])
            clear = math.isfinite(se) and abs(mean) > 2 * se
            good = (mean > 0) == _direction(metric)
            better, worse = better + (clear and good), worse + (clear and not good)
            mark = (" ✓" if good else " ✗") if clear else ""
            cells.append(f"{mean:+.3g} ±{se:.1g}{mark}")
        ascent = _stats(rel["ascent_gain"] - default["ascent_gain"])[0] \
            if "ascent_gain" in rel else 0.0
        if worse == 0:
            candidates.append((better, ascent, t))
        rows.append([f"relative T={t:g}", *cells])
    lines += [_md_table(["", *metrics], rows), ""]
    winners = [c for c in candidates if c[0] >= 1 and c[1] >= 0]
    if winners:
        best = max(winners)[2]
        lines.append(f"**Recommendation: relative temperature, T = {best:g}.** It is clearly "
                     "better than the absolute default on at least one metric, clearly worse "
                     "on none, and no worse in ascent gain.")
    else:
        lines.append(f"**Recommendation: keep the absolute temperature (default T = "
                     f"{run.default_temperature:g}).** No relative T is clearly better on any "
                     "metric without being clearly worse on another or losing ascent gain.")
    lines += ["", "Rule: " + " ".join(relative_verdict.__doc__.split("\n\n")[1].split())]
    return lines


def temperature_markdown(run: Curves) -> str:
    s, metrics = run.settings, list(run.settings.curve_metrics)
    arrows = [m + (" ↑" if _direction(m) else " ↓") for m in metrics]
    rows = [[name, "—", "—", *(_cell(run.results[name].get(m)) for m in metrics)]
            for name in ("gradient", CONTROL)]
    for gate, mode, temperatures in (("sigmoid", "absolute", s.curve_temperatures),
                                     ("normal_cdf", "absolute", s.curve_temperatures),
                                     ("sigmoid", "relative", s.relative_temperatures)):
        for t in temperatures:
            r = run.results[ev.pullback_name(t, gate, mode)]
            rows.append([f"pullback {gate}", mode, f"{t:g}", *(_cell(r.get(m)) for m in metrics)])
    return "\n".join([
        "# Pullback metrics over the temperature (EfficientNet-Lite0)",
        "",
        f"Generated by `python benchmarks/quality.py` through `pullback_widgets.evaluation."
        f"evaluate` (rows in temperature_curves.csv). {run.note}",
        "",
        f"Photos: {', '.join(run.photos)}; targets: {s.targets} per photo. Mean over the "
        "photos ± standard error, a photo's value being the mean over its targets. Metrics as "
        "in quality.summary.md. `relative`: T times the per-example standard deviation of "
        "each gated op's pre-activations.",
        "",
        _md_table(["method", "mode", "T", *arrows], rows),
        "",
        "## Relative or absolute temperature?",
        "",
        *relative_verdict(run),
        "",
    ])


def temperature_figure(run: Curves) -> go.Figure:
    s, metrics = run.settings, list(run.settings.curve_metrics)
    ncols = (len(metrics) + 1) // 2
    fig = make_subplots(rows=2, cols=ncols,
                        subplot_titles=[m + (" ↑" if _direction(m) else " ↓") for m in metrics])
    series = (("sigmoid", "absolute", s.curve_temperatures, "#d62728"),
              ("normal_cdf", "absolute", s.curve_temperatures, "#2ca02c"),
              ("sigmoid", "relative", s.relative_temperatures, "#9467bd"))
    for index, metric in enumerate(metrics):
        row, col = index // ncols + 1, index % ncols + 1
        for gate, mode, temperatures, colour in series:
            stats = [_stats(run.results[ev.pullback_name(t, gate, mode)][metric])
                     for t in temperatures]
            fig.add_trace(go.Scatter(
                x=list(temperatures), y=[v for v, _ in stats], mode="lines+markers",
                name=f"{gate} {mode}", legendgroup=f"{gate} {mode}", showlegend=index == 0,
                line={"color": colour},
                error_y={"type": "data", "array": [0 if math.isnan(e) else e
                                                   for _, e in stats]}), row=row, col=col)
        for reference, dash in (("gradient", "dash"), (CONTROL, "dot")):
            if reference in run.results:
                fig.add_hline(y=_stats(run.results[reference][metric])[0], line_dash=dash,
                              annotation_text=reference, row=row, col=col)
        fig.update_xaxes(type="log", title_text="T", row=row, col=col)
    fig.update_layout(title="Excitation pullback on EfficientNet-Lite0: metrics over T "
                      "(mean ± s.e. over the photos)", height=900, width=1800)
    return fig


def write_curve_reports(out_dir: Path, settings: Settings, note: str) -> Curves:
    rows = ev.read_rows(out_dir / "temperature_curves.csv")
    run = Curves.from_rows(rows, settings, note)
    (out_dir / "temperature_curves.md").write_text(temperature_markdown(run), encoding="utf-8")
    # plotly.js embedded: the page works offline.
    html = temperature_figure(run).to_html(full_html=True, include_plotlyjs=True)
    (out_dir / "temperature_curves.html").write_text(html, encoding="utf-8")
    return run


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> Curves:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild temperature_curves.md/.html from temperature_curves.csv")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's). On a machine that other "
                        "jobs share, 1 avoids threads spinning while they wait for a core")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    settings = QUICK if args.quick else FULL
    out_dir = args.out_dir.resolve()
    note_path = out_dir / "quality_run.json"
    if args.report_only:
        note = json.loads(note_path.read_text(encoding="utf-8"))["note"]
        return write_curve_reports(out_dir, settings, note)
    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        with tempfile.TemporaryDirectory() as workdir:
            write_photos(Path(workdir) / "photos", settings.photos)
            command = run_table(settings, Path(workdir), out_dir, args.threads)
            table_seconds = time.perf_counter() - began
            run_curves(settings, Path(workdir), out_dir)
    finally:
        torch.set_num_threads(threads)
    load = os.getloadavg()[2] if hasattr(os, "getloadavg") else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"{args.threads or threads} CPU thread(s) ({platform.machine()})"
    note = (f"Quality table: `{command}` ({table_seconds / 60:.1f} min); curves "
            f"{(time.perf_counter() - began - table_seconds) / 60:.1f} min; on {device}"
            + ("" if load is None else f", 15-min load average {load:.1f} at the end")
            + f"; torch {torch.__version__}.")
    note_path.write_text(json.dumps({"note": note}, indent=1), encoding="utf-8")
    run = write_curve_reports(out_dir, settings, note)
    print(note)
    return run


if __name__ == "__main__":
    main()
