"""The dev tools' process helpers (devtools/coder_stack_dev/processes.py), which the benchmark's crash scenario
and the flow tests (through tests/kits/flowkit.py) share to kill and stop their child processes."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any, cast

import pytest
from coder_stack_dev.processes import sigkill, stop_group

from tests.kits import flowkit


def test_sigkill_kills_a_running_process_and_leaves_an_ended_one_alone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    assert sigkill(proc) == -signal.SIGKILL and proc.returncode == -signal.SIGKILL
    ended = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    ended.wait()
    assert sigkill(ended) == 3


class _Unkillable:
    """A process that does not end within the wait after SIGKILL (stuck in the kernel), then does."""

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.signals: list[str] = []

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(signal.Signals(sig).name)

    def kill(self) -> None:
        self.signals.append("kill")

    def wait(self, timeout: float | None = None) -> int:
        if timeout is not None:
            raise subprocess.TimeoutExpired("victim", timeout)
        self.returncode = -signal.SIGKILL
        return self.returncode


def test_sigkill_kills_again_and_reaps_a_process_that_outlives_the_wait_then_says_so() -> None:
    proc = _Unkillable()
    with pytest.raises(subprocess.TimeoutExpired):
        sigkill(cast(Any, proc), wait_s=0.1)
    assert proc.signals == ["SIGKILL", "kill"] and proc.returncode == -signal.SIGKILL


def test_the_flow_tests_use_the_dev_tools_helpers() -> None:
    assert flowkit.sigkill is sigkill and flowkit.stop_group is stop_group
