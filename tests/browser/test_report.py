"""The default explain report (``pullback-widgets explain --sample coffee``) in a real Chromium,
opened from a file:// URL with the network off: every figure draws from what the file holds
(plotly.js unpacked from the page itself), the file stays under 6.5 MB, a 1280-px window never
scrolls sideways, and a browser without DecompressionStream gets a sentence, not a blank page.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from . import harness

pytestmark = pytest.mark.browser

MAX_REPORT_BYTES = 6_500_000
WINDOW = {"width": 1280, "height": 900}
DRAW_TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def default_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "pullback_widgets.cli", "explain", "--sample", "coffee",
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _open(browser, report: Path, init_script: str | None = None):
    context = browser.new_context(viewport=WINDOW, offline=True)
    if init_script:
        context.add_init_script(init_script)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    # Anything but the file itself would be a fetch: refuse it, and remember that it was tried.
    fetched: list[str] = []

    def refuse(route) -> None:
        fetched.append(route.request.url)
        route.abort()

    page.route(lambda url: not url.startswith("file:"), refuse)
    page.goto(report.as_uri(), timeout=DRAW_TIMEOUT_MS)  # 6.5 MB: slow on a busy machine
    return page, errors, fetched


def test_default_report_is_at_most_6_5_mb(default_report):
    assert default_report.stat().st_size <= MAX_REPORT_BYTES


def test_default_report_draws_offline_within_1280_px(browser, default_report):
    page, errors, fetched = _open(browser, default_report)
    try:
        harness.wait_for_js(page, "document.body.dataset.figuresDrawn", None, DRAW_TIMEOUT_MS,
                            "the report's figures were not drawn")
        figures = page.locator("div.figure")
        assert int(page.evaluate("document.body.dataset.figuresDrawn")) == figures.count() >= 8
        assert page.locator("div.figure .main-svg").count() >= figures.count()
        # Heatmaps and images drew pixels: plotly's heatmap canvases and image elements.
        assert page.locator("div.figure .hm image, div.figure .im image").count() >= 10
        assert page.locator("#drawing").count() == 0
        assert not errors, errors
        assert not fetched, fetched
        assert page.evaluate("document.documentElement.scrollWidth") <= WINDOW["width"]
        rights = page.evaluate("[...document.querySelectorAll('div.figure')]"
                               ".map(d => d.getBoundingClientRect().right)")
        assert max(rights) <= WINDOW["width"], rights
        page.screenshot(path=str(_screenshot("report-1280")), full_page=True)
    finally:
        page.context.close()


def test_a_browser_without_decompression_says_so(browser, default_report):
    page, _, _ = _open(browser, default_report, "delete window.DecompressionStream;")
    try:
        harness.wait_for_js(page, "document.getElementById('drawing').textContent"
                            ".includes('could not be drawn')", None, DRAW_TIMEOUT_MS,
                            "no message for a browser without DecompressionStream")
        assert "Chrome 80" in page.locator("#drawing").inner_text()
    finally:
        page.context.close()


def _screenshot(name: str) -> Path:
    harness.SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    return harness.SCREENSHOT_DIR / f"{name}.png"
