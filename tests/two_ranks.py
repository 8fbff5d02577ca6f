"""Two ranks of a gloo process group that a script starts itself (init_method="tcp://..."), each
in its own Python process, as a caller of ours would; no torchrun variables in their
environment."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.ports import reserved_port

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240  # the CI host is slow and shared


def rank_environment() -> dict[str, str]:
    """This environment without torchrun's variables, the repository importable, one torch
    thread per process."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def run_two_ranks(script: str, args: list[str], logs: Path) -> list[tuple[int, str]]:
    """Run ``python -c script RANK PORT *args`` as ranks 0 and 1 (the repository importable,
    one torch thread each); per rank, its exit status and its output (stdout and stderr). A rank
    still running after TIMEOUT_S is killed (a negative status)."""
    port = str(reserved_port())  # rank 0's store binds it; no other process may take it first
    env = rank_environment()
    # Each rank's output to a file: a pipe nobody reads while the test waits for the other rank
    # could fill, and the ranks wait for each other.
    files = [logs / f"rank{rank}.log" for rank in (0, 1)]
    processes = []
    try:
        for rank, file in enumerate(files):
            with file.open("w") as output:
                processes.append(subprocess.Popen(
                    [sys.executable, "-c", script, str(rank), port, *args], env=env, cwd=ROOT,
                    stdout=output, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:  # a rank left waiting for the other must not outlive the test
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [(process.returncode, file.read_text()) for process, file in zip(processes, files)]
