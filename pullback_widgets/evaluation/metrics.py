"""Is an attribution faithful, and what does it cost? Batched metrics for any attribution method.

Conventions. Images are (B, 3, H, W) in pixel space [0, 1]; an attribution has the same shape.
A target is a class index per image (an int, a sequence, a LongTensor (B,)) or None for each
image's predicted class. Every metric returns one value per image, a tensor (B,) in the
images' dtype, but at least float32.

Metrics

- :func:`deletion_auc` / :func:`insertion_auc` (RISE, Petsiuk et al. 2018): pixels ranked by
  the channel-summed attribution, highest first, are replaced by a baseline image (deletion) or
  restored onto it (insertion) in ``steps`` equal chunks; the curve is the target's softmax
  probability after each chunk, its area the trapezoid rule over [0, 1]. Deletion: lower is
  better; insertion: higher is better. ``smooth=σ`` ranks by the blurred magnitude instead,
  which asks whether the *regions* are right rather than the single pixels.
- :func:`infidelity` (Yeh et al. 2019, Captum's definition): E_I[(I·a − (f(x) − f(x − I)))²]
  over Gaussian noise I, f the target *logit*, with the attribution a scaled by its optimal
  factor (Captum's ``normalize=True``) so that methods of different scales compare. Lower is
  better. Units: logit².
- :func:`randomisation_check` (Adebayo et al. 2018): re-initialise the layers of a copy of the
  model from the top down, cumulatively, and score each method's attribution by its Spearman
  correlation with the original one. A faithful method's correlation falls; one that stays
  high does not depend on what the model learnt.
- :func:`ascent_gain`: the target-logit gain after ``steps`` normalised ascent steps along the
  attribution (the loop of :func:`pullback_widgets.pullback_ascent`). Higher is better.

An :data:`Explainer` is ``explain(model, x, target) -> (B, 3, H, W)`` with ``target`` a
LongTensor (B,); the methods live in :mod:`pullback_widgets.evaluation.methods`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from torch import Tensor, nn

from ..ascent import _step, _unit_l2
from ..model_helpers import predict
from ..targets import class_indices
from ..validation import (
    PullbackWidgetsError,
    PullbackWidgetsTypeError,
    check_index,
    check_inputs,
    check_positive,
)

Explainer = Callable[[nn.Module, Tensor, Tensor], Tensor]
Target = int | Sequence[int] | Tensor | None

# RISE's blur baseline: strong enough that no object detail survives at 224 px, while the
# image's colours stay. The kernel spans ±1.5 sigma.
BLUR_KERNEL = 31
BLUR_SIGMA = 10.0
BASELINES = ("blur", "mean")

__all__ = [
    "BASELINES",
    "BLUR_KERNEL",
    "BLUR_SIGMA",
    "Explainer",
    "RandomisationResult",
    "ascent_gain",
    "baseline_image",
    "deletion_auc",
    "infidelity",
    "insertion_auc",
    "perturbation_curve",
    "randomisation_check",
    "randomisation_stages",
    "randomised_copy",
    "ranking_map",
    "spearman",
]


# --------------------------------------------------------------------------- argument checks

def _check_attribution(attribution: object, x: Tensor, finite: bool = True) -> Tensor:
    if not isinstance(attribution, Tensor):
        raise PullbackWidgetsTypeError(
            f"attribution must be a torch.Tensor, got {type(attribution).__name__}")
    if attribution.is_complex():
        raise PullbackWidgetsTypeError(f"attribution must be real, got {attribution.dtype}")
    if attribution.shape != x.shape:
        raise PullbackWidgetsError(f"attribution must have the images' shape {tuple(x.shape)}, "
                                   f"got {tuple(attribution.shape)}")
    if finite and not torch.isfinite(attribution).all():
        raise PullbackWidgetsError("attribution contains NaN or infinite values")
    # Never narrower than it came: a float64 map cast to float32 images' dtype lost its tiny
    # values to 0 and its huge ones to inf after this check.
    return attribution.detach().to(x.device, torch.promote_types(attribution.dtype, x.dtype))


def _method_output(name: str, attribution: object, x: Tensor, finite: bool = True) -> Tensor:
    """What method ``name`` returned for images ``x``, checked as :func:`_check_attribution`
    does (``finite=False``: shape and type only); an error names the method."""
    try:
        return _check_attribution(attribution, x, finite)
    except (PullbackWidgetsError, PullbackWidgetsTypeError) as error:
        raise type(error)(f"method {name!r}: {error}") from None


def _check_images(x: object) -> Tensor:
    x = check_inputs(x).detach()
    if x.min() < 0 or x.max() > 1:
        raise PullbackWidgetsError("x must be images in pixel space [0, 1] (see pw.load_image)")
    return x


def _check_seed(seed: object, count: int = 1) -> int:
    """``seed`` if seeds ``seed`` .. ``seed + count - 1`` all suit ``torch.Generator``."""
    seed = check_index(seed, "seed", minimum=-2**63)
    if seed + count > 2**64:
        raise PullbackWidgetsError(f"seed must be below {2**64 - count + 1}, got {seed}")
    return seed


def _device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def _classes(model: nn.Module, x: Tensor, target: Target) -> tuple[Tensor, Tensor]:
    """(class per image (B,), the model's logits at x (B, K))."""
    logits = predict(model, x)
    if target is None:
        return logits.argmax(1), logits
    return class_indices(target, x.shape[0], logits.shape[1], x.device), logits


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield torch.arange(start, min(start + size, total))


def _scores_dtype(x: Tensor) -> torch.dtype:
    """The dtype of a metric's values for images ``x``: theirs, but at least float32 (a float16
    logit² above 65504 is inf, and a float16 curve keeps 3 digits)."""
    return torch.promote_types(x.dtype, torch.float32)


def _target_outputs(model: nn.Module, images: Tensor, classes: Tensor,
                    probability: bool) -> Tensor:
    # The softmax of float16 logits in float16 keeps 3 digits: at least float32.
    logits = predict(model, images)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    scores = logits.softmax(1) if probability else logits
    return scores.gather(1, classes.view(-1, 1)).squeeze(1)


# --------------------------------------------------------------------------- deletion/insertion

def baseline_image(x: Tensor, baseline: str | Tensor = "blur") -> Tensor:
    """The image that removed pixels become, (B, 3, H, W).

    ``"blur"``: torchvision's Gaussian blur of each image, kernel 31 px, sigma 10 px (reflect
    padding); ``"mean"``: each image's per-channel mean colour; or a tensor that broadcasts to
    ``x`` (e.g. zeros for black).
    """
    if isinstance(baseline, Tensor):
        if baseline.is_meta:
            raise PullbackWidgetsError("baseline is on the meta device, which holds no values")
        try:
            expanded = baseline.to(x.device, x.dtype).expand_as(x)
        except RuntimeError:
            raise PullbackWidgetsError(f"baseline of shape {tuple(baseline.shape)} does not "
                                       f"broadcast to the images' {tuple(x.shape)}") from None
        if not torch.isfinite(expanded).all():  # every curve would be NaN
            raise PullbackWidgetsError("baseline contains NaN or infinite values")
        return expanded
    if not isinstance(baseline, str):  # == on a numpy array is elementwise
        raise PullbackWidgetsTypeError(f"baseline must be one of {BASELINES} or a torch.Tensor, "
                                       f"got {type(baseline).__name__}")
    if baseline == "blur":
        if min(x.shape[-2:]) <= BLUR_KERNEL // 2:
            raise PullbackWidgetsError(f"baseline='blur' needs images larger than "
                                       f"{BLUR_KERNEL // 2} px, got {tuple(x.shape[-2:])}")
        return TF.gaussian_blur(x, [BLUR_KERNEL, BLUR_KERNEL], [BLUR_SIGMA, BLUR_SIGMA])
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    raise PullbackWidgetsError(f"baseline must be one of {BASELINES} or a tensor, got {baseline!r}")


def _channel_sum(attribution: Tensor) -> Tensor:
    """``attribution.sum(1)`` in float64, (B, H, W): in float16 the sum of three values of
    40000 is inf, and sums that differ tie after rounding, which reorders the ranking. An
    example whose float64 sum could overflow is scaled by a power of two first (exact, and
    the ranking does not depend on the scale)."""
    values = attribution.double()
    largest = values.abs().flatten(1).amax(1)
    limit = torch.finfo(torch.float64).max / (2 * values.shape[1])
    exponent = torch.where(largest > limit, torch.frexp(largest).exponent, 0)
    return torch.ldexp(values, -exponent.view(-1, 1, 1, 1)).sum(1)


def ranking_map(attribution: Tensor, smooth: float | None = None) -> Tensor:
    """What deletion and insertion rank pixels by, (B, H, W) float64.

    ``smooth=None``: ``attribution.sum(1)``, signed, pixel by pixel (summed in float64; an
    example of values near float64's largest is scaled by a power of two). ``smooth=σ``: the
    magnitude ``|attribution.sum(1)|`` blurred by a Gaussian of σ pixels (kernel 2·⌈3σ⌉ + 1,
    reflect padding), which ranks regions rather than single pixels.
    """
    saliency = _channel_sum(attribution)
    if smooth is None:
        return saliency
    sigma = check_positive(smooth, "smooth")
    kernel = 2 * math.ceil(3 * sigma) + 1
    if min(saliency.shape[-2:]) <= kernel // 2:
        raise PullbackWidgetsError(f"smooth={sigma:g} needs images larger than {kernel // 2} px, "
                                   f"got {tuple(saliency.shape[-2:])}")
    return TF.gaussian_blur(saliency.abs().unsqueeze(1), [kernel, kernel],
                            [sigma, sigma]).squeeze(1)


def perturbation_curve(model: nn.Module, x: Tensor, target: Target, attribution: Tensor, *,
                       mode: str = "deletion", baseline: str | Tensor = "blur",
                       steps: int = 16, batch_size: int = 16,
                       smooth: float | None = None) -> Tensor:
    """Target softmax probability as pixels are deleted or inserted: (B, steps + 1).

    Pixels are ranked by :func:`ranking_map` (``attribution.sum(1)`` unless ``smooth`` is
    set), highest first, ties by position. Column k has the first ⌊k·H·W/steps⌋ ranked pixels
    (all channels) taken from the image (insertion, starting from the baseline) or from the
    baseline (deletion, starting from the image). All B·(steps+1) images are run
    ``batch_size`` at a time, so memory stays bounded.
    """
    x = _check_images(x)
    attribution = _check_attribution(attribution, x)
    steps, batch_size = check_index(steps, "steps", 1), check_index(batch_size, "batch_size", 1)
    if mode not in ("deletion", "insertion"):
        raise PullbackWidgetsError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    saliency = ranking_map(attribution, smooth)
    classes, _ = _classes(model, x, target)
    base = baseline_image(x, baseline)
    batch, _, height, width = x.shape
    pixels = height * width
    order = saliency.flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(pixels, device=x.device).expand(batch, -1))
    counts = torch.arange(steps + 1, device=x.device) * pixels // steps
    first, second = (x, base) if mode == "deletion" else (base, x)

    columns = steps + 1
    curve = torch.empty(batch * columns, dtype=_scores_dtype(x), device=x.device)
    for index in _chunks(batch * columns, batch_size):
        index = index.to(x.device)
        image, step = index // columns, index % columns
        switched = (rank[image] < counts[step, None]).view(-1, 1, height, width)
        images = torch.where(switched, second[image], first[image])
        curve[index] = _target_outputs(model, images, classes[image],
                                       probability=True).to(curve.dtype)
    return curve.view(batch, columns)


def _auc(curve: Tensor) -> Tensor:
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[1] - 1), dim=1)


def deletion_auc(model: nn.Module, x: Tensor, target: Target, attribution: Tensor, *,
                 baseline: str | Tensor = "blur", steps: int = 16, batch_size: int = 16,
                 smooth: float | None = None) -> Tensor:
    """Area under the deletion curve (see :func:`perturbation_curve`), (B,) in [0, 1]; lower
    means the top-ranked pixels carried the prediction."""
    return _auc(perturbation_curve(model, x, target, attribution, mode="deletion",
                                   baseline=baseline, steps=steps, batch_size=batch_size,
                                   smooth=smooth))


def insertion_auc(model: nn.Module, x: Tensor, target: Target, attribution: Tensor, *,
                  baseline: str | Tensor = "blur", steps: int = 16, batch_size: int = 16,
                  smooth: float | None = None) -> Tensor:
    """Area under the insertion curve (see :func:`perturbation_curve`), (B,) in [0, 1]; higher
    means the top-ranked pixels alone restore the prediction."""
    return _auc(perturbation_curve(model, x, target, attribution, mode="insertion",
                                   baseline=baseline, steps=steps, batch_size=batch_size,
                                   smooth=smooth))


# --------------------------------------------------------------------------- infidelity

def infidelity(model: nn.Module, x: Tensor, target: Target, attribution: Tensor, *,
               n_perturbations: int = 32, noise_std: float = 0.1, normalize: bool = True,
               seed: int = 0, batch_size: int = 16) -> Tensor:
    """Captum's infidelity with Gaussian perturbations, (B,) in logit².

    I_j ~ N(0, ``noise_std``²) per value (pixel units, [0, 1] scale), j = 1..n, the same n draws
    for every image and method (paired comparisons; ``seed`` fixes them). With a_j = Σ I_j·attr
    and d_j = f(x) − f(x − I_j), f the target logit (x − I_j is not clipped):
    ``normalize=True`` returns mean_j (β a_j − d_j)² with β = Σ a d / Σ a², the scale that
    minimises it, which equals mean_j d_j² · (1 − cos²(a, d)); ``False`` uses β = 1.
    """
    x = _check_images(x)
    attribution = _check_attribution(attribution, x)
    n = check_index(n_perturbations, "n_perturbations", 1)
    noise_std = check_positive(noise_std, "noise_std")
    batch_size = check_index(batch_size, "batch_size", 1)
    classes, logits = _classes(model, x, target)
    generator = torch.Generator().manual_seed(_check_seed(seed))
    noise = (torch.randn((n, *x.shape[1:]), generator=generator, dtype=torch.float64)
             * noise_std).to(x.device, x.dtype)
    batch = x.shape[0]
    explained = torch.empty(batch * n, dtype=torch.float64, device=x.device)
    change = torch.empty_like(explained)
    start = logits.gather(1, classes.view(-1, 1)).squeeze(1)
    for index in _chunks(batch * n, batch_size):
        index = index.to(x.device)
        image, draw = index // n, index % n
        perturbed = _target_outputs(model, x[image] - noise[draw], classes[image],
                                    probability=False)
        change[index] = (start[image] - perturbed).double()
        explained[index] = (attribution[image] * noise[draw]).flatten(1).double().sum(1)
    explained, change = explained.view(batch, n), change.view(batch, n)
    if normalize:
        norm = explained.square().sum(1)
        beta = torch.where(norm > 0, (explained * change).sum(1) / norm.clamp_min(1e-300), 0.0)
        explained = beta[:, None] * explained
    return (explained - change).square().mean(1).to(_scores_dtype(x))


# --------------------------------------------------------------------------- rank correlation

def _average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..N of each row (B, N), ties sharing their average rank (as scipy's rankdata)."""
    order = values.argsort(dim=1, stable=True)
    ranks = torch.empty(values.shape, dtype=torch.float64, device=values.device)
    for row in range(values.shape[0]):
        _, group, counts = torch.unique_consecutive(values[row, order[row]],
                                                    return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        ranks[row, order[row]] = (ends - (counts - 1) / 2.0)[group]
    return ranks


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each example's values: (B, ...) and (B, ...) -> (B,).

    Ties get average ranks; a constant example gives NaN (as scipy.stats.spearmanr).
    """
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise PullbackWidgetsTypeError("a and b must be torch.Tensors")
    if a.is_complex() or b.is_complex():
        raise PullbackWidgetsTypeError(f"a and b must be real, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape or a.dim() < 2:
        raise PullbackWidgetsError(f"a and b must have the same shape (B, ...), got "
                                   f"{tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.detach().flatten(1), b.detach().flatten(1)
    ra, rb = (_average_ranks(t) for t in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    rho = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))
    # NaN has no rank: an example holding one has no correlation (scipy's default too).
    undefined = (a.isnan() | b.isnan()).any(1).to(rho.device)
    return rho.masked_fill(undefined, math.nan)


# --------------------------------------------------------------------------- randomisation

Stage = str | Sequence[str]


# The stage of the parameters the model holds itself, not through a child (a ViT's position
# embedding and class token): last in the cascade, next to the input.
OWN_PARAMETERS = "(the model's own parameters)"


def randomisation_stages(model: nn.Module) -> list[str]:
    """The model's top-level layers with parameters, containers (Sequential, ModuleList) opened
    one level, from the output down: the default cascade of :func:`randomisation_check`; then
    :data:`OWN_PARAMETERS` where the model holds parameters itself.

    EfficientNet-Lite0: classifier, bn2, conv_head, blocks.6, ..., blocks.0, bn1, conv_stem.
    """
    names = [OWN_PARAMETERS] if next(model.parameters(recurse=False), None) is not None else []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            names += [f"{name}.{sub}" for sub, grandchild in child.named_children()
                      if next(grandchild.parameters(), None) is not None]
        elif next(child.parameters(), None) is not None:
            names.append(name)
    return names[::-1]


def _reinitialise(model: nn.Module, stage: str, generator: torch.Generator) -> None:
    """Weights of one stage (a module's name, or :data:`OWN_PARAMETERS`) of ``model`` as at the
    start of training: matrices and kernels He-normal (fan-in), norm scales 1, biases 0.
    BatchNorm running statistics are buffers and are kept."""
    own = stage == OWN_PARAMETERS
    module = model if own else model.get_submodule(stage)
    with torch.no_grad():
        for name, parameter in module.named_parameters(recurse=not own):
            if parameter.dim() >= 2:
                nn.init.kaiming_normal_(parameter, mode="fan_in", nonlinearity="relu",
                                        generator=generator)
            elif name.rsplit(".", 1)[-1] == "weight":
                parameter.fill_(1.0)
            else:
                parameter.zero_()


def randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with every stage of :func:`randomisation_stages` re-initialised,
    stage i with seed ``seed + i``: the model after the last stage of the default cascade of
    :func:`randomisation_check`. ``model`` itself is not touched."""
    copied = copy.deepcopy(model)
    device = _device(copied)
    stages = randomisation_stages(copied)
    seed = _check_seed(seed, len(stages))
    for index, name in enumerate(stages):
        _reinitialise(copied, name, torch.Generator(device=device).manual_seed(seed + index))
    return copied


@dataclass
class RandomisationResult:
    """Spearman correlations with the original attributions after each cumulative stage.

    ``stages``: labels, top layer first (stage s has every layer up to it re-initialised);
    ``methods``: names; ``absolute``: (S, M, B) correlation of |attribution.sum(1)|;
    ``signed``: (S, M, B) of attribution.sum(1).
    """

    stages: list[str]
    methods: list[str]
    absolute: Tensor
    signed: Tensor

    def table(self, signed: bool = False, digits: int = 2) -> str:
        """Markdown: a row per stage, a column per method, the mean over images."""
        values = (self.signed if signed else self.absolute).nanmean(dim=2)
        lines = ["| randomised down to | " + " | ".join(self.methods) + " |",
                 "|---" * (len(self.methods) + 1) + "|"]
        for label, row in zip(self.stages, values.tolist()):
            lines.append(f"| {label} | " + " | ".join(f"{v:.{digits}f}" for v in row) + " |")
        return "\n".join(lines)


def randomisation_check(model: nn.Module, x: Tensor, target: Target,
                        methods: Mapping[str, Explainer], *,
                        stages: Sequence[Stage] | None = None,
                        seed: int = 0) -> RandomisationResult:
    """Cascading model-parameter randomisation (Adebayo et al. 2018) on a deep copy of ``model``.

    ``stages``: module names (or groups of names re-initialised together), top layer first;
    default :func:`randomisation_stages`. After each stage, every method's attribution of the
    *original* target classes is compared with its attribution on the intact copy. ``model``
    itself is never modified.
    """
    x = _check_images(x)
    if not isinstance(methods, Mapping) or not methods:
        raise PullbackWidgetsError(
            "methods must be a non-empty mapping of name -> explain function")
    # A bare name is one stage, not a sequence of one-letter names.
    stages = randomisation_stages(model) if stages is None \
        else [stages] if isinstance(stages, str) else list(stages)
    groups = [[stage] if isinstance(stage, str) else list(stage) for stage in stages]
    if not groups or not all(groups):
        raise PullbackWidgetsError(
            "stages must name at least one module in each stage"
            + ("" if stages or next(model.parameters(), None) is not None
               else "; the model has no parameters to randomise"))
    seed = _check_seed(seed, len(groups))
    classes, _ = _classes(model, x, target)
    copied = copy.deepcopy(model)
    modules = dict(copied.named_modules())
    for name in (n for group in groups for n in group):
        if not isinstance(name, str) or (name not in modules and name != OWN_PARAMETERS):
            raise PullbackWidgetsError(f"stages names an unknown module {name!r}")
    # A map of another shape (one image for the batch) would be correlated all the same,
    # giving too few values or ones of other images without a word.
    original = {name: _method_output(name, explain(copied, x, classes), x)
                for name, explain in methods.items()}
    absolute, signed = [], []
    device = _device(copied)
    for index, group in enumerate(groups):
        generator = torch.Generator(device=device).manual_seed(seed + index)
        for name in group:
            _reinitialise(copied, name, generator)
        rows_abs, rows_signed = [], []
        for name, explain in methods.items():
            # After re-initialisation a NaN map is possible (activations that overflow): its
            # correlation is NaN, undefined. Its shape must be right all the same.
            after = _method_output(name, explain(copied, x, classes), x, finite=False)
            before, after = original[name].sum(1), after.sum(1)
            rows_abs.append(spearman(before.abs(), after.abs()))
            rows_signed.append(spearman(before, after))
        absolute.append(torch.stack(rows_abs))
        signed.append(torch.stack(rows_signed))
    return RandomisationResult(["+".join(g) for g in groups], list(methods),
                               torch.stack(absolute), torch.stack(signed))


# --------------------------------------------------------------------------- ascent

def ascent_gain(model: nn.Module, x: Tensor, target: Target, explain: Explainer, *,
                steps: int = 5, step_size: float = 10.0, eps: float = 50.0) -> Tensor:
    """Target-logit gain (B,) after ``steps`` steps along ``explain``'s attribution.

    The loop of :func:`pullback_widgets.pullback_ascent` for any method: each step moves
    ``step_size`` (L2, pixel units) along the attribution normalised per image, then projects
    onto the L2 ball of radius ``eps`` around ``x`` and into [0, 1].
    """
    x = _check_images(x)
    steps = check_index(steps, "steps", 1)
    step_size, eps = check_positive(step_size, "step_size"), check_positive(eps, "eps")
    classes, logits = _classes(model, x, target)
    current = x
    for _ in range(steps):
        # A map of another shape would broadcast over the images, and a NaN one make the gain
        # NaN, both without a word.
        direction = _check_attribution(explain(model, current, classes), current)
        # Normalised in the map's own dtype, then stepped in the images' (a float64 map on
        # float32 images would make the next image float64, which a float32 model refuses).
        current = _step(current, x, _unit_l2(direction).to(x.dtype), step_size, eps)
    final = _target_outputs(model, current, classes, probability=False)
    return final - logits.gather(1, classes.view(-1, 1)).squeeze(1)
