"""Hostile image inputs and report paths: what a careless or malicious user can hand in."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import EpsImagePlugin

from pullback_widgets.cli import main
from pullback_widgets.images import load_image
from pullback_widgets.validation import PullbackWidgetsError

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto stroke\n"


@pytest.mark.parametrize("as_file", [False, True])
def test_eps_never_reaches_ghostscript(tmp_path, monkeypatch, as_file):
    # The classroom app decodes strangers' uploads; an EPS (under any name) would otherwise be
    # rendered by Ghostscript, whose sandbox has had escapes. Where gs is missing the load
    # fails anyway, so the stub is what tells the two apart.
    calls = []

    def ghostscript(*args, **kwargs):
        calls.append(args)
        raise OSError("Ghostscript must not run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    source = tmp_path / "holiday.png"
    source.write_bytes(EPS)
    with pytest.raises(PullbackWidgetsError, match="PostScript"):
        load_image(source if as_file else EPS)
    assert calls == []


def test_uint16_array_holding_8_bit_data_warns():
    # 8-bit levels widened to uint16 (an astype, arithmetic with a uint16) read as 16-bit
    # levels are nearly black; the model would explain a black picture without a word.
    with pytest.warns(UserWarning, match="uint16 image array"):
        image = load_image(np.full((8, 8, 3), 200, np.uint16), size=8)
    assert float(image.max()) < 0.01


@pytest.mark.parametrize("array", [np.full((8, 8), 40000, np.uint16),
                                   np.zeros((8, 8), np.uint16),
                                   np.full((8, 8, 3), 200, np.uint8)],
                         ids=["16-bit data", "black", "uint8"])
def test_real_16_bit_and_8_bit_arrays_load_quietly(array):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(array, size=8)


def test_out_written_as_a_folder_is_refused(tmp_path, capsys):
    # Path("reports/") is Path("reports"): the report became a file named "reports" where
    # the user meant a folder (and a later "reports/x.html" then failed).
    out = f"{tmp_path / 'reports'}/"
    assert main(["explain", "--sample", "coffee", "--steps", "0", "--out", out]) == 2
    assert "names a folder" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()
