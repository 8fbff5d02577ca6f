"""The quality table: how faithful is the excitation pullback, and what does it cost?

    python benchmarks/quality.py             # full run, 10-16 min on 2 CPU cores
    python benchmarks/quality.py --quick     # tiny settings, well under a minute (CI smoke test)
    python benchmarks/quality.py --out-dir /tmp/results --threads 1
    python benchmarks/quality.py --from-json benchmarks/results/quality_raw.json  # re-render

EfficientNet-Lite0 with its real ImageNet weights (offline, from a pip package), on 8 photos
that ship with packages, never fetched: scikit-image's 5 samples (pw.SAMPLE_IMAGES),
scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg. Every photo is
explained for its own predicted class. Needs the ``dev`` and ``compare`` extras (scikit-learn,
matplotlib, Captum).

Writes to the output directory (default benchmarks/results):

- ``quality.md`` / ``quality.html``: methods x metrics (deletion and insertion AUC with blur
  and mean baselines, infidelity at two noise levels, ascent gain, Spearman correlation after
  full parameter randomisation, seconds per image), and the randomisation cascade per stage.
- ``temperature_curves.md`` / ``.html``: the metrics of the pullback over T, log-spaced
  0.03 -> 10, for both gates, and relative versus absolute temperature, with a recommendation.
- ``quality_raw.json``: every metric per photo, the settings and the predictions, from which
  ``--from-json`` rebuilds the four reports without recomputing.

The settings used are written into every output. The HTML files embed plotly.js (no CDN).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

import pullback_widgets as pw
from pullback_widgets import evaluation as ev
from pullback_widgets.model_helpers import predict

PACKAGED_PHOTOS = ("china", "flower", "grace_hopper")
CONTROL = "random"  # the registry's control

# The cascade for Lite0, coarser than one stage per block so the run fits its time budget.
LITE0_STAGES = (("classifier",), ("conv_head", "bn2"), ("blocks.6",), ("blocks.5", "blocks.4"),
                ("blocks.3", "blocks.2", "blocks.1"), ("blocks.0", "bn1", "conv_stem"))


@dataclass(frozen=True)
class Settings:
    """Everything that sets the cost and the noise of a run; recorded in every output."""

    size: int = 224                       # photo side, pixels
    photos: tuple[str, ...] = (*pw.SAMPLE_IMAGES, *PACKAGED_PHOTOS)
    steps: int = 12                       # deletion / insertion chunks
    perturbations: int = 16               # infidelity draws per noise level
    noise_stds: tuple[float, ...] = (0.01, 0.1)   # infidelity noise, pixel units
    ascent_steps: int = 5                 # step 10, eps 50 ([0, 1] units), as pw.pullback_ascent
    batch_size: int = 16
    region_sigma: float = 8.0             # px, the blur of |attribution| for "regions" ranking
    table_temperatures: tuple[float, ...] = (0.1, 0.3, 1.0)
    curve_temperatures: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    relative_temperatures: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    ig_steps: int = 16
    smoothgrad_samples: int = 8
    stages: tuple[tuple[str, ...], ...] = LITE0_STAGES
    # Integrated Gradients and SmoothGrad cost 8-16 gradients each; the cascade skips them.
    # The random control draws the same noise before and after, so its ρ would be 1.
    skip_in_randomisation: tuple[str, ...] = ("integrated_gradients", "smoothgrad", CONTROL)
    timing_photos: int = 2                # cost: median of interleaved repeats on these
    timing_repeats: int = 3


FULL = Settings()
QUICK = Settings(size=64, photos=("chelsea", "coffee"), steps=3, perturbations=3,
                 ascent_steps=1, table_temperatures=(0.3,), curve_temperatures=(0.1, 1.0),
                 relative_temperatures=(0.3, 1.0), ig_steps=2, smoothgrad_samples=2,
                 stages=(("classifier",), ("conv_head", "bn2")), timing_photos=1,
                 timing_repeats=1)

REGIONS = "blur, regions"  # deletion/insertion ranked by the blurred magnitude


def _infidelity_key(std: float) -> str:
    return f"infidelity σ={std:g}"


# --------------------------------------------------------------------------- data

def load_photos(names: Sequence[str], size: int) -> Tensor:
    """The named photos as one batch (N, 3, size, size) in [0, 1]."""
    images = []
    for name in names:
        if name in pw.SAMPLE_IMAGES:
            images.append(pw.sample_image(name, size=size))
        elif name in ("china", "flower"):
            from sklearn.datasets import load_sample_image  # the dev extra

            images.append(pw.load_image(load_sample_image(f"{name}.jpg"), size=size))
        elif name == "grace_hopper":
            from matplotlib.cbook import get_sample_data

            images.append(pw.load_image(get_sample_data("grace_hopper.jpg", asfileobj=False),
                                        size=size))
        else:
            raise ValueError(f"unknown photo {name!r}")
    return torch.cat(images)


# --------------------------------------------------------------------------- measuring

def measure(model, x: Tensor, classes: Tensor, explain: ev.Explainer, settings: Settings,
            *, mean_baseline: bool) -> dict[str, Tensor]:
    """Every metric of one method, per photo: name -> (N,)."""
    attribution = explain(model, x, classes)
    common = {"steps": settings.steps, "batch_size": settings.batch_size}
    variants = [("blur", None, "blur"), ("blur", settings.region_sigma, REGIONS)]
    if mean_baseline:
        variants.insert(1, ("mean", None, "mean"))
    out = {}
    for baseline, smooth, label in variants:
        out[f"deletion ({label})"] = ev.deletion_auc(model, x, classes, attribution,
                                                     baseline=baseline, smooth=smooth, **common)
        out[f"insertion ({label})"] = ev.insertion_auc(model, x, classes, attribution,
                                                       baseline=baseline, smooth=smooth, **common)
    for std in settings.noise_stds:
        out[_infidelity_key(std)] = ev.infidelity(
            model, x, classes, attribution, n_perturbations=settings.perturbations,
            noise_std=std, batch_size=settings.batch_size)
    out["ascent gain"] = ev.ascent_gain(model, x, classes, explain, steps=settings.ascent_steps)
    return out


def seconds_per_image(model, x: Tensor, classes: Tensor, methods: dict[str, ev.Explainer],
                      repeats: int) -> dict[str, float]:
    """Median wall time of each method's attribution per image, after a warm-up call; the
    methods interleaved, so that noise from other jobs on the machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for explain in methods.values():
        explain(model, x, classes)
    for _ in range(repeats):
        for name, explain in methods.items():
            start = time.perf_counter()
            explain(model, x, classes)
            times[name].append((time.perf_counter() - start) / x.shape[0])
    return {name: statistics.median(values) for name, values in times.items()}


def _direction(metric: str) -> bool:
    """True where higher is better: insertion and ascent gain; the rest lower."""
    return metric.startswith("insertion") or metric == "ascent gain"


def _stats(values: Tensor) -> tuple[float, float]:
    values = values.double()
    values = values[~values.isnan()]
    if values.numel() == 0:
        return math.nan, math.nan
    se = float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else math.nan
    return float(values.mean()), se


def _cell(values: Tensor | None, digits: int = 3) -> str:
    if values is None:
        return "—"
    mean, se = _stats(values)
    return f"{mean:.{digits}g} ±{se:.1g}" if math.isfinite(se) else f"{mean:.{digits}g}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _settings_text(run: Run) -> str:
    fields = ", ".join(f"{f.name}={getattr(run.settings, f.name)!r}"
                       for f in dataclasses.fields(run.settings))
    load = "" if run.load_average is None else \
        f", 15-min load average {run.load_average:.1f} at the end"
    return (f"Settings: {fields}. Blur baseline: Gaussian, kernel {ev.BLUR_KERNEL} px, sigma "
            f"{ev.BLUR_SIGMA:g} px. Wall time {run.seconds / 60:.1f} min on "
            f"{run.threads} CPU thread(s) ({platform.machine()}{load}), "
            f"torch {torch.__version__}.")


# --------------------------------------------------------------------------- the run

@dataclass
class Run:
    settings: Settings
    photos: list[str]
    predictions: list[tuple[str, float]]
    results: dict[str, dict[str, Tensor]]
    table_methods: list[str]
    randomisation: ev.RandomisationResult
    guided_as_is_gap: float | None
    default_temperature: float
    seconds: float = 0.0
    load_average: float | None = None  # 15-min, at the end; above the thread count = shared CPU
    threads: int | None = None

    def to_json(self) -> str:
        """Everything the reports need, per photo, as JSON."""
        r = self.randomisation
        return json.dumps({
            "settings": dataclasses.asdict(self.settings), "photos": self.photos,
            "predictions": self.predictions, "table_methods": self.table_methods,
            "results": {m: {k: v.tolist() for k, v in d.items()} for m, d in self.results.items()},
            "randomisation": {"stages": r.stages, "methods": r.methods,
                              "absolute": r.absolute.tolist(), "signed": r.signed.tolist()},
            "guided_as_is_gap": self.guided_as_is_gap,
            "default_temperature": self.default_temperature, "seconds": self.seconds,
            "load_average": self.load_average, "threads": self.threads,
        }, indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Run:
        data = json.loads(text)

        def tuples(value):
            return tuple(tuples(v) for v in value) if isinstance(value, list) else value

        r = data["randomisation"]
        return cls(
            Settings(**{k: tuples(v) for k, v in data["settings"].items()}), data["photos"],
            [tuple(p) for p in data["predictions"]],
            {m: {k: torch.tensor(v) for k, v in d.items()} for m, d in data["results"].items()},
            data["table_methods"],
            ev.RandomisationResult(r["stages"], r["methods"], torch.tensor(r["absolute"]),
                                   torch.tensor(r["signed"])),
            data["guided_as_is_gap"], data["default_temperature"], data["seconds"],
            data.get("load_average"), data.get("threads"))


def run(settings: Settings, progress=print) -> Run:
    began = time.perf_counter()
    model = pw.load_model("efficientnet_lite0")
    x = load_photos(settings.photos, settings.size)
    probabilities = predict(model, x).softmax(1)
    classes = probabilities.argmax(1)
    predictions = [(model.labels[int(c)], float(probabilities[i, c]))
                   for i, c in enumerate(classes)]
    default = float(model.default_temperature)

    table = ev.method_registry(model, temperatures=settings.table_temperatures,
                               cam_layer="bn2", ig_steps=settings.ig_steps,
                               smoothgrad_samples=settings.smoothgrad_samples,
                               batch_size=settings.batch_size)
    as_is = table.pop("guided_backprop_captum", None)
    # The model's own default (sigmoid) and the paper's normal_cdf T = 0.6 join the grid.
    extra = {ev.pullback_name(default): ev.pullback_method(default),
             ev.pullback_name(0.6, "normal_cdf"): ev.pullback_method(0.6, "normal_cdf")}
    for t in (0.3, 1.0):  # the relative temperatures a first look singled out
        extra[ev.pullback_name(t, "sigmoid", "relative")] = \
            ev.pullback_method(t, "sigmoid", "relative")
    table = {**{k: v for k, v in extra.items() if k not in table}, **table}
    table = dict(sorted(table.items(), key=lambda kv: (not kv[0].startswith("pullback"),
                                                       kv[0])))
    table[CONTROL] = table.pop(CONTROL)  # last
    curves = {}
    for gate in ("sigmoid", "normal_cdf"):
        for t in settings.curve_temperatures:
            curves[ev.pullback_name(t, gate)] = ev.pullback_method(t, gate)
    for t in settings.relative_temperatures:
        curves[ev.pullback_name(t, "sigmoid", "relative")] = \
            ev.pullback_method(t, "sigmoid", "relative")

    results: dict[str, dict[str, Tensor]] = {}
    for name, explain in {**table, **curves}.items():
        tick = time.perf_counter()
        results[name] = measure(model, x, classes, explain, settings,
                                mean_baseline=name in table)
        progress(f"{name}: {time.perf_counter() - tick:.0f} s "
                 f"(total {time.perf_counter() - began:.0f} s)")

    # The all-zero attribution explains none of the logit change: its infidelity is the
    # mean squared change itself, the scale that every method's infidelity is read against.
    zero = torch.zeros_like(x)
    results["all-zero (reference)"] = {_infidelity_key(std): ev.infidelity(
        model, x, classes, zero, n_perturbations=settings.perturbations, noise_std=std,
        batch_size=settings.batch_size) for std in settings.noise_stds}
    timed = seconds_per_image(model, x[:settings.timing_photos], classes[:settings.timing_photos],
                              table, settings.timing_repeats)
    for name, seconds in timed.items():
        results[name]["s / image"] = torch.tensor([seconds])
    progress(f"timing: done (total {time.perf_counter() - began:.0f} s)")
    gap = None
    if as_is is not None:
        gap = float((as_is(model, x, classes) - ev.gradient(model, x, classes)).abs().max())
    randomised = {k: v for k, v in table.items() if k not in settings.skip_in_randomisation}
    tick = time.perf_counter()
    randomisation = ev.randomisation_check(model, x, classes, randomised,
                                           stages=settings.stages)
    progress(f"randomisation: {time.perf_counter() - tick:.0f} s")
    for index, name in enumerate(randomisation.methods):
        results[name]["randomised ρ"] = randomisation.absolute[-1, index]
    load = os.getloadavg()[2] if hasattr(os, "getloadavg") else None
    return Run(settings, list(settings.photos), predictions, results, list(table),
               randomisation, gap, default, time.perf_counter() - began, load,
               torch.get_num_threads())


# --------------------------------------------------------------------------- quality report

def _metric_columns(settings: Settings) -> list[str]:
    return ["deletion (blur)", "insertion (blur)", "deletion (mean)", "insertion (mean)",
            f"deletion ({REGIONS})", f"insertion ({REGIONS})",
            *(_infidelity_key(s) for s in settings.noise_stds), "ascent gain",
            "randomised ρ", "s / image"]


def _best(run: Run, methods: Sequence[str], metric: str) -> str:
    scored = [(_stats(run.results[m][metric])[0], m) for m in methods
              if metric in run.results[m]]
    if metric == "randomised ρ":  # the ideal is no correlation, not a negative one
        scored = [(abs(v), m) for v, m in scored]
    scored = [(v, m) for v, m in scored if math.isfinite(v)]
    return (max if _direction(metric) else min)(scored)[1] if scored else "—"


def _zero_reference(run: Run) -> str:
    """How much of the logit change the best method explains, against the all-zero one."""
    zero = run.results.get("all-zero (reference)")
    if zero is None:
        return ""
    parts = []
    for std in run.settings.noise_stds:
        key = _infidelity_key(std)
        best = _best(run, [m for m in run.table_methods if m != CONTROL], key)
        share = 1 - _stats(run.results[best][key])[0] / _stats(zero[key])[0]
        parts.append(f"σ={std:g}: all-zero {_stats(zero[key])[0]:.3g}, best method ({best}) "
                     f"explains {100 * share:.0f}% of the mean squared logit change")
    return ("- Infidelity is read against the all-zero attribution, which explains nothing "
            "(its normalised infidelity is the mean squared logit change): "
            + "; ".join(parts) + f". With {run.settings.perturbations} draws the fitted scale "
            f"lets even a random attribution explain about 1/{run.settings.perturbations} "
            f"({100 / run.settings.perturbations:.0f}%) by chance.")


def _against_control(run: Run, columns: Sequence[str]) -> str:
    """Which methods beat the random control clearly: paired difference beyond 2 s.e."""
    control = run.results.get(CONTROL)
    if control is None:
        return ""
    parts = []
    for metric in columns:
        if metric not in control:
            continue
        winners = []
        for name in run.table_methods:
            if name == CONTROL or metric not in run.results[name]:
                continue
            mean, se = _stats(run.results[name][metric] - control[metric])
            if math.isfinite(se) and abs(mean) > 2 * se and (mean > 0) == _direction(metric):
                winners.append(name)
        parts.append(f"{metric}: {', '.join(winners) or 'none'}")
    return ("- Clearly better than the random control (paired per-photo difference beyond "
            "2 s.e.) — " + "; ".join(parts) + ".")


def quality_markdown(run: Run) -> str:
    s, columns = run.settings, _metric_columns(run.settings)
    arrows = [c + (" ↑" if _direction(c) else " ↓") for c in columns]
    gradient_seconds = _stats(run.results["gradient"]["s / image"])[0]
    rows = []
    for name in run.table_methods:
        r = run.results[name]
        ratio = _stats(r["s / image"])[0] / gradient_seconds
        rows.append([name, *(_cell(r.get(c)) for c in columns[:-1]),
                     f"{_stats(r['s / image'])[0]:.3g} ({ratio:.2g}× gradient)"])
    control = run.results.get(CONTROL, {})
    photos = ", ".join(f"{n} → {label} ({p:.2f})"
                       for n, (label, p) in zip(run.photos, run.predictions))
    pullbacks = [m for m in run.table_methods if m.startswith("pullback")]
    others = [m for m in run.table_methods if not m.startswith("pullback") and m != CONTROL]
    best_lines = [f"- {c}: best overall **{_best(run, pullbacks + others, c)}**; best pullback "
                  f"{_best(run, pullbacks, c)}; best other method {_best(run, others, c)}"
                  + (f"; random control {_cell(control[c])}." if c in control else ".")
                  for c in columns[:-1]]
    gap = ("not measured (Captum not installed)" if run.guided_as_is_gap is None else
           f"max |Captum GBP − gradient| = {run.guided_as_is_gap:.3g} over all photos")
    return "\n".join([
        "# Attribution quality on EfficientNet-Lite0",
        "",
        "Generated by `python benchmarks/quality.py` (see its docstring). "
        + _settings_text(run),
        "",
        f"Photos (each explained for its predicted class, softmax probability): {photos}.",
        "",
        "Mean over the photos ± standard error. ↑ higher is better, ↓ lower is better. "
        "Deletion/insertion: area under the target-probability curve (RISE), "
        f"{s.steps} steps, pixels ranked by the channel-summed attribution; ({REGIONS}): "
        f"ranked by its magnitude blurred with a Gaussian of {s.region_sigma:g} px, which asks "
        "whether the regions are right rather than the single pixels. Infidelity: Captum's, "
        "attribution optimally rescaled "
        f"(`normalize=True`), {s.perturbations} Gaussian draws of the given std (pixel units), "
        "f = target logit, so logit². Ascent gain: target-logit gain after "
        f"{s.ascent_steps} normalised steps of 10 (L2, eps 50) along the attribution. "
        "Randomised ρ: Spearman correlation of |attribution| (channel sum) with the original "
        "after the last stage of the cascade below (every layer, in the full run); near 0 "
        "means the method depends on the weights (it passes the sanity check). s / image: "
        f"median of {s.timing_repeats} interleaved timings of one batched call on "
        f"{s.timing_photos} photo(s), after a warm-up; wall time, so it depends on the machine "
        f"and its load: compare the ratios. `{CONTROL}`: standard normal noise as attribution; "
        "a method that does not beat it on a metric shows nothing on that metric.",
        "",
        _md_table(["method", *arrows], rows),
        "",
        "## Best per column",
        "",
        *best_lines,
        "",
        "## Notes",
        "",
        _against_control(run, columns[:-2]),
        _zero_reference(run),
        "- Captum's Guided Backprop overrides the backward of `nn.ReLU` modules only (an "
        "`isinstance` test). Lite0's activations are `nn.ReLU6`, which it leaves alone, so on "
        f"Lite0 Captum's GBP as is *is the plain gradient* ({gap}); its row would repeat the "
        "gradient's. The `guided backprop` and `guided grad-cam` rows run Captum on a copy of "
        "the model whose ReLU6 modules are an `nn.ReLU` subclass with ReLU6's forward, so "
        "Captum's hook applies guided backprop's rule to them.",
        "- Integrated gradients: black baseline, "
        f"{s.ig_steps} steps. SmoothGrad: {s.smoothgrad_samples} samples, noise std 0.15, "
        "signed gradients. Guided Grad-CAM: layer `bn2` (conv_head after BN + ReLU6), "
        "bilinear upsampling. Not in the randomisation: "
        f"{', '.join(s.skip_in_randomisation) or 'none'} (integrated gradients and smoothgrad "
        "for their cost; the random control ignores the model).",
        "- These machines cannot reproduce the follow-up paper's ResNet-50 ImageNet-val "
        "numbers (infidelity 5.38 for pullback ascent vs 83.3 for the gradient): ResNet-50's "
        "weights cannot be downloaded here, and 8 photos are not the validation set. The "
        "numbers above are Lite0's, on these photos only.",
        "",
        "## Parameter randomisation (cascading, top layer first)",
        "",
        "Spearman ρ of |attribution.sum(channels)| with the original, mean over the photos:",
        "",
        run.randomisation.table(),
        "",
        "Signed attribution.sum(channels):",
        "",
        run.randomisation.table(signed=True),
        "",
    ])


def quality_figures(run: Run) -> list[go.Figure]:
    columns = _metric_columns(run.settings)
    ncols = (len(columns) + 1) // 2
    fig = make_subplots(rows=2, cols=ncols,
                        subplot_titles=[c + (" ↑" if _direction(c) else " ↓") for c in columns])
    for index, metric in enumerate(columns):
        names = [m for m in run.table_methods if metric in run.results[m]]
        stats = [_stats(run.results[m][metric]) for m in names]
        fig.add_trace(go.Bar(
            x=[v for v, _ in stats], y=names, orientation="h", showlegend=False,
            error_x={"type": "data", "array": [0.0 if math.isnan(e) else e for _, e in stats]},
            marker_color=["#d62728" if m.startswith("pullback") else "#1f77b4" for m in names]),
            row=index // ncols + 1, col=index % ncols + 1)
    fig.update_layout(title="Attribution quality on EfficientNet-Lite0 (red: pullbacks)",
                      height=1100, width=1900)
    rand = go.Figure()
    values = run.randomisation.absolute.nanmean(dim=2)
    for index, name in enumerate(run.randomisation.methods):
        rand.add_trace(go.Scatter(x=run.randomisation.stages, y=values[:, index].tolist(),
                                  mode="lines+markers", name=name))
    rand.update_layout(title="Cascading parameter randomisation: Spearman ρ of |attribution|",
                       xaxis_title="randomised down to", yaxis_title="Spearman ρ",
                       height=600, width=1200)
    return [fig, rand]


# --------------------------------------------------------------------------- temperature report

def _curve_metrics(settings: Settings) -> list[str]:
    return ["deletion (blur)", "insertion (blur)", f"deletion ({REGIONS})",
            f"insertion ({REGIONS})",
            *(_infidelity_key(s) for s in settings.noise_stds), "ascent gain"]


def _paired(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Mean and standard error of the per-photo difference a − b."""
    return _stats(a - b)


def relative_verdict(run: Run) -> list[str]:
    """Relative vs absolute temperature, with the rule that decides the recommendation.

    A relative T is recommended over the model's default (absolute) T only if, in paired
    per-photo differences, it is clearly better (by more than two standard errors) on at least
    one metric, clearly worse on none, and no worse on average in the ascent gain.
    """
    s, metrics = run.settings, _curve_metrics(run.settings)
    default = run.results[ev.pullback_name(run.default_temperature)]
    lines = [f"Paired per-photo differences, relative sigmoid T minus the default absolute "
             f"sigmoid T={run.default_temperature:g} (mean ± s.e.; ✓ clearly better, ✗ "
             "clearly worse: by more than 2 s.e.; unmarked: within the noise of "
             f"{len(run.photos)} photos):", ""]
    rows, candidates = [], []
    for t in s.relative_temperatures:
        rel = run.results[ev.pullback_name(t, "sigmoid", "relative")]
        cells, better, worse = [], 0, 0
        for metric in metrics:
            mean, se = _paired(rel[metric], default[metric])
            clear = math.isfinite(se) and abs(mean) > 2 * se
            good = (mean > 0) == _direction(metric)
            better, worse = better + (clear and good), worse + (clear and not good)
            mark = (" ✓" if good else " ✗") if clear else ""
            cells.append(f"{mean:+.3g} ±{se:.1g}{mark}")
        ascent = _paired(rel["ascent gain"], default["ascent gain"])[0]
        if worse == 0:
            candidates.append((better, ascent, t))
        rows.append([f"relative T={t:g}", *cells])
    lines += [_md_table(["", *metrics], rows), ""]
    same = [(t, m) for t in s.relative_temperatures if t in s.curve_temperatures
            for m in metrics]
    wins = sum(
        (_stats(run.results[ev.pullback_name(t, "sigmoid", "relative")][m])[0]
         > _stats(run.results[ev.pullback_name(t)][m])[0]) == _direction(m) for t, m in same)
    if same:
        lines += [f"At equal T, relative has the better mean on {wins} of {len(same)} "
                  "(T, metric) pairs.", ""]
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
        if candidates:
            _, ascent, t = max(candidates, key=lambda c: c[1])
            lines.append(f"The closest contender is relative T = {t:g}: no metric clearly "
                         f"different, ascent gain {ascent:+.3g} on average. It is a "
                         "reasonable alternative, not a measured improvement.")
    lines.append("")
    lines.append("Rule: " + " ".join(relative_verdict.__doc__.split("\n\n")[1].split()))
    return lines


def temperature_markdown(run: Run) -> str:
    s, metrics = run.settings, _curve_metrics(run.settings)
    arrows = [m + (" ↑" if _direction(m) else " ↓") for m in metrics]
    rows = [["gradient", "—", "—", *(_cell(run.results["gradient"][m]) for m in metrics)]]
    for gate, mode, temperatures in (("sigmoid", "absolute", s.curve_temperatures),
                                     ("normal_cdf", "absolute", s.curve_temperatures),
                                     ("sigmoid", "relative", s.relative_temperatures)):
        for t in temperatures:
            r = run.results[ev.pullback_name(t, gate, mode)]
            rows.append([f"pullback {gate}", mode, f"{t:g}", *(_cell(r[m]) for m in metrics)])
    return "\n".join([
        "# Pullback metrics over the temperature (EfficientNet-Lite0)",
        "",
        "Generated by `python benchmarks/quality.py`. " + _settings_text(run),
        "",
        "Mean over the photos ± standard error; metrics as in quality.md. `relative`: T times "
        "the per-example standard deviation of each gated op's pre-activations.",
        "",
        _md_table(["method", "mode", "T", *arrows], rows),
        "",
        "## Relative or absolute temperature?",
        "",
        *relative_verdict(run),
        "",
    ])


def temperature_figure(run: Run) -> go.Figure:
    s, metrics = run.settings, _curve_metrics(run.settings)
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


def _html(title: str, figures: Sequence[go.Figure]) -> str:
    # plotly.js embedded once, in the first figure: the page works offline.
    parts = [fig.to_html(full_html=False, include_plotlyjs=index == 0)
             for index, fig in enumerate(figures)]
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"</head><body>\n{''.join(parts)}\n</body></html>\n")


def write_reports(run: Run, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        "quality.md": quality_markdown(run),
        "quality.html": _html("Attribution quality", quality_figures(run)),
        "temperature_curves.md": temperature_markdown(run),
        "temperature_curves.html": _html("Pullback metrics over T", [temperature_figure(run)]),
        "quality_raw.json": run.to_json(),
    }
    paths = []
    for name, text in outputs.items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> Run:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--from-json", type=Path, default=None,
                        help="rebuild the reports from a quality_raw.json, computing nothing")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's). On a machine that other "
                        "jobs share, 1 avoids threads spinning while they wait for a core")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.from_json is not None:
        result = Run.from_json(args.from_json.read_text(encoding="utf-8"))
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads or threads)
        try:
            result = run(QUICK if args.quick else FULL)
        finally:
            torch.set_num_threads(threads)
    for path in write_reports(result, args.out_dir):
        print("wrote", path)
    return result


if __name__ == "__main__":
    main()
