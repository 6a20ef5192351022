"""Thin Prefect tasks over :mod:`coder_stack.usecases.wake`: claim a model's wake, change its state, and keep a
measured cold start on the model's Deployment. Retries only :class:`~coder_stack.errors.RetriableError`; every
write is conditional (see the use case), so a retry never takes a claim another wake holds."""

from __future__ import annotations

from prefect import task

from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.kubernetes.workloads import own_annotations, read_deployment
from coder_stack.spec import ModelSpec, StackSpec
from coder_stack.tasks._common import retrying, run_logger
from coder_stack.usecases.wake import (
    Claim,
    ClaimOutcome,
    WakeState,
    claim_wake,
    cold_start_estimate,
    record_cold_start,
    run_dead_why,
    update_wake,
)

_TASK = retrying(2, 5)


@task(name="claim-wake", **_TASK)
async def claim_wake_task(target: ClusterTarget, spec: StackSpec, model: ModelSpec, run_id: str) -> ClaimOutcome:
    """Claim ``model``'s wake for this run (state ``starting``), unless it is Ready or a live wake is pending."""
    async with open_api(target) as api:
        estimate = cold_start_estimate(own_annotations(await read_deployment(api, spec.serving_namespace, model.name)))
        out = await claim_wake(api, spec, model, run_id, estimate, run_dead_why)
    if out.took_over:
        run_logger().info("%s: took over the wake of %s.", model.name, out.took_over)
    return out


@task(name="update-wake", **_TASK)
async def update_wake_task(target: ClusterTarget, spec: StackSpec, claim: Claim, state: WakeState) -> Claim | None:
    """This run's wake state on the model, while the claim is still this run's (None: it is not any more)."""
    async with open_api(target) as api:
        return await update_wake(api, spec, claim, state)


@task(name="cold-start-estimate", **_TASK)
async def cold_start_estimate_task(target: ClusterTarget, spec: StackSpec, model: ModelSpec) -> float:
    async with open_api(target) as api:
        return cold_start_estimate(own_annotations(await read_deployment(api, spec.serving_namespace, model.name)))


@task(name="record-cold-start", **_TASK)
async def record_cold_start_task(target: ClusterTarget, spec: StackSpec, model: ModelSpec, seconds: float) -> None:
    """Keep the measured cold start on the Deployment (what the wake callback's message says)."""
    async with open_api(target) as api:
        await record_cold_start(api, spec, model, seconds)
    run_logger().info("%s: cold start %.1f s kept as its estimate.", model.name, seconds)


__all__ = ["claim_wake_task", "cold_start_estimate_task", "record_cold_start_task", "update_wake_task"]
