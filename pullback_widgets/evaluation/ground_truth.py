"""Ground truth: score attribution methods against the known evidence of synthetic shapes.

On :func:`pullback_widgets.synthetic.make_dataset` images the class is decided by one object,
and its mask says where the evidence is. Each method explains the *true* class of each image;
what is scored is the map the explorer's magnitude view shows, ``|attribution.sum(1)|``
(B, H, W), so the benchmark judges exactly what a user sees.

Metrics, one value per image (B,):

- :func:`mask_mass`: the fraction of the map's total that lies on the object, in [0, 1]
  (an all-zero map scores 0: it points nowhere). A map spread evenly scores the object's area
  fraction.
- :func:`pointing_game` (Zhang et al. 2016): 1 if the maximum of the map blurred by a Gaussian
  of ``sigma`` pixels (:func:`~pullback_widgets.evaluation.ranking_map`) lies on the object,
  else 0; ties go to the first maximum in raster order, an all-zero map scores 0.
- :func:`mask_auc`: the ROC AUC of the map as a score that separates object pixels from the
  rest, ties counted half (the Mann-Whitney U statistic divided by n_object · n_background);
  0.5 is chance.

:func:`ground_truth_benchmark` runs methods (the adapters of
:func:`~pullback_widgets.evaluation.method_registry`, which include the random control, plus
Grad-CAM) over n images and returns a :class:`GroundTruthResult`: means with 95% intervals,
and paired differences against a reference method.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import synthetic
from ..model_helpers import evaluation_mode, predict
from ..validation import (
    PullbackWidgetsError,
    PullbackWidgetsTypeError,
    check_choice,
    check_index,
    check_model,
    check_positive,
    suggest,
)
from .methods import (
    check_classes,
    explained_inputs,
    method_registry,
    pullback_method,
    pullback_name,
)
from .metrics import Explainer, _average_ranks, ranking_map

__all__ = [
    "MASK_METRICS",
    "METRICS",
    "GroundTruthResult",
    "Interval",
    "grad_cam",
    "ground_truth_benchmark",
    "ground_truth_methods",
    "mask_auc",
    "mask_mass",
    "pointing_game",
    "temperature_curve_methods",
]

METRICS = ("mass", "pointing", "mask_auc")
METRIC_TITLES = {"mass": "mass inside the mask", "pointing": "pointing game",
                 "mask_auc": "mask ROC AUC"}
# The pointing game's blur: about a quarter of the smallest object's radius (9 px at 64 px),
# so that one stray pixel cannot outvote a region.
POINTING_SIGMA = 2.0
# Two-sided 95% quantile of the normal distribution, for Wilson's interval.
Z95 = 1.959964
TABLE_TEMPERATURES = (0.1, 0.3, 1.0)
CURVE_TEMPERATURES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
GATES = ("sigmoid", "normal_cdf")


# --------------------------------------------------------------------------- metrics


def _check_pair(attribution: object, masks: object) -> tuple[Tensor, Tensor]:
    if not isinstance(attribution, Tensor) or not isinstance(masks, Tensor):
        raise PullbackWidgetsTypeError("attribution and masks must be torch.Tensors")
    if attribution.dim() != 4 or masks.shape != (attribution.shape[0], *attribution.shape[2:]):
        raise PullbackWidgetsError(
            f"attribution must be (B, C, H, W) and masks (B, H, W) of the same B, H, W; got "
            f"{tuple(attribution.shape)} and {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        raise PullbackWidgetsTypeError(f"masks must be bool, got {masks.dtype}")
    if attribution.is_complex():
        raise PullbackWidgetsTypeError(f"attribution must be real, got {attribution.dtype}")
    if attribution.is_meta or masks.is_meta:
        raise PullbackWidgetsError("attribution and masks must hold values, not be on the meta "
                                   "device")
    if attribution.shape[0] == 0:
        raise PullbackWidgetsError("attribution and masks must hold at least one image")
    if not torch.isfinite(attribution).all():
        raise PullbackWidgetsError("attribution contains NaN or infinite values")
    inside = masks.flatten(1).sum(1)
    if ((inside == 0) | (inside == masks[0].numel())).any():
        raise PullbackWidgetsError("every mask needs object and background pixels")
    return attribution.detach(), masks.to(attribution.device)


def _saliency(attribution: Tensor) -> Tensor:
    """|attribution summed over channels|, (B, H, W), summed in float64 (a float32 sum of
    values near its largest overflows). An example whose sums (over channels, then pixels)
    could overflow even so is divided by its largest |value| first: the metrics reading this
    are scale-free."""
    values = attribution.double()
    largest = values.abs().flatten(1).amax(1)
    limit = torch.finfo(torch.float64).max / (2 * values[0].numel())
    scale = torch.where(largest > limit, largest, 1.0)
    return (values / scale.view(-1, *([1] * (values.dim() - 1)))).sum(1).abs()


def mask_mass(attribution: Tensor, masks: Tensor) -> Tensor:
    """Fraction of ``|attribution.sum(1)|`` on the mask, (B,) float64 in [0, 1].

    ``attribution`` (B, C, H, W), ``masks`` bool (B, H, W).
    """
    attribution, masks = _check_pair(attribution, masks)
    saliency = _saliency(attribution)
    total = saliency.flatten(1).sum(1)
    inside = (saliency * masks).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), 0.0)


def pointing_game(attribution: Tensor, masks: Tensor, *, sigma: float = POINTING_SIGMA
                  ) -> Tensor:
    """1.0 where the maximum of the blurred ``|attribution.sum(1)|`` is on the mask, else 0.0;
    (B,) float64. ``sigma`` in pixels."""
    attribution, masks = _check_pair(attribution, masks)
    sigma = check_positive(sigma, "sigma")
    # The map the user sees, each divided by its largest value: where the maximum lies does
    # not depend on the scale, and the blur can then neither overflow nor underflow.
    saliency = _saliency(attribution)
    largest = saliency.flatten(1).amax(1)
    saliency = saliency / torch.where(largest > 0, largest, 1.0).view(-1, 1, 1)
    blurred = ranking_map(saliency.unsqueeze(1), smooth=sigma)
    peak = blurred.flatten(1).argmax(1)
    hit = masks.flatten(1).gather(1, peak.view(-1, 1)).squeeze(1)
    # A map that is zero everywhere (its channels may cancel) points nowhere.
    return (hit & (largest > 0)).double()


def mask_auc(attribution: Tensor, masks: Tensor) -> Tensor:
    """ROC AUC of ``|attribution.sum(1)|`` for object vs background pixels, (B,) float64 in
    [0, 1], ties counted half (0.5 = chance)."""
    attribution, masks = _check_pair(attribution, masks)
    ranks = _average_ranks(_saliency(attribution).flatten(1))
    positive = masks.flatten(1)
    n_pos = positive.sum(1).double()
    n_neg = positive.shape[1] - n_pos
    rank_sum = (ranks * positive).sum(1)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


# Metric name -> function(attribution (B, C, H, W), masks bool (B, H, W)) -> (B,).
MASK_METRICS = {"mass": mask_mass, "pointing": pointing_game, "mask_auc": mask_auc}


# --------------------------------------------------------------------------- methods


def _cam_layer(model: nn.Module, layer: str | None) -> str:
    """``layer`` if it names a module of ``model``; None: the model's last Conv2d."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if layer is None:
        if not names:
            raise PullbackWidgetsError("Grad-CAM needs a Conv2d layer and the model has none; "
                                       "pass cam_layer")
        return names[-1]
    if not isinstance(layer, str):
        raise PullbackWidgetsTypeError(f"cam_layer must be a module's name (a str), got "
                                       f"{type(layer).__name__}")
    modules = [name for name, _ in model.named_modules()]
    if layer not in modules:
        raise PullbackWidgetsError(f"cam_layer {layer!r} is not a module of the model"
                                   f"{suggest(layer, modules)}")
    return layer


def _grad_cam(model: nn.Module, x: Tensor, target: Tensor, *, layer: str) -> Tensor:
    # One class per image: a single class for a batch was the first image's only (gather).
    x, target = explained_inputs(x, target)
    modules = dict(model.named_modules())
    activations: list[Tensor] = []
    handle = modules[_cam_layer(model, layer)].register_forward_hook(
        lambda m, a, out: activations.append(out))
    try:
        with evaluation_mode(model), torch.enable_grad():
            # An input that needs its gradient, so that the activations have one even when
            # the model's parameters are frozen (requires_grad False).
            logits = model(x.detach().requires_grad_())
            if not activations or not isinstance(activations[0], Tensor) \
                    or activations[0].dim() != 4:
                raise PullbackWidgetsError(
                    f"Grad-CAM needs layer {layer!r} to output (B, C, H, W) in the forward; "
                    "pass a convolutional layer as cam_layer")
            check_classes(logits, target)
            score = logits.gather(1, target.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, activations[0])
    finally:
        handle.remove()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations[0].detach()).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    # Spread over the channels so that the channel sum is the map itself.
    return (cam / x.shape[1]).expand_as(x).contiguous()


def grad_cam(layer: str) -> Explainer:
    """Grad-CAM (Selvaraju et al. 2017) at ``layer`` as an Explainer: ReLU of the layer's
    channels weighted by their spatially averaged gradients, upsampled bilinearly to the input
    and spread evenly over its channels, (B, C, H, W)."""
    if not isinstance(layer, str):
        raise PullbackWidgetsTypeError(f"layer must be a module's name (a str), got "
                                       f"{type(layer).__name__}")
    return functools.partial(_grad_cam, layer=layer)


def ground_truth_methods(model: nn.Module, *, temperatures: Sequence[float] = TABLE_TEMPERATURES,
                         gates: Sequence[str] = GATES, cam_layer: str | None = None,
                         captum: bool | None = None) -> dict[str, Explainer]:
    """The benchmark's methods: :func:`~pullback_widgets.evaluation.method_registry`'s
    (pullbacks at ``temperatures`` × ``gates``, gradient, gradient_x_input, the random control
    and, with Captum, guided backprop, integrated gradients, SmoothGrad, guided Grad-CAM), and
    ``"gradcam"`` at ``cam_layer`` (default the last Conv2d)."""
    layer = _cam_layer(model, cam_layer)
    # batch_size: integrated gradients runs this many (image, step) pairs at once; at least a
    # benchmark batch, which Captum requires.
    methods = method_registry(model, temperatures=temperatures, gates=gates, captum=captum,
                              cam_layer=cam_layer, batch_size=256)
    # On a ReLU network Captum's guided backprop needs no ReLU6 copy: the two entries agree.
    methods.pop("guided_backprop_captum", None)
    methods["gradcam"] = grad_cam(layer)
    return methods


# --------------------------------------------------------------------------- the benchmark


def _check_values(values: object) -> Tensor:
    if not isinstance(values, Tensor):
        raise PullbackWidgetsTypeError(f"values must be a torch.Tensor, got "
                                       f"{type(values).__name__}")
    if values.numel() == 0:
        raise PullbackWidgetsError("an interval needs at least one value")
    return values.detach().double()


def _mean_or_lowest(interval: Interval) -> float:
    """An interval's mean as a sort key: NaN (no valid mean) below every number."""
    return -math.inf if math.isnan(interval.mean) else interval.mean


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% interval over n values."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Tensor, bounds: tuple[float, float] = (-math.inf, math.inf)
           ) -> Interval:
        """Student t: mean ± t(0.975, n - 1) s.e., s.e. from the sample standard deviation
        (1.96 s.e. for large n; on few values the normal 1.96 is far too narrow: t is 12.7 at
        n = 2), cut to ``bounds``, the range the mean cannot leave."""
        from scipy.stats import t as student  # scipy comes with scikit-image

        values = _check_values(values)
        n = values.numel()
        half = float(student.ppf(0.975, n - 1)) * float(values.std()) / math.sqrt(n) \
            if n > 1 else math.nan
        mean = float(values.mean())
        return cls(mean, max(mean - half, bounds[0]), min(mean + half, bounds[1]), n)

    @classmethod
    def proportion(cls, hits: Tensor) -> Interval:
        """Wilson's score interval for a rate of 0/1 values: unlike mean ± 1.96 s.e. it stays
        inside [0, 1] and does not shrink to a point at 0 or 1 hits."""
        hits = _check_values(hits)
        n = hits.numel()
        rate = float(hits.mean())
        centre = (rate + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
        half = Z95 * math.sqrt(rate * (1 - rate) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
        # It holds the rate and lies in [0, 1]; at 0 or n hits the rounding of centre ± half
        # misses 0 or 1 by an ulp either way.
        return cls(rate, max(min(centre - half, rate), 0.0), min(max(centre + half, rate), 1.0),
                   n)

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        return f"{self.mean:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


@dataclass
class GroundTruthResult:
    """Per-image scores of each method: ``scores[method][metric]`` is a float64 tensor (n,).

    ``accuracy``: the model's accuracy on the n images (every method explains the true class).
    """

    scores: dict[str, dict[str, Tensor]]
    accuracy: float
    n: int
    seed: int

    @property
    def methods(self) -> list[str]:
        return list(self.scores)

    def interval(self, method: str, metric: str) -> Interval:
        """Mean and 95% interval of ``metric`` (Wilson's for the pointing game's hit rate)."""
        values = self._scores(method, metric)
        return Interval.proportion(values) if metric == "pointing" \
            else Interval.of(values, (0.0, 1.0))

    def difference(self, method: str, reference: str, metric: str) -> Interval:
        """The paired difference ``method - reference`` over the same images."""
        reference_scores = self._scores(reference, metric)
        # Every metric here is in [0, 1].
        return Interval.of(self._scores(method, metric) - reference_scores, (-1.0, 1.0))

    def _scores(self, method: str, metric: str) -> Tensor:
        if method not in self.scores:
            raise PullbackWidgetsError(f"no method {method!r} in this result; it has "
                                       f"{', '.join(map(repr, self.scores))}")
        check_choice(metric, tuple(self.scores[method]), "metric")
        return self.scores[method][metric]

    def table(self, digits: int = 3) -> str:
        """Markdown: mean [95% interval] of each metric, a row per method."""
        lines = ["| method | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |",
                 "|---" * (len(METRICS) + 1) + "|"]
        for method in self.scores:
            cells = [f"{self.interval(method, m):.{digits}f}" for m in METRICS]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def difference_table(self, reference: str, digits: int = 3) -> str:
        """Markdown: paired difference ``method - reference`` [95% interval] per metric."""
        lines = ["| method − " + reference + " | "
                 + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |",
                 "|---" * (len(METRICS) + 1) + "|"]
        for method in self.scores:
            if method == reference:
                continue
            cells = []
            for metric in METRICS:
                interval = self.difference(method, reference, metric)
                mark = "**" if interval.excludes_zero() else ""
                cells.append(f"{mark}{interval:+.{digits}f}{mark}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def beats(self, reference: str) -> list[str]:
        """Methods whose paired difference against ``reference`` is above zero, with 95%
        confidence, on every metric."""
        return [method for method in self.scores if method != reference
                and all(self.difference(method, reference, m).low > 0 for m in METRICS)]


def ground_truth_benchmark(model: nn.Module, methods: Mapping[str, Explainer] | None = None,
                           n: int = 1000, seed: int = 0, *, batch_size: int = 50
                           ) -> GroundTruthResult:
    """Score ``methods`` on ``n`` images of ``make_dataset(n, size=model.input_size, seed=seed)``.

    ``model``: a classifier of the synthetic shapes taking pixel space [0, 1] (B, 3, H, W), such
    as ``pw.load_model("shapes")``; ``methods``: name -> Explainer, default
    :func:`ground_truth_methods`. Each method explains each image's true class, ``batch_size``
    images at a time. The model is left as found.
    """
    check_model(model)
    n = check_index(n, "n", minimum=2)
    seed = check_index(seed, "seed")
    batch_size = check_index(batch_size, "batch_size", minimum=1)
    if methods is not None and not isinstance(methods, Mapping):
        raise PullbackWidgetsTypeError(f"methods must be a mapping of name -> explain function, "
                                       f"got {type(methods).__name__}")
    methods = ground_truth_methods(model) if methods is None else dict(methods)
    if not methods:
        raise PullbackWidgetsError("methods must name at least one method")
    for name, explain in methods.items():
        if not callable(explain):
            raise PullbackWidgetsTypeError(f"method {name!r} must be an explain function "
                                           f"(model, x, target), got {type(explain).__name__}")
    size = check_index(getattr(model, "input_size", synthetic.INPUT_SIZE), "model.input_size",
                       minimum=synthetic.MIN_SIZE)
    images, labels, masks = synthetic.make_dataset(n, size=size, seed=seed)
    # A model without parameters runs on the CPU in float32, as the images come.
    parameter = next(model.parameters(), images)
    images = images.to(parameter.device, parameter.dtype)
    labels, masks = labels.to(parameter.device), masks.to(parameter.device)
    logits = torch.cat([predict(model, images[i:i + batch_size])
                        for i in range(0, n, batch_size)])
    if logits.shape[1] != len(synthetic.CLASSES):
        raise PullbackWidgetsError(
            f"the model has {logits.shape[1]} outputs; the shapes have {len(synthetic.CLASSES)} "
            f"classes {synthetic.CLASSES}")
    accuracy = float((logits.argmax(1) == labels).double().mean())
    scores: dict[str, dict[str, list[Tensor]]] = {
        name: {metric: [] for metric in METRICS} for name in methods}
    for start in range(0, n, batch_size):
        batch = slice(start, start + batch_size)
        for name, explain in methods.items():
            attribution = explain(model, images[batch], labels[batch])
            try:
                for metric in METRICS:
                    scores[name][metric].append(
                        MASK_METRICS[metric](attribution, masks[batch]).cpu())
            except PullbackWidgetsError as error:  # say which method gave it
                raise type(error)(f"method {name!r}: {error}") from None
    return GroundTruthResult(
        {name: {metric: torch.cat(parts) for metric, parts in per.items()}
         for name, per in scores.items()}, accuracy, n, seed)


def temperature_curve_methods(temperatures: Sequence[float] = CURVE_TEMPERATURES,
                              gates: Sequence[str] = GATES) -> dict[str, Explainer]:
    """Pullbacks over a sweep of T for each gate, named as in the method registry."""
    return {pullback_name(t, gate): pullback_method(t, gate) for gate in gates
            for t in temperatures}


def recommended_temperature(result: GroundTruthResult, gate: str = "sigmoid",
                            temperatures: Sequence[float] = CURVE_TEMPERATURES) -> float:
    """The T of ``gate``'s pullback with the largest mean mask AUC among ``temperatures``."""
    if not temperatures:
        raise PullbackWidgetsError("temperatures must name at least one temperature")
    names = {t: pullback_name(t, gate) for t in temperatures}
    missing = [name for name in names.values() if name not in result.scores]
    if missing:
        raise PullbackWidgetsError(f"the result has no {missing[0]!r}: run the benchmark with "
                                   "temperature_curve_methods()")
    if all(math.isnan(result.interval(name, "mask_auc").mean) for name in names.values()):
        raise PullbackWidgetsError("no temperature has a mean mask AUC (the scores are NaN)")
    return max(temperatures, key=lambda t: _mean_or_lowest(result.interval(names[t], "mask_auc")))


def curve_table(result: GroundTruthResult, gates: Sequence[str] = GATES,
                temperatures: Sequence[float] = CURVE_TEMPERATURES, digits: int = 3) -> str:
    """Markdown: a row per T, mean [95% interval] of each metric for each gate's pullback."""
    header = [f"{gate} {METRIC_TITLES[m]}" for gate in gates for m in METRICS]
    lines = ["| T | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for t in temperatures:
        cells = [f"{result.interval(pullback_name(t, gate), m):.{digits}f}"
                 for gate in gates for m in METRICS]
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(result: GroundTruthResult, reference: str = "gradient",
            control: str = "random") -> list[str]:
    """Sentences read off the paired differences: who beats ``reference`` and ``control`` on
    every metric (95% intervals above zero), the best mean on each metric, and the three
    largest gains over ``reference`` in mask AUC."""
    lines = []
    for against in (control, reference):
        winners = result.beats(against)
        losers = [m for m in result.methods if m != against and m not in winners]
        lines.append(f"Beat the {against} on all three metrics: "
                     + (", ".join(winners) if winners else "none") + "; not: "
                     + (", ".join(losers) if losers else "none") + ".")
    best = [f"{METRIC_TITLES[metric]}: {top} ({result.interval(top, metric).mean:.3f})"
            for metric in METRICS
            for top in [max(result.methods,
                            key=lambda m: _mean_or_lowest(result.interval(m, metric)))]]
    lines.append("Largest mean: " + "; ".join(best) + ".")
    ranked = sorted((m for m in result.methods if m not in (reference, control)),
                    key=lambda m: _mean_or_lowest(result.difference(m, reference, "mask_auc")),
                    reverse=True)
    for method in ranked[:3]:
        cells = ", ".join(f"{METRIC_TITLES[metric]} "
                          f"{result.difference(method, reference, metric):+.3f}"
                          for metric in METRICS)
        lines.append(f"{method} − {reference}: {cells}.")
    return lines
