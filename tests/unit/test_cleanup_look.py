"""The crash clean-up's look at a silent run starts after the newest heartbeat the server has received.

The server's clock, read from its Date header, is in whole seconds and runs behind under load; it can read earlier
than the receipt of the very heartbeat that made the run look silent. That heartbeat must not count as one that came
after the look ("alive; nothing done" for a dead run)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest

import coder_stack.flows.cleanup as cleanup
from coder_stack.orchestration.liveness import SILENT_AFTER_S, RunLiveness


async def test_a_silent_runs_look_starts_after_its_newest_received_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    server_clock = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)
    received = server_clock + timedelta(seconds=1.6)  # the Date header lags the heartbeat's receipt
    marks: list[datetime] = []

    crashed: list[str] = []

    class Client:
        async def set_flow_run_state(self, _run: Any, state: Any, force: bool = False) -> None:
            crashed.append(state.type.value)

    @asynccontextmanager
    async def no_client() -> AsyncIterator[Client]:
        yield Client()

    async def clock(_client: Any) -> datetime:
        return server_clock

    async def after(_run: Any, mark: datetime, _settle: float) -> datetime | None:
        marks.append(mark)
        return received if received > mark else None  # the only heartbeat there is

    monkeypatch.setattr(cleanup, "get_client", no_client)
    monkeypatch.setattr(cleanup, "server_now", clock)
    monkeypatch.setattr(cleanup, "heartbeat_after", after)
    live = RunLiveness(run_id=uuid4(), state="RUNNING", last_received=received, heartbeat_age_s=SILENT_AFTER_S + 30)
    assert live.silent
    verdict = await cleanup._verdict(live, settle_s=40)
    assert marks == [received], "the look must start at the newest receipt, not the lagging server clock"
    assert verdict.dead and crashed == ["CRASHED"], verdict
