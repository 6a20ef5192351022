"""swap_model: give the GPU to another model and leave it serving.

On a time-sliced GPU, the serving models that fit together with the target (``spec.fit_together``) stay serving;
only the rest go to 0 and are waited out, and the target starts under the start turn once its share is free (the
session occupies the shares of the target and the models kept). The report names who was kept and who stopped.
Exclusive mode (the default): every other GPU model to 0, wait until their pods are gone (the GPU is free only
then), the target up, wait ready, smoke it, leave it serving. Either way, if the target fails to come up or its
direct smoke fails, it is scaled back to 0: no broken model holds the GPU. Once it works directly, a failure
through the gateway (a stale key, a spent budget) leaves it serving and says what to fix: a cold start is not
thrown away over a key.
"""

from __future__ import annotations

import time

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import KeyUnusable, SmokeFailed
from coder_stack.flows.gpu_steps import free_gpu, model_up, release, start_models
from coder_stack.flows.guard import guarded
from coder_stack.flows.params import Connection
from coder_stack.flows.record import record_failure, record_smoke
from coder_stack.flows.run import Run, logger
from coder_stack.kubernetes.client import cluster_session
from coder_stack.orchestration.gpu import gpu_session
from coder_stack.probe import KEY_HOPS
from coder_stack.report import RunReport
from coder_stack.spec import DNS_LABEL, ModelSpec, StackSpec
from coder_stack.tasks.cluster import preflight_task, stack_status_task
from coder_stack.tasks.gateway import ensure_keys_task, gateway_ready_task
from coder_stack.tasks.smoke import smoke_direct_task, smoke_gateway_task


class SwapOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str | None = Field(
        None,
        pattern=DNS_LABEL,
        max_length=63,
        description="Model Deployment to leave serving (coder-chat, coder-fim or coder-agent in the reference stack); "
        "default: the stack's default_model.",
    )
    smoke_gateway: bool = Field(True, description="Also smoke through the gateway with the model's client key.")
    dry_run: bool = Field(False, description="Only report what would be scaled.")


@flow(name="swap_model", log_prints=False)
async def swap_model(
    options: SwapOptions = SwapOptions(),
    connection: Connection = Connection(),
) -> RunReport:
    """Swap the GPU to ``options.target``; reports the swap time (start to target Ready)."""
    spec, target = await connection.resolve()
    async with cluster_session(target):
        model = spec.model(options.target or spec.default_model)  # unknown model: refused before anything changes
        log = logger()
        run = Run(target, spec, RunReport(flow=f"swap_model({model.name})"))
        report = run.report
        async with guarded(report, "swap-report", "swap_model", final_state_of=(target, spec)):
            pf = await preflight_task(target, spec, [model.name])
            if options.dry_run:
                others = [a.name for a in pf.active_models if a.name != model.name]
                if spec.time_sliced:
                    keep = [k.name for k in _kept(spec, model, await _serving(run))]
                    others = [o for o in others if o not in keep]
                    report.notes.append(f"dry run: would keep {keep or 'nothing'} serving beside {model.name}")
                report.notes.append(f"dry run: would scale {others or 'nothing'} to 0, then {model.name} to 1")
                report.finish("dry run: nothing changed")
                return report
            kept = _kept(spec, model, await _serving(run)) if spec.time_sliced else []
            async with gpu_session(spec.timeouts.gpu_limit_s, occupy=spec.occupy([model, *kept])):
                t0 = time.monotonic()
                run.step(f"holding the GPU limit; swapping to {model.name}")
                if spec.time_sliced:
                    # read again under the limit: a model started meanwhile that fits is kept, not stopped
                    kept = _kept(spec, model, await _serving(run))
                    stopped = await free_gpu(run, [model, *_beside(spec, model, kept)])
                    _say_kept_and_stopped(run, model, kept, stopped)
                else:
                    await free_gpu(run, model)
                ok = False
                try:
                    if spec.time_sliced:
                        await start_models(run, [model])
                    else:
                        await model_up(run, model)
                    swap_s = time.monotonic() - t0
                    section = report.section(model.name)
                    try:
                        res = await smoke_direct_task(target, spec, model)
                    except Exception as e:
                        record_failure(section, "direct (pod, vLLM key)", e)
                        raise
                    record_smoke(section, res, "direct (pod, vLLM key)")
                    report.notes.append(f"swap time: {swap_s:.1f} s from start to {model.name} Ready")
                    log.info("%s is serving; the swap took %.1f s.", model.name, swap_s)
                    ok = True  # the model works: from here on, a problem is the key's, not a reason to give the GPU up
                    ks = spec.key_for_model(model)
                    if options.smoke_gateway and ks is not None:
                        await _smoke_through_gateway(run, model, ks.alias)
                finally:
                    if not ok:
                        run.step(
                            f"{model.name} failed: scale it back to 0 so no broken model holds the GPU", cleanup=True
                        )
                        outcome = await release(target, spec, [model], [])
                        report.notes += outcome.notes()
            report.finish("passed")
            return report


async def _serving(run: Run) -> list[str]:
    """The models with replicas or pods now (starting ones included)."""
    statuses = await stack_status_task(run.target, run.spec)
    names = {m.name for m in run.spec.models}
    return [
        s.name
        for s in statuses
        if s.namespace == run.spec.serving_namespace and s.name in names and (s.replicas or s.pods)
    ]


def _kept(spec: StackSpec, model: ModelSpec, serving: list[str]) -> list[ModelSpec]:
    """The serving models that stay beside ``model``: in the spec's order, each that fits together with the target
    and those kept before it (``spec.fit_beside``). Exclusive mode: none."""
    return spec.fit_beside([model], [m for m in spec.models if m.name in serving])


def _beside(spec: StackSpec, model: ModelSpec, kept: list[ModelSpec]) -> list[ModelSpec]:
    """``kept`` and every other model that still fits beside ``model`` and them: spared by the scale-down even when
    not serving at the read, since another run (a wake, a swap) may be starting it under its own share right now —
    stopping it would break that run's start for nothing. A model that does not fit is stopped."""
    return [*kept, *spec.fit_beside([model, *kept], spec.models)]


def _say_kept_and_stopped(run: Run, model: ModelSpec, kept: list[ModelSpec], stopped: list[ModelSpec]) -> None:
    k = ", ".join(m.name for m in kept) or "nothing"
    st = ", ".join(m.name for m in stopped) or "nothing"
    run.report.notes.append(f"kept serving beside {model.name}: {k}")
    run.report.notes.append(f"stopped (scaled to 0, pods gone): {st}")
    logger().info("Swap to %s: kept %s; stopped %s.", model.name, k, st)


async def _smoke_through_gateway(run: Run, model: ModelSpec, alias: str) -> None:
    """The model through the gateway with its client's key, repaired first as the keys flow would (a key
    deleted in the gateway is re-minted and re-delivered). A key that still fails leaves the model serving:
    the error says the key is the problem and what to do."""
    target, spec, report, name = run.target, run.spec, run.report, model.name
    section = report.section(name)
    await gateway_ready_task(target, spec)
    run.step(f"check the {alias!r} key as the keys flow does, then smoke {name} through the gateway")
    try:
        reps = await ensure_keys_task(target, spec, [alias])
        report.key_actions += [f"{r.alias}: {r.action} ({r.delivered_to})" for r in reps]
        metered = await smoke_gateway_task(target, spec, model, check_spend=False)
    except (KeyUnusable, SmokeFailed) as e:
        record_failure(section, "gateway (client key)", e)
        if isinstance(e, SmokeFailed) and e.hop not in KEY_HOPS:
            raise
        raise KeyUnusable(
            f"{name} is serving and its direct smoke passed, so it is left up; the gateway smoke failed on the "
            f"{alias!r} key: {e}"
        ) from e
    record_smoke(section, metered.smoke, "gateway (client key)")
