"""``pullback-widgets explain | grid | evaluate | app``: reports, evaluation, the classroom app.

A user error (a :class:`~pullback_widgets.validation.PullbackWidgetsError`, unavailable model
weights, or Voilà missing for ``app``) is one line on stderr and exit status 2. Anything else is
a bug and shows its traceback.

Nothing the user owns is lost: ``--out`` may not be one of the input images, an existing file
that is not ``.html`` is replaced only with ``--force``, and ``--out`` is checked (a directory,
a place that cannot be written) before any computing starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from . import __name__ as package_name
from . import figures
from .app import DEFAULT_PORT
from .ascent import ascent_grid
from .evaluation.methods import METHODS
from .evaluation.runner import (
    MAX_SYNTHETIC_PIXELS,
    METRICS,
    EvaluationSettings,
    atomic_write,
    check_writable_folder,
    refuse_special_file,
    run_command,
    unwritable_out,
)
from .gates import POOL_WEIGHTS
from .images import SAMPLE_IMAGES, load_image, sample_image
from .labels import find_class
from .model_helpers import default_temperatures
from .models import MODELS, WeightsUnavailableError, load_model
from .report import explain, explain_html, explain_work, grid_html
from .validation import PullbackWidgetsError, check_index, check_positive

EXIT_ERROR = 2
# Each ascent step keeps its frame in memory while the report is made (two ascents, about 0.6 MB
# a frame; the page shows six of them); the paper uses 5 to 10 steps.
MAX_STEPS = 100
USER_ERRORS = (PullbackWidgetsError, WeightsUnavailableError)  # Voilà missing is the former
REPORT_SUFFIXES = (".html", ".htm")
DEFAULT_METHODS = EvaluationSettings.methods


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage dump is not one line
        raise PullbackWidgetsError(message)


def _positive_float(text: str) -> float:
    try:
        return check_positive(float(text), "the value")
    except ValueError as error:  # float("abc") and the check alike
        raise argparse.ArgumentTypeError(
            f"not a number: {text!r}" if "convert" in str(error) else str(error)) from None


def _steps(text: str) -> int:
    try:
        steps = check_index(int(text), "the value", minimum=0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 0 to {MAX_STEPS}, got {text!r}") from None
    if steps > MAX_STEPS:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_STEPS} steps (each step keeps a frame in memory), got {steps}")
    return steps


def _out_path(example: str) -> Callable[[str], Path]:
    """An ``--out`` parser: the text as a Path, refusing one written as a folder (``reports/``,
    ``reports/.``, ``..``): Path drops a final separator or ".", and the output would be
    written as a file named ``reports`` (or, for "..", fail once all the work was done)."""
    def parse(text: str) -> Path:
        last = text.replace(os.altsep, os.sep) if os.altsep else text
        if last.rsplit(os.sep, 1)[-1] in ("", ".", ".."):
            if not text:
                raise argparse.ArgumentTypeError("is empty; give a file name, e.g. "
                                                 f"{example!r}")
            raise argparse.ArgumentTypeError(
                f"{text!r} names a folder; give a file name, e.g. {str(Path(text) / example)!r}")
        return Path(text)

    return parse


_report_path = _out_path("report.html")


def _input_sizes() -> str:
    """The registry models' input sizes for ``--image-size``'s help: "224 px, shapes 64"."""
    common = Counter(spec.input_size for spec in MODELS.values()).most_common(1)[0][0]
    others = [f"{name} {spec.input_size}" for name, spec in sorted(MODELS.items())
              if spec.input_size != common]
    return ", ".join([f"{common} px", *others])


def _build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="pullback-widgets",
                            description="Excitation pullbacks (arXiv 2507.22832) as reports.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", default="efficientnet_lite0", choices=sorted(MODELS),
                         help="model name (default: the embedded offline efficientnet_lite0)")
        sub.add_argument("--temperature", type=_positive_float, default=None,
                         help="gate temperature T (default: the model's own)")
        sub.add_argument("--gate", default="sigmoid", choices=["sigmoid", "normal_cdf", "hard"],
                         help="backward gate (default sigmoid; hard: the plain gradient)")
        sub.add_argument("--pool-weights", default="differentiated", choices=POOL_WEIGHTS,
                         help="soft max-pool rule: softmax weights differentiated (the "
                              "paper's first version, default) or detached (its later one)")
        sub.add_argument("--steps", type=_steps, default=5,
                         help=f"ascent steps, 0 to {MAX_STEPS} (default 5)")
        sub.add_argument("--step-size", type=_positive_float, default=10.0,
                         help="L2 step in [0, 1] pixel units (default 10; the paper's 20 in "
                              "[-1, 1] units)")
        sub.add_argument("--eps", type=_positive_float, default=50.0,
                         help="L2 radius around the start (default 50; the paper's 100)")
        sub.add_argument("--out", type=_report_path, required=True,
                         help="the HTML file to write (never one of the input images)")
        sub.add_argument("--force", action="store_true",
                         help="replace an existing --out file even if it is not .html")

    explain_parser = commands.add_parser("explain", help="report on one image")
    explain_parser.add_argument("image", nargs="?", help="an image file")
    explain_parser.add_argument("--sample", choices=SAMPLE_IMAGES,
                                help="a bundled sample photo instead of a file")
    explain_parser.add_argument("--target", default=None,
                                help="class index or name (default: the predicted class)")
    common(explain_parser)

    grid_parser = commands.add_parser("grid", help="the counterfactual grid (paper's Figure 1)")
    grid_parser.add_argument("images", nargs="*", help="image files (rows)")
    grid_parser.add_argument("--samples", nargs="+", choices=SAMPLE_IMAGES, default=None,
                             help="bundled sample photos (rows)")
    grid_parser.add_argument("--targets", nargs="+", default=None,
                             help="class indices or names (columns; default: each image's "
                                  "predicted class)")
    common(grid_parser)

    evaluate_parser = commands.add_parser(
        "evaluate", help="score attribution methods over image files and folders (one row "
        "per image, target, method and metric); runs under torchrun as it is")
    evaluate_parser.add_argument("paths", nargs="*", help="image files and folders (searched "
                                 "recursively)")
    evaluate_parser.add_argument("--synthetic", type=int, default=None, metavar="N",
                                 help="instead of files: N synthetic shapes with known "
                                      "evidence (seed --seed); default model shapes, targets "
                                      "the labels (the shapes model's classes: another "
                                      "--model needs --targets predicted or top-K), metrics "
                                      "mass pointing mask_auc; N at most "
                                      f"{MAX_SYNTHETIC_PIXELS // 64 ** 2} at 64 px, fewer at "
                                      "larger sizes (all are made in memory first)")
    evaluate_parser.add_argument("--seed", type=int, default=0,
                                 help="seed of the synthetic shapes and of the metrics' noise")
    evaluate_parser.add_argument("--model", default=None, choices=sorted(MODELS),
                                 help="default efficientnet_lite0; shapes with --synthetic")
    evaluate_parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                                 help=f"stable method names: {', '.join(METHODS)} (default "
                                      f"{' '.join(DEFAULT_METHODS)})")
    evaluate_parser.add_argument("--metrics", nargs="+", default=None,
                                 help=f"{', '.join(METRICS)} (default deletion insertion "
                                      "infidelity; mass pointing mask_auc with --synthetic)")
    evaluate_parser.add_argument("--targets", default=None,
                                 help="predicted (default), top-K (e.g. top-5), or label "
                                      "(default with --labels-from-folders or --synthetic)")
    evaluate_parser.add_argument("--temperature", type=_positive_float, default=None,
                                 help="pullback gate temperature T (default: the model's own)")
    evaluate_parser.add_argument("--gate", default="sigmoid",
                                 choices=["sigmoid", "normal_cdf", "hard"],
                                 help="pullback backward gate (default sigmoid)")
    evaluate_parser.add_argument("--pool-weights", default=None, choices=POOL_WEIGHTS,
                                 help="soft max-pool rule (default: the engine's)")
    evaluate_parser.add_argument("--image-size", type=int, default=None,
                                 help="side in pixels after resize and centre crop (default: "
                                      "the model's: " + _input_sizes() + ")")
    evaluate_parser.add_argument("--batch-size", type=int, default=8,
                                 help="images evaluated together (default 8)")
    evaluate_parser.add_argument("--limit", type=int, default=None,
                                 help="only the first N files found (sorted by path; a "
                                 "file that turns out not to be an image counts too)")
    evaluate_parser.add_argument("--out", type=_out_path("results.csv"), required=True,
                                 help="results.csv or results.parquet")
    evaluate_parser.add_argument("--resume", action="store_true",
                                 help="continue a run: skip the rows already in --out")
    evaluate_parser.add_argument("--labels-from-folders", action="store_true",
                                 help="each folder's name is its images' class (ImageFolder)")

    app_parser = commands.add_parser("app", help="serve the classroom notebook with Voilà")
    app_parser.add_argument("notebook", nargs="?", type=Path, default=None,
                            help="the notebook to serve (default: the classroom notebook)")
    app_parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                            help=f"port on 127.0.0.1 (default {DEFAULT_PORT})")
    app_parser.add_argument("--open", action="store_true", help="open it in a web browser")
    return parser


def _check_out(out: Path, inputs: Sequence[str], force: bool) -> None:
    """Refuse an ``--out`` that would destroy an input, a file the user did not mean, or that
    cannot be written; before any computing, so that a mistake costs nothing."""
    with unwritable_out(out):
        for source in inputs:
            if out.exists() and Path(source).exists() and os.path.samefile(out, source):
                raise PullbackWidgetsError(f"--out {str(out)!r} is the input image {source!r}; "
                                           "write the report elsewhere")
        if out.is_dir():
            raise PullbackWidgetsError(f"--out {str(out)!r} is a directory; give a file name, "
                                       f"e.g. {str(out / 'report.html')!r}")
        refuse_special_file(out)
        if out.exists() and not os.access(out, os.W_OK):  # the report is renamed over it
            raise PullbackWidgetsError(f"--out {str(out)!r} exists and is read-only; write the "
                                       "report elsewhere, or make the file writable")
        if out.exists() and out.suffix.lower() not in REPORT_SUFFIXES and not force:
            raise PullbackWidgetsError(
                f"--out {str(out)!r} exists and is not an .html file; pass --force to replace it")
    check_writable_folder(out)


def _write(out: Path, page: str) -> None:
    """Write ``page`` whole or not at all (a failed write, say a full disk, leaves an earlier
    report as it was). A file name that is not valid UTF-8 shows its bad bytes as U+FFFD."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        data = page.encode("utf-8", "surrogateescape").decode("utf-8", "replace").encode()
        atomic_write(out, lambda temporary: temporary.write_bytes(data))
    except OSError as error:  # e.g. the disk filled up while we computed
        raise PullbackWidgetsError(f"could not write --out {str(out)!r}: "
                                   f"{error.strerror or error}") from None


def _load_rows(files: list[str], samples: list[str] | None,
               size: int) -> tuple[torch.Tensor, list[str]]:
    """The images (N, 3, size, size) and their names; ``size``: the model's input size."""
    rows = [(Path(f).name, load_image(f, size=size)) for f in files]
    rows += [(name, sample_image(name, size=size)) for name in samples or []]
    if not rows:
        raise PullbackWidgetsError("give image files or --samples NAME [NAME ...]")
    return torch.cat([image for _, image in rows]), [name for name, _ in rows]


def _parameters(args: argparse.Namespace, model, source: str) -> dict[str, object]:
    from importlib.metadata import version

    return {"model": args.model, "image": source,
            "temperature T": _temperature_text(args.temperature, model, args.gate),
            "gate": args.gate,
            "pool weights": args.pool_weights, "ascent steps": args.steps,
            "step size (L2, [0, 1] units)": args.step_size,
            "eps (L2, [0, 1] units)": args.eps, "pullback-widgets": version(package_name)}


def _temperature_text(temperature: float | None, model, gate: str) -> str:
    """The T the report used: the one given (as given: ``repr``, not rounded), else the
    model's defaults per kind of op; none with the hard gate, which has no temperature."""
    if gate == "hard":
        return "none: the hard gate is the plain gradient"
    if temperature is not None:
        return f"{float(temperature)!r} (every kind of gate)"
    defaults = default_temperatures(model)
    return "the model's defaults: " + ", ".join(f"{kind} {t:g}" for kind, t in defaults.items())


def _advance(bar: tqdm) -> Callable[[str], None]:
    """A callback that counts one finished unit of work on ``bar`` and names it."""
    def done(what: str) -> None:
        bar.set_postfix_str(what, refresh=False)
        bar.update(1)

    return done


def _run_explain(args: argparse.Namespace) -> None:
    # What the user gave is checked before the progress bar starts, so that an error in it is
    # the one line on stderr (the registry knows a model's classes without loading it).
    image, names = _load_rows([args.image] if args.image else [],
                              [args.sample] if args.sample else None,
                              MODELS[args.model].input_size)
    target = None if args.target is None else find_class(args.target,
                                                         MODELS[args.model].labels())
    # Loading the model and writing the page are a unit each, around explain()'s own.
    with tqdm(total=2 + explain_work(args.steps), desc="explain", unit="step",
              mininterval=0, miniters=1) as bar:  # every step shows
        done = _advance(bar)
        model = load_model(args.model)
        done("model loaded")
        explanation = explain(model, image, target, temperature=args.temperature, gate=args.gate,
                              pool_weights=args.pool_weights, steps=args.steps,
                              step_size=args.step_size, eps=args.eps,
                              on_progress=done)
        explanation.parameters = _parameters(args, model, names[0])
        explanation.parameters["target"] = f"{model.labels[explanation.target]} " \
                                           f"({explanation.target})"
        page = explain_html(explanation, model.labels)
        _write(args.out, page)
        done("report written")


def _run_grid(args: argparse.Namespace) -> None:
    images, names = _load_rows(args.images, args.samples, MODELS[args.model].input_size)
    model = load_model(args.model)
    targets = None if args.targets is None else [find_class(t, model.labels)
                                                 for t in args.targets]
    columns = len(images) if targets is None else len(targets)
    with tqdm(total=columns * args.steps + 1, desc="grid", unit="step",
              mininterval=0, miniters=1) as bar:
        done = _advance(bar)
        grid = ascent_grid(model, images, targets, steps=args.steps, step_size=args.step_size,
                           eps=args.eps, temperature=args.temperature, gate=args.gate,
                           pool_weights=args.pool_weights, progress=False,
                           callback=lambda step, _: done(f"step {step}"))
        # Each name isolated: a direction control in one (U+202E) must not reorder the next.
        parameters = _parameters(args, model, ", ".join(map(figures.isolated, names)))
        page = grid_html(grid, names, model.labels, parameters)
        _write(args.out, page)
        done("report written")


def _run(args: argparse.Namespace) -> int:
    if args.command == "app":
        from .app import serve_classroom

        return serve_classroom(args.notebook, port=args.port, open_browser=args.open)
    if args.command == "evaluate":
        synthetic = args.synthetic is not None
        if not args.paths and not synthetic:
            raise PullbackWidgetsError("give image files or folders, or --synthetic N")
        metrics = args.metrics or (["mass", "pointing", "mask_auc"] if synthetic
                                   else ["deletion", "insertion", "infidelity"])
        report = run_command(args.paths, out=args.out, resume=args.resume,
                             labels_from_folders=args.labels_from_folders, limit=args.limit,
                             targets=args.targets, synthetic_images=args.synthetic, seed=args.seed,
                             model=args.model or ("shapes" if synthetic else "efficientnet_lite0"),
                             methods=tuple(args.methods), metrics=tuple(metrics),
                             temperature=args.temperature,
                             gate=args.gate, pool_weights=args.pool_weights,
                             batch_size=args.batch_size, image_size=args.image_size)
        if report is not None and report.skipped and not report.rows:
            why = " ".join(report.skipped[0][1].split())  # it names the file
            raise PullbackWidgetsError(f"no image could be read: {len(report.skipped)} file(s) "
                                       f"skipped, the first: {why}; the results hold no rows")
        return 0
    if args.command == "explain" and (args.image is None) == (args.sample is None):
        raise PullbackWidgetsError("give exactly one of IMAGE or --sample NAME")
    inputs = [args.image] if args.command == "explain" else args.images
    _check_out(args.out, [path for path in inputs if path], args.force)
    if args.command == "explain":
        _run_explain(args)
    else:
        _run_grid(args)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pullback-widgets`` console script; returns the exit status."""
    try:
        return _run(_build_parser().parse_args(argv))
    except USER_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"pullback-widgets: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("pullback-widgets: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
