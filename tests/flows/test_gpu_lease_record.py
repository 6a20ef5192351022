"""A GPU session's lease is on record from the instant it is granted: the crash clean-up frees the slot of a
run killed at any point after the grant, and never a live run's.

The slot request names the flow run as the lease's holder, and the server stores the holder with the lease in
the same request (Prefect's lease storage). ``release_lease_of`` (what the clean-up calls) gives back the
lease the run's label records and every lease the server holds for that run; the label itself is written
beside the session and may not exist yet when the run dies. A clean-up cancelled anywhere inside
``release_lease_of`` is finished by the next: the slot ends free and labelled released, a live run's never freed.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.states import Crashed, Running

from coder_stack.flows.cleanup import GPU_FLOWS
from coder_stack.orchestration import gpu
from coder_stack.orchestration.gpu import gpu_session
from coder_stack.orchestration.gpu_limit import GPU_LIMIT, ensure_gpu_limit, gpu_limit_status
from coder_stack.orchestration.liveness import LEASE_LABEL, RunLiveness, read_liveness, release_lease_of
from tests.flows.test_crash_cleanup import _validate_named
from tests.kits.flowkit import PROJECT, flow_process_env

pytestmark = pytest.mark.usefixtures("gpu_limit")

FLOW = "killed_right_after_the_gpu_grant"
# A flow run that SIGKILLs itself the moment the server's grant is in its hands: before the session's body,
# the lease label or anything else runs. It prints its run id first.
KILLED_AFTER_GRANT = f"""
import asyncio, os, signal
from prefect import flow
from prefect.context import FlowRunContext
from coder_stack.orchestration import gpu

take = gpu._take_slot

async def take_then_die(client):
    lease = await take(client)
    if lease is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return lease

gpu._take_slot = take_then_die

@flow(name="{FLOW}")
async def killed():
    print("run", FlowRunContext.get().flow_run.id, flush=True)
    async with gpu.gpu_session(timeout_s=60):
        print("entered the session", flush=True)

asyncio.run(killed())
"""


async def active_slots() -> int:
    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(GPU_LIMIT)).active_slots


@pytest.fixture
def holder(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[UUID]]:
    """In-process sessions hold their leases as a flow run would: the holder is the id last put in the list."""
    ids: list[UUID] = []
    monkeypatch.setattr(gpu, "holder_run_id", lambda: ids[-1] if ids else None)

    async def no_label(run_id: UUID, lease_id: UUID | None, slots: int = 1) -> bool:
        return True  # as if written: the holder id alone must find the lease

    monkeypatch.setattr(gpu, "record_lease", no_label)
    yield ids


async def test_a_run_killed_at_the_first_instant_after_the_grant_has_its_slot_freed_by_the_crash_clean_up(
    prefect_api: str, tmp_path: Path
) -> None:
    env = flow_process_env(prefect_api, tmp_path) | {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", KILLED_AFTER_GRANT],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        timeout=120,
    )
    out = proc.stdout.decode()
    assert proc.returncode == -signal.SIGKILL, out + proc.stderr.decode()
    assert "entered the session" not in out, out
    run_id = UUID(out.split("run ", 1)[1].split()[0])
    assert await active_slots() == 1  # the dead run's slot: held until its lease expires (300 s) ...
    live = await read_liveness(run_id)
    assert live.lease_id is None  # ... and no label records it: the kill came first
    said = await release_lease_of(live, GPU_LIMIT)  # what the crash clean-up does
    assert await active_slots() == 0, said
    assert said.text == f"GPU slot freed ({GPU_LIMIT}: 1 -> 0 held)"
    assert (await read_liveness(run_id)).lease_released
    # and the next session gets the GPU at once
    async with asyncio.timeout(30), gpu_session(timeout_s=30):
        assert await active_slots() == 1
    async with get_client() as client:
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW])))
    assert [r.id for r in runs] == [run_id]


async def test_the_clean_up_of_one_run_never_frees_a_live_run_s_slot_and_frees_its_own_beside_it(
    holder: list[UUID],
) -> None:
    """Two actors: a live session holds the GPU for run A; the clean-up of a dead run B (which holds nothing
    any more) runs meanwhile and leaves A's slot alone; then B holds the GPU, A's clean-up leaves it alone and
    B's own clean-up frees it."""
    run_a, run_b = uuid4(), uuid4()
    holder.append(run_a)
    async with gpu_session(timeout_s=30):
        assert await active_slots() == 1
        said = await release_lease_of(RunLiveness(run_id=run_b), GPU_LIMIT)
        assert said.text == "no GPU slot recorded as held"
        assert await active_slots() == 1  # A still holds the GPU
    assert await active_slots() == 0
    # B takes the slot; A's clean-up (A has given its lease back) must not free B's
    holder.append(run_b)
    async with gpu_session(timeout_s=30):
        said = await release_lease_of(RunLiveness(run_id=run_a), GPU_LIMIT)
        assert said.text == "no GPU slot recorded as held" and await active_slots() == 1
        said = await release_lease_of(RunLiveness(run_id=run_b), GPU_LIMIT)
        assert said.text == f"GPU slot freed ({GPU_LIMIT}: 1 -> 0 held)" and await active_slots() == 0
    assert await active_slots() == 0  # the session's own release of a lease already freed changes nothing


# A cancellation inside ``release_lease_of`` (the clean-up cancelled, or its process stopped there): the call it
# is in when cancelled; "sent" — the request reached the server and was applied, the answer never arrived.
CANCEL_POINTS = [
    ("labelled", "release_concurrency_slots_with_lease", "unsent"),
    ("labelled", "decrement_v1_concurrency_slots", "unsent"),
    ("labelled", "decrement_v1_concurrency_slots", "sent"),
    ("labelled", "update_flow_run_labels", "unsent"),
    ("labelled", "update_flow_run_labels", "sent"),
    ("unlabelled", "decrement_v1_concurrency_slots", "unsent"),
    ("unlabelled", "decrement_v1_concurrency_slots", "sent"),
    ("unlabelled", "update_flow_run_labels", "unsent"),
    ("unlabelled", "update_flow_run_labels", "sent"),
]


@pytest.mark.parametrize(("record", "call", "sent"), CANCEL_POINTS)
async def test_a_slot_release_cancelled_mid_way_is_finished_by_a_rerun_and_never_frees_a_live_run_s_slot(
    holder: list[UUID], monkeypatch: pytest.MonkeyPatch, record: str, call: str, sent: str
) -> None:
    """A dead run holds a slot (its lease recorded on it, or not: killed right after the grant) while a live
    session holds the other; the dead run's clean-up is cancelled inside ``release_lease_of`` — before the labelled
    lease's release, between it and the by-holder release, or during the label write. The rerun frees the dead
    run's slot and labels it released (so `status` never names the dead run again), and the live slot stays held
    throughout."""
    await ensure_gpu_limit(2)
    async with get_client() as client:
        dead = (await client.create_flow_run(flow=_validate_named, name="dead-holder", state=Running())).id
        lease = await client.increment_concurrency_slots_with_lease(
            names=[GPU_LIMIT],
            slots=1,
            mode="concurrency",
            lease_duration=300,
            holder=ConcurrencyLeaseHolder(type="flow_run", id=dead),
        )
        if record == "labelled":
            await client.update_flow_run_labels(dead, {LEASE_LABEL: str(lease.json()["lease_id"])})
        await client.set_flow_run_state(dead, Crashed(message="no heartbeat for 60 s (test)"), force=True)
    reached = asyncio.Event()
    armed = [True]
    real = getattr(PrefectClient, call)

    async def stopped_here(self: PrefectClient, *args: object, **kwargs: object) -> object:
        if not armed[0]:
            return await real(self, *args, **kwargs)
        armed[0] = False
        if sent == "sent":
            await real(self, *args, **kwargs)
        reached.set()
        await asyncio.Event().wait()  # until cancelled
        raise AssertionError("not cancelled")

    monkeypatch.setattr(PrefectClient, call, stopped_here)
    live = uuid4()
    holder.append(live)
    async with gpu_session(timeout_s=30):
        assert await active_slots() == 2
        first = asyncio.create_task(release_lease_of(await read_liveness(dead), GPU_LIMIT))
        await asyncio.wait_for(reached.wait(), 30)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await active_slots() >= 1  # the live slot was never freed
        said = await release_lease_of(await read_liveness(dead), GPU_LIMIT)  # the rerun
        assert await active_slots() == 1, said  # the dead run's slot free, the live one held
        assert (await read_liveness(dead)).lease_released, said
        # the live session's lease is not on record (the fixture writes no label): a slot `status` cannot account
        # for, yet the dead run is not named as one that may hold it — its leases were given back
        text = (await gpu_limit_status(GPU_FLOWS)).describe()
        assert str(dead) not in text, text
    assert await active_slots() == 0
