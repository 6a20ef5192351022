"""`coder-stack demo` started as a command and stopped by SIGTERM or SIGINT at the stages it prints: nothing it
started (the Prefect server and its children, the simulated cluster) outlives it, in the middle of the demo and in
`--keep-ui`'s wait alike.

Survivors are found two ways: every descendant of the demo seen while it ran (polled from /proc until it exits),
and, after it exits, any process whose environment carries the demo's own PREFECT_HOME (an orphaned server is
re-parented away from the demo, but keeps that environment)."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

CLI = Path(sys.executable).with_name("coder-stack")
STARTUP_S = 240  # a loaded 2-core machine: the Prefect server alone can take 30 s


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(root: int) -> set[int]:
    tree, seen, todo = _children(), set(), [root]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def with_home(home: Path) -> set[int]:
    """Live processes whose environment names the demo's Prefect home."""
    marker = f"PREFECT_HOME={home / 'prefect'}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0") and alive(int(entry)):
                    found.add(int(entry))
    return found


@pytest.mark.parametrize(
    ("sig", "stage", "keep_ui"),
    [
        (signal.SIGTERM, "1/4", False),  # while the server starts: held until Popen returned, then stopped
        (signal.SIGINT, "2/4", False),  # the server up, the sim starting
        (signal.SIGTERM, "4/4", False),  # the validate flow running
        (signal.SIGTERM, "Ctrl-C to stop the server", True),  # --keep-ui's wait
    ],
    ids=["TERM-server-starting", "INT-sim-starting", "TERM-flow", "TERM-keep-ui"],
)
def test_demo_stopped_by_a_signal_leaves_no_process_behind(
    sig: signal.Signals, stage: str, keep_ui: bool, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"
    cmd = [str(CLI), "demo", "--home", str(home), *(["--keep-ui"] if keep_ui else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw.decode(errors="replace"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    output: list[str] = []
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"the demo ended before {stage!r}:\n{''.join(output)}"
            output.append(line)
            if stage in line:
                break
        seen |= descendants(proc.pid)
        if stage != "1/4":
            assert seen, "the demo had started no process: this case would prove nothing"
        proc.send_signal(sig)
        while proc.poll() is None:  # every process the demo has until it exits
            seen |= descendants(proc.pid)
        rc = proc.wait()
        while (line := lines.get(timeout=30)) is not None:
            output.append(line)
        text = "".join(output)
        gone_by = time.monotonic() + 30  # the demo waited for them; a killed process may take a moment to be reaped
        survivors = {p for p in seen if alive(p)} | with_home(home)
        while survivors and time.monotonic() < gone_by:
            survivors = {p for p in survivors if alive(p)}
        assert survivors == set(), f"left running after {sig.name} at {stage!r}: {survivors}\n{text}"
        if keep_ui:
            assert rc == 0, text  # Ctrl-C (or SIGTERM) is how --keep-ui's wait is meant to end
        else:
            assert rc == 128 + sig, text
            assert f"demo stopped by {sig.name}" in text, text
    finally:
        for pid in seen | with_home(home) | {proc.pid}:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
