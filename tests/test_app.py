"""The classroom app (pullback_widgets.app): argument errors, and a real Voilà server that
serves the classroom notebook and stops cleanly, with all its processes, on Ctrl-C or SIGTERM.

The server tests run ``serve_classroom`` in a child Python process (as the console script
will), on a free port of 127.0.0.1, with Jupyter's per-user directories in tmp_path. Their time
limits only stop a hang: they are well above what a loaded 2-core CI machine takes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pullback_widgets import app
from tests.ports import reserved_port

# Above the app's own limit for Voilà to listen, which starts only once the child has
# imported the package (torch with it): at 120 s, the same as the app's, the test would give
# up first on a machine slow enough to need the app's whole limit.
START_TIMEOUT_S = app.START_TIMEOUT_S + 120
PAGE_TIMEOUT_S = 600  # GET / runs the whole classroom notebook before it answers
# Above the app's own worst case: 15 s for Voilà, then 5 s for its kernels.
STOP_TIMEOUT_S = 60


# --------------------------------------------------------------------------- argument errors


def test_default_notebook_is_the_classroom_notebook_inside_the_package():
    path = app.default_notebook()
    assert path.name == "05_classroom.ipynb"
    assert path.is_file()
    assert path.parent.parent == Path(app.__file__).parent  # package data, found from anywhere
    # notebooks/ shows it with the tutorials through a link: one copy, nothing to drift.
    tutorial = Path(__file__).resolve().parents[1] / "notebooks" / "05_classroom.ipynb"
    assert tutorial.read_bytes() == path.read_bytes()
    if tutorial.is_symlink():  # a checkout; an unpacked sdist holds a copy made at build time
        assert tutorial.resolve() == path.resolve()


def test_missing_default_notebook_asks_for_a_path(monkeypatch, tmp_path):
    monkeypatch.setattr(app, "default_notebook", lambda: tmp_path / "05_classroom.ipynb")
    with pytest.raises(ValueError, match="pass its path"):
        app.serve_classroom()


def test_missing_notebook_path(tmp_path):
    with pytest.raises(ValueError, match="notebook not found"):
        app.serve_classroom(tmp_path / "nope.ipynb")


def test_not_a_notebook(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"\.ipynb"):
        app.serve_classroom(path)


@pytest.mark.parametrize("port", [0, 70000, -1])
def test_bad_port(port):
    with pytest.raises(ValueError, match="port"):
        app.serve_classroom(port=port)


def test_port_in_use():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ValueError, match="already in use"):
            app.serve_classroom(port=busy.getsockname()[1])


def test_voila_missing_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "voila" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(app.VoilaNotInstalledError, match=r"pip install 'pullback-widgets\[lab\]'"):
        app.serve_classroom(port=reserved_port())


def test_command_line_errors_are_one_line(capsys, tmp_path):
    assert app.main([str(tmp_path / "nope.ipynb")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pullback-widgets app: error: notebook not found")
    assert err.count("\n") == 1


def test_voila_command_binds_loopback_on_the_given_port(tmp_path):
    command = app.voila_command(tmp_path / "x.ipynb", 9123)
    assert command[:3] == [sys.executable, "-m", "voila"]
    assert "--port=9123" in command and "--Voila.ip=127.0.0.1" in command
    assert "--no-browser" in command and "--Voila.port_retries=0" in command


# --------------------------------------------------------------------------- a real server


class _Served:
    """``serve_classroom`` running in a child Python process; its output read by a thread."""

    def __init__(self, workdir: Path, port: int, code: str | None = None) -> None:
        if code is None and importlib.util.find_spec("voila") is None:
            pytest.fail("the app tests need Voilà: pip install -e '.[lab]'")
        if code is None:
            code = ("import sys\nfrom pullback_widgets.app import serve_classroom\n"
                    f"sys.exit(serve_classroom(port={port}))\n")
        self.port = port
        self.url = f"http://127.0.0.1:{port}/"
        env = dict(os.environ)
        # Voilà writes a signing key and connection files; keep them out of the home directory.
        for name in ("config", "data", "runtime", "ipython"):
            (workdir / name).mkdir(parents=True, exist_ok=True)
        env.update(JUPYTER_CONFIG_DIR=str(workdir / "config"),
                   JUPYTER_DATA_DIR=str(workdir / "data"),
                   JUPYTER_RUNTIME_DIR=str(workdir / "runtime"),
                   IPYTHONDIR=str(workdir / "ipython"), PYTHONUNBUFFERED="1")
        # As in test_notebooks: one torch thread keeps the page's kernel steady on a busy host.
        env.setdefault("OMP_NUM_THREADS", "1")
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.seen: list = []  # every descendant ever listed, for the teardown
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            self._queue.put(line)

    @property
    def log(self) -> str:
        return "".join(self.lines[-80:])

    def wait_for_url(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if self.url in line and "running at" in line:
                return
        pytest.fail(f"no URL printed within {timeout_s} s; output:\n{self.log}")

    def descendants(self) -> list:
        import psutil  # comes with ipykernel

        found = psutil.Process(self.process.pid).children(recursive=True)
        self.seen += found
        return found

    def close(self) -> None:
        """Teardown: whatever the test did, leave no process of ours behind."""
        if self.process.poll() is None:
            self._descendants_or_empty()
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)
        for process in self.seen:  # psutil refuses to signal a pid that was reused
            with contextlib.suppress(Exception):
                process.kill()

    def _descendants_or_empty(self) -> list:
        try:
            return self.descendants()
        except Exception:
            return []


@pytest.fixture
def served(tmp_path):
    server = _Served(tmp_path, reserved_port())
    yield server
    server.close()


def _gone(processes) -> bool:
    import psutil

    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def _wait_gone(processes, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not _gone(processes):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _get(url: str, timeout_s: float) -> tuple[int, str]:
    # No proxy: an http_proxy in the environment must not intercept loopback requests.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout_s) as response:
        return response.status, response.read().decode("utf-8", "replace")


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_serves_the_classroom_and_stops_on_ctrl_c(served):
    served.wait_for_url()
    status, page = _get(served.url, PAGE_TIMEOUT_S)
    assert status == 200
    assert "Classroom: excitation pullbacks in six questions" in page
    assert "There was an error when executing cell" not in page, page[-3000:]
    assert page.count("application/vnd.jupyter.widget-view+json") >= 5  # the exercises
    processes = served.descendants()
    commands = [" ".join(p.cmdline()) for p in processes]
    assert any("-m voila" in c for c in commands), commands
    assert any("ipykernel" in c for c in commands), commands  # the page's kernel

    served.process.send_signal(signal.SIGINT)
    assert served.process.wait(STOP_TIMEOUT_S) == 0, served.log
    assert _wait_gone(processes), f"left running: {commands}"
    assert not _listening(served.port)
    # The whole output: a kernel's shutdown noise can push the line out of the short log.
    assert "Stopping the classroom app" in "".join(served.lines)


def test_sigterm_stops_voila_too(served):
    served.wait_for_url()
    processes = served.descendants()
    assert processes
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(STOP_TIMEOUT_S) == 0, served.log
    assert _wait_gone(processes), [p.pid for p in processes]



# Stands in for a Voilà that ignores SIGTERM and whose kernel is in a session of its own, as
# jupyter_client starts kernels: the app must kill the one and then reap the other.
STUBBORN_VOILA = """
import signal, socket, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
kernel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                          start_new_session=True)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", {port}))
server.listen()
time.sleep(600)
"""


def test_a_stuck_voila_is_killed_and_its_kernel_reaped(tmp_path):
    port = reserved_port()
    stub = STUBBORN_VOILA.format(port=port)
    code = f"""
import sys
from pullback_widgets import app
app.STOP_GRACE_S = 1.0
app._check_voila = lambda: None
app.voila_command = lambda notebook, port: [sys.executable, "-c", {stub!r}]
sys.exit(app.serve_classroom(port={port}))
"""
    server = _Served(tmp_path, port, code)
    try:
        server.wait_for_url()
        deadline = time.monotonic() + 30
        while len(processes := server.descendants()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # the stand-in starts its kernel right away
        assert len(processes) == 2, processes
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(STOP_TIMEOUT_S) == 0, server.log
        assert _wait_gone(processes), [p.pid for p in processes]
    finally:
        server.close()
