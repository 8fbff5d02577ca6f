"""The command line, end to end in a subprocess, and its one-line errors."""

import base64
import gzip
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from plotly.offline import get_plotlyjs

import pullback_widgets as pw
from pullback_widgets import cli


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pullback_widgets.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_explain_writes_a_self_contained_report(tmp_path):
    out = tmp_path / "report.html"
    done = _run("explain", "--sample", "coffee", "--steps", "2", "--target", "Espresso",
                "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    # plotly.js is inlined once (gzip, base64), and no script comes from the network
    packed = re.findall(r'<script type="application/octet-stream" id="plotly-js-gzip">'
                        r"([^<]+)</script>", page)
    assert len(packed) == 1
    assert gzip.decompress(base64.b64decode(packed[0])).decode() == get_plotlyjs()
    assert not re.search(r"<script[^>]+src=[\"']?(https?:)?//", page)
    for heading in ("Photo and top-5 predictions", "Pullback and plain gradient",
                    "Pullback ascent, step by step", "Temperature strip"):
        assert heading in page
    assert "espresso (967)" in page and "temperature T" in page
    assert "explain" in done.stderr  # the progress bar went to the terminal


def test_grid_report(tmp_path):
    out = tmp_path / "grid.html"
    done = _run("grid", "--samples", "chelsea", "coffee", "--targets", "tabby", "967",
                "--steps", "1", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert "Counterfactual grid" in page and "tabby" in page and "espresso" in page


@pytest.mark.parametrize(("args", "message"), [
    (["explain", "missing.jpg"], "image file not found"),
    (["explain", "notes.txt"], "notes.txt"),
    (["explain", "--sample", "coffee", "--temperature", "0"], "temperature"),
    (["explain", "--sample", "coffee", "--temperature", "nan"], "temperature"),
    (["explain", "--sample", "coffee", "--model", "alexnet"], "alexnet"),
    (["explain", "--sample", "coffee", "--target", "espreso"], "did you mean 'espresso'"),
    (["explain", "--sample", "coffee", "--target", "1000"], "out of range"),
    (["explain", "--sample", "coffee", "--target=--5"], "unknown class '--5'"),
    (["explain", "--sample", "coffee", "--target", "²"], "unknown class '²'"),
    (["explain", "--sample", "coffee", "--steps", "-1"], "steps"),
    (["explain"], "IMAGE or --sample"),
    (["grid"], "image files or --samples NAME"),
    (["explain", "--sample", "coffee"], "--out"),
    (["frobnicate"], "invalid choice"),
])
def test_errors_are_one_line_with_nonzero_exit(tmp_path, capsys, args, message):
    (tmp_path / "notes.txt").write_text("not an image")
    if "--out" not in args and args != ["explain", "--sample", "coffee"]:
        args = [*args, "--out", str(tmp_path / "r.html")]
    status = cli.main([a if not a.endswith((".jpg", ".txt")) else str(tmp_path / a)
                       for a in args])
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert status == 2
    assert len(error_lines) == 1 and error_lines[0].startswith("pullback-widgets: error: ")
    assert message in error_lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "r.html").exists()


def test_pool_weights_flag_reaches_the_report(tmp_path, monkeypatch):
    """--pool-weights is passed to every pullback the report draws (a net with max-pools)."""
    import torch

    import pullback_widgets as pw
    from pullback_widgets import report
    from tests.conftest import every_op_net

    net = every_op_net(dtype=torch.float32)
    net.labels = [f"class {i}" for i in range(5)]
    net.default_temperature = 0.5
    seen = {}

    def explain(model, image, target, **kwargs):
        seen.update(kwargs, image=image, target=target)
        seen["explanation"] = report.explain(model, image, target, **kwargs)
        return seen["explanation"]

    monkeypatch.setattr(cli, "load_model", lambda name: net)
    monkeypatch.setattr(cli, "explain", explain)
    out = tmp_path / "report.html"
    assert cli.main(["explain", "--sample", "coffee", "--steps", "1", "--target", "2",
                     "--pool-weights", "detached", "--out", str(out)]) == 0
    assert seen["pool_weights"] == "detached" and "detached" in out.read_text()
    pullback = seen["explanation"].pullback
    torch.testing.assert_close(pullback, pw.excitation_pullback(
        net, seen["image"], 2, temperature=0.5, pool_weights="detached")[0])
    assert not torch.allclose(pullback, pw.excitation_pullback(
        net, seen["image"], 2, temperature=0.5)[0])
    assert cli.main(["explain", "--sample", "coffee", "--pool-weights", "frozen",
                     "--out", str(out)]) == 2


def test_a_class_typo_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    # Checked against the registry's classes before the progress bar starts: stderr holds
    # the error alone (the bar's line came first before), and no model is loaded.
    monkeypatch.setattr(cli, "load_model", lambda *_: pytest.fail("work started"))
    assert cli.main(["explain", "--sample", "coffee", "--model", "shapes", "--target", "squar",
                     "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["pullback-widgets: error: unknown class 'squar'; did you mean "
                                "'square' (1)?"]


def test_a_hard_gate_report_says_which_gate_its_temperature_strip_uses(tmp_path, monkeypatch):
    import torch

    from tests.conftest import every_op_net

    net = every_op_net(dtype=torch.float32)
    net.labels = [f"class {i}" for i in range(5)]
    monkeypatch.setattr(cli, "load_model", lambda name: net)
    out = tmp_path / "report.html"
    for gate, note in (("hard", "gate sigmoid (the hard gate has no temperature)"),
                       ("normal_cdf", "gate normal_cdf;")):
        assert cli.main(["explain", "--sample", "coffee", "--steps", "1", "--gate", gate,
                         "--out", str(out), "--force"]) == 0
        assert note in out.read_text()


def test_explain_without_temperature_uses_the_models_per_kind_defaults(tmp_path, monkeypatch):
    """A SiLU model's default T is 1.6 for its SiLUs: the CLI must not flatten it to one float."""
    import torch
    from torch import nn

    import pullback_widgets as pw
    from pullback_widgets import report

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    net.labels, net.default_temperature = ["a", "b", "c"], 0.3
    seen = {}

    def explain(model, image, target, **kwargs):
        seen.update(image=image, explanation=report.explain(model, image, target, **kwargs))
        return seen["explanation"]

    monkeypatch.setattr(cli, "load_model", lambda name: net)
    monkeypatch.setattr(cli, "explain", explain)
    out = tmp_path / "report.html"
    assert cli.main(["explain", "--sample", "coffee", "--steps", "1", "--target", "1",
                     "--out", str(out)]) == 0
    expected = pw.excitation_pullback(net, seen["image"], 1)[0]
    torch.testing.assert_close(seen["explanation"].pullback, expected)
    flattened = pw.excitation_pullback(net, seen["image"], 1, temperature=0.3)[0]
    assert not torch.allclose(expected, flattened)
    assert "silu 1.6" in out.read_text()


def test_reports_load_images_at_the_models_input_size(tmp_path, monkeypatch):
    # The shapes model takes 64 px: at 224 px it saw another picture and explained another
    # class, without a word (evaluate and the widgets already used the model's size).
    seen = []
    real_explain = cli.explain
    monkeypatch.setattr(cli, "explain", lambda model, image, *args, **kwargs: (
        seen.append(tuple(image.shape)), real_explain(model, image, *args, **kwargs))[1])
    assert cli.main(["explain", "--sample", "coffee", "--model", "shapes", "--steps", "0",
                     "--out", str(tmp_path / "r.html")]) == 0
    assert seen == [(1, 3, 64, 64)]


def test_a_failed_write_leaves_the_earlier_report_and_no_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "r.html"
    out.write_text("the earlier report")

    def disk_full(path, data):
        with open(path, "wb") as file:
            file.write(data[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(cli.PullbackWidgetsError, match="No space left on device"):
        cli._write(out, "<html>a new report</html>" * 100)
    assert out.read_text() == "the earlier report"
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_an_image_whose_name_is_not_utf8_gets_its_report(tmp_path):
    from PIL import Image

    image = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png")
    Image.fromarray(pw.images.sample_image_array("coffee")).save(image, format="PNG")
    assert cli.main(["explain", image, "--model", "shapes", "--steps", "0",
                     "--out", str(tmp_path / "r.html")]) == 0
    assert "caf\ufffd.png" in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_a_read_only_report_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.html"
    out.write_text("keep me")
    real_access = os.access
    # (os.access says yes to root for every file, so the check is driven here)
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == out
                        else real_access(path, mode))
    monkeypatch.setattr(cli, "load_model", lambda *_: pytest.fail("work started"))
    assert cli.main(["explain", "--sample", "coffee", "--out", str(out)]) == 2
    assert "read-only" in capsys.readouterr().err and out.read_text() == "keep me"


def test_a_pipe_or_device_as_the_report_is_refused_even_with_force(tmp_path, monkeypatch,
                                                                    capsys):
    out = tmp_path / "r.html"
    os.mkfifo(out)  # like /dev/null: renaming the report over it would replace it
    monkeypatch.setattr(cli, "load_model", lambda *_: pytest.fail("work started"))
    assert cli.main(["explain", "--sample", "coffee", "--out", str(out), "--force"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    assert stat.S_ISFIFO(out.stat().st_mode)


@pytest.mark.parametrize("dangling", [False, True])
def test_a_link_as_the_report_is_refused_and_kept(tmp_path, monkeypatch, capsys, dangling):
    # The atomic rename would replace the link itself and leave what it points to stale.
    target = tmp_path / "mine.html"
    if not dangling:
        target.write_text("my report")
    out = tmp_path / "r.html"
    out.symlink_to(target)
    monkeypatch.setattr(cli, "load_model", lambda *_: pytest.fail("work started"))
    assert cli.main(["explain", "--sample", "coffee", "--out", str(out), "--force"]) == 2
    assert "not a regular file (a link" in capsys.readouterr().err
    assert out.is_symlink() and (dangling or target.read_text() == "my report")


def test_a_direction_control_in_a_file_name_stays_inside_that_name():
    # 'a\u202e.png' reversed every name and number after it in the grid's gains sentence.
    import torch

    from pullback_widgets.ascent import AscentGrid
    from pullback_widgets.report import grid_html

    grid = AscentGrid(images=torch.rand(2, 1, 3, 4, 4), diffs=torch.zeros(2, 1, 3, 4, 4),
                      gains=torch.tensor([[1.0], [1.5]]), targets=[0])
    page = grid_html(grid, ["a\u202e.png", "b.png"], ["cat"], {"image": "a\u202e.png"})
    assert "\u2068a\u202e.png\u2069→\u2068cat\u2069: +1.00" in page
    assert "<td><bdi>a\u202e.png</bdi></td>" in page


def test_every_name_in_the_grid_reports_image_cell_is_isolated(tmp_path):
    # The names were joined into one cell: a U+202E in the first reversed the rest (a review).
    from PIL import Image

    names = ["evil\u202e.png", "bank-statement.png"]
    for name in names:
        Image.new("RGB", (40, 40), (30, 90, 150)).save(tmp_path / name)
    out = tmp_path / "grid.html"
    assert cli.main(["grid", *(str(tmp_path / name) for name in names), "--model", "shapes",
                     "--steps", "0", "--targets", "0", "--out", str(out)]) == 0
    assert ("<bdi>\u2068evil\u202e.png\u2069, \u2068bank-statement.png\u2069</bdi>"
            in out.read_text(encoding="utf-8"))


def test_an_output_whose_name_is_near_the_file_systems_limit_is_written(tmp_path):
    # A 245-byte name is a valid file, but its temporary ".NAME.<16 hex>.tmp" was not: the
    # write failed after all the work (a review).
    from pullback_widgets.evaluation.runner import atomic_write

    path = tmp_path / ("b" * 240 + ".html")
    atomic_write(path, lambda temporary: temporary.write_text("report", encoding="utf-8"))
    assert path.read_text(encoding="utf-8") == "report"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("where", ["a link that leads nowhere", "a loop of links",
                                   "a name too long"])
@pytest.mark.parametrize("command", ["explain", "evaluate"])
def test_an_out_that_cannot_be_made_is_refused_before_any_work(tmp_path, capsys, where, command):
    # A dangling link on --out's path passed the check (the folder above it was probed) and the
    # run failed only when writing; a name over 255 bytes was a raw OSError.
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    suffix = ".html" if command == "explain" else ".csv"
    out = {"a link that leads nowhere": tmp_path / "dangling" / f"x{suffix}",
           "a loop of links": tmp_path / "loop" / f"x{suffix}",
           "a name too long": tmp_path / ("a" * 300 + suffix)}[where]
    args = ["explain", "--sample", "coffee"] if command == "explain" else \
        ["evaluate", "--synthetic", "2", "--methods", "random", "--metrics", "mass"]
    assert cli.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pullback-widgets: error: --out ") and "cannot be written" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("steps", [3, 10])
def test_a_long_ascent_shows_at_most_six_readable_frames(steps):
    # At 10 steps the eleven frames' titles ran into each other on the page ("ogit 2.27 ·
    # p=0.97ogit 11.95"), a logit read against the wrong step; at 100 each frame was 5 px (a
    # review). The row now shows the start, the end and evenly spaced steps between.
    from pullback_widgets.ascent import pullback_ascent
    from pullback_widgets.report import FRAMES_SHOWN, _frames, _frames_note, shown_steps

    model = pw.load_model("shapes", weights=None)
    result = pullback_ascent(model, pw.sample_image("coffee", size=64), 1, steps=steps,
                             progress=False)
    figure = _frames(result)
    titles = [annotation.text for annotation in figure.layout.annotations]
    expected = shown_steps(steps)
    assert len(titles) == min(steps + 1, FRAMES_SHOWN) == len(expected)
    assert expected[0] == 0 and expected[-1] == steps
    assert [int(title.split("<br>")[0].removeprefix("step ")) for title in titles] == expected
    for title, step in zip(titles, expected):
        assert f"logit {float(result.logits[step, 0]):.2f}" in title
    assert (_frames_note(result) == "") == (steps + 1 <= FRAMES_SHOWN)


@pytest.mark.parametrize(("temperature", "gate", "shown"), [
    (0.1234567, "sigmoid", "0.1234567 (every kind of gate)"),
    (1234567.8, "sigmoid", "1234567.8 (every kind of gate)"),
    (2.0, "hard", "none: the hard gate is the plain gradient"),
])
def test_the_reports_temperature_is_the_one_used(temperature, gate, shown):
    # It was rounded to six digits (0.123457), and named a T the hard gate does not use.
    from pullback_widgets.cli import _temperature_text

    assert _temperature_text(temperature, pw.load_model("shapes", weights=None), gate) == shown
