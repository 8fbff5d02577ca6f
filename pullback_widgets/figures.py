"""Plotly figures for attribution maps: pure functions, arrays in, ``go.Figure`` out.

Conventions shared by every builder:

- Attributions are ``(3, H, W)``, ``(1, 3, H, W)`` (a batch of one) or ``(H, W)``, in the units of
  the model's output per unit of (normalised) input; heatmaps show them summed over channels.
- Images are ``(3, H, W)``, ``(1, 3, H, W)`` or ``(H, W, 3)`` floats in [0, 1] (uint8 is taken as
  0..255). Torch tensors are accepted anywhere an array is (duck-typed via ``.detach``).
- Signed maps use a diverging colour scale centred on 0 with a symmetric range ``[-zmax, zmax]``,
  ``zmax`` being a high percentile of ``|a|`` (:func:`signed_range`) so a few extreme pixels do not
  wash out the rest. A map to draw with a NaN or an infinity is an error (a gap or a saturated
  pixel would be read as a value; an infinity in an overlay was drawn transparent);
  :func:`signed_range` alone counts non-finite values as 0.
- Images are drawn with row 0 at the top, square pixels and no ticks. No plotly.js is embedded;
  writing HTML is someone else's job.
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

__all__ = [
    "ascent_frames",
    "channel_sum",
    "compact",
    "fit_width",
    "labelled_grid",
    "magnitude_overlay",
    "mask_outline",
    "rgb_difference",
    "rgb_difference_image",
    "shared_signed_range",
    "side_by_side",
    "signed_heatmap",
    "signed_range",
    "temperature_strip",
    "to_uint8_image",
    "topk_bar",
]

_TINY = 1e-12
_PANEL_PX = 220  # one cell of a grid or strip
_SINGLE_PX = 380  # a figure with one image
_IMAGE_AXIS = dict(
    showticklabels=False,
    ticks="",
    showgrid=False,
    zeroline=False,
    showline=False,
    constrain="domain",
)
# Transparent where the attribution is 0, so the photo shows through untouched there.
_OVERLAY_SCALE = [
    [0.0, "rgba(255, 230, 0, 0)"],
    [0.35, "rgba(255, 170, 0, 0.55)"],
    [1.0, "rgba(215, 0, 0, 1)"],
]
_SIGNED_HOVER = "x=%{x}, y=%{y}<br>%{z:.3g}<extra></extra>"
# compact(): a heatmap's [zmin, zmax] becomes the codes 0..254, so that a symmetric range puts
# 0 exactly on code 127 (the white of a diverging scale).
_TOP_CODE = 254
_COLORBAR_TICKS = 5


# --------------------------------------------------------------------------- user text

def isolated(text: object) -> str:
    """``text`` between Unicode isolates (U+2068 ... U+2069): direction controls inside it (a
    file name with U+202E) cannot reorder the text around it."""
    return f"\u2068{text}\u2069"


def plain_text(text: object) -> str:
    """A user's string (a class or file name) for a Plotly text field, shown as written:
    Plotly reads a subset of HTML in its text, so ``&``, ``<`` and ``>`` are escaped (a label
    cannot become a link or a line break), and the whole is :func:`isolated`."""
    return isolated(html.escape(str(text), quote=False))


# --------------------------------------------------------------------------- array helpers

def _raw_array(x: Any, name: str) -> np.ndarray:
    """``x`` as a numpy array, keeping its dtype; torch tensors are detached and moved to CPU."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        try:
            arr = np.asarray(x)
        except TypeError:
            # numpy has no bfloat16; such tensors go through float32.
            arr = np.asarray(x.float())
    else:
        if isinstance(x, np.ma.MaskedArray):  # np.asarray drops the mask: drawn as they are
            raise TypeError(f"{name} is a masked array, whose masked entries would be drawn "
                            "as the values under the mask; fill them first, e.g. "
                            "array.filled(0.0)")
        arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) \
            or np.iscomplexobj(arr):  # drawn, the imaginary part would vanish without a word
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    return arr


def _finite_or_zero(a: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(a), a, 0.0)


def _check_percentile(percentile: float) -> float:
    p = float(percentile)
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    return p


def _check_zmax(zmax: float) -> float:
    z = float(zmax)
    if not (np.isfinite(z) and z > 0):
        raise ValueError(f"zmax must be a finite number > 0, got {zmax!r}")
    return z


def _abs_percentile(values: np.ndarray, percentile: float) -> float:
    """The ``percentile`` of ``|values|`` (non-finite as 0), never 0."""
    mags = np.abs(_finite_or_zero(np.asarray(values, dtype=np.float64))).ravel()
    p = _check_percentile(percentile)
    limit = float(np.percentile(mags, p))
    if limit > 0:
        return limit
    # A sparse map can have most of its mass at 0; the peak is then the only usable scale.
    peak = float(mags.max())
    return peak if peak > 0 else _TINY


def _channel_sum(attribution: Any, name: str) -> np.ndarray:
    a = _raw_array(attribution, name).astype(np.float64, copy=False)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"{name} must be a batch of one (1, 3, H, W), got shape {a.shape}")
        a = a[0]
    if a.ndim == 3:
        if a.shape[0] not in (1, 3):
            raise ValueError(
                f"{name} must be channels-first (3, H, W) or (1, H, W), got shape {a.shape}"
            )
        a = a.sum(axis=0)
    elif a.ndim != 2:
        raise ValueError(f"{name} must be (3, H, W), (1, 3, H, W) or (H, W), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds NaN or infinite values: drawn, they would pass for a "
                         "value (or for none)")
    return a


def _to_hwc(x: Any, name: str) -> tuple[np.ndarray, bool]:
    """``x`` as float64 (H, W, 3) and whether it came in as uint8; values are not rescaled."""
    arr = _raw_array(x, name)
    is_uint8 = arr.dtype == np.uint8
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise ValueError(f"{name} must be a batch of one (1, 3, H, W), got shape {arr.shape}")
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be (3, H, W) or (H, W, 3), got shape {arr.shape}")
    # Channels-first wins a tie such as (3, H, 3): tensors from torch are CHW.
    if arr.shape[0] == 3:
        arr = arr.transpose(1, 2, 0)
    elif arr.shape[-1] != 3:
        raise ValueError(f"{name} must have 3 colour channels, got shape {arr.shape}")
    return arr, is_uint8


# --------------------------------------------------------------------------- public array API


def signed_range(attribution: Any, percentile: float = 99.5) -> float:
    """The symmetric colour limit ``zmax`` for ``attribution``: ``percentile`` of ``|a|``.

    Computed over every entry of ``attribution`` as given (any shape): pass
    ``channel_sum(a)`` to match what :func:`signed_heatmap` shows. Non-finite entries count
    as 0. Never 0: falls back to ``max|a|``, then to 1e-12 for an all-zero map.
    Same units as ``attribution``.
    """
    return _abs_percentile(_raw_array(attribution, "attribution"), percentile)


def shared_signed_range(attributions: Sequence[Any], percentile: float = 99.5) -> float:
    """One ``zmax`` for several attribution maps: the ``percentile`` of ``|channel_sum(a)|``
    pooled over all their pixels (maps may differ in size). Pass it as ``zmax=`` to builders."""
    if len(attributions) == 0:
        raise ValueError("attributions is empty")
    pooled = [_channel_sum(a, f"attributions[{i}]").ravel() for i, a in enumerate(attributions)]
    return _abs_percentile(np.concatenate(pooled), percentile)


def channel_sum(attribution: Any) -> np.ndarray:
    """(3, H, W), (1, 3, H, W), (1, H, W) or (H, W) -> float64 (H, W), summed over channels."""
    return _channel_sum(attribution, "attribution")


def relative_map(attribution: Any, percentile: float = 99.5) -> np.ndarray:
    """``channel_sum(attribution)`` divided by its own :func:`signed_range`: unitless (H, W),
    mostly in [-1, 1], so that maps of very different overall scale share one colour range."""
    summed = _channel_sum(attribution, "attribution")
    return summed / _abs_percentile(summed, percentile)


def to_uint8_image(image: Any) -> np.ndarray:
    """A [0, 1] float image (3, H, W), (1, 3, H, W) or (H, W, 3) -> uint8 (H, W, 3).

    Values outside [0, 1] are clipped and NaN becomes 0; a uint8 input is passed through.
    """
    return _to_uint8(image, "image")


def _whole(value: object) -> bool:
    """A whole real number (5 or 5.0, numpy's too), not a bool, NaN or infinity."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(value) and int(value) == value


def _to_uint8(image: Any, name: str) -> np.ndarray:
    dtype = _raw_array(image, name).dtype
    if np.issubdtype(dtype, np.integer) and dtype != np.uint8:
        raise ValueError(f"{name} must be floats in [0, 1] or uint8 0..255, got {dtype} (for "
                         "values 0..255 convert it to uint8, or divide by 255)")
    hwc, is_uint8 = _to_hwc(image, name)
    if is_uint8:
        return hwc.astype(np.uint8)
    hwc = np.clip(np.nan_to_num(hwc, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return np.rint(hwc * 255.0).astype(np.uint8)


def rgb_difference_image(
    diff: Any,
    mode: Literal["minmax", "percentile"] = "minmax",
    percentile: float = 99.0,
) -> np.ndarray:
    """An RGB difference (e.g. final ascent image minus start), (3, H, W) or (H, W, 3) in image
    units -> uint8 (H, W, 3) for display.

    - ``"minmax"`` (the paper's): per-image min-max scaling over all pixels and channels,
      min -> 0 and max -> 255. A constant difference maps to mid-grey (128).
    - ``"percentile"``: robust and sign-preserving: ``d / L`` clipped to [-1, 1] and mapped
      affinely to [0, 255], ``L`` being the ``percentile`` of ``|d|``; so 0 -> 128 (mid-grey),
      ``+L`` and above -> 255, ``-L`` and below -> 0.

    A NaN or an infinity is an error, as in every map: drawn as 0, it would move the scale
    of every other pixel.
    """
    d, _ = _to_hwc(diff, "diff")
    if not np.all(np.isfinite(d)):
        raise ValueError("diff holds NaN or infinite values: drawn, they would pass for a "
                         "value and rescale every other pixel")
    if mode == "minmax":
        lo, hi = float(d.min()), float(d.max())
        if hi <= lo:
            return np.full(d.shape, 128, dtype=np.uint8)
        # Halves first: hi - lo overflows for differences near float64's largest number.
        scaled = (d / 2 - lo / 2) / (hi / 2 - lo / 2) * 255.0
    elif mode == "percentile":
        limit = _abs_percentile(d, percentile)
        scaled = 127.5 + 127.5 * np.clip(d / limit, -1.0, 1.0)
    else:
        raise ValueError(f"mode must be 'minmax' or 'percentile', got {mode!r}")
    return np.rint(scaled).astype(np.uint8)


# --------------------------------------------------------------------------- figure helpers


def _grid(
    rows: int,
    cols: int,
    *,
    subplot_titles: Sequence[str] | None = None,
    column_titles: Sequence[str] | None = None,
) -> go.Figure:
    # Images sit edge to edge, so the default spacing (0.2 / cols) would waste most of the width.
    v_gap = 0.0 if rows == 1 else min(0.06 if subplot_titles else 0.03, 0.5 / (rows - 1))
    h_gap = 0.0 if cols == 1 else min(0.02, 0.5 / (cols - 1))
    return make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=list(subplot_titles) if subplot_titles else None,
        column_titles=list(column_titles) if column_titles else None,
        horizontal_spacing=h_gap,
        vertical_spacing=v_gap,
    )


def _style_image_figure(
    fig: go.Figure,
    *,
    title: str | None,
    width: int,
    height: int,
    left: int = 10,
    right: int = 10,
    top: int | None = None,
    bottom: int = 10,
) -> go.Figure:
    fig.update_xaxes(**_IMAGE_AXIS)
    # Row 0 at the top and square pixels, each y axis tied to its own x axis.
    fig.for_each_yaxis(
        lambda ax: ax.update(
            autorange="reversed", scaleanchor=ax.anchor or "x", scaleratio=1, **_IMAGE_AXIS
        )
    )
    if top is None:
        top = 50 if title else 30
    fig.update_layout(
        title=dict(text=title, x=0.5, xanchor="center") if title else None,
        width=width,
        height=height,
        margin=dict(l=left, r=right, t=top, b=bottom),
        template="plotly_white",
        showlegend=False,
    )
    return fig


def _single_size(shape: tuple[int, ...], extra_width: int) -> tuple[int, int]:
    """(width, height) in px of a one-image figure: the longer image side is _SINGLE_PX,
    plus room for a colour bar (``extra_width``) and a title."""
    h, w = shape[0], shape[1]
    scale = _SINGLE_PX / max(h, w)
    return int(w * scale) + extra_width, int(h * scale) + 60


# Colour limits inside which float32 keeps 8-bit colour steps of a map: normal numbers a few
# hundred times below the limit, and no overflow up to a few hundred times above it.
_FLOAT32_SAFE = (1e-30, 1e30)


def _signed_trace(
    z: np.ndarray, zmax: float, colorscale: str, *, showscale: bool, colorbar_title: str = ""
) -> go.Heatmap:
    return go.Heatmap(
        # float32 halves the figure's size; the colour mapping needs no more precision, where
        # the range is well inside float32's (a float64 map of 1e-50 would be all 0 there).
        z=z.astype(np.float32) if _FLOAT32_SAFE[0] < zmax < _FLOAT32_SAFE[1]
        and np.max(np.abs(z), where=np.isfinite(z), initial=0.0) < _FLOAT32_SAFE[1] else z,
        colorscale=colorscale,
        zmid=0.0,
        zmin=-zmax,
        zmax=zmax,
        showscale=showscale,
        colorbar=dict(thickness=12, len=0.9, title=dict(text=colorbar_title)),
        hovertemplate=_SIGNED_HOVER,
    )


def _image_trace(image: Any, name: str) -> go.Image:
    return go.Image(z=_to_uint8(image, name))


def _check_labels(labels: Sequence[str] | None, n: int, name: str) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str) or len(labels) != n:
        raise ValueError(f"{name} must be a sequence of {n} strings, got {labels!r}")
    return [str(s) for s in labels]


def _user_labels(labels: Sequence[str] | None, n: int, name: str) -> list[str] | None:
    """:func:`_check_labels` for labels that are users' strings, each as :func:`plain_text`."""
    checked = _check_labels(labels, n, name)
    return None if checked is None else [plain_text(label) for label in checked]


# --------------------------------------------------------------------------- builders


def mask_outline(figure: go.Figure, mask: Any, *, color: str = "#00e676") -> go.Figure:
    """``figure`` with the outline of ``mask`` (bool (H, W), e.g. the evidence of a synthetic
    image) drawn over its first panel: a contour at 0.5 of the mask as 0/1, in pixel
    coordinates, so it lies on the pixels of a heatmap or image of the same (H, W)."""
    z = _raw_array(mask, "mask")
    if z.ndim != 2 or z.dtype != bool:
        raise ValueError(f"mask must be a bool array (H, W), got {z.dtype} {z.shape}")
    figure.add_trace(go.Contour(
        z=z.astype(np.float32), contours=dict(start=0.5, end=0.5, size=1, coloring="none"),
        line=dict(color=color, width=2), showscale=False, hoverinfo="skip",
        name="evidence mask"))
    return figure


def signed_heatmap(
    attribution: Any,
    *,
    percentile: float = 99.5,
    zmax: float | None = None,
    title: str | None = None,
    colorscale: str = "RdBu_r",
) -> go.Figure:
    """One signed heatmap of ``channel_sum(attribution)``, (H, W), on a diverging scale.

    The colour range is ``[-zmax, zmax]`` centred on 0, ``zmax`` being
    ``signed_range(channel_sum(attribution), percentile)`` unless given (give the same ``zmax``
    to several figures to make them comparable). Values beyond it saturate.
    """
    z = _channel_sum(attribution, "attribution")
    zmax = _abs_percentile(z, percentile) if zmax is None else _check_zmax(zmax)
    fig = _grid(1, 1)
    fig.add_trace(_signed_trace(z, zmax, colorscale, showscale=True), row=1, col=1)
    width, height = _single_size(z.shape, extra_width=90)
    return _style_image_figure(
        fig, title=title, width=width, height=height, top=50 if title else 20
    )


def magnitude_overlay(
    image: Any,
    attribution: Any,
    *,
    percentile: float = 99.5,
    opacity: float = 0.6,
    title: str | None = None,
) -> go.Figure:
    """The photo with the attribution's magnitude laid over it.

    ``image`` is (3, H, W) or (H, W, 3) in [0, 1]; ``attribution`` any shape accepted by
    :func:`channel_sum` with the same (H, W). The overlay is ``|channel_sum(attribution)|``
    clipped at its ``percentile`` and divided by it, so unitless in [0, 1]; 0 is fully
    transparent and ``opacity`` (0..1) scales the whole layer.
    """
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity!r}")
    photo = _image_trace(image, "image")
    mags = np.abs(_channel_sum(attribution, "attribution"))
    h, w = photo.z.shape[:2]
    if mags.shape != (h, w):
        raise ValueError(
            f"attribution is {mags.shape[0]}x{mags.shape[1]} but image is {h}x{w}; they must match"
        )
    limit = _abs_percentile(mags, percentile)
    overlay = np.clip(mags / limit, 0.0, 1.0).astype(np.float32)

    fig = _grid(1, 1)
    fig.add_trace(photo, row=1, col=1)
    fig.add_trace(
        go.Heatmap(
            z=overlay,
            colorscale=_OVERLAY_SCALE,
            zmin=0.0,
            zmax=1.0,
            opacity=float(opacity),
            showscale=True,
            colorbar=dict(thickness=12, len=0.9, title=dict(text="|a| rel.")),
            # The layer is clipped for its colours: hover must not give 1 for a pixel of 100.
            hovertemplate=f"x=%{{x}}, y=%{{y}}<br>|a| / its {percentile:g}th percentile, "
                          "capped at 1: %{z:.2f}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    width, height = _single_size((h, w), extra_width=90)
    return _style_image_figure(
        fig, title=title, width=width, height=height, top=50 if title else 20
    )


def rgb_difference(
    diff: Any,
    *,
    mode: Literal["minmax", "percentile"] = "minmax",
    percentile: float = 99.0,
    title: str | None = None,
) -> go.Figure:
    """The RGB difference ``diff`` (3, H, W) or (H, W, 3) as an image; see
    :func:`rgb_difference_image` for the two scalings."""
    rgb = rgb_difference_image(diff, mode, percentile)
    fig = _grid(1, 1)
    fig.add_trace(go.Image(z=rgb), row=1, col=1)
    width, height = _single_size(rgb.shape[:2], extra_width=20)
    return _style_image_figure(
        fig, title=title, width=width, height=height, top=50 if title else 20
    )


def labelled_grid(
    panels: Sequence[Sequence[Any]],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    kind: Literal["image", "signed"] = "image",
    zmax: float | None = None,
    percentile: float = 99.5,
    colorscale: str = "RdBu_r",
    title: str | None = None,
) -> go.Figure:
    """A grid of panels with column titles on top and row labels on the left.

    ``panels`` is a list of rows, each a list of the same length; a ``None`` cell stays blank.
    ``kind="image"``: cells are images (3, H, W) in [0, 1]. ``kind="signed"``: cells are
    attributions, drawn as channel-summed heatmaps that all share ONE range ``[-zmax, zmax]``
    (default: :func:`shared_signed_range` over every cell) and one colour bar.
    """
    if kind not in ("image", "signed"):
        raise ValueError(f"kind must be 'image' or 'signed', got {kind!r}")
    rows = [list(r) for r in panels]
    if not rows or not rows[0]:
        raise ValueError("panels must be a non-empty list of non-empty rows")
    n_cols = len(rows[0])
    if any(len(r) != n_cols for r in rows):
        raise ValueError(f"panels rows must all have {n_cols} cells, got {[len(r) for r in rows]}")
    cells = [(i, j, p) for i, r in enumerate(rows) for j, p in enumerate(r) if p is not None]
    if not cells:
        raise ValueError("panels has no non-None cell")
    row_labels = _user_labels(row_labels, len(rows), "row_labels")
    col_labels = _user_labels(col_labels, n_cols, "col_labels")

    fig = _grid(len(rows), n_cols, column_titles=col_labels)
    if kind == "signed":
        maps = {(i, j): _channel_sum(p, f"panels[{i}][{j}]") for i, j, p in cells}
        if zmax is None:
            zmax = _abs_percentile(np.concatenate([m.ravel() for m in maps.values()]), percentile)
        zmax = _check_zmax(zmax)
        for n, ((i, j), z) in enumerate(maps.items()):
            trace = _signed_trace(z, zmax, colorscale, showscale=n == 0)
            fig.add_trace(trace, row=i + 1, col=j + 1)
    else:
        for i, j, p in cells:
            fig.add_trace(_image_trace(p, f"panels[{i}][{j}]"), row=i + 1, col=j + 1)

    _style_image_figure(
        fig,
        title=title,
        width=_PANEL_PX * n_cols + (70 if row_labels else 10) + (80 if kind == "signed" else 10),
        height=_PANEL_PX * len(rows) + 60,
        left=70 if row_labels else 10,
        right=80 if kind == "signed" else 10,
        top=(40 if col_labels else 10) + (30 if title else 0),
    )
    # Axis titles survive showticklabels=False, so they make simple left-hand row labels.
    for i, label in enumerate(row_labels or []):
        fig.update_yaxes(title=dict(text=label, standoff=4), row=i + 1, col=1)
    return fig


def temperature_strip(
    attributions: Sequence[Any],
    temperatures: Sequence[float],
    *,
    shared_range: bool = False,
    percentile: float = 99.5,
    colorscale: str = "RdBu_r",
    title: str | None = None,
    extra_panel: tuple[str, Any] | None = None,
) -> go.Figure:
    """One row of signed heatmaps of the same target at several temperatures, titled "T = 0.01".

    ``extra_panel``: (title, attribution) of one more map drawn at the end of the row, on the
    same terms (e.g. another method's map, for the classroom).

    By default each panel gets its own symmetric range (its ``percentile`` of ``|a|``, printed
    under it as "±zmax"): across T = 0.01 .. 10 the pullback's overall magnitude changes by
    orders of magnitude, and one shared range would leave all but one panel blank, while the
    interesting change is in the spatial pattern. ``shared_range=True`` uses one range (from
    :func:`shared_signed_range`) and one colour bar, to compare the magnitudes themselves.
    """
    attributions = list(attributions)
    temps = [float(t) for t in temperatures]
    if not attributions:
        raise ValueError("attributions is empty")
    if len(temps) != len(attributions):
        raise ValueError(
            f"temperatures has {len(temps)} entries but attributions has {len(attributions)}"
        )
    if any(not (np.isfinite(t) and t > 0) for t in temps):
        raise ValueError(f"temperatures must be finite and > 0, got {temps}")
    maps = [_channel_sum(a, f"attributions[{i}]") for i, a in enumerate(attributions)]
    titles = [f"T = {t:.3g}" for t in temps]
    if extra_panel is not None:
        maps.append(_channel_sum(extra_panel[1], "extra_panel"))
        titles.append(str(extra_panel[0]))
    shared = (
        _abs_percentile(np.concatenate([m.ravel() for m in maps]), percentile)
        if shared_range
        else None
    )

    fig = _grid(1, len(maps), subplot_titles=titles)
    for j, z in enumerate(maps):
        zmax = shared if shared is not None else _abs_percentile(z, percentile)
        fig.add_trace(
            _signed_trace(z, zmax, colorscale, showscale=shared is not None and j == 0),
            row=1,
            col=j + 1,
        )
        if shared is None:
            # A map that is 0 everywhere has no scale; its fallback range (1e-12) is no value's.
            scale = f"±{zmax:.2g}" if np.any(z) else "all 0"
            fig.update_xaxes(title=dict(text=scale, standoff=2), row=1, col=j + 1)
    return _style_image_figure(
        fig,
        title=title,
        width=_PANEL_PX * len(maps) + (90 if shared_range else 20),
        height=_PANEL_PX + 90 + (30 if title else 0),
        right=80 if shared_range else 10,
        top=40 + (30 if title else 0),
        bottom=10 if shared_range else 35,
    )


def topk_bar(
    probabilities: Any,
    labels: Sequence[str],
    *,
    k: int = 5,
    title: str | None = None,
    highlight: int | None = None,
) -> go.Figure:
    """A horizontal bar chart of the ``k`` largest ``probabilities`` (1-D, one per class, in
    [0, 1]) named by ``labels`` (one per class), largest on top, percentages as text.

    ``highlight`` is a class index drawn in another colour when it is among the top ``k``.
    Bars are placed by rank, not by name, so duplicate class names stay separate bars.
    """
    p = _raw_array(probabilities, "probabilities").astype(np.float64, copy=False)
    if p.ndim != 1:
        raise ValueError(f"probabilities must be 1-D (one per class), got shape {p.shape}")
    if not np.all((p >= 0) & (p <= 1 + 1e-6)):  # NaN fails too; a little over 1: rounding
        raise ValueError("probabilities must lie in [0, 1] (a softmax of the logits, not the "
                         "logits), got values outside it")
    if isinstance(labels, str) or len(labels) != p.size:
        raise ValueError(f"labels must have one name per class ({p.size}), got {len(labels)}")
    if not _whole(k) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if highlight is not None and not (_whole(highlight) and 0 <= highlight < p.size):
        raise ValueError(f"highlight must be a class index in [0, {p.size}), got {highlight!r}")
    k = min(int(k), p.size)
    # A stable sort keeps ties in class order.
    top = np.argsort(-p, kind="stable")[:k]
    values = p[top]
    colors = ["#d62728" if highlight is not None and c == highlight else "#1f77b4" for c in top]

    fig = go.Figure(
        go.Bar(
            x=values,
            y=list(range(k)),
            orientation="h",
            marker=dict(color=colors),
            text=[f"{v * 100:.1f}%" for v in values],
            textposition="auto",
            customdata=top,
            hovertemplate="class %{customdata}: %{x:.2%}<extra></extra>",
        )
    )
    fig.update_yaxes(
        tickmode="array",
        tickvals=list(range(k)),
        ticktext=[plain_text(labels[c]) for c in top],
        autorange="reversed",  # rank 0 on top
    )
    fig.update_xaxes(range=[0, max(1.0, float(np.nanmax(values)))], tickformat=".0%")
    fig.update_layout(
        title=dict(text=title, x=0.5, xanchor="center") if title else None,
        width=420,
        height=60 + 32 * k + (30 if title else 0),
        margin=dict(l=10, r=20, t=40 if title else 10, b=30),
        template="plotly_white",
        showlegend=False,
    )
    return fig


def side_by_side(
    attributions: Mapping[str, Any],
    *,
    percentile: float = 99.5,
    normalize: bool = False,
    colorscale: str = "RdBu_r",
    title: str | None = None,
) -> go.Figure:
    """Several signed heatmaps in one row, titled by their keys, sharing ONE colour range.

    ``normalize=False`` (default): raw values on one range, the ``percentile`` of ``|a|`` pooled
    over all maps, so a map much smaller in overall scale (a plain gradient vs a pullback can
    differ a lot) looks faint: that difference is real. ``normalize=True``: each map is first
    divided by its own :func:`signed_range`, so all are unitless and shown on [-1, 1], which
    compares the spatial patterns only.
    """
    if not attributions:
        raise ValueError("attributions is empty")
    names = [str(k) for k in attributions]
    maps = [_channel_sum(a, f"attributions[{k!r}]") for k, a in attributions.items()]
    if normalize:
        maps = [relative_map(m, percentile) for m in maps]
        zmax = 1.0
    else:
        zmax = _abs_percentile(np.concatenate([m.ravel() for m in maps]), percentile)

    fig = _grid(1, len(maps), subplot_titles=names)
    for j, z in enumerate(maps):
        trace = _signed_trace(
            z, zmax, colorscale, showscale=j == 0, colorbar_title="rel." if normalize else ""
        )
        fig.add_trace(trace, row=1, col=j + 1)
    return _style_image_figure(
        fig,
        title=title,
        width=_PANEL_PX * len(maps) + 90,
        height=_PANEL_PX + 60 + (30 if title else 0),
        right=80,
        top=40 + (30 if title else 0),
    )


def ascent_frames(
    images: Sequence[Any],
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """A row of images (e.g. a gradient-ascent trajectory), each (3, H, W) in [0, 1], each
    titled by its entry of ``labels`` (e.g. "step 2 · p=0.83")."""
    images = list(images)
    if not images:
        raise ValueError("images is empty")
    labels = _check_labels(labels, len(images), "labels")
    fig = _grid(1, len(images), subplot_titles=labels)
    for j, img in enumerate(images):
        fig.add_trace(_image_trace(img, f"images[{j}]"), row=1, col=j + 1)
    return _style_image_figure(
        fig,
        title=title,
        width=_PANEL_PX * len(images) + 20,
        height=_PANEL_PX + (40 if labels else 10) + (30 if title else 0) + 10,
        top=(40 if labels else 10) + (30 if title else 0),
    )


def logit_curves(
    logits: Any,
    names: Sequence[str],
    *,
    title: str | None = None,
    value_name: str = "target logit",
) -> go.Figure:
    """Target logit per ascent step: ``logits`` (steps+1, K), one line per target in ``names``;
    ``value_name`` labels the y axis (e.g. a hidden unit's activation)."""
    values = _raw_array(logits, "logits")
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"logits must have shape (steps+1, K), got {values.shape}")
    names = _user_labels(names, values.shape[1], "names")
    fig = go.Figure([go.Scatter(x=list(range(values.shape[0])), y=values[:, k], name=name,
                                mode="lines+markers") for k, name in enumerate(names)])
    fig.update_layout(
        title=dict(text=title, x=0.5, xanchor="center") if title else None,
        xaxis_title="step", yaxis_title=value_name, template="plotly_white",
        width=380, height=260, margin=dict(l=50, r=10, t=40 if title else 10, b=40),
        showlegend=values.shape[1] > 1,
    )
    return fig


# --------------------------------------------------------------------------- compact encoding


def _png_data_uri(pixels: np.ndarray) -> str:
    """``data:image/png;base64,...`` of uint8 (H, W, 3) RGB pixels."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _compact_image(trace: go.Image) -> None:
    if trace.z is None or trace.source is not None or trace.zmin is not None \
            or trace.zmax is not None or trace.colormodel not in (None, "rgb"):
        return  # already a source, or not plain 0..255 RGB: left as is
    pixels = np.asarray(trace.z, dtype=np.float64)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        return
    pixels = np.clip(np.rint(np.nan_to_num(pixels)), 0, 255).astype(np.uint8)
    trace.update(source=_png_data_uri(pixels), z=None)


def _compact_heatmap(trace: go.Heatmap) -> None:
    z = np.asarray(trace.z, dtype=np.float64)
    zmin, zmax = trace.zmin, trace.zmax
    if zmin is None or zmax is None or not zmax > zmin or not np.all(np.isfinite(z)):
        return  # no fixed scale to code against, or gaps that codes cannot hold: left as is
    # In units of the range's largest end: zmax - zmin overflows for a range near float64's
    # largest number, and a step of a subnormal range loses its bits (5e-324 / 2 is 0).
    scale = max(abs(zmin), abs(zmax))
    low, high = zmin / scale, zmax / scale
    step = (high - low) / _TOP_CODE
    codes = np.rint((np.clip(z, zmin, zmax) / scale - low) / step).astype(np.uint8)
    ticks = np.linspace(low, high, _COLORBAR_TICKS)
    values = ticks * scale
    trace.update(
        z=codes,
        zmin=0,
        zmax=_TOP_CODE,
        zmid=None,
        # Hover would show codes, not values; the colour bar carries the scale instead.
        hovertemplate="x=%{x}, y=%{y}<extra></extra>",
        colorbar=dict(tickmode="array", tickvals=(ticks - low) / step,
                      ticktext=[f"{v:.3g}" for v in values]),
    )


def compact(fig: go.Figure) -> go.Figure:
    """A copy of ``fig`` that serialises small, for a page that embeds many images.

    - ``go.Image`` traces given as RGB ``z`` arrays of 0..255 (as every builder here makes)
      become PNG data URIs (``source=``): lossless for uint8 pixels.
    - ``go.Heatmap`` traces with a fixed ``[zmin, zmax]`` and finite ``z`` are stored as uint8
      codes 0..254 of that range, one byte a pixel (plotly writes them as a typed array): the
      colours are those of the 8-bit quantised values (values beyond the range saturate as
      before), the colour bar is labelled in the original units, and hover shows positions only.

    Other traces, and the layout, are unchanged.
    """
    out = go.Figure(fig)
    for trace in out.data:
        if trace.type == "image":
            _compact_image(trace)
        elif trace.type == "heatmap":
            _compact_heatmap(trace)
    return out


def fit_width(fig: go.Figure, width: int) -> go.Figure:
    """A copy of ``fig`` scaled down to at most ``width`` px, margins kept: the plot area
    shrinks in both directions by the same factor, so square pixels stay square. A figure
    already narrow enough (or without a fixed width) is returned as a copy, unchanged."""
    out = go.Figure(fig)
    layout = out.layout
    if layout.width is None or layout.width <= width:
        return out
    margin = layout.margin
    left, right = margin.l or 0, margin.r or 0
    top, bottom = margin.t or 0, margin.b or 0
    scale = (width - left - right) / (layout.width - left - right)
    out.update_layout(width=width, height=round(top + bottom + (layout.height - top - bottom)
                                                * scale))
    return out
