"""A hostile review of the figures against their data: what the offline report stores, decoded
here, and the numbers and words a figure puts beside its pixels."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import torch
from PIL import Image

from pullback_widgets import figures, report
from pullback_widgets.ascent import AscentResult
from pullback_widgets.model_helpers import STRIP_TEMPERATURES

H, W = 12, 16
HOT = (2, 7)  # row, column: asymmetric, so a transpose or a flip moves it


def _explanation(*, gradient: torch.Tensor | None = None,
                 logits: list[float] = (1.0, 2.0)) -> report.Explanation:
    """An explanation made by hand: a photo with one red pixel at HOT, a pullback of 5 there
    and -2 at (5, 1), zero elsewhere, and an all-negative gradient."""
    image = torch.full((1, 3, H, W), 0.5)
    image[0, :, HOT[0], HOT[1]] = torch.tensor([1.0, 0.0, 0.0])
    pullback = torch.zeros(3, H, W)
    pullback[0, HOT[0], HOT[1]] = 5.0
    pullback[1, 5, 1] = -2.0
    gradient = -torch.linspace(1, 2, 3 * H * W).reshape(3, H, W) if gradient is None else gradient
    ascent = AscentResult(images=[image] * len(logits), logits=torch.tensor(logits)[:, None],
                          probs=torch.full((len(logits), 1), 0.5))
    return report.Explanation(image[0], torch.full((4,), 0.25), 1, pullback, gradient,
                              [pullback * t for t in STRIP_TEMPERATURES], "sigmoid", ascent,
                              ascent)


def _page_figures(page: str) -> dict[str, dict]:
    """Each figure's JSON as the page stores it, by the heading of its section."""
    found = {}
    for section in re.findall(r"<section>(.*?)</section>", page, re.S):
        heading = re.search(r"<h2>(.*?)</h2>", section)
        data = re.search(r'<script type="application/json" id="figure-\d+-data">(.*?)</script>',
                         section, re.S)
        if data:
            found[heading.group(1) if heading else ""] = json.loads(data.group(1)
                                                                    .replace("<\\/", "</"))
    return found


def _notes(page: str) -> dict[str, str]:
    return dict(re.findall(r"<section><h2>([^<]*)</h2><p class='note'>([^<]*)</p>", page))


def _codes(spec: dict) -> np.ndarray:
    assert spec["dtype"] == "u1", spec["dtype"]
    shape = [int(n) for n in str(spec["shape"]).split(",")]
    return np.frombuffer(base64.b64decode(spec["bdata"]), dtype=np.uint8).reshape(shape)


def _png(source: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))))


def test_the_reports_stored_pixels_put_photo_and_maps_in_one_place_with_their_signs():
    page = report.explain_html(_explanation(), labels=list("abcd"))
    stored = _page_figures(page)
    maps = stored["Pullback and plain gradient for “\u2068b\u2069”"]["data"]
    pullback, gradient = (_codes(trace["z"]) for trace in maps)
    # The hot pixel lands at (row 2, col 7) in every layer, and 0 on the white middle code.
    assert np.argwhere(pullback == 254).tolist() == [list(HOT)]
    assert pullback[5, 1] < 127 and np.count_nonzero(pullback != 127) == 2
    assert gradient.max() < 127  # an all-negative map stays all blue
    photo, overlay = stored["Where the pullback is large"]["data"]
    pixels = _png(photo["source"])
    assert pixels.shape == (H, W, 3)
    assert pixels[HOT].tolist() == [255, 0, 0] and np.all(np.delete(pixels.reshape(-1, 3),
                                                                    HOT[0] * W + HOT[1], 0) == 128)
    overlay_codes = _codes(overlay["z"])
    assert overlay_codes[HOT] == 254 and overlay_codes[0, 0] == 0
    frames = stored["Pullback ascent, step by step"]["data"]
    assert _png(frames[0]["source"])[HOT].tolist() == [255, 0, 0]


def test_the_overlays_hover_says_that_its_ratio_is_capped():
    # A pixel 100 times the limit was hovered as "|a| / limit = 1.00": a ratio stated as 1
    # where it is 100 (the layer is clipped at 1 for its colours).
    attribution = np.ones((1, 10, 10))
    attribution[0, 0, 0] = 100.0
    heat = figures.magnitude_overlay(np.zeros((3, 10, 10)), attribution, percentile=99).data[1]
    assert heat.z[0, 0] == 1.0
    assert "capped at 1" in heat.hovertemplate and "99th percentile" in heat.hovertemplate


def test_an_all_zero_strip_panel_is_labelled_as_such_not_with_an_invented_scale():
    # The panel of a map that is 0 everywhere read "±1e-12", a scale no value has.
    strip = figures.temperature_strip([np.zeros((3, 4, 4)), np.ones((3, 4, 4))], [0.1, 1.0])
    assert [axis.title.text for axis in strip.select_xaxes()] == ["all 0", "±3"]


def test_the_reports_raw_scale_of_an_all_zero_map_is_zero():
    # "Raw scales: ... gradient 1e-12." for a gradient that is 0 everywhere.
    page = report.explain_html(_explanation(gradient=torch.zeros(3, H, W)), labels=list("abcd"))
    assert "gradient 0 (0 everywhere)" in page and "1e-12" not in page


def test_the_report_says_which_percentile_saturates_the_overlay_and_the_strip():
    notes = _notes(report.explain_html(_explanation(), labels=list("abcd")))
    assert "99.5th percentile" in notes["Where the pullback is large"]
    assert "99.5th percentile" in notes["Temperature strip"]


def test_the_reports_logits_and_gains_keep_their_size_when_tiny_or_huge():
    # A logit of 1e-7 read "logit 0.00" and its gain "+0.00"; 1.2e7 read "12345678.00".
    tiny = report.explain_html(_explanation(logits=[1e-7, 3e-7]), labels=list("abcd"))
    frames = _page_figures(tiny)["Pullback ascent, step by step"]["layout"]["annotations"]
    assert [a["text"].split("<br>")[1].split(" ·")[0] for a in frames] == \
        ["logit 1e-07", "logit 3e-07"]
    assert "pullback ascent +2e-07" in tiny
    huge = report.explain_html(_explanation(logits=[12345678.0, 0.25]), labels=list("abcd"))
    frames = _page_figures(huge)["Pullback ascent, step by step"]["layout"]["annotations"]
    assert [a["text"].split("<br>")[1].split(" ·")[0] for a in frames] == \
        ["logit 1.23e+07", "logit 0.25"]
    assert "pullback ascent -1.23e+07" in huge
