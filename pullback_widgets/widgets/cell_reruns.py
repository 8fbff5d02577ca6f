"""Running a notebook cell again closes the explorers its earlier run made.

ipywidgets keeps every open widget alive until it is closed, so an explorer whose cell is run
again would keep its worker thread and its session (the forward's retained graph) until the
kernel restarts: a class re-running one cell a dozen times could fill a Binder's memory. The
front ends that name the cell each run comes from (JupyterLab and Notebook 7: ipykernel hands
IPython a ``cell_id``) let the package tell a re-run from another cell. An explorer is closed
once the same cell, run again, has made a new explorer: a re-run that fails first keeps the old
one. Where no cell is named (a script, a front end that sends no id) nothing is closed here;
``close()`` does it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from typing import Protocol


class _Closable(Protocol):
    def close(self) -> None: ...


_lock = threading.Lock()
# cell id -> (the run that made them, weak references to the explorers it made)
_made: dict[str, tuple[tuple[int, int], list[weakref.ref]]] = {}


def _current_run() -> tuple[str, tuple[int, int]] | None:
    """(the running cell's id, a key for this run of it), or None outside a named cell.

    IPython gives its display hook the running cell's ``ExecutionResult`` (whose ``info``
    carries the cell id) for as long as the cell runs. Not imported here: only a kernel that
    already loaded IPython can be running a cell."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)()
    result = getattr(getattr(shell, "displayhook", None), "exec_result", None)
    cell = getattr(getattr(result, "info", None), "cell_id", None)
    if not isinstance(cell, str) or not cell:
        return None
    # The execution count alone repeats for runs kept out of the history.
    return cell, (id(result), getattr(result, "execution_count", None) or 0)


def close_earlier_runs(explorer: _Closable) -> None:
    """Remember ``explorer`` as made by the running cell, and close what earlier runs of that
    cell made (called once an explorer is fully built)."""
    run = _current_run()
    if run is None:
        return
    cell, key = run
    with _lock:
        made_by, explorers = _made.get(cell, (key, []))
        kept, stale = (explorers, []) if made_by == key else ([], explorers)
        _made[cell] = (key, [*kept, weakref.ref(explorer)])
    for reference in stale:
        earlier = reference()
        if earlier is not None and earlier is not explorer:
            # A failure to tidy up the earlier explorer must not cost the user the new one.
            with contextlib.suppress(Exception):
                earlier.close()
