"""Speed of the engine, as ratios measured in one run (CPU by default; --device cuda too).

    python benchmarks/speed.py [--models resnet50 efficientnet_lite0] [--batches 1 8]
                               [--repeats 7] [--out benchmarks/results/speed.md]

Each figure is the median of ``--repeats`` timings, the methods interleaved so that machine noise
hits them alike. Ratios, not seconds, are what to compare across machines.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import pullback_widgets as pw


def _timed(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _plain_gradient(model, x, target):
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
    return grad


def measure(model, batch: int, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each operation on a (batch, 3, 224, 224) input."""
    torch.manual_seed(0)
    x = torch.rand(batch, 3, 224, 224, device=device)
    temperature = pw.model_helpers.default_temperature(model)
    session = pw.PullbackSession(model, x, temperature=temperature)
    targets = [1, 2, 3, 4, 5]
    operations = {
        "gradient": lambda: _plain_gradient(model, x, 1),
        "pullback": lambda: pw.excitation_pullback(model, x, 1, temperature=temperature),
        "session update": lambda: session.pullback(1, temperature=temperature * 1.01),
        "5 targets batched": lambda: session.pullbacks(targets, batched=True),
        "5 targets loop": lambda: session.pullbacks(targets, batched=False),
    }
    for fn in operations.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in operations}
    for _ in range(repeats):
        for name, fn in operations.items():
            times[name].append(_timed(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(rows: list[tuple[str, str, int, dict[str, float]]]) -> str:
    lines = [
        "| device | model | batch | gradient (ms) | pullback ÷ gradient (goal ≤ 1.10) | "
        "session update ÷ fresh pullback (goal ≤ 0.6) | 5 targets batched ÷ one update | "
        "5 targets loop ÷ one update |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for device, name, batch, t in rows:
        update = t["session update"]
        lines.append(
            f"| {device} | {name} | {batch} | {t['gradient'] * 1e3:.0f} | "
            f"{t['pullback'] / t['gradient']:.2f} | {update / t['pullback']:.2f} | "
            f"{t['5 targets batched'] / update:.2f} | {t['5 targets loop'] / update:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_lite0"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        weights = "imagenet" if name == "efficientnet_lite0" else None  # random: no download
        model = pw.load_model(name, weights=weights, device=args.device)
        for batch in args.batches:
            rows.append((args.device, name, batch, measure(model, batch, args.repeats,
                                                           args.device)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows) + f"\n\nPeak RSS of the benchmark process: {_peak_rss_mb():.0f} MB.\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
