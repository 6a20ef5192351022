"""Stopping the child processes the benchmark and the tests start (flow processes, workers, victims): one way
to end a process group politely, one way to kill a process outright, shared by both."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 15) -> None:
    """SIGTERM a process started with ``start_new_session`` and its group; SIGKILL the group after ``grace_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def sigkill(proc: subprocess.Popen[bytes], wait_s: float = 10) -> int | None:
    """SIGKILL ``proc`` if it still runs and wait up to ``wait_s`` for it to end; if it has not, kill it again,
    reap it and let the timeout propagate. Returns its exit code (``-SIGKILL`` when this killed it); does
    nothing to a process that has already ended. Meant for a ``finally:``, so that a failure before the kill
    leaves no process behind either."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGKILL)
        return proc.wait(wait_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
