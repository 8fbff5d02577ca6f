"""Latency of the explorer in a real browser: Temperature keypress to redrawn heatmap.

    python benchmarks/browser_latency.py [--presses 10] [--warmup 1]
                                         [--out benchmarks/results/browser_latency.md]

Starts JupyterLab and headless Chromium exactly as the browser tests do
(tests/browser/harness.py), runs the explorer notebook, then presses an arrow key on the
focused Temperature slider ``--presses`` times. Each time is measured in the page itself, from
the keydown event to the moment the pullback heatmap's z data differs (performance.now(); a
MutationObserver on the plotly graph div catches the redraw, with requestAnimationFrame polling
as a fallback). So it covers the whole round trip: the widget message to the kernel, the
pullback at the new temperature, the figure update back, and plotly's redraw.

The goal is a median of at most 300 ms with EfficientNet-Lite0 on CPU. The script prints the
median and p90 and appends one markdown row to ``--out``. Set PULLBACK_BROWSER_MODULE to measure
a stand-in module instead of pullback_widgets (see tests/browser/harness.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The harness lives with the browser tests; import it from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.browser import harness

GOAL_MS = 300.0
SETTLE_S = 0.3  # after the kernel goes idle, let trailing updates land before the next press


def measure(page, presses: int) -> list[float]:
    """Milliseconds from each keypress to the heatmap's change, one per press."""
    handle = harness.temperature_handle(page)
    key = "ArrowRight"
    timings = []
    for _ in range(presses):
        # Start each press from a quiet explorer, so that one press is one measurement.
        harness.wait_for_lab_kernel_idle(page)
        time.sleep(SETTLE_S)
        before = harness.wait_for_heatmap_settled(page, quiet_ms=200)
        # Walk in one direction and turn at the ends, so each press asks for a temperature
        # not seen just before (a cache would otherwise make alternate presses free).
        bound = harness.handle_at_bound(handle)
        if bound == "max":
            key = "ArrowLeft"
        elif bound == "min":
            key = "ArrowRight"
        page.evaluate("(before) => window.__pullbackHarness.armLatencyProbe(before)", before)
        harness.press_temperature(page, presses=1, key=key)
        harness.wait_for_js(
            page,
            "() => window.__pullbackHarness.probe.ms !== null",
            None,
            harness.UPDATE_TIMEOUT_MS,
            f"The heatmap did not change after {key} on Temperature",
        )
        timings.append(page.evaluate("() => window.__pullbackHarness.probe.ms"))
    return timings


def append_result(out: Path, row: dict[str, str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text(
            "# Browser latency: Temperature keypress to redrawn heatmap\n\n"
            "Written by benchmarks/browser_latency.py (JupyterLab + headless Chromium, measured "
            "in the page). Goal: median <= 300 ms with EfficientNet-Lite0 on CPU.\n\n"
            f"| {' | '.join(row)} |\n|{'---|' * len(row)}\n"
        )
    with out.open("a") as f:
        f.write(f"| {' | '.join(row.values())} |\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presses", type=int, default=10, help="measured keypresses")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured presses first")
    parser.add_argument(
        "--out", type=Path, default=harness.REPO_ROOT / "benchmarks/results/browser_latency.md"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="browser-latency-") as tmp:
        workdir = Path(tmp)
        harness.write_explorer_notebook(workdir / "notebooks" / harness.NOTEBOOK_NAME)
        server = harness.start_jupyterlab(workdir / "notebooks", workdir / "jupyterlab")
        playwright = harness.start_playwright()
        try:
            browser = harness.launch_chromium(playwright)
            page = harness.new_page(browser)
            started = time.perf_counter()
            harness.start_explorer_in_lab(page, server)
            first_render_s = time.perf_counter() - started
            # The first updates may pay one-off costs (lazy imports, allocator warm-up).
            measure(page, args.warmup)
            timings = measure(page, args.presses)
            harness.save_screenshot(page, "browser-latency")
            browser_version = browser.version
            browser.close()
        except BaseException:
            print(f"--- JupyterLab log tail ---\n{server.log_tail()}", file=sys.stderr)
            raise
        finally:
            playwright.stop()
            server.stop()

    median = statistics.median(timings)
    p90 = harness.percentile(timings, 90)
    print("keypress -> heatmap change, ms:", ", ".join(f"{t:.0f}" for t in timings))
    print(
        f"median {median:.0f} ms, p90 {p90:.0f} ms over {len(timings)} presses "
        f"(first render {first_render_s:.1f} s); goal <= {GOAL_MS:.0f} ms: "
        f"{'met' if median <= GOAL_MS else 'NOT met'}"
    )
    append_result(
        args.out,
        {
            "date (UTC)": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "module": harness.EXPLORER_MODULE,
            "browser": f"Chromium {browser_version}",
            "CPUs": str(os.cpu_count()),
            "presses": str(len(timings)),
            "median ms": f"{median:.0f}",
            "p90 ms": f"{p90:.0f}",
            "max ms": f"{max(timings):.0f}",
            "first render s": f"{first_render_s:.1f}",
        },
    )
    print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
