"""`coder-stack demo` started as a command and stopped by SIGTERM or SIGINT at each of its stages: nothing it
started (the Prefect server and its children, the simulated cluster) outlives it, and it exits with the code the
signal calls for.

The stages, in the order the demo goes through them: the Prefect server starting (``1/4``), the simulated cluster
starting (``2/4``), the ``tag:gpu`` limit being created (the sim is up: its kubeconfig is written, ``3/4`` not yet
printed), the validate flow running (``4/4``), the flow done and the demo winding down (the flow run's
``Finished in state`` line: log drain, sim stop, report), and ``--keep-ui``'s wait. Each (signal, stage) is its own
demo process; they are independent, so they run side by side (a few at a time, in one shared fixture,
``runs``) and each case checks its own.

Survivors are found three ways: every descendant of the demo seen while it ran (the process tree sampled from
/proc until it exits); any process whose environment carries the demo's own PREFECT_HOME (an orphaned server keeps
that environment); and, since this process is made a child subreaper for the run, every process any demo left
behind is re-parented here rather than to init, so whatever is still our descendant after the demos exited is a
survivor, however short-lived its parent was."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CLI = Path(sys.executable).with_name("coder-stack")
RUN_S = 300  # every case to its end, all at once on a loaded 2-core machine
# The fixture may take RUN_S, then up to 30 s for the last processes to be reaped: past pytest's 300 s default, so a
# demo that does not end fails its own case with its output rather than every case with a timeout.
pytestmark = pytest.mark.timeout(RUN_S + 120)
PR_SET_CHILD_SUBREAPER = 36
CONCURRENT = 4  # demos at a time: each starts a Prefect server; more only slows them all on 2 cores
SAMPLE_S = 0.02  # how often the process tree is sampled (the subreaper catches what a sample misses)


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


def descendants(root: int, tree: dict[int, list[int]] | None = None) -> set[int]:
    tree, seen, todo = tree if tree is not None else _children(), set(), [root]
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


def _flow_finished(line: str) -> bool:
    return "Flow run '" in line and "Finished in state" in line


@dataclass(frozen=True)
class Stage:
    name: str
    keep_ui: bool = False
    line: Callable[[str], bool] | None = None  # the output line that opens the stage ...
    file: str | None = None  # ... or the file (under --home) whose appearance does


STAGES = [
    Stage("server-starting", line=lambda s: "1/4" in s),  # a signal in Popen is held until Popen returned
    Stage("sim-starting", line=lambda s: "2/4" in s),
    Stage("gpu-limit", file="sim.kubeconfig"),  # the sim is up; the flow modules load, tag:gpu is created
    Stage("flow", line=lambda s: "4/4" in s),
    Stage("after-flow", line=_flow_finished),  # draining the run's logs, stopping the sim, the report
    Stage("keep-ui", keep_ui=True, line=lambda s: "Ctrl-C to stop the server" in s),
]
SIGNALS = [signal.SIGTERM, signal.SIGINT]
UNATTRIBUTED: set[int] = set()  # left behind by some demo (re-parented here), named by no case's checks
CASES = {f"{sig.name[3:]}-{stage.name}": (sig, stage) for stage in STAGES for sig in SIGNALS}


@dataclass
class Run:
    sig: signal.Signals
    stage: Stage
    home: Path
    proc: subprocess.Popen[bytes]
    output: list[str] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)  # every descendant sampled while the demo ran
    seen_at_signal: set[int] = field(default_factory=set)
    signalled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    rc: int | None = None
    survivors: set[int] = field(default_factory=set)

    def signal_once(self) -> None:
        with self.lock:
            if self.signalled.is_set() or self.proc.poll() is not None:
                return
            self.seen_at_signal = descendants(self.proc.pid)
            self.seen |= self.seen_at_signal
            self.proc.send_signal(self.sig)
            self.signalled.set()

    def read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            self.output.append(line)
            if self.stage.line is not None and self.stage.line(line):
                self.signal_once()

    @property
    def text(self) -> str:
        return "".join(self.output)


def _set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _watch(runs: dict[str, Run], done: threading.Event) -> None:
    """Sample every running demo's process tree, and open the stages recognised by a file."""
    while not done.is_set():
        tree = _children()
        for run in list(runs.values()):
            if run.proc.poll() is None:
                run.seen |= descendants(run.proc.pid, tree)
            if run.stage.file is not None and (run.home / run.stage.file).exists():
                run.signal_once()
        done.wait(SAMPLE_S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Every case's demo, started at once and run to its end; the processes left behind are in each Run."""
    root = tmp_path_factory.mktemp("demo-signals")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"
    ours_before = descendants(os.getpid())
    _set_subreaper(True)
    started: dict[str, Run] = {}
    done = threading.Event()
    slots = threading.Semaphore(CONCURRENT)
    deadline = time.monotonic() + RUN_S

    def one(case: str) -> None:
        sig, stage = CASES[case]
        home = root / case
        cmd = [str(CLI), "demo", "--home", str(home), *(["--keep-ui"] if stage.keep_ui else [])]
        with slots:
            if time.monotonic() > deadline:
                return
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            run = started[case] = Run(sig, stage, home, proc)
            # Read in a thread of its own: a process the demo left behind holding its stdout would keep the read
            # from ending, and this case must still be judged (its survivor named) instead of the fixture hanging.
            threading.Thread(target=run.read, daemon=True).start()
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    try:
        # the longest cases first, so that the short ones fill the gaps
        order = sorted(CASES, key=lambda c: -STAGES.index(CASES[c][1]))
        workers = [threading.Thread(target=one, args=(case,), daemon=True) for case in order]
        for worker in workers:
            worker.start()
        watcher = threading.Thread(target=_watch, args=(started, done), daemon=True)
        watcher.start()
        for worker in workers:
            worker.join(timeout=max(0.1, deadline - time.monotonic()))
        done.set()
        watcher.join()
        # The demos waited for what they stopped; a process killed just now may take a moment to be reaped.
        left_here = descendants(os.getpid()) - ours_before - {run.proc.pid for run in started.values()}
        gone_by = time.monotonic() + 30
        while time.monotonic() < gone_by:
            for run in started.values():
                run.survivors = {p for p in run.seen | with_home(run.home) if alive(p)}
            UNATTRIBUTED.clear()
            UNATTRIBUTED.update(p for p in left_here if alive(p))
            UNATTRIBUTED.difference_update(*(run.survivors for run in started.values()))
            if not UNATTRIBUTED and not any(run.survivors for run in started.values()):
                break
            done.wait(0.2)
        yield started
    finally:
        done.set()
        left = descendants(os.getpid()) - ours_before
        for run in started.values():
            left |= run.seen | with_home(run.home) | {run.proc.pid}
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for run in started.values():
            run.proc.wait()
        _set_subreaper(False)
        for pid in descendants(os.getpid()) - ours_before:  # orphans re-parented here: reap them
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


@pytest.mark.parametrize("case", list(CASES))
def test_demo_stopped_by_a_signal_leaves_no_process_behind(case: str, runs: dict[str, Run]) -> None:
    assert case in runs, f"the case did not start within {RUN_S} s"
    run = runs[case]
    assert run.signalled.is_set(), f"the demo never reached {run.stage.name!r} (exit {run.rc}):\n{run.text}"
    assert run.rc is not None, f"the demo did not end within {RUN_S} s after {run.sig.name}:\n{run.text}"
    if run.stage.name != "server-starting":
        assert run.seen_at_signal, "the demo had started no process when signalled: this case would prove nothing"
    assert run.survivors == set(), f"left running after {run.sig.name} at {run.stage.name!r}: {run.survivors}"
    if run.stage.keep_ui:
        assert run.rc == 0, run.text  # Ctrl-C (or SIGTERM) is how --keep-ui's wait is meant to end
    else:
        assert run.rc == 128 + run.sig, run.text
        assert f"demo stopped by {run.sig.name}" in run.text, run.text


def test_no_demo_left_a_process_no_case_accounts_for(runs: dict[str, Run]) -> None:
    assert set() == UNATTRIBUTED, {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in UNATTRIBUTED if alive(p)}
