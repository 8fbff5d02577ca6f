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
