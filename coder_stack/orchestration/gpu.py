"""The GPU sessions: the ``tag:gpu`` global concurrency limit, held for a whole GPU session (the limits themselves,
their setup and who holds them: :mod:`coder_stack.orchestration.gpu_limit`).

Exclusive mode (the default): the limit has one slot per GPU and a session takes one, so one model per GPU.
Time-sliced mode: the limit counts hundredths of the GPU (``SHARE_SLOTS``) and a session takes its models' share
(Prefect's ``occupy``), so models whose shares fit hold the GPU together; ``tag:gpu-start`` (one slot, held the
same way: ``start_turn``) lets one model start on the shared GPU at a time across runs.

Tagging tasks ``gpu`` only serialises single task runs (two flows can interleave between them), and a
flow that holds ``tag:gpu`` and then runs a ``gpu``-tagged task deadlocks. So no task carries the tag;
each flow holds the limit around its GPU session (``gpu_session``: a slot with a lease, renewed and released
as Prefect's ``concurrency(..., strict=True)`` does; the slot request itself is ours, see below). A missing
limit refuses GPU work instead of running unprotected.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import weakref
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.exceptions import ObjectNotFound

from coder_stack.errors import GpuLimitMissing, GpuSlotTimeout, RetriableError
from coder_stack.orchestration.gpu_limit import GPU_LIMIT, LEASE_SECONDS, START_LIMIT
from coder_stack.orchestration.liveness import holder_run_id, record_lease, require_heartbeats
from coder_stack.orchestration.prefect_api import (
    ServerBusy,
    emit_acquired,
    emit_released,
    lease_of,
    lend_client,
    release_at_run_end,
    released_by_us,
    request_slot,
    slot_client,
    without_run_client,
)

# How often a queued session asks for a free GPU. Prefect's own retry follows the server's Retry-After:
# the limit's average slot occupancy capped at PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS (10 s),
# with jitter — for GPU sessions of minutes, a freed GPU sat idle for ~0-13 s before the next session
# noticed (bench: handoff). Asking every ~0.5 s costs one small API call per queued flow run.
POLL_SECONDS = 0.5
# A slot request the server answers 503 (on SQLite: SQLITE_BUSY_SNAPSHOT, the request's transaction lost to
# a concurrent write and was rolled back, so nothing is held) is asked again after 20-50 ms (jittered), for
# at most BUSY_BOUND_SECONDS in a row; then the session fails with a RetriableError and holds no slot.
BUSY_RETRY_SECONDS = (0.02, 0.05)
BUSY_BOUND_SECONDS = 5.0
# The "released" lease label waits for this process's next session to take its slot, at most this long.
RELEASED_LABEL_WAIT_S = 2.0
LABEL_RETRY_S = (0.2, 0.5, 1.0, 2.0, 4.0)  # waits before a lease label that was not written is written again
# The held lease is renewed every RENEW_EVERY_S (as Prefect's concurrency() does: at 3/4 of its duration); a
# renewal that fails for a reason that may pass (the server unreachable, a 5xx) is tried again every
# RENEW_RETRY_S until the lease would have run out.
RENEW_EVERY_S = LEASE_SECONDS * 0.75
RENEW_RETRY_S = 5.0


class GpuLeaseLost(RetriableError):
    """The session's GPU slot lease was lost while it held the GPU (expired, revoked, or forgotten by a
    restarted server): the session's work was stopped, its clean-up ran."""


async def require_gpu_limit(occupy: int = 1) -> None:
    """Refuse GPU work when ``tag:gpu`` is missing, inactive, or smaller than the ``occupy`` slots a session
    asks for (e.g. a limit of 1 left from exclusive mode while the stack is now time-sliced: the session would
    wait for ever)."""
    await _require_limit(GPU_LIMIT, occupy)


async def _require_limit(limit: str, occupy: int) -> None:
    async with get_client() as client:
        try:
            gcl = await client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            if limit == START_LIMIT:
                raise GpuLimitMissing(
                    f"the concurrency limit {START_LIMIT} does not exist: the stack's GPU is time-sliced and this "
                    "limit lets one model start on it at a time across runs (vLLM measures the free GPU memory "
                    "as it starts). Create it with `coder-stack setup` (or `prefect gcl create tag:gpu-start 1`) "
                    "and rerun; nothing was started"
                ) from None
            raise GpuLimitMissing(
                f"the GPU concurrency limit {GPU_LIMIT} does not exist, so this flow could run a second model on "
                "a busy GPU. Create it with `coder-stack setup` (or `prefect gcl create tag:gpu 1`) and rerun; "
                "nothing was changed"
            ) from None
    if not gcl.active:
        raise GpuLimitMissing(f"the GPU concurrency limit {limit} is inactive; activate it and rerun")
    if gcl.limit < occupy:
        raise GpuLimitMissing(
            f"the GPU concurrency limit {limit} has {gcl.limit} slot(s) but this session needs {occupy} (a "
            "time-sliced stack counts shares of the GPU in hundredths: the limit is sized for another sharing "
            "mode), so it would wait for ever. Run `coder-stack setup` to size the limit for the stack, once "
            "`coder-stack status` shows no GPU session; nothing was changed"
        )


# ------------------------------------------------------------------ the slot request, ours
# Prefect's ``concurrency()`` retries a slot request the server answers 503 after 2 s, 4 s, ... (its HTTP
# back-off; nothing we can set turns it off), so the request is ours: sent through ``prefect_api`` (the adapter
# for what of Prefect is not its documented API: the request's path, its 503 hook, the acquired/released
# events, the run's ConcurrencyContext; the reasons are in its docstring) and asked again here within tens of
# ms. Holding and giving back the slot follow ``concurrency()`` (prefect/concurrency/_asyncio.py): its
# acquired/released events, the lease left to the run's end if our release is cancelled, release by lease id.
# The lease renewal is ours (``_LeaseKeeper``): Prefect's stops the session with a cancel scope that also
# cancels the session's own clean-up.


async def _release(lease_id: UUID) -> None:
    async with get_client() as client:
        await client.release_concurrency_slots_with_lease(lease_id=lease_id)


def _lease_of(response: httpx.Response) -> ConcurrencyLimitWithLeaseResponse:
    lease = lease_of(response)
    if not lease.limits:
        limit = _ASK.get()[0]
        raise GpuLimitMissing(f"the GPU concurrency limit {limit} is gone; run `coder-stack setup` and rerun")
    return lease


def _server_busy(tries: int, seconds: float) -> RetriableError:
    return RetriableError(
        f"the Prefect server answered 503 (busy: on SQLite, a database write conflict) to {tries} GPU slot "
        f"request(s) in {seconds:.1f} s; no GPU slot is held. Retry the flow run; if it recurs, the Prefect "
        "server is overloaded (consider PostgreSQL)"
    )


# What the session asking now asks for: the limit and how many of its slots (set by ``_limit_session`` around its
# asking, so the request helpers keep their one argument).
_ASK: ContextVar[tuple[str, int]] = ContextVar("coder_stack_slot_ask", default=(GPU_LIMIT, 1))


async def _request_slot(client: PrefectClient) -> httpx.Response:
    """One slot request (for the limit and slots the asking session wants: ``_ASK``). If this task is cancelled
    meanwhile, the request still finishes and a lease it was granted is given back (Prefect's acquisition
    service does the same for a cancelled caller)."""
    # The flow run is the lease's holder, stored with the lease on the server in the same request: the crash
    # clean-up frees a dead run's leases by its id (``release_lease_of``) even if it died right after the grant.
    limit, occupy = _ASK.get()
    req = asyncio.ensure_future(request_slot(client, limit, LEASE_SECONDS, holder_run_id(), occupy))
    try:
        return await asyncio.shield(req)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            lease = lease_of(await req)
            if lease.limits:
                await client.release_concurrency_slots_with_lease(lease_id=lease.lease_id)
        raise


async def _take_slot(client: PrefectClient) -> ConcurrencyLimitWithLeaseResponse | None:
    """Ask for the slot: its lease, or None when another session holds it (423).

    A 503 is asked again after 20-50 ms (jittered) for up to BUSY_BOUND_SECONDS, then RetriableError."""
    first_503: float | None = None
    tries = 0
    while True:
        try:
            return _lease_of(await _request_slot(client))
        except httpx.HTTPStatusError as e:
            if e.response.status_code == 423:
                return None
            raise
        except ServerBusy as e:
            tries += 1
            now = time.monotonic()
            first_503 = now if first_503 is None else first_503
            if now - first_503 >= BUSY_BOUND_SECONDS:
                raise _server_busy(tries, now - first_503) from e
            await asyncio.sleep(random.uniform(*BUSY_RETRY_SECONDS))


@asynccontextmanager
async def _holding(
    lease: ConcurrencyLimitWithLeaseResponse, room: _WaitingRoom, occupy: int = 1
) -> AsyncIterator[None]:
    """Hold a granted lease (``occupy`` slots of ``room.limit``) as ``concurrency(..., strict=True)`` does, and give
    it back on exit.

    The lease is renewed meanwhile (:class:`_LeaseKeeper`); if it is lost, the session's body is stopped and
    the session ends with GpuLeaseLost after the body's own clean-up has run."""
    release_at_run_end(lease.lease_id)
    events = emit_acquired(lease.limits, occupy)
    # The lease on the flow run, for `status` (the API lists no holders; the crash clean-up also finds a run's
    # leases by their holder): written beside the session, not before it, so the GPU step after the grant
    # does not wait for it (nor the next session of this process for the "released" write). Only tag:gpu's
    # lease is labelled: the start turn's is found by its holder (the run), see ``release_start_turn_of``.
    run_id = holder_run_id() if room.limit == GPU_LIMIT else None
    label = _label_of(run_id) if run_id else None
    if label is not None:
        label.held(lease.lease_id, occupy)
    try:
        async with _LeaseKeeper(lease.lease_id, room.limit):
            yield
    finally:
        try:
            await _release(lease.lease_id)
        except asyncio.CancelledError:
            pass  # left to the run's end: released then (or the lease expires)
        else:
            released_by_us(lease.lease_id)
            if label is not None:
                if room.queued:
                    # the event of the next grant in this process, taken now: a grant before the label task runs
                    # counts
                    _background(_label_released(label, lease.lease_id, room.granted))
                else:
                    # No session of this process waits: written now, before the run (and its process) can end.
                    label.released(lease.lease_id)
                    await label.written()
        emit_released(lease.limits, events, occupy)


class _LeaseKeeper:
    """Renew a held lease until the session ends; if it is lost, stop the session's body, once.

    Prefect's ``amaintain_concurrency_lease(..., raise_on_lease_renewal_failure=True)`` stops it through an
    anyio cancel scope, which cancels *every* await until the scope exits: the body's ``finally`` (the flows'
    scale-downs) was cancelled too and left the model up. Here the body gets one ``CancelledError`` at the
    await it is in (``Task.cancel``), so its ``finally`` runs its awaits to the end; then the session raises
    GpuLeaseLost, which the run's report shows. A renewal answered 404/410 (the server no longer has the
    lease: expired, revoked, or a restarted server forgot it) loses it at once; other failures are tried
    again every RENEW_RETRY_S until the lease would have run out."""

    def __init__(self, lease_id: UUID, limit: str = GPU_LIMIT) -> None:
        self.lease_id = lease_id
        self.limit = limit
        self.lost: str | None = None
        self._host = asyncio.current_task()
        self._open = True
        self._cancelled = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _LeaseKeeper:
        self._task = asyncio.ensure_future(self._renew())
        return self

    async def _renew(self) -> None:
        renewed = time.monotonic()  # the grant
        # No client until the first renewal is due: building one (its TLS context) costs CPU on this loop right
        # after the grant, while the session before may still be handing the GPU over.
        await asyncio.sleep(RENEW_EVERY_S)
        wait = 0.0
        async with get_client() as client:
            while True:
                if wait:
                    await asyncio.sleep(wait)
                try:
                    await client.renew_concurrency_lease(lease_id=self.lease_id, lease_duration=LEASE_SECONDS)
                except httpx.HTTPStatusError as e:
                    if e.response.status_code in (404, 410):
                        self._lose(
                            f"the Prefect server answered {e.response.status_code} to its renewal: it no "
                            "longer holds the lease (expired, revoked, or lost in a server restart)"
                        )
                        return
                    why = f"answered {e.response.status_code}"
                except Exception as e:
                    why = f"{type(e).__name__}: {e}"
                else:
                    renewed, wait = time.monotonic(), RENEW_EVERY_S
                    continue
                if time.monotonic() - renewed >= LEASE_SECONDS:
                    self._lose(f"no renewal for {LEASE_SECONDS:.0f} s, the lease's duration (last: {why})")
                    return
                wait = RENEW_RETRY_S

    def _lose(self, why: str) -> None:
        self.lost = why
        if self._open and self._host is not None:
            self._cancelled = True
            self._host.cancel(f"GPU lease lost: {why}")

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._open = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.lost is None:
            return False
        if self._cancelled and self._host is not None and self._host.uncancel() > 0:
            return False  # cancelled from outside as well: that cancellation goes on
        raise GpuLeaseLost(
            f"the GPU slot ({self.limit}) lease was lost while this session held the GPU: {self.lost}. Another "
            "session may have the GPU now, so this one was stopped and its clean-up ran; rerun the flow"
        ) from exc


class _LeaseLabel:
    """The lease label of one flow run, written one value at a time, in order.

    Only the latest wanted value is written, and a lease's "released" is wanted only while that lease is the
    run's latest: a "released" that waited for the next grant never covers the run's next lease, and each
    lease is labelled at most once held and once released."""

    def __init__(self, run_id: UUID) -> None:
        self.run_id = run_id
        self.lease: UUID | None = None  # the run's latest lease not yet given back
        self._want: tuple[UUID | None, int] | None = None  # (the lease or None: released, its slots)
        self._written: tuple[UUID | None, int] | None = None
        self._writer: asyncio.Task[None] | None = None

    def held(self, lease_id: UUID, slots: int = 1) -> None:
        self.lease = lease_id
        self._set((lease_id, slots))

    def released(self, lease_id: UUID) -> None:
        if self.lease == lease_id:
            self.lease = None
            self._set((None, 1))

    async def written(self) -> None:
        """Until the wanted value is written (or given up on)."""
        if self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def _set(self, value: tuple[UUID | None, int]) -> None:
        self._want = value
        if self._writer is None or self._writer.done():
            room = _room(GPU_LIMIT)
            room.users += 1  # now: the room's client stays open for it
            self._writer = _background(self._write(room))

    async def _write(self, room: _WaitingRoom) -> None:
        try:
            client = room.open_client()
            if client is not None:  # else record_lease makes a client of its own
                lend_client(client)
            await self._write_wanted()
        finally:
            room.done()

    async def _write_wanted(self) -> None:
        failures = 0
        while self._want is not None and self._want != self._written:
            value = self._want
            if await record_lease(self.run_id, *value):  # never raises; the slots are written only when not one
                self._written, failures = value, 0
                continue
            # Not written (a busy SQLite answers 503 under load): asked again, a few times, or a lease given back
            # would keep its "held" label and `status` would name the ended run as still holding it.
            failures += 1
            if failures > len(LABEL_RETRY_S):
                self._written = value
                return
            await asyncio.sleep(LABEL_RETRY_S[failures - 1])


_LABELS: weakref.WeakValueDictionary[UUID, _LeaseLabel] = weakref.WeakValueDictionary()


def _label_of(run_id: UUID) -> _LeaseLabel:
    label = _LABELS.get(run_id)
    if label is None:
        label = _LABELS[run_id] = _LeaseLabel(run_id)
    return label


async def _label_released(label: _LeaseLabel, lease_id: UUID, next_grant: asyncio.Event | None) -> None:
    """Label the lease released once ``next_grant`` is set: this process's next session has its slot (at most
    RELEASED_LABEL_WAIT_S; None: no session of this process is waiting).

    Written at once, it raced that session's slot request, sent within milliseconds of the release: on
    SQLite two writes at once can make the request answer 503 and the GPU idle while it is asked again.
    Until the label is written, `status` still sees the lease id; a released lease given back again is
    answered 204 and reported as already free."""
    if next_grant is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(next_grant.wait(), RELEASED_LABEL_WAIT_S)
    label.released(lease_id)


_PENDING: set[asyncio.Task[None]] = set()


def _background(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run ``coro`` beside the caller, keeping a reference until it is done (asyncio keeps only weak ones).

    It runs without the caller's Prefect client: a task started inside a flow run would otherwise get the run's
    client from ``get_client()`` (Prefect's AsyncClientContext), which is closed when the run ends, and every
    call it made after that failed (a "released" lease label never written)."""
    task = asyncio.get_running_loop().create_task(coro, context=without_run_client())
    _PENDING.add(task)
    task.add_done_callback(_PENDING.discard)
    return task


class _WaitingRoom:
    """The queued sessions of one limit (``tag:gpu``, or the start turn's) in one process (one event loop).

    Only the first in line asks the server; the others wait here in arrival order (``asyncio.Lock`` is
    FIFO). Prefect serialises slot requests per limit within a process (its acquisition service), so 20
    queued flow runs each asking every 0.5 s queue behind each other's refusals and a freed GPU is seen
    seconds late. One asker per process keeps the load on the server constant however many sessions
    queue, and a session that ends in this process wakes the asker at once.
    """

    def __init__(self, limit: str = GPU_LIMIT) -> None:
        self.limit = limit
        self.turn = asyncio.Lock()
        self.freed = asyncio.Event()
        self.queued = 0  # sessions of this process in line or holding the turn
        self.users = 0  # sessions of this process in line or holding the turn, and lease-label writes under way
        self.granted = asyncio.Event()  # set when a session of this process takes a slot (then replaced)
        self._client: asyncio.Future[PrefectClient] | None = None
        self._close: asyncio.Event | None = None

    async def slot_client(self) -> PrefectClient:
        """The client of this process's GPU sessions: made by the first in line, handed on with the turn and
        used for the lease labels too, closed when no session of this process is queued and no label is being
        written.

        A client of its own per turn was made just as the session before was granted the GPU: its TLS
        context (~20-50 ms of CPU) ran on the event loop exactly while that session freed the GPU and scaled
        its model up; so did one per lease-label write (the "held" label of the session just granted, the
        "released" one of the session before), until they used this one. The client lives in a task of its
        own, which enters and exits it."""
        if self._client is None or (
            self._client.done() and (self._client.cancelled() or self._client.exception() is not None)
        ):
            self._client = asyncio.get_running_loop().create_future()
            self._close = asyncio.Event()
            _background(_keep_client(self._client, self._close))
        return await asyncio.shield(self._client)

    def open_client(self) -> PrefectClient | None:
        """The sessions' client if one is open now (a label write uses it, never makes one)."""
        made = self._client
        if made is not None and made.done() and not made.cancelled() and made.exception() is None:
            return made.result()
        return None

    def leave(self) -> None:
        """A session left the line or its turn."""
        self.queued -= 1
        self.done()

    def done(self) -> None:
        """A session ended, or a label write; the last user closes the client."""
        self.users -= 1
        if self.users == 0 and self._close is not None:
            self._close.set()
            self._client = self._close = None


async def _keep_client(made: asyncio.Future[PrefectClient], close: asyncio.Event) -> None:
    try:
        async with slot_client() as client:
            made.set_result(client)
            await close.wait()
    except asyncio.CancelledError:
        if not made.done():
            made.cancel()
        raise
    except Exception as e:
        if not made.done():
            made.set_exception(e)  # the sessions waiting for the client get the error; the next one tries again
        # an error closing it is no session's concern


_ROOMS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _WaitingRoom]] = weakref.WeakKeyDictionary()


def _room(limit: str = GPU_LIMIT) -> _WaitingRoom:
    """This process's waiting room for ``limit``: one line per limit (a run holding tag:gpu and queued for the
    start turn waits in the start turn's line only)."""
    rooms = _ROOMS.setdefault(asyncio.get_running_loop(), {})
    room = rooms.get(limit)
    if room is None:
        room = rooms[limit] = _WaitingRoom(limit)
    return room


def _waited_too_long(timeout_s: float, limit: str = GPU_LIMIT) -> GpuSlotTimeout:
    if limit == START_LIMIT:
        return GpuSlotTimeout(
            f"waited {timeout_s:.0f} s for the turn to start a model on the shared GPU ({START_LIMIT}) and another "
            "run is still starting one; see `coder-stack status` for who holds the GPU"
        )
    return GpuSlotTimeout(
        f"waited {timeout_s:.0f} s for the GPU ({limit}) and another session still holds it; "
        "see `coder-stack status` for who holds it"
    )


async def _slot_looks_free(client: PrefectClient, limit: str = GPU_LIMIT, occupy: int = 1) -> bool:
    """Read the limit (no write) before asking for a slot.

    A refused request is not free on the server: it writes the limit's ``denied_slots``, and on SQLite,
    next to the flow runs' own writes, it can fail with 503 (SQLITE_BUSY_SNAPSHOT) like any write. A read
    never conflicts; the request is sent when a slot is free (another process may still win it: 423), and
    a 503 to it is asked again within tens of ms (``_take_slot``).
    """
    try:
        gcl = await client.read_global_concurrency_limit_by_name(limit)
    except ObjectNotFound:
        return True  # gone since require_gpu_limit(): the slot request reports it
    return gcl.active_slots + occupy <= gcl.limit


async def _leave_line(turn: asyncio.Future[Any], lock: asyncio.Lock) -> None:
    """Give up a place in line: cancel the wait, or hand the turn on if it had just been granted."""
    turn.cancel()
    await asyncio.gather(turn, return_exceptions=True)
    if not turn.cancelled() and turn.exception() is None:
        lock.release()


@asynccontextmanager
async def gpu_session(timeout_s: float, poll_s: float = POLL_SECONDS, *, occupy: int = 1) -> AsyncIterator[None]:
    """Hold ``occupy`` slots of ``tag:gpu`` for the whole block (scale-up to scale-down). Queues behind other
    sessions. Exclusive mode: one slot, the whole GPU. Time-sliced: the session's models' shares of the GPU in
    hundredths (``StackSpec.occupy``), so sessions whose shares fit hold the GPU together.

    Asks for the slots without Prefect's retries (neither its server-paced 423 retry nor its 2 s, 4 s, ...
    HTTP back-off on 503) and again every ~``poll_s`` seconds (jittered), so a GPU freed by another process
    is taken within about ``poll_s``; one freed in this process, at once. A 503 is asked again after 20-50 ms
    for up to ``BUSY_BOUND_SECONDS``, then RetriableError with no slot held. Sessions of this process queue
    in arrival order and only the first asks: a later session whose share would fit never overtakes an earlier
    one waiting for more (the agent, wanting the whole card, is not starved by chat and FIM coming and going in
    this process; across processes the server grants whoever asks when the shares are free).
    """
    async with _limit_session(GPU_LIMIT, timeout_s, poll_s, occupy):
        yield


@asynccontextmanager
async def start_turn(time_sliced: bool, timeout_s: float) -> AsyncIterator[None]:
    """Time-sliced mode: the turn to start a model on the shared GPU, one at a time across every run and process
    (the ``tag:gpu-start`` limit, one slot, leased, renewed and given back as a GPU session's; its holder is the
    flow run, so the crash clean-up frees a dead run's turn: ``release_start_turn_of``). vLLM measures the free
    GPU memory as it starts, so two starting at once could each see the other's share as free. A missing start
    limit refuses (``coder-stack setup`` creates it). Exclusive mode: nothing to take (the GPU session is already
    exclusive)."""
    if not time_sliced:
        yield
        return
    async with _limit_session(START_LIMIT, timeout_s, POLL_SECONDS, 1):
        yield


@asynccontextmanager
async def _limit_session(limit: str, timeout_s: float, poll_s: float, occupy: int) -> AsyncIterator[None]:
    """Hold ``occupy`` slots of the global limit ``limit`` for the block: the machinery of :func:`gpu_session` and
    :func:`start_turn` (the process's line, the slot request, the lease, its renewal and release)."""
    if occupy < 1:
        raise ValueError(f"occupy must be at least 1 slot, not {occupy}")
    require_heartbeats()
    deadline = time.monotonic() + timeout_s
    room = _room(limit)
    # The place in line is taken now, on arrival (asyncio.Lock serves waiters in the order they began
    # waiting); the limit is checked meanwhile. Checking first let a session whose check answered sooner
    # overtake one that arrived before it.
    turn = asyncio.ensure_future(room.turn.acquire())
    room.queued += 1
    room.users += 1
    try:
        await _require_limit(limit, occupy)
        async with asyncio.timeout(timeout_s):
            await asyncio.shield(turn)
    except BaseException as e:
        await _leave_line(turn, room.turn)
        room.leave()
        if isinstance(e, TimeoutError):
            raise _waited_too_long(timeout_s, limit) from None
        raise
    async with AsyncExitStack() as stack:
        # Registered first, so it runs last: after the slot is released, wake this process's next asker.
        stack.callback(room.freed.set)
        asking = _ASK.set((limit, occupy))
        try:
            # The process's slot client (room.slot_client): its connection is kept alive by the polls, so the
            # request at hand-off time pays neither a new client nor a new connection.
            client = await room.slot_client()
            room.freed.clear()
            while True:
                # Woken by a release in this process: ask at once (the read before asking saves a refused
                # request's write when the slots look taken; some were just given back).
                just_freed = room.freed.is_set()
                room.freed.clear()
                if (just_freed or await _slot_looks_free(client, limit, occupy)) and (
                    lease := await _take_slot(client)
                ) is not None:
                    await stack.enter_async_context(_holding(lease, room, occupy))
                    room.granted.set()
                    room.granted = asyncio.Event()
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _waited_too_long(timeout_s, limit)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, poll_s * random.uniform(0.8, 1.2))):
                        await room.freed.wait()  # a session of this process ended: ask now
        finally:
            _ASK.reset(asking)
            room.turn.release()
            room.leave()
        yield
