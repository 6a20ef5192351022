"""The GPU slot request when the Prefect server answers 503 (on SQLite: SQLITE_BUSY_SNAPSHOT, the request's
transaction lost to a concurrent write and was rolled back), against the flow tier's session harness.

The 503s are made below Prefect's client, in httpx's transport: for the first N ``increment-with-lease``
requests the transport answers 503 itself (the server's own body, no Retry-After) without forwarding them,
as a rolled-back request leaves the server unchanged; every other request goes to the real server. So
Prefect's HTTP client sees exactly what SQLite's 503 looks like, and would retry it after 2 s, 4 s, ... if
the request were still sent through its retries. What users rely on: a 503 is asked again within tens of
milliseconds and the session gets the GPU; a 503 that persists fails the session after the bound with a
clear, retriable error and no slot held.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
from prefect.client.orchestration import get_client

from coder_stack.errors import RetriableError
from coder_stack.orchestration import gpu
from coder_stack.orchestration.gpu import GPU_LIMIT, gpu_session

pytestmark = pytest.mark.usefixtures("gpu_limit")

SLOT_REQUEST = "/v2/concurrency_limits/increment-with-lease"


class Busy503:
    """Answers the first ``n`` slot requests with the server's 503; records every slot request's time and status."""

    def __init__(self, n: float) -> None:
        self.n = n
        self.attempts: list[tuple[float, int]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        orig = httpx.AsyncHTTPTransport.handle_async_request

        async def handle(transport: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
            if not request.url.path.endswith(SLOT_REQUEST):
                return await orig(transport, request)
            if sum(1 for _, s in self.attempts if s == 503) < self.n:
                self.attempts.append((time.monotonic(), 503))
                return httpx.Response(503, json={"exception_message": "Service Unavailable"}, request=request)
            response = await orig(transport, request)
            self.attempts.append((time.monotonic(), response.status_code))
            return response

        monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", handle)

    @property
    def statuses(self) -> list[int]:
        return [s for _, s in self.attempts]


@pytest.fixture
def busy(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], Busy503]:
    def make(n: float) -> Busy503:
        b = Busy503(n)
        b.install(monkeypatch)
        return b

    return make


async def active_slots() -> int:
    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(GPU_LIMIT)).active_slots


async def test_a_503_to_the_slot_request_is_asked_again_within_tens_of_ms_and_the_session_gets_the_gpu(
    busy: Callable[[float], Busy503],
) -> None:
    b = busy(3)
    held: list[int] = []
    async with asyncio.timeout(5):  # Prefect's own retry would wait 2 + 4 + 8 s
        async with gpu_session(timeout_s=60):
            granted = time.monotonic()
            held.append(await active_slots())
    assert b.statuses == [503, 503, 503, 200], b.attempts
    first_503 = b.attempts[0][0]
    gaps = [t2 - t1 for (t1, _), (t2, _) in zip(b.attempts, b.attempts[1:], strict=False)]
    assert all(g < 0.25 for g in gaps), f"retried after {gaps} s"
    assert granted - first_503 < 0.5, f"the GPU was granted {granted - first_503:.2f} s after the first 503"
    assert held == [1]
    assert await active_slots() == 0  # released at the end of the session


async def test_a_503_that_persists_fails_the_session_after_the_bound_with_no_slot_held(
    busy: Callable[[float], Busy503], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu, "BUSY_BOUND_SECONDS", 0.5)  # 5 s in production; the test need not wait that long
    b = busy(float("inf"))
    t0 = time.monotonic()
    with pytest.raises(RetriableError, match=r"answered 503 .* no GPU slot is held") as err:
        async with asyncio.timeout(3):  # Prefect's own retries would take 2 + 4 + 8 + 16 + 32 s
            async with gpu_session(timeout_s=60):
                pytest.fail("entered the session without a slot")
    elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < 2.0, f"gave up after {elapsed:.2f} s"
    assert len(b.attempts) >= 5 and set(b.statuses) == {503}, b.attempts  # asked every 20-50 ms meanwhile
    assert "Retry the flow run" in str(err.value)
    assert await active_slots() == 0
    # and the next session, once the server answers again, gets the GPU at once
    b.n = 0
    async with asyncio.timeout(5), gpu_session(timeout_s=60):
        assert await active_slots() == 1


async def test_sessions_queued_in_one_process_share_one_slot_client_and_the_next_asks_at_the_release(
    busy: Callable[[float], Busy503], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queued session of the same process is woken by the release (not by its 5 s poll) and asks at once;
    the whole queue uses one slot client, made once and closed when the last session has its slot."""
    b = busy(0)
    made: list[object] = []
    closed: list[object] = []
    orig = gpu._slot_client

    class Counting:
        """The real slot client, entered and exited through this wrapper (``async with`` looks on the type)."""

        def __init__(self) -> None:
            self.client = orig()
            made.append(self.client)

        async def __aenter__(self) -> object:
            return await self.client.__aenter__()

        async def __aexit__(self, *exc: object) -> None:
            closed.append(self.client)
            await self.client.__aexit__(*exc)

    def counting() -> Counting:
        return Counting()

    monkeypatch.setattr(gpu, "_slot_client", counting)
    labels: list[tuple[float, str]] = []

    async def record_lease(lease_id: object) -> None:
        labels.append((time.monotonic(), "lease" if lease_id else "released"))

    monkeypatch.setattr(gpu, "record_lease", record_lease)
    released: list[float] = []
    granted: list[float] = []

    async def session(hold_s: float) -> None:
        async with gpu_session(timeout_s=30, poll_s=5.0):
            granted.append(time.monotonic())
            await asyncio.sleep(hold_s)
        released.append(time.monotonic())

    async with asyncio.timeout(20):
        await asyncio.gather(session(0.5), session(0.2), session(0.1))
    assert len(granted) == 3 and granted == sorted(granted)
    for freed, next_grant in zip(released, granted[1:], strict=False):
        # released[i] is taken after the release call returned; the next grant follows within tens of ms
        assert next_grant - freed < 0.3, f"the next session got the GPU {next_grant - freed:.2f} s after the release"
    assert len(made) == 1, f"{len(made)} slot clients for one queue"
    await asyncio.sleep(0.1)
    assert closed == made, "the queue's slot client was left open"
    assert [r for r, _ in b.attempts] and set(b.statuses) == {200}
    # each "released" label is written after the next session's slot request, not racing it
    requests = [t for t, _ in b.attempts]
    released_labels = [t for t, what in labels if what == "released"]
    assert len(released_labels) == 3
    for label_t, next_request in zip(released_labels, requests[1:], strict=False):
        assert label_t > next_request, "the released label was written before the next session asked"
    assert await active_slots() == 0


async def test_the_first_session_of_a_process_freezes_its_start_up_heap_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the freeze a full garbage collection no longer walks the ~280,000 start-up objects (0.2-0.4 s, a
    pause that fell into hand-offs); a second session does not collect again."""
    import gc

    monkeypatch.setattr(gpu, "_FROZEN", False)
    collects: list[int] = []
    real_collect = gc.collect

    def counting_collect(*a: int) -> int:
        collects.append(1)
        return real_collect(*a)

    monkeypatch.setattr(gc, "collect", counting_collect)
    before = gc.get_freeze_count()
    try:
        async with gpu_session(timeout_s=30):
            pass
        frozen = gc.get_freeze_count()
        async with gpu_session(timeout_s=30):
            pass
    finally:
        gc.unfreeze()
    assert frozen > max(before, 100_000) and len(collects) == 1
