"""wake_model on the simulated stack, against the shared Prefect API.

A wake brings a model that is down up (keys, front-ends, smokes) and keeps its measured cold start; a second wake
interleaved with it does nothing; one cancelled in its cold start leaves no claim and the model at 0; one whose
process is killed leaves a claim naming a dead run, which the crash clean-up removes (with the model it scaled
up) and the next wake takes over; and a wake while another model is in use never evicts it: it writes
``waiting-for-gpu`` naming the busy model, and comes up once that model is idle (reclaimed by the same rule as
``reclaim_idle_models``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.states import Failed
from simstack.stack import SimStack
from simstack.store import Store

import coder_stack.flows.wake as wake_flow
from coder_stack.errors import SpecError
from coder_stack.flows.cleanup import clean_up_crashed_run
from coder_stack.flows.errors import WakeGaveUp
from coder_stack.flows.params import Connection
from coder_stack.flows.wake import wake_model
from coder_stack.report import RunReport
from coder_stack.spec import StackSpec, spec_yaml
from coder_stack.usecases.wake import COLD_START, WAKE
from tests.conftest import is_ready, pods_of, scale, wait_for
from tests.flows.test_reclaim import slow_stream
from tests.flows.test_status_stamps import status
from tests.kits.flowkit import SERVING, SLOW_SCALE, conn, replicas, sigkill, start_flow_process

pytestmark = pytest.mark.usefixtures("gpu_limit")

CHAT, FIM = "coder-chat", "coder-fim"


def deploy_annotations(sim: SimStack, name: str) -> dict[str, str]:
    def _read(store: Store) -> dict[str, str]:
        return dict(store.get("deployments", SERVING, name)["metadata"].get("annotations") or {})

    result: dict[str, str] = sim.call(_read, sim.store)
    return result


def wake_state(store: Store, name: str) -> dict[str, Any] | None:
    raw = (store.get("deployments", SERVING, name)["metadata"].get("annotations") or {}).get(WAKE)
    return json.loads(raw) if raw else None


def scaled(sim: SimStack, name: str, mark: int = 0) -> list[int]:
    return [v for _, ns, n, v in sim.timeline[mark:] if ns == SERVING and n == name]


async def wait_store(sim: SimStack, fn: Callable[[Store], Any], timeout: float, what: str) -> Any:
    return await asyncio.to_thread(wait_for, sim, fn, timeout, what)


# ------------------------------------------------------------------ a wake, and a second one interleaved with it
async def test_a_wake_brings_the_model_up_and_a_wake_interleaved_with_it_does_nothing(
    make_sim: Callable[..., SimStack],
) -> None:
    sim = make_sim(time_scale=SLOW_SCALE)  # a cold start of ~4 s: the second wake lands inside it
    mark = len(sim.timeline)
    first = asyncio.create_task(wake_model(CHAT, connection=conn(sim)))
    claim = await wait_store(sim, lambda s: wake_state(s, CHAT), 60, "the first wake's claim")
    assert claim["state"] == "starting" and claim["ready_by"] and claim["busy"] == []
    await wait_store(sim, lambda s: pods_of(s, SERVING, CHAT), 60, "coder-chat cold-starting")

    second: RunReport = await wake_model(CHAT, connection=conn(sim))  # while the first one's cold start runs
    assert second.outcome == "passed: a wake is already pending", second.to_markdown()
    assert any(claim["run"] in n for n in second.notes), second.notes

    report: RunReport = await asyncio.wait_for(first, 120)
    assert report.outcome == "passed: coder-chat serving", report.to_markdown()
    section = report.section(CHAT)
    assert [s.check for s in section.smokes] == ["direct (pod, vLLM key)", "gateway (client key)"], section
    assert scaled(sim, CHAT, mark) == [1]  # one scale-up, by the first wake only
    kept = deploy_annotations(sim, CHAT)
    assert WAKE not in kept  # the claim ends with the run
    assert float(kept[COLD_START]) > 0  # the measured cold start, for the callback's message
    assert replicas(sim)["open-webui"] == 1 and replicas(sim)["tabby"] == 1

    third: RunReport = await wake_model(CHAT, connection=conn(sim))
    assert third.outcome == "passed: already serving" and scaled(sim, CHAT, mark) == [1]
    assert deploy_annotations(sim, CHAT)[COLD_START] == kept[COLD_START]  # no cold start seen: the estimate is kept


async def test_an_unknown_model_fails_with_what_to_check_and_changes_nothing(sim: SimStack) -> None:
    mark = len(sim.timeline)
    with pytest.raises(SpecError, match=r"'nope' is not a model of this stack.*coder-chat.*nothing was changed"):
        await wake_model("nope", connection=conn(sim))
    assert sim.timeline[mark:] == []
    assert all(WAKE not in deploy_annotations(sim, m.name) for m in StackSpec().models)


# ------------------------------------------------------------------ cancelled in the middle
async def test_a_wake_cancelled_in_its_cold_start_leaves_no_claim_and_the_model_at_0(
    make_sim: Callable[..., SimStack],
) -> None:
    sim = make_sim(time_scale=SLOW_SCALE)
    mark = len(sim.timeline)

    async def wake() -> Any:
        return await wake_model(CHAT, connection=conn(sim), return_state=True)

    task = asyncio.create_task(wake())
    await wait_store(sim, lambda s: pods_of(s, SERVING, CHAT) and wake_state(s, CHAT), 60, "cold start, claimed")
    assert not any(is_ready(p) for p in sim.call(lambda s: pods_of(s, SERVING, CHAT), sim.store))
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 60)
    assert replicas(sim)[CHAT] == 0 and scaled(sim, CHAT, mark) == [1, 0]
    assert WAKE not in deploy_annotations(sim, CHAT)
    await wait_store(sim, lambda s: not pods_of(s, SERVING, CHAT), 30, "coder-chat's pod gone")


async def test_a_wake_whose_model_fails_to_start_scales_it_back_to_0_and_leaves_no_claim(
    make_sim: Callable[..., SimStack],
) -> None:
    from coder_stack.errors import PodFailed

    sim = make_sim(faults={FIM: "crashloop"})
    mark = len(sim.timeline)
    with pytest.raises(PodFailed, match="CrashLoopBackOff"):
        await wake_model(FIM, connection=conn(sim))
    assert scaled(sim, FIM, mark) == [1, 0] and WAKE not in deploy_annotations(sim, FIM)
    assert COLD_START not in deploy_annotations(sim, FIM)  # no cold start was seen to its end: no estimate
    await wait_store(sim, lambda s: not pods_of(s, SERVING, FIM), 30, "coder-fim's pod gone")


# ------------------------------------------------------------------ killed in the middle
KILLABLE_WAKE = """
import asyncio, sys
from coder_stack.flows.params import Connection
from coder_stack.flows.wake import wake_model

asyncio.run(wake_model("coder-chat", connection=Connection(kubeconfig=sys.argv[1])))
"""


async def test_a_killed_wakes_claim_is_cleared_by_the_crash_clean_up_and_taken_over_by_the_next_wake(
    make_sim: Callable[..., SimStack], prefect_api: str, tmp_path: Path
) -> None:
    sim = make_sim(time_scale=SLOW_SCALE)
    proc, log = start_flow_process(KILLABLE_WAKE, sim, prefect_api, tmp_path)
    try:
        await wait_store(
            sim, lambda s: pods_of(s, SERVING, CHAT) and wake_state(s, CHAT), 90, "the killable wake's cold start"
        )
    finally:
        sigkill(proc)
    dead_claim = deploy_annotations(sim, CHAT)[WAKE]
    dead = json.loads(dead_claim)["run"]
    assert replicas(sim)[CHAT] == 1, log.read_text()
    # Dead in Prefect's eyes (the crash automation would mark it Crashed once its heartbeats stop; Failed here, so
    # the shared server's clean-up trigger does not start a second clean-up of it beside this one)
    async with get_client() as client:
        await client.set_flow_run_state(UUID(dead), Failed(message="killed by the test"), force=True)

    cleanup: RunReport = await clean_up_crashed_run(dead, connection=conn(sim), settle_s=1.0)
    assert cleanup.outcome.startswith("passed: coder-chat scaled to 0"), cleanup.to_markdown()
    assert any("its wake claim removed from coder-chat" in n for n in cleanup.notes), cleanup.notes
    assert WAKE not in deploy_annotations(sim, CHAT) and replicas(sim)[CHAT] == 0

    # The same dead claim, as the clean-up would find it had it not run yet: the next wake takes it over.
    await _annotate(sim, dead_claim)
    mark = len(sim.timeline)
    report: RunReport = await wake_model(CHAT, connection=conn(sim))
    assert report.outcome == "passed: coder-chat serving", report.to_markdown()
    assert any(f"took over the wake claimed by {dead}" in n for n in report.notes), report.notes
    assert scaled(sim, CHAT, mark) == [1] and WAKE not in deploy_annotations(sim, CHAT)


async def _annotate(sim: SimStack, value: str) -> None:
    from coder_stack.kubernetes.client import ClusterTarget, open_api
    from coder_stack.kubernetes.workloads import annotate_deployment

    async with open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api:
        await annotate_deployment(api, SERVING, CHAT, {WAKE: value})


# ------------------------------------------------------------------ another model in use
def stack(tmp_path: Path, sim: SimStack, **wake: Any) -> Connection:
    path = tmp_path / "stack.yaml"
    path.write_text(spec_yaml(StackSpec.model_validate({"idle_after_s": 1.0, "idle_grace_s": 0.0, "wake": wake})))
    return conn(sim, stack_file=str(path))


async def test_a_wake_while_another_model_is_in_use_waits_for_the_gpu_and_never_evicts_it(
    make_sim: Callable[..., SimStack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wake_flow, "GPU_POLL_S", 0.3)
    sim = make_sim()
    scale(sim, SERVING, CHAT, 1)
    wait_for(sim, lambda s: any(is_ready(p) for p in pods_of(s, SERVING, CHAT)), 15, "coder-chat Ready")
    mark = len(sim.timeline)
    async with slow_stream(sim):  # someone is using coder-chat
        # no time to wait: it fails at once, saying what to do, and changes nothing
        with pytest.raises(WakeGaveUp, match="coder-chat stayed in use; nothing was evicted"):
            await wake_model(FIM, connection=stack(tmp_path, sim, wait_for_gpu_s=0))
        assert WAKE not in deploy_annotations(sim, FIM) and sim.timeline[mark:] == []

        waiting = asyncio.create_task(wake_model(FIM, connection=stack(tmp_path, sim, wait_for_gpu_s=120)))
        state = await wait_store(
            sim, lambda s: (w := wake_state(s, FIM)) and w["state"] == "waiting-for-gpu" and w, 60, "waiting-for-gpu"
        )
        assert state["busy"] == [CHAT] and state["ready_by"] is None
        shown = await status(sim)
        assert f"wake pending: coder-fim: waiting-for-gpu since {state['since']} (run {state['run']})" in shown, shown
        assert "the GPU: coder-chat in use (never evicted" in shown, shown
        assert sim.timeline[mark:] == [] and not waiting.done()  # coder-chat untouched, coder-fim not scaled
    # the request ended: once coder-chat's counters stand still for idle_after_s it is reclaimed, fim comes up
    report: RunReport = await asyncio.wait_for(waiting, 120)
    assert report.outcome == "passed: coder-fim serving", report.to_markdown()
    assert any("coder-chat: reclaimed (idle) to wake coder-fim" in n for n in report.notes), report.notes
    order = [(n, v) for _, ns, n, v in sim.timeline[mark:] if ns == SERVING]
    assert order == [(CHAT, 0), (FIM, 1)], order
    assert WAKE not in deploy_annotations(sim, FIM)


# ------------------------------------------------------------------ asked for, not picked up
async def test_a_wake_asked_for_by_hand_is_sent_as_the_callbacks_event_and_status_shows_it_waiting_for_a_worker(
    sim: SimStack,
) -> None:
    """`coder-stack wake` refuses while nothing would answer (no wake-model deployment); with one, it sends the
    callback's event; a wake run its trigger made that no worker picks up is shown by `status` with the command
    that starts a worker for its pool."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
    from typer.testing import CliRunner

    from coder_stack.app.cli import app

    def cli(*args: str) -> Any:
        return CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})

    async with get_client() as client:  # another test's `coder-stack setup` may have deployed it on the shared API
        with contextlib.suppress(Exception):
            await client.delete_deployment((await client.read_deployment_by_name("wake_model/wake-model")).id)
    res = await asyncio.to_thread(cli, "wake", "coder-nope")
    assert res.exit_code != 0 and "'coder-nope' is not a model of this stack" in " ".join(res.output.split())
    res = await asyncio.to_thread(cli, "wake", FIM)
    assert res.exit_code != 0 and "run `coder-stack setup`" in " ".join(res.output.split()), res.output

    pool = "wake-test-pool"
    start = datetime.now(UTC) - timedelta(seconds=1)
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
        flow_id = await client.create_flow_from_name("wake_model")
        dep_id = await client.create_deployment(flow_id=flow_id, name="wake-model", work_pool_name=pool)
        try:
            res = await asyncio.to_thread(cli, "wake", FIM)
            assert res.exit_code == 0, (res.output, res.exception)
            flt = EventFilter(
                occurred=EventOccurredFilter(since=start),
                event=EventNameFilter(name=["coder-stack.model.wake-requested"]),
                resource=EventResourceFilter(id=[f"coder-stack.model.{FIM}"]),
            )

            async def sent() -> list[Any]:
                return (await client.read_events(filter=flt, limit=5)).events

            events: list[Any] = []
            async with asyncio.timeout(30):
                while not events:
                    events = await sent()
                    await asyncio.sleep(0.1)
            [ev] = events
            assert ev.resource.get("prefect.resource.name") == FIM and ev.payload["alias"] == "coder-fim"
            assert set(ev.payload) == {"alias", "route", "reason"}

            run = await client.create_flow_run_from_deployment(dep_id, parameters={"model": FIM})
            try:
                shown = await status(sim)
                assert f"wake pending: {FIM}: requested" in shown and str(run.id) in shown, shown
                assert f"none is online: start one (`prefect worker start --pool {pool}`)" in shown, shown
            finally:
                await client.delete_flow_run(run.id)
        finally:
            await client.delete_deployment(dep_id)


async def test_setup_deploys_wake_model_whose_trigger_turns_the_event_into_one_run_for_that_model(
    sim: SimStack, prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`coder-stack setup` deploys prefect.yaml's wake-model with its trigger: the callback's event (sent here by
    `coder-stack wake`) becomes a wake_model run for the model it names, on the process pool, bounded by the
    deployment's concurrency limit; with no worker online, `status` says how to start one."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from typer.testing import CliRunner

    from coder_stack.app.cli import app
    from coder_stack.app.setup import run_setup

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    report = await run_setup(gpus=1, kubeconfig=sim.kubeconfig_path)
    assert report.deployed, report.deploy_output
    async with get_client() as client:
        d = await client.read_deployment_by_name("wake_model/wake-model")
        assert d.work_pool_name == "coder-stack-process" and d.enforce_parameter_schema
        assert d.global_concurrency_limit is not None and d.global_concurrency_limit.limit == 2
        assert d.concurrency_options is not None and d.concurrency_options.collision_strategy == "CANCEL_NEW"

        def ask() -> Any:
            return CliRunner().invoke(app, ["wake", FIM], env={"COLUMNS": "400"})

        res = await asyncio.to_thread(ask)
        assert res.exit_code == 0, (res.output, res.exception)
        flows = FlowFilter(name=FlowFilterName(any_=["wake_model"]))

        async def runs() -> list[Any]:
            return [r for r in await client.read_flow_runs(flow_filter=flows) if r.deployment_id == d.id]

        found: list[Any] = []
        async with asyncio.timeout(60):
            while not found:
                found = await runs()
                await asyncio.sleep(0.2)
        try:
            [run] = found
            assert run.parameters["model"] == FIM, run.parameters
            shown = await status(sim)
            assert f"wake pending: {FIM}: requested" in shown and str(run.id) in shown, shown
            # The shared API may still count a worker another test stopped seconds ago as online (until its
            # heartbeats lapse): status says what the server says (test_a_wake_asked_for_by_hand_... checks the "none
            # is online" advice on a pool of its own).
            workers = await client.read_workers_for_work_pool("coder-stack-process")
            if any(w.status.value == "ONLINE" for w in workers):
                assert f"wake pending: {FIM}: requested" in shown and "a worker to pick it up" in shown, shown
            else:
                assert "none is online: start one (`prefect worker start --pool coder-stack-process`)" in shown, shown
        finally:
            for r in found:
                await client.delete_flow_run(r.id)
