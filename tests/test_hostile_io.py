"""The hostile catalog for files, the command line and the widgets (issue 10, §5 and §6).

One named test per case, each written against something a careless or hostile user did and
that went wrong before: a photo overwritten by its own report, work thrown away because --out
could not be written, a lying PNG decoded into gigabytes of black, explorers that never die,
and threads that overwrote each other's messages.
"""

from __future__ import annotations

import datetime
import gc
import io
import re
import struct
import threading
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import pullback_widgets as pw
from pullback_widgets import app, cli
from pullback_widgets.validation import PullbackWidgetsError
from tests.conftest import LABELS


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
                    ).save(path)
    return path


@pytest.fixture
def no_computing(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the CLI started computing before it refused the arguments")

    monkeypatch.setattr(cli, "load_model", refuse)


def _cli_error(capsys, *args: str) -> str:
    """Run the CLI in-process, expect a one-line user error, return that line."""
    status = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert status == cli.EXIT_ERROR, err
    assert len(lines) == 1 and lines[0].startswith("pullback-widgets: error: "), err
    assert "Traceback" not in err
    return lines[0]


# =========================================================================== files and the CLI


def test_out_equal_to_the_input_photo_is_refused_and_the_photo_kept(tmp_path, photo, capsys,
                                                                    no_computing):
    before = photo.read_bytes()
    line = _cli_error(capsys, "explain", photo, "--out", photo)
    assert "is the input image" in line
    assert photo.read_bytes() == before


def test_out_that_links_to_the_input_photo_is_refused(tmp_path, photo, capsys, no_computing):
    link = tmp_path / "report.html"
    link.symlink_to(photo)
    before = photo.read_bytes()
    line = _cli_error(capsys, "explain", photo, "--out", link)
    assert "is the input image" in line
    assert photo.read_bytes() == before


def test_grid_out_equal_to_one_of_its_images_is_refused(tmp_path, photo, capsys,
                                                        no_computing):
    other = tmp_path / "other.png"
    Image.new("RGB", (40, 40), (9, 99, 199)).save(other)
    before = other.read_bytes()
    line = _cli_error(capsys, "grid", photo, other, "--out", other)
    assert "is the input image" in line and other.read_bytes() == before


def test_existing_file_that_is_not_html_is_kept_without_force(tmp_path, capsys, no_computing):
    notes = tmp_path / "thesis.tex"
    notes.write_text("three years of work")
    line = _cli_error(capsys, "explain", "--sample", "coffee", "--out", notes)
    assert "--force" in line
    assert notes.read_text() == "three years of work"


def test_force_replaces_an_existing_file_that_is_not_html(tmp_path, monkeypatch, net):
    old = tmp_path / "old_report.txt"
    old.write_text("stale")
    _fake_model(monkeypatch, net)
    assert cli.main(["explain", "--sample", "coffee", "--steps", "0", "--out", str(old),
                     "--force"]) == 0
    assert old.read_text().startswith("<!DOCTYPE html>")


def test_directory_as_out_is_refused_before_computing(tmp_path, capsys, no_computing):
    line = _cli_error(capsys, "explain", "--sample", "coffee", "--out", tmp_path)
    assert "is a directory" in line


@pytest.mark.skipif(not Path("/proc/version").exists(), reason="needs Linux's /proc")
def test_unwritable_folder_is_refused_before_computing(capsys, no_computing):
    # /proc takes no new files, not even from root (os.access would say yes to root)
    line = _cli_error(capsys, "explain", "--sample", "coffee", "--out", "/proc/report.html")
    assert "cannot be written" in line


def test_out_below_a_file_is_refused_before_computing(tmp_path, capsys, no_computing):
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    line = _cli_error(capsys, "explain", "--sample", "coffee", "--out", notes / "r.html")
    assert "cannot be written" in line and "is a file" in line


def test_huge_steps_is_refused_before_computing(tmp_path, capsys, no_computing):
    line = _cli_error(capsys, "explain", "--sample", "coffee", "--steps", "100000",
                      "--out", tmp_path / "r.html")
    assert f"at most {cli.MAX_STEPS} steps" in line and "--steps" in line


def test_steps_bound_is_the_documented_maximum(tmp_path, capsys, no_computing):
    parser = cli._build_parser()
    assert parser.parse_args(["explain", "--sample", "coffee", "--steps", str(cli.MAX_STEPS),
                              "--out", "r.html"]).steps == cli.MAX_STEPS
    _cli_error(capsys, "grid", "--samples", "coffee", "--steps", str(cli.MAX_STEPS + 1),
               "--out", tmp_path / "r.html")
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert f"`--steps` is at most {cli.MAX_STEPS}" in readme


def _fake_model(monkeypatch, net):
    net.labels, net.default_temperature = LABELS, 0.5
    monkeypatch.setattr(cli, "load_model", lambda name: net)


def test_progress_counts_every_ascent_step_and_ends_full(tmp_path, monkeypatch, capsys, net):
    _fake_model(monkeypatch, net)
    assert cli.main(["explain", "--sample", "coffee", "--steps", "4",
                     "--out", str(tmp_path / "r.html")]) == 0
    counts = re.findall(r"(\d+)/(\d+) \[", capsys.readouterr().err)
    done, total = map(int, counts[-1])
    assert total == 2 + 3 + 2 * 4 and done == total
    assert len({int(d) for d, _ in counts}) > 8  # it moved step by step, not in stages


def test_internal_error_in_the_cli_shows_its_traceback(tmp_path, monkeypatch, net):
    _fake_model(monkeypatch, net)

    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(cli, "explain", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        cli.main(["explain", "--sample", "coffee", "--out", str(tmp_path / "r.html")])


def test_internal_error_in_the_app_shows_its_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(app, "serve_classroom", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        app.main([])


# =========================================================================== PNGs that lie


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _lying_png(width=7000, height=7000, rows=10, depth=8, colour=2, interlace=0) -> bytes:
    """A PNG whose header declares width x height but whose complete zlib stream holds only
    ``rows`` rows of zeros (the first Adam7 pass's row length when interlaced)."""
    samples = {0: 1, 2: 3}[colour]
    row_width = -(-width // 8) if interlace else width
    row = b"\x00" * (1 + (row_width * samples * depth + 7) // 8)
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(row * rows, 9)) + _chunk(b"IEND", b""))


@pytest.fixture
def no_decoding(monkeypatch):
    def refuse(self):
        raise AssertionError("Pillow was asked to decode (and allocate) a lying PNG")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_png_declaring_7000x7000_in_a_few_hundred_bytes_is_refused_before_decoding(
        no_decoding):
    data = _lying_png()
    assert len(data) < 400
    # No stopwatch (a loaded machine is slow at anything): no_decoding fails the test if
    # Pillow is asked to decode the pixels at all.
    with pytest.raises(PullbackWidgetsError, match=r"7000 x 7000 .* truncated or corrupt"):
        pw.load_image(data)


def test_lying_png_from_a_file_is_refused(tmp_path, no_decoding):
    path = tmp_path / "small.png"
    path.write_bytes(_lying_png())
    with pytest.raises(PullbackWidgetsError, match=r"small\.png"):
        pw.load_image(path)


def test_lying_png_opened_with_pillow_is_refused(no_decoding):
    image = Image.open(io.BytesIO(_lying_png()))
    with pytest.raises(PullbackWidgetsError, match="truncated or corrupt"):
        pw.load_image(image)


def test_lying_interlaced_png_is_refused(no_decoding):
    with pytest.raises(PullbackWidgetsError, match="truncated or corrupt"):
        pw.load_image(_lying_png(width=3000, height=3000, rows=20, interlace=1))


def test_lying_16_bit_gray_png_is_refused(no_decoding):
    with pytest.raises(PullbackWidgetsError, match="truncated or corrupt"):
        pw.load_image(_lying_png(width=5000, height=5000, rows=3, depth=16, colour=0))


def test_lying_png_on_the_command_line_is_one_line(tmp_path, capsys, no_computing):
    path = tmp_path / "small.png"
    path.write_bytes(_lying_png())
    assert "truncated or corrupt" in _cli_error(capsys, "explain", path, "--out",
                                                tmp_path / "r.html")


# =========================================================================== widget lifecycle


def _open_widgets() -> set[str]:
    from ipywidgets.widgets.widget import _instances

    return set(_instances)


def _gone(ref: weakref.ref) -> bool:
    gc.collect()
    return ref() is None


def test_closed_pullback_explorer_is_collected_and_its_thread_ends(net):
    threads, widgets = threading.active_count(), _open_widgets()
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    assert explorer.wait()
    assert threading.active_count() == threads + 1
    explorer_ref, session_ref = weakref.ref(explorer), weakref.ref(explorer._session)
    explorer.close()
    del explorer
    assert _gone(explorer_ref) and _gone(session_ref)
    assert threading.active_count() == threads
    assert _open_widgets() <= widgets  # every widget it made was closed


def test_closed_ascent_explorer_is_collected_and_its_thread_ends(net):
    threads, widgets = threading.active_count(), _open_widgets()
    explorer = pw.AscentExplorer(net, "coffee", labels=LABELS)
    explorer.steps.value = 2
    assert explorer.run() is not False
    assert explorer.wait()
    ref = weakref.ref(explorer)
    explorer.close()
    del explorer
    assert _gone(ref)
    assert threading.active_count() == threads
    assert _open_widgets() <= widgets


def test_rerunning_the_explorer_cell_leaks_neither_threads_nor_widgets(net):
    threads, widgets = threading.active_count(), _open_widgets()
    refs, explorer = [], None
    for image in ("coffee", "rocket", "chelsea"):  # the cell, run three times
        if explorer is not None:
            explorer.close()
        explorer = pw.PullbackExplorer(net, image, labels=LABELS)
        assert explorer.wait()
        refs.append(weakref.ref(explorer))
    explorer.close()
    del explorer
    assert all(_gone(ref) for ref in refs)
    assert threading.active_count() == threads and _open_widgets() <= widgets


def test_closing_twice_and_touching_a_closed_explorer_is_harmless(net):
    threads = threading.active_count()
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    explorer.wait()
    explorer.close()
    explorer.close()
    explorer.temperature.value = 2.0  # a late slider event after close
    explorer.strip_button.click()
    assert explorer.wait(5)
    assert threading.active_count() == threads and explorer._session is None


def test_closing_during_a_running_ascent_stops_it(net):
    threads = threading.active_count()
    explorer = pw.AscentExplorer(net, "coffee", labels=LABELS)
    explorer.steps.value = 30
    # Counted steps, not seconds: the run's forwards wait for close() to set the stop flag,
    # so the run is under way when it is closed, and a close that let it finish shows 30.
    steps, entered = [], threading.Event()
    on_step = explorer._on_step
    explorer._on_step = lambda step, result: steps.append(step) or on_step(step, result)

    def wait_for_close(module, args):
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            assert explorer._stop.wait(60), "the test never closed the explorer"

    hold = net.register_forward_pre_hook(wait_for_close)
    try:
        assert explorer.run()
        assert entered.wait(60)  # the worker has taken the run: close() cannot just drop it
        explorer.close()
    finally:
        hold.remove()
    assert threading.active_count() == threads
    assert len(steps) <= 1, steps


def _blocking_forward(model):
    """A forward pre-hook that holds every forward until ``release`` is set; ``entered`` is set
    while a forward waits."""
    entered, release = threading.Event(), threading.Event()

    def hold(module, args):
        entered.set()
        assert release.wait(30), "the test never released the forward"

    return entered, release, model.register_forward_pre_hook(hold)


def test_second_run_click_does_not_let_the_first_run_reenable_run(net):
    explorer = pw.AscentExplorer(net, "coffee", labels=LABELS)
    explorer.steps.value = 3
    seen = []
    recorder = net.register_forward_pre_hook(lambda *a: seen.append(
        (explorer.run_button.disabled, explorer.stop_button.disabled)))
    entered, release, blocker = _blocking_forward(net)
    try:
        explorer.run()
        assert entered.wait(30)
        explorer.run()  # the second click, while the first run computes
        release.set()
        assert explorer.wait()
    finally:
        blocker.remove()
        recorder.remove()
    assert seen and all(state == (True, False) for state in seen), seen
    assert explorer.run_button.disabled is False and explorer.stop_button.disabled is True
    explorer.close()


def test_bad_target_leaves_the_frame_slider_usable(net):
    explorer = pw.AscentExplorer(net, "coffee", labels=LABELS)
    explorer.steps.value = 1
    explorer.run()
    explorer.wait()
    assert not explorer.frame.disabled
    explorer.target.value = "zebra (99)"
    explorer.run()
    explorer.wait()
    assert "⚠" in explorer.status.value and "zebra" in explorer.status.value
    assert not explorer.frame.disabled and not explorer.run_button.disabled
    explorer.close()


def test_typed_class_name_is_explained_not_the_prediction(net):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS, temperature=0.5)
    explorer.wait()
    image = explorer._images["coffee"]
    assert int(net(image).argmax()) != 4  # else this would not tell the two apart
    explorer.target.value = "eel"
    explorer.wait()
    expected = pw.excitation_pullback(net, image, 4, temperature=0.5)[0]
    np.testing.assert_allclose(np.asarray(explorer.pullback_figure.data[0].z, dtype=float),
                               pw.figures.relative_map(expected).astype(np.float32),
                               rtol=1e-5, atol=1e-6)
    assert "eel" in explorer.pullback_figure.layout.title.text
    explorer.close()


def test_unknown_class_text_is_an_error_not_the_prediction(net):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    explorer.wait()
    explorer.target.value = "zebra"
    explorer.wait()
    assert "⚠" in explorer.status.value and "zebra" in explorer.status.value
    explorer.close()


def _upload(explorer, data: bytes, name: str) -> None:
    explorer.upload.value = ({"name": name, "type": "image/png", "size": len(data),
                              "content": memoryview(data),
                              "last_modified": datetime.datetime.now(datetime.timezone.utc)},)


def test_late_result_does_not_overwrite_an_upload_error(net):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    explorer.wait()
    entered, release, blocker = _blocking_forward(net)
    try:
        explorer.image.value = "rocket"  # the worker is now inside this forward
        assert entered.wait(30)
        _upload(explorer, b"not a picture", "notes.png")
        assert "⚠" in explorer.status.value
        release.set()
        assert explorer.wait()
    finally:
        blocker.remove()
    assert "⚠" in explorer.status.value and "could not read" in explorer.status.value
    explorer.close()


def test_lying_png_upload_is_an_error_in_the_status_line(net, no_decoding):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    explorer.wait()
    _upload(explorer, _lying_png(width=6000, height=6000), "small.png")  # under the limit
    assert "⚠" in explorer.status.value and "truncated or corrupt" in explorer.status.value
    assert explorer.image.value == "coffee"
    explorer.close()


def test_keyboard_interrupt_in_a_job_is_not_swallowed(monkeypatch):
    from pullback_widgets.widgets.common import LatestOnlyWorker

    handled, escaped = [], []
    monkeypatch.setattr(threading, "excepthook", lambda hook: escaped.append(hook.exc_type))

    def job(request):
        raise KeyboardInterrupt

    worker = LatestOnlyWorker(job, lambda *args: handled.append(args))
    worker.submit("go")
    worker._thread.join(60)
    assert not worker.alive
    assert handled == [] and escaped == [KeyboardInterrupt]
