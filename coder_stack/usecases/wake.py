"""Wake on demand: the wake state on a model's Deployment, the claim that lets only one wake bring a model up, and
the model's measured cold start (what the LiteLLM callback reads to tell the person asking how long it takes).

Two annotations on the model's Deployment (namespace ``serving``):

- ``coder-stack.io/wake`` (:data:`WAKE`): JSON, present while a wake is pending —
  ``{"state": "waiting-for-gpu" | "starting", "run": <flow run id>, "since": <iso8601 UTC>, "busy": [...],
  "ready_by": <iso8601 UTC> | null}``. Written by the ``wake_model`` run that *claims* the wake, removed when that
  run ends however it ends.
- ``coder-stack.io/cold-start-s`` (:data:`COLD_START`): the last measured cold start in seconds, written after
  every wait-until-Ready that saw a cold start.

Every change to the wake annotation is one conditional patch that the API server applies only while the
Deployment still reads what was read: a claim where there was none carries the Deployment's ``resourceVersion``
(a JSON patch ``test`` op, and the version as a precondition), a claim over a stale one and every later update or
removal test the annotation's exact old value. Two wakes reading "no claim" at the same moment: one write wins,
the other reads again and finds the winner's claim. A claim naming a run that is not alive (its process killed:
Crashed, Failed or Cancelled without a heartbeat since, silent for ``SILENT_AFTER_S``, or unknown to Prefect) is
stale: the next wake takes it over, and the crash clean-up removes it (:func:`clear_wake_of`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Literal
from uuid import UUID

from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coder_stack.errors import CoderStackError
from coder_stack.kubernetes.client import API_TIMEOUT, api_errors
from coder_stack.kubernetes.workloads import (
    DeploymentStatus,
    annotate_deployment,
    read_deployment,
    unannotate_if,
)
from coder_stack.orchestration.liveness import (
    HEARTBEAT_S,
    SILENT_AFTER_S,
    flow_name_of,
    liveness_of,
    runs_of,
)
from coder_stack.spec import ModelSpec, StackSpec

WAKE = "coder-stack.io/wake"
COLD_START = "coder-stack.io/cold-start-s"
# The estimate when the Deployment carries no measured cold start (the callback's settings use the same default).
DEFAULT_COLD_START_S = 600.0
# The wake flow's name: its runs not yet started or running are what `status` lists.
WAKE_FLOW = "wake_model"
# How many times a claim reads again after losing a race before it gives up (each loss means another wake wrote).
CLAIM_TRIES = 5

WakeStateName = Literal["waiting-for-gpu", "starting"]


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class WakeState(BaseModel):
    """The ``coder-stack.io/wake`` annotation: a pending wake (no secret in it)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    state: WakeStateName
    run: str = Field(description="The flow run id of the wake that claimed the model.")
    since: str = Field(description="When it entered this state (ISO 8601 UTC).")
    busy: list[str] = Field(default_factory=list, description="waiting-for-gpu: the models in use it waits for.")
    ready_by: str | None = Field(None, description="starting: since + the cold-start estimate (ISO 8601 UTC).")

    def to_annotation(self) -> str:
        return json.dumps(
            {"state": self.state, "run": self.run, "since": self.since, "busy": self.busy, "ready_by": self.ready_by},
            separators=(",", ":"),
        )

    @classmethod
    def from_annotation(cls, raw: str | None) -> WakeState | None:
        """The state, or None when absent or unreadable (an unreadable claim is stale: anyone may replace it)."""
        if not raw:
            return None
        try:
            return cls.model_validate(json.loads(raw))
        except (ValueError, ValidationError):
            return None

    @classmethod
    def starting(cls, run: str, estimate_s: float, now: datetime | None = None) -> WakeState:
        now = now or datetime.now(UTC)
        return cls(state="starting", run=run, since=_iso(now), ready_by=_iso(now + timedelta(seconds=estimate_s)))

    @classmethod
    def waiting(cls, run: str, busy: list[str], now: datetime | None = None) -> WakeState:
        return cls(state="waiting-for-gpu", run=run, since=_iso(now or datetime.now(UTC)), busy=sorted(busy))


def cold_start_estimate(annotations: dict[str, str]) -> float:
    """The model's last measured cold start (seconds), else :data:`DEFAULT_COLD_START_S`."""
    try:
        value = float(annotations.get(COLD_START, ""))
    except ValueError:
        return DEFAULT_COLD_START_S
    return value if value > 0 else DEFAULT_COLD_START_S


async def record_cold_start(api: ApiClient, spec: StackSpec, model: ModelSpec, seconds: float) -> None:
    """Keep ``seconds`` as the model's measured cold start (``coder-stack.io/cold-start-s``)."""
    await annotate_deployment(api, spec.serving_namespace, model.name, {COLD_START: f"{seconds:.1f}"})


# ------------------------------------------------------------------ the claim
class Claim(BaseModel):
    """This run's wake on a model: the exact annotation value it last wrote (every change tests it)."""

    model: str
    run: str
    raw: str

    @property
    def state(self) -> WakeState:
        found = WakeState.from_annotation(self.raw)
        assert found is not None
        return found


class ClaimOutcome(BaseModel):
    """What :func:`claim_wake` found: the model Ready, a wake pending under a live run, or this run's claim."""

    ready: bool = False
    pending: WakeState | None = Field(None, description="The live wake already pending (nothing to do).")
    claim: Claim | None = None
    took_over: str | None = Field(None, description="The stale run whose claim was taken over, and why.")


RunAlive = Callable[[str], Awaitable[str | None]]


async def claim_wake(
    api: ApiClient, spec: StackSpec, model: ModelSpec, run_id: str, estimate_s: float, dead_why: RunAlive
) -> ClaimOutcome:
    """Claim the wake of ``model`` for ``run_id`` (state ``starting``), unless it is Ready or a live run's wake is
    pending. ``dead_why(run)`` answers why a run is not alive, or None when it is (:func:`why_not_alive`)."""
    ns = spec.serving_namespace
    for _ in range(CLAIM_TRIES):
        dep = await read_deployment(api, ns, model.name)
        ready = int((dep.status.ready_replicas if dep.status else 0) or 0)
        if ready >= 1:
            return ClaimOutcome(ready=True)
        annotations = (dep.metadata.annotations if dep.metadata else None) or {}
        raw = annotations.get(WAKE)
        stale: str | None = None
        if raw is not None:
            found = WakeState.from_annotation(raw)
            if found is not None and found.run == run_id:
                return ClaimOutcome(claim=Claim(model=model.name, run=run_id, raw=raw))  # ours (a task retry)
            why = "unreadable" if found is None else await dead_why(found.run)
            if why is None and found is not None:
                return ClaimOutcome(pending=found)
            stale = f"{found.run if found else 'unknown run'} ({why})"
        value = WakeState.starting(run_id, estimate_s).to_annotation()
        if raw is None:
            rv = dep.metadata.resource_version if dep.metadata else None
            ops: list[dict[str, object]] = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}]
            if annotations:
                ops.append({"op": "add", "path": _path(WAKE), "value": value})
            else:
                ops.append({"op": "add", "path": "/metadata/annotations", "value": {WAKE: value}})
            won = await _json_patch(api, ns, model.name, ops)
        else:
            won = await _replace_if(api, ns, model.name, raw, value)
        if won:
            return ClaimOutcome(claim=Claim(model=model.name, run=run_id, raw=value), took_over=stale)
    raise CoderStackError(
        f"could not claim the wake of {model.name}: its Deployment changed under every one of {CLAIM_TRIES} tries "
        "(other wakes writing at once); nothing was changed — run the wake again"
    )


async def update_wake(api: ApiClient, spec: StackSpec, claim: Claim, state: WakeState) -> Claim | None:
    """Replace this run's wake state with ``state`` while the annotation still reads the claim's value. None: the
    claim was taken over or removed (another wake owns the model now: this run must not scale it)."""
    value = state.to_annotation()
    if value == claim.raw:
        return claim
    if await _replace_if(api, spec.serving_namespace, claim.model, claim.raw, value):
        return claim.model_copy(update={"raw": value})
    return None


async def release_claim(api: ApiClient, spec: StackSpec, claim: Claim) -> bool:
    """Remove this run's wake annotation, only while it reads the claim's value. False: not ours any more."""
    return await unannotate_if(api, spec.serving_namespace, claim.model, WAKE, claim.raw)


async def clear_wake_of(api: ApiClient, spec: StackSpec, run_id: str) -> list[str]:
    """Remove every wake claim naming ``run_id`` (a dead run's; each removal conditional on the value read).
    Returns the models cleared."""
    cleared = []
    for m in spec.models:
        dep = await read_deployment(api, spec.serving_namespace, m.name)
        raw = ((dep.metadata.annotations if dep.metadata else None) or {}).get(WAKE)
        found = WakeState.from_annotation(raw)
        mine = raw is not None and found is not None and found.run == run_id
        if mine and raw is not None and await unannotate_if(api, spec.serving_namespace, m.name, WAKE, raw):
            cleared.append(m.name)
    return cleared


def _path(key: str) -> str:
    return "/metadata/annotations/" + key.replace("~", "~0").replace("/", "~1")


async def _replace_if(api: ApiClient, ns: str, name: str, old: str, new: str) -> bool:
    ops: list[dict[str, object]] = [
        {"op": "test", "path": _path(WAKE), "value": old},
        {"op": "replace", "path": _path(WAKE), "value": new},
    ]
    return await _json_patch(api, ns, name, ops)


async def _json_patch(api: ApiClient, ns: str, name: str, ops: list[dict[str, object]]) -> bool:
    """Apply ``ops`` (their first is a ``test``); False when the test failed (422) or the Deployment changed
    between the server's read and write (409): nothing was changed."""
    apps = client.AppsV1Api(api)
    with api_errors("patch", "deployments", ns, name):
        try:
            await apps.patch_namespaced_deployment(name, ns, ops, _request_timeout=API_TIMEOUT)
        except ApiException as e:
            if e.status in (409, 422):
                return False
            raise
    return True


# ------------------------------------------------------------------ is the claiming run alive?
async def why_not_alive(client_: PrefectClient, run_id: str, now: datetime | None = None) -> str | None:
    """Why the wake run ``run_id`` is not alive, or None when it is. Dead: unknown to this Prefect server; in a final
    state with no heartbeat received since; or no sign of life (a heartbeat, or its start) for ``SILENT_AFTER_S``.
    A run that started moments ago and has no stored heartbeat yet is alive."""
    now = now or datetime.now(UTC)
    try:
        run = await client_.read_flow_run(UUID(run_id))
    except (ValueError, ObjectNotFound):
        return "no such flow run on this Prefect server"
    live = await liveness_of(client_, run, await flow_name_of(client_, run.flow_id), now)
    if live.final:
        if live.state in {"CRASHED", "FAILED", "CANCELLED"} and live.heartbeats_after(live.state_at):
            return None
        return f"{live.state.capitalize()}: {live.state_message or 'no message'}"
    if not live.silent:
        return None
    started = run.start_time or run.created
    if started is not None and (now - started).total_seconds() <= SILENT_AFTER_S:
        return None  # just started: its first heartbeat may not be stored yet
    age = "none seen" if live.heartbeat_age_s is None else f"last {live.heartbeat_age_s:.0f} s ago"
    return f"{live.state.capitalize()} but silent: heartbeat {age} (one is due every {HEARTBEAT_S} s)"


async def run_dead_why(run_id: str) -> str | None:
    async with get_client() as c:
        return await why_not_alive(c, run_id)


# ------------------------------------------------------------------ for `coder-stack status`
class PendingWake(BaseModel):
    """A wake `status` shows: from a Deployment's annotation, or a ``wake_model`` run not yet at the model."""

    model: str
    state: str = Field(description="waiting-for-gpu, starting, requested (a run not started yet) or stale.")
    since: str | None = None
    waits_for: str = Field("", description="What it waits for, in words.")
    run: str | None = Field(None, description="Its flow run (id, or flow/run-name (id)).")

    def describe(self) -> str:
        when = f" since {self.since}" if self.since else ""
        run = f" (run {self.run})" if self.run else ""
        return f"{self.model}: {self.state}{when}{run}" + (f" — {self.waits_for}" if self.waits_for else "")


def wake_of_status(status: DeploymentStatus) -> WakeState | None:
    return WakeState.from_annotation(status.annotations.get(WAKE))


async def pending_wakes(spec: StackSpec, statuses: list[DeploymentStatus]) -> list[PendingWake]:
    """Every pending wake: the models' wake annotations (a dead run's claim shown as stale), then the ``wake_model``
    runs that are Scheduled, Pending or Running without a claim (requested, not yet picked up: a worker must run
    them; when none is online for the pool, how to start one)."""
    models = {m.name for m in spec.models}
    out: list[PendingWake] = []
    claimed: set[str] = set()
    async with get_client() as c:
        now = datetime.now(UTC)
        for s in statuses:
            if s.namespace != spec.serving_namespace or s.name not in models:
                continue
            raw = s.annotations.get(WAKE)
            if raw is None:
                continue
            w = WakeState.from_annotation(raw)
            if w is None:
                out.append(PendingWake(model=s.name, state="stale", waits_for="an unreadable wake annotation"))
                continue
            claimed.add(w.run)
            dead = await why_not_alive(c, w.run, now)
            if dead is not None:
                waits = f"nothing: its run is not alive ({dead}); the next request's wake takes it over"
                out.append(PendingWake(model=s.name, state="stale", since=w.since, waits_for=waits, run=w.run))
            elif w.state == "waiting-for-gpu":
                busy = ", ".join(w.busy) or "another run"
                waits = f"the GPU: {busy} in use (never evicted; it comes up once that is idle and reclaimed)"
                out.append(PendingWake(model=s.name, state=w.state, since=w.since, waits_for=waits, run=w.run))
            else:
                waits = f"its cold start, ready by about {w.ready_by}" if w.ready_by else "its cold start"
                out.append(PendingWake(model=s.name, state=w.state, since=w.since, waits_for=waits, run=w.run))
        online: dict[str, bool] = {}
        for r in await runs_of(c, [WAKE_FLOW], [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]):
            if str(r.id) in claimed:
                continue
            model = (r.parameters or {}).get("model")
            since = r.expected_start_time or r.created
            label = f"{r.name} ({r.id})"
            st = r.state.type if r.state else None
            if st == StateType.RUNNING:
                if await why_not_alive(c, str(r.id), now) is not None:
                    continue  # a dead run: the crash clean-up's business (status names what it holds)
                waits = "the run is starting (reading the model, taking the GPU limit)"
                out.append(
                    PendingWake(model=str(model), state="requested", since=_when(since), waits_for=waits, run=label)
                )
                continue
            pool = r.work_pool_name
            waits = "a worker to pick it up"
            if pool:
                if pool not in online:
                    try:
                        workers = await c.read_workers_for_work_pool(pool)
                        online[pool] = any(w.status.value == "ONLINE" for w in workers)
                    except Exception:
                        online[pool] = True  # unknown: say nothing that may be wrong
                if not online[pool]:
                    waits = (
                        f"a worker on work pool {pool!r}, and none is online: start one "
                        f"(`prefect worker start --pool {pool}`)"
                    )
            out.append(PendingWake(model=str(model), state="requested", since=_when(since), waits_for=waits, run=label))
    return out


def _when(t: datetime | None) -> str | None:
    return _iso(t) if t else None


__all__ = [
    "COLD_START",
    "DEFAULT_COLD_START_S",
    "WAKE",
    "WAKE_FLOW",
    "Claim",
    "ClaimOutcome",
    "PendingWake",
    "WakeState",
    "claim_wake",
    "clear_wake_of",
    "cold_start_estimate",
    "pending_wakes",
    "record_cold_start",
    "release_claim",
    "run_dead_why",
    "update_wake",
    "wake_of_status",
    "why_not_alive",
]
