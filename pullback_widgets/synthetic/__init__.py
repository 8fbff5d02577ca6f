"""Synthetic shapes with a known answer, and the small ReLU CNN that ships trained on them.

Each image (3, size, size), pixel space [0, 1], shows a textured background, a few distractors
that carry no class information (soft colour blobs and thin strokes, drawn independently of the
label), and one object whose shape is the class: circle, square, triangle or cross, at a random
position, scale, rotation and colour. The object is drawn last, so it is fully visible, and its
mask marks exactly the pixels painted with it: the evidence. An attribution method that explains
the class should put its weight there.

:func:`make_dataset` is seeded and deterministic: image i depends only on ``(seed, i)`` and
``size``, so ``make_dataset(64, seed=s)`` is the first 64 images of ``make_dataset(1000,
seed=s)``. Training (``python -m pullback_widgets.synthetic train``) draws its batches from a
separate random stream, never from a ``make_dataset`` seed, so any seed gives fresh samples.

:class:`ShapesNet` is in the paper's family: conv-BN-ReLU blocks, max-pooling, two residual
blocks, global average pooling and a linear head. ``pw.load_model("shapes")`` returns it
trained, with the weights shipped in ``pullback_widgets/data/shapes_cnn.pt`` and their
provenance (seed, steps, accuracy, time) in ``shapes_cnn.json`` beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import PullbackWidgetsError, check_index, check_positive

__all__ = [
    "CLASSES",
    "INPUT_SIZE",
    "MEAN",
    "STD",
    "WEIGHTS_PATH",
    "ShapesNet",
    "accuracy",
    "load_weights",
    "make_dataset",
    "train",
]

CLASSES = ("circle", "square", "triangle", "cross")
INPUT_SIZE = 64
# The network sees (x - 0.5) / 0.25: pixels in [0, 1] become roughly zero-mean, unit-scale.
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
WEIGHTS_PATH = DATA_DIR / "shapes_cnn.pt"
PROVENANCE_PATH = DATA_DIR / "shapes_cnn.json"

# make_dataset draws images in blocks, each from its own generator, so that image i depends on
# (seed, i) only; a block is small so that asking for n images wastes at most 63.
_BLOCK = 64
MIN_SIZE = 32  # pixels: smaller images have no room for the shapes
# Stream tags: the training batches come from keys that make_dataset never uses.
_DATASET_STREAM, _TRAIN_STREAM = 0, 1
# Accuracy of the shipped model is measured on these make_dataset seeds (fresh samples).
TEST_SEED = 7


# --------------------------------------------------------------------------- the data


def _generator(*key: int) -> torch.Generator:
    # SeedSequence mixes the whole key, so (seed, block) pairs never collide.
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _uniform(shape: tuple[int, ...], low: float, high: float, g: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=g)


def _texture(base: Tensor, size: int, keep: int, g: torch.Generator) -> Tensor:
    """The background of the first ``keep`` images: each image's base colour (count, 3, 1, 1)
    plus coloured value noise, three octaves (4, 8 and 16 cells across), ±0.12 at most;
    (keep, 3, size, size)."""
    count = base.shape[0]
    noise = torch.zeros(keep, 3, size, size)
    for cells, weight in ((4, 0.06), (8, 0.04), (16, 0.02)):
        grid = torch.rand((count, 3, cells, cells), generator=g)[:keep] * 2 - 1
        noise += weight * F.interpolate(grid, size=(size, size), mode="bicubic",
                                        align_corners=False)
    # Mostly luminance with a little colour, as textures in photos are.
    luminance = noise.mean(1, keepdim=True)
    return base[:keep] + 0.7 * luminance + 0.3 * noise


def _contrasting_colour(reference: Tensor, g: torch.Generator) -> Tensor:
    """A colour (count, 3, 1, 1) whose every channel is 0.25-0.5 above or below ``reference``
    (the background's base colour, in [0.3, 0.7]), so it always stands out."""
    offset = _uniform(reference.shape, 0.25, 0.5, g)
    sign = torch.where(torch.rand(reference.shape, generator=g) < 0.5, -1.0, 1.0)
    return (reference + sign * offset).clamp(0, 1)


def _shape_masks(labels: Tensor, size: int, keep: int, g: torch.Generator) -> Tensor:
    """Bool masks (keep, size, size) of the first ``keep`` labels' shapes at a random centre,
    scale (radius 0.14-0.25 of the size) and rotation; every shape lies fully inside the
    image."""
    count = labels.shape[0]
    radius = _uniform((count,), 0.14, 0.25, g) * size
    margin = 1.25 * radius + 1  # the triangle's circumradius is 1.2 r, the others' less
    centre_y = (margin + torch.rand(count, generator=g) * (size - 2 * margin))[:keep]
    centre_x = (margin + torch.rand(count, generator=g) * (size - 2 * margin))[:keep]
    angle = torch.rand(count, generator=g)[:keep] * 2 * math.pi
    labels, radius = labels[:keep], radius[:keep]
    pixels = torch.arange(size, dtype=torch.float32) + 0.5
    dy = pixels.view(1, -1, 1) - centre_y.view(-1, 1, 1)
    dx = pixels.view(1, 1, -1) - centre_x.view(-1, 1, 1)
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    u, v = cos * dx + sin * dy, cos * dy - sin * dx
    r = radius.view(-1, 1, 1)
    circle = u.square() + v.square() <= r.square()
    square = torch.maximum(u.abs(), v.abs()) <= 0.8 * r
    # Equilateral triangle of circumradius 1.2 r: three half-planes at the inradius 0.6 r.
    triangle = torch.ones_like(circle)
    for k in range(3):
        normal = math.pi / 2 + 2 * math.pi * k / 3
        triangle &= u * math.cos(normal) + v * math.sin(normal) <= 0.6 * r
    arm = 0.3 * r
    cross = ((u.abs() <= arm) & (v.abs() <= r)) | ((v.abs() <= arm) & (u.abs() <= r))
    shapes = torch.stack([circle, square, triangle, cross], dim=1)  # CLASSES order
    return shapes[torch.arange(keep), labels]


def _draw_distractors(images: Tensor, base: Tensor, g: torch.Generator) -> Tensor:
    """Two soft Gaussian blobs (sigma 2-6 px, opacity up to 0.8) and two strokes (1.5 px wide)
    per image, in colours that contrast with the background, at positions that ignore the label.
    ``images`` (keep, 3, size, size) are the first of ``base``'s (count, 3, 1, 1)."""
    keep, _, size, _ = images.shape
    count = base.shape[0]
    pixels = torch.arange(size, dtype=torch.float32) + 0.5
    py, px = pixels.view(1, -1, 1), pixels.view(1, 1, -1)
    for _ in range(2):
        centre = torch.rand((count, 2, 1, 1), generator=g)[:keep].mul(size)
        sigma = _uniform((count, 1, 1), 2.0, 6.0, g)[:keep]
        distance2 = (py - centre[:, 0]).square() + (px - centre[:, 1]).square()
        alpha = 0.8 * torch.exp(-distance2 / (2 * sigma.square()))
        colour = _contrasting_colour(base, g)[:keep]
        images = images + alpha.unsqueeze(1) * (colour - images)
    for _ in range(2):
        start = torch.rand((count, 2, 1, 1), generator=g)[:keep].mul(size)
        end = torch.rand((count, 2, 1, 1), generator=g)[:keep].mul(size)
        direction = end - start
        length2 = direction.square().sum(1).clamp_min(1e-6)
        # Distance from each pixel to the segment start-end.
        t = (((py - start[:, 0]) * direction[:, 0] + (px - start[:, 1]) * direction[:, 1])
             / length2).clamp(0, 1)
        distance = torch.hypot(py - start[:, 0] - t * direction[:, 0],
                               px - start[:, 1] - t * direction[:, 1])
        stroke = (distance <= 0.75).unsqueeze(1)
        images = torch.where(stroke, _contrasting_colour(base, g)[:keep], images)
    return images


def _generate(count: int, size: int, g: torch.Generator, keep: int | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """The first ``keep`` (default all) of ``count`` images drawn from ``g``. Every random
    number of all ``count`` is drawn, in the same order, so image i is the same for any
    ``keep`` > i; only the pixels of the others are not painted (one image of a 64-block at
    2048 px painted all 64, 3.2 GB a tensor and several such tensors at once)."""
    keep = count if keep is None else keep
    labels = torch.randint(0, len(CLASSES), (count,), generator=g)
    base = _uniform((count, 3, 1, 1), 0.3, 0.7, g)
    images = _texture(base, size, keep, g)
    images = _draw_distractors(images, base, g)
    masks = _shape_masks(labels, size, keep, g)
    colour = _contrasting_colour(base, g)[:keep]
    images = torch.where(masks.unsqueeze(1), colour, images)
    return images.clamp(0, 1), labels[:keep], masks


def make_dataset(n: int, *, size: int = INPUT_SIZE, seed: int = 0
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` synthetic shape images with their labels and evidence masks.

    Returns ``(images, labels, masks)``: images float32 (n, 3, size, size) in pixel space
    [0, 1]; labels a LongTensor (n,) indexing :data:`CLASSES`; masks bool (n, size, size), True
    on the pixels of the class-defining object. Image i depends only on ``(seed, i)`` and
    ``size``. ``size`` >= 32 pixels.
    """
    n = check_index(n, "n", minimum=1)
    size = check_index(size, "size", minimum=MIN_SIZE)
    seed = check_index(seed, "seed")
    try:  # made once and filled: a list of blocks joined at the end held every image twice
        images = torch.empty(n, 3, size, size)
        masks = torch.empty(n, size, size, dtype=torch.bool)
    except RuntimeError:
        raise PullbackWidgetsError(
            f"{n} images of {size} x {size} pixels need {n * size * size * 13 / 1e9:.1f} GB, "
            "more than this machine can give; make fewer or smaller ones") from None
    labels = torch.empty(n, dtype=torch.long)
    for start in range(0, n, _BLOCK):
        keep = min(_BLOCK, n - start)
        block = _generate(_BLOCK, size, _generator(_DATASET_STREAM, seed, start // _BLOCK), keep)
        for column, part in zip((images, labels, masks), block):
            column[start:start + keep] = part
    return images, labels, masks


# --------------------------------------------------------------------------- the model


def _conv_bn_relu(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False),
                         nn.BatchNorm2d(outputs), nn.ReLU())


class ResidualBlock(nn.Module):
    """ResNet's basic block: ReLU(x + BN(conv(ReLU(BN(conv(x)))))), channels and size kept.
    Each ReLU is its own module, so hooks on one (Captum's guided backprop) touch only it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(x + self.bn2(self.conv2(out)))


class ShapesNet(nn.Module):
    """A small ReLU CNN for (B, 3, 64, 64) inputs (normalised; :func:`load_model` adds the
    normalisation), 4 logits. 64 -> stem -> pool 32 -> block1 -> pool 16 -> res1 -> block2 ->
    pool 8 -> res2 -> global mean -> head; receptive field 70 px, about 0.1 M parameters."""

    def __init__(self, width: int = 16, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, width)
        self.pool1 = nn.MaxPool2d(2)
        self.block1 = _conv_bn_relu(width, 2 * width)
        self.pool2 = nn.MaxPool2d(2)
        self.res1 = ResidualBlock(2 * width)
        self.block2 = _conv_bn_relu(2 * width, 4 * width)
        self.pool3 = nn.MaxPool2d(2)
        self.res2 = ResidualBlock(4 * width)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.stem(x))
        x = self.res1(self.pool2(self.block1(x)))
        x = self.res2(self.pool3(self.block2(x)))
        return self.head(x.mean(dim=(2, 3)))


def load_weights(path: str | Path = WEIGHTS_PATH) -> ShapesNet:
    """A :class:`ShapesNet` with the state dict at ``path`` (``torch.load(weights_only=True)``),
    bare: no normalisation, eval mode."""
    net = ShapesNet()
    net.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"), strict=True)
    return net.eval()


# --------------------------------------------------------------------------- training


def _normalise(images: Tensor) -> Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images - mean) / std


def accuracy(net: nn.Module, images: Tensor, labels: Tensor, *, normalise: bool = True,
             batch_size: int = 256) -> float:
    """Fraction of ``images`` (n, 3, H, W) in [0, 1] whose argmax logit is ``labels``; the bare
    :class:`ShapesNet` needs ``normalise=True``, a :func:`load_model` model ``False``."""
    was_training = net.training
    net.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            logits = net(_normalise(batch) if normalise else batch)
            correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    net.train(was_training)
    return correct / len(images)


def train(*, steps: int = 1200, batch_size: int = 64, learning_rate: float = 3e-3,
          seed: int = 0, test_size: int = 2000, log: Callable[[str], None] | None = None
          ) -> tuple[ShapesNet, dict]:
    """Train a :class:`ShapesNet` from scratch on fresh synthetic batches.

    AdamW (weight decay 1e-4) with a one-cycle learning-rate schedule peaking at
    ``learning_rate``; batch k comes from the training stream of ``seed``, never from a
    :func:`make_dataset` seed. Returns the bare network in eval mode and its provenance: seed,
    steps, batch size, accuracy on ``make_dataset(test_size, seed=TEST_SEED)``, wall time in
    seconds, the torch thread count and the machine's 15-minute load average at the end.
    """
    steps = check_index(steps, "steps", minimum=1)
    batch_size = check_index(batch_size, "batch_size", minimum=2)
    learning_rate = check_positive(learning_rate, "learning_rate")
    seed = check_index(seed, "seed")
    test_size = check_index(test_size, "test_size", minimum=1)
    # The initial weights come from ``seed``; the caller's global random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ShapesNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate,
                                                   total_steps=steps)
    started = time.perf_counter()
    net.train()
    for step in range(steps):
        images, labels, _ = _generate(batch_size, INPUT_SIZE,
                                      _generator(_TRAIN_STREAM, seed, step))
        loss = F.cross_entropy(net(_normalise(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log is not None and (step + 1) % 100 == 0:
            log(f"step {step + 1}/{steps}  loss {loss.item():.3f}  "
                f"{time.perf_counter() - started:.0f} s")
    seconds = time.perf_counter() - started
    test_images, test_labels, _ = make_dataset(test_size, seed=TEST_SEED)
    net.eval()
    provenance = {
        "seed": seed, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
        "test_seed": TEST_SEED, "test_size": test_size,
        "test_accuracy": accuracy(net, test_images, test_labels),
        "train_seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        # Wall time means little without it on a shared machine.
        "load_average_15min": round(os.getloadavg()[2], 1) if hasattr(os, "getloadavg")
        else None,
    }
    return net, provenance


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pullback_widgets.synthetic",
        description="Train the shapes CNN and write its weights and provenance.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("train", help="train from scratch (seeded)")
    command.add_argument("--steps", type=int, default=1200)
    command.add_argument("--batch-size", type=int, default=64)
    command.add_argument("--learning-rate", type=float, default=3e-3)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    command.add_argument("--out", type=Path, default=WEIGHTS_PATH,
                         help="weights file; the provenance goes beside it as .json")
    command.add_argument("--overwrite", action="store_true",
                         help="replace an existing weights file")
    args = parser.parse_args(argv)
    from ..evaluation.runner import check_writable_folder  # (runner imports this module)

    provenance_path = args.out.with_suffix(".json")
    try:
        if args.out.is_dir() or args.out.suffix == ".json":
            raise PullbackWidgetsError(f"--out {str(args.out)!r} must name the weights file (such "
                                       "as shapes_cnn.pt); the provenance goes beside it as .json")
        for path in (args.out, provenance_path):
            if path.exists() and not args.overwrite:
                raise PullbackWidgetsError(f"{path} exists; pass --overwrite to replace it")
        # Before training, not after it: the folder is made and written once the work is done.
        check_writable_folder(args.out)
        threads = check_index(args.threads, "threads", minimum=1)
        torch.set_num_threads(threads)
        net, provenance = train(steps=args.steps, batch_size=args.batch_size,
                                learning_rate=args.learning_rate, seed=args.seed,
                                log=lambda line: print(line, flush=True))
    except PullbackWidgetsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Temporary files of our own beside them (not NAME.tmp, which may be the user's), both
    # written before either is renamed: a failed write leaves the earlier pair as it was. The
    # earlier provenance goes first, so that a run stopped between the renames leaves the new
    # weights without one, never beside the old one. A rename replaces a link, never writes
    # through it.
    temporaries = [path.with_name(f".{path.name}.{os.getpid()}.tmp")
                   for path in (args.out, provenance_path)]
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), temporaries[0])
        temporaries[1].write_text(json.dumps(provenance, indent=2) + "\n")
        provenance_path.unlink(missing_ok=True)
        temporaries[0].replace(args.out)
        temporaries[1].replace(provenance_path)
    except OSError as err:  # a full disk, say: the training is lost, but in one line
        print(f"error: could not write --out {str(args.out)!r}: {err.strerror or err}",
              file=sys.stderr)
        return 2
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
    print(json.dumps(provenance, indent=2))
    return 0

