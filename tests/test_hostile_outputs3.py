"""Hostile outputs, third round: the command line's paths, the app's notebook argument and
the figures' handling of extreme and masked maps. Each test names what went wrong before."""

from __future__ import annotations

import numpy as np
import pytest

from pullback_widgets import app, cli, figures


@pytest.fixture
def no_computing(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model, running an evaluation or
    starting Voilà."""
    def refuse(*args, **kwargs):
        raise AssertionError("the CLI started working before it refused its arguments")

    monkeypatch.setattr(cli, "load_model", refuse)
    monkeypatch.setattr(cli, "run_command", refuse)
    monkeypatch.setattr(app.subprocess, "Popen", refuse)


def _one_line_error(capsys, args: list[str]) -> str:
    """Run the CLI in-process; expect exit status 2 and one line on stderr, returned."""
    status = cli.main(args)
    err = capsys.readouterr().err
    assert status == cli.EXIT_ERROR, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pullback-widgets: error: "), err
    return lines[0]


# =========================================================================== the app's notebook


def test_app_notebook_under_an_unknown_users_home_is_a_one_line_error(capsys, no_computing):
    # A shell passes "~nosuchuser/x.ipynb" on as written, and Path.expanduser() raised
    # RuntimeError("Could not determine home directory."): a traceback, not a user error.
    line = _one_line_error(capsys, ["app", "~pw-no-such-user-3/class.ipynb"])
    assert "notebook not found" in line and "~pw-no-such-user-3/class.ipynb" in line


def test_app_notebook_whose_name_is_too_long_is_a_one_line_error(capsys, no_computing):
    # Path.is_file() passes on every OSError but "no such file" and its kin: a name longer
    # than the file system allows (ENAMETOOLONG) came out as an OSError traceback.
    line = _one_line_error(capsys, ["app", "n" * 300 + ".ipynb"])
    assert "cannot read notebook" in line and "too long" in line


def test_evaluate_image_whose_name_is_too_long_is_a_one_line_error(tmp_path, capsys):
    # find_images' Path.exists() raised ENAMETOOLONG: an OSError traceback.
    line = _one_line_error(capsys, ["evaluate", "i" * 300 + ".png",
                                    "--out", str(tmp_path / "r.csv")])
    assert "cannot read" in line and "too long" in line
    assert not (tmp_path / "r.csv").exists()


# =========================================================================== --out as a folder


@pytest.mark.parametrize("ending", [".", ".."])
@pytest.mark.parametrize("command", ["explain", "grid"])
def test_out_ending_in_a_dot_folder_is_refused_before_any_work(tmp_path, capsys, no_computing,
                                                               command, ending):
    # "reports/." is Path("reports"): the report was written as a file named "reports" (only
    # "reports/" was refused); "reports/.." failed to write only after all the work was done,
    # and left an empty folder "reports" behind.
    out = f"{tmp_path / 'reports'}/{ending}"
    samples = ["--sample", "coffee"] if command == "explain" else ["--samples", "coffee"]
    line = _one_line_error(capsys, [command, *samples, "--steps", "0", "--out", out])
    example = {".": "reports/report.html", "..": "reports/../report.html"}[ending]
    assert "names a folder" in line and example in line
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("ending", ["/", "/."])
def test_evaluate_out_written_as_a_folder_is_refused_before_any_work(tmp_path, capsys,
                                                                     no_computing, ending):
    # Path("results.csv/") is Path("results.csv"): the rows, summary and settings were written
    # as files next to where the user named a folder (explain and grid refused it already).
    out = f"{tmp_path / 'results.csv'}{ending}"
    line = _one_line_error(capsys, ["evaluate", "--synthetic", "1", "--out", out])
    assert "names a folder" in line
    assert list(tmp_path.iterdir()) == []


def test_an_empty_out_is_refused(capsys, no_computing):
    line = _one_line_error(capsys, ["explain", "--sample", "coffee", "--out", ""])
    assert "--out: is empty" in line


# =========================================================================== figures


@pytest.mark.parametrize("scale", [5e-324, 1e-320, 1e-310, 1.0, 1e300])
def test_compact_codes_a_map_of_any_float64_magnitude_as_its_colours(scale):
    # compact() coded z / 2 against half a step: for a map of subnormal numbers the halves
    # lost their bits (5e-324 / 2 is 0), every pixel of [[5e-324, -5e-324]] became code 0
    # (its positive pixel drawn in the most negative colour), and 1e-320 was two codes off.
    z = np.random.default_rng(0).normal(size=(1, 12, 12)) * scale
    z[0, 0, :3] = [scale, -scale, 0.0]
    trace = figures.signed_heatmap(z).data[0]
    codes = np.asarray(figures.compact(go_figure(trace)).data[0].z).astype(np.int64)
    expected = np.rint((np.clip(z[0] / trace.zmax, -1, 1) + 1) * 127).astype(np.int64)
    assert np.abs(codes - expected).max() <= (1 if scale < 1e-300 else 0)


def test_compact_draws_the_smallest_subnormal_map_in_its_own_colours():
    # Before: [[5e-324, -5e-324, 0]] was coded [[0, 0, 0]]: all three pixels the most
    # negative colour.
    compact = figures.compact(figures.signed_heatmap(np.array([[5e-324, -5e-324, 0.0]])))
    assert np.asarray(compact.data[0].z).tolist() == [[254, 0, 127]]


def go_figure(trace):
    import plotly.graph_objects as go

    return go.Figure(trace)


@pytest.mark.parametrize("draw", [
    lambda a: figures.signed_heatmap(a),
    lambda a: figures.channel_sum(a),
    lambda a: figures.signed_range(a),
])
def test_a_masked_attribution_is_refused_not_drawn_with_the_values_under_its_mask(draw):
    # np.asarray() drops a mask: the value the user had masked out (an outlier of 1e9 here)
    # was drawn as a pixel and set the colour range of the whole map.
    attribution = np.ma.array(np.ones((4, 4)), mask=np.eye(4, dtype=bool))
    attribution.data[0, 0] = 1e9
    with pytest.raises(TypeError, match="masked array"):
        draw(attribution)


def test_a_masked_image_is_refused_not_drawn_with_the_values_under_its_mask():
    # to_uint8_image drew a fully masked picture as the grey under its mask.
    with pytest.raises(TypeError, match="masked array"):
        figures.to_uint8_image(np.ma.array(np.full((4, 4, 3), 0.5), mask=True))
