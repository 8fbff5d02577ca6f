"""Running a cell again closes the explorers its earlier run made (a real IPython shell, cells
named as JupyterLab's ipykernel names them), and nothing else."""

import gc
import weakref

import pytest
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

import pullback_widgets as pw
from tests.conftest import LABELS


@pytest.fixture
def shell(net, tmp_path, monkeypatch):
    # Its profile in tmp_path and its history in memory: a shell writes both to the home
    # folder by default (shared with every other run as this user), and a history file
    # keeps a saving thread of its own running until the interpreter exits.
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    shell = InteractiveShell.instance(
        config=Config({"HistoryManager": {"hist_file": ":memory:"}}))
    shell.user_ns.update(pw=pw, net=net, LABELS=LABELS, made=[])
    yield shell
    for explorer in shell.user_ns["made"]:
        explorer.close()
    InteractiveShell.clear_instance()


def _run(shell, code: str, cell_id: str | None) -> None:
    result = shell.run_cell(code, store_history=True, cell_id=cell_id)
    result.raise_error()


PULLBACK = "made.append(pw.PullbackExplorer(net, 'coffee', labels=LABELS, temperature=0.5))"
ASCENT = "made.append(pw.AscentExplorer(net, 'coffee', labels=LABELS, temperature=0.5))"


@pytest.mark.parametrize("make", [PULLBACK, ASCENT])
def test_a_rerun_closes_the_explorer_its_last_run_made(shell, make):
    _run(shell, make, "cell-a")
    first = shell.user_ns["made"][-1]
    _run(shell, make, "cell-b")  # another cell: both stay
    assert not first._closed
    _run(shell, make, "cell-a")
    assert first._closed and not shell.user_ns["made"][-1]._closed
    assert not shell.user_ns["made"][1]._closed  # cell b's
    # Closed, it keeps nothing heavy, and nothing keeps it but the caller's list.
    reference = weakref.ref(first)
    del shell.user_ns["made"][0], first
    gc.collect()
    assert reference() is None


def test_explorers_of_one_run_stay_and_a_failed_rerun_closes_nothing(shell):
    _run(shell, f"{PULLBACK}\n{PULLBACK}", "cell-a")
    first, second = shell.user_ns["made"]
    result = shell.run_cell("pw.PullbackExplorer(net, 'no such photo')", cell_id="cell-a")
    assert isinstance(result.error_in_exec, ValueError)
    assert not first._closed and not second._closed
    _run(shell, PULLBACK, "cell-a")
    assert first._closed and second._closed


def test_without_a_cell_id_nothing_is_closed(shell):
    _run(shell, PULLBACK, None)
    _run(shell, PULLBACK, None)
    assert not any(explorer._closed for explorer in shell.user_ns["made"])


def test_an_earlier_explorer_that_fails_to_close_costs_nothing(shell):
    _run(shell, PULLBACK, "cell-a")
    first = shell.user_ns["made"][0]
    first.close = lambda: (_ for _ in ()).throw(RuntimeError("broken"))
    _run(shell, PULLBACK, "cell-a")  # no error: the new explorer is the user's
    assert not shell.user_ns["made"][1]._closed
    del first.close  # the class's own, for the fixture's tidying up
