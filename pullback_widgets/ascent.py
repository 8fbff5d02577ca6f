"""Pullback ascent: the paper's rudimentary pixel-space gradient ascent along pullbacks.

Units. The paper works on pixels in [-1, 1] with step 20, eps 100 and 5 steps (10 in its app).
This package works in pixel space [0, 1], where every L2 distance is half as long: step 10,
eps 50. A step of 10 on a 3x224x224 image moves each value by about 10 / 388 = 0.026 RMS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .gates import check_temperature
from .session import PullbackSession, Temperature
from .targets import Target, Unit, class_indices
from .validation import check_inputs, check_positive

METHODS = ("pullback", "gradient")


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


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return steps


def _target_score(session: PullbackSession, target: Target) -> tuple[Tensor, Tensor | None]:
    """(target logit or unit activation (B,), target probability (B,) or None)."""
    if isinstance(target, Unit):
        activation = session.activations[target.layer].detach()[:, target.channel]
        value = activation.flatten(1).mean(1) if target.y is None else \
            activation[:, target.y, target.x]
        return value, None
    batch, num_classes = session.logits.shape
    classes = class_indices(target, batch, num_classes, session.logits.device)
    rows = torch.arange(batch, device=classes.device)
    return session.logits.detach()[rows, classes], session.probabilities[rows, classes]


def _unit_l2(direction: Tensor) -> Tensor:
    """Each example's direction scaled to unit L2 norm (zero stays zero)."""
    norms = direction.flatten(1).norm(dim=1).clamp_min(1e-30)
    return direction / norms.view(-1, 1, 1, 1)


def _project(image: Tensor, start: Tensor, eps: float) -> Tensor:
    """Onto the L2 ball of radius ``eps`` around ``start``, then into [0, 1]."""
    delta = image - start
    norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    delta = delta * torch.where(norms > eps, eps / norms.clamp_min(1e-30), 1.0)
    return (start + delta).clamp_(0.0, 1.0)


def pullback_ascent(model: nn.Module, image: Tensor, target: Target, *, steps: int = 5,
                    step_size: float = 10.0, eps: float = 50.0,
                    temperature: Temperature = None, gate: str = "sigmoid",
                    method: str = "pullback",
                    callback: Callable[[int, AscentResult], object] | None = None,
                    progress: bool = True) -> AscentResult:
    """Ascend the target along its excitation pullback, starting at ``image``.

    ``image``: (B, 3, H, W) in pixel space [0, 1]. Each step moves ``step_size`` (L2, [0, 1]
    units) along the pullback normalised per example, projects onto the L2 ball of radius
    ``eps`` around the start and clamps to [0, 1]. ``method="gradient"`` runs the same loop on
    plain gradients. ``callback(step, result)`` runs after every step (step counts from 1);
    returning a true value stops the run. ``progress`` shows a tqdm bar on stderr.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    steps, step_size, eps = _check_steps(steps), check_positive(step_size, "step_size"), \
        check_positive(eps, "eps")
    start = check_inputs(model, image).detach()
    if start.min() < 0 or start.max() > 1:
        raise ValueError("image must be in pixel space [0, 1] (see pw.load_image)")
    temperature = check_temperature(temperature)  # None: the model's default per kind
    gate = "hard" if method == "gradient" else gate
    layers = (target.layer,) if isinstance(target, Unit) else ()

    result = AscentResult(images=[start])
    logits, probs = [], []
    current = start
    bar = tqdm(total=steps, desc=f"{method} ascent", disable=not progress, leave=False)
    try:
        for step in range(steps + 1):
            session = PullbackSession(model, current, temperature=temperature, gate=gate,
                                      layers=layers)
            logit, prob = _target_score(session, target)
            logits.append(logit)
            probs.append(prob)
            result.logits = torch.stack(logits)
            result.probs = None if prob is None else torch.stack(probs)
            if step > 0 and callback is not None and callback(step, result):
                result.stopped = True
                break
            if step == steps:
                break
            direction = _unit_l2(session.pullback(target))
            current = _project(current + step_size * direction, start, eps)
            result.images.append(current)
            bar.update(1)
    finally:
        bar.close()
    return result


@dataclass
class AscentGrid:
    """The counterfactual grid (the paper's Figure 1): rows are images, columns targets.

    ``images``/``diffs``: (N, T, 3, H, W) final images and final-minus-start;
    ``gains``: (N, T) target-logit gain; ``targets``: the T column classes.
    """

    images: Tensor
    diffs: Tensor
    gains: Tensor
    targets: list[int]


def ascent_grid(model: nn.Module, images: Tensor, targets: Sequence[int] | None = None,
                **ascent_kwargs) -> AscentGrid:
    """Pullback ascent of every image (N, 3, H, W) towards every target class.

    ``targets=None`` takes each image's own predicted class, so the diagonal shows the image's
    own class and the off-diagonal cells are counterfactuals.
    """
    start = check_inputs(model, images).detach()
    if targets is None:
        targets = PullbackSession(model, start).logits.detach().argmax(1).tolist()
    if isinstance(targets, (int, str)) or len(targets) == 0 or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in targets):
        raise TypeError("targets must be a non-empty sequence of int class indices")
    columns = [pullback_ascent(model, start, t, **ascent_kwargs) for t in targets]
    finals = torch.stack([c.images[-1] for c in columns], dim=1)
    return AscentGrid(images=finals, diffs=finals - start.unsqueeze(1),
                      gains=torch.stack([c.gain for c in columns], dim=1), targets=list(targets))
