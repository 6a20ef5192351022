"""The GPU's limits themselves: their names, the lease length, creating and sizing them (``coder-stack setup``),
and reading who holds them (``coder-stack status``, teardown's check).

``tag:gpu`` is the GPU's global concurrency limit: one slot per GPU in exclusive mode, ``SHARE_SLOTS`` hundredths
of the GPU when time-sliced. ``tag:gpu-start`` (time-sliced only, one slot) is the turn to start a model on the
shared GPU. Holding them is :mod:`coder_stack.orchestration.gpu`'s (the sessions); this module never takes a slot.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, Field

from coder_stack.errors import GpuBusy
from coder_stack.orchestration.liveness import (
    FINAL_STATES,
    HEARTBEAT_S,
    SILENT_AFTER_S,
    flow_name_of,
    liveness_of,
    runs_of,
    unfinished_runs,
)
from coder_stack.spec import SHARE_SLOTS

GPU_LIMIT = "tag:gpu"
# Time-sliced mode: one model starts on the shared GPU at a time (vLLM measures free GPU memory as it starts).
START_LIMIT = "tag:gpu-start"
LEASE_SECONDS = 300.0


class GpuRun(BaseModel):
    """A coder-stack flow run that is running, or ended with its GPU lease not given back: whether it is alive
    (its heartbeats) and holds a GPU slot (is the holder of a ``tag:gpu`` lease: in orchestration, "holder" is
    only ever that, Prefect's word for the flow run stored with a lease)."""

    run_id: str
    label: str
    state: str = Field("RUNNING", description="Its state type.")
    heartbeat_age_s: float | None = None
    holds_slot: bool = Field(False, description="The run recorded a tag:gpu lease it has not given back.")
    slots: int = Field(1, description="The slots of tag:gpu its recorded lease holds.")
    shares: bool = Field(False, description="tag:gpu counts hundredths of a time-sliced GPU: slots are shares.")
    dead: bool = Field(False, description=f"No heartbeat for {SILENT_AFTER_S} s, or ended: its process is gone.")
    lease_expires_by: str | None = Field(None, description="When its lease frees itself at the latest (UTC).")
    may_hold_slot: bool = Field(
        False,
        description="Ended abnormally with no lease on record while a slot is unaccounted for: it may have died "
        "between its grant and the recording of its lease.",
    )

    def describe(self) -> str:
        if self.may_hold_slot:
            return (
                f"{self.label} ended {self.state} with no GPU lease on record; it may hold a slot granted just "
                f"before it died: `coder-stack cleanup {self.run_id}` releases any lease the server holds for it"
            )
        if not self.holds_slot:
            what = "running"
        elif self.shares:
            what = f"holds {self.slots} hundredths of the GPU"
        else:
            what = "holds the GPU"
        if self.heartbeat_age_s is None:
            beat = "no heartbeat seen"
        else:
            beat = f"last heartbeat {self.heartbeat_age_s:.0f} s ago"
        if self.state != "RUNNING":
            return (
                f"{self.label} ended {self.state} ({beat}) but its GPU lease was not given back"
                + (f"; it frees itself by {self.lease_expires_by} at the latest" if self.lease_expires_by else "")
                + f"; release that lease now: `coder-stack cleanup {self.run_id}`"
            )
        if not self.dead:
            return f"{self.label} {what}: live ({beat}; one every {HEARTBEAT_S} s)"
        text = f"{self.label} {what}: DEAD ({beat}; one is due every {HEARTBEAT_S} s)"
        if self.holds_slot:
            text += (
                "; the crash automation marks it Crashed and its clean-up frees the GPU within 150 s"
                + (f", else its slot frees itself by {self.lease_expires_by}" if self.lease_expires_by else "")
                + f"; free it now: `coder-stack cleanup {self.run_id}`"
            )
        return text


class GpuLimitStatus(BaseModel):
    exists: bool
    limit: int = 0
    active_slots: int = 0
    running_flow_runs: list[str] = Field(default_factory=list, description="Names of running coder-stack flows.")
    runs: list[GpuRun] = Field(
        default_factory=list, description="Running coder-stack runs, live or dead, and ended ones still on a lease."
    )
    unaccounted: int = Field(0, description="Slots held that no recorded lease of a coder-stack run accounts for.")
    leaked: bool = Field(
        False,
        description=(
            "Slots are held and no lease can exist: no recorded lease, no unfinished flow run on the server, and "
            "no coder-stack run ended within a lease's life (the server lost its leases: a restart without "
            "lease storage)."
        ),
    )
    lease_window_ends: str | None = Field(None, description="When every lease of a run that ended has expired.")
    starting: int | None = Field(None, description=f"Slots of {START_LIMIT} held (None: no such limit, exclusive).")

    @property
    def shares(self) -> bool:
        """The limit counts hundredths of a time-sliced GPU (setup sizes it so), not whole GPUs."""
        return self.limit == SHARE_SLOTS

    def describe(self) -> str:
        if not self.exists:
            return f"GPU limit {GPU_LIMIT} is missing: run `coder-stack setup` (or `prefect gcl create {GPU_LIMIT} N`)"
        if self.shares:
            text = (
                f"GPU limit {GPU_LIMIT} (time-sliced): {self.active_slots} of {self.limit} hundredths of the GPU held"
            )
        else:
            text = f"GPU limit {GPU_LIMIT}: {self.active_slots}/{self.limit} slot(s) held"
        if self.running_flow_runs:
            text += f" (running: {', '.join(self.running_flow_runs)})"
        if self.starting:
            text += (
                f"; a model is starting on the shared GPU ({START_LIMIT} held: the others start after it; a dead "
                "run's turn is freed by its clean-up)"
            )
        if self.runs:
            text += "; " + "; ".join(r.describe() for r in self.runs)
        claims = sum(r.slots for r in self.runs if r.holds_slot)
        if claims > self.active_slots:
            on_record = (
                f"leases on record hold {claims} hundredths"
                if self.shares
                else f"{claims} run(s) have a lease on record"
            )
            text += (
                f"; {on_record} but only {self.active_slots} slot(s) are held: some of "
                "those leases were given back without their label being written (`coder-stack cleanup ID` on such "
                "a run finds its lease gone and changes nothing)"
            )
        if self.leaked:
            text += (
                f"; {self.unaccounted} slot(s) held and no lease exists (no flow run is unfinished and none ended "
                f"within a lease's {LEASE_SECONDS:.0f} s: the server lost its leases, e.g. a restart without lease "
                f"storage) — free them with `prefect gcl update {GPU_LIMIT} --active-slots 0`"
            )
        elif self.unaccounted > 0:
            text += (
                f"; {self.unaccounted} slot(s) held by a session whose lease is not on record yet (it is written "
                "just after the grant) or by a run that is not one of coder-stack's GPU flows; a lease frees itself "
                f"at most {LEASE_SECONDS:.0f} s after its holder dies"
                + (
                    f" (every lease of a run that ended is gone by {self.lease_window_ends})"
                    if self.lease_window_ends
                    else ""
                )
                + ": run `coder-stack status` again then; never zero the limit while a lease may exist, it would "
                "let two sessions onto the GPU"
            )
        return text


async def ensure_gpu_limit(slots: int) -> str:
    """Create ``tag:gpu`` or resize it to ``slots`` (setup passes ``StackSpec.gpu_limit_slots``: the GPUs in
    exclusive mode, SHARE_SLOTS hundredths of the GPU when time-sliced). Returns what was done.

    Refuses (GpuBusy, nothing changed) to switch the limit between counting GPUs and counting shares while any
    slot is held: the held slots would be read in the new unit (one whole GPU held in exclusive mode would count
    as one hundredth, and a 55-hundredths session could join it). Resizing between GPU counts stays as it was
    (a slot is one GPU either way)."""
    async with get_client() as client:
        try:
            existing = await client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            existing = None
        held = existing is not None and existing.active_slots > 0
        if held and existing and existing.limit != slots and SHARE_SLOTS in (existing.limit, slots):
            raise GpuBusy(
                f"{GPU_LIMIT} has {existing.active_slots} of {existing.limit} slot(s) held and the stack now "
                f"needs {slots} ({_unit(slots)} instead of {_unit(existing.limit)}); resizing it now could let "
                "two sessions onto the GPU, so it was left as it is. Run `coder-stack setup` again when "
                "`coder-stack status` shows no GPU session"
            )
        await client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots)
    if existing is None:
        return f"created {GPU_LIMIT} with {slots} slot(s)"
    if existing.limit != slots:
        return f"resized {GPU_LIMIT} from {existing.limit} to {slots} slot(s)"
    return f"{GPU_LIMIT} already has {slots} slot(s)"


def _unit(slots: int) -> str:
    return "hundredths of a time-sliced GPU" if slots == SHARE_SLOTS else "whole GPUs"


async def ensure_start_limit(time_sliced: bool) -> str | None:
    """Time-sliced: create ``tag:gpu-start`` with one slot (or set it back to one). Exclusive: nothing (a start
    limit left from time-sliced mode is unused and left alone). Returns what was done, or None."""
    if not time_sliced:
        return None
    async with get_client() as client:
        try:
            existing = await client.read_global_concurrency_limit_by_name(START_LIMIT)
        except ObjectNotFound:
            existing = None
        if existing is not None and existing.limit == 1:
            return f"{START_LIMIT} already has 1 slot"
        await client.upsert_global_concurrency_limit_by_name(START_LIMIT, 1)
    if existing is None:
        return f"created {START_LIMIT} with 1 slot (one model starts on the shared GPU at a time)"
    return f"set {START_LIMIT} to 1 slot (was {existing.limit})"


async def gpu_limit_status(flow_names: tuple[str, ...] = ()) -> GpuLimitStatus:
    """The limit, and each coder-stack run (of ``flow_names``; all if empty) that is running (live or dead) or
    ended with a recorded lease not given back. Runs are filtered on the server and read page by page."""
    async with get_client() as client:
        try:
            gcl = await client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            return GpuLimitStatus(exists=False)
        now = datetime.now(UTC)
        window = timedelta(seconds=LEASE_SECONDS + SILENT_AFTER_S)
        running = await runs_of(client, flow_names, [StateType.RUNNING, StateType.CANCELLING])
        ended = await runs_of(client, flow_names, FINAL_STATES, ended_after=now - window)
        names = []
        shown: list[GpuRun] = []
        unrecorded: list[GpuRun] = []
        flows: dict[UUID, str] = {}
        for r in running + ended:
            if r.flow_id not in flows:
                flows[r.flow_id] = await flow_name_of(client, r.flow_id)
            live = await liveness_of(client, r, flows[r.flow_id], now)
            over = live.final
            normal_end = live.state == "COMPLETED" and not live.heartbeats_after(live.state_at)
            if over and live.lease_id is None and not normal_end and not live.lease_released:
                # Ended abnormally with no lease on record: killed between its grant and the label, it may still
                # hold a slot the server knows by its run id. Named below if a slot is unaccounted for.
                unrecorded.append(
                    GpuRun(
                        run_id=str(r.id),
                        label=live.label(),
                        state=live.state,
                        heartbeat_age_s=live.heartbeat_age_s,
                        dead=True,
                        may_hold_slot=True,
                    )
                )
                continue
            if over and (live.lease_id is None or normal_end):
                continue  # ended and gave its lease back (or ended normally: its own release ran)
            if not over:
                names.append(live.label())
            expires = lease_expires_by(live.last_heartbeat)
            alive_after_mark = over and live.heartbeats_after(live.state_at)
            shown.append(
                GpuRun(
                    run_id=str(r.id),
                    label=live.label(),
                    state="RUNNING" if alive_after_mark else live.state,
                    heartbeat_age_s=live.heartbeat_age_s,
                    holds_slot=live.lease_id is not None,
                    dead=(live.silent or over) and not alive_after_mark,
                    slots=live.lease_slots,
                    shares=gcl.limit == SHARE_SLOTS,
                    lease_expires_by=f"{expires:%H:%M:%S} UTC" if expires else None,
                )
            )
        unaccounted = max(0, gcl.active_slots - sum(g.slots for g in shown if g.holds_slot))
        if unaccounted:
            shown += unrecorded
        leaked = False
        if unaccounted and not any(g.holds_slot for g in shown) and not ended:
            leaked = await unfinished_runs(client) == 0
        try:
            starting: int | None = (await client.read_global_concurrency_limit_by_name(START_LIMIT)).active_slots
        except ObjectNotFound:
            starting = None
    last_end = max((r.end_time for r in ended if r.end_time), default=None)
    return GpuLimitStatus(
        exists=True,
        limit=gcl.limit,
        active_slots=gcl.active_slots,
        running_flow_runs=names,
        runs=shown,
        unaccounted=unaccounted,
        leaked=leaked,
        lease_window_ends=f"{last_end + window:%H:%M:%S} UTC" if last_end else None,
        starting=starting,
    )


def lease_expires_by(last_heartbeat: datetime | None) -> datetime | None:
    """The latest time a dead run's lease frees itself: it renewed the lease at most one heartbeat after its
    last one (its process was gone by then), and a lease lives LEASE_SECONDS after a renewal."""
    if last_heartbeat is None:
        return None
    return last_heartbeat + timedelta(seconds=HEARTBEAT_S + LEASE_SECONDS)
