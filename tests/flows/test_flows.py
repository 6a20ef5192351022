"""The flows end to end on the simulated cluster, against a real Prefect API (the flow tier's
session harness, tests/flows/conftest.py).

What users rely on: a validate run passes and leaves the GPU at $0; a swap frees the GPU before the next
model starts; a serving model is never taken without ``take_over`` (and is restored with it); teardown is
idempotent; a failed, cancelled or terminated run scales its GPU models back to 0; two GPU sessions never
overlap; GPU work refuses without the ``tag:gpu`` limit; the deployments deploy; dry runs and bad
parameters change nothing.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.exceptions import ParameterTypeError
from simstack.stack import SimStack
from simstack.store import Store

from coder_stack.errors import GpuBusy, GpuLimitMissing, PodFailed, RetriableError, SpecError
from coder_stack.flows.bring_up import BringUpOptions, bring_up
from coder_stack.flows.errors import ReleaseIncomplete
from coder_stack.flows.keys import KeyOptions, manage_keys
from coder_stack.flows.params import Connection
from coder_stack.flows.swap import SwapOptions, swap_model
from coder_stack.flows.teardown import TeardownOptions, teardown
from coder_stack.flows.validate import ValidateOptions, validate_coder_stack
from coder_stack.orchestration.gpu import gpu_session
from coder_stack.orchestration.gpu_limit import GPU_LIMIT, ensure_gpu_limit
from coder_stack.report import RunReport
from tests.conftest import is_ready, pods_of, record, scale, wait_for
from tests.kits.flowkit import (
    EXPERIENCE,
    FRONTENDS,
    SERVING,
    SLOW_SCALE,
    assert_all_down,
    conn,
    gpu_overlaps,
    latest_run_of,
    pod_names,
    replicas,
    scaled_up,
    until,
)

# Every test starts with ``tag:gpu`` = 1 slot and may leave none held (tests/flows/conftest.py).
pytestmark = pytest.mark.usefixtures("gpu_limit")


# ------------------------------------------------------------------ helpers
def snapshot(sim: SimStack) -> dict[str, Any]:
    """What a run may change: Deployment specs (generation), Secrets/ConfigMaps, the gateway's keys and models."""

    def _read(store: Store) -> dict[str, Any]:
        snap: dict[str, Any] = {}
        for d in store.list("deployments", None):
            m = d["metadata"]
            snap[f"deploy {m['namespace']}/{m['name']}"] = (m.get("generation"), d["spec"].get("replicas"))
        for plural in ("secrets", "configmaps"):
            for o in store.list(plural, None):
                m = o["metadata"]
                snap[f"{plural} {m['namespace']}/{m['name']}"] = m["resourceVersion"]
        db = sim.services.litellm_db
        snap["gateway keys"] = copy.deepcopy(db.get("keys", {}))
        snap["gateway models"] = copy.deepcopy(db.get("models", []))
        return snap

    result: dict[str, Any] = sim.call(_read, sim.store)
    return result


async def run_artifacts(flow_run_id: UUID) -> dict[str, Any]:
    async with get_client() as client:
        arts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key or "": a for a in arts}


# ------------------------------------------------------------------ 1. full validate
async def test_validate_all_stages_passes_and_leaves_everything_at_zero(make_sim: Callable[..., SimStack]) -> None:
    sim = make_sim(gpu_pool="autoscaled", time_scale=0.002)
    state = await validate_coder_stack(
        options=ValidateOptions(stages=["chat", "fim", "agent"]), connection=conn(sim), return_state=True
    )
    assert state.is_completed(), state
    report: RunReport = await state.aresult()
    assert report.outcome == "passed"

    sections = {s.model: s for s in report.models}
    assert list(sections) == ["coder-chat", "coder-fim", "coder-agent"]
    for name, sec in sections.items():
        assert sec.ready_s and sec.ready_s > 0, name
        assert sec.phases and all(v >= 0 for v in sec.phases.values()), (name, sec.phases)
        assert sec.ttft_ms is not None and sec.ttft_ms > 0, name
        assert sec.smokes and all(s.ok for s in sec.smokes), (name, sec.smokes)
    assert {"node", "image", "weights", "start"} <= set(sections["coder-chat"].phases)
    assert sections["coder-chat"].scale_up_seen  # the autoscaled pool grew a GPU node
    checks = {name: [s.check for s in sec.smokes] for name, sec in sections.items()}
    assert checks["coder-chat"] == [
        "direct (pod, vLLM key)",
        "gateway chat (open-webui key)",
        "Open WebUI pod lists its models",
    ]
    assert checks["coder-fim"] == [
        "direct (pod, vLLM key)",
        "gateway FIM (tabby key)",
        "Tabby's configured key completes FIM",
    ]
    assert checks["coder-agent"] == ["direct (pod, vLLM key)", "tool loop through the gateway (agent key)"]

    spend = {s.alias: s.spend for s in report.spend}
    for alias in ("open-webui", "tabby", "coder-agent"):
        assert spend.get(alias, 0) > 0, f"no spend recorded for {alias}: {report.spend}"

    # Everything back at 0, on the cluster itself (not only in the report).
    assert_all_down(sim)
    assert set(report.final_state.values()) == {0}
    tl = sim.timeline
    assert not gpu_overlaps(sim), gpu_overlaps(sim)
    assert [n for _, ns, n, r in tl if ns == SERVING and r > 0] == ["coder-chat", "coder-fim", "coder-agent"]

    # The artifacts, read back through the API: the markdown report and the spend table, no secret in either.
    assert state.state_details.flow_run_id is not None
    arts = await run_artifacts(state.state_details.flow_run_id)
    md, table = arts["validate-report"], arts["validate-report-spend"]
    assert md.type == "markdown" and table.type == "table"
    assert "# validate_coder_stack: passed" in md.data and "## coder-fim" in md.data
    assert "Time to first token" in md.data and "## Spend per key" in md.data
    assert {"open-webui", "tabby", "coder-agent"} <= {row["alias"] for row in _table_rows(table.data)}
    keys = sim.call(lambda: [r.get("key") or "" for r in sim.services.litellm_db["keys"].values()])
    for secret in [*sim.secrets.values(), *(k for k in keys if k)]:
        assert secret not in md.data and secret not in str(table.data)


def _table_rows(data: Any) -> list[dict[str, Any]]:
    import json

    rows = json.loads(data) if isinstance(data, str) else data
    assert isinstance(rows, list)
    return rows


# ------------------------------------------------------------------ 2. swap
async def test_swap_frees_the_gpu_before_the_target_starts(sim: SimStack) -> None:
    scale(sim, SERVING, "coder-chat", 1)
    wait_for(sim, lambda s: any(is_ready(p) for p in pods_of(s, SERVING, "coder-chat")), 10, "coder-chat Ready")
    pod_events = record(sim, "pods")
    mark = len(sim.timeline)

    report = await swap_model(options=SwapOptions(target="coder-fim"), connection=conn(sim))

    assert report.outcome == "passed"
    assert replicas(sim) == {"coder-chat": 0, "coder-fim": 1, "coder-agent": 0, "open-webui": 0, "tabby": 0}
    serving = sim.call(
        lambda s: [(p["metadata"]["name"], is_ready(p)) for p in pods_of(s, SERVING, "coder-fim")], sim.store
    )
    assert len(serving) == 1 and serving[0][1], serving
    assert sim.call(pod_names, sim.store, SERVING, ["coder-chat", "coder-agent"]) == []

    tl = sim.timeline[mark:]
    chat_down = next(t for t, _, n, r in tl if n == "coder-chat" and r == 0)
    fim_up = next(t for t, _, n, r in tl if n == "coder-fim" and r == 1)
    chat_gone = max(
        t for t, typ, obj in pod_events if typ == "DELETED" and obj["metadata"]["name"].startswith("coder-chat-")
    )
    assert chat_down < chat_gone < fim_up, "coder-fim was scaled up before coder-chat's pod was gone"
    assert not gpu_overlaps(sim)
    assert any(n.startswith("swap time: ") for n in report.notes), report.notes
    assert report.section("coder-fim").ready_s


def test_gpu_overlaps_counts_a_terminating_pod_not_replica_counts(sim: SimStack) -> None:
    """The check every GPU test relies on: coder-fim scaled up while coder-chat's pod still terminates never has
    two models above 0 replicas, but two models' pods hold the GPU at once, and that is what it must report."""
    scale(sim, SERVING, "coder-chat", 1)
    wait_for(sim, lambda s: any(is_ready(p) for p in pods_of(s, SERVING, "coder-chat")), 10, "coder-chat Ready")
    assert not gpu_overlaps(sim)
    mark = len(sim.timeline)

    def swap_too_early(store: Store) -> None:  # one loop turn: no controller runs in between
        [pod] = pods_of(store, SERVING, "coder-chat")
        store.mark_deleting("pods", SERVING, pod["metadata"]["name"], 3000)  # a long grace: it stays terminating
        for name, reps in (("coder-chat", 0), ("coder-fim", 1)):
            d = store.get("deployments", SERVING, name)
            d["spec"]["replicas"] = reps
            store.update("deployments", d)

    sim.call(swap_too_early, sim.store)
    both = wait_for(
        sim,
        lambda s: (
            (pods_of(s, SERVING, "coder-fim"), pods_of(s, SERVING, "coder-chat"))
            if pods_of(s, SERVING, "coder-fim")
            else None
        ),
        10,
        "a coder-fim pod",
    )
    assert both[1] and both[1][0]["metadata"].get("deletionTimestamp"), "coder-chat's pod was gone too early"
    order = [(n, v) for _, ns, n, v in sim.timeline[mark:] if ns == SERVING]
    assert order == [("coder-chat", 0), ("coder-fim", 1)]  # replica counts never overlapped ...
    overlaps = gpu_overlaps(sim)
    assert overlaps and set(overlaps[-1][1]) == {"coder-chat", "coder-fim"}, overlaps  # ... the pods did


# ------------------------------------------------------------------ 3. take_over
async def test_validate_refuses_a_serving_gpu_without_take_over_and_restores_it_with(sim: SimStack) -> None:
    up = await bring_up(connection=conn(sim))
    assert up.outcome.startswith("passed")
    assert replicas(sim) == {"coder-chat": 1, "coder-fim": 0, "coder-agent": 0, "open-webui": 1, "tabby": 1}
    before, mark = snapshot(sim), len(sim.timeline)

    with pytest.raises(GpuBusy, match="coder-chat is serving"):
        await validate_coder_stack(options=ValidateOptions(stages=["fim"]), connection=conn(sim))
    assert sim.timeline[mark:] == []
    assert snapshot(sim) == before

    report = await validate_coder_stack(options=ValidateOptions(stages=["fim"], take_over=True), connection=conn(sim))
    assert report.outcome == "passed"
    assert [s.model for s in report.models][-1] == "coder-fim" and report.section("coder-fim").smokes
    assert any("restored coder-chat" in n for n in report.notes), report.notes
    # coder-chat is serving again: replicas 1 and a Ready pod; nothing else on the GPU.
    # The morning's front-ends were running before the run: users still reach Open WebUI and Tabby after it.
    assert replicas(sim) == {"coder-chat": 1, "coder-fim": 0, "coder-agent": 0, "open-webui": 1, "tabby": 1}
    assert sim.call(lambda s: [is_ready(p) for p in pods_of(s, SERVING, "coder-chat")], sim.store) == [True]
    tl = sim.timeline[mark:]
    order = [(n, v) for _, ns, n, v in tl if ns == SERVING]
    assert order == [("coder-chat", 0), ("coder-fim", 1), ("coder-fim", 0), ("coder-chat", 1)], order
    assert not gpu_overlaps(sim)


# ------------------------------------------------------------------ 4. teardown
async def test_teardown_brings_everything_down_and_a_second_run_is_a_no_op(sim: SimStack) -> None:
    for name in ("coder-chat",):
        scale(sim, SERVING, name, 1)
    for name in FRONTENDS:
        scale(sim, EXPERIENCE, name, 1)
    wait_for(sim, lambda s: pods_of(s, SERVING, "coder-chat"), 10, "a coder-chat pod")

    first = await teardown(connection=conn(sim))
    assert first.outcome == "passed: everything at 0"
    assert any("found running: coder-chat" in n for n in first.notes), first.notes
    assert_all_down(sim)
    assert sim.call(pod_names, sim.store, EXPERIENCE, FRONTENDS) == []
    assert set(first.final_state.values()) == {0}

    mark = len(sim.timeline)
    before = snapshot(sim)
    second = await teardown(connection=conn(sim))
    assert second.outcome == "passed: everything at 0"
    assert "found running: nothing" in second.notes
    assert sim.timeline[mark:] == []
    assert snapshot(sim) == before


# ------------------------------------------------------------------ 5. a failing stage
async def test_a_failing_stage_fails_the_flow_and_scales_everything_down(make_sim: Callable[..., SimStack]) -> None:
    sim = make_sim(faults={"coder-fim": "crashloop"})
    mark = len(sim.timeline)
    with pytest.raises(PodFailed, match="CrashLoopBackOff"):
        await validate_coder_stack(options=ValidateOptions(stages=["chat", "fim"]), connection=conn(sim))
    assert_all_down(sim)
    # coder-chat passed before coder-fim failed; each model was scaled down before the next went up.
    order = [(n, v) for _, ns, n, v in sim.timeline[mark:] if ns == SERVING]
    assert order == [("coder-chat", 1), ("coder-chat", 0), ("coder-fim", 1), ("coder-fim", 0)], order
    run_id, run_state = await latest_run_of("validate_coder_stack")
    assert run_state.is_failed()
    md = (await run_artifacts(run_id))["validate-report"].data
    assert "failed: PodFailed" in md and "| serving/coder-fim | 0 |" in md


async def test_a_scale_down_refused_between_stages_fails_the_run_before_the_next_model_starts(
    make_sim: Callable[..., SimStack],
) -> None:
    """The API answers 503 to coder-chat's scale-down between the chat and FIM stages: coder-fim must not be
    scaled up beside it; the run fails naming coder-chat, and its ``finally`` scales coder-chat down again."""
    sim = make_sim()
    faults = sim.api_server.faults
    chat_scale = r"/namespaces/serving/deployments/coder-chat/scale$"

    def arm_after_scale_up(ev: Any) -> None:  # the first scale of coder-chat is the scale-up: fault the next one
        obj = ev.obj
        chat_up = ev.plural == "deployments" and obj["metadata"]["name"] == "coder-chat" and obj["spec"]["replicas"]
        if chat_up and not armed:
            armed.append(True)
            faults.fail("PATCH", chat_scale, 503)

    armed: list[bool] = []
    sim.call(lambda s: s.listeners.append(arm_after_scale_up), sim.store)
    mark = len(sim.timeline)
    with pytest.raises(ReleaseIncomplete) as info:
        await validate_coder_stack(options=ValidateOptions(stages=["chat", "fim"]), connection=conn(sim))
    msg = str(info.value)
    assert "coder-chat is still up" in msg and "fim stage was not started" in msg, msg
    assert [s for _m, p, s in faults.fired if "coder-chat" in p] == [503], faults.fired
    assert not scaled_up(sim, "coder-fim", mark), "coder-fim was scaled up while coder-chat held the GPU"
    # The finally tried coder-chat again (its second scale-down was answered) and everything is at 0.
    order = [(n, v) for _, ns, n, v in sim.timeline[mark:] if ns == SERVING]
    assert order == [("coder-chat", 1), ("coder-chat", 0)], order
    assert_all_down(sim, pods_timeout=10)
    assert not gpu_overlaps(sim)
    run_id, run_state = await latest_run_of("validate_coder_stack")
    assert run_state.is_failed()
    md = (await run_artifacts(run_id))["validate-report"].data
    assert "failed: ReleaseIncomplete" in md and "coder-chat: scaled to 0" in md, md


async def test_a_scale_down_refused_at_the_end_fails_a_run_whose_stages_passed(
    make_sim: Callable[..., SimStack],
) -> None:
    """Every smoke passed, but coder-fim's final scale-down is answered 503: the run must not say passed while a
    model bills; it fails naming coder-fim and what to run."""
    sim = make_sim()
    faults = sim.api_server.faults

    def arm_after_scale_up(ev: Any) -> None:
        obj = ev.obj
        fim_up = ev.plural == "deployments" and obj["metadata"]["name"] == "coder-fim" and obj["spec"]["replicas"]
        if fim_up and not armed:
            armed.append(True)
            faults.fail("PATCH", r"/namespaces/serving/deployments/coder-fim/scale$", 503)

    armed: list[bool] = []
    sim.call(lambda s: s.listeners.append(arm_after_scale_up), sim.store)
    with pytest.raises(ReleaseIncomplete, match=r"coder-fim could not be scaled to 0 at the end.*coder-stack down"):
        await validate_coder_stack(options=ValidateOptions(stages=["chat", "fim"]), connection=conn(sim))
    assert replicas(sim)["coder-fim"] == 1  # what the error says: left up
    _, run_state = await latest_run_of("validate_coder_stack")
    assert run_state.is_failed()
    await teardown(connection=conn(sim))
    assert_all_down(sim, pods_timeout=10)


# ------------------------------------------------------------------ 6. cancellation
async def test_cancelling_a_running_validate_scales_its_models_down(make_sim: Callable[..., SimStack]) -> None:
    """The flow coroutine is cancelled (what an asyncio runner does) in the middle of coder-chat's cold start."""
    sim = make_sim(gpu_pool="autoscaled", time_scale=SLOW_SCALE)
    run = asyncio.create_task(validate_coder_stack(options=ValidateOptions(stages=["chat"]), connection=conn(sim)))
    await until(lambda: scaled_up(sim, "coder-chat") or run.done(), 30, "coder-chat scaled up")
    await until(lambda: sim.call(pod_names, sim.store, SERVING, ["coder-chat"]), 10, "a coder-chat pod")
    assert not run.done()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    # The finally issued the scale-downs (and waited for the pods) before the cancellation propagated.
    assert_all_down(sim)
    _, run_state = await latest_run_of("validate_coder_stack")
    assert run_state.is_final() and not run_state.is_completed(), run_state


# ------------------------------------------------------------------ 8. two GPU sessions
async def test_two_concurrent_swaps_never_share_the_gpu(sim: SimStack) -> None:
    a, b = await asyncio.gather(
        swap_model(options=SwapOptions(target="coder-chat", smoke_gateway=False), connection=conn(sim)),
        swap_model(options=SwapOptions(target="coder-fim", smoke_gateway=False), connection=conn(sim)),
    )
    assert a.outcome == "passed" and b.outcome == "passed"
    tl = sim.timeline
    assert not gpu_overlaps(sim), gpu_overlaps(sim)
    ups = [n for _, ns, n, r in tl if ns == SERVING and r > 0]
    assert sorted(ups) == ["coder-chat", "coder-fim"], tl
    r = replicas(sim)
    assert (r[ups[0]], r[ups[1]]) == (0, 1), (ups, r)  # the second session freed the first one's model
    async with get_client() as client:
        gcl = await client.read_global_concurrency_limit_by_name(GPU_LIMIT)
    assert (gcl.limit, gcl.active_slots) == (1, 0)


async def test_queued_sessions_take_the_gpu_in_arrival_order_at_once_without_refused_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sessions queued in one process: first come, first served; each takes the GPU as soon as the one
    before releases it (not at its next poll: ``poll_s`` is 5 s here), and none asks the server for a
    slot while it is held (a refused request writes to the Prefect database and, on SQLite, can stall
    the next hand-off for Prefect's 2 s retry back-off)."""
    asked: list[str] = []  # the answer to each slot request: granted, refused (423: asked while held) or busy
    orig = PrefectClient.increment_concurrency_slots_with_lease

    async def counting(self: PrefectClient, *args: Any, **kwargs: Any) -> Any:
        try:
            res = await orig(self, *args, **kwargs)
        except httpx.HTTPStatusError as e:
            asked.append("refused" if e.response.status_code == 423 else str(e.response.status_code))
            raise
        except Exception:
            asked.append("busy")  # a 503 from a busy SQLite server, asked again by gpu_session: not a refusal
            raise
        asked.append("granted")
        return res

    monkeypatch.setattr(PrefectClient, "increment_concurrency_slots_with_lease", counting)
    marks: list[tuple[str, int, float]] = []

    async def session(i: int) -> None:
        # a poll no test waits out: a queued session can only be woken by the release
        async with gpu_session(timeout_s=600, poll_s=600):
            marks.append(("in", i, time.monotonic()))
            await asyncio.sleep(0.6)
            marks.append(("out", i, time.monotonic()))

    runs = []
    for i in range(4):
        runs.append(asyncio.create_task(session(i)))
        await asyncio.sleep(0.1)
    await asyncio.wait_for(asyncio.gather(*runs), 60)  # only stops a hung test
    order = [(k, i) for k, i, _ in marks]
    assert order == [(k, i) for i in range(4) for k in ("in", "out")], marks
    assert asked.count("granted") == 4 and "refused" not in asked, asked


async def test_a_queued_session_that_gives_up_or_is_cancelled_leaves_its_place_to_the_next() -> None:
    holding, done = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with gpu_session(timeout_s=60):
            holding.set()
            await done.wait()

    h = asyncio.create_task(holder())
    await holding.wait()
    with pytest.raises(RetriableError, match="waited 1 s for the GPU"):
        async with gpu_session(timeout_s=1.0, poll_s=0.2):
            pytest.fail("took the GPU while another session held it")
    cancelled = asyncio.create_task(holder())
    await asyncio.sleep(0.3)
    cancelled.cancel()
    got: list[float] = []

    async def last() -> None:
        async with gpu_session(timeout_s=600, poll_s=600):  # only the release can wake it in time
            got.append(time.monotonic())

    waiting = asyncio.create_task(last())
    await asyncio.sleep(0.3)
    released = time.monotonic()
    done.set()
    await asyncio.wait_for(asyncio.gather(h, waiting), 60)  # only stops a hung test
    assert cancelled.cancelled()
    assert got and got[0] >= released, "the next session took the GPU before it was released"


# ------------------------------------------------------------------ 9. no limit, no GPU work
async def test_gpu_work_refuses_without_the_limit(sim: SimStack) -> None:
    async with get_client() as client:
        await client.delete_global_concurrency_limit_by_name(GPU_LIMIT)
    try:
        before, mark = snapshot(sim), len(sim.timeline)
        with pytest.raises(GpuLimitMissing, match="does not exist"):
            await swap_model(options=SwapOptions(target="coder-chat"), connection=conn(sim))
        with pytest.raises(GpuLimitMissing):
            await validate_coder_stack(connection=conn(sim))
        assert sim.timeline[mark:] == []
        assert snapshot(sim) == before
    finally:
        await ensure_gpu_limit(1)


# ------------------------------------------------------------------ 10. deployments
async def test_setup_deploys_every_deployment_with_its_schedule(
    sim: SimStack, prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coder_stack.app.setup import run_setup

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    report = await run_setup(gpus=1, kubeconfig=sim.kubeconfig_path)
    assert report.deployed, report.deploy_output
    process_connection = {"stack_block": "coder-stack", "kubeconfig": str(sim.kubeconfig_path.resolve())}

    async with get_client() as client:
        pools = {p: (await client.read_work_pool(p)).type for p in ("coder-stack-process", "coder-stack-k8s")}
        assert pools == {"coder-stack-process": "process", "coder-stack-k8s": "kubernetes"}
        gcl = await client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        assert gcl.limit == 1
        want = {
            "bring_up/morning-bring-up": ("0 7 * * 1-5", "coder-stack-process"),
            "teardown/evening-teardown": ("0 19 * * *", "coder-stack-process"),
            "validate_coder_stack/validate-coder-stack": (None, "coder-stack-process"),
            "swap_model/swap-model": (None, "coder-stack-process"),
            "reclaim_idle_models/reclaim-idle-models": ("*/5 * * * *", "coder-stack-process"),
            "bring_up/morning-bring-up-in-cluster": (None, "coder-stack-k8s"),
            "teardown/evening-teardown-in-cluster": (None, "coder-stack-k8s"),
            "validate_coder_stack/validate-coder-stack-in-cluster": (None, "coder-stack-k8s"),
            "swap_model/swap-model-in-cluster": (None, "coder-stack-k8s"),
            "reclaim_idle_models/reclaim-idle-models-in-cluster": (None, "coder-stack-k8s"),
            "clean_up_crashed_run/clean-up-crashed-run": (None, "coder-stack-process"),
            "clean_up_crashed_run/clean-up-crashed-run-in-cluster": (None, "coder-stack-k8s"),
        }
        # A reclaim still running when the next is due: the next one is dropped, not queued behind it.
        collision = {"reclaim_idle_models/reclaim-idle-models": "CANCEL_NEW"}
        for name, (cron, pool) in want.items():
            d = await client.read_deployment_by_name(name)
            assert d.work_pool_name == pool, name
            assert d.enforce_parameter_schema, name
            # Only the heartbeat the crash automation relies on; the k8s pool's template holds image, SA, namespace.
            assert d.job_variables == {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}}, (name, d.job_variables)
            if pool == "coder-stack-k8s":
                # A Job pod starts in the image's WORKDIR: no pull step, no path from the deployer's machine;
                # the stack from the block the deployment names.
                assert d.pull_steps == [], (name, d.pull_steps)
                assert d.parameters == {"connection": {"stack_block": "coder-stack"}}, name
            else:
                assert d.pull_steps and "set_working_directory" in str(d.pull_steps), name
                # the stack setup wrote into the block and the cluster it was given (the clean-up: the dead run's)
                own = name.endswith("/clean-up-crashed-run")
                assert d.parameters == ({} if own else {"connection": process_connection}), (name, d.parameters)
            if cron is None:
                assert d.schedules == [], (name, d.schedules)
                continue
            assert len(d.schedules) == 1, (name, d.schedules)
            sched = d.schedules[0]
            assert sched.active, name
            assert (getattr(sched.schedule, "cron", None), getattr(sched.schedule, "timezone", None)) == (
                cron,
                "America/New_York",
            ), (name, sched.schedule)
            assert d.global_concurrency_limit is not None and d.global_concurrency_limit.limit == 1, name
            assert d.concurrency_options is not None, name
            assert d.concurrency_options.collision_strategy == collision.get(name, "ENQUEUE"), name


async def test_setup_refuses_schedules_against_a_default_that_does_not_exist_and_checks_the_service_account(
    make_sim: Callable[..., SimStack], prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from coder_stack.app.setup import run_setup
    from coder_stack.errors import ConfigError
    from tests.flows.test_renamed_stack import renamed_spec
    from tests.kits.incluster import load_rbac, rbac_docs

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    monkeypatch.delenv("KUBECONFIG", raising=False)
    teardown_dep = DeploymentFilter(name=DeploymentFilterName(any_=["evening-teardown"]))
    async with get_client() as client:
        for d in await client.read_deployments(deployment_filter=teardown_dep):
            await client.delete_deployment(d.id)

    # No kubeconfig given and none by default: the schedules would fail every evening; refused before any change.
    with pytest.raises(ConfigError, match=r"kube/config, which does not exist.*--kubeconfig PATH"):
        await run_setup(gpus=1)
    # A cluster whose models are named otherwise, and no --stack: the block's default names are not there.
    renamed = make_sim(spec=renamed_spec())
    with pytest.raises(ConfigError, match=r"does not have \(serving/coder-chat, .*Give --stack FILE"):
        await run_setup(gpus=1, stack_block=f"fresh-{uuid.uuid4().hex[:8]}", kubeconfig=renamed.kubeconfig_path)
    async with get_client() as client:
        assert await client.read_deployments(deployment_filter=teardown_dep) == []  # nothing was deployed

    # The Kubernetes pool's ServiceAccount: missing (README step 2 skipped) is said, with what to apply.
    sim = make_sim()
    report = await run_setup(gpus=1, deploy=False, kubeconfig=sim.kubeconfig_path)
    [line] = [c for c in report.cluster if "ServiceAccount" in c]
    assert "prefect/coder-stack-flows does not exist" in line and "kubectl apply -f deployments/rbac.yaml" in line
    docs = rbac_docs()
    sim.call(load_rbac, sim.store, docs)
    report = await run_setup(gpus=1, deploy=False, kubeconfig=sim.kubeconfig_path)
    assert (
        "ServiceAccount prefect/coder-stack-flows exists (the coder-stack-k8s pool's Jobs run as it)" in report.cluster
    )


# ------------------------------------------------------------------ 11. dry runs
async def test_dry_runs_change_nothing(sim: SimStack) -> None:
    # Something to leave alone: keys minted and delivered, coder-chat serving.
    await manage_keys(connection=conn(sim))
    scale(sim, SERVING, "coder-chat", 1)
    wait_for(sim, lambda s: any(is_ready(p) for p in pods_of(s, SERVING, "coder-chat")), 10, "coder-chat Ready")
    before, mark = snapshot(sim), len(sim.timeline)
    assert before["gateway keys"]

    reports = [
        await validate_coder_stack(
            options=ValidateOptions(stages=["chat", "fim", "agent"], dry_run=True), connection=conn(sim)
        ),
        await swap_model(options=SwapOptions(target="coder-fim", dry_run=True), connection=conn(sim)),
        await teardown(options=TeardownOptions(dry_run=True), connection=conn(sim)),
        await bring_up(options=BringUpOptions(model="coder-fim", dry_run=True), connection=conn(sim)),
        await manage_keys(options=KeyOptions(rotate=True, dry_run=True), connection=conn(sim)),
    ]
    for rep in reports:
        assert rep.outcome == "dry run: nothing changed", rep
        assert any(n.startswith("dry run: would") for n in rep.notes), rep.notes
    assert "serving now: coder-chat" in reports[0].notes[0]
    assert "['coder-chat'] to 0, then coder-fim to 1" in reports[1].notes[0]
    assert sim.timeline[mark:] == []
    assert snapshot(sim) == before


# ------------------------------------------------------------------ 12. parameters
async def test_bad_parameters_are_refused_before_anything_changes(sim: SimStack) -> None:
    before, mark = snapshot(sim), len(sim.timeline)
    c = conn(sim)
    with pytest.raises(ParameterTypeError, match="stages"):
        await validate_coder_stack(options={"stages": ["gpu"]}, connection=c)  # type: ignore[call-overload]
    with pytest.raises(ParameterTypeError):
        await validate_coder_stack(options={"stages": []}, connection=c)  # type: ignore[call-overload]
    with pytest.raises(ParameterTypeError):
        await validate_coder_stack(options={"stages": ["chat"], "take_ovr": True}, connection=c)  # type: ignore[call-overload]
    with pytest.raises(ParameterTypeError, match="target"):
        await swap_model(options={"target": "Coder Chat!"}, connection=c)  # type: ignore[call-overload]
    with pytest.raises(SpecError, match="unknown model 'coder-nope'"):
        await swap_model(options=SwapOptions(target="coder-nope"), connection=c)
    with pytest.raises(Exception, match=r"nope\.yaml"):
        await teardown(connection=Connection(kubeconfig=c.kubeconfig, stack_file="/nonexistent/nope.yaml"))
    assert sim.timeline[mark:] == []
    assert snapshot(sim) == before
