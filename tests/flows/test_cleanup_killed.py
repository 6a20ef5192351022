"""A crash clean-up whose own process is killed mid-way leaves nothing unexplained, and the next one finishes it.

The clean-up (``clean_up_crashed_run``) runs in a process of its own against the simulated cluster and the shared
Prefect server, and is SIGKILLed at a point it signals: after its conditional scale-down (the pods gone), before
it removes the dead run's stamps, or after that, before it frees the dead run's GPU slot. Then `coder-stack
status` names what is left (the dead run's slot) with the command that frees it, and a second clean-up finishes
the job — the dead run's models at 0 and unstamped, its slot free — while a run that took over a model and holds
a slot of its own meanwhile keeps both.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.states import Crashed, Running
from simstack.stack import SimStack

from coder_stack.flows.cleanup import clean_up_crashed_run
from coder_stack.orchestration.gpu_limit import GPU_LIMIT, ensure_gpu_limit
from coder_stack.orchestration.liveness import LEASE_LABEL, RELEASED
from tests.flows.test_crash_cleanup import (
    SETTLE_S,
    _validate_named,
    active_slots,
    changes_of,
    held_by,
    lease_label,
    stamp_and_scale,
)
from tests.flows.test_status_stamps import status
from tests.kits.flowkit import PROJECT, conn, flow_process_env, gpu_pods, replicas, sigkill, until

pytestmark = pytest.mark.usefixtures("gpu_limit")

HOOK = "clean-up stopped at"
# The clean-up in a process of its own (argv: kubeconfig, the dead run's id, the kill point). At the kill point it
# prints HOOK and waits for ever (the test SIGKILLs it there); the hook is installed by replacing the function the
# clean-up calls next, so everything before it runs as in production.
KILLABLE_CLEANUP = f"""
import asyncio, sys
import coder_stack.usecases.stamps as stamps
import coder_stack.flows.cleanup as cleanup
from coder_stack.flows.params import Connection

kubeconfig, dead, point = sys.argv[1:4]

async def stop_here(what):
    print({HOOK!r}, what, flush=True)
    await asyncio.Event().wait()

if point == "before-unstamp":
    # every stamp removal waits: the one after coder-fim's scale-down (its pods gone) is the kill point
    async def clear_held(api, spec, model, run_id):
        await stop_here(model.name)
    stamps.clear_held = clear_held
else:
    async def release_lease_of(live, limit_name):
        await stop_here("the slot release")
    cleanup.release_lease_of = release_lease_of

asyncio.run(cleanup.clean_up_crashed_run(crashed_run=dead, connection=Connection(kubeconfig=kubeconfig), settle_s=1.0))
"""


async def dead_validate_run(sim: SimStack, name: str) -> tuple[UUID, str]:
    """A validate run as one killed in its FIM stage leaves it: its chat stage done (coder-chat at 0, still stamped
    with it), coder-fim stamped and serving, its ``tag:gpu`` lease held (holder: the run) and recorded on the run;
    then marked Crashed, as the crash automation does. Returns (run id, lease id)."""
    async with get_client() as client:
        fr = await client.create_flow_run(flow=_validate_named, name=name, parameters={}, state=Running())
        lease = await client.increment_concurrency_slots_with_lease(
            names=[GPU_LIMIT],
            slots=1,
            mode="concurrency",
            lease_duration=300,
            holder=ConcurrencyLeaseHolder(type="flow_run", id=fr.id),
        )
        lease_id = str(lease.json()["lease_id"])
        await client.update_flow_run_labels(fr.id, {LEASE_LABEL: lease_id})
    await stamp_and_scale(sim, "coder-chat", str(fr.id), 0)
    await stamp_and_scale(sim, "coder-fim", str(fr.id), 1)
    await until(lambda: [p for p in gpu_pods(sim) if p.startswith("coder-fim")], 30, "coder-fim's pod")
    async with get_client() as client:
        await client.set_flow_run_state(fr.id, Crashed(message="no heartbeat for 60 s (test)"), force=True)
    return fr.id, lease_id


@pytest.mark.parametrize("point", ["before-unstamp", "before-slot-release"])
async def test_a_cleanup_killed_mid_way_leaves_its_remains_named_by_status_and_the_next_finishes_the_job(
    make_sim: Callable[..., SimStack], prefect_api: str, tmp_path: Path, point: str
) -> None:
    sim = make_sim()
    dead, _ = await dead_validate_run(sim, f"dead-{point}")
    log = tmp_path / "cleanup.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLABLE_CLEANUP, str(sim.kubeconfig_path), str(dead), point],
            cwd=PROJECT,
            env=flow_process_env(prefect_api, tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        stop = f"{HOOK} coder-fim" if point == "before-unstamp" else f"{HOOK} the slot release"
        await until(lambda: stop in log.read_text() or proc.poll() is not None, 120, f"the clean-up at {point}")
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        sigkill(proc)
    assert proc.returncode == -signal.SIGKILL

    # What the killed clean-up left: its scale-down done (coder-fim at 0, no pod), the dead run's slot still held;
    # the stamps still name the dead run (killed before their removal) or are gone (killed after it).
    assert replicas(sim)["coder-fim"] == 0 and replicas(sim)["coder-chat"] == 0 and not gpu_pods(sim)
    left_stamp = str(dead) if point == "before-unstamp" else None
    assert held_by(sim, "coder-fim") == left_stamp and held_by(sim, "coder-chat") == left_stamp
    assert await active_slots() == 1
    text = await status(sim)
    assert f"release that lease now: `coder-stack cleanup {dead}`" in text, text

    # Meanwhile another run takes the second GPU and takes coder-chat over (stamps it, scales it up).
    await ensure_gpu_limit(2)
    other = str(uuid4())
    async with get_client() as client:
        other_lease = await client.increment_concurrency_slots_with_lease(
            names=[GPU_LIMIT],
            slots=1,
            mode="concurrency",
            lease_duration=300,
            holder=ConcurrencyLeaseHolder(type="flow_run", id=UUID(other)),
        )
    try:
        await stamp_and_scale(sim, "coder-chat", other, 1)
        assert await active_slots() == 2
        mark = len(sim.timeline)
        report = await clean_up_crashed_run(crashed_run=str(dead), connection=conn(sim), settle_s=SETTLE_S)
        assert report.outcome == "passed: no model left; GPU slot freed", report
        assert f"GPU slot freed ({GPU_LIMIT}: 2 -> 1 held)" in report.notes, report.notes
        assert changes_of(sim, "coder-chat", mark) == [] and replicas(sim)["coder-chat"] == 1
        assert held_by(sim, "coder-chat") == other  # the other run's model: never scaled down nor unstamped
        assert replicas(sim)["coder-fim"] == 0 and held_by(sim, "coder-fim") is None
        assert await active_slots() == 1  # the other run's slot only
        assert await lease_label(dead) == RELEASED
        assert f"coder-stack cleanup {dead}" not in await status(sim)
    finally:
        async with get_client() as client:
            await client.release_concurrency_slots_with_lease(lease_id=other_lease.json()["lease_id"])
    assert await active_slots() == 0
