"""Is a coder-stack flow run alive? Prefect's flow-run heartbeats, the automation that marks a silent run
Crashed, and the run's GPU lease recorded on the run.

Every flow run sends a ``prefect.flow-run.heartbeat`` event every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``
seconds from a thread of its own (Prefect 3.9: ``flow_engine._send_heartbeats``; default 180, at least 30).
coder-stack runs send one every :data:`HEARTBEAT_S` (the CLI, the tests and the deployments in prefect.yaml
set it; a GPU session refuses to start without it, see :func:`require_heartbeats`). The automation
:data:`CRASH_AUTOMATION` (created by ``coder-stack setup``) is Prefect's documented zombie-run detector: a
proactive trigger that fires when a run that sent a heartbeat sends neither another one nor a final state
within :data:`SILENT_AFTER_S`, and changes the run to Crashed. The run's Crashed state then starts the
clean-up deployment (its trigger is in prefect.yaml).

A GPU session records the id of its ``tag:gpu`` lease on its flow run (label :data:`LEASE_LABEL`): the
API does not list a limit's holders, so this is how the clean-up frees exactly that run's slot and how
``coder-stack status`` tells a live holder from a dead one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterEndTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType, WorkerStatus
from prefect.context import FlowRunContext
from prefect.events.actions import ChangeFlowRunState
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventOrder, EventResourceFilter
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import ConfigError
from coder_stack.orchestration.prefect_api import revoke_leases_held_by

# How often a coder-stack flow run sends its heartbeat: Prefect's minimum.
HEARTBEAT_S = 30
# A run that sent no heartbeat (and no final state) for this long is dead: two heartbeats missed. The
# clean-up starts at once, so SIGKILL -> Crashed takes SILENT_AFTER_S - (time since the last heartbeat),
# 30-60 s, plus Prefect's proactive evaluation (every 5 s).
SILENT_AFTER_S = 2 * HEARTBEAT_S
# After a run is marked dead (Crashed by the automation, or Failed/Cancelled) the clean-up waits until the server's
# clock reads the mark plus this long before it decides, watching for a heartbeat the server receives after the
# mark: a run marked Crashed while alive (its heartbeats were late, e.g. the server lagged) sends its next one
# within one interval. One heartbeat interval plus 10 s for the event to be stored and read.
CRASH_SETTLE_S = HEARTBEAT_S + 10.0
# How often that wait reads the run's heartbeats.
SETTLE_POLL_S = 1.0
CRASH_AUTOMATION = "coder-stack: mark silent runs Crashed"
LEASE_LABEL = "coder-stack.io/gpu-lease"
# How many slots of tag:gpu the recorded lease holds, when not one (time-sliced: hundredths of the GPU).
LEASE_SLOTS_LABEL = "coder-stack.io/gpu-lease-slots"
RELEASED = "released"
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
FINAL_EVENTS = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled")


def require_heartbeats() -> None:
    """Refuse a GPU session in a run that sends heartbeats too rarely: the crash automation would take
    it for dead after SILENT_AFTER_S and the clean-up would scale its model down under it."""
    if FlowRunContext.get() is None:
        return  # not a flow run (the benchmark's bare sessions): no heartbeats, no automation watches it
    every = get_current_settings().flows.heartbeat_frequency
    if every is None or every > HEARTBEAT_S:
        sent = "sends no heartbeats" if every is None else f"sends a heartbeat every {every} s"
        raise ConfigError(
            f"this flow run {sent}, but coder-stack takes a run silent for {SILENT_AFTER_S} s for dead and "
            f"scales its GPU model down. Set PREFECT_FLOWS_HEARTBEAT_FREQUENCY={HEARTBEAT_S} where the flow "
            "runs (the coder-stack CLI and the deployments in prefect.yaml set it) and rerun; nothing was changed"
        )


def crash_automation(flow_names: list[str]) -> AutomationCore:
    """The proactive trigger of Prefect's zombie-run recipe, for coder-stack's GPU flows only."""
    return AutomationCore(
        name=CRASH_AUTOMATION,
        description=(
            f"A coder-stack GPU flow run that sent no heartbeat for {SILENT_AFTER_S} s (it sends one every "
            f"{HEARTBEAT_S} s) is dead: marked Crashed, which starts the clean-up-crashed-run deployment."
        ),
        enabled=True,
        trigger=EventTrigger(
            posture=Posture.Proactive,
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": flow_names},
            after={HEARTBEAT_EVENT},
            expect={HEARTBEAT_EVENT, *FINAL_EVENTS, "prefect.flow-run.Crashed"},
            for_each={"prefect.resource.id"},
            threshold=1,
            within=timedelta(seconds=SILENT_AFTER_S),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {SILENT_AFTER_S} s: the flow's process is gone (killed, OOM, node lost)",
            )
        ],
    )


async def ensure_crash_automation(flow_names: list[str]) -> str:
    """Create the automation, or replace one of that name whose definition differs. Returns what was done."""
    want = crash_automation(flow_names)
    async with get_client() as client:
        found = await client.read_automations_by_name(CRASH_AUTOMATION)
        same = [a for a in found if _same(a, want)]
        for a in found:
            if a not in same[:1]:
                await client.delete_automation(a.id)
        if same:
            return f"automation {CRASH_AUTOMATION!r} already in place"
        await client.create_automation(want)
    return f"{'replaced' if found else 'created'} automation {CRASH_AUTOMATION!r}"


def _same(have: AutomationCore, want: AutomationCore) -> bool:
    keys = {"name", "description", "enabled", "trigger", "actions"}
    return _canonical(have.model_dump(mode="json", include=keys)) == _canonical(
        want.model_dump(mode="json", include=keys)
    )


def _canonical(value: object) -> object:
    """The trigger's ``after``/``expect``/``for_each`` are sets: their JSON lists come in any order."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_canonical(v) for v in value]
        return sorted(items, key=repr) if all(isinstance(v, str) for v in items) else items
    return value


class RunLiveness(BaseModel):
    """What Prefect knows about a flow run's life."""

    run_id: UUID
    name: str = ""
    flow: str = ""
    state: str = Field("", description="State type, e.g. RUNNING, CRASHED.")
    state_message: str = ""
    state_at: datetime | None = None
    last_heartbeat: datetime | None = Field(None, description="When its newest heartbeat was sent (sender's clock).")
    last_received: datetime | None = Field(None, description="When the server last received one (server's clock).")
    heartbeat_age_s: float | None = None
    lease_label: str | None = Field(None, description=f"The run's {LEASE_LABEL!r} label, if it has one.")
    lease_slots: int = Field(1, description=f"The slots its recorded lease holds ({LEASE_SLOTS_LABEL!r}; else 1).")
    parameters: dict[str, object] = Field(default_factory=dict)

    @property
    def lease_id(self) -> UUID | None:
        """The tag:gpu lease the run recorded and has not released."""
        if not self.lease_label or self.lease_label == RELEASED:
            return None
        with contextlib.suppress(ValueError):
            return UUID(self.lease_label)
        return None

    @property
    def lease_released(self) -> bool:
        """The run's recorded lease was given back."""
        return self.lease_label == RELEASED

    @property
    def final(self) -> bool:
        return self.state in {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}

    @property
    def silent(self) -> bool:
        """No heartbeat for SILENT_AFTER_S (or none at all) and not final: the process is gone."""
        return not self.final and (self.heartbeat_age_s is None or self.heartbeat_age_s > SILENT_AFTER_S)

    def heartbeats_after(self, when: datetime | None) -> bool:
        """The server received a heartbeat after ``when`` (a state's time, on the server's clock)."""
        return bool(when and self.last_received and self.last_received > when)

    def label(self) -> str:
        return f"{self.flow}/{self.name}" if self.flow else self.name or str(self.run_id)


def parse_run_id(text: str) -> UUID:
    """A flow run id, bare or as the event resource id ``prefect.flow-run.<id>`` (what the trigger passes)."""
    raw = text.strip().removeprefix("prefect.flow-run.")
    try:
        return UUID(raw)
    except ValueError:
        raise ConfigError(
            f"{text!r} is not a flow run id: pass the id from the Prefect UI or `coder-stack status` "
            "(e.g. 0f6c3a1e-...), or the event resource id prefect.flow-run.<id>"
        ) from None


async def server_now(client: PrefectClient) -> datetime:
    """The Prefect server's clock (its HTTP ``Date`` header, to the second); this machine's if it sends none."""
    with contextlib.suppress(Exception):
        date = (await client.hello()).headers.get("date")
        if date:
            return parsedate_to_datetime(date).astimezone(UTC)
    return datetime.now(UTC)


async def heartbeats(
    client: PrefectClient, run_id: UUID, since: timedelta = timedelta(hours=12)
) -> tuple[datetime | None, datetime | None]:
    """(when the run's newest heartbeat was sent, by the sender's clock; when the server last *received* one, by
    its own clock) — the second is what a state's time (the server's) is compared with."""
    now = datetime.now(UTC)
    flt = EventFilter(
        occurred=EventOccurredFilter(since=now - since, until=now + timedelta(minutes=5)),
        event=EventNameFilter(name=[HEARTBEAT_EVENT]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
        order=EventOrder.DESC,
    )
    page = await client.read_events(filter=flt, limit=10)  # newest by the sender's clock; a late one is among them
    sent = page.events[0].occurred if page.events else None
    return sent, max((e.received for e in page.events), default=None)


async def heartbeat_after(
    run_id: UUID, mark: datetime, settle_s: float, poll_s: float = SETTLE_POLL_S
) -> datetime | None:
    """Wait until the server has received a heartbeat of the run after ``mark`` (returns its receive time), or its
    clock reads ``mark + settle_s`` (returns None: none came). ``mark`` is on the server's clock (a state's time)."""
    async with get_client() as client:
        while True:
            _, beat = await heartbeats(client, run_id)
            if beat is not None and beat > mark:
                return beat
            left = (mark + timedelta(seconds=settle_s) - await server_now(client)).total_seconds()
            if left <= 0:
                return None
            await asyncio.sleep(min(poll_s, left))


async def liveness_of(client: PrefectClient, run: FlowRun, flow_name: str, now: datetime | None = None) -> RunLiveness:
    """``run``'s liveness: its state, its last heartbeat event, its lease label (``flow_name``: its flow's).
    The heartbeat's age is this machine's clock against the sender's (``now``: read once for many runs); whether
    one came after the run's state is the server's receive time against the state's time."""
    beat, received = await heartbeats(client, run.id)
    now = now or datetime.now(UTC)
    state = run.state
    label = (run.labels or {}).get(LEASE_LABEL)
    try:
        slots = max(1, int(str((run.labels or {}).get(LEASE_SLOTS_LABEL, 1))))
    except ValueError:
        slots = 1
    return RunLiveness(
        run_id=run.id,
        name=run.name or "",
        flow=flow_name,
        state=state.type.value if state else "",
        state_message=(state.message or "") if state else "",
        state_at=state.timestamp if state else None,
        last_heartbeat=beat,
        last_received=received,
        heartbeat_age_s=max(0.0, (now - beat).total_seconds()) if beat else None,
        lease_label=None if label is None else str(label),
        lease_slots=slots,
        parameters=dict(run.parameters or {}),
    )


async def flow_name_of(client: PrefectClient, flow_id: UUID) -> str:
    try:
        return (await client.read_flow(flow_id)).name
    except ObjectNotFound:
        return ""


async def read_liveness(run_id: UUID) -> RunLiveness:
    async with get_client() as client:
        try:
            run = await client.read_flow_run(run_id)
        except ObjectNotFound:
            raise ConfigError(
                f"no flow run {run_id} on this Prefect server (is PREFECT_API_URL the right one?)"
            ) from None
        return await liveness_of(client, run, await flow_name_of(client, run.flow_id))


def holder_run_id() -> UUID | None:
    """The flow run this code runs in (the holder of its GPU leases), or None outside a flow run."""
    ctx = FlowRunContext.get()
    return ctx.flow_run.id if ctx is not None and ctx.flow_run is not None else None


async def record_lease(run_id: UUID, lease_id: UUID | None, slots: int = 1) -> bool:
    """Write ``run_id``'s GPU lease on its flow run (``RELEASED`` for None: given back), and the slots it holds when
    not one (in the same write); whether it was written. Best effort: the label only helps ``status`` and the
    clean-up; a GPU session never fails for it."""
    labels: dict[str, Any] = {LEASE_LABEL: str(lease_id) if lease_id else RELEASED}
    if lease_id and slots != 1:
        labels[LEASE_SLOTS_LABEL] = str(slots)
    try:
        async with get_client() as client:
            await client.update_flow_run_labels(run_id, labels)
    except httpx.HTTPStatusError as e:
        return e.response.status_code == 404  # the run was deleted: nothing left to label
    except Exception:
        return False
    return True


class SlotRelease(BaseModel):
    """What giving back a dead run's GPU leases did, read from the limit's active slots before and after."""

    model_config = ConfigDict(frozen=True)

    freed: bool = Field(description="The limit's active slots went down during this call.")
    headline: str = Field(description='A few words for a run\'s outcome, e.g. "GPU slot freed".')
    detail: str = Field(default="", description='The numbers behind it, e.g. "tag:gpu: 1 -> 0 held".')

    @property
    def text(self) -> str:
        return f"{self.headline} ({self.detail})" if self.detail else self.headline


async def release_lease_of(live: RunLiveness, limit_name: str) -> SlotRelease:
    """Give back the run's GPU leases: the one its label records, and every lease the server holds with the run
    as its holder (a session sends its flow run as the holder with the slot request, so a run killed before
    its label was written is found too). The server answers 204 for a lease already gone. Returns what
    happened, read from the limit's active slots before and after. Safe to cancel anywhere and run again: the
    rerun releases what is left and labels the run's lease released."""
    async with get_client() as client:
        before = (await client.read_global_concurrency_limit_by_name(limit_name)).active_slots
        if live.lease_id is not None:
            await client.release_concurrency_slots_with_lease(lease_id=live.lease_id)
        if limit_name.startswith("tag:"):
            # every lease the server holds with the run as its holder (an undocumented behaviour of Prefect's
            # tag-limit decrement: see prefect_api)
            await revoke_leases_held_by(client, limit_name, live.run_id)
        after = (await client.read_global_concurrency_limit_by_name(limit_name)).active_slots
        # Both releases answered: the run holds no lease of the limit now, whoever freed it. Labelled so even when
        # this call freed nothing (an earlier clean-up did, and was cancelled or killed before its label write):
        # else `status` keeps naming the dead run as one that may hold a slot it cannot account for.
        if live.lease_id is not None or after < before or limit_name.startswith("tag:"):
            try:
                await client.update_flow_run_labels(live.run_id, {LEASE_LABEL: RELEASED})
            except httpx.HTTPStatusError as e:
                if e.response.status_code != 404:
                    raise  # 404: the run was deleted meanwhile, nothing left to label
    if after < before:
        return SlotRelease(freed=True, headline="GPU slot freed", detail=f"{limit_name}: {before} -> {after} held")
    if live.lease_id is None:
        if live.lease_released:
            return SlotRelease(freed=False, headline="GPU slot already free", detail="its lease was released")
        return SlotRelease(freed=False, headline="no GPU slot recorded as held")
    return SlotRelease(
        freed=False,
        headline="GPU slot was already free",
        detail=f"its lease had expired or was released; {limit_name}: {after} held",
    )


async def release_turn_of(run_id: UUID, limit_name: str) -> SlotRelease | None:
    """Give back every lease of the one-slot tag limit ``limit_name`` (the time-sliced start turn,
    ``tag:gpu-start``) the server holds with the run as its holder; None when that limit does not exist (an
    exclusive stack). Its lease is not labelled on the run (it is held for one model's start): it is found by its
    holder, the run, as the slot request sent it. Safe to run again."""
    async with get_client() as client:
        try:
            before = (await client.read_global_concurrency_limit_by_name(limit_name)).active_slots
        except ObjectNotFound:
            return None
        await revoke_leases_held_by(client, limit_name, run_id)
        after = (await client.read_global_concurrency_limit_by_name(limit_name)).active_slots
    if after < before:
        return SlotRelease(freed=True, headline="start turn freed", detail=f"{limit_name}: {before} -> {after} held")
    return SlotRelease(freed=False, headline="it held no start turn", detail=f"{limit_name}: {after} held")


# The clean-up flow's name (flows/cleanup.py): its scheduled runs are what `status` looks for.
CLEANUP_FLOW = "clean_up_crashed_run"
PAGE = 200  # the Prefect API's largest page (PREFECT_API_DEFAULT_LIMIT)
FINAL_STATES = (StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED)


async def runs_of(
    client: PrefectClient,
    flow_names: Iterable[str],
    states: Iterable[StateType],
    ended_after: datetime | None = None,
) -> list[FlowRun]:
    """Every run of these flows (all flows if none) in these states (ended after ``ended_after``), filtered on the
    server and read page by page — never the first page of runs server-wide filtered here."""
    from prefect.client.schemas.sorting import FlowRunSort

    names = list(flow_names)
    flows = FlowFilter(name=FlowFilterName(any_=names)) if names else None
    runs = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(states))),
        end_time=FlowRunFilterEndTime(after_=ended_after) if ended_after else None,
    )
    out: list[FlowRun] = []
    seen: set[UUID] = set()
    while True:
        page = await client.read_flow_runs(
            flow_filter=flows, flow_run_filter=runs, sort=FlowRunSort.ID_DESC, limit=PAGE, offset=len(out)
        )
        out += [r for r in page if r.id not in seen]
        seen.update(r.id for r in page)
        if len(page) < PAGE:
            return out


async def unfinished_runs(client: PrefectClient) -> int:
    """How many flow runs of any flow on the server are not in a final state (any of them may hold a lease)."""
    return await client.count_flow_runs(
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=list(FINAL_STATES)))
        )
    )


async def waiting_cleanups(client: PrefectClient) -> dict[UUID, str]:
    """Clean-up runs not started (Scheduled, Pending) whose work pool has no online worker, by the dead run they
    are for: what to tell the user (nothing will run them until a worker comes). A dead run with several such
    runs (the crash automation's and one started by hand, or on two pools) gets a sentence for each, oldest
    first, so the one a user is looking for is never left out."""
    found: dict[UUID, str] = {}
    online: dict[str, bool] = {}
    waiting = await runs_of(client, [CLEANUP_FLOW], [StateType.SCHEDULED, StateType.PENDING])
    for r in sorted(waiting, key=lambda r: (r.created is None, r.created or datetime.min.replace(tzinfo=UTC))):
        raw = (r.parameters or {}).get("crashed_run")
        pool = r.work_pool_name
        if not isinstance(raw, str) or not pool:
            continue
        with contextlib.suppress(ConfigError):
            dead = parse_run_id(raw)
            if pool not in online:
                workers = await client.read_workers_for_work_pool(pool)
                online[pool] = any(w.status == WorkerStatus.ONLINE for w in workers)
            if not online[pool]:
                since = r.expected_start_time or r.created
                when = f" since {since:%H:%M:%S} UTC" if since else ""
                said = (
                    f"its clean-up run {r.name} ({r.id}) has waited{when} for a worker on work pool {pool!r} and "
                    f"none is online: start one (`prefect worker start --pool {pool}`) or run the command above"
                )
                found[dead] = f"{found[dead]}; {said}" if dead in found else said
    return found
