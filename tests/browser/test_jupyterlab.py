"""The explorer in JupyterLab 4, driven by a real Chromium: it renders, its Temperature label
fits, and the Temperature slider, moved with the keyboard, changes the pullback heatmap."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import harness

pytestmark = pytest.mark.browser


def test_heatmap_renders(lab_explorer):
    page = lab_explorer.page
    summary = harness.heatmap_summary(page)
    assert summary is not None and summary["count"] > 0
    harness.assert_figures_drawn_from_one_bundle(page)
    # Bring the whole explorer into view: the slider sits below the figures.
    harness.temperature_slider(page).scroll_into_view_if_needed()
    harness.save_screenshot(page, "jupyterlab-explorer")


def test_first_seconds(lab_explorer):
    harness.assert_first_seconds(lab_explorer.page, lab_explorer.first_checksum)


def test_temperature_label_is_not_truncated(lab_explorer):
    harness.assert_temperature_label_fully_visible(lab_explorer.page)


def test_temperature_keys_change_heatmap(lab_explorer):
    harness.assert_temperature_moves_heatmap(lab_explorer.page)
    harness.save_screenshot(lab_explorer.page, "jupyterlab-explorer-temperature")


def test_temperature_step_button_changes_heatmap(lab_explorer):
    page = lab_explorer.page
    before = harness.wait_for_heatmap_settled(page)
    harness.click_temperature_step(page, "+")
    assert harness.wait_for_heatmap_change(page, before) != before


def test_figure_state_sent_after_the_view_drew_redraws_it(lab_explorer, jupyterlab_server):
    # What a page that connected while the figure changed gets: the whole figure again, as
    # state, which a drawn Plotly view of its own ignored. First a made-up heatmap, then the
    # figure's own resend, which must bring the page back to the explorer's heatmap.
    page, notebook = lab_explorer.page, f"explorer-{Path(__file__).stem}.ipynb"
    before = harness.wait_for_heatmap_settled(page)
    figure = ("import copy, gc, pullback_widgets\n"
              "explorer = next(e for e in gc.get_objects() if isinstance(e, "
              "pullback_widgets.PullbackExplorer) and not e._closed)\n"
              "figure = explorer.pullback_figure\n")
    made_up = ("data = copy.deepcopy(figure._data)\n"
               "data[0]['z'] = [[1.0, 2.0], [3.0, 4.0]]\n"
               "figure._widget_data = data\n")
    harness.run_in_notebook_kernel(jupyterlab_server, notebook, figure + made_up)
    harness.wait_for_js(page, "() => { const s = window.__pullbackHarness.summary(); "
                              "return s && s.count === 4; }", None, harness.UPDATE_TIMEOUT_MS,
                        "The page did not redraw the figure from state sent after it drew")
    made_up_checksum = harness.heatmap_summary(page)["checksum"]
    harness.run_in_notebook_kernel(jupyterlab_server, notebook,
                                   figure + "figure._send_whole_figure()\n")
    assert harness.wait_for_heatmap_change(page, made_up_checksum,
                                           after="the figure was sent again") == before


def test_running_the_explorer_cell_again_closes_the_first(lab_explorer, jupyterlab_server):
    # JupyterLab names the cell of each run: the kernel closes the explorer the cell made
    # before, which kept its worker and retained graph alive. Last: it runs the notebook again.
    notebook = f"explorer-{Path(__file__).stem}.ipynb"
    count = ("import gc, pullback_widgets\nprint(sum(not e._closed for e in gc.get_objects() "
             "if isinstance(e, pullback_widgets.PullbackExplorer)))")
    assert harness.run_in_notebook_kernel(jupyterlab_server, notebook, count).strip() == "1"
    harness.run_all_cells_in_lab(lab_explorer.page)
    # Queued behind the notebook's cells, so it counts once they have run.
    assert harness.run_in_notebook_kernel(jupyterlab_server, notebook, count).strip() == "1"
    harness.wait_for_heatmap(lab_explorer.page)
