"""A GPU session whose lease is lost (revoked, expired, forgotten by a restarted server) is stopped, and its own
clean-up still runs to the end: the flows' ``finally: release(...)`` runs inside the session, and with Prefect's
cancel scope every await of it was cancelled (the model stayed up, the run ended Crashed). The session then
ends with GpuLeaseLost, which the run's report shows.

Renewals are made every 50 ms here (every 225 s in production) and the lease is revoked on the server.
"""

from __future__ import annotations

import asyncio
from uuid import UUID

import pytest
from prefect.client.orchestration import PrefectClient, get_client

from coder_stack.orchestration import gpu
from coder_stack.orchestration.gpu import GpuLeaseLost, gpu_session
from coder_stack.orchestration.gpu_limit import GPU_LIMIT

pytestmark = pytest.mark.usefixtures("gpu_limit")


async def active_slots() -> int:
    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(GPU_LIMIT)).active_slots


@pytest.fixture
def leases(monkeypatch: pytest.MonkeyPatch) -> list[UUID]:
    """Renew every 50 ms; the ids of the leases the sessions are granted."""
    monkeypatch.setattr(gpu, "RENEW_EVERY_S", 0.05)
    granted: list[UUID] = []
    take = gpu._take_slot

    async def spy(client: PrefectClient) -> object:
        lease = await take(client)
        if lease is not None:
            granted.append(lease.lease_id)
        return lease

    monkeypatch.setattr(gpu, "_take_slot", spy)
    return granted


async def test_a_lost_lease_stops_the_session_and_its_clean_up_still_completes_every_await(
    leases: list[UUID],
) -> None:
    steps: list[str] = []
    with pytest.raises(GpuLeaseLost, match=r"lease was lost .* answered 410 .* its clean-up ran; rerun") as err:
        async with asyncio.timeout(60), gpu_session(timeout_s=30):
            try:
                async with get_client() as client:  # the lease revoked on the server
                    await client.release_concurrency_slots_with_lease(lease_id=leases[0])
                steps.append("revoked")
                await asyncio.Event().wait()  # the session's work: runs until something stops it
            finally:
                # the flow's clean-up: awaited "scale-downs", one of them a round trip to a server
                await asyncio.sleep(0)
                async with get_client() as client:
                    await client.read_global_concurrency_limit_by_name(GPU_LIMIT)
                steps.append("scaled down")
                await asyncio.sleep(0)
                steps.append("waited until gone")
    assert steps == ["revoked", "scaled down", "waited until gone"]
    assert "GPU slot (tag:gpu) lease was lost" in str(err.value)
    assert await active_slots() == 0
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # no cancellation left behind


async def test_a_session_whose_renewals_succeed_is_never_stopped_and_a_cancellation_from_outside_stays_one(
    leases: list[UUID], monkeypatch: pytest.MonkeyPatch
) -> None:
    renewals: list[UUID] = []
    renewed_thrice = asyncio.Event()
    renew = PrefectClient.renew_concurrency_lease

    async def counting(self: PrefectClient, lease_id: UUID, lease_duration: float) -> object:
        response = await renew(self, lease_id=lease_id, lease_duration=lease_duration)
        renewals.append(lease_id)
        if len(renewals) >= 3:
            renewed_thrice.set()
        return response

    monkeypatch.setattr(PrefectClient, "renew_concurrency_lease", counting)
    async with asyncio.timeout(60), gpu_session(timeout_s=30):
        await renewed_thrice.wait()
        assert await active_slots() == 1
    assert set(renewals) == {leases[0]}
    assert await active_slots() == 0

    holding = asyncio.Event()

    async def held_until_cancelled() -> None:
        async with gpu_session(timeout_s=30):
            holding.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(held_until_cancelled())
    async with asyncio.timeout(60):
        await holding.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await active_slots() == 0
