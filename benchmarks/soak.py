"""Soak test of the PullbackExplorer: many updates, many image changes, no growth.

    python benchmarks/soak.py [--updates 500] [--image-changes 50]

Drives the widget as a user would (temperature, gate, layer, channel and view changes; image
changes every few updates), each update waited for, with the embedded EfficientNet-Lite0.
Reports RSS growth after a warm-up (goal < 50 MB) and checks with weakrefs that every
replaced PullbackSession, and so its retained autograd graph, has been freed.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import time
import weakref
from pathlib import Path

import pullback_widgets as pw


def rss_mb() -> float:
    """Resident set size of this process, from /proc (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(updates: int, image_changes: int) -> dict[str, float]:
    explorer = pw.PullbackExplorer()
    explorer.wait()
    layers = [value for _, value in explorer.layer.options][:6]
    moves = itertools.cycle([
        lambda i: setattr(explorer.temperature, "value", 0.02 * (1 + i % 200)),
        lambda i: setattr(explorer.gate, "value", ("sigmoid", "normal_cdf", "hard")[i % 3]),
        lambda i: setattr(explorer.layer, "value", layers[i % len(layers)]),
        lambda i: setattr(explorer.channel, "value", i % max(1, explorer.channel.max + 1)),
        lambda i: setattr(explorer.view, "value", pw.widgets.explorer.VIEWS[i % 3]),
    ])
    images = itertools.cycle(pw.SAMPLE_IMAGES)
    change_every = max(1, updates // max(1, image_changes))
    dead_sessions: list[weakref.ref] = []
    started, baseline, changes = time.perf_counter(), None, 0
    for i in range(updates):
        if i % change_every == 0 and changes < image_changes:
            if explorer._session is not None:
                dead_sessions.append(weakref.ref(explorer._session))
            image = next(images)
            explorer.image.value = image if image != explorer.image.value else next(images)
            changes += 1
        else:
            next(moves)(i)
        explorer.wait()
        if i == min(50, updates - 1):  # after warm-up: caches, allocator pools
            gc.collect()
            baseline = rss_mb()
    gc.collect()
    alive = sum(ref() is not None for ref in dead_sessions[:-1])  # the last may be current
    errors = "⚠" in explorer.status.value
    return {"updates": updates, "image changes": changes, "seconds": time.perf_counter() - started,
            "rss after warm-up (MB)": baseline, "rss at end (MB)": rss_mb(),
            "rss growth (MB)": rss_mb() - baseline, "replaced sessions still alive": alive,
            "status shows an error": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=500)
    parser.add_argument("--image-changes", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.md"))
    args = parser.parse_args()
    result = soak(args.updates, args.image_changes)
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in result.items()]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
