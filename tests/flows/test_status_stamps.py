"""`coder-stack status` after a kill: who holds the GPU and each model, live or dead, and advice that never makes
things worse — read through the command's output against a simulated cluster and the shared Prefect server.

A run killed in the middle of a session is live until its heartbeats stop; once it is not alive (Crashed, Failed,
Cancelled or silent) and a model is still stamped with it, `status` names the model, the run and the exact
`coder-stack cleanup RUN_ID`, and says when the clean-up run the trigger started waits for a worker that is not
there. It never advises zeroing ``tag:gpu`` while a lease may exist (that lets two sessions onto the GPU): it
finds a live holder however many other runs the server has, and sends the user to release a dead run's one lease.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from uuid import UUID, uuid4

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed, Running, Scheduled
from simstack.stack import SimStack
from typer.testing import CliRunner

from coder_stack.app.cli import app
from coder_stack.flows.cleanup import clean_up_crashed_run
from coder_stack.orchestration.gpu_limit import GPU_LIMIT
from coder_stack.orchestration.liveness import LEASE_LABEL, heartbeats
from tests.flows.test_crash_cleanup import (
    _validate_named,
    active_slots,
    heartbeat,
    stamp_and_scale,
)
from tests.kits.flowkit import conn, replicas

pytestmark = pytest.mark.usefixtures("gpu_limit")

ZERO_SLOTS = "--active-slots 0"


async def status(sim: SimStack) -> str:
    """`coder-stack status --kubeconfig <the sim's>`, its output on one line."""

    def run() -> str:
        res = CliRunner().invoke(app, ["status", "--kubeconfig", str(sim.kubeconfig_path)], env={"COLUMNS": "400"})
        assert res.exit_code == 0, (res.output, res.exception)
        return " ".join(res.output.split())

    return await asyncio.to_thread(run)


async def holder_run(name: str, candidates: int = 1) -> tuple[UUID, str]:
    """A validate run (by hand, Running) that holds a tag:gpu lease recorded on it. Returns (id, lease id). With
    ``candidates``, that many are made and the one with the smallest id is kept (the server lists runs by id,
    descending: it comes late)."""
    async with get_client() as client:
        made = [
            await client.create_flow_run(flow=_validate_named, name=name, parameters={}, state=Running())
            for _ in range(candidates)
        ]
        fr = min(made, key=lambda r: str(r.id))
        for r in made:
            if r.id != fr.id:
                await client.delete_flow_run(r.id)
        lease = await client.increment_concurrency_slots_with_lease(
            names=[GPU_LIMIT], slots=1, mode="concurrency", lease_duration=300
        )
        lease_id = str(lease.json()["lease_id"])
        await client.update_flow_run_labels(fr.id, {LEASE_LABEL: lease_id})
    return fr.id, lease_id


async def heartbeat_stored(run_id: UUID, name: str) -> None:
    """Send a heartbeat and wait until the server has stored it (events are written in batches)."""
    heartbeat(run_id, name)
    async with get_client() as client:
        for _ in range(300):
            if (await heartbeats(client, run_id))[1] is not None:
                return
            await asyncio.sleep(0.1)
    raise AssertionError("the heartbeat was not stored")


async def test_every_clean_up_run_waiting_for_a_dead_run_is_named_oldest_first() -> None:
    """Two clean-up runs wait for one dead run on two pools no worker serves (the crash automation's, and one
    started by hand on a laptop's pool): both are named, the older first, each with its own pool's worker command.
    Once one was named and the other, the one the user had started, silently left out (CI: an automation
    another test installed on the shared server had started a run of its own)."""
    from coder_stack.orchestration.liveness import waiting_cleanups

    dead = uuid4()
    pools = [f"laptop-{uuid4().hex[:8]}" for _ in range(2)]
    made: list[tuple[UUID, UUID, str]] = []  # (deployment, run, run name)
    async with get_client() as client:
        flow_id = await client.create_flow_from_name("clean_up_crashed_run")
        try:
            for pool in pools:
                await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                dep_id = await client.create_deployment(flow_id=flow_id, name=f"clean-up-{pool}", work_pool_name=pool)
                run = await client.create_flow_run_from_deployment(
                    dep_id, parameters={"crashed_run": f"prefect.flow-run.{dead}"}, state=Scheduled()
                )
                made.append((dep_id, run.id, run.name))
            said = (await waiting_cleanups(client))[dead]
        finally:
            for dep_id, run_id, _ in made:
                await client.delete_flow_run(run_id)
                await client.delete_deployment(dep_id)
            for pool in pools:
                await client.delete_work_pool(pool)
    first, second = (f"its clean-up run {name} ({run_id}) has waited since" for _, run_id, name in made)
    assert first in said and second in said, said
    assert said.index(first) < said.index(second), said  # the older first
    for pool in pools:
        assert f"for a worker on work pool '{pool}' and none is online: start one" in said, said
        assert f"(`prefect worker start --pool {pool}`)" in said, said


async def test_after_a_kill_status_names_the_dead_runs_model_the_cleanup_command_and_the_cleanup_waiting_for_a_worker(
    make_sim: Callable[..., SimStack],
) -> None:
    sim = make_sim()
    rid, _ = await holder_run("killed-mid-session")
    await stamp_and_scale(sim, "coder-chat", str(rid), 1)
    await heartbeat_stored(rid, "killed-mid-session")
    cleanup = f"`coder-stack cleanup {rid}`"

    # Right after the kill: still Running, heartbeat fresh — rightly live, and no clean-up advice for it.
    text = await status(sim)
    assert "validate_coder_stack/killed-mid-session holds the GPU: live (last heartbeat" in text, text
    assert cleanup not in text and ZERO_SLOTS not in text, text

    # The automation marks it Crashed; its trigger starts a clean-up run on a pool no worker serves (a laptop).
    async with get_client() as client:
        await client.set_flow_run_state(rid, Crashed(message="no heartbeat for 60 s"), force=True)
    pool = f"laptop-{uuid4().hex[:8]}"
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = await client.create_flow_from_name("clean_up_crashed_run")
        dep_id = await client.create_deployment(flow_id=flow_id, name=f"clean-up-{pool}", work_pool_name=pool)
        waiting = await client.create_flow_run_from_deployment(
            dep_id, parameters={"crashed_run": f"prefect.flow-run.{rid}"}, state=Scheduled()
        )
    try:
        text = await status(sim)
        assert (
            "coder-chat (1 replica(s), 1 pod(s)) is held by flow run "
            f"validate_coder_stack/killed-mid-session ({rid}), which is not alive (Crashed: no heartbeat for 60 s"
        ) in text, text
        assert f"nothing will scale it down by itself; free it now with {cleanup}" in text, text
        assert (
            f"its clean-up run {waiting.name} ({waiting.id}) has waited since" in text
            and f"for a worker on work pool '{pool}' and none is online: start one" in text
            and f"(`prefect worker start --pool {pool}`)" in text
        ), text
        # Its lease is still there (not expired): release that one lease, never zero the limit.
        assert "ended CRASHED" in text and f"release that lease now: {cleanup}" in text, text
        assert ZERO_SLOTS not in text, text

        # The advice works: the command frees the model and the slot; status then names nothing.
        report = await clean_up_crashed_run(crashed_run=str(rid), connection=conn(sim), settle_s=1.0)
        assert report.outcome.startswith("passed: coder-chat scaled to 0; GPU slot freed"), report
        assert replicas(sim)["coder-chat"] == 0 and await active_slots() == 0
        text = await status(sim)
        assert cleanup not in text and ZERO_SLOTS not in text, text
    finally:
        async with get_client() as client:
            await client.delete_flow_run(waiting.id)
            await client.delete_deployment(dep_id)
            await client.delete_work_pool(pool)


async def test_status_finds_a_live_holder_behind_many_other_running_runs_and_never_advises_zeroing_slots(
    make_sim: Callable[..., SimStack],
) -> None:
    """A shared server: the holder is not among the first 50 RUNNING runs server-wide (runs of another flow come
    first). `status` still finds it live; once it is marked Crashed with its lease still there, the advice is to
    release that one lease (`coder-stack cleanup`), never `prefect gcl update ... --active-slots 0`."""
    sim = make_sim()

    @flow(name="someone-elses-etl")
    def other() -> None:
        """Only its name is used."""

    rid, _ = await holder_run("buried-holder", candidates=8)
    others: list[UUID] = []

    async def first_fifty() -> list[UUID]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
                ),
                limit=50,
            )
        return [r.id for r in runs]

    try:
        async with get_client() as client:
            while rid in await first_fifty():
                for _ in range(20):
                    others.append((await client.create_flow_run(flow=other, state=Running())).id)
                assert len(others) < 2000, "the holder stays among the first 50"
        await heartbeat_stored(rid, "buried-holder")
        text = await status(sim)
        assert "validate_coder_stack/buried-holder holds the GPU: live (last heartbeat" in text, text
        assert ZERO_SLOTS not in text and "no lease exists" not in text, text

        async with get_client() as client:
            await client.set_flow_run_state(rid, Crashed(message="no heartbeat for 60 s"), force=True)
        text = await status(sim)
        assert (
            "validate_coder_stack/buried-holder ended CRASHED" in text
            and f"release that lease now: `coder-stack cleanup {rid}`" in text
        ), text
        assert ZERO_SLOTS not in text, text
        report = await clean_up_crashed_run(crashed_run=str(rid), connection=conn(sim), settle_s=1.0)
        assert report.outcome == "passed: no model left; GPU slot freed", report
        assert await active_slots() == 0
    finally:
        async with get_client() as client:
            for o in others:
                await client.delete_flow_run(o)
            state = (await client.read_flow_run(rid)).state
            if state is not None and not state.is_final():
                await client.set_flow_run_state(rid, Crashed(message="test over"), force=True)
