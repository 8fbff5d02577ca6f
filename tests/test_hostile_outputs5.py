"""Hostile outputs, fifth round: what the shapes training command and an evaluation leave on
disk when their output cannot be written or their writing is cut short. Each test names what
went wrong before."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import pathlib
import re
from pathlib import Path

import pytest
import torch

from pullback_widgets import cli, synthetic
from pullback_widgets.evaluation import runner

# =========================================================================== shapes training

@pytest.fixture
def fake_training(monkeypatch):
    """Training that takes no time: an untrained net (seeded by ``seed``) and a provenance
    that names its seed, so that two trainings' outputs differ and can be told apart."""
    calls = []

    def train(*, seed: int = 0, **_):
        calls.append(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = synthetic.ShapesNet().eval()
        return net, {"seed": seed}

    monkeypatch.setattr(synthetic, "train", train)
    return calls


def _train(out: Path, *extra: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return synthetic._main(["train", "--threads", "1", "--out", str(out), *extra])


@pytest.mark.parametrize("where", ["below a file", "unwritable folder"])
def test_train_refuses_an_out_it_cannot_write_before_training(tmp_path, capsys, fake_training,
                                                               where):
    # The folder was made, and the weights saved, only after training (about 14 minutes at the
    # default 1200 steps): a FileExistsError or PermissionError traceback then, the training
    # lost.
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    out = tmp_path / "notes.txt" / "net.pt" if where == "below a file" \
        else Path("/proc/pullback-widgets/net.pt")
    status = _train(out)
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and "cannot be written" in err, err
    assert fake_training == [], "training ran before the output was checked"
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder"


def test_a_failed_save_keeps_the_earlier_weights_and_their_provenance(tmp_path, capsys,
                                                                      monkeypatch,
                                                                      fake_training):
    # The weights were renamed into place first and the provenance written after, in place:
    # a full disk there left the new weights beside the old provenance (another seed and
    # accuracy), or beside a cut-short one, and a traceback.
    out = tmp_path / "net.pt"
    assert _train(out) == 0
    provenance = out.with_suffix(".json")
    before = {path.name: path.read_bytes() for path in (out, provenance)}

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    status = None
    with contextlib.suppress(OSError):
        status = _train(out, "--seed", "1", "--overwrite")
    monkeypatch.undo()
    assert {path.name: path.read_bytes() for path in (out, provenance)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.json", "net.pt"]  # no temporary
    err = capsys.readouterr().err
    assert status == 2 and "No space left" in err and "Traceback" not in err, err


def test_overwriting_writes_no_file_a_provenance_link_points_to(tmp_path, fake_training):
    # The provenance was written with Path.write_text, which follows a link: --overwrite
    # replaced the weights (the link itself, if one) but wrote the provenance into the user's
    # file that net.json linked to, elsewhere.
    out = tmp_path / "net.pt"
    assert _train(out) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.json").write_text('{"mine": true}\n')
    out.with_suffix(".json").unlink()
    out.with_suffix(".json").symlink_to(elsewhere / "notes.json")
    assert _train(out, "--seed", "1", "--overwrite") == 0
    assert (elsewhere / "notes.json").read_text() == '{"mine": true}\n'
    assert json.loads(out.with_suffix(".json").read_text())["seed"] == 1


# =========================================================================== evaluation

def _evaluate(out: Path, images: int, *extra: str) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            return cli.main(["evaluate", "--synthetic", str(images), "--methods", "gradient",
                             "random", "--metrics", "mass", "--batch-size", "2",
                             "--out", str(out), *extra])
    finally:
        torch.set_num_threads(threads)


def test_a_run_stopped_after_its_output_leaves_no_summary_of_other_rows(tmp_path,
                                                                        monkeypatch):
    # The merged output was renamed into place before the summary was made: a Ctrl-C (or a
    # full disk) between them left the new rows beside the previous run's summary, which
    # looked complete and described other rows (fewer images, other means).
    out = tmp_path / "r.csv"
    summary = tmp_path / "r.summary.md"
    assert _evaluate(out, 2) == 0

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "summarise", stopped)
    assert _evaluate(out, 4, "--resume") == 130
    monkeypatch.undo()
    rows = runner.read_rows(out) if out.exists() else []
    if summary.exists():
        counted = int(re.search(r"(\d+) rows in the output", summary.read_text()).group(1))
        assert counted == len(rows), "the summary describes other rows than the output's"
    # and a resume completes both
    assert _evaluate(out, 4, "--resume") == 0
    assert len(runner.read_rows(out)) == 4 * 2
    assert "8 rows in the output" in summary.read_text()


def test_a_resume_with_another_torch_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    # The versions were recorded but not compared: rows of two torch versions (or two versions
    # of the package's rules) were merged into one output without a word.
    out = tmp_path / "r.csv"
    assert _evaluate(out, 2) == 0
    monkeypatch.setattr(torch, "__version__", "0.0.1-other")
    capsys.readouterr()
    assert cli.main(["evaluate", "--synthetic", "4", "--methods", "gradient", "random",
                     "--metrics", "mass", "--batch-size", "2", "--out", str(out),
                     "--resume"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert "other versions (torch" in error and "0.0.1-other' now" in error
    assert len(runner.read_rows(out)) == 2 * 2  # the output as it was
    monkeypatch.undo()
    assert _evaluate(out, 4, "--resume") == 0
