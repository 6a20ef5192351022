"""A cold start's log says Ready once: the task's line with each phase's time, not also the phase callback's.

Each log line of a flow run goes through Prefect's handlers (the console and the API log worker), and both lines
fell on the moment the model turned Ready, before the task returned."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from coder_stack.kubernetes.wait import PhaseUpdate, ReadyReport
from coder_stack.tasks.cluster import _log_ready, _progress_callback


def _update(phase: str, detail: str, elapsed_s: float) -> PhaseUpdate:
    return PhaseUpdate(
        phase=phase, pod="coder-chat-1", node="gpu-1", elapsed_s=elapsed_s, budget_s=60.0, progress=0.9,
        scale_up_seen=False, detail=detail,
    )  # fmt: skip


async def test_a_cold_start_logs_each_phase_and_ready_once_with_the_phase_times(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("coder-stack-test-ready")
    on_phase = _progress_callback(log, None, "coder-chat")
    now = datetime.now(UTC)
    report = ReadyReport(
        namespace="serving", deployment="coder-chat", pod="coder-chat-1", node="gpu-1", phases=[],
        seconds={"node": 0.0, "image": 30.0, "weights": 150.0, "start": 60.0}, total_s=240.0, scale_up_seen=False,
        already_ready=False, deployment_lag_s=0.01, ready_at=now,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger=log.name):
        for phase, detail, at in (
            ("start", "pod coder-chat-1 on node gpu-1: server starting", 180.0),
            ("ready", "pod coder-chat-1 on node gpu-1 is Ready", 240.0),
        ):
            pending = on_phase(phase, _update(phase, detail, at))
            assert pending is not None  # the task's callback is a coroutine function
            await pending
        _log_ready(log, "coder-chat", report)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "coder-chat: pod coder-chat-1 on node gpu-1: server starting (180s in).",
        "coder-chat is Ready in 240.0s (pod coder-chat-1 on gpu-1): image 30.0s, weights 150.0s, start 60.0s.",
    ], lines
