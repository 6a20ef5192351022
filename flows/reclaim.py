"""reclaim_idle_models (every 5 min): scale serving models nobody uses back to 0.

A model is reclaimed only when its idleness is *read*: no request running or waiting on its /metrics and
its request counters unchanged since a reading at least ``idle_after_s`` old (kept on its Deployment,
``coder-stack.io/activity``), and its pod Ready for at least ``idle_grace_s``. A model whose metrics cannot
be read is left serving, with the reason. A model another run holds is busy by definition: the flow takes
the GPU limit without waiting long and, if another run holds it, changes nothing. On a time-sliced GPU each
serving model is judged on its own, under a session that occupies its share (``spec.occupy``): an idle model is
reclaimed while another, in use, keeps serving. Safe to run twice: a reclaimed model is at 0 and no longer
serving.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow
from prefect.artifacts import acreate_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import GpuSlotTimeout, RetriableError
from coder_stack.flows.errors import ReclaimIncomplete
from coder_stack.flows.gpu_steps import release
from coder_stack.flows.guard import guarded
from coder_stack.flows.params import Connection
from coder_stack.flows.run import Run, logger
from coder_stack.kubernetes.client import cluster_session
from coder_stack.orchestration.gpu import gpu_session
from coder_stack.orchestration.gpu_limit import GPU_LIMIT
from coder_stack.report import IdleLine, RunReport
from coder_stack.spec import ModelSpec
from coder_stack.tasks.cluster import stack_status_task
from coder_stack.tasks.idle import mark_reclaimed_task, moved_since_task, read_idleness_task
from coder_stack.usecases.idle import Idleness, bring_back

# How long the flow waits for the GPU limit: a run holding it is using the GPU, so the flow does not queue.
GPU_WAIT_S = 3.0
HELD = "held by another run"


class ReclaimOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(False, description="Only report what would be reclaimed; change nothing (no reading kept).")


@flow(name="reclaim_idle_models", log_prints=False)
async def reclaim_idle_models(
    options: ReclaimOptions = ReclaimOptions(),
    connection: Connection = Connection(),
) -> RunReport:
    """Scale every serving model idle for ``idle_after_s`` (and past ``idle_grace_s``) to 0; pods gone."""
    spec, target = await connection.resolve()
    async with cluster_session(target):
        run = Run(target, spec, RunReport(flow="reclaim_idle_models"))
        report = run.report
        async with guarded(report, "reclaim-report", "reclaim_idle_models", final_state_of=(target, spec)):
            if spec.idle_after_s <= 0:
                report.notes.append("idle reclaim is off (idle_after_s: 0); nothing read")
                report.finish("passed: reclaim off")
                return report
            run.step("find the serving models")
            statuses = {
                s.name: s for s in await stack_status_task(target, spec) if s.namespace == spec.serving_namespace
            }
            serving = [
                m for m in spec.models if m.name in statuses and (statuses[m.name].replicas or statuses[m.name].pods)
            ]
            if not serving:
                report.notes.append("no model is serving; nothing to reclaim")
                report.finish("passed: nothing serving")
                return report
            if options.dry_run:
                for m in serving:
                    idle = await read_idleness_task(target, spec, m, record=False)
                    _record(run, m, idle, "would reclaim" if idle.idle else "left serving")
                report.finish("dry run: nothing changed")
                return report
            if spec.time_sliced:
                skipped = await _reclaim_shares(run, serving)
                await _publish(run)
                reclaimed = [i.model for i in report.idle if i.action == "reclaimed"]
                if reclaimed:
                    report.finish(f"passed: reclaimed {', '.join(reclaimed)}")
                elif skipped and len(skipped) == len(serving):  # every share held or failed: nothing was read
                    report.finish(f"skipped: GPU limit {' / '.join(sorted(set(skipped.values())))}")
                else:
                    report.finish("passed: nothing idle")
                return report
            held = False
            try:
                async with gpu_session(GPU_WAIT_S):
                    held = True
                    await _reclaim(run, serving)
            except RetriableError as e:
                if held:
                    raise
                why = _not_taken(e)
                for m in serving:
                    report.idle.append(IdleLine(model=m.name, action="left serving", reason=f"busy: GPU limit {why}"))
                report.notes.append(f"the GPU limit {GPU_LIMIT} is {why} ({e}); nothing read or changed")
                logger().info("GPU limit %s is %s; leaving %s serving.", GPU_LIMIT, why, [m.name for m in serving])
                report.finish(f"skipped: GPU limit {why}")
                return report
            await _publish(run)
            reclaimed = [i.model for i in report.idle if i.action == "reclaimed"]
            report.finish(f"passed: reclaimed {', '.join(reclaimed)}" if reclaimed else "passed: nothing idle")
            return report


async def _reclaim_shares(run: Run, serving: list[ModelSpec]) -> dict[str, str]:
    """Time-sliced GPU: each serving model on its own, under a GPU session that occupies its share only. A model
    whose share another run holds (a swap keeping it, a wake starting it, the agent's whole card) is left serving,
    busy; the others are read and reclaimed as usual — an idle coder-fim goes while a busy coder-chat serves on.
    Returns the models left serving because their share of the GPU limit was not taken, each with why."""
    skipped: dict[str, str] = {}
    for m in serving:
        held = False
        try:
            async with gpu_session(GPU_WAIT_S, occupy=run.spec.occupy([m])):
                held = True
                await _reclaim(run, [m])
        except RetriableError as e:
            if held:
                raise
            why = _not_taken(e)
            run.report.idle.append(
                IdleLine(model=m.name, action="left serving", reason=f"busy: GPU limit {why} (its share)")
            )
            run.report.notes.append(f"{m.name}: its share of the GPU limit {GPU_LIMIT} is {why} ({e}); left as it is")
            logger().info("%s's share of the GPU limit %s is %s; leaving it serving.", m.name, GPU_LIMIT, why)
            skipped[m.name] = why
    return skipped


def _not_taken(e: RetriableError) -> str:
    """Why the GPU limit (or a model's share of it) was not taken, in a word: another run holds it, or the request
    failed. The error itself goes into the report's note once."""
    return HELD if isinstance(e, GpuSlotTimeout) else "not taken"


async def _reclaim(run: Run, serving: list[ModelSpec]) -> None:
    target, spec = run.target, run.spec
    run.step(f"holding the GPU limit; reading the activity of {', '.join(m.name for m in serving)}")
    idle = [(m, await read_idleness_task(target, spec, m)) for m in serving]
    for m, i in idle:
        if not i.idle:
            _record(run, m, i, "left serving")
    for m, i in idle:
        if not i.idle:
            continue
        # A request may land between the verdict and the scale-down (the other models' reads, a slow API):
        # the counters are read once more right before it, and anything that moved leaves the model serving.
        moved = await moved_since_task(target, spec, m, i.activity) if i.activity is not None else "no reading"
        if moved:
            _record(run, m, i.model_copy(update={"idle": False, "reason": moved}), "left serving")
            continue
        run.step(f"{m.name} {i.reason}: scale it to 0")
        freed = await release(target, spec, [m], [])
        outcome = freed.detail(m.name)
        if not freed.ok:
            raise ReclaimIncomplete(f"{m.name} was idle but could not be reclaimed: {outcome}")
        at = datetime.now(UTC)
        await mark_reclaimed_task(target, spec, m, at)
        run.step(f"{m.name} reclaimed: {outcome}")
        _record(run, m, i, "reclaimed", at)


def _record(run: Run, model: ModelSpec, idle: Idleness, action: str, at: datetime | None = None) -> None:
    back = bring_back(run.spec, model) if action != "left serving" else None
    run.report.idle.append(
        IdleLine(
            model=model.name,
            action=action,
            reason=idle.reason,
            idle_s=round(idle.idle_s, 1) if idle.readable else None,
            at=f"{at:%Y-%m-%d %H:%M:%S} UTC" if at else None,
            bring_back=back,
        )
    )
    tail = f"; bring it back with {back}" if back else ""
    run.report.notes.append(f"{model.name}: {action}: {idle.reason}{tail}")


async def _publish(run: Run) -> None:
    """What was reclaimed, as its own markdown artifact (the run's report is published by ``guarded``)."""
    lines = [i for i in run.report.idle if i.action == "reclaimed"]
    if not lines:
        return
    md = ["# Reclaimed idle models", "", "| model | reclaimed at | idle | bring it back |", "|---|---|---|---|"]
    md += [f"| {i.model} | {i.at} | {(i.idle_s or 0) / 60:.1f} min | {i.bring_back} |" for i in lines]
    try:
        await acreate_markdown_artifact(key="reclaimed-models", markdown="\n".join(md), description="Reclaimed models")
    except Exception as e:  # an artifact must never fail a reclaim that happened
        logger().warning("Could not publish the reclaimed-models artifact: %s", type(e).__name__)
