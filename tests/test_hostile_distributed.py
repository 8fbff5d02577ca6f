"""A hostile user against the evaluation runner's multi-process paths: process groups the caller
started (gloo on CPU, two ranks in subprocesses) and torchrun. Each test failed before its fix:
a merged output that silently missed images or mixed settings, a rank that waited for one that
had given up, a torch traceback where a one-line error belongs.

Small on purpose (16 px images, a tiny model, one method and metric): the point is how the ranks
meet, not the metrics."""

from __future__ import annotations

import contextlib
import datetime
import io
import subprocess
import sys
from pathlib import Path

import torch

from pullback_widgets import cli
from pullback_widgets import evaluation as ev
from pullback_widgets.evaluation import runner
from tests.test_evaluation import _relu6_net
from tests.two_ranks import ROOT, TIMEOUT_S, rank_environment, run_two_ranks

# Every scenario runs in both ranks of one process group, one after the other; each prints
# "scenario|seconds|outcome". Rank 1 is the one given something else, or the one that fails.
_GROUP = """
import os, signal, sys, time, torch, pullback_widgets.evaluation as ev
from tests.test_evaluation import SmallReLU6Net, _relu6_net
rank, port, base, scenarios = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                     rank=rank, world_size=2)
images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
ITEMS = [(f"image-{i}", images[i], i % 3) for i in range(6)]
for scenario in scenarios:
    folder = os.path.join(base, scenario)
    os.makedirs(folder, exist_ok=True)
    os.chdir(folder)
    items, model, out, resume = list(ITEMS), _relu6_net(), "r.csv", False
    fields = dict(methods=("gradient",), metrics=("deletion",), targets="label",
                  image_size=16, steps=4, batch_size=1)
    if scenario == "late" and rank == 0:
        time.sleep(3)  # rank 1 has checked everything and waits
    if rank == 1:
        if scenario == "items":  # its listing missed a file
            items = items[1:]
        elif scenario == "steps":
            fields["steps"] = 8
        elif scenario == "weights":  # a model made without a seed
            model = SmallReLU6Net().double().eval()
        elif scenario == "out":
            out = "r-1.csv"
        elif scenario == "elsewhere":  # the same name in another folder (another node's disk)
            os.makedirs("../rank-1s-own", exist_ok=True)
            os.chdir("../rank-1s-own")
        elif scenario == "names":
            items.append(items[0])
        elif scenario in ("fails", "killed"):  # its second image (image-3) cannot be had

            def lost():
                if scenario == "killed":
                    os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer, a node lost
                raise RuntimeError("the data server went away")

            items[3] = ("image-3", lost, 0)
    if scenario == "resumed":  # of "fails", whose parts are there
        out, resume = os.path.join(base, "fails", "r.csv"), True
    started = time.monotonic()
    try:
        ev.evaluate(items, ev.EvaluationSettings(**fields), out, model=model, resume=resume,
                    progress=False)
        outcome = f"ok, {len(ev.read_rows(out))} rows"  # on every rank, once it returns
    except Exception as error:
        outcome = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    print(f"{scenario}|{time.monotonic() - started:.1f}|{outcome}", flush=True)
os._exit(0)  # every run has ended together; a killed rank's group cannot be ended cleanly
"""


def _in_a_group(base: Path, *scenarios: str,
                script: str = _GROUP) -> list[dict[str, tuple[float, str]]]:
    """Run ``scenarios`` of ``script`` in a two-rank process group; per rank, scenario ->
    (seconds, outcome) for each scenario it finished (one that waited past the time limit
    shows as the scenarios it lacks)."""
    outputs = [output for _, output in run_two_ranks(script, [str(base), *scenarios], base)]
    results = []
    for output in outputs:
        found = {}
        for line in output.splitlines():
            scenario, seconds, outcome = [*line.split("|", 2), "", ""][:3]
            if scenario in scenarios and outcome:
                found[scenario] = (float(seconds), outcome)
        results.append(found)
    return results


def _reference(tmp_path: Path) -> list[tuple]:
    """The six images' rows from one process."""
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    items = [(f"image-{i}", images[i], i % 3) for i in range(6)]
    settings = ev.EvaluationSettings(methods=("gradient",), metrics=("deletion",),
                                     targets="label", image_size=16, steps=4, batch_size=1)
    return ev.evaluate(items, settings, tmp_path / "reference.csv", model=_relu6_net(),
                       progress=False).rows


def test_ranks_given_other_items_settings_model_or_output_are_refused_on_every_rank(tmp_path):
    # Each rank takes its share of its own list and rank 0 merges: a rank whose listing missed
    # a file ran images 2 and 4 again and none of 1, 3 and 5; the merged output held three
    # images of six, or rows of two step counts or two models, without a word. A rank writing
    # its parts where rank 0 does not look (another --out, another folder) lost its rows.
    ranks = _in_a_group(tmp_path, "late", "items", "steps", "weights", "out", "elsewhere")
    # Rank 1 returned while rank 0 still merged, and found no output, or an older one.
    assert [ranks[rank]["late"][1] for rank in (0, 1)] == ["ok, 6 rows"] * 2, ranks
    assert [r[0] for r in runner.read_rows(tmp_path / "late" / "r.csv")] == \
        [f"image-{i}" for i in range(6)]
    # (A relative out from another folder is another file: refused before any work too.)
    for scenario, differs in [("items", "items"), ("steps", "steps"), ("weights", "model"),
                              ("out", "out"), ("elsewhere", "out")]:
        for rank in (0, 1):
            outcome = ranks[rank][scenario][1]
            assert outcome.startswith("PullbackWidgetsError: rank 1 of 2 was given other"), \
                (scenario, rank, outcome)
            assert differs in outcome.split(" than rank 0")[0], (scenario, outcome)
        assert not (tmp_path / scenario / "r.csv").exists()


def test_a_rank_that_fails_stops_every_rank_with_its_reason_and_the_run_resumes(tmp_path):
    # Rank 1 raised (before the first meeting, or mid-run) and its caller went on: rank 0
    # waited for it at the next meeting until rank 1's process ended (30 minutes, torch's
    # default, had it lived on), then failed with gloo's "Connection closed by peer".
    ranks = _in_a_group(tmp_path, "names", "fails", "resumed")
    assert ranks[1]["names"][1] == "PullbackWidgetsError: item names must be unique", ranks
    assert ranks[0]["names"][1] == ("PullbackWidgetsError: rank 1 of 2 failed: item names must "
                                    "be unique"), ranks
    assert ranks[1]["fails"][1] == "RuntimeError: the data server went away", ranks
    assert ranks[0]["fails"][1] == ("PullbackWidgetsError: rank 1 of 2 failed: RuntimeError: "
                                    "the data server went away"), ranks
    assert [ranks[rank]["resumed"][1] for rank in (0, 1)] == ["ok, 6 rows"] * 2, ranks
    rows = runner.read_rows(tmp_path / "fails" / "r.csv")
    reference = _reference(tmp_path)
    assert [r[:4] for r in rows] == [r[:4] for r in reference]  # every image once, in order
    torch.testing.assert_close([r[4] for r in rows], [r[4] for r in reference])


def test_a_killed_rank_is_one_line_on_the_other_and_one_process_resumes_its_run(tmp_path):
    # gloo's own RuntimeError ("Connection closed by peer ... GLHF!") reached the caller.
    ranks = _in_a_group(tmp_path, "killed")
    assert "killed" not in ranks[1]  # it was
    outcome = ranks[0]["killed"][1]  # a rank that waited past TIMEOUT_S has no outcome
    assert outcome.startswith("PullbackWidgetsError: a process of the run stopped"), outcome
    parts = tmp_path / "killed" / "r.csv.parts"
    kept = [row for part in parts.glob("*.csv") for row in runner.read_rows(part)]
    assert 0 < len(kept) < 6  # rank 0's images, rank 1's first
    # Resumed in one process (a world of another size): the rows already there are kept.
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    items = [(f"image-{i}", images[i], i % 3) for i in range(6)]
    settings = ev.EvaluationSettings(methods=("gradient",), metrics=("deletion",),
                                     targets="label", image_size=16, steps=4, batch_size=1)
    report = ev.evaluate(items, settings, tmp_path / "killed" / "r.csv", model=_relu6_net(),
                         resume=True, progress=False)
    assert report.images == 6 - len(kept)
    reference = _reference(tmp_path)
    assert [r[:4] for r in report.rows] == [r[:4] for r in reference]
    torch.testing.assert_close([r[4] for r in report.rows], [r[4] for r in reference])
    assert all(row in report.rows for row in kept)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone",
               "--nproc-per-node", "2", "-m", "pullback_widgets.cli", "evaluate", *args]
    return subprocess.run(command, env=rank_environment(), cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


SYNTHETIC = ["--synthetic", "5", "--image-size", "32", "--methods", "gradient", "pullback",
             "--metrics", "mass", "pointing", "--batch-size", "2"]


def _main(*args: str) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return cli.main(["evaluate", *args])
    finally:
        torch.set_num_threads(threads)


def test_torchrun_resumes_a_one_process_run_and_its_ranks_fail_in_one_line(tmp_path):
    one, out = tmp_path / "one.csv", tmp_path / "r.csv"
    assert _main(*SYNTHETIC, "--out", str(one)) == 0
    assert _main(*SYNTHETIC, "--limit", "2", "--out", str(out)) == 0  # two of five images
    done = _torchrun(*SYNTHETIC, "--resume", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows, reference = runner.read_rows(out), runner.read_rows(one)
    assert [r[:4] for r in rows] == [r[:4] for r in reference]  # each image once, in order
    # (float32 sums over batches of other images: the last bits differ)
    torch.testing.assert_close([r[4] for r in rows], [r[4] for r in reference], rtol=1e-5,
                               atol=1e-7)

    # Another run holds the output: rank 0 refuses, and rank 1, which waited for it, said so
    # with gloo's traceback. (torchrun may end rank 1 before it prints its line, once rank 0
    # has ended: one line or two.)
    held = runner.OutputLock(out)
    try:
        done = _torchrun(*SYNTHETIC, "--resume", "--out", str(out))
    finally:
        held.release()
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "pullback-widgets: error:" in line]
    assert 1 <= len(lines) <= 2, done.stderr[-3000:]
    assert all("another run is writing" in line for line in lines), lines
    assert "[rank1]: Traceback" not in done.stderr and "[rank0]: Traceback" not in done.stderr
    assert runner.read_rows(out) == rows


def test_a_caller_started_group_keeps_the_gpu_each_rank_chose(monkeypatch):
    # Without LOCAL_RANK (init_method="tcp://...", mp.spawn), every rank was put on GPU 0,
    # undoing the caller's torch.cuda.set_device(rank): NCCL refuses two ranks on one GPU, and
    # a model the caller had placed on its GPU met images on GPU 0.
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    chosen = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    world = runner._join_world()
    assert (world.rank, world.size, world.owned) == (1, 2, False)
    assert world.device == torch.device("cuda", 1)
    assert all(torch.device(device) == torch.device("cuda", 1) for device in chosen)


def _as_reference(path: Path, tmp_path: Path) -> None:
    """The output at ``path`` holds the single-process rows: every image once, in order (the
    values to rounding: the threads of this process may sum in another order)."""
    rows, reference = runner.read_rows(path), _reference(tmp_path)
    assert [r[:4] for r in rows] == [r[:4] for r in reference]
    torch.testing.assert_close([r[4] for r in rows], [r[4] for r in reference])


# Scenarios of a caller that catches whatever evaluate raises (a notebook's Ctrl-C too) and
# calls it again: "NAME-again" resumes the run of "NAME" in the same process group. The group
# waits 120 s at most: a rank left waiting fails then instead of after torch's 30 minutes.
_AGAIN = """
import datetime, errno, os, sys, time, numpy, torch, pullback_widgets.evaluation as ev
from torchvision.utils import save_image
from pullback_widgets.evaluation import runner
from tests.test_evaluation import _relu6_net
rank, port, base, scenarios = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                     rank=rank, world_size=2,
                                     timeout=datetime.timedelta(seconds=120))
images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
ITEMS = [(f"image-{i}", images[i], i % 3) for i in range(6)]
write_rows = runner._write_rows
for scenario in scenarios:
    name, again = scenario.removesuffix("-again"), scenario.endswith("-again")
    folder = os.path.join(base, name.removesuffix("-before"))
    os.makedirs(folder, exist_ok=True)
    os.chdir(folder)
    items, out = list(ITEMS), "r.csv"
    fields = dict(methods=("gradient",), metrics=("deletion",), targets="label",
                  image_size=16, steps=4, batch_size=1)
    runner._write_rows = write_rows
    if name == "full-before":
        items = items[:2]
    elif name == "full" and rank == 0 and not again:  # the disk filled as rank 0 merged

        def full(*args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        runner._write_rows = full
    elif name == "exit" and rank == 1 and not again:  # the caller's loader ends the process

        def leave():
            sys.exit(3)

        items[3] = ("image-3", leave, 0)
    elif name == "interrupted" and rank == 1 and not again:  # Ctrl-C as it listed the images

        def listing():
            yield ITEMS[0]
            raise KeyboardInterrupt

        items = listing()
    elif name == "alike" and rank == 1:  # the same run, other types
        fields.update(methods=["gradient"], metrics=["deletion"])
        items = [ev.Item(n, image, label=numpy.int64(label)) for n, image, label in ITEMS]
        out = os.path.abspath(out)
    elif name == "cwd":  # each rank's own images under the same relative names
        os.makedirs(f"rank{rank}/images", exist_ok=True)
        os.chdir(f"rank{rank}")
        for i in range(6):
            save_image(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(rank)),
                       f"images/image-{i}.png")
        items = [(f"images/image-{i}.png", f"images/image-{i}.png", i % 3) for i in range(6)]
        out = os.path.join(folder, "r.csv")
    started = time.monotonic()
    try:
        ev.evaluate(items, ev.EvaluationSettings(**fields), out, model=_relu6_net(),
                    resume=again or name == "full", progress=False)
        outcome = f"ok, {len(ev.read_rows(out))} rows"  # on every rank, once it returns
    except BaseException as error:
        outcome = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        if os.path.exists(out):
            outcome += f" ({len(ev.read_rows(out))} rows in the output)"
    print(f"{scenario}|{time.monotonic() - started:.1f}|{outcome}", flush=True)
os._exit(0)
"""


def test_a_rank_that_exits_or_is_interrupted_stops_every_rank_and_they_stay_in_step(tmp_path):
    # SystemExit and KeyboardInterrupt (no Exception) left the other ranks' step without
    # them: rank 0 waited at the step's end and met rank 1's next call there (rank 0 took
    # the next call's first meeting for the end of its shard, then failed with a raw
    # ValueError, rank 1 with a TypeError); a caller that went on without calling again left
    # rank 0 waiting 30 minutes.
    ranks = _in_a_group(tmp_path, "exit", "exit-again", "interrupted", "interrupted-again",
                        script=_AGAIN)
    assert ranks[1]["exit"][1] == "SystemExit: 3", ranks
    assert ranks[0]["exit"][1] == "PullbackWidgetsError: rank 1 of 2 failed: SystemExit: 3", \
        ranks
    assert ranks[1]["interrupted"][1] == "KeyboardInterrupt: ", ranks
    assert ranks[0]["interrupted"][1] == ("PullbackWidgetsError: rank 1 of 2 failed: "
                                          "KeyboardInterrupt"), ranks
    for scenario in ("exit-again", "interrupted-again"):
        assert [ranks[rank][scenario][1] for rank in (0, 1)] == ["ok, 6 rows"] * 2, ranks
    _as_reference(tmp_path / "exit" / "r.csv", tmp_path)


def test_a_merge_that_fails_fails_every_rank_keeps_the_output_and_resumes(tmp_path):
    # Rank 0's disk filled as it wrote the merged output: every rank says so, the output
    # is the one before, the lock is let go (the resume would be "another run is writing").
    ranks = _in_a_group(tmp_path, "full-before", "full", "full-again", script=_AGAIN)
    assert [ranks[rank]["full-before"][1] for rank in (0, 1)] == ["ok, 2 rows"] * 2, ranks
    full = "OSError: [Errno 28] No space left on device"
    assert ranks[0]["full"][1] == f"{full} (2 rows in the output)", ranks
    assert ranks[1]["full"][1] == (f"PullbackWidgetsError: rank 0 of 2 failed: {full} "
                                   "(2 rows in the output)"), ranks
    assert [ranks[rank]["full-again"][1] for rank in (0, 1)] == ["ok, 6 rows"] * 2, ranks
    _as_reference(tmp_path / "full" / "r.csv", tmp_path)


def test_ranks_given_one_run_in_other_types_run_it_and_other_folders_are_refused(tmp_path):
    # Methods as a list, numpy labels, out absolute where rank 0's was relative: one run,
    # refused as "other methods, metrics, items, out". And relative image paths read from
    # another folder on rank 1 (out the same absolute file) were other images under the
    # same names: the merged output mixed them without a word.
    ranks = _in_a_group(tmp_path, "alike", "cwd", script=_AGAIN)
    assert [ranks[rank]["alike"][1] for rank in (0, 1)] == ["ok, 6 rows"] * 2, ranks
    _as_reference(tmp_path / "alike" / "r.csv", tmp_path)
    for rank in (0, 1):
        assert ranks[rank]["cwd"][1].startswith(
            "PullbackWidgetsError: rank 1 of 2 was given other working folder than rank 0"), \
            ranks
    assert not (tmp_path / "cwd" / "r.csv").exists()


def test_one_process_does_no_cross_rank_work(tmp_path, monkeypatch):
    # The comparison of what the ranks were given (a digest of every item) and the look for
    # their parts ran in one process too, where there is no other rank.
    def cross_rank(*args):
        raise AssertionError("cross-rank work in one process")

    for name in ("_run_identity", "_check_same_run", "_check_shares_here"):
        monkeypatch.setattr(runner, name, cross_rank)
    monkeypatch.setattr(torch.distributed, "all_gather_object", cross_rank)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    settings = ev.EvaluationSettings(methods=("gradient",), metrics=("deletion",),
                                     targets="label", image_size=16, steps=4)
    report = ev.evaluate([("a", images[0], 0), ("b", images[1], 1)], settings,
                         tmp_path / "r.csv", model=_relu6_net(), progress=False)
    assert report.images == 2


def _two_ranks(monkeypatch, theirs: object) -> runner._World:
    """A world of two whose all_gather_object hands rank 1's ``theirs`` beside ours."""
    def all_gather_object(gathered, ours):
        gathered[:] = [ours, theirs]

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    return runner._World(0, 2, initialised=True)


def test_a_rank_at_another_meeting_is_out_of_step_not_read_as_its_answer(monkeypatch):
    # A rank that left a call without the others (Ctrl-C between two steps, caught) met them
    # at another point of the run: its identity was read as the end of their shard, their
    # None as its identity (raw AttributeError, ValueError), or worse, nothing was said.
    world = _two_ranks(monkeypatch, ("same run", {"steps": 4}))
    try:
        with world.step("scored"):
            pass
    except runner.PullbackWidgetsError as error:
        assert str(error).startswith("the processes of the run are out of step (rank 1 of 2 "
                                     "is at 'same run', this one at 'scored')"), error
    else:
        raise AssertionError("out of step, unsaid")
    # The caller's own gather met ours
    world = _two_ranks(monkeypatch, [1, 2, 3])
    try:
        world.gather("mine", at="shares")
    except runner.PullbackWidgetsError as error:
        assert "rank 1 of 2 is at [1, 2, 3]" in str(error), error
    else:
        raise AssertionError("out of step, unsaid")


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_a_failed_rank_tells_the_others_whatever_its_error_prints(monkeypatch):
    # An error whose str() raised left the step before telling the others: they waited.
    told = []
    monkeypatch.setattr(torch.distributed, "all_gather_object",
                        lambda gathered, ours: (told.append(ours), gathered.__setitem__(
                            slice(None), [ours, ("checked", None)])))
    world = runner._World(0, 2, initialised=True)
    for error, reason in [(_Unprintable(), "_Unprintable"),
                          (KeyboardInterrupt(), "KeyboardInterrupt"),
                          (SystemExit(3), "SystemExit: 3"),
                          (runner.PullbackWidgetsError("bad\nsecond line"), "bad")]:
        try:
            with world.step("checked"):
                raise error
        except BaseException as raised:  # raised as it was, after telling the others
            assert raised is error
        assert told[-1] == ("checked", reason)


def test_a_rank_whose_parts_rank_0_cannot_see_fails_the_merge(tmp_path):
    # The same --out on each node's own disk names one file everywhere: rank 0 finds only the
    # parts written on its node, and merged without the others' rows.
    out = tmp_path / "r.csv"
    parts = runner._parts_dir(out)
    parts.mkdir()
    runner._write_csv(parts / "a.csv", [("image-0", 0, "gradient", "deletion", 0.5)])
    runner._check_shares_here(out, [["a.csv"], []])
    try:
        runner._check_shares_here(out, [["a.csv"], ["b.csv"]])
    except runner.PullbackWidgetsError as error:
        assert str(error).startswith("rank 1's rows are not where rank 0 merges them"), error
    else:
        raise AssertionError("a rank's rows went missing without a word")


def test_a_group_the_run_starts_waits_for_a_slow_rank_longer_than_torchs_default(monkeypatch):
    # At torch's default (30 min for gloo), a rank whose share took half an hour longer than
    # another's failed the whole run at the meeting after scoring ("stopped answering").
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    started = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **options: started.append((backend, options)))
    world = runner._join_world()
    assert world.owned and started == [("gloo", {"timeout": runner.MEETING_TIMEOUT})]
    assert datetime.timedelta(hours=12) <= runner.MEETING_TIMEOUT
