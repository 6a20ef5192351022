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
from contextvars import ContextVar
from uuid import UUID, uuid4

import pytest
from prefect.client.orchestration import get_client

from coder_stack.errors import RetriableError
from coder_stack.orchestration import gpu
from coder_stack.orchestration.gpu import gpu_session
from coder_stack.orchestration.gpu_limit import GPU_LIMIT
from coder_stack.orchestration.prefect_api import ServerBusy
from tests.kits.prefect_busy import Busy503

pytestmark = pytest.mark.usefixtures("gpu_limit")


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
    # Prefect's own retry would wait 2 + 4 + 8 s: a bound far from both (the latency itself is the benchmark's)
    async with asyncio.timeout(10):
        async with gpu_session(timeout_s=60):
            held.append(await active_slots())
    # the three 503s made here, then the GPU; a real SQLite 503 from the server in between (seen on a loaded CI
    # machine) is asked again the same way
    assert b.statuses[:3] == [503, 503, 503] and b.statuses[-1] == 200, b.attempts
    assert set(b.statuses[3:-1]) <= {503}, b.attempts
    assert held == [1]
    assert await active_slots() == 0  # released at the end of the session


async def test_a_503_that_persists_fails_the_session_after_the_bound_with_no_slot_held(
    busy: Callable[[float], Busy503], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu, "BUSY_BOUND_SECONDS", 0.5)  # 5 s in production; the test need not wait that long
    b = busy(float("inf"))
    t0 = time.monotonic()
    with pytest.raises(RetriableError, match=r"answered 503 .* no GPU slot is held") as err:
        async with asyncio.timeout(20):  # Prefect's own retries would take 2 + 4 + 8 + 16 + 32 s
            async with gpu_session(timeout_s=60):
                pytest.fail("entered the session without a slot")
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.5, f"gave up after {elapsed:.2f} s, before the bound"
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
    """A queued session of the same process is woken by the release (its poll comes after an hour) and asks
    once; sessions get the GPU in arrival order; the whole queue uses one slot client, made once and closed
    when the last session has its slot; each run's lease is labelled once held and once released, and the
    released label is written after the next session asked (it raced that request on SQLite).

    Each session runs as a flow run of its own (the holder is a run id per session). Labels are counted by
    run id: a late label of an earlier test's run (its "released" waits up to RELEASED_LABEL_WAIT_S for the
    next grant) is not this test's; that is what once counted 4 "released" labels for 3 sessions."""
    b = busy(0)
    made: list[object] = []
    closed: list[object] = []
    orig = gpu.slot_client

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

    monkeypatch.setattr(gpu, "slot_client", counting)
    runs = [uuid4() for _ in range(3)]
    index = {run: i for i, run in enumerate(runs)}
    current: ContextVar[UUID | None] = ContextVar("flow_run", default=None)
    monkeypatch.setattr(gpu, "holder_run_id", current.get)
    log: list[tuple[str, int]] = []  # what happened, in order
    all_released = asyncio.Event()

    async def record_lease(run_id: UUID, lease_id: UUID | None, slots: int = 1) -> bool:
        if run_id in index:
            log.append(("lease" if lease_id else "released", index[run_id]))
            if sum(1 for what, _ in log if what == "released") == len(runs):
                all_released.set()
        return True

    monkeypatch.setattr(gpu, "record_lease", record_lease)
    request = gpu._request_slot

    async def asking(client: object) -> object:
        run = current.get()
        assert run is not None
        log.append(("asked", index[run]))
        at = len(log) - 1
        try:
            return await request(client)  # type: ignore[arg-type]
        except ServerBusy:  # SQLite's write conflict, asked again by design within ms: not a second ask of its own
            log[at] = ("busy", index[run])
            raise

    monkeypatch.setattr(gpu, "_request_slot", asking)

    async def session(i: int) -> None:
        current.set(runs[i])
        async with gpu_session(timeout_s=60, poll_s=3600.0):
            log.append(("granted", i))
            await asyncio.sleep(0)

    async with asyncio.timeout(60):
        await asyncio.gather(*(session(i) for i in range(len(runs))))
        await all_released.wait()
        await asyncio.gather(*list(gpu._PENDING), return_exceptions=True)  # the slot client's task, the labels
    assert [i for what, i in log if what == "granted"] == [0, 1, 2], log  # in arrival order
    assert [i for what, i in log if what == "asked"] == [0, 1, 2], log  # each asked once: woken by the release
    for i in range(len(runs)):
        assert [what for what, j in log if j == i and what in ("lease", "released")] == ["lease", "released"], log
    for i in range(len(runs) - 1):
        assert log.index(("released", i)) > log.index(("asked", i + 1)), log
    # one granted request per session; any other answer is a real SQLite 503 from the server (seen on a loaded CI
    # machine), each one a "busy" entry above, asked again at once and not a second ask of the session
    assert b.statuses.count(200) == len(runs), b.attempts
    assert set(b.statuses) <= {200, 503}, b.attempts
    assert b.statuses.count(503) == sum(1 for what, _ in log if what == "busy"), (b.attempts, log)
    assert len(made) == 1, f"{len(made)} slot clients for one queue"
    assert closed == made, "the queue's slot client was left open"
    assert await active_slots() == 0


async def test_a_late_released_label_never_covers_the_same_run_s_next_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    """One flow run, two sessions in a row, the second queued: the first lease's "released" label waits for
    the next grant in this process — the run's own second lease — and must not be written over it (the
    clean-up and `status` would then take the run for holding nothing)."""
    run = uuid4()
    monkeypatch.setattr(gpu, "holder_run_id", lambda: run)
    labels: list[UUID | None] = []

    async def record_lease(run_id: UUID, lease_id: UUID | None, slots: int = 1) -> bool:
        if run_id == run:
            labels.append(lease_id)
        return True

    monkeypatch.setattr(gpu, "record_lease", record_lease)
    second_holds = asyncio.Event()
    checked = asyncio.Event()
    leases: list[UUID] = []

    async def first() -> None:
        async with gpu_session(timeout_s=60, poll_s=3600.0):
            await asyncio.sleep(0)

    async def second() -> None:
        async with gpu_session(timeout_s=60, poll_s=3600.0):
            second_holds.set()
            await checked.wait()

    async with asyncio.timeout(60):
        tasks = [asyncio.ensure_future(first()), asyncio.ensure_future(second())]
        await second_holds.wait()
        # every label write and the first lease's "released" timer (woken by this grant) are done
        await asyncio.gather(*list(gpu._PENDING), return_exceptions=True)
        leases = [lease for lease in labels if lease is not None]
        assert len(leases) == 2 and labels[-1] == leases[1], labels  # the run holds its second lease
        checked.set()
        await asyncio.gather(*tasks)
        await asyncio.gather(*list(gpu._PENDING), return_exceptions=True)
    assert labels == [leases[0], leases[1], None], labels  # each written once, the last one "released"
    assert await active_slots() == 0


async def test_a_lease_label_the_server_did_not_take_is_written_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A label write that fails (a busy SQLite answers 503 under load) is written again: otherwise a lease given
    back keeps its "held" label and `status` names the ended run as still holding the GPU."""
    run = uuid4()
    monkeypatch.setattr(gpu, "holder_run_id", lambda: run)
    monkeypatch.setattr(gpu, "LABEL_RETRY_S", (0.01, 0.01, 0.01))
    calls: list[UUID | None] = []

    async def record_lease(run_id: UUID, lease_id: UUID | None, slots: int = 1) -> bool:
        calls.append(lease_id)
        return len(calls) not in (1, 3, 4)  # the first "held" and the first two "released" writes fail

    monkeypatch.setattr(gpu, "record_lease", record_lease)
    async with asyncio.timeout(60):
        async with gpu_session(timeout_s=60):
            pass
        while gpu._PENDING:
            await asyncio.gather(*list(gpu._PENDING), return_exceptions=True)
    assert len(calls) == 5 and calls[0] == calls[1] is not None and calls[2:] == [None, None, None], calls
    assert await active_slots() == 0


async def test_lease_labels_written_while_sessions_queue_use_the_queue_s_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lease-label write made its own Prefect client (its TLS context: 20-50 ms of CPU, more on a loaded machine)
    on the event loop right at a hand-off: the granted run's "held" label and the run before's "released" one.
    While sessions of the process queue, they write through the queue's client instead; no other is made."""
    made: list[object] = []
    orig = gpu.slot_client

    def counting() -> object:
        made.append(orig())
        return made[-1]

    monkeypatch.setattr(gpu, "slot_client", counting)
    runs = [uuid4() for _ in range(3)]  # not on the server: the label write is answered 404, taken as done
    index = {run: i for i, run in enumerate(runs)}
    current: ContextVar[UUID | None] = ContextVar("flow_run", default=None)
    monkeypatch.setattr(gpu, "holder_run_id", current.get)
    real_record = gpu.record_lease
    wrote: dict[tuple[int, str], bool] = {}

    async def record_lease(run_id: UUID, lease_id: UUID | None, slots: int = 1) -> bool:
        wrote[(index[run_id], "held" if lease_id else "released")] = get_client() is made[0]
        return await real_record(run_id, lease_id, slots)

    monkeypatch.setattr(gpu, "record_lease", record_lease)

    async def session(i: int) -> None:
        current.set(runs[i])
        async with gpu_session(timeout_s=60, poll_s=3600.0):
            await asyncio.sleep(0)

    async with asyncio.timeout(60):
        await asyncio.gather(*(session(i) for i in range(len(runs))))
        while gpu._PENDING:
            await asyncio.gather(*list(gpu._PENDING), return_exceptions=True)
    assert len(wrote) == 6, wrote  # each run's lease labelled held and released
    # the writes at the two hand-offs with a session still in line: through the queue's one client
    assert wrote[(0, "held")] and wrote[(0, "released")] and wrote[(1, "held")], wrote
    assert len(made) == 1, f"{len(made)} slot clients for one queue"
    assert await active_slots() == 0
