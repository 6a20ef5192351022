"""A dead run's GPU is freed within 150 s: heartbeats, the crash automation, the clean-up deployment.

What users rely on: a flow run killed with SIGKILL (OOM, a lost node, `kill -9`), or the worker process
running it, leaves no model on the GPU and no held ``tag:gpu`` slot for long — the crash automation
(`coder-stack setup`) marks the silent run Crashed after 60 s without a heartbeat, and its Crashed state
starts the ``clean-up-crashed-run`` deployment (prefect.yaml's trigger, deployed with `prefect deploy`),
which scales to 0 what the dead run holds and frees its slot. A live run, even one waiting minutes for the
GPU, is never touched; `status` tells a dead holder from a live one; the clean-up is safe twice and while
another session holds the GPU.

The real-time tests run the whole chain as deployed: the shared test server's own trigger and action
services, a real process worker on the ``coder-stack-process`` pool (its flow runs get the heartbeat
setting only from prefect.yaml's job variables), and real flow processes killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from coder_stack_dev.bench.crash import crash_chain, worker_env
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterName
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.events import emit_event
from prefect.states import Crashed, Running
from simstack.stack import SimStack

from coder_stack.flows.cleanup import GPU_FLOWS, clean_up_crashed_run
from coder_stack.orchestration.gpu_limit import GPU_LIMIT, gpu_limit_status
from coder_stack.orchestration.liveness import (
    CRASH_AUTOMATION,
    HEARTBEAT_EVENT,
    LEASE_LABEL,
    RELEASED,
    ensure_crash_automation,
    heartbeats,
    server_now,
)
from coder_stack.usecases.stamps import HELD_BY
from tests.kits.flowkit import (
    PREFECT_BIN,
    PROJECT,
    SERVING,
    SLOW_SCALE,
    SPEC,
    conn,
    drop_crash_automation,
    flow_process_env,
    gpu_pods,
    replicas,
    scaled_up,
    start_flow_process,
    stop_group,
    until,
)

pytestmark = pytest.mark.usefixtures("gpu_limit")

POOL = "coder-stack-process"
CLEANUP_DEPLOYMENT = "clean-up-crashed-run"
VALIDATE_DEPLOYMENT = "validate-coder-stack"
# Detection (60 s of silence, then up to 5 s of evaluation), the clean-up's wait of one heartbeat interval plus
# 10 s after the mark (CRASH_SETTLE_S, so a live run whose server lagged keeps its model), then the scale-down.
BOUND_S = 150.0
# The clean-up's wait after a run is marked dead, in the tests that call it directly (production: CRASH_SETTLE_S).
SETTLE_S = 1.0

VALIDATE_CHAT = """
import asyncio, sys
from coder_stack.flows.params import Connection
from coder_stack.flows.validate import ValidateOptions, validate_coder_stack

options = ValidateOptions(stages=["chat"])
asyncio.run(validate_coder_stack(options=options, connection=Connection(kubeconfig=sys.argv[1])))
"""


def held_by(sim: SimStack, model: str) -> str | None:
    def _read(store: Any) -> str | None:
        ann = store.get("deployments", SERVING, model)["metadata"].get("annotations") or {}
        return ann.get(HELD_BY)

    result: str | None = sim.call(_read, sim.store)
    return result


async def run_of_process(started_after: datetime, flow_name: str = "validate_coder_stack") -> FlowRun | None:
    async with get_client() as client:
        # newest first (the server's default order is by random id, and the shared test server keeps every run)
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=20,
        )
        for r in runs:
            if r.created and r.created > started_after:
                return r
    return None


async def lease_label(run_id: UUID) -> str | None:
    async with get_client() as client:
        value = ((await client.read_flow_run(run_id)).labels or {}).get(LEASE_LABEL)
    return None if value is None else str(value)


async def active_slots() -> int:
    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(GPU_LIMIT)).active_slots


async def state_names(run_id: UUID) -> list[str]:
    async with get_client() as client:
        return [s.type.value for s in await client.read_flow_run_states(run_id)]


async def kill_in_cold_start(sim: SimStack, proc: subprocess.Popen[bytes], log: Path, *, group: bool) -> FlowRun:
    """Wait until the run holds the GPU and coder-chat is cold starting, then SIGKILL (the process group
    with ``group``: a worker and the flow process it runs). Returns the killed flow run."""
    t0 = datetime.now(UTC) - timedelta(seconds=5)
    await until(lambda: scaled_up(sim, "coder-chat") or proc.poll() is not None, 90, "coder-chat scaled up")
    assert proc.poll() is None, log.read_text()[-3000:]
    run = None
    for _ in range(100):
        run = await run_of_process(t0)
        if run is not None and (await lease_label(run.id)) not in (None, RELEASED):
            break
        await asyncio.sleep(0.1)
    assert run is not None and (await lease_label(run.id)) not in (None, RELEASED), "the run recorded no GPU lease"
    assert held_by(sim, "coder-chat") == str(run.id)
    assert gpu_pods(sim), "coder-chat has a pod"
    if group:
        # The worker's container dies (OOM, node lost): the worker and the flow process it started (which
        # runs in a session of its own) die together.
        flow_pids = pids_of_run(run.id)
        assert flow_pids, "the worker's flow process was not found"
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in flow_pids:
            os.kill(pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return run


def pids_of_run(run_id: UUID) -> list[int]:
    """Processes whose environment names the flow run (the process worker sets PREFECT__FLOW_RUN_ID)."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in env.read_bytes().split(b"\0"):
                pids.append(int(env.parent.name))
        except OSError:
            continue
    return pids


@dataclass
class Chain:
    """The crash chain as `coder-stack setup` installs it, and a process worker on its pool."""

    env: dict[str, str]
    tmp: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self) -> subprocess.Popen[bytes]:
        log = self.tmp / f"worker-{len(self.workers)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(PREFECT_BIN), "worker", "start", "--pool", POOL, "--install-policy", "never"],
                cwd=PROJECT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.tmp.glob("worker-*.log")))

    def stop(self) -> None:
        for w in self.workers:
            stop_group(w)


async def cleanup_runs() -> list[FlowRun]:
    async with get_client() as client:
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[CLEANUP_DEPLOYMENT]))
        )


@pytest.fixture
async def chain(prefect_api: str, tmp_path: Path) -> AsyncIterator[Chain]:
    """The chain as setup installs it (and removed after: later flow tests share this server, so no automation
    may watch them and no clean-up run may follow them), with a process worker on its pool."""
    async with crash_chain(prefect_api, [CLEANUP_DEPLOYMENT, VALIDATE_DEPLOYMENT]):
        c = Chain(env=worker_env(flow_process_env(prefect_api, tmp_path)), tmp=tmp_path)
        c.start_worker()
        try:
            yield c
        finally:
            c.stop()


async def freed(sim: SimStack, dead: FlowRun, t_kill: float, deadline_s: float = 170) -> tuple[float, float]:
    """Seconds from the kill until the GPU is at 0 (no replicas, no pod) and until the dead run's slot is free."""
    gpu_at = slot_at = None
    while time.monotonic() - t_kill < deadline_s and (gpu_at is None or slot_at is None):
        if gpu_at is None and replicas(sim)["coder-chat"] == 0 and not gpu_pods(sim):
            gpu_at = time.monotonic() - t_kill
        if slot_at is None and await lease_label(dead.id) == RELEASED:
            slot_at = time.monotonic() - t_kill
        await asyncio.sleep(0.5)
    assert gpu_at is not None and slot_at is not None, (gpu_at, slot_at, await cleanup_runs())
    return gpu_at, slot_at


def scale_down_after(sim: SimStack, t_kill: float) -> float | None:
    """On the cluster's timeline: when coder-chat was scaled to 0 after the kill (seconds after it)."""
    for t, ns, name, reps in sim.timeline:
        if ns == SERVING and name == "coder-chat" and reps == 0 and t > t_kill:
            return t - t_kill
    return None


# ------------------------------------------------------------------ the whole chain, in real time
async def test_sigkill_of_a_flow_process_frees_the_gpu_within_150_s_and_a_live_run_is_untouched(
    make_sim: Callable[..., SimStack], prefect_api: str, tmp_path: Path, chain: Chain
) -> None:
    dead_sim = make_sim(gpu_pool="autoscaled", time_scale=SLOW_SCALE)
    live_sim = make_sim()
    for sub in ("dead", "live"):
        (tmp_path / sub).mkdir()
    proc, log = start_flow_process(VALIDATE_CHAT, dead_sim, prefect_api, tmp_path / "dead")
    dead = await kill_in_cold_start(dead_sim, proc, log, group=False)
    t_kill = time.monotonic()
    assert proc.returncode == -signal.SIGKILL
    # A live run queued behind the dead one's slot: it sends heartbeats while it waits and must never be
    # marked Crashed or cleaned up; it gets the GPU once the clean-up frees the slot.
    live_started = datetime.now(UTC)
    live_proc, live_log = start_flow_process(VALIDATE_CHAT, live_sim, prefect_api, tmp_path / "live")
    try:
        gpu_s, slot_s = await freed(dead_sim, dead, t_kill)
        timeline_s = scale_down_after(dead_sim, t_kill)
        print(
            f"SIGKILL (flow process) -> coder-chat scaled to 0 {timeline_s or -1:.1f} s, GPU at 0 {gpu_s:.1f} s, "
            f"slot free {slot_s:.1f} s"
        )
        assert gpu_s <= BOUND_S and slot_s <= BOUND_S, (gpu_s, slot_s)
        assert timeline_s is not None and timeline_s <= gpu_s
        rc = await until(lambda: live_proc.poll() is not None and (live_proc.returncode,), 120, "the live run to end")
    finally:
        if live_proc.poll() is None:
            live_proc.kill()
            live_proc.wait()
    assert rc == (0,), live_log.read_text()[-3000:]
    async with get_client() as client:
        dead_state = (await client.read_flow_run(dead.id)).state
    assert dead_state is not None and dead_state.is_crashed() and "no heartbeat" in (dead_state.message or "")
    runs = await cleanup_runs()
    assert len(runs) == 1, [(r.name, r.parameters) for r in runs]  # for the dead run only
    assert str(dead.id) in runs[0].parameters["crashed_run"]
    await until_final(runs[0].id)
    live = await run_of_process(live_started)
    assert live is not None and live.id != dead.id
    assert "CRASHED" not in await state_names(live.id)
    assert held_by(dead_sim, "coder-chat") is None  # the clean-up cleared the dead run's stamp
    assert await active_slots() == 0


async def test_sigkill_of_the_worker_running_the_flow_frees_the_gpu_within_150_s(
    make_sim: Callable[..., SimStack], chain: Chain
) -> None:
    sim = make_sim(gpu_pool="autoscaled", time_scale=SLOW_SCALE)
    async with get_client() as client:
        dep = await client.read_deployment_by_name(f"validate_coder_stack/{VALIDATE_DEPLOYMENT}")
        await client.create_flow_run_from_deployment(
            dep.id, parameters={"options": {"stages": ["chat"]}, "connection": conn(sim).model_dump(mode="json")}
        )
    worker = chain.workers[0]
    dead = await kill_in_cold_start(sim, worker, chain.tmp / "worker-0.log", group=True)
    t_kill = time.monotonic()
    chain.start_worker()  # the worker's supervisor (Kubernetes, systemd) starts it again
    gpu_s, slot_s = await freed(sim, dead, t_kill)
    print(f"SIGKILL (worker and its flow) -> GPU at 0 {gpu_s:.1f} s, slot free {slot_s:.1f} s")
    assert gpu_s <= BOUND_S and slot_s <= BOUND_S, (gpu_s, slot_s, chain.logs())
    assert await active_slots() == 0
    runs = await cleanup_runs()
    assert [str(dead.id) in r.parameters["crashed_run"] for r in runs] == [True], (
        await state_names(dead.id),
        chain.logs(),
    )
    await until_final(runs[0].id)


async def until_final(run_id: UUID, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            state = (await client.read_flow_run(run_id)).state
            if state is not None and state.is_final():
                assert state.is_completed(), state
                return
            assert time.monotonic() < deadline, state
            await asyncio.sleep(0.5)


# ------------------------------------------------------------------ the clean-up and status, directly
async def test_cleanup_of_a_killed_run_frees_its_model_and_slot_only_and_is_safe_twice(
    make_sim: Callable[..., SimStack], prefect_api: str, tmp_path: Path
) -> None:
    """Killed mid cold start, marked Crashed (as the automation would): the clean-up scales its model to 0,
    waits until the pods are gone, frees its slot — while another session holds a second GPU slot and another
    run holds coder-fim, neither touched. The second run finds nothing."""
    from coder_stack.orchestration.gpu import gpu_session
    from coder_stack.orchestration.gpu_limit import ensure_gpu_limit

    await ensure_gpu_limit(2)
    sim = make_sim(gpu_pool="autoscaled", time_scale=SLOW_SCALE)
    proc, log = start_flow_process(VALIDATE_CHAT, sim, prefect_api, tmp_path)
    dead = await kill_in_cold_start(sim, proc, log, group=False)
    other = "5d0f6a0e-0000-4000-8000-000000000001"

    def other_run_holds_fim(store: Any) -> None:
        dep = store.get("deployments", SERVING, "coder-fim")
        dep["metadata"].setdefault("annotations", {})[HELD_BY] = other
        dep["spec"]["replicas"] = 1
        store.update("deployments", dep)

    sim.call(other_run_holds_fim, sim.store)
    async with get_client() as client:
        await client.set_flow_run_state(dead.id, Crashed(message="no heartbeat for 60 s (test)"), force=True)
    async with gpu_session(30):  # another session holds the other GPU slot meanwhile
        assert await active_slots() == 2
        first = await clean_up_crashed_run(crashed_run=f"prefect.flow-run.{dead.id}", settle_s=SETTLE_S)
        assert await active_slots() == 1  # the dead run's slot only
        second = await clean_up_crashed_run(crashed_run=str(dead.id), settle_s=SETTLE_S)
    assert first.outcome.startswith("passed: coder-chat scaled to 0; GPU slot freed"), first
    assert "coder-chat: scaled to 0" in [n.split(",")[0] for n in first.notes], first.notes
    assert not [p for p in gpu_pods(sim) if p.startswith("coder-chat")]
    assert replicas(sim)["coder-fim"] == 1 and held_by(sim, "coder-fim") == other
    assert second.outcome.startswith("passed: no model left; GPU slot already free"), second
    assert await active_slots() == 0


@pytest.fixture
async def given_back() -> AsyncIterator[list[UUID]]:
    """Leases a test took by hand, given back after it whatever happened: a failed test must not leave a live lease
    that expires minutes later inside another test (its expiry takes a slot off the limit under whoever holds it
    then). The API answers 204 for a lease already released."""
    leases: list[UUID] = []
    yield leases
    async with get_client() as client:
        for lease in leases:
            await client.release_concurrency_slots_with_lease(lease_id=lease)


async def test_a_live_run_is_left_alone_and_status_names_a_dead_holder_and_how_to_free_it(
    make_sim: Callable[..., SimStack], prefect_api: str, given_back: list[UUID]
) -> None:
    """A Running run whose heartbeats stopped 90 s ago and that still holds a slot (no automation installed):
    `status` calls it DEAD with the command to free it now; that command marks it Crashed and frees the slot.
    A run with a fresh heartbeat is alive: the clean-up changes nothing."""
    sim = make_sim()
    async with get_client() as client:
        runs = []
        for name in ("silent-holder", "live-one"):
            fr = await client.create_flow_run(flow=_validate_named, name=name, parameters={})
            await client.set_flow_run_state(fr.id, Running(), force=True)
            runs.append(fr)
        lease = await client.increment_concurrency_slots_with_lease(
            names=[GPU_LIMIT], slots=1, mode="concurrency", lease_duration=300
        )
        lease_id = lease.json()["lease_id"]
        given_back.append(UUID(lease_id))
        await client.update_flow_run_labels(runs[0].id, {LEASE_LABEL: lease_id})
    now = datetime.now(UTC)
    for fr, ago in ((runs[0], 90), (runs[1], 2)):
        emit_event(
            event=HEARTBEAT_EVENT,
            resource={"prefect.resource.id": f"prefect.flow-run.{fr.id}", "prefect.resource.name": fr.name},
            occurred=now - timedelta(seconds=ago),
        )
    # As on a busy server (the whole suite's runs): other events fill the event persister's batch, so the heartbeats
    # are stored at once instead of at its next 5 s flush (the case a clean-clone CI run failed on, see below).
    for _ in range(25):
        emit_event(event="coder-stack.test.filler", resource={"prefect.resource.id": f"coder-stack.test.{uuid4()}"})

    async def both_heartbeats_stored() -> bool:
        st = await gpu_limit_status(GPU_FLOWS)
        return (
            sum(1 for h in st.runs if h.heartbeat_age_s is not None and h.label.endswith(("silent-holder", "live-one")))
            == 2
        )

    deadline = time.monotonic() + 30
    while not await both_heartbeats_stored():
        assert time.monotonic() < deadline, "heartbeat events were not stored"
        await asyncio.sleep(0.1)
    # The clean-up takes a silent run for alive if the server receives a heartbeat of it after the clean-up's look,
    # which it stamps with the server's clock (its Date header: whole seconds, refreshed once a second, later under
    # load). The silent run's one heartbeat, sent 90 s "ago", was received just now: go on once that clock reads past
    # its receipt, as it does in life (a silent run's last heartbeat arrived over SILENT_AFTER_S before).
    async with get_client() as client:
        _, received = await heartbeats(client, runs[0].id)
        assert received is not None
        while await server_now(client) <= received:
            assert time.monotonic() < deadline + 30, f"the server's clock never passed {received}"
            await asyncio.sleep(0.2)
    st = await gpu_limit_status(GPU_FLOWS)
    text = st.describe()
    silent = next(h for h in st.runs if h.label.endswith("silent-holder"))
    alive = next(h for h in st.runs if h.label.endswith("live-one"))
    assert silent.dead and silent.holds_slot and not alive.dead, st
    assert (
        f"validate_coder_stack/silent-holder holds the GPU: DEAD (last heartbeat {silent.heartbeat_age_s:.0f} s ago"
        in text
    )
    assert f"free it now: `coder-stack cleanup {runs[0].id}`" in text and "frees itself by" in text
    assert "validate_coder_stack/live-one running: live (last heartbeat" in text

    kept = await clean_up_crashed_run(crashed_run=str(runs[1].id), connection=conn(sim), settle_s=SETTLE_S)
    assert kept.outcome.startswith("skipped: validate_coder_stack/live-one alive"), kept
    assert (await state_names(runs[1].id))[-1] == "RUNNING"
    freed_report = await clean_up_crashed_run(crashed_run=str(runs[0].id), connection=conn(sim), settle_s=SETTLE_S)
    assert "marked Crashed" in freed_report.notes[0], freed_report.notes
    assert freed_report.outcome == "passed: no model left; GPU slot freed", freed_report
    assert (await state_names(runs[0].id))[-1] == "CRASHED"
    assert await active_slots() == 0
    async with get_client() as client:
        await client.set_flow_run_state(runs[1].id, Crashed(message="test over"), force=True)


@flow(name="validate_coder_stack")
def _validate_named() -> None:
    """Only its name is used: runs of "validate_coder_stack" created by hand, never executed."""


async def test_a_gpu_run_with_rare_heartbeats_refuses_to_start_and_changes_nothing(
    make_sim: Callable[..., SimStack],
) -> None:
    """Prefect's default heartbeat (180 s) would let the crash automation take a live run for dead after 60 s
    and scale its model down under it: the run refuses before anything changes, saying what to set."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from coder_stack.errors import ConfigError
    from coder_stack.flows.swap import SwapOptions, swap_model

    sim = make_sim()
    mark = len(sim.timeline)
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 180}), pytest.raises(ConfigError) as e:
        await swap_model(options=SwapOptions(target="coder-chat"), connection=conn(sim))
    assert "sends a heartbeat every 180 s" in str(e.value) and "PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30" in str(e.value)
    assert sim.timeline[mark:] == []


async def test_setup_installs_the_crash_automation_once_and_repairs_an_edited_one() -> None:
    from prefect.events.schemas.automations import AutomationCore

    await drop_crash_automation()
    try:
        assert (await ensure_crash_automation(list(GPU_FLOWS))).startswith("created")
        assert (await ensure_crash_automation(list(GPU_FLOWS))).endswith("already in place")
        async with get_client() as client:
            [a] = await client.read_automations_by_name(CRASH_AUTOMATION)
            edited = AutomationCore.model_validate(a.model_dump() | {"enabled": False})
            await client.delete_automation(a.id)
            await client.create_automation(edited)
        assert (await ensure_crash_automation(list(GPU_FLOWS))).startswith("replaced")
        async with get_client() as client:
            [a] = await client.read_automations_by_name(CRASH_AUTOMATION)
        assert a.enabled
    finally:
        await drop_crash_automation()


# ------------------------------------------------------------------ a live run marked Crashed; a take-over mid-way
async def hand_made_holder(sim: SimStack, name: str, *, model: str = "coder-chat") -> UUID:
    """A validate run (created by hand, Running) that holds ``model``: stamped with its id and at 1 replica, as its
    GPU session would leave it. Returns its id."""
    async with get_client() as client:
        fr = await client.create_flow_run(flow=_validate_named, name=name, parameters={}, state=Running())
    await stamp_and_scale(sim, model, str(fr.id), 1)
    return fr.id


async def stamp_and_scale(sim: SimStack, model: str, run_id: str, replicas: int) -> None:
    """What a GPU session does (``scale_task(..., held_by=...)``): stamp the model with its run, then scale it."""
    from coder_stack.tasks.cluster import scale_task

    await scale_task.fn(conn(sim).cluster_target(), SPEC, SPEC.model(model), replicas, held_by=run_id)


def heartbeat(run_id: UUID, name: str) -> None:
    emit_event(
        event=HEARTBEAT_EVENT,
        resource={"prefect.resource.id": f"prefect.flow-run.{run_id}", "prefect.resource.name": name},
    )


def changes_of(sim: SimStack, model: str, mark: int) -> list[int]:
    return [reps for _, ns, name, reps in sim.timeline[mark:] if ns == SERVING and name == model]


async def test_a_run_marked_crashed_while_alive_keeps_its_model_when_its_heartbeat_comes_after_the_mark(
    make_sim: Callable[..., SimStack], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The automation acts on missing events, not on a dead process: a run marked Crashed whose next heartbeat
    reaches the server after the mark (within the clean-up's wait) is alive, and the clean-up changes nothing —
    its model stays up and stamped. The heartbeat is sent once the clean-up is deciding (or has decided)."""
    import coder_stack.flows.cleanup as cleanup_module

    sim = make_sim()
    rid = await hand_made_holder(sim, "late-heartbeats")
    heartbeat(rid, "late-heartbeats")
    async with get_client() as client:
        await client.set_flow_run_state(rid, Crashed(message="no heartbeat for 60 s (the server lagged)"), force=True)
    mark = len(sim.timeline)
    deciding = asyncio.Event()
    real = getattr(cleanup_module, "heartbeat_after", None)

    async def watched(*args: Any, **kwargs: Any) -> Any:
        deciding.set()
        assert real is not None
        return await real(*args, **kwargs)

    monkeypatch.setattr(cleanup_module, "heartbeat_after", watched, raising=False)
    # A long wait: the clean-up must decide on the heartbeat's arrival, not on the clock.
    run = asyncio.create_task(clean_up_crashed_run(crashed_run=str(rid), connection=conn(sim), settle_s=300))
    waiting = asyncio.create_task(deciding.wait())
    await asyncio.wait({run, waiting}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    heartbeat(rid, "late-heartbeats")
    report = await asyncio.wait_for(run, 120)
    assert report.outcome.startswith("skipped: validate_coder_stack/late-heartbeats alive"), report
    assert changes_of(sim, "coder-chat", mark) == [] and replicas(sim)["coder-chat"] == 1
    assert held_by(sim, "coder-chat") == str(rid)
    assert (await state_names(rid))[-1] == "CRASHED"  # left as it was: nothing done


async def test_the_cleanup_never_scales_down_or_unstamps_a_model_another_run_took_over_between_its_steps(
    make_sim: Callable[..., SimStack], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dead run's lease expires and a queued session takes the GPU while the clean-up works: (1) between its read
    of the stamps and its scale-down, the session stamps coder-chat and scales it up — the clean-up leaves it
    serving; (2) after the clean-up scaled coder-fim to 0 and its pods are gone, before the stamp is removed, a
    session stamps it — the clean-up keeps that stamp. A cancelled clean-up is finished by the next one."""
    import coder_stack.flows.cleanup as cleanup_module
    import coder_stack.flows.gpu_steps as gpu_steps_module
    import coder_stack.usecases.stamps as stamps_module

    sim = make_sim()
    dead = await hand_made_holder(sim, "dead-holder")
    await stamp_and_scale(sim, "coder-fim", str(dead), 1)
    await until(lambda: gpu_pods(sim), 30, "the dead run's pods")
    async with get_client() as client:
        await client.set_flow_run_state(dead, Crashed(message="no heartbeat for 60 s (test)"), force=True)
    chat_owner, fim_owner = (str(uuid4()), str(uuid4()))
    real_held_by = cleanup_module.held_by

    async def read_then_taken_over(*args: Any, **kwargs: Any) -> Any:
        found = await real_held_by(*args, **kwargs)
        await stamp_and_scale(sim, "coder-chat", chat_owner, 1)  # a session took coder-chat since the read
        return found

    real_wait = stamps_module.wait_gone if hasattr(stamps_module, "wait_gone") else gpu_steps_module.wait_gone

    async def gone_then_stamped(api: Any, namespace: str, selector: str, timeout_s: float) -> Any:
        gone = await real_wait(api, namespace, selector, timeout_s)
        if "coder-fim" in selector:
            await stamp_and_scale(sim, "coder-fim", fim_owner, 0)  # a session stamped it; scales it up later
        return gone

    monkeypatch.setattr(cleanup_module, "held_by", read_then_taken_over)
    for module in (stamps_module, gpu_steps_module):
        monkeypatch.setattr(module, "wait_gone", gone_then_stamped, raising=False)
    mark = len(sim.timeline)
    report = await clean_up_crashed_run(crashed_run=str(dead), connection=conn(sim), settle_s=SETTLE_S)
    assert changes_of(sim, "coder-chat", mark) == [], sim.timeline[mark:]  # never scaled down under its new owner
    assert replicas(sim)["coder-chat"] == 1 and held_by(sim, "coder-chat") == chat_owner
    assert replicas(sim)["coder-fim"] == 0 and held_by(sim, "coder-fim") == fim_owner
    assert report.outcome.startswith("passed: coder-fim scaled to 0"), report
    notes = " ".join(report.notes)
    assert f"coder-chat: left alone: taken over by flow run {chat_owner}" in notes, report.notes
    assert f"stamp kept: taken over by flow run {fim_owner}" in notes, report.notes
    assert await active_slots() == 0


async def test_a_cleanup_cancelled_mid_way_is_finished_by_the_next_and_leaves_no_half_state(
    make_sim: Callable[..., SimStack], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while it waits for the pods to go (after its scale-down): the model is at 0, still stamped with the
    dead run (so no session's stamp is lost); the next clean-up removes the stamp and says there is nothing left."""
    import coder_stack.usecases.stamps as stamps_module

    sim = make_sim()
    dead = await hand_made_holder(sim, "dead-cancelled-cleanup")
    async with get_client() as client:
        await client.set_flow_run_state(dead, Crashed(message="no heartbeat for 60 s (test)"), force=True)
    waiting = asyncio.Event()
    real_wait = stamps_module.wait_gone

    async def block(*args: Any, **kwargs: Any) -> Any:
        waiting.set()
        await asyncio.Event().wait()  # until cancelled
        return await real_wait(*args, **kwargs)

    monkeypatch.setattr(stamps_module, "wait_gone", block)
    first = asyncio.create_task(clean_up_crashed_run(crashed_run=str(dead), connection=conn(sim), settle_s=SETTLE_S))
    await asyncio.wait_for(waiting.wait(), 60)
    first.cancel()
    with pytest.raises(BaseException):
        await first
    assert replicas(sim)["coder-chat"] == 0 and held_by(sim, "coder-chat") == str(dead)
    monkeypatch.setattr(stamps_module, "wait_gone", real_wait)
    second = await clean_up_crashed_run(crashed_run=str(dead), connection=conn(sim), settle_s=SETTLE_S)
    assert second.outcome.startswith("passed:"), second
    assert held_by(sim, "coder-chat") is None and replicas(sim)["coder-chat"] == 0
