"""Which flow run holds a GPU model: the run whose GPU session brought it up, or took it over, stamps its
flow run id on the model's Deployment (annotation ``coder-stack.io/held-by``, written by ``scale_task(...,
held_by=...)`` just before it scales).

The crash clean-up scales to 0 exactly the models a dead run holds — never one a live run has taken over
since (its stamp is the live run's): every change it makes is one conditional patch that the API server applies
only while the stamp still names the dead run (:func:`release_held`), so a session that takes the GPU between
the clean-up's read and its write wins. A run that ends normally leaves its stamp; `coder-stack status` names a
serving model stamped with a run that is not alive (:func:`orphaned_models`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from kubernetes_asyncio.client import ApiClient
from prefect.client.orchestration import PrefectClient, get_client
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, Field

from coder_stack.errors import WaitTimeout
from coder_stack.kubernetes.wait import wait_gone
from coder_stack.kubernetes.workloads import (
    DeploymentStatus,
    deployment_status,
    read_deployment,
    scale_if_annotated,
    unannotate_if,
)
from coder_stack.orchestration.liveness import (
    HEARTBEAT_S,
    SILENT_AFTER_S,
    flow_name_of,
    liveness_of,
    waiting_cleanups,
)
from coder_stack.spec import ModelSpec, StackSpec

HELD_BY = "coder-stack.io/held-by"


async def held_by(api: ApiClient, spec: StackSpec, run_id: str) -> list[tuple[ModelSpec, DeploymentStatus]]:
    """The spec's models stamped with ``run_id``, with their status (serving or not)."""
    out = []
    for m in spec.models:
        st = await deployment_status(api, spec.serving_namespace, m.name)
        if st.annotations.get(HELD_BY) == run_id:
            out.append((m, st))
    return out


async def stamp_of(api: ApiClient, spec: StackSpec, model: ModelSpec) -> str | None:
    dep = await read_deployment(api, spec.serving_namespace, model.name)
    return ((dep.metadata.annotations if dep.metadata else None) or {}).get(HELD_BY)


async def clear_held(api: ApiClient, spec: StackSpec, model: ModelSpec, run_id: str) -> bool:
    """Remove the model's stamp only while it names ``run_id``. False: another run stamped it since (kept)."""
    return await unannotate_if(api, spec.serving_namespace, model.name, HELD_BY, run_id)


@dataclass(frozen=True)
class HeldRelease:
    """What :func:`release_held` did to one model: typed, so the caller never reads the prose."""

    scaled_down: bool  # this call scaled it to 0 and its pods are gone (a stamp taken over after that is kept)
    detail: str  # for the report: ``scaled to 0…``, ``left alone: taken over…``, ``not serving``


async def release_held(api: ApiClient, spec: StackSpec, model: ModelSpec, run_id: str, *, serving: bool) -> HeldRelease:
    """Scale ``model`` to 0 (if ``serving``), wait until its pods are gone, then remove its stamp — each change only
    while the stamp still names ``run_id``. Returns what happened (``scaled to 0…``, ``taken over…``); raises
    the cluster's error (the pods still there after the deletion budget, while the stamp is still the run's)."""
    ns = spec.serving_namespace
    done, scaled_down = "not serving", False
    if serving:
        if not await scale_if_annotated(api, ns, model.name, 0, HELD_BY, run_id):
            return HeldRelease(False, f"left alone: {_taken_over(await stamp_of(api, spec, model))}")
        try:
            gone = await wait_gone(api, ns, model.selector, spec.timeouts.deletion_s)
        except WaitTimeout:
            now = await stamp_of(api, spec, model)
            if now != run_id:  # a session took it over meanwhile and scaled it up again: its pods are its own
                return HeldRelease(False, f"scaled to 0, then {_taken_over(now)}: its pods are its own")
            raise
        done = f"scaled to 0, pods gone after {gone.seconds:.1f} s" if gone.pods_seen else "scaled to 0"
        scaled_down = True
    if not await clear_held(api, spec, model, run_id):
        return HeldRelease(scaled_down, f"{done}; stamp kept: {_taken_over(await stamp_of(api, spec, model))}")
    return HeldRelease(scaled_down, done)


def _taken_over(stamp: str | None) -> str:
    who = f"flow run {stamp}" if stamp else "nobody (its stamp was removed)"
    return f"taken over by {who} since it was read"


class OrphanedModel(BaseModel):
    """A serving model stamped with a flow run that is not alive: it bills until something scales it down."""

    model: str
    replicas: int
    pods: int
    run_id: str
    run: str = Field(description="flow/run-name, or the id when the run is not on this Prefect server.")
    why: str = Field(description="Why the run is not alive.")
    waiting: str | None = Field(None, description="A clean-up run for it waiting for a worker that is not there.")

    def describe(self) -> str:
        text = (
            f"{self.model} ({self.replicas} replica(s), {self.pods} pod(s)) is held by flow run {self.run}, "
            f"which is not alive ({self.why}): nothing will scale it down by itself; free it now with "
            f"`coder-stack cleanup {self.run_id}`"
        )
        return text + (f"; {self.waiting}" if self.waiting else "")


async def orphaned_models(spec: StackSpec, statuses: list[DeploymentStatus]) -> list[OrphanedModel]:
    """The serving models (replicas or pods) stamped with a run that is not alive: Crashed, Failed or Cancelled
    (without a heartbeat since), silent for over SILENT_AFTER_S, or unknown to this Prefect server."""
    models = {m.name for m in spec.models}
    stamped = [
        s
        for s in statuses
        if s.namespace == spec.serving_namespace and s.name in models and s.annotations.get(HELD_BY)
        and (s.replicas or s.pods)
    ]  # fmt: skip
    if not stamped:
        return []
    out = []
    async with get_client() as client:
        now = datetime.now(UTC)
        waiting = await waiting_cleanups(client)
        for s in stamped:
            rid = s.annotations[HELD_BY]
            why = await _not_alive(client, rid, now)
            if why is None:
                continue
            label, reason = why
            with_waiting = None
            with contextlib.suppress(ValueError):
                with_waiting = waiting.get(UUID(rid))
            out.append(
                OrphanedModel(
                    model=s.name,
                    replicas=s.replicas,
                    pods=len(s.pods),
                    run_id=rid,
                    run=label,
                    why=reason,
                    waiting=with_waiting,
                )
            )
    return out


async def _not_alive(client: PrefectClient, run_id: str, now: datetime) -> tuple[str, str] | None:
    """(label, why) when the run is not alive; None when it is (or ended Completed: its models are its result)."""
    try:
        run = await client.read_flow_run(UUID(run_id))
    except (ValueError, ObjectNotFound):
        return run_id, "no such flow run on this Prefect server"
    live = await liveness_of(client, run, await flow_name_of(client, run.flow_id), now)
    label = f"{live.label()} ({run_id})"
    age = "no heartbeat seen" if live.heartbeat_age_s is None else f"last heartbeat {live.heartbeat_age_s:.0f} s ago"
    if live.state in {"CRASHED", "FAILED", "CANCELLED"}:
        if live.heartbeats_after(live.state_at):
            return None  # marked so, but still sending heartbeats: the clean-up leaves it alone too
        return label, f"{live.state.capitalize()}: {live.state_message or 'no message'}; {age}"
    if live.final:
        return None
    if live.silent:
        due = f"one is due every {HEARTBEAT_S} s, dead after {SILENT_AFTER_S} s"
        return label, f"{live.state.capitalize()} but silent: {age} ({due})"
    return None


__all__ = [
    "HELD_BY",
    "HeldRelease",
    "OrphanedModel",
    "clear_held",
    "held_by",
    "orphaned_models",
    "release_held",
    "stamp_of",
]
