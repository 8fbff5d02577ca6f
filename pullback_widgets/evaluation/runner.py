"""Dataset-scale evaluation: images in, one row per (image, target, method, metric) out.

The engine of ``pullback-widgets evaluate``; the same code runs in one process and, unchanged,
under ``torchrun`` (one process per GPU or CPU slot, ``gloo`` on CPU, ``nccl`` on GPU).

- **Items.** Any iterable of :class:`Item` or of tuples ``(name, image)``,
  ``(name, image, label)`` or ``(name, image, mask)``. ``image`` is a file path, a tensor
  (3, H, W) or (1, 3, H, W) in pixel space [0, 1], or a zero-argument callable returning one
  of these (so that a source can stream: only the batch in hand is decoded).
  :func:`folder_items` makes them from files and folders (searched recursively, every
  non-hidden file tried, torchvision's ImageFolder layout for labels).
- **Sharding.** Rank r of W takes items r, r + W, r + 2W, ... of the item list (sorted by name
  for folders): deterministic, and every rank knows every other rank's share. So every rank
  must be given the same items, settings, model weights and output: a run whose ranks were
  not is refused before any work. The ranks meet between the run's steps; an error in one
  ends the run in all (the others name its rank and reason), none waits for a rank that has
  given up.
- **Output.** Each batch of each method is written to its own part file in ``OUT.parts/``,
  atomically (a temporary file, then a rename), so a run killed at any moment loses at most
  the batch in flight and never leaves half a row. After every rank is done, rank 0 merges the
  previous output and the parts, one row per key (the first one met), in a fixed order (item
  position, target, method, metric), writes ``OUT`` atomically, the summary
  ``OUT-stem.summary.md`` and removes the parts. The settings are in ``OUT-stem.settings.json``.
- **Resume.** Rows already in ``OUT`` or in its parts are not computed again; a settings file
  that disagrees on anything that changes values (model, temperature, metric parameters,
  targets, ...) is refused.

Metrics (:data:`METRICS`), each one value per (image, target, method):
``deletion`` / ``insertion`` (AUC, blur baseline), ``infidelity`` (logit²,
normalised), ``ascent_gain`` (logit), ``randomisation`` (Spearman ρ of |attribution| with the
attribution on a fully re-initialised copy of the model: :func:`~.metrics.randomised_copy`);
for items with an evidence mask (:func:`synthetic_items`), ``mass``, ``pointing`` and
``mask_auc`` (:mod:`.ground_truth`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import reprlib
import shutil
import stat
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .. import synthetic
from ..gates import GATES, POOL_WEIGHTS, check_temperature
from ..images import load_image
from ..labels import find_class
from ..model_helpers import predict
from ..session import PullbackSession
from ..validation import (
    PullbackWidgetsError,
    PullbackWidgetsTypeError,
    check_choice,
    check_index,
    check_positive,
    first_line,
    is_integer,
)
from .ground_truth import MASK_METRICS
from .methods import Explainer, build_method, check_methods
from .metrics import (
    BASELINES,
    BLUR_KERNEL,
    _method_output,
    ascent_gain,
    deletion_auc,
    infidelity,
    insertion_auc,
    randomised_copy,
    spearman,
)

# Larger images would not fit in memory by the batch (4096 px: 200 MB an image in float32).
MAX_IMAGE_SIZE = 4096
# Infidelity holds all its noise draws at once, 3·image_size² values each, in float64 and
# again in the model's dtype: 2**28 values is 3 GB (1783 draws at 224 px, 21845 at 64 px).
MAX_NOISE_VALUES = 2 ** 28
# --synthetic N makes all N images (and masks) in memory before the run, about 13 bytes a
# pixel: 10000 images at 64 px, 0.5 GB.
MAX_SYNTHETIC_PIXELS = 10_000 * 64 * 64

__all__ = [
    "COLUMNS",
    "METRICS",
    "EvaluationSettings",
    "Item",
    "check_metrics",
    "check_output",
    "evaluate",
    "folder_items",
    "read_rows",
    "run_command",
    "summarise",
    "synthetic_items",
]

COLUMNS = ("image", "target", "method", "metric", "value")
# metric -> True where higher is better
METRICS = {"deletion": False, "insertion": True, "infidelity": False, "ascent_gain": True,
           "randomisation": False, "mass": True, "pointing": True, "mask_auc": True}
# metric -> the width of its range, where it has one: a paired difference lies within ± it.
# (Spearman's rho is in [-1, 1]; the others named here in [0, 1].)
METRIC_WIDTHS = {"deletion": 1.0, "insertion": 1.0, "randomisation": 2.0, "mass": 1.0,
                 "pointing": 1.0, "mask_auc": 1.0}
OUTPUT_SUFFIXES = (".csv", ".parquet")
# How long the processes of a run that started its own process group wait for each other.
MEETING_TIMEOUT = datetime.timedelta(days=1)
_PART_SUFFIX = ".csv"


# --------------------------------------------------------------------------- items

@dataclass(frozen=True)
class Item:
    """One image to evaluate. ``name`` identifies it in the output (unique); ``image`` a file
    path, a tensor (3, H, W) / (1, 3, H, W) in [0, 1] (H = W = the run's image size, or it is
    resized and cropped), or a callable returning either;
    ``label``: its class index (for ``targets="label"``); ``mask``: (H, W), carried along for
    metrics that need one."""

    name: str
    image: object
    label: int | None = None
    mask: Tensor | None = None

    def load(self, size: int) -> Tensor:
        """The image as (3, size, size) in [0, 1]. A tensor of that shape is used as it is;
        anything else goes through :func:`pullback_widgets.load_image` (resize and centre
        crop, float32)."""
        image = self.image() if callable(self.image) else self.image
        if isinstance(image, Tensor):
            image = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
            if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point() \
                    or image.numel() == 0:  # (an empty one has no min below, a raw error)
                raise PullbackWidgetsError(f"{self.name}: an image tensor must be float "
                                           f"(3, H, W), got {tuple(image.shape)} {image.dtype}")
            if image.min() < 0 or image.max() > 1 or not torch.isfinite(image).all():
                raise PullbackWidgetsError(f"{self.name}: pixel values must lie in [0, 1]")
            if tuple(image.shape[1:]) == (size, size):
                return image
        return load_image(image, size=size)[0]


def _check_mask(item: Item, size: int) -> None:
    """Refuse, before a run writes anything, a mask the mask metrics cannot score with the
    image: not bool, not (size, size) (an image of another size is resized and cropped, its
    mask is not), or without object or background pixels."""
    mask = item.mask
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise PullbackWidgetsTypeError(
            f"{item.name}: a mask must be a bool tensor, got "
            f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
    if tuple(mask.shape) != (size, size):
        raise PullbackWidgetsError(
            f"{item.name}: its mask is {tuple(mask.shape)}, not the run's image size "
            f"({size}, {size}); make the images and masks at that size")
    if mask.all() or not mask.any():
        raise PullbackWidgetsError(f"{item.name}: its mask needs object and background pixels")


def as_item(value: object) -> Item:
    """An :class:`Item` from an Item or a tuple ``(name, image[, label or mask])``."""
    if isinstance(value, Item):
        return value
    if not isinstance(value, tuple) or len(value) not in (2, 3):
        raise PullbackWidgetsTypeError(
            "items must be Item or (name, image[, label or mask]) tuples, got "
            f"{type(value).__name__}")
    name, image, *extra = value
    if not isinstance(name, str):
        raise PullbackWidgetsTypeError(f"an item's name must be a string, got {name!r}")
    third = extra[0] if extra else None
    if isinstance(third, Tensor):
        return Item(name, image, mask=third)
    return Item(name, image, label=None if third is None else check_index(third, "label"))


def _unreadable(error: OSError) -> None:
    # Not skipped like an unreadable file: the images in it would go missing without a name.
    raise PullbackWidgetsError(f"cannot read the folder {error.filename!r}: "
                               f"{error.strerror or error}") from None


def find_images(paths: Sequence[str | os.PathLike],
                exclude: Sequence[Path] = ()) -> list[Path]:
    """Every file named or under a named folder (recursively; hidden files and folders
    skipped), sorted by path, each once, but for ``exclude`` and what lies under it (a run's
    own output inside the folder it reads). A missing path is refused.

    Once means one file, however many paths reach it (a folder named twice, relatively and
    absolutely; symbolic and hard links): the first path in sorted order stands for it. A
    linked folder already walked is not walked again, so a link to a parent ends there."""
    found: set[Path] = set()
    walked: set[str] = set()
    for raw in paths:
        path = Path(raw)
        try:
            exists = path.exists()
        except OSError as error:  # exists() passes on all but "no such file": a name too long
            raise PullbackWidgetsError(f"cannot read {str(path)!r}: "
                                       f"{error.strerror or error}") from None
        if not exists:
            raise PullbackWidgetsError(f"no such file or folder: {str(path)!r}")
        if not path.is_dir():  # a file, or something the loader refuses with its reason
            found.add(path)
            continue
        for root, folders, files in os.walk(path, followlinks=True, onerror=_unreadable):
            walked.add(os.path.realpath(root))
            folders[:] = [f for f in folders if not f.startswith(".")
                          and os.path.realpath(os.path.join(root, f)) not in walked]
            found.update(Path(root) / f for f in files if not f.startswith("."))
    excluded = {path.resolve() for path in exclude}
    by_file: dict[object, Path] = {}
    for file in sorted(found, key=str):
        real = _resolved(file)
        if not excluded & {real, *real.parents}:
            by_file.setdefault(_identity(file, real), file)
    return list(by_file.values())


def _resolved(file: Path) -> Path:
    """The file a path names, links followed; a link loop stays itself (it is skipped, with
    its reason, when it is read)."""
    try:
        return file.resolve()
    except (RuntimeError, OSError):
        return file.absolute()


def _identity(file: Path, real: Path) -> object:
    """What makes two paths one file: its device and inode (hard links too), else its path (a
    dangling link, a link loop: skipped with their reason when read)."""
    return _file_identity(file) or real


def folder_items(paths: Sequence[str | os.PathLike], *, labels_from_folders: bool = False,
                 class_names: Sequence[str] | None = None, limit: int | None = None,
                 exclude: Sequence[Path] = ()) -> list[Item]:
    """Items for the image files named in ``paths`` or found under its folders (sorted by
    path; the first ``limit``). ``labels_from_folders``: each image's label is its folder's
    name read as a class index or a class name of ``class_names`` (torchvision's ImageFolder
    layout, ``root/tabby/0001.jpg``); a folder that names no class is refused."""
    files = find_images(paths, exclude)
    if limit is not None:
        files = files[:check_index(limit, "limit", 1)]
    if not files:
        raise PullbackWidgetsError(f"no files found in {[str(p) for p in paths]}")
    if not labels_from_folders:
        return [Item(str(f), f) for f in files]
    if class_names is None:
        raise PullbackWidgetsError("labels_from_folders needs the model's class names")
    labels: dict[str, int] = {}
    for folder in sorted({f.parent.name for f in files}):
        try:
            labels[folder] = find_class(folder, class_names)
        except ValueError as error:
            raise PullbackWidgetsError(f"folder {folder!r}: {error}") from None
    return [Item(str(f), f, label=labels[f.parent.name]) for f in files]


def synthetic_items(n: int, *, seed: int = 0, size: int = synthetic.INPUT_SIZE) -> list[Item]:
    """The ``n`` images of :func:`pullback_widgets.synthetic.make_dataset` as items
    ``shapes-s{seed}-{i:06d}`` with their labels and evidence masks (for ``targets="label"``
    and the mask metrics). Held in memory: about 50 KB per 64 px image."""
    images, labels, masks = synthetic.make_dataset(n, size=size, seed=seed)
    return [Item(f"shapes-s{seed}-{i:06d}", images[i], label=int(labels[i]), mask=masks[i])
            for i in range(n)]


# --------------------------------------------------------------------------- settings

_SEED_LIMIT = 2 ** 62


@dataclass(frozen=True)
class EvaluationSettings:
    """Everything that decides a run's values, recorded next to the output.

    ``targets``: ``"predicted"`` (top-1), ``"top-K"`` (the K most probable classes) or
    ``"label"`` (each item's label). Deletion/insertion: ``steps`` chunks, ``baseline``;
    infidelity: ``perturbations`` draws of N(0, ``noise_std``²) pixel noise (seed ``seed``);
    ascent gain: ``ascent_steps`` of L2 length ``step_size`` in the ball of radius ``eps``
    (pixel units); randomisation: seed ``seed``. Forward passes run ``forward_batch`` images
    at a time; ``batch_size`` images are evaluated together.

    Every field is checked here, before a run writes anything: ``steps`` at most
    ``image_size²`` (with deletion or insertion), ``perturbations`` at most
    ``2**28 // (3 · image_size²)`` (with infidelity: the draws are held in memory at once).
    """

    model: str = "efficientnet_lite0"
    methods: tuple[str, ...] = ("gradient", "pullback", "random")
    metrics: tuple[str, ...] = ("deletion", "insertion", "infidelity")
    targets: str = "predicted"
    temperature: float | None = None
    gate: str = "sigmoid"
    pool_weights: str | None = None
    image_size: int = 224
    batch_size: int = 8
    forward_batch: int = 32
    steps: int = 16
    baseline: str = "blur"
    perturbations: int = 32
    noise_std: float = 0.1
    ascent_steps: int = 5
    step_size: float = 10.0
    eps: float = 50.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.methods, str) or not self.methods:
            raise PullbackWidgetsTypeError("methods must be a non-empty list of method names")
        # A bare name is refused as one, not split into one-letter names.
        check_metrics(self.metrics if isinstance(self.metrics, str) else list(self.metrics))
        self.top_k()
        if self.pool_weights is not None and self.pool_weights not in POOL_WEIGHTS:
            raise PullbackWidgetsError(f"pool_weights must be one of {POOL_WEIGHTS}, "
                                       f"got {self.pool_weights!r}")
        # Stored as plain ints and floats: the settings file is JSON, which has no numpy
        # int64 or float32 (the raw TypeError came after the checks, as the run began).
        for name in ("image_size", "batch_size", "forward_batch", "steps", "perturbations",
                     "ascent_steps"):
            object.__setattr__(self, name, check_index(getattr(self, name), name, 1))
        # torch seeds are 64-bit, and the runs add an image's index to this one.
        if not is_integer(self.seed) or not -_SEED_LIMIT <= self.seed < _SEED_LIMIT:
            raise PullbackWidgetsError(f"seed must be an integer in [-2**62, 2**62), got "
                                       f"{self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        check_choice(self.gate, GATES, "gate")
        blurred = self.baseline == "blur" and {"deletion", "insertion"} & set(self.metrics)
        smallest = BLUR_KERNEL // 2 + 1 if blurred else 1
        if not smallest <= self.image_size <= MAX_IMAGE_SIZE:
            raise PullbackWidgetsError(
                f"image_size must be in [{smallest}, {MAX_IMAGE_SIZE}] px"
                + (" (the blur baseline's kernel)" if smallest > 1 else "")
                + f", got {self.image_size}")
        # The rest fail only inside the metrics, after the run has written its first files.
        check_choice(self.baseline, BASELINES, "baseline")
        for name in ("noise_std", "step_size", "eps"):
            object.__setattr__(self, name, check_positive(getattr(self, name), name))
        pixels = self.image_size ** 2
        if {"deletion", "insertion"} & set(self.metrics) and self.steps > pixels:
            raise PullbackWidgetsError(f"steps must be at most image_size² = {pixels} (a chunk "
                                       f"is at least one pixel), got {self.steps}")
        draws = MAX_NOISE_VALUES // (3 * pixels)
        if "infidelity" in self.metrics and self.perturbations > draws:
            raise PullbackWidgetsError(
                f"perturbations must be at most {draws} at {self.image_size} px (the noise "
                f"draws are held in memory, 2**28 values in all), got {self.perturbations}")

    def top_k(self) -> int | None:
        """K for ``top-K`` (1 for ``predicted``), None for ``label``."""
        if not isinstance(self.targets, str):  # re would fail on it with its own words
            raise PullbackWidgetsTypeError(
                f"targets must be 'predicted', 'top-K' (e.g. top-5) or 'label', got "
                f"{type(self.targets).__name__}")
        if self.targets == "predicted":
            return 1
        if self.targets == "label":
            return None
        match = re.fullmatch(r"top-([1-9][0-9]*)", self.targets)
        if match is None:
            raise PullbackWidgetsError(
                f"targets must be 'predicted', 'top-K' (e.g. top-5) or 'label', "
                f"got {self.targets!r}")
        return int(match.group(1))

    def explainers(self, model: nn.Module) -> dict[str, Explainer]:
        """The methods by their stable names (:data:`~.methods.METHODS`)."""
        return {name: build_method(name, model, temperature=self.temperature, gate=self.gate,
                                   pool_weights=self.pool_weights,
                                   batch_size=self.forward_batch)
                for name in self.methods}

    def values_key(self) -> dict[str, object]:
        """The settings a resumed run must share: all but what is evaluated and how much at
        a time."""
        skip = {"methods", "metrics", "batch_size"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def check_metrics(names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or not names:
        raise PullbackWidgetsTypeError("metrics must be a non-empty list of metric names")
    for name in names:
        check_choice(name, METRICS, "metric")
    if len(set(names)) != len(names):
        raise PullbackWidgetsError(f"metrics are listed twice: {list(names)}")
    return list(names)


# --------------------------------------------------------------------------- output files

def _settings_path(out: Path) -> Path:
    return out.with_name(out.stem + ".settings.json")


def summary_path(out: Path) -> Path:
    return out.with_name(out.stem + ".summary.md")


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def check_output(out: str | os.PathLike, resume: bool) -> Path:
    """``out`` as a Path if the run may write it: a .csv or .parquet file (pyarrow installed
    for Parquet) in a writable folder, not there yet unless ``resume``."""
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise PullbackWidgetsError(f"--out must end in .csv or .parquet, got {str(out)!r}")
    if out.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise PullbackWidgetsError(
                "Parquet output needs pyarrow: pip install 'pullback-widgets[parquet]' (the "
                "parquet extra), or write .csv") from None
    with unwritable_out(out):
        if out.is_dir():
            raise PullbackWidgetsError(f"--out {str(out)!r} is a folder; give a file name")
        for own in (out, _settings_path(out), summary_path(out)):
            refuse_special_file(own)
        parts = _parts_dir(out)
        if parts.is_symlink() or (parts.exists() and not parts.is_dir()):
            raise PullbackWidgetsError(f"{str(parts)!r} is not the run's own folder (a link or "
                                       "a file); remove it")
        if not resume:
            # The settings and summary are named by the stem: r.csv and r.parquet share them.
            for existing in (out, parts, _settings_path(out), summary_path(out)):
                if existing.exists():
                    raise PullbackWidgetsError(
                        f"{str(existing)!r} exists (a run's, or a file of yours); pass "
                        "--resume to continue that run, or remove it, or write elsewhere")
    # The folders are made once every check has passed (evaluate): probe the nearest that is.
    check_writable_folder(out)
    return out


@contextlib.contextmanager
def unwritable_out(out: Path) -> Iterator[None]:
    """Around checks of ``--out``: an OSError (a name too long, a loop of links on its path)
    is the one-line error that it cannot be written."""
    try:
        yield
    except OSError as error:
        raise PullbackWidgetsError(f"--out {str(out)!r} cannot be written: "
                                   f"{error.strerror or error}") from None


def check_writable_folder(out: Path) -> None:
    """Refuse an ``out`` whose folder cannot be made and written: the nearest folder on its
    path that exists must be a folder we can write in (a link there that leads nowhere, or
    loops, would only fail when the result is written, after the work)."""
    with unwritable_out(out):
        folder = next(parent for parent in out.absolute().parents if os.path.lexists(parent))
        if not folder.is_dir():  # follows links: a dangling one or a loop is no folder
            raise NotADirectoryError(20, f"{str(folder)!r} is a file, or a link that leads "
                                         "to no folder")
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".pullback-widgets-probe-"):
            pass


def refuse_special_file(out: Path) -> None:
    """Refuse an ``out`` that exists and is no regular file (a link, dangling or not, a device,
    a pipe, a socket, a folder beside the output): the atomic rename would replace it (a link
    itself, not what it points to), and a read of a pipe blocks."""
    if out.is_symlink() or (out.exists() and not stat.S_ISREG(out.stat().st_mode)):
        raise PullbackWidgetsError(f"{str(out)!r} is not a regular file (a link, folder, device, "
                                   "pipe or socket); remove it or write elsewhere")


# What a run's lock file holds: a file by that name that holds anything else is the user's.
LOCK_MARKER = b"pullback-widgets evaluate lock\n"


class OutputLock:
    """An exclusive lock on one output, held by the process that writes it (rank 0) while the
    run lasts: a second run into it at the same time (another terminal, a re-run cell) is
    refused instead of interleaving its writes. The lock covers the name stem, as the settings
    and summary do (r.csv and r.parquet share them). It is the OS's (``flock``): a killed run
    holds nothing, and the file it leaves does not block. The file holds :data:`LOCK_MARKER`;
    one by that name that is no regular file, or holds anything but the marker or nothing (an
    older version's lock, or a run killed before it wrote), is the user's: refused, never
    removed. No lock where the OS has no ``flock`` (Windows)."""

    def __init__(self, out: Path) -> None:
        self.path = out.with_name(f".{out.stem}.lock")
        self._fd: int | None = None
        try:
            import fcntl
        except ImportError:
            return
        while self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                             0o644)
            except OSError as error:
                raise PullbackWidgetsError(f"cannot make the run's lock {str(self.path)!r}: "
                                           f"{error.strerror or error}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise PullbackWidgetsError(
                    f"another run is writing {str(out)!r} (or its .csv/.parquet twin) right now; "
                    "wait for it to end, or write elsewhere") from None
            try:  # the run before may have removed the file between our open and our lock
                current = os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                self._fd = fd
            else:
                os.close(fd)
        # Read and written only while locked: no other run is between its open and its write.
        regular = stat.S_ISREG(os.fstat(self._fd).st_mode)  # a pipe's read would block
        held = os.pread(self._fd, len(LOCK_MARKER) + 1, 0) if regular else None
        if held not in (b"", LOCK_MARKER):
            os.close(self._fd)
            self._fd = None
            raise PullbackWidgetsError(
                f"{str(self.path)!r} is not a pullback-widgets lock (a file of yours?), and the "
                "run's lock goes there; move it elsewhere, or write --out under another name")
        if not held:
            os.pwrite(self._fd, LOCK_MARKER, 0)

    def release(self) -> None:
        if self._fd is not None:
            # While still held: no run locks a removed file. Only if it is still ours.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self._fd).st_ino:
                    self.path.unlink()
            os.close(self._fd)
            self._fd = None


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` then rename onto ``path``: readers see all of it or nothing.
    ``write`` creates the file, so it gets the usual permissions (the umask's)."""
    # At most 100 bytes of the name: a name near the file system's limit (255 bytes) is a
    # valid output, and its temporary name must be one too.
    prefix = os.fsdecode(os.fsencode(path.name)[:100])
    temporary = path.parent / f".{prefix}.{uuid.uuid4().hex[:16]}.tmp"
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


Row = tuple[str, int, str, str, float]


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_text(name: str) -> str:
    """An image name as the CSV holds it: one that a spreadsheet would run as a formula gets a
    leading apostrophe, which spreadsheets read as "text"; so does one that is apostrophes
    before such a start, so that :func:`_name_from_csv` undoes it exactly. Other names,
    apostrophes included, are as they are (as older outputs wrote every name)."""
    return "'" + name if name.lstrip("'").startswith(_FORMULA_STARTS) else name


def _name_from_csv(text: str) -> str:
    escaped = text.startswith("'") and text.lstrip("'").startswith(_FORMULA_STARTS)
    return text[1:] if escaped else text


def _write_csv(path: Path, rows: Iterable[Row]) -> None:
    # surrogateescape: a file name that is not valid UTF-8 keeps its bytes, and reads back
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        # repr: the shortest text that reads back as the same float
        writer.writerows((_csv_text(image), target, method, metric, repr(float(value)))
                         for image, target, method, metric, value in rows)
        f.flush()
        os.fsync(f.fileno())


def _check_parquet_names(names: Iterable[str]) -> None:
    """Parquet's text is UTF-8 only: a file name that is not (kept as surrogate escapes) is a
    clear error before any work, not one after it."""
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise PullbackWidgetsError(
                f"the image name {name!r} is not valid UTF-8, which Parquet cannot hold: write "
                "the output as .csv (it keeps the name's bytes), or rename the file") from None


def _write_rows(path: Path, rows: list[Row], parquet: bool) -> None:
    if not parquet:
        _write_csv(path, rows)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(zip(*rows)) if rows else [() for _ in COLUMNS]
    types = [pa.string(), pa.int64(), pa.string(), pa.string(), pa.float64()]
    pq.write_table(pa.table({name: pa.array(list(values), type=kind)
                             for name, values, kind in zip(COLUMNS, columns, types)}), path)


def read_rows(path: str | os.PathLike) -> list[Row]:
    """The rows of an output (CSV or Parquet) or part file, as written."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path).to_pydict()
            rows = list(zip(table["image"], table["target"], table["method"], table["metric"],
                            table["value"]))
            return [(str(image), int(target), str(method), str(metric), float(value))
                    for image, target, method, metric, value in rows]
        except (pa.ArrowException, KeyError, TypeError, ValueError) as error:
            raise PullbackWidgetsError(f"{str(path)!r} is not a readable evaluation output "
                                       f"({first_line(error)})") from None
    with open(path, "rb") as f:
        # Every row is written with its line end: a last line without one was cut short, and
        # its value may read as a number all the same (0.3 for 0.3265...).
        if f.seek(0, os.SEEK_END) > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n":
            raise PullbackWidgetsError(
                f"{str(path)!r} ends in a line cut short (no line end); remove that line, or "
                "the file, and run again")
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f)
        header, rows = None, []
        try:
            header = next(reader, None)
            if tuple(header or ()) == COLUMNS:
                for image, target, method, metric, value in reader:
                    rows.append((_name_from_csv(image), int(target), method, metric,
                                 float(value)))
        except (ValueError, csv.Error) as error:  # a short row, a bad number, a huge field
            raise PullbackWidgetsError(
                f"{str(path)!r} line {reader.line_num} is damaged ({first_line(error)}); "
                "remove the line, or the file, and run again") from None
        if tuple(header or ()) != COLUMNS:
            raise PullbackWidgetsError(f"{str(path)!r} is not an evaluation output (columns "
                                       f"{header})")
        return rows


def _finished_parts(out: Path) -> list[Path]:
    parts = _parts_dir(out)
    if not parts.is_dir():  # (check_output refuses a parts path that is no folder)
        return []
    # Temporary files (a leading dot) are batches that were in flight: never merged.
    found = sorted(p for p in parts.iterdir()
                   if p.suffix == _PART_SUFFIX and not p.name.startswith("."))
    damaged = [p for p in found if _file_identity(p) is None]  # not a regular file
    if damaged:  # reading a pipe would block for ever
        raise PullbackWidgetsError(f"{str(damaged[0])!r} is not a regular file: the parts "
                                   f"folder of {str(out)!r} is damaged; remove it to start again")
    return found


def _existing_rows(out: Path, names: Sequence[str] | None = None,
                   started_in: str | None = None) -> list[Row]:
    """The rows of the output and its finished parts. ``names``: the images this run lists;
    a row for another name that is one of those files (the same folder spelled another way,
    here or from ``started_in``, the folder the run started in) would count that image twice,
    so it is refused; so is a listed relative name with rows that names another file here
    than from ``started_in`` (its rows are of that file). Rows of images no longer listed (a
    smaller --limit, a removed file) stay."""
    rows = read_rows(out) if out.exists() else []
    for part in _finished_parts(out):
        rows += read_rows(part)
    values: dict[tuple, float] = {}
    for row in rows:
        first = values.setdefault(row[:4], row[4])
        if first != row[4] and not (math.isnan(first) and math.isnan(row[4])):
            raise PullbackWidgetsError(f"{str(out)!r} holds two values for {row[:4]!r}; remove "
                                       "the wrong one, or start again")
    unlisted = sorted({row[0] for row in rows} - set(names)) if names is not None else []
    twice = _same_files(unlisted, names or (), {os.getcwd(), started_in or os.getcwd()})
    if twice is not None:
        raise PullbackWidgetsError(
            f"{str(out)!r} holds rows for {twice!r}, a file this run lists under another name: "
            "it would count twice; resume with the same paths, spelled the same way, from the "
            "folder the run started in")
    elsewhere = _other_file_here(sorted({row[0] for row in rows} & set(names or ())),
                                 started_in)
    if elsewhere is not None:
        raise PullbackWidgetsError(
            f"{str(out)!r} holds rows for {elsewhere!r}, which names another file here than in "
            f"{started_in!r}, where the run started; resume from there")
    return rows


def _same_files(unlisted: Sequence[str], names: Sequence[str], folders: set[str]) -> str | None:
    """The first of ``unlisted`` that names, from one of ``folders``, a file that one of
    ``names`` names too; None if there is none."""
    if not unlisted:
        return None
    listed = {_file_identity(Path(name)) for name in names} - {None}
    for name in unlisted:
        if any(_file_identity(Path(folder, name)) in listed for folder in folders):
            return name
    return None


def _other_file_here(names: Sequence[str], started_in: str | None) -> str | None:
    """The first of ``names`` that is relative and names another file from here than from
    ``started_in`` (a file here but none there, too); None if there is none. A synthetic
    image's name is a file in neither folder: it passes."""
    if started_in is None or started_in == os.getcwd():
        return None
    for name in names:
        if not os.path.isabs(name) and (_file_identity(Path(name))
                                        != _file_identity(Path(started_in, name))):
            return name
    return None


def _file_identity(path: Path) -> tuple[int, int] | None:
    """A regular file's (device, inode), links followed; None for anything else (no such file,
    a dangling link or a link loop, a pipe, a folder)."""
    try:
        status = path.stat()
    except (OSError, ValueError):  # no such file (a synthetic image's name), a NUL
        return None
    return (status.st_dev, status.st_ino) if stat.S_ISREG(status.st_mode) else None


# --------------------------------------------------------------------------- metrics

@dataclass
class _Batch:
    """What a metric sees: images (N, 3, H, W), one target class each (N,), the items' masks
    (N, H, W) where every item has one (else None), and the run."""

    model: nn.Module
    x: Tensor
    classes: Tensor
    settings: EvaluationSettings
    randomised: nn.Module | None
    masks: Tensor | None = None


def _metric_value(metric: str, batch: _Batch, method: str, explain: Explainer,
                  attribution: Tensor) -> Tensor:
    s, model, x, classes = batch.settings, batch.model, batch.x, batch.classes
    if metric in ("deletion", "insertion"):
        auc = deletion_auc if metric == "deletion" else insertion_auc
        return auc(model, x, classes, attribution, baseline=s.baseline, steps=s.steps,
                   batch_size=s.forward_batch)
    if metric == "infidelity":
        return infidelity(model, x, classes, attribution, n_perturbations=s.perturbations,
                          noise_std=s.noise_std, seed=s.seed, batch_size=s.forward_batch)
    if metric == "ascent_gain":
        return ascent_gain(model, x, classes, explain, steps=s.ascent_steps,
                           step_size=s.step_size, eps=s.eps)
    if metric == "randomisation":
        # NaN on the re-initialised copy (activations that overflow) is an undefined rho.
        after = _method_output(method, explain(batch.randomised, x, classes), x, finite=False)
        return spearman(attribution.sum(1).abs(), after.sum(1).abs())
    if metric in MASK_METRICS:
        return MASK_METRICS[metric](attribution, batch.masks)
    raise AssertionError(metric)  # check_metrics lets no other name through


def _targets_of(probabilities: Tensor, labels: list[int | None], k: int | None) -> list[list[int]]:
    if k is None:
        return [[label] for label in labels]
    return probabilities.topk(k, dim=1).indices.tolist()


# --------------------------------------------------------------------------- distributed

@dataclass
class _World:
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialised: bool = False
    owned: bool = False  # this run started the process group, so it ends it

    def gather(self, value: object, at: str) -> list[object]:
        """Every rank's ``value``, by rank, on every rank, at the meeting named ``at``. A rank
        at another meeting is refused, not read as its answer: one that left an earlier call
        without the others (Ctrl-C between two steps, caught) met them at another point of the
        run, or the caller's own gather."""
        if not self.initialised:
            return [value]
        gathered: list[object] = [None] * self.size
        try:
            torch.distributed.all_gather_object(gathered, (at, value))
        except RuntimeError as error:  # gloo's "Connection closed by peer", a timeout
            raise PullbackWidgetsError(
                "a process of the run stopped (killed, or it left the process group) or stopped "
                "answering: see its output; --resume continues from the rows written"
            ) from error
        for rank, entry in enumerate(gathered):
            tagged = isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)
            if not tagged or entry[0] != at:
                # Every rank raises here, at this one meeting: the next call finds them in step.
                raise PullbackWidgetsError(
                    f"the processes of the run are out of step (rank {rank} of {self.size} is at "
                    f"{reprlib.repr(entry[0] if tagged else entry)}, this one at {at!r}): one "
                    "is not in this call (it left an earlier one without the others, or never "
                    "called evaluate); call it again in every process of the group")
        return [value for _, value in gathered]

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A part of the run that every rank does, ended together: an error on one rank ends
        the run on every rank (there as it is, on the others as a PullbackWidgetsError that
        names the rank and its reason). Else the others waited for it at their next meeting,
        for ever where its process lived on (a caller that caught the error), or met its next
        call there. SystemExit and KeyboardInterrupt too (a caller may catch them and call
        again): the rank that has them tells the others once they end the step."""
        try:
            yield
        except BaseException as error:
            with contextlib.suppress(PullbackWidgetsError):  # a broken group: ours stands
                self.gather(_reason(error), name)
            raise
        for rank, reason in enumerate(self.gather(None, name)):
            if reason is not None:
                raise PullbackWidgetsError(f"rank {rank} of {self.size} failed: {reason}")


def _reason(error: BaseException) -> str:
    """An error as one line for the other ranks: a user error's message, else its type and
    message; its type alone where it has none (KeyboardInterrupt) or cannot print it."""
    try:
        message = str(error).strip()
    except Exception:  # a broken __str__: the others must still be told
        message = ""
    if not message:
        return type(error).__name__
    line = message.splitlines()[0][:200]
    return line if isinstance(error, PullbackWidgetsError) else f"{type(error).__name__}: {line}"


def _environment_int(name: str, default: str, minimum: int) -> int:
    """The environment variable ``name`` (torchrun's) as an int >= ``minimum``; else a clear
    error (a raw int() error, or a wait for processes that never come)."""
    text = os.environ.get(name, default)
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise PullbackWidgetsError(f"the environment variable {name} must be a whole number "
                                   f">= {minimum}, got {text!r}: start the processes with "
                                   "torchrun")
    return value


def _join_world() -> _World:
    """This process's place among torchrun's (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), or
    in the process group the caller started (its rank and size: it may have been started
    without those variables); a world of one without either. GPU ``LOCAL_RANK`` (in the
    caller's group without it: the GPU it chose) and NCCL where CUDA is available, else the CPU
    and gloo."""
    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    if joined:  # read from the environment, every process would run every image
        size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    else:
        size = _environment_int("WORLD_SIZE", "1", 1)
        rank = _environment_int("RANK", "0", 0)
    if joined and "LOCAL_RANK" not in os.environ and torch.cuda.is_available():
        # The GPU the caller chose (torch.cuda.set_device): LOCAL_RANK's default, 0, put every
        # rank of its group on GPU 0 (NCCL refuses two ranks on one GPU).
        local = torch.cuda.current_device()
    else:
        local = _environment_int("LOCAL_RANK", "0", 0)
    if rank >= size:  # its share would be empty, and the process group would wait for it
        raise PullbackWidgetsError(f"RANK {rank} is not below WORLD_SIZE {size}: start the "
                                   "processes with torchrun")
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise PullbackWidgetsError(
                f"LOCAL_RANK {local} has no GPU of its own ({torch.cuda.device_count()} "
                "visible): start at most one process per GPU (--nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if size == 1:
        return _World(0, 1, device)
    owned = not joined
    if owned:
        # Each meeting waits for the slowest rank's part of the run, its whole share at the
        # end of scoring: torch's default limit (30 min for gloo, 10 for NCCL) failed long runs
        # whose ranks differ that much. A rank that dies still fails the others at once.
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=MEETING_TIMEOUT)
    return _World(rank, size, device, initialised=True, owned=owned)


# --------------------------------------------------------------------------- the run

@dataclass
class RunReport:
    """What rank 0 returns: the merged rows, the markdown summary, and the counts."""

    rows: list[Row]
    summary: str
    images: int
    skipped: list[tuple[str, str]]
    seconds: float


def _batches(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _load_batch(items: Sequence[Item], size: int, skipped: list[tuple[str, str]],
                ) -> tuple[list[Item], list[Tensor]]:
    kept, images = [], []
    for item in items:
        try:
            images.append(item.load(size))
        except (ValueError, TypeError, OSError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            # repr: a file name cannot break the line, nor add rows to the summary's tables
            print(f"pullback-widgets: skipped {item.name!r}: {message}", file=sys.stderr)
            skipped.append((item.name, message))
            continue
        kept.append(item)
    return kept, images


def _evaluate_shard(items: Sequence[Item], model: nn.Module, settings: EvaluationSettings,
                    methods: Mapping[str, Explainer], world: _World, out: Path,
                    done: set[tuple[str, int, str, str]],
                    progress: bool) -> tuple[int, list[tuple[str, str]], list[str]]:
    """Score this rank's share; each (batch, method) goes to its own part file. Returns the
    number of images that got new rows, the files skipped as unreadable, and the names of the
    part files written."""
    randomised = (randomised_copy(model, settings.seed)
                  if "randomisation" in settings.metrics else None)
    k = settings.top_k()
    # A model without parameters (or with integer ones only) takes float32, as gating_probe
    # ran it.
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() \
        else torch.float32
    parts = _parts_dir(out)
    parts.mkdir(exist_ok=True)
    stamp = f"{time.time_ns():x}-r{world.rank:05d}"
    written: list[str] = []  # the part files, by name: rank 0 checks that it sees them
    evaluated, skipped = 0, []
    bar = tqdm(total=len(items), desc=f"rank {world.rank}", unit="image", position=world.rank,
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    with bar:
        for chunk in _batches(items, settings.batch_size):
            kept, images = _load_batch(chunk, settings.image_size, skipped)
            if kept:
                x = torch.stack(images).to(world.device, dtype)
                # Only where a metric reads them (evaluate checked them then): masks of other
                # sizes that no metric needs do not stack.
                masks = (torch.stack([it.mask for it in kept]).to(world.device)
                         if set(settings.metrics) & MASK_METRICS.keys() else None)
                probabilities = predict(model, x).softmax(1)
                targets = _targets_of(probabilities, [it.label for it in kept], k)
                pairs = [(i, t) for i, classes in enumerate(targets) for t in classes]
                scored: set[int] = set()
                for method, explain in methods.items():
                    todo = [(i, t, [m for m in settings.metrics
                                    if (kept[i].name, t, method, m) not in done])
                            for i, t in pairs]
                    todo = [entry for entry in todo if entry[2]]
                    if not todo:
                        continue
                    rows = _score(model, x, masks, todo, kept, method, explain, settings,
                                  randomised)
                    path = parts / f"{stamp}-{len(written):06d}{_PART_SUFFIX}"
                    atomic_write(path, lambda tmp, rows=rows: _write_csv(tmp, rows))
                    written.append(path.name)
                    scored.update(i for i, _, _ in todo)
                evaluated += len(scored)
            bar.update(len(chunk))
    return evaluated, skipped, written


def _score(model: nn.Module, x: Tensor, masks: Tensor | None,
           todo: list[tuple[int, int, list[str]]], kept: Sequence[Item], method: str,
           explain: Explainer, settings: EvaluationSettings,
           randomised: nn.Module | None) -> list[Row]:
    """The rows of one method for the (image, target, metrics) entries of ``todo``."""
    index = torch.tensor([i for i, _, _ in todo], device=x.device)
    classes = torch.tensor([t for _, t, _ in todo], device=x.device)
    batch = _Batch(model, x[index], classes, settings, randomised,
                   None if masks is None else masks[index])
    # Checked for every metric (deletion did, but randomisation correlated a map of one image
    # for the batch and wrote one row for it without a word, and a NaN map as NaN).
    attribution = _method_output(method, explain(model, batch.x, classes), batch.x)
    rows: list[Row] = []
    for metric in settings.metrics:
        wanted = [n for n, (_, _, metrics) in enumerate(todo) if metric in metrics]
        if not wanted:
            continue
        if len(wanted) < len(todo):  # resumed: only the pairs that lack this metric
            keep = torch.tensor(wanted, device=x.device)
            sub = dataclasses.replace(
                batch, x=batch.x[keep], classes=classes[keep],
                masks=None if batch.masks is None else batch.masks[keep])
            values = _metric_value(metric, sub, method, explain, attribution[keep])
        else:
            values = _metric_value(metric, batch, method, explain, attribution)
        for n, value in zip(wanted, values.tolist()):
            i, t, _ = todo[n]
            rows.append((kept[i].name, t, method, metric, value))
    return rows


def _merge(rows: list[Row], items: Sequence[Item],
           settings: EvaluationSettings) -> list[Row]:
    """One row per (image, target, method, metric), the first met, in the fixed order:
    item position (unknown images after, by name), target, method, metric."""
    unique: dict[tuple, Row] = {}
    for row in rows:
        unique.setdefault(row[:4], row)
    position = {item.name: n for n, item in enumerate(items)}
    methods = {m: n for n, m in enumerate(settings.methods)}
    metrics = {m: n for n, m in enumerate(settings.metrics)}
    far = len(items) + len(methods) + len(metrics)

    def order(row: Row):
        image, target, method, metric, _ = row
        return (position.get(image, far), image, target, methods.get(method, far), method,
                metrics.get(metric, far), metric)

    return sorted(unique.values(), key=order)


def _model_record(model: nn.Module) -> str:
    """How a run records a passed-in ``model``: by its registry name where it has one, else its
    class, and a digest of its weights (its state_dict, dtypes included), so that a resume with
    other weights is refused. (A registry model can hold any weights: ``weights=None`` gives
    random ones under the same name, and a user may train it on.)"""
    name = getattr(model, "model_name", None) or type(model).__name__
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(f"{key} {getattr(value, 'dtype', '')} "
                      f"{tuple(getattr(value, 'shape', ()))}".encode())
        if isinstance(value, Tensor):
            # Bytes as uint8: numpy has no bfloat16.
            value = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            digest.update(value.tobytes())
        else:  # a module's extra state
            digest.update(repr(value).encode())
    return f"{name} (passed in, weights {digest.hexdigest()[:12]})"


def _check_given_methods(methods: object) -> None:
    """Refuse ``methods`` that are not a mapping of names to functions: the first call of one
    failed mid-run, after the run's settings and parts folder were written."""
    if not isinstance(methods, Mapping):
        raise PullbackWidgetsTypeError(f"methods must map names to functions explain(model, x, "
                                       f"target), got {type(methods).__name__}")
    for name, explain in methods.items():
        if not isinstance(name, str) or not name.strip():
            raise PullbackWidgetsTypeError(f"a method's name must be a non-empty string, got "
                                           f"{name!r}")
        if not callable(explain):
            raise PullbackWidgetsTypeError(f"method {name!r} must be a function explain(model, "
                                           f"x, target), got {type(explain).__name__}")


def _method_sources(methods: Mapping[str, Explainer] | None,
                    settings: EvaluationSettings) -> dict[str, str]:
    """Where each method comes from: ``built-in``, or a passed-in function's module and
    qualified name, recorded and compared on resume. Only the name: the code behind it cannot
    be compared (a function edited since, or a closure over other settings, reads the same)."""
    if methods is None:
        return dict.fromkeys(settings.methods, "built-in")
    return {name: f"{getattr(f, '__module__', None) or type(f).__module__}."
                  f"{getattr(f, '__qualname__', None) or type(f).__qualname__}"
            for name, f in methods.items()}


def _check_resume_settings(out: Path, settings: EvaluationSettings, resume: bool,
                           sources: Mapping[str, str] | None = None) -> str:
    """Refuse a resume whose settings differ from the recorded ones (or are not recorded), or
    whose methods of the same name come from elsewhere (``sources``, :func:`_method_sources`);
    returns the folder the run started in (its item names are relative to it)."""
    path = _settings_path(out)
    if not resume:
        return os.getcwd()
    if not path.exists():
        made = [p for p in (out, _parts_dir(out), summary_path(out)) if os.path.lexists(p)]
        if made:  # rows (or a summary) without the settings they were made with
            raise PullbackWidgetsError(
                f"{str(made[0])!r} exists but {str(path)!r} does not, so nothing says what it "
                "was made with; remove it to start again, or restore the settings file")
        return os.getcwd()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        recorded = record.get("values", {})
        recorded = {str(k): v for k, v in recorded.items()}
        output = record.get("output", out.name)
        started_in = str(record.get("cwd", os.getcwd()))
        then = {str(k): v for k, v in record.get("method_sources", {}).items()}  # older: none
        versions_now = _versions()
        versions_then = {name: record.get(name, now)
                         for name, now in versions_now.items()}  # older records: not compared
    except (ValueError, AttributeError, TypeError, RecursionError) as error:  # JSON, UTF-8
        raise PullbackWidgetsError(
            f"{str(path)!r} is damaged ({type(error).__name__}); remove it and {str(out)!r} to "
            "start again") from None
    if output != out.name:
        raise PullbackWidgetsError(
            f"{str(path)!r} records the run that wrote {output!r}, not {str(out.name)!r} (they "
            "share a name stem); resume that output, or write this one under another name")
    if versions_then != versions_now:  # each may change values (a rule, torch's kernels)
        listed = ", ".join(f"{name} {versions_then[name]!r} then, {now!r} now"
                           for name, now in versions_now.items() if versions_then[name] != now)
        raise PullbackWidgetsError(
            f"cannot resume {str(out)!r} with other versions ({listed}): its rows would mix "
            "two versions' values; resume with the versions it started with, or start anew")
    current = json.loads(json.dumps(settings.values_key()))
    differ = sorted(k for k in set(recorded) | set(current)
                    if recorded.get(k) != current.get(k))
    if differ:
        listed = ", ".join(f"{k}: {recorded.get(k)!r} then, {current.get(k)!r} now"
                           for k in differ)
        raise PullbackWidgetsError(f"cannot resume {str(out)!r} with other settings ({listed})")
    sources = sources or {}
    changed = sorted(k for k in then.keys() & sources.keys() if then[k] != sources[k])
    if changed:
        listed = ", ".join(f"{k}: {then[k]!r} then, {sources[k]!r} now" for k in changed)
        raise PullbackWidgetsError(f"cannot resume {str(out)!r} with other methods under the "
                                   f"same names ({listed})")
    return started_in


def _versions() -> dict[str, str | None]:
    """The torch and pullback-widgets versions this run computes with, as recorded."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("pullback-widgets")
    except PackageNotFoundError:
        package = None
    return {"torch": torch.__version__, "pullback-widgets": package}


def _write_settings(out: Path, settings: EvaluationSettings, extra: Mapping[str, object]):
    record = {"output": out.name, "settings": dataclasses.asdict(settings),
              "values": settings.values_key(), **_versions(), **extra}
    # ASCII: a skipped file's name that is not UTF-8 (surrogate-escaped bytes) is escaped too.
    text = json.dumps(record, indent=1, ensure_ascii=True)
    path = _settings_path(out)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _run_identity(settings: EvaluationSettings, sources: Mapping[str, str],
                  items: Sequence[Item], out: Path, resume: bool) -> dict[str, object]:
    """What every rank of one run must be given alike: its settings field by field (a model
    passed in is named there with a digest of its weights), the methods' sources, the items'
    names and labels (as a digest), the file the output names, ``resume``, and the working
    folder where an image is a relative path (another one reads other files by the same
    names). As the settings file holds them: a list and a tuple of the same methods, a numpy
    label and an int, ``r.csv`` and its absolute path, are one run."""
    listed = repr([(item.name, int(item.label) if is_integer(item.label) else item.label)
                   for item in items])
    relative = any(isinstance(item.image, (str, os.PathLike)) and not os.path.isabs(item.image)
                   for item in items)
    identity = {**dataclasses.asdict(settings), "methods' sources": dict(sources),
                "items": hashlib.sha256(listed.encode("utf-8", "backslashreplace")).hexdigest(),
                "out": os.path.realpath(out), "resume": resume,
                "working folder": os.getcwd() if relative else None}
    return json.loads(json.dumps(identity))


def _check_same_run(world: _World, identity: Mapping[str, object]) -> None:
    """Refuse, on every rank and before any work, ranks given other items, settings, model or
    output than rank 0: each takes its share of its own list and writes beside its own
    output, and rank 0 merges by its own, so the merged output missed images and held others
    twice, or mixed rows of two settings or two models, without a word."""
    gathered = world.gather(identity, "same run")
    first = gathered[0]
    for rank, theirs in enumerate(gathered[1:], 1):
        differ = [key for key in {**first, **theirs} if first.get(key) != theirs.get(key)]
        if differ:
            raise PullbackWidgetsError(
                f"rank {rank} of {world.size} was given other {', '.join(differ)} than rank 0: "
                "every process of a run must pass the same items, settings, model weights and "
                "out (each takes its share of its own list)")


def _check_shares_here(out: Path, written: Sequence[Sequence[str]]) -> None:
    """Refuse to merge without a rank's rows: the part files each rank wrote (``written``, by
    rank) must be in rank 0's parts folder. A rank writes beside its own ``out``: a relative
    one from another folder, or a folder on another node's disk, is not rank 0's."""
    here = {part.name for part in _finished_parts(out)}
    for rank, names in enumerate(written):
        if not here.issuperset(names):
            raise PullbackWidgetsError(
                f"rank {rank}'s rows are not where rank 0 merges them "
                f"({str(_parts_dir(out))!r}): every process must write the same --out, in a "
                "folder they all share; its rows stay in its own parts folder")


def evaluate(items: Iterable[Item | tuple], settings: EvaluationSettings,
             out: str | os.PathLike, *, resume: bool = False, model: nn.Module | None = None,
             methods: Mapping[str, Explainer] | None = None,
             progress: bool = True) -> RunReport | None:
    """Score every item for every method and metric of ``settings``; see the module docstring.

    Call it in every process of a torchrun job (or in one process): each takes its share,
    rank 0 merges and returns the :class:`RunReport`; the other ranks return None, once the
    output is written. Every process must pass the same items, settings, model weights and
    ``out`` (refused otherwise); an error in one process ends the run in all of them, the
    others raising a PullbackWidgetsError that names its rank and reason. ``model``:
    an already loaded network (default: ``load_model(settings.model)`` on this rank's
    device). ``methods``: name -> :data:`~.methods.Explainer` to evaluate instead of
    ``settings.methods`` (e.g. a grid of pullback temperatures). Raises
    :class:`~pullback_widgets.PullbackWidgetsError` before any work for a bad output path or
    settings that a resumed run does not share.
    """
    began = time.perf_counter()
    world = _join_world()
    lock = None
    try:
        # Each step ends on every rank together, and an error in it on one rank ends the run
        # on all: no rank waits for one that has given up.
        with world.step("checked"):  # every rank checks what it was given before any writes
            if methods is None:
                check_methods(list(settings.methods))
            else:
                _check_given_methods(methods)
                settings = dataclasses.replace(settings, methods=tuple(methods))
            if model is not None:  # recorded (and checked on resume) as the model that ran
                settings = dataclasses.replace(settings, model=_model_record(model))
            sources = _method_sources(methods, settings)
            out = check_output(out, resume)
            started_in = _check_resume_settings(out, settings, resume, sources)
            items = [as_item(item) for item in items]
            names = [item.name for item in items]
            if len(set(names)) != len(names):
                raise PullbackWidgetsError("item names must be unique")
            if out.suffix.lower() == ".parquet":
                _check_parquet_names(names)
            if settings.top_k() is None and any(item.label is None for item in items):
                raise PullbackWidgetsError("targets='label' needs a label for every image "
                                           "(--labels-from-folders)")
            needs_mask = [m for m in settings.metrics if m in MASK_METRICS]
            if needs_mask and any(item.mask is None for item in items):
                raise PullbackWidgetsError(f"metric(s) {', '.join(needs_mask)} need an evidence "
                                           "mask for every image (--synthetic N)")
            if needs_mask:
                for item in items:
                    _check_mask(item, settings.image_size)
            # (One process has no other to compare with: no digest of every item.)
            identity = (_run_identity(settings, sources, items, out, resume)
                        if world.initialised else None)
        if world.initialised:
            _check_same_run(world, identity)
        with world.step("model"):
            if model is None:
                from ..models import load_model

                model = load_model(settings.model, device=world.device)
            explainers = settings.explainers(model) if methods is None else dict(methods)
            # Also: does the model run at that size, and how many classes has it, before
            # anything is written.
            notices, classes = gating_probe(
                model, settings.image_size,
                pullbacks=any(name.startswith("pullback") for name in explainers))
            k = settings.top_k()
            if k is not None and k > classes:
                raise PullbackWidgetsError(f"top-{k} asks for more classes than the model's "
                                           f"{classes}")
            if k is None:  # a label past the logits failed mid-run, inside a method's gather
                for item in items:  # (an Item made directly has an unchecked label)
                    if check_index(item.label, f"{item.name}: label") >= classes:
                        raise PullbackWidgetsError(f"{item.name}: label {item.label} is not a "
                                                   f"class of the model, which has {classes}")
            if methods is not None:
                notices = (*notices, "the methods were passed in as functions: the temperature, "
                           "gate and pool_weights above are those of the built-in pullback, not "
                           "theirs")

        def rows_done() -> set[tuple]:
            return {row[:4] for row in _existing_rows(out, names, started_in)} if resume \
                else set()

        with world.step("locked"):
            out.parent.mkdir(parents=True, exist_ok=True)
            if world.rank == 0:
                lock = OutputLock(out)
                # Again, now that no other run writes here: one may have, since the first
                # checks.
                check_output(out, resume)
                _check_resume_settings(out, settings, resume, sources)
                done = rows_done()  # before anything is written: a damaged output changes nothing
                _write_settings(out, settings, {"world_size": world.size, "status": "running",
                                                "cwd": started_in, "method_sources": sources})
        with world.step("read"):  # rank 0 holds the lock: what is done no longer changes
            if world.rank != 0:
                done = rows_done()
        # Every rank has read what is done before any writes a part.
        with world.step("scored"):
            evaluated, skipped, written = _evaluate_shard(
                items[world.rank::world.size], model, settings, explainers, world, out, done,
                progress)
        shares = world.gather((evaluated, skipped, written), "shares")
        report = None
        with world.step("merged"):  # every rank returns once the output is written, or fails
            if world.rank == 0:
                if world.initialised:
                    _check_shares_here(out, [parts for _, _, parts in shares])
                evaluated = sum(n for n, _, _ in shares)
                skipped = [entry for _, entries, _ in shares for entry in entries]
                rows = _merge(_existing_rows(out), items, settings)
                parquet = out.suffix.lower() == ".parquet"
                # The summary of the rows before goes first: a run stopped from here on (the
                # settings still say "running") leaves none, never one of other rows than OUT's.
                summary_path(out).unlink(missing_ok=True)
                atomic_write(out, lambda tmp: _write_rows(tmp, rows, parquet))
                shutil.rmtree(_parts_dir(out), ignore_errors=True)
                seconds = time.perf_counter() - began
                summary = summarise(rows, settings, images=evaluated, skipped=skipped,
                                    seconds=seconds, world_size=world.size, notices=notices)
                atomic_write(summary_path(out), lambda tmp: tmp.write_text(
                    summary, encoding="utf-8", errors="replace"))
                _write_settings(out, settings, {"world_size": world.size, "status": "complete",
                                                "cwd": started_in, "method_sources": sources,
                                                "images": evaluated, "skipped": skipped,
                                                "rows": len(rows), "seconds": round(seconds, 3),
                                                "notices": list(notices)})
                report = RunReport(rows, summary, evaluated, skipped, seconds)
        return report
    finally:
        if lock is not None:
            lock.release()
        if world.owned:
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- summary

def _mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    values = [v for v in values if math.isfinite(v)]
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan, 1
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n), n


def _interval(values: Sequence[float], higher_is_better: bool,
              width: float = math.inf) -> str:
    """Mean and 95% interval (Student t over images) of paired differences, cut to ± the
    metric's ``width`` (on a few images of a 0/1 metric, t reaches past ± 1); ✓/✗ where it
    excludes 0."""
    from scipy.stats import t as student  # scipy comes with scikit-image

    mean, se, n = _mean_se(values)
    if n < 2 or not math.isfinite(se):
        return "—" if n == 0 else f"{mean:+.3g} (n=1)"
    half = float(student.ppf(0.975, n - 1)) * se
    mark = ""
    if abs(mean) > half:
        mark = " ✓" if (mean > 0) == higher_is_better else " ✗"
    return f"{mean:+.3g} [{max(mean - half, -width):+.3g}, {min(mean + half, width):+.3g}]{mark}"


def gating_probe(model: nn.Module, image_size: int, pullbacks: bool = True
                 ) -> tuple[tuple[str, ...], int]:
    """(the engine's notices (:attr:`PullbackSession.notices`), the number of classes) for
    ``model`` on a grey image (1, 3, image_size, image_size): whether its pullbacks are
    anything but the gradient (``pullbacks=False``: none, and only a plain forward runs). A
    model that cannot run at that size is a clear error, before a run writes anything."""
    parameter = next(model.parameters(), torch.empty(0))
    try:
        grey = torch.full((1, 3, image_size, image_size), 0.5, device=parameter.device,
                          dtype=parameter.dtype if parameter.is_floating_point() else None)
        if not pullbacks:
            return (), predict(model, grey).shape[1]
        with warnings.catch_warnings():  # said in the summary instead
            warnings.simplefilter("ignore")
            session = PullbackSession(model, grey)
            return session.notices, session.logits.shape[1]
    except RuntimeError as error:
        raise PullbackWidgetsError(f"the model cannot run on {image_size} x {image_size} "
                                   f"images (image_size): {first_line(error)}") from error


def summarise(rows: Sequence[Row], settings: EvaluationSettings, *, images: int,
              skipped: Sequence[tuple[str, str]] = (), seconds: float | None = None,
              world_size: int = 1, notices: Sequence[str] = ()) -> str:
    """The markdown summary: per metric and method, the mean ± s.e. over images, and the
    paired difference against ``gradient`` and against ``random`` with its 95% interval.

    An image evaluated at several targets counts once: its value is the mean over its
    targets (they are not independent), and n is the number of images. ``notices``: the
    engine's (:func:`gating_probe`), printed above the table.
    """
    values: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for image, target, method, metric, value in rows:
        values.setdefault((metric, method), {}).setdefault(image, {})[target] = value
    methods = list(dict.fromkeys([*settings.methods, *(m for _, m in values)]))
    metrics = list(dict.fromkeys([*settings.metrics, *(m for m, _ in values)]))

    def image_means(metric, method, reference=None):
        mine = values.get((metric, method), {})
        other = values.get((metric, reference), {}) if reference else None
        means = []
        for image, by_target in mine.items():
            if other is None:
                diffs = list(by_target.values())
            else:
                common = by_target.keys() & other.get(image, {}).keys()
                diffs = [by_target[t] - other[image][t] for t in common]
            diffs = [d for d in diffs if math.isfinite(d)]
            if diffs:
                means.append(sum(diffs) / len(diffs))
        return means

    references = [r for r in ("gradient", "random") if r in methods]
    header = ["metric", "method", "n", "mean ± s.e.",
              *(f"Δ vs {r} [95% CI]" for r in references)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for metric in metrics:
        better = METRICS.get(metric, False)
        arrow = " ↑" if better else " ↓"
        for method in methods:
            if (metric, method) not in values:
                continue
            mean, se, n = _mean_se(image_means(metric, method))
            cell = f"{mean:.4g} ± {se:.2g}" if math.isfinite(se) else f"{mean:.4g}"
            deltas = ["" if method == r else _interval(
                image_means(metric, method, r), better, METRIC_WIDTHS.get(metric, math.inf))
                for r in references]
            lines.append("| " + " | ".join([f"{metric}{arrow}", method, str(n), cell, *deltas])
                         + " |")
    skipped_text = f"{len(skipped)} file(s) skipped"
    if skipped:
        skipped_text += ": " + "; ".join(f"{name!r} ({' '.join(why.split())})"
                                         for name, why in skipped[:10])
        skipped_text += " ..." if len(skipped) > 10 else ""
    fields = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(settings).items())
    timing = "" if seconds is None else f" in {seconds:.1f} s on {world_size} process(es)"
    return "\n".join([
        "# Evaluation summary",
        "",
        f"{images} image(s) evaluated in this run{timing}; {skipped_text}; {len(rows)} rows "
        "in the output.",
        "",
        f"Settings: {fields}.",
        "",
        *(f"**Notice:** {notice}." for notice in notices),
        *([""] if notices else []),
        "Mean ± standard error over images (an image's value is the mean over its targets). "
        "Δ: paired difference (this method minus the reference) over the same (image, "
        "target) pairs, mean and 95% interval (Student t over images). ↑ higher is better, "
        "↓ lower is better; ✓ clearly better, ✗ clearly worse (the interval excludes 0).",
        "",
        *lines,
        "",
    ])


def run_command(paths: Sequence[str | os.PathLike], *, out: str | os.PathLike,
                resume: bool = False, labels_from_folders: bool = False,
                limit: int | None = None, targets: str | None = None,
                image_size: int | None = None, synthetic_images: int | None = None,
                **settings: object) -> RunReport | None:
    """``pullback-widgets evaluate``: check everything, then :func:`evaluate` the files under
    ``paths`` (or, with ``synthetic_images=N``, the first N synthetic shapes of seed
    ``settings["seed"]``, with their masks) and print the summary (rank 0).
    ``targets=None``: each image's label with ``labels_from_folders`` or synthetic images,
    else the predicted class; synthetic labels are the ``shapes`` model's classes, so another
    model needs ``predicted`` or ``top-K``. At most ``MAX_SYNTHETIC_PIXELS // image_size²``
    synthetic images (10000 at 64 px): all are made in memory first. ``image_size=None``: the
    model's. ``settings``: the other fields of :class:`EvaluationSettings`."""
    from ..models import MODELS

    if synthetic_images is not None and paths:
        raise PullbackWidgetsError("give image paths or --synthetic N, not both")
    if synthetic_images is not None and labels_from_folders:
        raise PullbackWidgetsError("--labels-from-folders reads labels from the folders of "
                                   "image paths; --synthetic images carry their own")
    if targets is None:
        targets = "label" if labels_from_folders or synthetic_images else "predicted"
    # The model is loaded by this name: one the registry lacks left image_size None below.
    model = check_choice(settings.get("model", EvaluationSettings.model), list(MODELS),
                         "model name")
    if image_size is None:
        image_size = MODELS[model].input_size
    run_settings = EvaluationSettings(targets=targets, image_size=image_size, **settings)
    if synthetic_images is not None and targets == "label" and model != "shapes":
        raise PullbackWidgetsError(
            f"--synthetic images are labelled with the shapes model's classes, not {model}'s; "
            "pass --targets predicted (or top-K) to explain its own predictions on them")
    check_methods(list(run_settings.methods))
    checked = check_output(out, resume)
    if limit is not None:
        limit = check_index(limit, "--limit", 1)
    if synthetic_images is not None:
        count = check_index(synthetic_images, "--synthetic", 1)
        size = check_index(run_settings.image_size, "--image-size", synthetic.MIN_SIZE)
        most = MAX_SYNTHETIC_PIXELS // size ** 2
        if count > most:
            raise PullbackWidgetsError(
                f"--synthetic is at most {most} images at {size} px (all are made in memory "
                f"before the run, 0.5 GB at most), got {count}")
        items = synthetic_items(count if limit is None else min(count, limit),
                                seed=run_settings.seed, size=run_settings.image_size)
    else:
        own = [checked, _settings_path(checked), summary_path(checked), _parts_dir(checked)]
        items = folder_items(paths, labels_from_folders=labels_from_folders,
                             class_names=MODELS[model].labels() if model in MODELS else None,
                             limit=limit, exclude=own)
    report = evaluate(items, run_settings, checked, resume=resume)
    if report is not None:
        print(report.summary)
        print(f"wrote {checked}, {summary_path(checked)} and "
              f"{_settings_path(checked)}", file=sys.stderr)
    return report
