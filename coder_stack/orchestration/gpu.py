"""One model per GPU: the ``tag:gpu`` global concurrency limit, held for a whole GPU session.

Tagging tasks ``gpu`` only serialises single task runs (two flows can interleave between them), and a
flow that holds ``tag:gpu`` and then runs a ``gpu``-tagged task deadlocks. So no task carries the tag;
each flow holds the limit around its GPU session with ``concurrency(..., strict=True)``. A missing limit
refuses GPU work instead of running unprotected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError, concurrency
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, Field

from coder_stack.errors import GpuLimitMissing, RetriableError

GPU_LIMIT = "tag:gpu"
LEASE_SECONDS = 300.0
# How often a queued session asks for a free GPU. Prefect's own retry follows the server's Retry-After:
# the limit's average slot occupancy capped at PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS (10 s),
# with jitter — for GPU sessions of minutes, a freed GPU sat idle for ~0-13 s before the next session
# noticed (bench: handoff). Asking every ~0.5 s costs one small API call per queued flow run.
POLL_SECONDS = 0.5


class GpuLimitStatus(BaseModel):
    exists: bool
    limit: int = 0
    active_slots: int = 0
    running_flow_runs: list[str] = Field(default_factory=list, description="Names of running coder-stack flows.")
    leaked: bool = Field(False, description="A slot is held but no coder-stack flow is running.")

    def describe(self) -> str:
        if not self.exists:
            return f"GPU limit {GPU_LIMIT} is missing: run `coder-stack setup` (or `prefect gcl create {GPU_LIMIT} N`)"
        text = f"GPU limit {GPU_LIMIT}: {self.active_slots}/{self.limit} slot(s) held"
        if self.running_flow_runs:
            text += f" (running: {', '.join(self.running_flow_runs)})"
        if self.leaked:
            text += (
                f"; a slot is held by no running flow (a crashed run or a server restart without lease storage) "
                f"— free it with `prefect gcl update {GPU_LIMIT} --active-slots 0`"
            )
        return text


async def ensure_gpu_limit(gpus: int) -> str:
    """Create the limit or resize it to ``gpus``. Returns what was done."""
    async with get_client() as client:
        try:
            existing = await client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            existing = None
        await client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, gpus)
    if existing is None:
        return f"created {GPU_LIMIT} with {gpus} slot(s)"
    if existing.limit != gpus:
        return f"resized {GPU_LIMIT} from {existing.limit} to {gpus} slot(s)"
    return f"{GPU_LIMIT} already has {gpus} slot(s)"


async def gpu_limit_status(flow_names: tuple[str, ...] = ()) -> GpuLimitStatus:
    async with get_client() as client:
        try:
            gcl = await client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            return GpuLimitStatus(exists=False)
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
            ),
            limit=50,
        )
        names = []
        flow_ids: dict[UUID, str] = {}
        for r in runs:
            if r.flow_id not in flow_ids:
                flow_ids[r.flow_id] = (await client.read_flow(r.flow_id)).name
            if not flow_names or flow_ids[r.flow_id] in flow_names:
                names.append(f"{flow_ids[r.flow_id]}/{r.name}")
    return GpuLimitStatus(
        exists=True,
        limit=gcl.limit,
        active_slots=gcl.active_slots,
        running_flow_runs=names,
        leaked=gcl.active_slots > 0 and not names,
    )


async def require_gpu_limit() -> None:
    async with get_client() as client:
        try:
            gcl = await client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            raise GpuLimitMissing(
                f"the GPU concurrency limit {GPU_LIMIT} does not exist, so this flow could run a second model on "
                "a busy GPU. Create it with `coder-stack setup` (or `prefect gcl create tag:gpu 1`) and rerun; "
                "nothing was changed"
            ) from None
    if not gcl.active:
        raise GpuLimitMissing(f"the GPU concurrency limit {GPU_LIMIT} is inactive; activate it and rerun")


def _is_423(err: BaseException | None) -> bool:
    return isinstance(err, httpx.HTTPStatusError) and err.response.status_code == 423


def _locked(err: BaseException) -> bool:
    return _is_423(err.__cause__)


class _QuietBusyGpu(logging.Filter):
    """Prefect's slot service logs every refused attempt at ERROR ("failed to process item"): with
    ``max_retries=0`` a 423 (the GPU is busy) is the expected answer while queued, so drop those lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) == 2 and args[0] == "ConcurrencySlotAcquisitionWithLeaseService" and isinstance(args[1], tuple):
            fut = args[1][-1] if args[1] else None
            if isinstance(fut, concurrent.futures.Future) and fut.done() and _is_423(fut.exception()):
                return False
        return True


logging.getLogger("prefect._internal.concurrency").addFilter(_QuietBusyGpu())


class _WaitingRoom:
    """The queued GPU sessions of one process (one event loop).

    Only the first in line asks the server; the others wait here in arrival order (``asyncio.Lock`` is
    FIFO). Prefect serialises slot requests per limit within a process (its acquisition service), so 20
    queued flow runs each asking every 0.5 s queue behind each other's refusals and a freed GPU is seen
    seconds late. One asker per process keeps the load on the server constant however many sessions
    queue, and a session that ends in this process wakes the asker at once.
    """

    def __init__(self) -> None:
        self.turn = asyncio.Lock()
        self.freed = asyncio.Event()


_ROOMS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _WaitingRoom] = weakref.WeakKeyDictionary()


def _room() -> _WaitingRoom:
    loop = asyncio.get_running_loop()
    room = _ROOMS.get(loop)
    if room is None:
        room = _ROOMS[loop] = _WaitingRoom()
    return room


def _waited_too_long(timeout_s: float) -> RetriableError:
    return RetriableError(
        f"waited {timeout_s:.0f} s for the GPU ({GPU_LIMIT}) and another session still holds it; "
        "see `coder-stack status` for who holds it"
    )


async def _slot_looks_free() -> bool:
    """Read the limit (no write) before asking for a slot.

    A refused request is not free on the server: it writes the limit's ``denied_slots``, and on SQLite,
    next to the flow runs' own writes, it often fails with 503 (SQLITE_BUSY_SNAPSHOT), which Prefect's
    client retries only after a 2 s back-off: a freed GPU then waits for that back-off. A read never
    conflicts; the request is sent when a slot is free (another process may still win it: 423).
    """
    async with get_client() as client:
        try:
            gcl = await client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            return True  # gone since require_gpu_limit(): the strict request reports it
    return gcl.active_slots < gcl.limit


@asynccontextmanager
async def gpu_session(timeout_s: float, poll_s: float = POLL_SECONDS) -> AsyncIterator[None]:
    """Hold one GPU slot for the whole block (scale-up to scale-down). Queues behind other sessions.

    Asks for the slot without Prefect's server-paced retry (``max_retries=0``) and again every ~``poll_s``
    seconds (jittered), so a GPU freed by another process is taken within about ``poll_s``; one freed in
    this process, at once. Sessions of this process queue in arrival order and only the first asks.
    """
    await require_gpu_limit()
    deadline = time.monotonic() + timeout_s
    room = _room()
    async with AsyncExitStack() as stack:
        # Registered first, so it runs last: after the slot is released, wake this process's next asker.
        stack.callback(room.freed.set)
        try:
            async with asyncio.timeout(timeout_s):
                await room.turn.acquire()
        except TimeoutError:
            raise _waited_too_long(timeout_s) from None
        try:
            while True:
                room.freed.clear()
                if await _slot_looks_free():
                    try:
                        await stack.enter_async_context(
                            concurrency(GPU_LIMIT, occupy=1, strict=True, max_retries=0, lease_duration=LEASE_SECONDS)
                        )
                        break
                    except ConcurrencySlotAcquisitionError as e:
                        if not _locked(e):
                            raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _waited_too_long(timeout_s)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, poll_s * random.uniform(0.8, 1.2))):
                        await room.freed.wait()  # a session of this process ended: ask now
        finally:
            room.turn.release()
        yield
