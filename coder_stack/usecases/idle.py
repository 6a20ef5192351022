"""Is a serving model idle? Its pod (Kubernetes) and its /metrics (vLLM), judged against the reading kept on
its Deployment (annotation ``coder-stack.io/activity``); a reclaim is stamped there too
(``coder-stack.io/reclaimed-at``) for `coder-stack status`.

Idleness is read, never guessed: no Ready pod, an unreachable or unparseable /metrics, missing counters ->
``readable=False`` with the reason, and the model is left serving.
"""

from __future__ import annotations

from datetime import UTC, datetime

from kubernetes_asyncio.client import ApiClient
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import CoderStackError
from coder_stack.kubernetes.pods import is_pod_ready, list_pods, ready_since
from coder_stack.kubernetes.workloads import annotate_deployment, own_annotations, read_deployment
from coder_stack.spec import ModelSpec, StackSpec
from coder_stack.transport import make_client
from coder_stack.usecases.endpoints import open_endpoint
from coder_stack.vllm.metrics import Activity, Reading, judge, read_activity

ACTIVITY = "coder-stack.io/activity"
RECLAIMED_AT = "coder-stack.io/reclaimed-at"


class Idleness(BaseModel):
    """One serving model's idleness at one reading."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="Deployment name.")
    readable: bool = Field(description="Its activity could be read (Ready pod, /metrics with the counters).")
    idle: bool = Field(False, description="Idle for at least idle_after_s and past the grace: may be reclaimed.")
    reason: str = Field(description="Why it is (not) idle, or why it could not be read.")
    idle_s: float = Field(0.0, ge=0, description="Seconds its counters have stood still.")
    activity: Activity | None = Field(None, description="What /metrics showed.")
    ready_since: datetime | None = Field(None, description="When its pod became Ready.")
    recorded: bool = Field(False, description="A new reading was kept on the Deployment.")


def bring_back(spec: StackSpec, model: ModelSpec) -> str:
    """How to bring a reclaimed model back."""
    if model.name == spec.default_model:
        return f"`coder-stack up` (or `coder-stack swap {model.name}`)"
    return f"`coder-stack swap {model.name}`"


async def read_idleness(
    api: ApiClient, spec: StackSpec, model: ModelSpec, *, now: datetime | None = None, record: bool = True
) -> Idleness:
    """Read ``model``'s activity and judge it against the kept reading; with ``record``, keep the new reading
    (and drop a stale reclaimed-at stamp: the model is serving again)."""
    ns = spec.serving_namespace
    dep = await read_deployment(api, ns, model.name)
    kept = own_annotations(dep)
    pods = [p for p in await list_pods(api, ns, model.selector) if is_pod_ready(p)]
    if not pods:
        return Idleness(model=model.name, readable=False, reason="not read: no Ready pod, so /metrics cannot be read")
    since = ready_since(pods[-1])
    try:
        activity = await _activity(api, spec, model)
    except CoderStackError as e:
        return Idleness(model=model.name, readable=False, reason=f"not read: {e}", ready_since=since)
    previous = Reading.from_annotation(kept.get(ACTIVITY))
    verdict = judge(activity, previous, now or datetime.now(UTC), since, spec.idle_after_s, spec.idle_grace_s)
    changes: dict[str, str | None] = {}
    if verdict.reading is not None and verdict.reading != previous:
        changes[ACTIVITY] = verdict.reading.to_annotation()
    if RECLAIMED_AT in kept:
        changes[RECLAIMED_AT] = None
    if record:
        await annotate_deployment(api, ns, model.name, changes)
    return Idleness(
        model=model.name,
        readable=True,
        idle=verdict.idle,
        reason=verdict.reason,
        idle_s=verdict.idle_s,
        activity=activity,
        ready_since=since,
        recorded=record and ACTIVITY in changes,
    )


async def _activity(api: ApiClient, spec: StackSpec, model: ModelSpec) -> Activity:
    """``model``'s /metrics counters, read once through its endpoint."""
    async with (
        open_endpoint(api, spec, model.name) as base_url,
        make_client(spec.timeouts, attempts=1) as http,
    ):
        return await read_activity(http, base_url, model.served_model_name, spec.timeouts)


async def moved_since(api: ApiClient, spec: StackSpec, model: ModelSpec, seen: Activity) -> str | None:
    """Read ``model``'s /metrics again, just before it is scaled down: ``None`` if nothing moved since ``seen``
    (the reading it was judged idle by), else why it must be left serving. An unreadable /metrics counts as
    moved: idleness is read, never assumed."""
    try:
        now = await _activity(api, spec, model)
    except CoderStackError as e:
        return f"not reclaimed: its /metrics could not be read again just before the scale-down ({e})"
    if now.running or now.waiting:
        return f"busy: {now.running} request(s) running, {now.waiting} waiting when it was about to be scaled down"
    if (now.requests, now.tokens, now.engine_started) != (seen.requests, seen.tokens, seen.engine_started):
        return (
            f"active: served requests after it was judged idle ({seen.requests} -> {now.requests} request(s)); "
            "not scaled down"
        )
    return None


async def mark_reclaimed(api: ApiClient, spec: StackSpec, model: ModelSpec, at: datetime) -> None:
    """Stamp the reclaim on the Deployment, for `coder-stack status`."""
    await annotate_deployment(api, spec.serving_namespace, model.name, {RECLAIMED_AT: at.isoformat()})


def reclaimed_note(spec: StackSpec, model: ModelSpec, annotations: dict[str, str]) -> str | None:
    """`reclaimed at … (idle N min); bring it back with …` from a Deployment's annotations, if it was."""
    stamp = annotations.get(RECLAIMED_AT)
    if not stamp:
        return None
    try:
        at = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    reading = Reading.from_annotation(annotations.get(ACTIVITY))
    idle = f" (idle {(at - reading.since).total_seconds() / 60:.0f} min)" if reading and at.tzinfo else ""
    return f"{model.name}: reclaimed at {at:%Y-%m-%d %H:%M} UTC{idle}; bring it back with {bring_back(spec, model)}"


__all__ = [
    "ACTIVITY",
    "RECLAIMED_AT",
    "Idleness",
    "bring_back",
    "mark_reclaimed",
    "moved_since",
    "read_idleness",
    "reclaimed_note",
]
