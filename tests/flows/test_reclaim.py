"""reclaim_idle_models on the simulated stack: an idle model is reclaimed (GPU at 0, pods gone, the stamp on
its Deployment, the artifact); a running request, unreadable metrics, another run holding the GPU or a pod
younger than the grace leave it serving with the reason; a second run changes nothing.

The sim runs time-scaled, so the test specs make ``idle_after_s`` (and the grace) small rather than sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from simstack.stack import SimStack
from simstack.store import Store

from coder_stack.flows.params import Connection
from coder_stack.flows.reclaim import ReclaimOptions, reclaim_idle_models
from coder_stack.orchestration import gpu
from coder_stack.orchestration.gpu import gpu_session
from coder_stack.orchestration.gpu_limit import GPU_LIMIT
from coder_stack.report import RunReport
from coder_stack.spec import StackSpec, spec_yaml
from coder_stack.usecases.idle import ACTIVITY, RECLAIMED_AT, reclaimed_note
from tests.conftest import is_ready, pods_of, scale, wait_for
from tests.kits.flowkit import SERVING, assert_no_gpu_model_running, conn, replicas
from tests.kits.prefect_busy import Busy503

pytestmark = pytest.mark.usefixtures("gpu_limit")

IDLE_AFTER_S = 1.0
CHAT = "coder-chat"


def stack(tmp_path: Path, sim: SimStack, **fields: Any) -> Connection:
    fields.setdefault("idle_after_s", IDLE_AFTER_S)
    fields.setdefault("idle_grace_s", 0.0)
    path = tmp_path / "stack.yaml"
    path.write_text(spec_yaml(StackSpec.model_validate(fields)))
    return conn(sim, stack_file=str(path))


def chat_up(sim: SimStack) -> None:
    scale(sim, SERVING, CHAT, 1)
    wait_for(sim, lambda s: any(is_ready(p) for p in pods_of(s, SERVING, CHAT)), 15, "coder-chat Ready")


def deploy_annotations(sim: SimStack) -> dict[str, str]:
    def _read(store: Store) -> dict[str, str]:
        return dict(store.get("deployments", SERVING, CHAT)["metadata"].get("annotations") or {})

    result: dict[str, str] = sim.call(_read, sim.store)
    return result


async def run(connection: Connection, **options: Any) -> tuple[RunReport, dict[str, Any]]:
    """One reclaim run: its report and its artifacts by key."""
    state = await reclaim_idle_models(options=ReclaimOptions(**options), connection=connection, return_state=True)
    assert state.is_completed(), state
    report: RunReport = await state.aresult()
    async with get_client() as client:
        arts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    return report, {a.key or "": a for a in arts}


def line(report: RunReport) -> Any:
    (only,) = [i for i in report.idle if i.model == CHAT]
    return only


async def assert_left_serving(sim: SimStack, report: RunReport, reason: str) -> None:
    assert replicas(sim)[CHAT] == 1, report.to_markdown()
    assert line(report).action == "left serving" and reason in line(report).reason, report.to_markdown()
    assert RECLAIMED_AT not in deploy_annotations(sim)


# ------------------------------------------------------------------ idle -> reclaimed, then nothing
async def test_an_idle_model_is_reclaimed_and_a_second_run_changes_nothing(
    make_sim: Callable[..., SimStack], tmp_path: Path
) -> None:
    sim = make_sim()
    c = stack(tmp_path, sim)
    chat_up(sim)

    first, _ = await run(c)
    assert first.outcome == "passed: nothing idle", first.to_markdown()
    assert "first reading" in line(first).reason
    reading = json.loads(deploy_annotations(sim)[ACTIVITY])
    assert set(reading) >= {"requests", "since"}

    await asyncio.sleep(IDLE_AFTER_S)
    second, arts = await run(c)
    assert second.outcome == "passed: reclaimed coder-chat", second.to_markdown()
    reclaimed = line(second)
    assert reclaimed.action == "reclaimed" and reclaimed.idle_s is not None and reclaimed.idle_s >= IDLE_AFTER_S
    assert reclaimed.at and reclaimed.bring_back and "coder-stack up" in reclaimed.bring_back
    await assert_no_gpu_model_running(sim)
    kept = deploy_annotations(sim)
    assert RECLAIMED_AT in kept and json.loads(kept[ACTIVITY]) == reading  # the reading it was judged by
    assert "coder-chat" in arts["reclaimed-models"].data and "coder-stack up" in arts["reclaimed-models"].data
    assert "Idle models" in arts["reclaim-report"].data
    note = reclaimed_note(StackSpec(), StackSpec().model(CHAT), kept)
    assert note and "reclaimed at" in note and "coder-stack up" in note

    mark = len(sim.timeline)
    third, arts = await run(c)
    assert third.outcome == "passed: nothing serving", third.to_markdown()
    assert deploy_annotations(sim) == kept and sim.timeline[mark:] == [] and "reclaimed-models" not in arts


# ------------------------------------------------------------------ busy
@contextlib.asynccontextmanager
async def slow_stream(sim: SimStack) -> AsyncIterator[str]:
    """A streamed chat to coder-chat's pod that takes ~10 s (the stand-in's decode time), held open; yields
    the pod's local URL."""
    sim.services.vllm_decode_s = 0.05 / sim.time_scale  # 50 ms per token, real time
    base = sim.backends.resolve_url(StackSpec().service_url(CHAT, SERVING, 8000))
    assert base
    body = {"model": StackSpec().model(CHAT).served_model_name, "stream": True, "max_tokens": 200,
            "messages": [{"role": "user", "content": "Write a long story about GPUs."}]}  # fmt: skip
    headers = {"Authorization": f"Bearer {sim.secrets['vllm_key']}"}
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers) as resp,
    ):
        assert resp.status_code == 200
        first = asyncio.Event()

        async def read() -> None:  # a client reading the stream as it comes
            async for _ in resp.aiter_lines():
                first.set()

        reader = asyncio.create_task(read())
        try:
            await asyncio.wait_for(first.wait(), 10)  # the first chunk is out: the request is running
            yield base
            assert not reader.done(), "the slow stream ended before the test did"
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def test_a_running_request_leaves_it_serving(make_sim: Callable[..., SimStack], tmp_path: Path) -> None:
    sim = make_sim()
    c = stack(tmp_path, sim)
    chat_up(sim)
    await run(c)  # the first reading
    async with slow_stream(sim) as base:
        metrics = httpx.get(f"{base}/metrics").text
        assert 'vllm:num_requests_running{engine="0",model_name="qwen2.5-coder-7b-instruct"} 1.0' in metrics
        await asyncio.sleep(IDLE_AFTER_S)  # the counters have not moved: only the running gauge says busy
        report, _ = await run(c)
    assert report.outcome == "passed: nothing idle", report.to_markdown()
    await assert_left_serving(sim, report, "busy: 1 request(s) running")


async def test_a_request_between_the_verdict_and_the_scale_down_aborts_the_reclaim(
    make_sim: Callable[..., SimStack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verdict says idle; then, before the scale-down, a request completes on the pod (sent by a hook the
    moment the verdict is returned): the counters moved, so the model is left serving and nothing is stamped."""
    import coder_stack.tasks.idle
    from coder_stack.usecases.idle import read_idleness

    sim = make_sim()
    c = stack(tmp_path, sim)
    chat_up(sim)
    await run(c)  # the first reading
    base = sim.backends.resolve_url(StackSpec().service_url(CHAT, SERVING, 8000))
    assert base
    sent: list[int] = []

    async def verdict_then_a_request(*args: Any, **kwargs: Any) -> Any:
        later = datetime.now(UTC) + timedelta(hours=1)  # the reading is an hour old: idle, without waiting
        idle = await read_idleness(*args, **{**kwargs, "now": later})
        assert idle.idle, idle
        body = {"model": StackSpec().model(CHAT).served_model_name, "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        headers = {"Authorization": f"Bearer {sim.secrets['vllm_key']}"}
        async with httpx.AsyncClient(timeout=30) as http:
            resp = await http.post(f"{base}/v1/chat/completions", json=body, headers=headers)
        sent.append(resp.status_code)
        return idle

    monkeypatch.setattr(coder_stack.tasks.idle, "read_idleness", verdict_then_a_request)
    mark = len(sim.timeline)
    report, arts = await run(c)
    assert sent == [200]
    assert report.outcome == "passed: nothing idle", report.to_markdown()
    await assert_left_serving(sim, report, "served requests after it was judged idle")
    assert sim.timeline[mark:] == [] and "reclaimed-models" not in arts


# ------------------------------------------------------------------ unreadable
async def test_unreachable_metrics_leave_it_serving_with_the_reason(
    make_sim: Callable[..., SimStack], tmp_path: Path
) -> None:
    sim = make_sim()
    # Reached through an override that answers nothing (a closed port): /metrics cannot be read.
    c = stack(tmp_path, sim, access={"overrides": {"models": {CHAT: "http://127.0.0.1:9/v1"}}})
    chat_up(sim)
    for _ in range(2):
        report, _ = await run(c)
        await asyncio.sleep(IDLE_AFTER_S)
    assert report.outcome == "passed: nothing idle", report.to_markdown()
    await assert_left_serving(sim, report, "not read: GET /metrics failed")
    assert ACTIVITY not in deploy_annotations(sim)  # nothing read, nothing kept


async def test_no_ready_pod_leaves_it_serving_with_the_reason(
    make_sim: Callable[..., SimStack], tmp_path: Path
) -> None:
    sim = make_sim()
    c = stack(tmp_path, sim)
    sim.set_fault(CHAT, "crashloop")
    scale(sim, SERVING, CHAT, 1)
    wait_for(sim, lambda s: pods_of(s, SERVING, CHAT), 10, "a coder-chat pod")
    report, _ = await run(c)
    await assert_left_serving(sim, report, "no Ready pod")


# ------------------------------------------------------------------ another run holds the GPU
async def test_a_model_another_run_holds_is_left(make_sim: Callable[..., SimStack], tmp_path: Path) -> None:
    sim = make_sim()
    c = stack(tmp_path, sim)
    chat_up(sim)
    await run(c)
    before = deploy_annotations(sim)
    await asyncio.sleep(IDLE_AFTER_S)  # idle by its counters: only the held GPU keeps it
    async with gpu_session(10):
        report, _ = await run(c)
    assert report.outcome == "skipped: GPU limit held by another run", report.to_markdown()
    await assert_left_serving(sim, report, "held by another run")
    assert deploy_annotations(sim) == before  # nothing read or written while another run holds it


# ------------------------------------------------------------------ the GPU limit cannot be asked for
async def test_a_slot_request_the_server_keeps_refusing_leaves_it_serving_and_says_why_once(
    make_sim: Callable[..., SimStack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_sim()
    c = stack(tmp_path, sim)
    chat_up(sim)
    await run(c)
    before = deploy_annotations(sim)
    await asyncio.sleep(IDLE_AFTER_S)  # idle by its counters: only the unanswered slot request keeps it
    monkeypatch.setattr(gpu, "BUSY_BOUND_SECONDS", 0.3)  # 5 s in production
    Busy503(math.inf).install(monkeypatch)  # the server answers every slot request 503 (busy)
    report, _ = await run(c)
    assert report.outcome == "skipped: GPU limit not taken", report.to_markdown()
    await assert_left_serving(sim, report, "busy: GPU limit not taken")
    (note,) = [n for n in report.notes if GPU_LIMIT in n]
    assert note.count("answered 503") == 1, note  # the server's answer is told once, not twice
    assert "nothing read or changed" in note
    assert deploy_annotations(sim) == before


# ------------------------------------------------------------------ too young
async def test_a_model_younger_than_the_grace_is_left(make_sim: Callable[..., SimStack], tmp_path: Path) -> None:
    sim = make_sim()
    c = stack(tmp_path, sim, idle_grace_s=3600)
    chat_up(sim)
    await run(c)
    await asyncio.sleep(IDLE_AFTER_S)
    report, _ = await run(c)
    await assert_left_serving(sim, report, "too young")


# ------------------------------------------------------------------ dry run
async def test_a_dry_run_reports_and_changes_nothing(make_sim: Callable[..., SimStack], tmp_path: Path) -> None:
    sim = make_sim()
    c = stack(tmp_path, sim)
    chat_up(sim)
    await run(c)
    await asyncio.sleep(IDLE_AFTER_S)
    before, mark = deploy_annotations(sim), len(sim.timeline)
    report, _ = await run(c, dry_run=True)
    assert report.outcome == "dry run: nothing changed" and line(report).action == "would reclaim"
    assert replicas(sim)[CHAT] == 1 and deploy_annotations(sim) == before and sim.timeline[mark:] == []
