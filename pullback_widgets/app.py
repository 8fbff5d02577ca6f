"""``pullback-widgets app``: the classroom notebook served as a web app by Voilà, on localhost.

Voilà runs as a child process in its own session, so a Ctrl-C in the terminal reaches only us;
we then stop Voilà ourselves (SIGTERM, which makes it shut its kernels down; SIGKILL if it
lingers, and then any kernel it left behind) and return 0. SIGTERM and SIGHUP sent to us take
the same path, so that closing the terminal or ``kill <pid>`` never leaves a server behind.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import webbrowser
from importlib import resources
from pathlib import Path

from .validation import PullbackWidgetsError, PullbackWidgetsTypeError, check_index

__all__ = ["DEFAULT_PORT", "VoilaNotInstalledError", "default_notebook", "serve_classroom"]

DEFAULT_PORT = 8866
HOST = "127.0.0.1"
CLASSROOM_NOTEBOOK = "05_classroom.ipynb"
# Voilà imports Jupyter Server and Tornado before it listens; on a slow CI machine that alone
# takes several seconds.
START_TIMEOUT_S = 120.0
# Voilà's own shutdown gives each kernel a few seconds to exit; on a busy machine it takes longer.
STOP_GRACE_S = 15.0
KERNEL_GRACE_S = 5.0


class VoilaNotInstalledError(PullbackWidgetsError, RuntimeError):
    """Voilà, which serves the app, is not installed in this Python environment (a user error:
    the message says what to install)."""


def default_notebook() -> Path:
    """The classroom notebook, shipped inside the package as package data.

    A package installed from a wheel or a checkout is a folder on disk, so this is a real file
    that Voilà can serve, whatever the working directory.
    """
    return Path(str(resources.files(__package__) / "notebooks" / CLASSROOM_NOTEBOOK))


def _check_notebook(notebook: Path | str | None) -> Path:
    if notebook is None:
        path = default_notebook()
        if not path.is_file():
            raise PullbackWidgetsError(
                f"the classroom notebook is missing from the installed package ({path}); "
                "reinstall pullback-widgets, or pass its path: "
                "pullback-widgets app PATH/TO/05_classroom.ipynb")
        return path
    if not isinstance(notebook, (str, os.PathLike)):
        raise PullbackWidgetsTypeError(
            f"notebook must be a path to a .ipynb file, got {type(notebook).__name__}")
    try:
        path = Path(notebook).expanduser()
    except RuntimeError:  # "~nosuchuser/...": a shell leaves it as written, and so do we
        path = Path(notebook)
    try:
        found = path.is_file()
    except OSError as error:  # is_file() passes on all but "no such file": a name too long
        raise PullbackWidgetsError(f"cannot read notebook {str(path)!r}: "
                                   f"{error.strerror or error}") from None
    if not found:
        raise PullbackWidgetsError(f"notebook not found: {str(path)!r}")
    if path.suffix != ".ipynb":
        raise PullbackWidgetsError(f"expected a Jupyter notebook (.ipynb), got {str(path)!r}")
    return path.resolve()


def _check_port(port: int) -> int:
    port = check_index(port, "port", minimum=1)
    if port > 65535:
        raise PullbackWidgetsError(f"port must be in 1..65535, got {port}")
    # Voilà would quietly move to a neighbouring port and we would print the wrong URL, so a
    # taken port is an error here (and Voilà gets port_retries=0).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As Tornado does, or the TIME_WAIT left by a server stopped a moment ago would count
        # as "in use" here although Voilà could bind the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise PullbackWidgetsError(f"port {port} is already in use; choose another "
                                           "with --port") from None
            raise PullbackWidgetsError(f"cannot listen on port {port}: "
                                       f"{error.strerror or error}") from None
    return port


def _check_voila() -> None:
    if importlib.util.find_spec("voila") is None:
        raise VoilaNotInstalledError(
            "the classroom app needs Voilà, which is not installed: "
            "pip install 'pullback-widgets[lab]'")


def voila_command(notebook: Path, port: int) -> list[str]:
    """The command line that serves ``notebook`` on 127.0.0.1:``port``."""
    return [sys.executable, "-m", "voila", str(notebook), "--no-browser", f"--port={port}",
            f"--Voila.ip={HOST}", "--Voila.port_retries=0",
            # Notebook 7 (in the lab extra) puts its own page extension where Voilà 0.5 looks;
            # built for a newer JupyterLab, it fails to load there (RUNTIME-012 in the console).
            "--VoilaConfiguration.extension_denylist=@jupyter-notebook/lab-extension"]


def _listening(port: int) -> bool:
    # A bare TCP connect: an HTTP GET of "/" would start a kernel and run the whole notebook.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((HOST, port)) == 0


def _descendants(pid: int) -> list:
    """psutil handles of ``pid``'s descendants (Voilà's kernels), or [] without psutil.

    psutil comes with ipykernel, so wherever Voilà can run a Python kernel it is there.
    """
    try:
        import psutil
    except ImportError:
        return []
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _reap(processes: list) -> None:
    """Kill whichever of ``processes`` still run after a short grace.

    Voilà stops its kernels itself on SIGTERM; one still running now (because Voilà was killed,
    or gave up on it) would be an orphan nobody stops. The handles were taken while Voilà was
    alive, and psutil checks a pid was not reused before it signals it.
    """
    if not processes:
        return
    import psutil

    def running(process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + KERNEL_GRACE_S
    try:
        while any(running(p) for p in processes) and time.monotonic() < deadline:
            time.sleep(0.1)
    except KeyboardInterrupt:  # one more Ctrl-C, or the terminal closed (SIGHUP): kill now
        pass
    for process in processes:
        if running(process):
            with contextlib.suppress(psutil.Error):
                process.kill()


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is not None:
        return
    kernels = _descendants(child.pid)
    child.terminate()
    try:
        child.wait(STOP_GRACE_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C means "now"
        child.kill()
        child.wait()
    _reap(kernels)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_classroom(notebook: Path | str | None = None, port: int = DEFAULT_PORT,
                    open_browser: bool = False) -> int:
    """Serve ``notebook`` (default: the classroom notebook) with Voilà on 127.0.0.1:``port``.

    Prints the URL once Voilà is listening and blocks until Ctrl-C, then stops Voilà and its
    kernels and returns 0. If Voilà exits by itself, returns its exit status.

    Raises:
        PullbackWidgetsError (a ValueError): the notebook is missing (or the default one is not
            next to the package), or the port is invalid, in use or not ours to listen on.
        VoilaNotInstalledError (a PullbackWidgetsError): Voilà is not installed.
    """
    path = _check_notebook(notebook)
    port = _check_port(port)
    _check_voila()
    url = f"http://{HOST}:{port}/"

    # SIGTERM and SIGHUP would kill Python without running the finally below, leaving Voilà
    # running; as KeyboardInterrupt they stop it first. Only the main thread may set handlers.
    handled = (signal.SIGTERM, signal.SIGHUP) if hasattr(signal, "SIGHUP") else (signal.SIGTERM,)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _interrupt) for sig in handled} if main_thread else {}
    child: subprocess.Popen | None = None
    try:
        print(f"Starting Voilà on {path.name} …", flush=True)
        child = subprocess.Popen(voila_command(path, port), stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _listening(port):
            if child.poll() is not None:
                print(f"Voilà exited with status {child.returncode} before serving",
                      file=sys.stderr, flush=True)
                return child.returncode or 1
            if time.monotonic() > deadline:
                print(f"Voilà did not start listening on port {port} within "
                      f"{START_TIMEOUT_S:.0f} s", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.2)
        print(f"\nThe classroom app is running at {url}\nPress Ctrl-C to stop it.\n", flush=True)
        if open_browser:
            webbrowser.open(url)
        return child.wait()
    except KeyboardInterrupt:
        print("\nStopping the classroom app …", flush=True)
        return 0
    finally:
        if child is not None:
            _stop(child)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """``python -m pullback_widgets.app [NOTEBOOK] [--port N] [--open]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pullback_widgets.app",
                                     description="Serve the classroom notebook with Voilà.")
    parser.add_argument("notebook", nargs="?", type=Path, default=None,
                        help="the notebook to serve (default: the classroom notebook)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port on 127.0.0.1 (default {DEFAULT_PORT})")
    parser.add_argument("--open", action="store_true", help="open it in a web browser")
    args = parser.parse_args(argv)
    try:
        return serve_classroom(args.notebook, port=args.port, open_browser=args.open)
    except PullbackWidgetsError as error:  # anything else is a bug: let it show its traceback
        print(f"pullback-widgets app: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
