"""``coder_stack.orchestration.prefect_api`` against a real Prefect server (the pinned 3.9.1): the endpoints the
adapter posts to answer with the codes and shapes the GPU session relies on, and the tag-limit decrement revokes
leases by their holder's id. The request shapes and the private helpers: tests/unit/test_prefect_adapter.py."""

from __future__ import annotations

from uuid import UUID, uuid4

import httpx
import pytest
from prefect.client.orchestration import PrefectClient, get_client

from coder_stack.orchestration.gpu_limit import GPU_LIMIT, ensure_gpu_limit
from coder_stack.orchestration.prefect_api import lease_of, request_slot, revoke_leases_held_by, slot_client

pytestmark = pytest.mark.usefixtures("gpu_limit")


async def active_slots(client: PrefectClient) -> int:
    return (await client.read_global_concurrency_limit_by_name(GPU_LIMIT)).active_slots


async def renewal_code(client: PrefectClient, lease_id: UUID) -> int:
    try:
        await client.renew_concurrency_lease(lease_id=lease_id, lease_duration=300)
    except httpx.HTTPStatusError as e:
        return e.response.status_code
    return 200


async def test_a_slot_is_granted_with_a_lease_refused_423_when_full_and_a_given_back_lease_is_gone() -> None:
    """What the GPU session reads: 200 with the lease and the limit, 423 when taken, a renewal of a lease given
    back answered 410 (the session takes 404/410 for a lost lease), a second release answered as done."""
    async with slot_client() as client:
        lease = lease_of(await request_slot(client, GPU_LIMIT, 300.0, uuid4()))
        assert [x.name for x in lease.limits] == [GPU_LIMIT] and await active_slots(client) == 1
        with pytest.raises(httpx.HTTPStatusError) as full:
            await request_slot(client, GPU_LIMIT, 300.0, uuid4())
        assert full.value.response.status_code == 423 and await active_slots(client) == 1
        assert await renewal_code(client, lease.lease_id) == 200
        await client.release_concurrency_slots_with_lease(lease_id=lease.lease_id)
        assert await active_slots(client) == 0
        assert await renewal_code(client, lease.lease_id) == 410
        released_again = await client.release_concurrency_slots_with_lease(lease_id=lease.lease_id)
        assert released_again.status_code == 204 and await active_slots(client) == 0


async def test_a_missing_limit_is_granted_with_no_limits() -> None:
    """A slot of a limit that does not exist: 200 with an empty ``limits`` (the session calls that the limit gone)."""
    async with slot_client() as client:
        lease = lease_of(await request_slot(client, "tag:coder-stack-no-such-limit", 300.0, None))
        assert lease.limits == []
        await client.release_concurrency_slots_with_lease(lease_id=lease.lease_id)


async def test_the_tag_limit_decrement_revokes_exactly_the_leases_of_that_holder() -> None:
    """Two runs hold a slot each; revoking one run's leases frees its slot and its lease (renewal 410) and leaves the
    other's held; revoking again, or for a run that holds nothing, changes nothing."""
    await ensure_gpu_limit(2)
    run_a, run_b = uuid4(), uuid4()
    async with get_client() as client:
        a = lease_of(await request_slot(client, GPU_LIMIT, 300.0, run_a))
        b = lease_of(await request_slot(client, GPU_LIMIT, 300.0, run_b))
        assert await active_slots(client) == 2
        await revoke_leases_held_by(client, GPU_LIMIT, uuid4())  # holds nothing
        assert await active_slots(client) == 2
        await revoke_leases_held_by(client, GPU_LIMIT, run_a)
        assert await active_slots(client) == 1
        assert await renewal_code(client, a.lease_id) == 410 and await renewal_code(client, b.lease_id) == 200
        await revoke_leases_held_by(client, GPU_LIMIT, run_a)  # again: nothing left of A's
        assert await active_slots(client) == 1
        await revoke_leases_held_by(client, GPU_LIMIT, run_b)
        assert await active_slots(client) == 0
        assert await renewal_code(client, b.lease_id) == 410
