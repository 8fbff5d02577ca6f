"""Issue 14 in JupyterLab and Voilà, driven by a real Chromium: the AscentExplorer on a hidden
unit (choose Layer and Channel, press Run: frames and the activation curve are drawn), and the
PullbackExplorer's Compare control (switching it redraws only the right-hand panel)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import harness

pytestmark = pytest.mark.browser

ASCENT_NOTEBOOK = "ascent.ipynb"
ASCENT_CELLS = [
    f"import {harness.EXPLORER_MODULE} as pw",
    'ascent = pw.AscentExplorer(model="efficientnet_lite0", image="coffee")\nascent',
]
# The graph divs in document order: for the PullbackExplorer, pullback then compared panel.
FIGURES_JS = """(index) => {
  const gd = document.querySelectorAll('.js-plotly-plot')[index];
  if (!gd) return null;
  const layout = gd.layout || {};
  const data = gd._fullData || gd.data || [];
  const title = layout.title && (layout.title.text || layout.title);
  const heat = data.find((t) => t && t.type === 'heatmap');
  let checksum = '';
  if (heat) {
    let sum = 0, n = 0;
    for (const row of heat.z) for (const v of row) { n += 1; sum += v * ((n % 9973) + 1); }
    checksum = `${n}:${sum}`;
  }
  return {title: typeof title === 'string' ? title : '', checksum,
          types: data.map((t) => t.type),
          yTitle: layout.yaxis && layout.yaxis.title ? layout.yaxis.title.text : '',
          annotations: (layout.annotations || []).map((a) => a.text),
          points: data.length && data[0].y ? data[0].y.length : 0};
}"""


def _figure(page, index: int) -> dict | None:
    return page.evaluate(FIGURES_JS, index)


def _wait_for_title(page, index: int, start: str) -> None:
    harness.wait_for_js(page, """([index, start]) => {
        const gd = document.querySelectorAll('.js-plotly-plot')[index];
        const t = gd && gd.layout && gd.layout.title;
        return Boolean(t && (t.text || t).startsWith && (t.text || t).startsWith(start)); }""",
                        [index, start], harness.UPDATE_TIMEOUT_MS,
                        f"figure {index}'s title never started with {start!r}")


@pytest.fixture(scope="module")
def ascent_page(browser, jupyterlab_server, notebook_root: Path) -> Iterator:
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in ASCENT_CELLS]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                       "language": "python"}
    nbformat.write(notebook, notebook_root / ASCENT_NOTEBOOK)
    page = harness.new_page(browser)
    try:
        # A workspace of its own, so that JupyterLab does not reopen this notebook beside the
        # explorer's on the other tests' pages (they read the page's first figure).
        page.goto(f"{jupyterlab_server.url}/lab/workspaces/ascent-explorer/tree/"
                  f"{ASCENT_NOTEBOOK}", timeout=harness.KERNEL_START_TIMEOUT_MS)
        page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(
            timeout=harness.KERNEL_START_TIMEOUT_MS)
        # With the server: a kernel that started before Lab drew its indicator still counts.
        harness.wait_for_lab_kernel_idle(page, server=jupyterlab_server)
        harness.run_all_cells_in_lab(page)
        harness.wait_for_js(page, "() => document.querySelectorAll('.js-plotly-plot').length"
                            " >= 3", None, harness.FIRST_RENDER_TIMEOUT_MS,
                            "the AscentExplorer's figures never appeared")
        yield page
    finally:
        harness.close_page(page)


def test_hidden_unit_ascent_draws_frames_and_the_activation_curve(ascent_page):
    page = ascent_page
    harness.choose_option(page, "Layer", "blocks.5 (")
    channel = page.locator(".widget-inline-hbox", has=page.locator(
        "label", has_text="Channel")).locator("input").first
    channel.fill("40")
    channel.press("Enter")
    page.locator("button.widget-button[title='Run']").click()
    harness.wait_for_js(
        page, """() => [...document.querySelectorAll('.js-plotly-plot')].some((gd) =>
          gd.layout && gd.layout.yaxis && gd.layout.yaxis.title &&
          gd.layout.yaxis.title.text === 'unit activation (spatial mean)' &&
          gd.data.length && gd.data[0].y.length >= 6)""", None, 300_000,
        "the activation curve with the start and 5 steps never appeared")
    frames = _figure(page, 0)
    assert frames is not None and "image" in frames["types"]
    assert any("blocks.5 channel 40" in text and "activation" in text
               for text in frames["annotations"]), frames["annotations"]
    harness.save_screenshot(page, "jupyterlab-ascent-hidden-unit")


def test_switching_compare_redraws_only_the_right_panel(lab_explorer):
    page = lab_explorer.page
    harness.wait_for_heatmap_settled(page)
    _wait_for_title(page, 1, "Plain gradient")
    pullback, compared = _figure(page, 0), _figure(page, 1)
    harness.choose_option(page, "Compare", "gradient × input")
    _wait_for_title(page, 1, "Gradient × input")
    after = _figure(page, 1)
    assert after["checksum"] != compared["checksum"]
    assert _figure(page, 0) == pullback  # the pullback panel was not redrawn
    page.locator(".js-plotly-plot").nth(1).scroll_into_view_if_needed()
    harness.save_screenshot(page, "jupyterlab-explorer-compare")


def test_compare_in_voila(voila_explorer):
    page = voila_explorer.page
    harness.wait_for_heatmap_settled(page)
    _wait_for_title(page, 1, "Plain gradient")
    pullback = _figure(page, 0)
    harness.choose_option(page, "Compare", "Grad-CAM")
    _wait_for_title(page, 1, "Grad-CAM")
    assert "image" in _figure(page, 1)["types"]  # an overlay on the photo
    assert _figure(page, 0) == pullback
    page.locator(".js-plotly-plot").nth(1).scroll_into_view_if_needed()
    harness.save_screenshot(page, "voila-explorer-compare")
