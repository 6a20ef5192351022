"""Thin Prefect tasks over the cluster functions in :mod:`coder_stack.kubernetes` (workloads, wait, exec, preflight).

Each task opens its own cluster client from a serialisable :class:`ClusterTarget`, calls one function and
returns its pydantic report. Retries only :class:`~coder_stack.errors.RetriableError` (API server
hiccups, a pod not Ready yet); a crash loop or an over-budget phase fails at once. No task carries the
``gpu`` tag: the flow holds the GPU limit around the whole session.
"""

from __future__ import annotations

import asyncio
import logging
from uuid import UUID

from prefect import task
from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact
from prefect.exceptions import MissingContextError

from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.kubernetes.preflight import PreflightReport, preflight
from coder_stack.kubernetes.wait import OnPhase, PhaseUpdate, ReadyReport, wait_ready
from coder_stack.kubernetes.workloads import (
    DeploymentStatus,
    ScaleResult,
    annotate_deployment,
    deployment_status,
    scale,
)
from coder_stack.spec import FrontendSpec, ModelSpec, PhaseBudgets, StackSpec
from coder_stack.tasks._common import retrying, run_logger
from coder_stack.usecases.gpu import FreedGpu, ShareCheck, free_gpu, wait_for_share
from coder_stack.usecases.stamps import HELD_BY

_TASK = retrying(2, 5, 10)


@task(name="preflight", **_TASK)
async def preflight_task(target: ClusterTarget, spec: StackSpec, models: list[str] | None = None) -> PreflightReport:
    """Namespaces and Deployments exist, the models fit the GPU node's RAM; which models hold the GPU."""
    log = run_logger()
    async with open_api(target) as api:
        report = await preflight(api, spec, models)
    fits = ", ".join(f"{m.name} {m.need_gb:g}/{m.node_memory_gb:g} GB" for m in report.models)
    log.info("Preflight passed: every Deployment exists; host RAM per model: %s (%s).", fits, report.memory_source)
    if report.active_models:
        log.info(
            "Serving now: %s.",
            ", ".join(f"{m.name} ({m.ready_replicas}/{m.replicas} ready)" for m in report.active_models),
        )
    else:
        log.info("No GPU model is scaled up.")
    for note in report.notes:
        log.info("Note: %s", note)
    return report


@task(name="free-gpu", **_TASK)
async def free_gpu_task(
    target: ClusterTarget, spec: StackSpec, keep: ModelSpec | list[ModelSpec] | None = None
) -> FreedGpu:
    """Every GPU model except ``keep`` (one or several) to 0, then until their pods are gone (the GPU is free
    only then)."""
    log = run_logger()
    async with open_api(target) as api:
        freed = await free_gpu(api, spec, keep)
    if not freed.scaled_down:
        log.info("No other GPU model had replicas or pods; the GPU is free.")
    for h, g in zip(freed.scaled_down, freed.gone, strict=True):
        log.info(
            "%s (%d replica(s), %d pod(s)) to 0: %d pod(s) gone after %.1fs; its GPU is free.",
            h.name, h.replicas, len(h.pods), g.pods_seen, g.seconds,
        )  # fmt: skip
    return freed


@task(name="wait-for-share", **_TASK)
async def wait_for_share_task(target: ClusterTarget, spec: StackSpec, model: ModelSpec) -> ShareCheck:
    """Time-sliced: until ``model``'s share of the GPU is free beside the models already on it (vLLM refuses to
    start otherwise); bounded by the deletion timeout, then an error naming what holds the GPU."""
    log = run_logger()
    async with open_api(target) as api:
        check = await wait_for_share(api, spec, model, spec.timeouts.deletion_s)
    log.info("%s's share of the GPU is free: %s.", model.name, check.verdict.summary())
    return check


@task(name="scale", **_TASK)
async def scale_task(
    target: ClusterTarget,
    spec: StackSpec,
    deployment: ModelSpec | FrontendSpec,
    replicas: int,
    held_by: str | None = None,
) -> ScaleResult:
    """`kubectl scale deploy/<name> --replicas=N` for a model or a front-end of the spec (no change if already
    there). ``held_by``: first stamp that flow run on the Deployment as the one holding it (the crash clean-up
    scales to 0 what a dead run holds)."""
    log = run_logger()
    namespace = spec.serving_namespace if isinstance(deployment, ModelSpec) else spec.experience_namespace
    name = deployment.name
    async with open_api(target) as api:
        found = None
        if held_by is not None:  # the stamp first; the Deployment it answers with says the replicas found
            written = await annotate_deployment(api, namespace, name, {HELD_BY: held_by})
            if written is not None and written.spec is not None:
                found = written.spec.replicas  # an answer without it (None): scale reads it itself
        result = await scale(api, namespace, name, replicas, found=found)
    if result.changed:
        log.info("Scaled %s/%s from %d to %d replicas.", namespace, name, result.found, replicas)
    else:
        log.info("%s/%s already has %d replicas; nothing to do.", namespace, name, replicas)
    return result


# The final ("Ready") write of a cold-start progress artifact, by artifact key: issued in the background so the
# flow goes on the moment the model is Ready (the write is a round trip to the Prefect API, on the critical path
# otherwise), and awaited before the next write of the same key and before the flow run ends
# (:func:`progress_written`, called by the flows' guard).
_FINAL_WRITES: dict[str, asyncio.Task[None]] = {}
# How long the flow waits for one such write at its end (the Prefect client's own timeout and retries apply within).
PROGRESS_WRITE_S = 30.0


async def _write_progress(
    log: logging.Logger | logging.LoggerAdapter[logging.Logger],
    artifact: UUID,
    progress: float,
    description: str,
) -> None:
    """One update of a progress artifact; a failure is logged, never raised (the artifact only informs the UI)."""
    try:
        await aupdate_progress_artifact(artifact, progress=progress, description=description)
    except Exception as e:
        log.warning("Could not update the cold-start progress artifact (%s: %s); the run goes on.", type(e).__name__, e)


async def progress_written(key: str | None = None, timeout_s: float = PROGRESS_WRITE_S) -> None:
    """Wait for the final progress writes issued in the background (of ``key`` only, if given) on this event
    loop, each for at most ``timeout_s`` (then logged and left to finish); never raises. A write of another
    loop (a task run in a worker thread) cannot be awaited here and is left alone."""
    loop = asyncio.get_running_loop()
    for k, t in list(_FINAL_WRITES.items()):
        if (key is None or k == key) and t.get_loop() is loop:
            done, _ = await asyncio.wait({t}, timeout=timeout_s)  # waiting never cancels the write
            if not done:
                logging.getLogger("coder_stack.tasks").warning(
                    "The cold-start progress artifact %s was not written within %.0f s; not waiting longer.",
                    k, timeout_s,
                )  # fmt: skip
            if _FINAL_WRITES.get(k) is t:
                del _FINAL_WRITES[k]


def _progress_callback(
    log: logging.Logger | logging.LoggerAdapter[logging.Logger], artifact: UUID | None, label: str, key: str = ""
) -> OnPhase:
    async def on_phase(phase: str, info: PhaseUpdate) -> None:
        if phase != "ready":  # Ready is logged once, with the phases' times, by the task (_log_ready)
            log.info("%s: %s (%.0fs in).", label, info.detail or phase, info.elapsed_s)
        if artifact is None:
            return
        progress = round(info.progress * 100, 1)
        if phase == "ready" and key:
            _FINAL_WRITES[key] = asyncio.create_task(_write_progress(log, artifact, progress, info.detail))
        else:
            await _write_progress(log, artifact, progress, info.detail)

    return on_phase


def _log_ready(log: logging.Logger | logging.LoggerAdapter[logging.Logger], label: str, r: ReadyReport) -> None:
    if r.already_ready:
        log.info("%s was already Ready (pod %s on %s).", label, r.pod, r.node)
        return
    parts = ", ".join(f"{p} {s:.1f}s" for p, s in r.seconds.items() if s > 0)
    scale_up = " after a node scale-up" if r.scale_up_seen else ""
    log.info("%s is Ready in %.1fs%s (pod %s on %s): %s.", label, r.total_s, scale_up, r.pod, r.node, parts)


@task(name="wait-model-ready", **_TASK)
async def wait_model_ready_task(
    target: ClusterTarget, spec: StackSpec, model: ModelSpec, progress: bool = True
) -> ReadyReport:
    """Follow a model's pod through node, image, weights, start until Ready, each phase within its budget."""
    log = run_logger()
    artifact = None
    key = f"cold-start-{model.name}"
    if progress:
        await progress_written(key)  # the previous cold start's final write lands before this one's first
        try:
            artifact = await acreate_progress_artifact(
                progress=0.0, key=key, description=f"{model.name}: waiting for a node"
            )
        except MissingContextError:
            artifact = None
    async with open_api(target) as api:
        report = await wait_ready(
            api,
            spec.serving_namespace,
            model.name,
            model.selector,
            model.budgets,
            on_phase=_progress_callback(log, artifact, model.name, key),
        )
    _log_ready(log, model.name, report)
    return report


@task(name="wait-frontend-ready", **_TASK)
async def wait_frontend_ready_task(target: ClusterTarget, spec: StackSpec, frontend: FrontendSpec) -> ReadyReport:
    """A front-end (Open WebUI, Tabby) Ready within spec.timeouts.frontend_ready_s."""
    log = run_logger()
    t = spec.timeouts.frontend_ready_s
    budgets = PhaseBudgets(node=t, image=t, weights=t, start=t)
    async with open_api(target) as api:
        report = await wait_ready(
            api,
            spec.experience_namespace,
            frontend.name,
            frontend.selector,
            budgets,
            on_phase=_progress_callback(log, None, frontend.name),
            deadline_s=t,
        )
    _log_ready(log, frontend.name, report)
    return report


@task(name="stack-status", **_TASK)
async def stack_status_task(target: ClusterTarget, spec: StackSpec) -> list[DeploymentStatus]:
    """Replicas, readiness and pod status of every model and front-end (`kubectl get deploy,pods`)."""
    log = run_logger()
    out = []
    async with open_api(target) as api:
        for ns, name in [(spec.serving_namespace, m.name) for m in spec.models] + [
            (spec.experience_namespace, f.name) for f in spec.frontends
        ]:
            st = await deployment_status(api, ns, name)
            pods = ", ".join(f"{p.name} {p.status}" for p in st.pods) or "no pods"
            log.info("%s/%s: %d/%d ready (%s).", ns, name, st.ready_replicas, st.replicas, pods)
            out.append(st)
    return out


__all__ = [
    "free_gpu_task",
    "preflight_task",
    "progress_written",
    "scale_task",
    "stack_status_task",
    "wait_for_share_task",
    "wait_frontend_ready_task",
    "wait_model_ready_task",
]
