"""Tests of pullback_widgets.figures against numbers computed here independently."""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from pullback_widgets import figures as fg


def _attr(seed: int, shape=(3, 12, 16), scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape) * scale


def _image(seed: int, shape=(3, 12, 16)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape)


def _pct(values: np.ndarray, p: float) -> float:
    return float(np.percentile(np.abs(np.ravel(values)), p))


def _annotation_texts(fig: go.Figure) -> list[str]:
    return [a.text for a in fig.layout.annotations]


def _user(text: str) -> str:
    """A user's label as figures show it: isolated, so its direction controls stay inside."""
    return f"\u2068{text}\u2069"


def _assert_image_axes(fig: go.Figure) -> None:
    for ax in fig.select_yaxes():
        assert ax.autorange == "reversed"
        assert ax.scaleanchor is not None
        assert ax.showticklabels is False
    for ax in fig.select_xaxes():
        assert ax.showticklabels is False


# --------------------------------------------------------------------------- ranges and arrays


def test_signed_range_is_the_percentile_of_abs():
    a = _attr(0)
    assert fg.signed_range(a) == pytest.approx(_pct(a, 99.5))
    assert fg.signed_range(a, 90) == pytest.approx(_pct(a, 90))
    assert fg.signed_range(a, 90) < fg.signed_range(a, 99.5)


def test_signed_range_never_zero_and_nan_counts_as_zero():
    sparse = np.zeros((30, 30))
    sparse[3, 4] = -7.0
    assert np.percentile(np.abs(sparse), 99.5) == 0
    assert fg.signed_range(sparse) == 7.0  # the 99.5th percentile is 0 -> max|a|
    assert fg.signed_range(np.zeros((4, 4))) == 1e-12
    a = _attr(1, (20, 20))
    with_nan = a.copy()
    with_nan[:2] = np.nan
    expected = _pct(np.where(np.isnan(with_nan), 0.0, with_nan), 99.0)
    assert fg.signed_range(with_nan, 99.0) == pytest.approx(expected)
    with pytest.raises(ValueError, match="percentile"):
        fg.signed_range(a, 101)


def test_channel_sum_shapes_and_torch():
    a = _attr(2)
    expected = a[0] + a[1] + a[2]
    np.testing.assert_allclose(fg.channel_sum(a), expected)
    np.testing.assert_allclose(fg.channel_sum(a[None]), expected)
    np.testing.assert_allclose(fg.channel_sum(expected), expected)
    tensor = torch.tensor(a, dtype=torch.float32, requires_grad=True)
    np.testing.assert_allclose(fg.channel_sum(tensor), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fg.channel_sum(tensor.bfloat16()), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "shape", [(12,), (4, 12, 16), (2, 3, 12, 16), (12, 16, 3), (1, 1, 3, 12, 16)]
)
def test_channel_sum_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="attribution"):
        fg.channel_sum(np.zeros(shape))


def test_channel_sum_rejects_empty_and_non_numeric():
    with pytest.raises(ValueError, match="empty"):
        fg.channel_sum(np.zeros((3, 0, 4)))
    with pytest.raises(ValueError, match="numeric"):
        fg.channel_sum(np.array([["a", "b"]]))


def test_shared_signed_range_pools_all_maps():
    a, b = _attr(3), _attr(4, (3, 5, 7), scale=10.0)
    pooled = np.concatenate([a.sum(0).ravel(), b.sum(0).ravel()])
    assert fg.shared_signed_range([a, b], 95) == pytest.approx(_pct(pooled, 95))
    with pytest.raises(ValueError, match="empty"):
        fg.shared_signed_range([])


def test_to_uint8_image_layouts_agree():
    img = _image(5)
    expected = np.rint(img.transpose(1, 2, 0) * 255).astype(np.uint8)
    np.testing.assert_array_equal(fg.to_uint8_image(img), expected)
    np.testing.assert_array_equal(fg.to_uint8_image(img.transpose(1, 2, 0)), expected)
    np.testing.assert_array_equal(fg.to_uint8_image(torch.tensor(img)[None]), expected)
    out_of_range = np.stack([np.full((2, 2), -1.0), np.full((2, 2), 2.0), np.full((2, 2), np.nan)])
    np.testing.assert_array_equal(fg.to_uint8_image(out_of_range)[0, 0], [0, 255, 0])
    assert fg.to_uint8_image(expected).dtype == np.uint8
    np.testing.assert_array_equal(fg.to_uint8_image(expected), expected)


@pytest.mark.parametrize("shape", [(12, 16), (4, 12, 16), (12, 16, 4), (2, 3, 4, 4)])
def test_to_uint8_image_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="image"):
        fg.to_uint8_image(np.zeros(shape))


# --------------------------------------------------------------------------- rgb difference


def test_rgb_difference_minmax_maps_min_to_0_and_max_to_255():
    d = _attr(6, scale=0.1)
    out = fg.rgb_difference_image(d, "minmax")
    hwc = d.transpose(1, 2, 0)
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    assert out[np.unravel_index(hwc.argmin(), hwc.shape)] == 0
    assert out[np.unravel_index(hwc.argmax(), hwc.shape)] == 255
    expected = np.rint((hwc - hwc.min()) / (hwc.max() - hwc.min()) * 255)
    np.testing.assert_array_equal(out, expected)


def test_rgb_difference_percentile_is_symmetric_around_mid_grey():
    d = _attr(7, scale=0.1)
    d[:, 0, 0] = 0.0
    out = fg.rgb_difference_image(d, "percentile", 99.0)
    assert np.all(out[0, 0] == 128)
    limit = _pct(d, 99.0)
    hwc = d.transpose(1, 2, 0)
    assert np.all(out[hwc >= limit] == 255) and np.all(out[hwc <= -limit] == 0)
    expected = np.rint(127.5 + 127.5 * np.clip(hwc / limit, -1, 1))
    np.testing.assert_array_equal(out, expected)
    # Unlike min-max, a lone outlier does not squash everything else to grey.
    d[0, 5, 5] = 1e3
    robust = fg.rgb_difference_image(d, "percentile", 99.0)
    squashed = fg.rgb_difference_image(d, "minmax")
    assert len(np.unique(robust)) > 100 > 5 > len(np.unique(squashed))


def test_rgb_difference_constant_and_bad_mode():
    assert np.all(fg.rgb_difference_image(np.zeros((3, 4, 4)), "minmax") == 128)
    assert np.all(fg.rgb_difference_image(np.zeros((3, 4, 4)), "percentile") == 128)
    with pytest.raises(ValueError, match="mode"):
        fg.rgb_difference_image(np.zeros((3, 4, 4)), "zscore")
    with pytest.raises(ValueError, match="diff"):
        fg.rgb_difference(np.zeros((4, 4)))


@pytest.mark.parametrize("mode", ["minmax", "percentile"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rgb_difference_refuses_nan_and_infinity(mode, bad):
    # Drawn as 0, a NaN became the minimum and moved every other pixel's colour (a review):
    # [0.1, 0.2, 0.15] drew as [0, 255, 127], and with a NaN last as [128, 255, 0].
    diff = np.full((3, 2, 2), 0.1)
    diff[2, 1, 1] = bad
    with pytest.raises(ValueError, match="diff holds NaN or infinite values"):
        fg.rgb_difference_image(diff, mode)


def test_complex_arrays_are_refused_not_drawn_without_their_imaginary_part():
    # channel_sum([[1+5j, -2j]]) gave [[1, -0]]: a purely imaginary map drew as zero.
    import torch

    for bad in (np.array([[1 + 5j, -2j]]), torch.ones(3, 4, 4, dtype=torch.complex64)):
        for draw in (fg.signed_heatmap, fg.signed_range, fg.rgb_difference_image):
            with pytest.raises(ValueError, match="real numeric array"):
                draw(bad)


def test_rgb_difference_figure():
    d = _attr(8)
    fig = fg.rgb_difference(d, mode="percentile", percentile=90, title="change")
    assert [t.type for t in fig.data] == ["image"]
    np.testing.assert_array_equal(fig.data[0].z, fg.rgb_difference_image(d, "percentile", 90))
    assert fig.layout.title.text == "change"
    _assert_image_axes(fig)


# --------------------------------------------------------------------------- single heatmaps


def test_signed_heatmap_range_is_symmetric_percentile():
    a = _attr(9)
    fig = fg.signed_heatmap(a, percentile=98, title="pullback")
    assert [t.type for t in fig.data] == ["heatmap"]
    trace = fig.data[0]
    np.testing.assert_allclose(trace.z, a.sum(0), rtol=1e-6, atol=1e-6)
    assert trace.z.shape == (12, 16)
    expected = _pct(a.sum(0), 98)
    assert trace.zmax == pytest.approx(expected) and trace.zmin == pytest.approx(-expected)
    assert trace.zmid == 0 and trace.colorscale is not None
    assert fig.layout.title.text == "pullback"
    _assert_image_axes(fig)


def test_signed_heatmap_explicit_zmax_and_validation():
    fig = fg.signed_heatmap(_attr(10), zmax=0.25, colorscale="PiYG")
    assert (fig.data[0].zmin, fig.data[0].zmax) == (-0.25, 0.25)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="zmax"):
            fg.signed_heatmap(_attr(10), zmax=bad)


def test_magnitude_overlay_layers_and_normalisation():
    img, a = _image(11), _attr(12)
    fig = fg.magnitude_overlay(img, a, percentile=95, opacity=0.4)
    assert [t.type for t in fig.data] == ["image", "heatmap"]
    photo, heat = fig.data
    np.testing.assert_array_equal(photo.z, np.rint(img.transpose(1, 2, 0) * 255))
    mags = np.abs(a.sum(0))
    expected = np.clip(mags / np.percentile(mags, 95), 0, 1)
    np.testing.assert_allclose(heat.z, expected, rtol=1e-6, atol=1e-6)
    assert heat.z.max() == pytest.approx(1.0) and heat.z.min() >= 0
    assert (heat.zmin, heat.zmax, heat.opacity) == (0.0, 1.0, 0.4)
    assert heat.colorscale[0][1].replace(" ", "").endswith(",0)")  # transparent at 0
    _assert_image_axes(fig)


def test_magnitude_overlay_rejects_mismatch_and_bad_opacity():
    with pytest.raises(ValueError, match="must match"):
        fg.magnitude_overlay(_image(0), _attr(0, (3, 12, 15)))
    with pytest.raises(ValueError, match="opacity"):
        fg.magnitude_overlay(_image(0), _attr(0), opacity=1.5)
    with pytest.raises(ValueError, match="image"):
        fg.magnitude_overlay(_image(0, (4, 12, 16)), _attr(0))


# --------------------------------------------------------------------------- multi-panel


def test_labelled_grid_signed_shares_one_range_and_one_colourbar():
    panels = [[_attr(20), _attr(21, scale=5.0)], [_attr(22, scale=0.01), None]]
    fig = fg.labelled_grid(
        panels, row_labels=["dog", "cat"], col_labels=["T=0.1", "T=1"], kind="signed", title="g"
    )
    assert [t.type for t in fig.data] == ["heatmap"] * 3
    pooled = np.concatenate([p.sum(0).ravel() for row in panels for p in row if p is not None])
    expected = _pct(pooled, 99.5)
    for trace in fig.data:
        assert trace.zmax == pytest.approx(expected) and trace.zmin == pytest.approx(-expected)
    assert sum(bool(t.showscale) for t in fig.data) == 1
    np.testing.assert_allclose(fig.data[1].z, panels[0][1].sum(0), rtol=1e-6)
    assert {_user("T=0.1"), _user("T=1")} <= set(_annotation_texts(fig))
    assert fig.layout.yaxis.title.text == _user("dog")
    assert fig.layout.yaxis3.title.text == _user("cat")
    _assert_image_axes(fig)

    fixed = fg.labelled_grid(panels, kind="signed", zmax=2.0)
    assert {(t.zmin, t.zmax) for t in fixed.data} == {(-2.0, 2.0)}


def test_labelled_grid_images():
    panels = [[_image(i) for i in range(3)], [_image(i, (12, 16, 3)) for i in range(3, 6)]]
    fig = fg.labelled_grid(panels, row_labels=["a", "b"], col_labels=["x", "y", "z"])
    assert [t.type for t in fig.data] == ["image"] * 6
    assert all(t.z.shape == (12, 16, 3) for t in fig.data)
    np.testing.assert_array_equal(fig.data[4].z, np.rint(panels[1][1] * 255))
    assert set(_annotation_texts(fig)) >= {_user("x"), _user("y"), _user("z")}
    assert fig.layout.yaxis4.title.text == _user("b")


def test_labelled_grid_validation():
    a = _attr(0)
    with pytest.raises(ValueError, match="panels"):
        fg.labelled_grid([])
    with pytest.raises(ValueError, match="panels"):
        fg.labelled_grid([[a, a], [a]], kind="signed")
    with pytest.raises(ValueError, match="row_labels"):
        fg.labelled_grid([[a]], row_labels=["a", "b"], kind="signed")
    with pytest.raises(ValueError, match="col_labels"):
        fg.labelled_grid([[a, a]], col_labels=["a"], kind="signed")
    with pytest.raises(ValueError, match="kind"):
        fg.labelled_grid([[a]], kind="heat")
    with pytest.raises(ValueError, match=r"panels\[0\]\[1\]"):
        fg.labelled_grid([[a, np.zeros((5, 3, 4))]], kind="signed")


def test_temperature_strip_per_panel_ranges_by_default():
    temps = [0.01, 0.1, 1.0, 10.0]
    maps = [_attr(30 + i, scale=10.0**i) for i in range(4)]
    fig = fg.temperature_strip(maps, temps, percentile=99)
    assert [t.type for t in fig.data] == ["heatmap"] * 4
    assert _annotation_texts(fig) == ["T = 0.01", "T = 0.1", "T = 1", "T = 10"]
    for trace, a in zip(fig.data, maps):
        expected = _pct(a.sum(0), 99)
        assert trace.zmax == pytest.approx(expected) and trace.zmin == pytest.approx(-expected)
    assert len({t.zmax for t in fig.data}) == 4
    assert not any(t.showscale for t in fig.data)


def test_temperature_strip_shared_range():
    maps = [_attr(40 + i, scale=10.0**i) for i in range(3)]
    fig = fg.temperature_strip(maps, np.logspace(-2, 1, 3), shared_range=True)
    expected = _pct(np.concatenate([a.sum(0).ravel() for a in maps]), 99.5)
    assert {(t.zmin, t.zmax) for t in fig.data} == {(-expected, expected)}
    assert sum(bool(t.showscale) for t in fig.data) == 1
    assert _annotation_texts(fig) == ["T = 0.01", "T = 0.316", "T = 10"]


def test_temperature_strip_validation():
    with pytest.raises(ValueError, match="temperatures"):
        fg.temperature_strip([_attr(0)], [0.1, 1.0])
    with pytest.raises(ValueError, match="temperatures"):
        fg.temperature_strip([_attr(0)], [0.0])
    with pytest.raises(ValueError, match="empty"):
        fg.temperature_strip([], [])


def test_side_by_side_shares_raw_range():
    pullback, gradient = _attr(50), _attr(51, scale=100.0)
    fig = fg.side_by_side({"pullback": pullback, "gradient": torch.tensor(gradient)})
    assert [t.type for t in fig.data] == ["heatmap"] * 2
    assert _annotation_texts(fig) == ["pullback", "gradient"]
    pooled = np.concatenate([pullback.sum(0).ravel(), gradient.sum(0).ravel()])
    expected = _pct(pooled, 99.5)
    assert {(t.zmin, t.zmax) for t in fig.data} == {(-expected, expected)}
    np.testing.assert_allclose(fig.data[1].z, gradient.sum(0), rtol=1e-6)
    assert sum(bool(t.showscale) for t in fig.data) == 1


def test_side_by_side_normalize_puts_each_map_on_unit_range():
    pullback, gradient = _attr(52), _attr(53, scale=100.0)
    fig = fg.side_by_side({"p": pullback, "g": gradient}, percentile=99, normalize=True)
    assert {(t.zmin, t.zmax) for t in fig.data} == {(-1.0, 1.0)}
    for trace, a in zip(fig.data, (pullback, gradient)):
        np.testing.assert_allclose(trace.z, a.sum(0) / _pct(a.sum(0), 99), rtol=1e-6)
        assert _pct(trace.z, 99) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="empty"):
        fg.side_by_side({})


def test_topk_bar_order_text_and_highlight():
    p = np.array([0.05, 0.40, 0.01, 0.30, 0.10, 0.14])
    labels = ["a", "b", "c", "d", "e", "f"]
    fig = fg.topk_bar(p, labels, k=3, highlight=3, title="top 3")
    assert [t.type for t in fig.data] == ["bar"]
    bar = fig.data[0]
    order = np.argsort(-p)[:3]
    np.testing.assert_allclose(bar.x, p[order])
    assert list(fig.layout.yaxis.ticktext) == [_user(labels[i]) for i in order] \
        == [_user("b"), _user("d"), _user("f")]
    assert list(bar.text) == ["40.0%", "30.0%", "14.0%"]
    assert fig.layout.yaxis.autorange == "reversed"  # rank 0 (largest) on top
    colours = list(bar.marker.color)
    assert colours[1] != colours[0] == colours[2]


def test_topk_bar_duplicate_names_and_small_class_count():
    fig = fg.topk_bar(torch.tensor([0.2, 0.5, 0.3]), ["crane", "crane", "kite"], k=10)
    assert len(fig.data[0].x) == 3
    assert list(fig.layout.yaxis.ticktext) == [_user("crane"), _user("kite"), _user("crane")]
    assert len(set(fig.data[0].y)) == 3


def test_topk_bar_validation():
    p = np.full(4, 0.25)
    with pytest.raises(ValueError, match="probabilities"):
        fg.topk_bar(np.ones((2, 2)), ["a"] * 4)
    with pytest.raises(ValueError, match="labels"):
        fg.topk_bar(p, ["a"] * 3)
    with pytest.raises(ValueError, match="k"):
        fg.topk_bar(p, ["a"] * 4, k=0)
    with pytest.raises(ValueError, match="highlight"):
        fg.topk_bar(p, ["a"] * 4, highlight=4)
    with pytest.raises(ValueError, match="empty"):
        fg.topk_bar(np.array([]), [])
    for bad in ({"k": np.inf}, {"k": float("nan")}, {"highlight": 1.5}, {"highlight": True}):
        with pytest.raises(ValueError, match=r"k must|highlight"):  # OverflowError, or nothing
            fg.topk_bar(p, ["a"] * 4, **bad)
    assert fg.topk_bar(p, ["a"] * 4, k=np.int64(2), highlight=np.float64(1.0)).data


def test_integer_images_other_than_uint8_are_refused_not_clipped_white():
    image = np.full((3, 4, 4), 200, dtype=np.int64)
    with pytest.raises(ValueError, match="uint8"):
        fg.to_uint8_image(image)
    np.testing.assert_array_equal(fg.to_uint8_image(image.astype(np.uint8)),
                                  np.full((4, 4, 3), 200, dtype=np.uint8))


def test_ascent_frames():
    images = [_image(60 + i) for i in range(4)]
    labels = [f"step {i} · p={0.2 * i:.2f}" for i in range(4)]
    fig = fg.ascent_frames(images, labels=labels, title="ascent")
    assert [t.type for t in fig.data] == ["image"] * 4
    assert _annotation_texts(fig) == labels
    for trace, img in zip(fig.data, images):
        np.testing.assert_array_equal(trace.z, np.rint(img.transpose(1, 2, 0) * 255))
    _assert_image_axes(fig)
    assert len(fg.ascent_frames(images).data) == 4
    with pytest.raises(ValueError, match="labels"):
        fg.ascent_frames(images, labels=["only one"])
    with pytest.raises(ValueError, match="empty"):
        fg.ascent_frames([])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        fg.ascent_frames([images[0], np.zeros((5, 12, 16))])


def test_figures_serialise_without_plotlyjs():
    fig = fg.labelled_grid([[_attr(70)]], row_labels=["r"], col_labels=["c"], kind="signed")
    text = fig.to_json()
    assert "heatmap" in text and "cdn.plot.ly" not in text and len(text) < 50_000


def test_logit_curves_one_line_per_target():
    logits = np.array([[1.0, 2.0], [1.5, 1.0], [3.0, 0.5]])
    fig = fg.logit_curves(logits, ["cat", "dog"])
    assert [t.type for t in fig.data] == ["scatter", "scatter"]
    np.testing.assert_array_equal(fig.data[1].y, [2.0, 1.0, 0.5])
    assert list(fig.data[0].x) == [0, 1, 2] and fig.data[0].name == _user("cat")
    with pytest.raises(ValueError, match="names"):
        fg.logit_curves(logits, ["cat"])
    with pytest.raises(ValueError, match="logits"):
        fg.logit_curves(np.zeros(3), ["cat"])


# --------------------------------------------------------------------------- compact encoding


def _written(fig: go.Figure) -> dict:
    """What plotly writes for ``fig``, as plain data."""
    return json.loads(fig.to_json())


def _decode_png(source: str) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    prefix = "data:image/png;base64,"
    assert source.startswith(prefix), source[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(source[len(prefix):]))))


def _decode_bdata(spec: dict) -> np.ndarray:
    import base64

    dtypes = {"u1": np.uint8, "i1": np.int8, "f4": np.float32, "f8": np.float64}
    flat = np.frombuffer(base64.b64decode(spec["bdata"]), dtype=dtypes[spec["dtype"]])
    shape = [int(n) for n in str(spec["shape"]).split(",")] if "shape" in spec else [-1]
    return flat.reshape(shape)


def test_compact_images_are_lossless_pngs_and_the_input_is_untouched():
    images = [_image(80 + i) for i in range(3)]
    fig = fg.ascent_frames(images, labels=["a", "b", "c"])
    small = fg.compact(fig)
    assert [t.type for t in small.data] == ["image"] * 3
    for trace, img in zip(small.data, images):
        assert trace.z is None
        np.testing.assert_array_equal(_decode_png(trace.source), fg.to_uint8_image(img))
    assert all(t.z is not None and t.source is None for t in fig.data)
    assert small.layout.annotations == fig.layout.annotations
    # The JSON carries the PNG, not the pixels.
    written = _written(small)["data"][0]
    assert written["source"].startswith("data:image/png;base64,") and "z" not in written


def test_compact_heatmaps_are_one_byte_codes_of_the_fixed_range():
    a = _attr(81, scale=3.0)
    fig = fg.signed_heatmap(a, percentile=90)
    zmax = fig.data[0].zmax
    small = fg.compact(fig)
    trace = small.data[0]
    spec = small.to_plotly_json()["data"][0]["z"]
    assert isinstance(spec, dict) and spec["dtype"] == "u1", spec  # plotly's typed array
    codes = _decode_bdata(spec)
    np.testing.assert_array_equal(codes, trace.z)
    assert codes.shape == (12, 16)
    assert (trace.zmin, trace.zmax) == (0, 254) and trace.zmid is None
    step = 2 * zmax / 254
    values = -zmax + codes * step
    np.testing.assert_allclose(values, np.clip(a.sum(0), -zmax, zmax), atol=step / 2 + 1e-12)
    # Saturated pixels take the end codes; 0 would fall exactly on the middle code.
    assert codes[a.sum(0) >= zmax].min() == 254 and codes[a.sum(0) <= -zmax].max() == 0
    zero = fg.compact(fg.signed_heatmap(np.zeros((4, 4)), zmax=1.0)).data[0].z
    assert np.all(zero == 127)
    # The colour bar reads in the original units.
    bar = trace.colorbar
    np.testing.assert_allclose(-zmax + np.asarray(bar.tickvals) * step,
                               [float(t) for t in bar.ticktext], rtol=5e-3)
    assert "%{z" not in trace.hovertemplate


@pytest.mark.parametrize("scale", [1e-50, 1e100, 1e306])
def test_float64_maps_far_outside_float32_keep_their_colours(scale):
    # A float64 map of 1e-50 was drawn as float32 zeros (all white) and one of 1e100 as
    # infinities; a range near float64's largest number made every compact code 0.
    a = _attr(81, scale=3.0)
    expected = fg.compact(fg.signed_heatmap(a, percentile=90)).data[0].z
    for figure in (fg.signed_heatmap(a * scale, percentile=90),):
        assert np.all(np.isfinite(np.asarray(figure.data[0].z, dtype=np.float64)))
        np.testing.assert_array_equal(fg.compact(figure).data[0].z, expected)
    d = _attr(6, scale=0.1)
    np.testing.assert_array_equal(fg.rgb_difference_image(d * scale * 100, "minmax"),
                                  fg.rgb_difference_image(d, "minmax"))


def test_compact_overlay_and_what_it_leaves_alone():
    img, a = _image(82), _attr(83)
    overlay = fg.compact(fg.magnitude_overlay(img, a))
    photo, heat = overlay.data
    np.testing.assert_array_equal(_decode_png(photo.source), fg.to_uint8_image(img))
    mags = np.abs(a.sum(0))
    expected = np.clip(mags / np.percentile(mags, 99.5), 0, 1)
    np.testing.assert_allclose(heat.z / 254, expected, atol=0.5 / 254 + 1e-9)
    # A heatmap with gaps (made elsewhere: the package's figures refuse them) keeps its
    # floats (a code cannot say "no value"), a bar chart is not touched, and a heatmap without
    # a fixed range keeps its values.
    gappy = fg.signed_heatmap(_attr(84), zmax=1.0)
    gappy.data[0].z = np.where(np.arange(gappy.data[0].z.size).reshape(gappy.data[0].z.shape)
                               == 0, np.nan, gappy.data[0].z)
    kept = fg.compact(gappy).data[0]
    assert kept.z.dtype == np.float32 and np.isnan(kept.z[0, 0])
    bar = fg.topk_bar(np.full(4, 0.25), list("abcd"))
    assert _written(fg.compact(bar))["data"] == _written(bar)["data"]
    free = go.Figure(go.Heatmap(z=[[1.0, 2.0]]))
    assert _written(fg.compact(free))["data"] == _written(free)["data"]


def test_fit_width_scales_the_plot_area_and_keeps_margins():
    maps = [_attr(90 + i) for i in range(7)]
    wide = fg.temperature_strip(maps, [0.01, 0.03, 0.1, 0.3, 1, 3, 10])
    fitted = fg.fit_width(wide, 800)
    m = wide.layout.margin
    assert fitted.layout.width == 800 and fitted.layout.margin == m
    before = (wide.layout.width - m.l - m.r) / (wide.layout.height - m.t - m.b)
    after = (800 - m.l - m.r) / (fitted.layout.height - m.t - m.b)
    assert after == pytest.approx(before, rel=0.01)
    assert wide.layout.width > 800  # the input is untouched
    narrow = fg.signed_heatmap(_attr(99))
    same = fg.fit_width(narrow, 800).layout
    assert (same.width, same.height) == (narrow.layout.width, narrow.layout.height)


def test_users_labels_are_shown_as_written_never_as_markup():
    # Plotly reads a subset of HTML in its text: a class name could become a live link, a line
    # break or bold; a U+202E in a file name reversed the names and numbers after it.
    labels = ['<a href="https://example.com">click</a>', "AT&amp;T", "cat<br>dog",
              "a\u202e.png"]
    bar = fg.topk_bar(np.array([0.4, 0.3, 0.2, 0.1]), labels, k=4)
    assert list(bar.layout.yaxis.ticktext) == [
        _user('&lt;a href="https://example.com"&gt;click&lt;/a&gt;'), _user("AT&amp;amp;T"),
        _user("cat&lt;br&gt;dog"), _user("a\u202e.png")]
    grid = fg.labelled_grid([[np.zeros((3, 2, 2))]], row_labels=["<b>x</b>"],
                                 col_labels=["y&z"])
    assert _user("y&amp;z") in _annotation_texts(grid)
    assert grid.layout.yaxis.title.text == _user("&lt;b&gt;x&lt;/b&gt;")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_maps_with_nan_or_infinity_are_refused_not_drawn(bad):
    # NaN was drawn as a gap and infinity as a saturated pixel, and the overlay drew an
    # infinity (the most extreme value) fully transparent, as "nothing here" (a hostile review).
    img, a = _image(90), _attr(91)
    a[1, 2, 3] = bad
    for draw in (lambda: fg.signed_heatmap(a), lambda: fg.magnitude_overlay(img, a),
                 lambda: fg.side_by_side({"x": a}), lambda: fg.temperature_strip([a], [1.0]),
                 lambda: fg.relative_map(a)):
        with pytest.raises(ValueError, match="NaN or infinite"):
            draw()
    with pytest.raises(ValueError, match="probabilities"):
        fg.topk_bar(np.array([0.5, bad, 0.1]), list("abc"))


def test_compact_colour_bar_labels_near_float64s_largest_number():
    # linspace(zmin, zmax) overflowed: the labels read nan, inf, inf, inf, 1.5e+308.
    figure = fg.compact(fg.signed_heatmap(np.array([[-1.5e308, 1.5e308]]), zmax=1.5e308))
    labels = figure.data[0].colorbar.ticktext
    assert labels == ("-1.5e+308", "-7.5e+307", "0", "7.5e+307", "1.5e+308")
