"""Thin Prefect tasks over :mod:`coder_stack.usecases.idle`: read a serving model's idleness (keeping the
reading on its Deployment) and stamp a reclaim. Retries only :class:`~coder_stack.errors.RetriableError`."""

from __future__ import annotations

from datetime import datetime

from prefect import task

from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.spec import ModelSpec, StackSpec
from coder_stack.tasks._common import retrying, run_logger
from coder_stack.usecases.idle import Idleness, mark_reclaimed, moved_since, read_idleness
from coder_stack.vllm.metrics import Activity

_TASK = retrying(2, 5)


@task(name="read-idleness", **_TASK)
async def read_idleness_task(target: ClusterTarget, spec: StackSpec, model: ModelSpec, record: bool = True) -> Idleness:
    """Running/waiting requests and counters from the model's /metrics, judged against the kept reading."""
    async with open_api(target) as api:
        idle = await read_idleness(api, spec, model, record=record)
    run_logger().info("%s: %s.", model.name, idle.reason)
    return idle


@task(name="recheck-idleness", **_TASK)
async def moved_since_task(target: ClusterTarget, spec: StackSpec, model: ModelSpec, seen: Activity) -> str | None:
    """/metrics read again just before the scale-down: None if nothing moved since ``seen``, else why not."""
    async with open_api(target) as api:
        moved = await moved_since(api, spec, model, seen)
    if moved:
        run_logger().info("%s: %s.", model.name, moved)
    return moved


@task(name="mark-reclaimed", **_TASK)
async def mark_reclaimed_task(target: ClusterTarget, spec: StackSpec, model: ModelSpec, at: datetime) -> None:
    """Annotate the Deployment with when it was reclaimed."""
    async with open_api(target) as api:
        await mark_reclaimed(api, spec, model, at)


__all__ = ["mark_reclaimed_task", "moved_since_task", "read_idleness_task"]
