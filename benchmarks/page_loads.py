"""Load the explorer as a Voilà page again and again, on a machine kept busy, and count the loads
whose pullback heatmap never appeared.

    python benchmarks/page_loads.py [--loads 12] [--busy 2] [--timeout 120]

Each load is a new page (hence a new kernel, which Voilà keeps), opened in headless Chromium
(/usr/bin/chromium) with the test suite's harness; ``--busy`` processes spin on the CPU
meanwhile. A load fails when no heatmap with data is drawn within ``--timeout`` seconds. For
each load: the seconds to the heatmap, the figures' trace counts where it failed, and how often
anywidget gave up on a figure's module ("Failed to initialize model": it allows 2 s).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.browser import harness

FIGURE_TRACES_JS = """() => [...document.querySelectorAll('.js-plotly-plot')]
  .map((gd) => (gd.data || []).length)"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=12)
    parser.add_argument("--busy", type=int, default=2, help="processes spinning meanwhile")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per load")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="page-loads-"))
    notebook = harness.write_explorer_notebook(work / "notebooks" / harness.NOTEBOOK_NAME)
    server = harness.start_voila(notebook, work / "voila")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.busy)]
    playwright = harness.start_playwright()
    browser = harness.launch_chromium(playwright)
    failed = 0
    try:
        for load in range(args.loads):
            page = harness.new_page(browser)
            start = time.perf_counter()
            try:
                page.goto(f"{server.url}/")
                harness.wait_for_heatmap(page, timeout_ms=args.timeout * 1000)
                outcome = f"heatmap after {time.perf_counter() - start:.1f} s"
            except AssertionError:
                failed += 1
                outcome = f"NO heatmap; traces per figure {page.evaluate(FIGURE_TRACES_JS)}"
            gave_up = sum("Failed to initialize model" in message
                          for message in harness.console_messages(page))
            print(f"load {load}: {outcome}; anywidget gave up on {gave_up} figure(s)",
                  flush=True)
            harness.close_page(page)
    finally:
        for spinner in spinners:
            spinner.kill()
        browser.close()
        playwright.stop()
        server.stop()
    print(f"failed loads: {failed} of {args.loads} ({args.busy} busy processes)")


if __name__ == "__main__":
    main()
