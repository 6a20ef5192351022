"""The cold-start progress artifact (``cold-start-<model>``) a user watches in the Prefect UI: its final "Ready"
state is written before the flow run ends, yet the flow goes on the moment the model is Ready — the write is a
round trip to the Prefect API and is issued in the background — and a failure to write it never fails a run.

Each test runs ``wait_model_ready_task`` in a flow of its own, inside the guard every product flow runs in
(``flows/guard.py``), on a simulated cluster whose coder-chat cold-starts in about a second."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.context import FlowRunContext
from simstack.stack import SimStack

import coder_stack.flows.guard as guard
import coder_stack.tasks.cluster as cluster_tasks
from coder_stack.flows.guard import guarded
from coder_stack.report import RunReport
from coder_stack.tasks.cluster import scale_task, wait_model_ready_task
from tests.kits.flowkit import conn

CHAT = "coder-chat"
KEY = f"cold-start-{CHAT}"


async def _cold_start(sim: SimStack, order: list[str], body_done: Callable[[], None] = lambda: None) -> UUID:
    """A flow that cold-starts coder-chat, waits until it is Ready and scales it back to 0, noting in ``order`` when
    the wait returned ("flow went on") and when the guard had ended ("guard left"); ``body_done`` is called once
    the body is done. Returns the flow run's id."""

    @flow(name="progress-artifact-test")
    async def cold_start() -> UUID:
        ctx = FlowRunContext.get()
        assert ctx is not None and ctx.flow_run is not None
        report = RunReport(flow="progress-artifact-test")
        spec, target = await conn(sim).resolve()
        [m] = [m for m in spec.models if m.name == CHAT]
        async with guarded(report, "progress-artifact-test", "progress-artifact-test", None):
            try:
                await scale_task(target, spec, m, 1)
                await wait_model_ready_task(target, spec, m)
                order.append("flow went on")
            finally:
                await scale_task(target, spec, m, 0)
                body_done()
        order.append("guard left")
        return ctx.flow_run.id

    return await cold_start()


async def _progress(run_id: UUID) -> list[tuple[float, str]]:
    """The run's cold-start artifacts (one per cold start, updated in place): (progress %, description)."""
    async with get_client() as client:
        arts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), key=ArtifactFilterKey(any_=[KEY])
            )
        )
    return [(float(a.data), a.description or "") for a in arts]  # type: ignore[arg-type]


async def test_the_final_ready_state_is_written_off_the_critical_path_and_before_the_run_ends(
    make_sim: Callable[..., SimStack], prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final write is held until the flow's body is done: the flow is not held by it, the guard every flow
    runs in waits for it, and the artifact reads 100 % "Ready" once the run has ended."""
    sim = make_sim()
    real = cluster_tasks.aupdate_progress_artifact
    order: list[str] = []
    gone_on = asyncio.Event()

    async def update(artifact_id: UUID, progress: float, description: str | None = None, **kw: Any) -> UUID:
        if progress == 100.0:
            order.append("final write issued")
            # held until the flow went on; bounded, so a write on the critical path fails the order below, not hangs
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone_on.wait(), timeout=10)
            out = await real(artifact_id, progress=progress, description=description, **kw)
            order.append("final write done")
            return out
        return await real(artifact_id, progress=progress, description=description, **kw)

    publish = guard.publish

    async def published(report: RunReport, key: str) -> None:
        order.append("report published")  # the run's last write, at the guard's end
        await publish(report, key)

    monkeypatch.setattr(cluster_tasks, "aupdate_progress_artifact", update)
    monkeypatch.setattr(guard, "publish", published)
    run_id = await _cold_start(sim, order, body_done=gone_on.set)
    # issued at Ready; the flow went on (and scaled coder-chat down) while it was held; the guard waited for it
    assert order == ["final write issued", "flow went on", "final write done", "report published", "guard left"], order
    [(progress, description)] = await _progress(run_id)
    assert progress == 100.0 and description.startswith("pod coder-chat-") and description.endswith("is Ready")


async def test_a_failed_final_write_is_logged_and_the_run_passes(
    make_sim: Callable[..., SimStack],
    prefect_api: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sim = make_sim()
    real = cluster_tasks.aupdate_progress_artifact
    failed: list[float] = []

    async def update(artifact_id: UUID, progress: float, description: str | None = None, **kw: Any) -> UUID:
        if progress == 100.0:
            failed.append(progress)
            raise httpx.ConnectError("the Prefect API is unreachable")
        return await real(artifact_id, progress=progress, description=description, **kw)

    monkeypatch.setattr(cluster_tasks, "aupdate_progress_artifact", update)
    order: list[str] = []
    caplog.set_level(logging.WARNING)
    run_id = await _cold_start(sim, order)
    assert failed == [100.0] and order == ["flow went on", "guard left"], (failed, order)
    assert any(
        "Could not update the cold-start progress artifact (ConnectError" in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    [(progress, _)] = await _progress(run_id)
    assert progress < 100.0  # the last write that reached the API: the UI shows where the cold start was
