"""The flow tier's fixtures: one Prefect API for the whole session, and the ``tag:gpu`` limit per test.

``prefect_api``: a Prefect test harness (a local API server on SQLite, ~12-15 s to start), started by the
first flow test that asks for it and shared by every flow module until the session ends; yields its API URL.
Only tests under tests/flows/ can reach it, so the unit and sim tiers never start it.

``gpu_limit``: ``tag:gpu`` = 1 slot before the test; after it no slot may be held (a held slot is freed for
the next test, then the test fails), and no crash automation is left (``drop_crash_automation``). Not autouse:
test_bench and test_secrets_scan need no shared API (they run their own servers, see there); the other modules
ask for it with ``pytestmark``.

Tests that start their own Prefect server keep it (they cannot share this one): test_reliability's server
restart (it must stop and restart the server it holds a slot on), test_secrets_scan (it scans the Prefect
home its server and CLI wrote, which must hold only that test's traces) and test_bench (the benchmark starts
its own harness in its process and measures it). Flow and worker processes of their own
(test_stop_and_cancel, test_reliability's SIGKILL) are pointed at this shared API via ``prefect_api``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from coder_stack.orchestration.gpu_limit import GPU_LIMIT, START_LIMIT, ensure_gpu_limit, ensure_start_limit
from coder_stack.spec import SHARE_SLOTS
from tests.kits.flowkit import drop_crash_automation


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One Prefect test server for every flow test of the session; yields its API URL."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with (
            temporary_settings(updates={PREFECT_SERVER_ANALYTICS_ENABLED: False}),
            prefect_test_harness(server_startup_timeout=60),
        ):
            yield str(PREFECT_API_URL.value())


@pytest.fixture
async def gpu_limit(prefect_api: str) -> AsyncIterator[None]:
    """Every test starts with ``tag:gpu`` = 1 slot (setup's job); none may leave a slot held."""
    await ensure_gpu_limit(1)
    yield
    await drop_crash_automation()
    async with get_client() as client:
        try:
            gcl = await client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            return
        if gcl.active_slots:  # free it for the next test (the API is shared), then fail this one
            await client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(active_slots=0))
    assert gcl.active_slots == 0, f"{GPU_LIMIT} still has {gcl.active_slots} active slot(s) after the test"


@pytest.fixture
async def shared_gpu(gpu_limit: None) -> AsyncIterator[None]:
    """tag:gpu counts hundredths (a time-sliced stack, as setup sizes it) and tag:gpu-start has one slot; after the
    test neither may hold a slot, and the start limit is deleted (the server is shared with exclusive-mode tests)."""
    await ensure_gpu_limit(SHARE_SLOTS)
    await ensure_start_limit(True)
    yield
    async with get_client() as client:
        start = await client.read_global_concurrency_limit_by_name(START_LIMIT)
        await client.delete_global_concurrency_limit_by_name(START_LIMIT)
    assert start.active_slots == 0, f"{START_LIMIT} still has {start.active_slots} slot(s) held after the test"
