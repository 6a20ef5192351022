"""The one place coder-stack leans on Prefect beyond its documented API (pinned: Prefect 3.9.1).

Everything here is a private module, a private attribute, an undocumented endpoint or an undocumented
behaviour of the pinned Prefect; the rest of ``coder_stack.orchestration`` calls these functions and never
those APIs itself (``tests/unit/test_prefect_adapter.py`` holds the code to that). Each one's behaviour is
pinned by ``tests/unit/test_prefect_adapter.py`` (signatures, shapes) and ``tests/flows/test_prefect_api.py``
(the endpoints against a real Prefect server), so a Prefect upgrade fails there and nowhere else.

What it wraps, and why we need it:

- ``POST /v2/concurrency_limits/increment-with-lease`` (through the public client method, on a client whose
  httpx response hook stops Prefect's retry on a 503 to that path): :func:`slot_client`,
  :func:`request_slot`, :func:`lease_of`. Prefect (3.9.1) retries the 503 a busy SQLite answers (its
  transaction rolled back: nothing held) after 2 s, 4 s, ... even with PREFECT_CLIENT_MAX_RETRIES=0
  (``_send_with_retry`` in prefect/client/base.py sleeps after its last attempt); ``concurrency()`` sends the
  request from a service thread that no ``temporary_settings`` reaches. The hook raises :class:`ServerBusy`
  inside httpx's ``send``, which Prefect's retry loop does not catch, so the caller asks again within tens of
  ms. A 423 (the limit full) stays Prefect's ``httpx.HTTPStatusError``.
- ``prefect.concurrency._events``: the ``prefect.concurrency-limit.acquired``/``released`` events that
  ``concurrency()`` emits (:func:`emit_acquired`, :func:`emit_released`).
- ``ConcurrencyContext.cleanup_lease_ids``: a lease the flow run's engine releases when the run ends, if our
  own release was cancelled (:func:`release_at_run_end`, :func:`released_by_us`).
- ``AsyncClientContext.__var__``: a background task started in a flow run must not use the run's client,
  closed when the run ends (:func:`without_run_client`); the lease-label writes use the GPU sessions' shared
  client instead of making one each (:func:`lend_client`); ``async with`` on an entered client re-enters it.
- The tag-limit decrement ``POST /concurrency_limits/decrement`` revokes the leases of the tag's global limit
  whose *holder* has the given id, whatever the holder's type (prefect/server/api/concurrency_limits.py,
  ``decrement_concurrency_limits_v1``): :func:`revoke_leases_held_by`, how the crash clean-up frees a dead
  run's slot when its lease id was never recorded.
"""

from __future__ import annotations

import contextvars
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse, MinimalConcurrencyLimitResponse
from prefect.concurrency._events import emit_concurrency_acquisition_events, emit_concurrency_release_events
from prefect.concurrency.context import ConcurrencyContext
from prefect.context import AsyncClientContext
from prefect.events import Event

PINNED_PREFECT = "3.9.1"
SLOT_REQUEST_PATH = "/v2/concurrency_limits/increment-with-lease"

# What the events of a held slot need to be given back: the acquired events by limit id (released events
# follow them).
AcquiredEvents = dict[UUID, Event | None]


class ServerBusy(Exception):
    """The server answered the slot request 503: its transaction was rolled back, nothing is held."""


async def _no_retry_on_503(response: httpx.Response) -> None:
    if response.status_code == 503 and response.request.url.path.endswith(SLOT_REQUEST_PATH):
        raise ServerBusy(response.status_code)


def slot_client(**httpx_settings: Any) -> PrefectClient:
    """A Prefect client for slot requests: a 503 to one raises :class:`ServerBusy` at once instead of Prefect's
    2 s, 4 s, ... back-off; every other answer and failure is Prefect's as usual. (``httpx_settings``: extra
    settings for its httpx client, e.g. a transport in tests.)"""
    return get_client(httpx_settings={**httpx_settings, "event_hooks": {"response": [_no_retry_on_503]}})


async def request_slot(
    client: PrefectClient, limit: str, lease_seconds: float, holder_run: UUID | None, slots: int = 1
) -> httpx.Response:
    """One request for ``slots`` slots of the global limit ``limit`` (all or none, as ``concurrency(...,
    occupy=slots)`` asks) with a lease of ``lease_seconds``, held by the flow run ``holder_run`` (stored with the
    lease on the server, in the same request; the lease holds all ``slots``). 200: granted (read it
    with :func:`lease_of`); raises ``httpx.HTTPStatusError`` 423 when the limit is full, :class:`ServerBusy` on
    a 503 when ``client`` is a :func:`slot_client`."""
    holder = ConcurrencyLeaseHolder(type="flow_run", id=holder_run) if holder_run else None
    return await client.increment_concurrency_slots_with_lease(
        names=[limit], slots=slots, mode="concurrency", lease_duration=lease_seconds, holder=holder
    )


def lease_of(response: httpx.Response) -> ConcurrencyLimitWithLeaseResponse:
    """The granted lease in a slot request's answer: its ``lease_id`` and the ``limits`` it occupies (empty when
    no limit of that name exists)."""
    return ConcurrencyLimitWithLeaseResponse.model_validate(response.json())


def emit_acquired(limits: list[MinimalConcurrencyLimitResponse], occupy: int = 1) -> AcquiredEvents:
    """Emit ``prefect.concurrency-limit.acquired`` for ``occupy`` slots of each limit, as ``concurrency()`` does."""
    return emit_concurrency_acquisition_events(limits, occupy)


def emit_released(limits: list[MinimalConcurrencyLimitResponse], acquired: AcquiredEvents, occupy: int = 1) -> None:
    """Emit ``prefect.concurrency-limit.released`` for them (``occupy`` slots each), each following its acquired
    event."""
    emit_concurrency_release_events(limits, occupy, acquired)


def release_at_run_end(lease_id: UUID) -> bool:
    """Have the flow run's engine release ``lease_id`` when the run ends (if nothing else does first); whether
    there is a run to do so."""
    ctx = ConcurrencyContext.get()
    if ctx is None:
        return False
    ctx.cleanup_lease_ids.append(lease_id)
    return True


def released_by_us(lease_id: UUID) -> None:
    """The lease was given back: the run's end need not release it."""
    ctx = ConcurrencyContext.get()
    if ctx is not None and lease_id in ctx.cleanup_lease_ids:
        ctx.cleanup_lease_ids.remove(lease_id)


def without_run_client() -> contextvars.Context:
    """A copy of the current context in which ``get_client()`` makes a client of its own instead of returning
    the flow run's (which the run closes when it ends)."""
    ctx = contextvars.copy_context()
    var: contextvars.ContextVar[Any] = AsyncClientContext.__var__
    ctx.run(var.set, None)
    return ctx


class _Lent:
    """Stands for an AsyncClientContext: what ``get_client()`` reads of one (Prefect 3.9.1)."""

    def __init__(self, client: PrefectClient) -> None:
        self.client = client
        self._httpx_settings = None


def lend_client(client: PrefectClient) -> None:
    """From here on in the current context (call it in a task of its own), ``get_client()`` returns ``client``
    (entered by its owner, who keeps it open meanwhile); ``async with`` on it neither opens nor closes it."""
    var: contextvars.ContextVar[Any] = AsyncClientContext.__var__
    var.set(_Lent(client))


async def revoke_leases_held_by(client: PrefectClient, limit: str, holder: UUID) -> None:
    """Revoke every lease of the tag limit ``limit`` (``tag:NAME``) whose holder has the id ``holder``; a no-op
    for a holder with none. Only for tag limits: raises ValueError for another name."""
    if not limit.startswith("tag:"):
        raise ValueError(f"{limit!r} is not a tag limit (tag:NAME): its leases cannot be revoked by holder")
    await client.decrement_v1_concurrency_slots(
        names=[limit.removeprefix("tag:")], task_run_id=holder, occupancy_seconds=1.0
    )
