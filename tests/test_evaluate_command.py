"""``pullback-widgets evaluate``: one process, torchrun with two, resume after a kill, bad data.

Small on purpose (64 px images, a few photos, cheap metrics): the point is the plumbing, the
metrics themselves are checked against slow references in test_evaluation.py.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

import pullback_widgets as pw
from pullback_widgets import cli
from pullback_widgets import evaluation as ev
from pullback_widgets.evaluation import runner
from tests.test_evaluation import _relu6_net

ROOT = Path(__file__).resolve().parent.parent
SIZE = "64"
COMMON = ["--image-size", SIZE, "--methods", "gradient", "pullback", "random",
          "--metrics", "deletion", "insertion", "--targets", "top-2", "--batch-size", "2"]


def _env() -> dict[str, str]:
    # One thread per process: the CI machine has two cores, and torchrun starts two ranks.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Packaged photos, a flipped and a cropped copy, a text file and a truncated JPEG."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "cats").mkdir()
    chelsea = Image.fromarray(pw.images.sample_image_array("chelsea")).resize((120, 90))
    chelsea.save(folder / "cats" / "chelsea.jpg")
    chelsea.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "cats" / "flipped.png")
    coffee = Image.fromarray(pw.images.sample_image_array("coffee")).resize((120, 80))
    coffee.save(folder / "coffee.jpg")
    coffee.crop((20, 10, 100, 70)).save(folder / "coffee_crop.jpg")
    (folder / "notes.txt").write_text("not an image")
    data = (folder / "coffee.jpg").read_bytes()
    (folder / "cats" / "broken.jpg").write_bytes(data[: len(data) // 3])
    return folder


def _rows(path: Path) -> list[tuple]:
    return runner.read_rows(path)


def _assert_same_rows(actual: list[tuple], expected: list[tuple]) -> None:
    assert [r[:4] for r in actual] == [r[:4] for r in expected]
    np.testing.assert_allclose([r[4] for r in actual], [r[4] for r in expected],
                               rtol=1e-5, atol=1e-7)


def _main(*args: str) -> int:
    """The command in this process, on one torch thread (the CI machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main(["evaluate", *args])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_run(photos, tmp_path_factory) -> tuple[Path, str]:
    """The reference: the command in this process, one rank."""
    out = tmp_path_factory.mktemp("single") / "results.csv"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = _main(str(photos), *COMMON, "--out", str(out))
    assert status == 0, err.getvalue()
    return out, err.getvalue()


def test_single_process_rows_summary_and_skipped_files(single_run, photos):
    out, err = single_run
    rows = _rows(out)
    images = sorted(str(p) for p in photos.rglob("*") if p.is_file())
    good = [p for p in images if not p.endswith(("notes.txt", "broken.jpg"))]
    # one row per (image, target, method, metric), in the fixed order
    assert len(rows) == len(good) * 2 * 3 * 2
    assert [r[0] for r in rows[::12]] == good
    assert {(r[2], r[3]) for r in rows} == {(m, k) for m in ("gradient", "pullback", "random")
                                            for k in ("deletion", "insertion")}
    assert all(0.0 <= r[4] <= 1.0 for r in rows)
    # each broken file is named on stderr and counted in the summary
    for name in ("notes.txt", "broken.jpg"):
        assert any(name in line and "skipped" in line for line in err.splitlines())
    summary = runner.summary_path(out).read_text()
    assert "2 file(s) skipped" in summary and "| deletion ↓ | pullback | 4 |" in summary
    settings = json.loads(out.with_name("results.settings.json").read_text())
    assert settings["status"] == "complete" and settings["images"] == 4
    assert settings["settings"]["image_size"] == 64 and settings["settings"]["targets"] == "top-2"
    assert not (out.parent / "results.csv.parts").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not a private temporary file's 0600

    # A row is the metric's value for that image and target, computed directly.
    model = pw.load_model()
    x = pw.load_image(good[0], size=64)
    _, target, _, metric, value = next(r for r in rows if r[0] == good[0]
                                                and r[2] == "pullback")
    classes = torch.tensor([target])
    attribution = pw.excitation_pullback(model, x, classes)
    expected = ev.deletion_auc(model, x, classes, attribution, steps=16, batch_size=32)
    assert metric == "deletion" and value == pytest.approx(float(expected), rel=1e-5)
    top2 = pw.model_helpers.predict(model, x).topk(2).indices[0].tolist()
    assert sorted({r[1] for r in rows if r[0] == good[0]}) == sorted(top2)


def _console_script() -> str:
    script = Path(sys.executable).parent / "pullback-widgets"
    if not script.exists():
        pytest.skip("the pullback-widgets console script is not installed")
    return str(script)


def test_torchrun_two_processes_merge_to_the_single_process_rows(single_run, photos, tmp_path):
    out = tmp_path / "results.csv"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "--no-python", _console_script(), "evaluate",
               str(photos), *COMMON, "--out", str(out)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_rows(_rows(out), _rows(single_run[0]))
    assert done.stdout.count("# Evaluation summary") == 1  # rank 0 alone prints it
    assert "rank 0" in done.stderr and "rank 1" in done.stderr  # a progress bar per rank
    settings = json.loads(out.with_name("results.settings.json").read_text())
    assert settings["world_size"] == 2 and settings["images"] == 4
    assert len(settings["skipped"]) == 2


# The command, held for good once it has written its second part: the test kills it there. A
# run left to go on could finish all its parts, and end, while a loaded machine's test process
# was still between seeing two parts and its kill.
_HELD_AFTER_TWO_PARTS = """
import sys, threading
from pullback_widgets import cli
from pullback_widgets.evaluation import runner
write, parts = runner.atomic_write, []
def atomic_write(path, write_file):
    write(path, write_file)
    if path.parent.name.endswith(".parts"):
        parts.append(path)
        if len(parts) == 2:
            threading.Event().wait()
runner.atomic_write = atomic_write
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_killed_run_resumes_to_the_same_rows(single_run, photos, tmp_path):
    out = tmp_path / "results.csv"
    parts = tmp_path / "results.csv.parts"
    args = ["evaluate", str(photos), *COMMON[:-1], "1", "--out", str(out)]
    process = subprocess.Popen([sys.executable, "-c", _HELD_AFTER_TWO_PARTS, *args],
                               env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            finished = [p for p in parts.glob("*.csv") if not p.name.startswith(".")] \
                if parts.exists() else []
            if len(finished) >= 2:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)  # no clean-up at all: a lost rank
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not out.exists()
    kept = [p for p in parts.iterdir() if not p.name.startswith(".")]
    partial = [row for p in kept for row in _rows(p)]  # every finished part reads whole
    assert 0 < len(partial) < len(_rows(single_run[0]))

    # Without --resume the run refuses to touch what is there.
    assert _main(str(photos), *COMMON, "--out", str(out)) == 2
    assert _main(str(photos), *COMMON, "--out", str(out), "--resume") == 0
    rows = _rows(out)
    _assert_same_rows(rows, _rows(single_run[0]))
    # the rows finished before the kill were kept as they were, not computed again
    by_key = {r[:4]: r[4] for r in rows}
    assert all(by_key[r[:4]] == r[4] for r in partial)
    assert not parts.exists()

    # Resuming a complete run computes nothing and writes the same rows.
    assert _main(str(photos), *COMMON, "--out", str(out), "--resume") == 0
    assert _rows(out) == rows
    assert json.loads(out.with_name("results.settings.json").read_text())["images"] == 0
    # Resuming with settings that change values is refused.
    other = [*COMMON[:-1], "1", "--temperature", "0.2"]
    assert _main(str(photos), *other, "--out", str(out), "--resume") == 2


@pytest.mark.parametrize(("args", "message"), [
    (["missing_folder"], "no such file or folder"),
    (["{photos}", "--methods", "gradeint"], "did you mean 'gradient'"),
    (["{photos}", "--metrics", "deletoin"], "did you mean 'deletion'"),
    (["{photos}", "--targets", "top-0"], "top-K"),
    (["{photos}", "--out", "{tmp}/results.txt"], ".csv or .parquet"),
    (["{photos}", "--out", "{tmp}/file.csv/results.csv"], "cannot be written"),
    (["{photos}", "--out", "/proc/pullback-widgets/results.csv"], "cannot be written"),
    (["{photos}", "--out", "{tmp}/exists.csv"], "--resume"),
    (["{photos}", "--labels-from-folders"], "folder"),
    (["{photos}", "--batch-size", "0"], "batch_size"),
    (["{photos}", "--image-size", "4"], "image_size must be in [16, 4096] px"),
    (["{photos}", "--image-size", "1000000"], "image_size must be in [16, 4096] px"),
    (["{photos}", "--out", "{tmp}/pipe.csv"], "not a regular file"),
    (["{photos}", "--out", "{tmp}/stem.parquet"], "stem.settings.json' exists"),
    (["{photos}", "--seed", str(2 ** 64)], "seed must be an integer in [-2**62, 2**62)"),
    (["--synthetic", "2", "--limit", "0"], "--limit"),
    (["--synthetic", "2", "--model", "efficientnet_lite0"], "pass --targets predicted"),
    (["--synthetic", "2", "--model", "resnet50", "--targets", "label"], "shapes model's"),
    (["--synthetic", "10001"], "--synthetic is at most 10000 images at 64 px"),
    (["--synthetic", "900", "--image-size", "224", "--targets", "predicted",
      "--model", "efficientnet_lite0"], "--synthetic is at most 816 images at 224 px"),
])
def test_refusals_are_one_line_before_any_work(photos, tmp_path, capsys, monkeypatch, args,
                                               message):
    (tmp_path / "file.csv").write_text("a file, not a folder")
    (tmp_path / "exists.csv").write_text("image,target,method,metric,value\n")
    os.mkfifo(tmp_path / "pipe.csv")  # opening it would block: it must not be opened
    (tmp_path / "stem.settings.json").write_text("{}")  # stem.csv's, say

    def no_model(*_, **__):
        raise AssertionError("a model was loaded: work started before the checks")

    monkeypatch.setattr("pullback_widgets.models.load_model", no_model)
    args = [a.format(photos=photos, tmp=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "new.csv")]
    status = _main(*args)
    err = capsys.readouterr().err
    assert status == 2
    errors = [line for line in err.splitlines() if line.startswith("pullback-widgets: error")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "new.csv").exists()


def test_captum_methods_without_captum_name_the_extra(photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pullback_widgets.evaluation.methods.captum_available", lambda: False)
    status = _main(str(photos), "--methods", "gradient", "smoothgrad",
                   "--out", str(tmp_path / "r.csv"))
    assert status == 2
    assert "[compare]" in capsys.readouterr().err


def test_parquet_output_and_labels_from_folders(tmp_path):
    pytest.importorskip("pyarrow")
    for label, name in (("tabby", "chelsea"), ("967", "coffee")):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.fromarray(pw.images.sample_image_array(name)).resize((80, 60)).save(
            tmp_path / "data" / label / f"{name}.png")
    out = tmp_path / "results.parquet"
    status = _main(str(tmp_path / "data"), "--labels-from-folders", "--image-size", "32",
                   "--methods", "random", "--metrics", "deletion", "--out", str(out))
    assert status == 0
    rows = _rows(out)
    assert [(Path(r[0]).parent.name, r[1]) for r in rows] == [("967", 967), ("tabby", 281)]
    # An output inside the folder it reads is not read as an image when resumed.
    inside = tmp_path / "data" / "results.csv"
    for resume in ([], ["--resume"]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert _main(str(tmp_path / "data"), "--image-size", "32", "--methods", "random",
                         "--metrics", "deletion", "--out", str(inside), *resume) == 0
        assert "skipped" not in err.getvalue()
    assert json.loads(out.with_name("results.settings.json").read_text())[
        "settings"]["targets"] == "label"


def test_items_from_any_source_and_randomisation_equals_the_cascade(tmp_path):
    """A synthetic source plugs in as (name, image, label) tuples; the randomisation metric
    is the full cascade's last stage."""
    model = _relu6_net()
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, 8, 8, generator=generator, dtype=torch.float64)
    items = [(f"synthetic-{i}", images[i], i % 3) for i in range(3)]
    settings = ev.EvaluationSettings(methods=("gradient",), metrics=("randomisation",),
                                     targets="label", image_size=8)
    report = ev.evaluate(iter(items), settings, tmp_path / "r.csv", model=model,
                         progress=False)
    expected = ev.randomisation_check(model, images, torch.tensor([0, 1, 2]),
                                      {"gradient": ev.gradient}).absolute[-1, 0]
    assert [r[:4] for r in report.rows] == [(f"synthetic-{i}", i, "gradient", "randomisation")
                                            for i in range(3)]
    np.testing.assert_allclose([r[4] for r in report.rows], expected.numpy(), rtol=1e-12)
    # The model that ran is recorded, not the settings' default name; a resume with another
    # model is refused.
    recorded = json.loads((tmp_path / "r.settings.json").read_text())["settings"]["model"]
    assert recorded == runner._model_record(model) and f"model={recorded!r}" in report.summary
    assert recorded.startswith(f"{type(model).__name__} (passed in, weights ")
    with pytest.raises(pw.PullbackWidgetsError, match="model"):
        ev.evaluate(items, settings, tmp_path / "r.csv", model=pw.load_model("shapes"),
                    resume=True, progress=False)
    # Methods passed in as functions: the summary says the pullback settings are not theirs.
    passed = ev.evaluate(items, settings, tmp_path / "p.csv", model=model, progress=False,
                         methods={"mine": ev.gradient})
    assert "passed in as functions" in passed.summary
    with pytest.raises(pw.PullbackWidgetsError, match="label"):
        ev.evaluate([("unlabelled", images[0])], settings, tmp_path / "s.csv", model=model)
    # top-K beyond the logits of a model without class names: refused before anything is
    # written (torch.topk's raw error came mid-run, after the settings and parts).
    top5 = dataclasses.replace(settings, targets="top-5")
    with pytest.raises(pw.PullbackWidgetsError, match="top-5 asks for more classes than the "
                                                      "model's 3"):
        ev.evaluate(items, top5, tmp_path / "k.csv", model=model, progress=False)
    assert not list(tmp_path.glob("k.*"))
    # A tensor of the run's size is used as it is; another size is resized like a file.
    exact = images[0]
    assert ev.Item("exact", exact).load(8) is exact
    larger = torch.rand(1, 3, 12, 16, generator=generator)
    torch.testing.assert_close(ev.Item("larger", larger).load(8), pw.load_image(larger, size=8)[0])
    with pytest.raises(pw.PullbackWidgetsError, match="pixel values"):
        ev.Item("bright", 2 * images[0]).load(8)


def test_pullback_settings_reach_the_engine():
    model = _relu6_net()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    classes = torch.tensor([0, 2])
    settings = ev.EvaluationSettings(temperature=0.2, gate="normal_cdf",
                                     pool_weights="detached")
    explain = settings.explainers(model)["pullback"]
    expected = pw.excitation_pullback(model, x, classes, temperature=0.2, gate="normal_cdf",
                                      pool_weights="detached")
    torch.testing.assert_close(explain(model, x, classes), expected, rtol=0, atol=0)
    with pytest.raises(pw.PullbackWidgetsError, match="pool_weights"):
        ev.EvaluationSettings(pool_weights="frozen")


def test_summary_statistics_by_hand():
    rows = []
    gradient = {"a": [0.2, 0.4], "b": [0.5, 0.5], "c": [0.1, 0.3]}
    shifts = {"a": -0.1, "b": -0.2, "c": -0.05}
    for image, values in gradient.items():
        for target, value in enumerate(values):
            rows.append((image, target, "gradient", "deletion", value))
            rows.append((image, target, "pullback", "deletion", value + shifts[image]))
    settings = ev.EvaluationSettings(methods=("gradient", "pullback"), metrics=("deletion",))
    text = ev.summarise(rows, settings, images=3)
    per_image = [0.3, 0.5, 0.2]  # the mean over each image's two targets
    se = np.std(per_image, ddof=1) / math.sqrt(3)
    assert f"| deletion ↓ | gradient | 3 | {np.mean(per_image):.4g} ± {se:.2g} |" in text
    diffs = list(shifts.values())
    half = scipy.stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / math.sqrt(3)
    low, high = np.mean(diffs) - half, np.mean(diffs) + half
    row = next(line for line in text.splitlines() if line.startswith("| deletion ↓ | pullback"))
    assert f"{np.mean(diffs):+.3g} [{low:+.3g}, {high:+.3g}]" in row
    assert high > 0 and "✓" not in row and "✗" not in row  # the interval holds 0
    clear = [(i, t, m, "deletion", v - (0.3 if m == "pullback" else 0.0))
             for i, t, m, _, v in rows]
    row = next(line for line in ev.summarise(clear, settings, images=3).splitlines()
               if line.startswith("| deletion ↓ | pullback"))
    assert row.endswith("✓ |")


@pytest.mark.parametrize("methods", [("mine",), ("gradient", "mine"), ("random", "gradient")])
def test_every_summary_row_has_as_many_cells_as_its_header(methods):
    # Without a reference method a row ended in an empty cell more than the header's four
    # (a review of the README).
    rows = [(image, 0, method, "deletion", value) for image, value in (("a", 0.2), ("b", 0.4))
            for method in methods]
    settings = ev.EvaluationSettings(methods=methods, metrics=("deletion",))
    table = [line for line in ev.summarise(rows, settings, images=2).splitlines()
             if line.startswith("| ")]
    assert len(table) == 1 + len(methods)
    assert {line.count("|") for line in table} == {table[0].count("|")}


def test_summary_intervals_stay_within_what_a_difference_can_be():
    # Pointing hits on three images: pullback 1, 1, 0 against gradient 0, 0, 0. Student t
    # on n = 3 reaches far past +1, which no difference of 0/1 values can.
    rows = [(image, 0, method, metric, value)
            for image, hit in (("a", 1.0), ("b", 1.0), ("c", 0.0))
            for method, value in (("pullback", hit), ("gradient", 0.0))
            for metric in ("pointing", "ascent_gain")]
    settings = ev.EvaluationSettings(methods=("gradient", "pullback"),
                                     metrics=("pointing", "ascent_gain"))
    text = ev.summarise(rows, settings, images=3)
    half = scipy.stats.t.ppf(0.975, 2) * np.std([1, 1, 0], ddof=1) / math.sqrt(3)
    assert 2 / 3 + half > 1
    row = next(line for line in text.splitlines() if line.startswith("| pointing ↑ | pullback"))
    assert f"+0.667 [{2 / 3 - half:+.3g}, +1]" in row
    # An unbounded metric keeps the whole interval.
    row = next(line for line in text.splitlines() if line.startswith("| ascent_gain ↑ | pull"))
    assert f"[{2 / 3 - half:+.3g}, {2 / 3 + half:+.3g}]" in row


def test_each_file_counts_once_however_many_paths_reach_it(tmp_path):
    # A link to a parent folder, a linked file, and the folder named twice: two files, not 82.
    (tmp_path / "ds" / "sub").mkdir(parents=True)
    for name in ("ds/a.png", "ds/sub/b.png"):
        (tmp_path / name).write_bytes(b"image")
    (tmp_path / "ds" / "sub" / "up").symlink_to("..")
    (tmp_path / "ds" / "sub" / "alias.png").symlink_to("../a.png")
    folder = tmp_path / "ds"
    found = runner.find_images([folder, f"{folder}/../ds", folder / "a.png"])
    assert sorted(f.resolve().name for f in found) == ["a.png", "b.png"]


def test_a_damaged_output_on_resume_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "results.csv"
    out.write_text("image,target,method,metric,value\na.png,0,gradient,deletion\n")
    with pytest.raises(pw.PullbackWidgetsError, match="line 2 is damaged"):
        runner.read_rows(out)


def test_an_output_whose_last_line_was_cut_short_is_refused(tmp_path):
    # A cut inside the last value still parses as a number (0.3 for 0.3265...): only the
    # missing line end tells it, and a resume must not take it for a finished row.
    out = tmp_path / "results.csv"
    runner._write_csv(out, [("a.png", 0, "gradient", "deletion", 0.3265),
                            ("b.png", 1, "gradient", "deletion", 0.3265)])
    whole = out.read_bytes()
    assert runner.read_rows(out)[1][-1] == 0.3265
    out.write_bytes(whole[:-4])
    with pytest.raises(pw.PullbackWidgetsError, match="cut short"):
        runner.read_rows(out)
    out.write_bytes(whole[:-2] + b"\r")  # half the line end
    with pytest.raises(pw.PullbackWidgetsError, match="cut short"):
        runner.read_rows(out)


def test_rows_keep_an_image_name_that_is_not_utf8(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")
    rows = [(name, 3, "gradient", "deletion", 0.25)]
    runner._write_csv(tmp_path / "results.csv", rows)
    assert runner.read_rows(tmp_path / "results.csv") == rows


def test_names_a_spreadsheet_would_run_as_formulas_are_written_as_text(tmp_path):
    names = ["=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)", "\tx", "'quoted", "''=",
             "plain", "a=b"]
    rows = [(name, 0, "gradient", "deletion", 0.5) for name in names]
    runner._write_csv(tmp_path / "results.csv", rows)
    text = (tmp_path / "results.csv").read_text(encoding="utf-8")
    cells = [line.split(",")[0] for line in text.splitlines()[1:]]
    assert not any(cell.lstrip('"').startswith(("=", "+", "-", "@", "\t")) for cell in cells)
    assert runner.read_rows(tmp_path / "results.csv") == rows


def test_parquet_refuses_a_name_that_is_not_utf8_before_any_work(tmp_path):
    pytest.importorskip("pyarrow")
    image = torch.rand(3, 16, 16)
    items = [("plain.png", image), (os.fsdecode(b"caf\xe9.png"), image)]
    settings = ev.EvaluationSettings(methods=("gradient",), metrics=("deletion",),
                                     image_size=16)
    with pytest.raises(pw.PullbackWidgetsError, match=r"not valid UTF-8.*as \.csv"):
        ev.evaluate(items, settings, tmp_path / "results.parquet", model=_relu6_net(),
                    progress=False)
    assert list(tmp_path.iterdir()) == []
    report = ev.evaluate(items, settings, tmp_path / "results.csv", model=_relu6_net(),
                         progress=False)
    assert sorted(row[0] for row in report.rows) == sorted(name for name, _ in items)


def test_the_model_is_probed_at_the_run_size_before_anything_is_written(tmp_path):
    # A model that cannot run at the size fails before the settings or parts are written; a
    # pullback-free run needs only a plain forward (a checkpointed model is refused only
    # where pullbacks are asked for).
    from tests.test_hostile_models import _Checkpointed

    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    items = [(f"image-{i}", images[i]) for i in range(2)]
    pooled = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                 torch.nn.MaxPool2d(8), torch.nn.Flatten(),
                                 torch.nn.LazyLinear(5)).eval()
    pooled(torch.rand(1, 3, 16, 16))
    tiny = ev.EvaluationSettings(methods=("gradient",), metrics=("infidelity",), image_size=4,
                                 perturbations=2)
    with pytest.raises(pw.PullbackWidgetsError, match="cannot run on 4 x 4 images"):
        ev.evaluate(items, tiny, tmp_path / "a.csv", model=pooled, progress=False)
    assert list(tmp_path.iterdir()) == []
    checkpointed = _Checkpointed(use_reentrant=False).eval()
    settings = ev.EvaluationSettings(methods=("gradient",), metrics=("infidelity",),
                                     image_size=16, perturbations=2)
    report = ev.evaluate(items, settings, tmp_path / "b.csv", model=checkpointed,
                         progress=False)
    assert len(report.rows) == 2
    with pytest.raises(pw.PullbackWidgetsError, match="activation checkpointing"):
        ev.evaluate(items, dataclasses.replace(settings, methods=("pullback",)),
                    tmp_path / "c.csv", model=checkpointed, progress=False)
    assert not (tmp_path / "c.settings.json").exists()


def test_a_skipped_file_name_cannot_add_rows_to_the_summary():
    rows = [("a.png", 0, "gradient", "deletion", 0.5)]
    settings = ev.EvaluationSettings(methods=("gradient",), metrics=("deletion",))
    forged = "x\n\n| deletion ↓ | FORGED | 999 | 0.0001 ± 0 |\n\n.png"
    text = ev.summarise(rows, settings, images=1,
                        skipped=[(forged, "could not read\nthe file")])
    assert not any("FORGED" in line and line.startswith("|") for line in text.splitlines())
    assert repr(forged) in text and "could not read the file" in text


def _synthetic_run(out: Path, *extra: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = _main("--synthetic", "2", "--methods", "random", "--metrics", "mass",
                       "--out", str(out), *extra)
    return status, err.getvalue()


def test_a_second_run_into_the_same_output_at_once_is_refused(tmp_path):
    out, fresh = tmp_path / "r.csv", tmp_path / "fresh.csv"
    assert _synthetic_run(out)[0] == 0
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    # Other runs hold them: a resume of r.csv (through its twin, which shares the lock) and a
    # new run into fresh.csv that has not written anything yet.
    running = [runner.OutputLock(tmp_path / "r.parquet"), runner.OutputLock(fresh)]
    try:
        for status, err in (_synthetic_run(out, "--resume"), _synthetic_run(fresh)):
            assert status == 2 and "another run is writing" in err.strip().splitlines()[-1]
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()
                if not p.name.endswith(".lock")} == before
        assert _synthetic_run(tmp_path / "other.csv")[0] == 0  # another stem, its own lock
    finally:
        for lock in running:
            lock.release()
    assert not list(tmp_path.glob(".*.lock"))
    (tmp_path / ".r.lock").write_text("")  # left by a killed run: the OS holds no lock
    assert _synthetic_run(out, "--resume")[0] == 0 and not (tmp_path / ".r.lock").exists()
    (tmp_path / ".r.lock").symlink_to(tmp_path / "elsewhere")
    status, err = _synthetic_run(out, "--resume")
    assert status == 2 and "cannot make the run's lock" in err
    assert not (tmp_path / "elsewhere").exists()


def test_outputs_sharing_a_stem_do_not_share_settings(tmp_path):
    assert _synthetic_run(tmp_path / "r.csv")[0] == 0
    status, err = _synthetic_run(tmp_path / "r.parquet", "--resume")
    assert status == 2 and "records the run that wrote 'r.csv'" in err
    assert _synthetic_run(tmp_path / "r.csv", "--resume")[0] == 0


@pytest.mark.parametrize("text", ["{bad", "[1, 2]", '{"values": 5}', b"\xff\xfe"])
def test_a_damaged_settings_file_on_resume_is_a_one_line_error(tmp_path, text):
    assert _synthetic_run(tmp_path / "r.csv")[0] == 0
    settings = tmp_path / "r.settings.json"
    settings.write_bytes(text if isinstance(text, bytes) else text.encode())
    status, err = _synthetic_run(tmp_path / "r.csv", "--resume")
    assert status == 2 and "is damaged" in err and "Traceback" not in err


def test_a_damaged_parquet_output_on_resume_is_a_one_line_error(tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "r.parquet"
    assert _synthetic_run(out)[0] == 0
    out.write_bytes(out.read_bytes()[:-40])
    status, err = _synthetic_run(out, "--resume")
    assert status == 2 and "not a readable evaluation output" in err


def test_resuming_with_the_folder_spelled_another_way_is_refused(photos, tmp_path, monkeypatch):
    out = tmp_path / "r.csv"
    args = ("--model", "shapes", "--image-size", "32", "--methods", "random",
            "--metrics", "deletion", "--out", str(out))
    monkeypatch.chdir(photos.parent)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert _main(photos.name, *args) == 0
    rows = _rows(out)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert _main(str(photos), *args, "--resume") == 2
    assert "it would count twice" in err.getvalue()
    assert _rows(out) == rows
    # From another folder, the rows' relative names are read from the folder the run began in.
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert _main(str(photos), *args, "--resume") == 2
    assert "it would count twice" in err.getvalue()


def test_resuming_a_subset_keeps_the_rows_of_the_images_left_out(tmp_path):
    out = tmp_path / "r.csv"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert _main("--synthetic", "4", "--methods", "gradient", "--metrics", "mass",
                     "--out", str(out)) == 0
        assert _main("--synthetic", "4", "--limit", "2", "--methods", "gradient", "random",
                     "--metrics", "mass", "--out", str(out), "--resume") == 0, err.getvalue()
    rows = _rows(out)
    assert sorted((r[0], r[2]) for r in rows) == sorted(
        [(f"shapes-s0-{i:06d}", "gradient") for i in range(4)]
        + [(f"shapes-s0-{i:06d}", "random") for i in range(2)])


def test_a_symlink_loop_is_skipped_and_an_unreadable_folder_refused(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(pw.images.sample_image_array("coffee")).resize((40, 30)).save(
        folder / "a.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    assert [f.name for f in runner.find_images([folder])] == ["a.png", "loop.png"]
    (folder / "locked").mkdir()
    listing = os.scandir

    def scandir(path="."):  # root reads any folder: make this one unreadable
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(pw.PullbackWidgetsError, match=r"cannot read the folder .*locked"):
        runner.find_images([folder])


def test_damaged_parts_and_conflicting_rows_on_resume_are_one_line_errors(tmp_path):
    out = tmp_path / "r.csv"
    assert _synthetic_run(out)[0] == 0
    rows = _rows(out)
    parts = runner._parts_dir(out)
    parts.write_text("a file where the parts folder goes")
    status, err = _synthetic_run(out, "--resume")
    assert status == 2 and "is not the run's own folder" in err
    parts.unlink()
    parts.mkdir()
    os.mkfifo(parts / "0.csv")  # reading it would block
    status, err = _synthetic_run(out, "--resume")
    assert status == 2 and "is not a regular file" in err
    (parts / "0.csv").unlink()
    image, target, method, metric, value = rows[0]
    runner._write_csv(parts / "0.csv", [(image, target, method, metric, value + 1.0)])
    status, err = _synthetic_run(out, "--resume")
    assert status == 2 and "holds two values" in err
    runner._write_csv(parts / "0.csv", [rows[0]])  # the same row twice is no conflict
    assert _synthetic_run(out, "--resume")[0] == 0 and _rows(out) == rows



def test_links_where_the_outputs_go_are_refused_and_kept(tmp_path):
    # A link (dangling or not) at the output, its settings or its summary: the atomic renames
    # would replace the links themselves.
    elsewhere = tmp_path / "elsewhere.csv"
    for own in (tmp_path / "r.csv", tmp_path / "r.settings.json", tmp_path / "r.summary.md"):
        own.symlink_to(elsewhere)
        status, err = _synthetic_run(tmp_path / "r.csv")
        assert status == 2 and "not a regular file (a link" in err
        assert own.is_symlink() and not elsewhere.exists()
        own.unlink()
    assert _synthetic_run(tmp_path / "r.csv")[0] == 0  # the control
    finished = tmp_path / "finished.csv"
    (tmp_path / "r.csv").rename(finished)
    (tmp_path / "r.csv").symlink_to(finished)
    status, err = _synthetic_run(tmp_path / "r.csv", "--resume")
    assert status == 2 and "not a regular file (a link" in err
    assert (tmp_path / "r.csv").is_symlink()


def test_resume_state_that_cannot_be_trusted_is_refused_in_one_line(tmp_path):
    out = tmp_path / "r.csv"
    assert _synthetic_run(out)[0] == 0
    settings = runner._settings_path(out)
    record = settings.read_bytes()
    settings.unlink()
    os.mkfifo(settings)  # reading it would block
    status, err = _synthetic_run(out, "--resume")
    assert status == 2 and "is not a regular file" in err
    settings.unlink()  # rows without the settings they were made with
    status, err = _synthetic_run(out, "--resume", "--image-size", "40")
    assert status == 2 and "nothing says what it was made with" in err
    settings.write_bytes(record)
    with out.open("a") as f:
        f.write('"' + "x" * 200_000 + '",0,random,mass,0.5\n')
    status, err = _synthetic_run(out, "--resume")
    assert status == 2 and "is damaged" in err and "Traceback" not in err
    parts = runner._parts_dir(out)
    (tmp_path / "mine").mkdir()
    parts.symlink_to(tmp_path / "mine")
    status, err = _synthetic_run(out, "--resume")
    assert status == 2 and "not the run's own folder" in err
    assert list((tmp_path / "mine").iterdir()) == []


def test_hard_links_count_once_and_a_pipe_named_directly_is_skipped_with_its_reason(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(pw.images.sample_image_array("coffee")).resize((40, 30)).save(
        folder / "a.png")
    os.link(folder / "a.png", folder / "b.png")
    assert [f.name for f in runner.find_images([folder])] == ["a.png"]
    os.mkfifo(tmp_path / "pipe.png")
    assert runner.find_images([tmp_path / "pipe.png"]) == [tmp_path / "pipe.png"]
    with pytest.raises(pw.PullbackWidgetsError, match=r"named pipe \(FIFO\)"):
        pw.load_image(tmp_path / "pipe.png")


def test_a_run_where_no_image_could_be_read_exits_with_an_error(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    (folder / "b.jpg").write_bytes(b"")
    out = tmp_path / "r.csv"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert _main(str(folder), *COMMON, "--out", str(out)) == 2
    last = err.getvalue().strip().splitlines()[-1]
    assert last.startswith("pullback-widgets: error: no image could be read: 2 file(s) "
                           "skipped, the first: could not read file") and "a.png" in last
    assert _rows(out) == [] and "2 file(s) skipped" in runner.summary_path(out).read_text()


def test_a_skipped_file_whose_name_is_not_utf8_is_recorded_and_the_run_completes(tmp_path):
    # The settings record was written as UTF-8 with the name's surrogate-escaped byte in it:
    # UnicodeEncodeError at the end of every run and resume (a hostile review).
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(pw.images.sample_image_array("coffee")).resize((40, 30)).save(
        folder / "ok.png")
    with open(os.path.join(os.fsencode(folder), b"bad\xff.txt"), "wb") as file:
        file.write(b"not an image")
    out = tmp_path / "r.csv"
    for extra in ((), ("--resume",)):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            assert _main(str(folder), *COMMON, "--out", str(out), *extra) == 0, err.getvalue()
        record = json.loads(runner._settings_path(out).read_text(encoding="utf-8"))
        assert record["status"] == "complete"
        assert [os.fsencode(name)[-8:] for name, _ in record["skipped"]] == [b"bad\xff.txt"]


def test_names_written_before_escaping_read_back_as_they_were(tmp_path):
    legacy = tmp_path / "old.csv"  # written before names were escaped: "'a.png" as it is
    legacy.write_text("image,target,method,metric,value\n'a.png,2,gradient,deletion,0.5\n")
    assert runner.read_rows(legacy)[0][0] == "'a.png"


def test_a_refused_run_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "new" / "deeper" / "r.csv"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert _main("--synthetic", "2", "--limit", "0", "--out", str(out)) == 2
        assert _main(str(tmp_path / "missing"), "--out", str(out)) == 2
    assert list(tmp_path.iterdir()) == []
    assert _synthetic_run(out)[0] == 0 and out.exists()


def test_resuming_from_a_folder_where_the_names_are_other_files_is_refused(tmp_path,
                                                                           monkeypatch):
    # Rows are keyed by relative names: from another folder, imgs/0.png is another picture.
    rng = np.random.default_rng(1)
    for run in "AB":
        (tmp_path / run / "imgs").mkdir(parents=True)
        for i in range(2):
            Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(
                tmp_path / run / "imgs" / f"{i}.png")
    out = tmp_path / "r.csv"
    args = ("imgs", "--model", "shapes", "--image-size", "32", "--methods", "random",
            "--metrics", "deletion", "--out", str(out))
    monkeypatch.chdir(tmp_path / "A")
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert _main(*args, "--limit", "1") == 0
    rows = _rows(out)
    monkeypatch.chdir(tmp_path / "B")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert _main(*args, "--resume") == 2
    last = err.getvalue().strip().splitlines()[-1]
    assert "holds rows for 'imgs/0.png'" in last and "resume from there" in last
    assert str(tmp_path / "A") in last and _rows(out) == rows
    monkeypatch.chdir(tmp_path / "A")  # the folder it began in: it resumes
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert _main(*args, "--resume") == 0
    assert sorted({r[0] for r in _rows(out)}) == ["imgs/0.png", "imgs/1.png"]
    # Synthetic images are files in neither folder: they resume from anywhere.
    assert _synthetic_run(tmp_path / "s.csv", "--limit", "1")[0] == 0
    monkeypatch.chdir(tmp_path / "B")
    assert _synthetic_run(tmp_path / "s.csv", "--resume")[0] == 0
    assert len(_rows(tmp_path / "s.csv")) == 2


def test_synthetic_images_explained_by_another_model_at_its_predictions(tmp_path):
    out = tmp_path / "lite.csv"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert _main("--synthetic", "2", "--model", "efficientnet_lite0", "--targets",
                     "predicted", "--image-size", "32", "--methods", "random",
                     "--metrics", "mass", "--out", str(out)) == 0
    assert [r[0] for r in _rows(out)] == ["shapes-s0-000000", "shapes-s0-000001"]


def test_a_file_of_the_users_named_like_the_lock_is_refused_and_kept(tmp_path):
    out, lock = tmp_path / "r.csv", tmp_path / ".r.lock"
    lock.write_text("my notes")
    status, err = _synthetic_run(out)
    last = err.strip().splitlines()[-1]
    assert status == 2 and f"{str(lock)!r} is not a pullback-widgets lock" in last
    assert lock.read_text() == "my notes" and sorted(p.name for p in tmp_path.iterdir()) == [
        ".r.lock"]
    lock.unlink()
    os.mkfifo(lock)  # reading it would block
    status, err = _synthetic_run(out)
    assert status == 2 and "is not a pullback-widgets lock" in err and lock.exists()
    lock.unlink()
    held = runner.OutputLock(out)  # a run's lock says so, and goes with the run
    try:
        assert lock.read_bytes() == runner.LOCK_MARKER
    finally:
        held.release()
    assert not lock.exists()
    lock.write_bytes(runner.LOCK_MARKER)  # left by a killed run: the OS holds no lock
    assert _synthetic_run(out)[0] == 0 and not lock.exists()


def test_resuming_with_a_passed_in_model_or_method_from_elsewhere_is_refused(tmp_path):
    items = ev.synthetic_items(3)
    torch.manual_seed(0)
    first = pw.synthetic.ShapesNet().eval()
    torch.manual_seed(1)
    other = pw.synthetic.ShapesNet().eval()
    settings = ev.EvaluationSettings(model="shapes", methods=("gradient",), metrics=("mass",),
                                     targets="label", image_size=64)
    out = tmp_path / "r.csv"
    ev.evaluate(items[:2], settings, out, model=first, progress=False)
    rows = _rows(out)
    with pytest.raises(pw.PullbackWidgetsError, match=r"model: 'ShapesNet \(passed in, weights "
                       r"[0-9a-f]{12}\)' then, 'ShapesNet \(passed in, weights [0-9a-f]{12}\)"):
        ev.evaluate(items, settings, out, model=other, resume=True, progress=False)
    assert _rows(out) == rows
    report = ev.evaluate(items, settings, out, model=first, resume=True, progress=False)
    assert len(report.rows) == 3
    # bfloat16 weights have a digest too (numpy has no bfloat16)
    assert "weights" in runner._model_record(pw.synthetic.ShapesNet().to(torch.bfloat16))
    # Methods passed in are recorded by module and qualified name (their code is not compared).
    mine = tmp_path / "mine.csv"
    ev.evaluate(items[:2], settings, mine, model=first, methods={"mine": ev.gradient},
                progress=False)
    with pytest.raises(pw.PullbackWidgetsError, match="other methods under the same names "
                       r"\(mine: 'pullback_widgets.evaluation.methods.gradient' then"):
        ev.evaluate(items, settings, mine, model=first, resume=True, progress=False,
                    methods={"mine": lambda model, x, target: ev.gradient(model, x, target)})
    ev.evaluate(items, settings, mine, model=first, methods={"mine": ev.gradient},
                resume=True, progress=False)
    record = json.loads(runner._settings_path(mine).read_text())
    assert record["method_sources"] == {"mine": "pullback_widgets.evaluation.methods.gradient"}


@pytest.mark.parametrize(("fields", "message"), [
    ({"baseline": "zeros"}, r"baseline must be one of \('blur', 'mean'\)"),
    ({"noise_std": 0.0}, "noise_std must be a finite number > 0"),
    ({"noise_std": math.nan}, "noise_std must be a finite number > 0"),
    ({"step_size": -1.0}, "step_size must be a finite number > 0"),
    ({"eps": math.inf}, "eps must be a finite number > 0"),
    ({"steps": 64 * 64 + 1}, r"steps must be at most image_size² = 4096"),
    ({"metrics": ("infidelity",), "perturbations": 10 ** 10},
     "perturbations must be at most 21845 at 64 px"),
])
def test_settings_are_checked_when_made_before_a_run_writes_anything(tmp_path, fields,
                                                                     message):
    with pytest.raises(pw.PullbackWidgetsError, match=message):
        ev.EvaluationSettings(**{"image_size": 64, **fields})
    # The bounds themselves pass, and a bound binds only the metric it is for.
    ev.EvaluationSettings(image_size=64, steps=64 * 64, metrics=("deletion",))
    ev.EvaluationSettings(image_size=64, perturbations=21845, metrics=("infidelity",))
    ev.EvaluationSettings(image_size=64, steps=10 ** 10, perturbations=10 ** 10,
                          metrics=("mass",))
