"""The explorer as a Voilà dashboard, driven by a real Chromium: it renders, its Temperature
label fits, and the Temperature slider, moved with the keyboard, changes the pullback heatmap."""

from __future__ import annotations

import pytest

from . import harness

pytestmark = pytest.mark.browser


def test_heatmap_renders(voila_explorer):
    page = voila_explorer.page
    summary = harness.heatmap_summary(page)
    assert summary is not None and summary["count"] > 0
    harness.assert_figures_drawn_from_one_bundle(page)
    harness.temperature_slider(page).scroll_into_view_if_needed()
    harness.save_screenshot(page, "voila-explorer")


def test_temperature_label_is_not_truncated(voila_explorer):
    harness.assert_temperature_label_fully_visible(voila_explorer.page)


def test_temperature_keys_change_heatmap(voila_explorer):
    harness.assert_temperature_moves_heatmap(voila_explorer.page)
    harness.save_screenshot(voila_explorer.page, "voila-explorer-temperature")
