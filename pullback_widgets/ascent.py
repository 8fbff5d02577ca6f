"""Pullback ascent: the paper's rudimentary pixel-space gradient ascent along pullbacks.

Units. The paper works on pixels in [-1, 1] with step 20, eps 100 and 5 steps (10 in its app).
This package works in pixel space [0, 1], where every L2 distance is half as long: step 10,
eps 50. A step of 10 on a 3x224x224 image moves each value by about 10 / 388 = 0.026 RMS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from .gates import GATES, GateSettings
from .model_helpers import default_temperatures, predict
from .model_state import ModelState
from .session import PullbackSession, Temperature
from .targets import Target, Unit, class_indices, unit_seed
from .validation import (
    PullbackWidgetsError,
    PullbackWidgetsTypeError,
    check_choice,
    check_finite,
    check_index,
    check_inputs,
    check_model,
    check_positive,
)

METHODS = ("pullback", "gradient")
STARTS = ("photo", "grey", "noise")
# (steps, step size, eps) per start. From the photo, the paper's (halved to [0, 1] units).
# From grey or noise nothing is there to begin with, so the ascent needs more room:
# benchmarks/ascent_starts.py measured on EfficientNet-Lite0 which settings show structure.
START_DEFAULTS = {"photo": (5, 10.0, 50.0), "grey": (10, 20.0, 200.0),
                  "noise": (10, 20.0, 200.0)}


def ascent_start(start: str, size: int, *, photo: Tensor | None = None,
                 seed: int = 0) -> Tensor:
    """The image an ascent starts at, (1, 3, size, size) in pixel space [0, 1].

    ``"photo"``: ``photo`` itself; ``"grey"``: 0.5 everywhere; ``"noise"``: uniform in
    [0, 1), drawn from a generator seeded with ``seed`` (the same seed, the same picture;
    the global random state is left alone). From grey or noise, ascending a hidden unit is
    feature visualisation.
    """
    start = check_choice(start, STARTS, "start")
    size = check_index(size, "size", 1)
    if start == "photo":
        if photo is None:
            raise PullbackWidgetsError("start='photo' needs the photo")
        return photo
    if start == "grey":
        return torch.full((1, 3, size, size), 0.5)
    seed = check_index(seed, "seed")
    if seed >= 2**64:  # torch's seeds are 64-bit: its own error says only "Overflow"
        raise PullbackWidgetsError(f"seed must be below 2**64, got {seed}")
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((1, 3, size, size), generator=generator)


@dataclass
class AscentResult:
    """One ascent trajectory of a batch.

    ``images``: steps+1 tensors (B, 3, H, W) in [0, 1], ``images[0]`` the input.
    ``logits``: (steps+1, B) target logit at each image (a Unit's activation for Unit targets).
    ``probs``: (steps+1, B) target class probability, or None for Unit targets.
    ``stopped``: True when the callback ended the run early.
    """

    images: list[Tensor] = field(default_factory=list)
    logits: Tensor = field(default_factory=lambda: torch.empty(0))
    probs: Tensor | None = None
    stopped: bool = False

    @property
    def diff(self) -> Tensor:
        """Final image minus start, (B, 3, H, W)."""
        return self.images[-1] - self.images[0]

    def images_of(self, example: int) -> list[Tensor]:
        """The trajectory of one example of the batch: steps+1 tensors (3, H, W)."""
        return [image[example] for image in self.images]

    @property
    def gain(self) -> Tensor:
        """Target logit at the final image minus at the start, (B,)."""
        return self.logits[-1] - self.logits[0]


def _target_score(session: PullbackSession, target: Target) -> tuple[Tensor, Tensor | None]:
    """(target logit or unit activation (B,), target probability (B,) or None)."""
    if isinstance(target, Unit):  # the unit's value: its seed's weighted sum
        activation = session.activations[target.layer].detach()
        seed = unit_seed(target, activation, len(session.logits), session.token_grid,
                         session.channels_last, target.layer in session.channels_last_layers)
        # Only the unit's own values count: inf elsewhere in the layer times a 0 seed is NaN.
        return torch.where(seed != 0, activation * seed, 0).flatten(1).sum(1), None
    batch, num_classes = session.logits.shape
    classes = class_indices(target, batch, num_classes, session.logits.device)
    rows = torch.arange(batch, device=classes.device)
    return session.logits.detach()[rows, classes], session.probabilities[rows, classes]


def _unit_l2(direction: Tensor) -> Tensor:
    """Each example's direction scaled to unit L2 norm (zero stays zero).

    Divided by its largest entry first, so that neither huge nor tiny entries overflow or
    underflow the sum of squares.
    """
    flat = direction.flatten(1)
    largest = flat.abs().amax(dim=1, keepdim=True)
    scaled = flat / torch.where(largest > 0, largest, 1.0)
    norms = scaled.norm(dim=1, keepdim=True)
    return (scaled / torch.where(norms > 0, norms, 1.0)).view_as(direction)


def _step(current: Tensor, start: Tensor, direction: Tensor, step_size: float,
          eps: float) -> Tensor:
    """``current + step_size * direction`` (direction of unit norm), projected onto the L2 ball
    of radius ``eps`` around ``start``, then into [0, 1].

    Computed in units of max(step_size, eps), where every quantity is at most 2, so that a
    step of 1e30 neither overflows nor vanishes: it lands on the ball's surface. Both are
    capped at a quarter of the dtype's largest number (8.5e37 in float32), far beyond any
    distance inside [0, 1]^n, and raised to its smallest normal number (1.2e-38), so that the
    unit itself is finite and not 0 in the tensors' dtype.
    """
    finfo = torch.finfo(current.dtype)
    largest = finfo.max / 4
    # Below the dtype's smallest normal number a unit would be 0 there; nothing can move by
    # less in [0, 1] anyway.
    step_size, eps = (min(max(value, finfo.tiny), largest) for value in (step_size, eps))
    unit = max(step_size, eps)
    delta = (current - start) / unit + direction * (step_size / unit)
    radius = eps / unit
    norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    delta = delta * torch.where(norms > radius, radius / norms.clamp_min(1e-30), 1.0)
    return (start + delta * unit).clamp_(0.0, 1.0)


def pullback_ascent(model: nn.Module, image: Tensor, target: Target, *, steps: int = 5,
                    step_size: float = 10.0, eps: float = 50.0,
                    temperature: Temperature = None, gate: str = "sigmoid",
                    pool_temperature: float | None = None, temperature_mode: str = "absolute",
                    attention_weights: str = "detached", pool_weights: str = "differentiated",
                    method: str = "pullback",
                    callback: Callable[[int, AscentResult], object] | None = None,
                    progress: bool = True, keep_frames: bool = True) -> AscentResult:
    """Ascend the target along its excitation pullback, starting at ``image``.

    ``image``: (B, 3, H, W) in pixel space [0, 1]. Each step moves ``step_size`` (L2, [0, 1]
    units) along the pullback normalised per example, projects onto the L2 ball of radius
    ``eps`` around the start and clamps to [0, 1]. ``method="gradient"`` runs the same loop on
    plain gradients. ``callback(step, result)`` runs after every step (step counts from 1);
    returning a true value stops the run. ``progress`` shows a tqdm bar on stderr. The gate
    settings are those of :func:`excitation_pullback` (``temperature=None``: the model's own).
    ``keep_frames=False`` keeps only the start and the latest image in ``result.images`` (the
    logits keep every step): for callers that need the end, not the trajectory.
    """
    method = check_choice(method, METHODS, "method")
    steps, step_size, eps = check_index(steps, "steps"), \
        check_positive(step_size, "step_size"), check_positive(eps, "eps")
    if callback is not None and not callable(callback):  # not after the first step's work
        raise PullbackWidgetsTypeError(
            f"callback must be callable or None, got {type(callback).__name__}")
    model = check_model(model)
    start = check_inputs(image).detach().clone()  # the result's own: the caller may reuse theirs
    if start.min() < 0 or start.max() > 1:
        raise PullbackWidgetsError("image must be in pixel space [0, 1] (see pw.load_image)")
    check_choice(gate, GATES, "gate")  # also where method="gradient" overrides it
    settings = dict(temperature=temperature, gate="hard" if method == "gradient" else gate,
                    pool_temperature=pool_temperature, temperature_mode=temperature_mode,
                    attention_weights=attention_weights, pool_weights=pool_weights)
    GateSettings(**settings, defaults=default_temperatures(model))  # checked before any work
    layers = (target.layer,) if isinstance(target, Unit) else ()

    result = AscentResult(images=[start])
    logits, probs = [], []
    current = start
    followed = None  # the model as the first step's forward left it (lazy modules made)
    bar = tqdm(total=steps, desc=f"{method} ascent", disable=not progress, leave=False)
    try:
        for step in range(steps + 1):
            session = PullbackSession(model, current, layers=layers, **settings)
            followed = followed or ModelState.of(model)  # not the session: its graph is big
            logit, prob = _target_score(session, target)
            # At the last step no pullback would say so. An infinite logit of any class makes
            # every probability NaN.
            finite = bool(logit.isfinite().all())
            if not finite or (prob is not None and bool(prob.isnan().any())):
                what = f"target's {'activation' if layers else 'logit'}" if not finite \
                    else "probabilities (a logit is infinite)"
                raise PullbackWidgetsError(
                    f"the {what} at step {step} holds NaN or an infinity (an overflow inside "
                    "the model?): there is nothing to ascend")
            logits.append(logit)
            probs.append(prob)
            result.logits = torch.stack(logits)
            result.probs = None if prob is None else torch.stack(probs)
            if step > 0 and callback is not None and callback(step, result):
                result.stopped = True
                break
            # A change between steps (the callback, or a training cell while a widget's
            # worker runs the ascent) would make each step follow another model.
            if not followed.matches(model):
                raise PullbackWidgetsError(
                    f"the model changed during the ascent, by step {step} (in the callback, or "
                    "in another thread): an ascent follows one model, so change it before or "
                    "after the run")
            if step == steps:
                break
            direction = _unit_l2(check_finite(session.pullback(target),
                                              f"the {method} at step {step + 1}"))
            current = _step(current, start, direction, step_size, eps)
            if keep_frames:
                result.images.append(current)
            else:
                result.images[1:] = [current]
            bar.update(1)
    finally:
        bar.close()
    return result


def stack_results(results: Sequence[AscentResult]) -> AscentResult:
    """Several trajectories side by side: their batches concatenated, every one cut to the
    shortest (one stopped early). ``probs`` only where all have them."""
    results = list(results)
    if not results:
        raise PullbackWidgetsError("stack_results needs at least one result")
    if any(len(result.images) != len(result.logits) for result in results):
        # Its [start, end] beside every step's logits: frame 1 would be the end beside step 1.
        raise PullbackWidgetsError(
            "stack_results needs every frame of each result; one made with keep_frames=False "
            "holds only its start and end")
    sizes = {tuple(result.images[0].shape[1:]) for result in results}
    if len(sizes) > 1:
        raise PullbackWidgetsError(f"stack_results needs images of one size, got {sorted(sizes)}")
    length = min(len(result.images) for result in results)
    probs = None if any(r.probs is None for r in results) else \
        torch.cat([r.probs[:length] for r in results], dim=1)
    return AscentResult(images=[torch.cat([r.images[i] for r in results])
                                for i in range(length)],
                        logits=torch.cat([r.logits[:length] for r in results], dim=1),
                        probs=probs, stopped=any(r.stopped for r in results))


@dataclass
class AscentGrid:
    """The counterfactual grid (the paper's Figure 1): rows are images, columns targets.

    ``images``/``diffs``: (N, T, 3, H, W) final images and final-minus-start;
    ``gains``: (N, T) target-logit gain; ``targets``: the T column classes; ``stopped``: per
    column, True where the callback ended that column's ascent early (its image and gain are
    of fewer steps than the others').
    """

    images: Tensor
    diffs: Tensor
    gains: Tensor
    targets: list[int]
    stopped: list[bool] = field(default_factory=list)


def ascent_grid(model: nn.Module, images: Tensor, targets: Sequence[int] | None = None,
                **ascent_kwargs) -> AscentGrid:
    """Pullback ascent of every image (N, 3, H, W) towards every target class.

    ``targets=None`` takes each image's own predicted class, so the diagonal shows the image's
    own class and the off-diagonal cells are counterfactuals. Any integer type counts.
    ``ascent_kwargs`` go to :func:`pullback_ascent`; a ``callback`` that returns a true value
    ends the column it runs in (see ``AscentGrid.stopped``), not the grid.
    """
    model = check_model(model)
    start = check_inputs(images).detach()
    logits = predict(model, start)
    if targets is None:
        targets = logits.argmax(1).tolist()
    if isinstance(targets, (Tensor, np.ndarray)) and targets.ndim == 1:
        targets = targets.tolist()  # logits.argmax(1), say: each checked below as a number
    if isinstance(targets, (str, Tensor, np.ndarray)) or not isinstance(targets, Sequence) \
            or len(targets) == 0:
        raise PullbackWidgetsTypeError(
            "targets must be a non-empty sequence (or 1-D array) of class indices")
    targets = [check_index(t, "each of targets") for t in targets]
    for t in targets:  # before any ascent, not after the columns before it
        if t >= logits.shape[1]:
            raise PullbackWidgetsError(
                f"target class {t} is out of range [0, {logits.shape[1]})")
    # Only each column's end is kept: N images x T targets x (steps + 1) frames held to the
    # end came to gigabytes for the command line's 100 steps.
    ascent_kwargs = {**ascent_kwargs, "keep_frames": False}
    columns = [pullback_ascent(model, start, t, **ascent_kwargs) for t in targets]
    finals = torch.stack([c.images[-1] for c in columns], dim=1)
    return AscentGrid(images=finals, diffs=finals - start.unsqueeze(1),
                      gains=torch.stack([c.gain for c in columns], dim=1), targets=list(targets),
                      stopped=[c.stopped for c in columns])
