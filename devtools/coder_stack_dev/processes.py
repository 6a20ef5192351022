"""Stopping the child processes the benchmark and the tests start (flow processes, workers, victims): one way
to end a process group politely, one way to kill a process outright, shared by both."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
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


def die_with_parent() -> None:
    """A ``preexec_fn``: in the child, the kernel SIGKILLs it when the process that started it dies, however it
    dies (``PR_SET_PDEATHSIG``): a server a test or the benchmark starts never outlives them."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
