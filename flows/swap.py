"""swap_model: give the GPU to another model and leave it serving.

Every other GPU model to 0, wait until their pods are gone (the GPU is free only then), the target up,
wait ready, smoke it, leave it serving. If the target fails to come up or its direct smoke fails, it is
scaled back to 0: no broken model holds the GPU. Once it works directly, a failure through the gateway
(a stale key, a spent budget) leaves it serving and says what to fix: a cold start is not thrown away
over a key.
"""

from __future__ import annotations

import time

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import KeyUnusable, SmokeFailed
from coder_stack.flows.gpu_steps import free_gpu, model_up, release
from coder_stack.flows.guard import guarded
from coder_stack.flows.params import Connection
from coder_stack.flows.record import record_failure, record_smoke
from coder_stack.flows.run import Run, logger
from coder_stack.kubernetes.client import cluster_session
from coder_stack.orchestration.gpu import gpu_session
from coder_stack.probe import KEY_HOPS
from coder_stack.report import RunReport
from coder_stack.spec import DNS_LABEL, ModelSpec
from coder_stack.tasks.cluster import preflight_task
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
                report.notes.append(f"dry run: would scale {others or 'nothing'} to 0, then {model.name} to 1")
                report.finish("dry run: nothing changed")
                return report
            async with gpu_session(spec.timeouts.gpu_limit_s):
                t0 = time.monotonic()
                run.step(f"holding the GPU limit; swapping to {model.name}")
                await free_gpu(run, model)
                ok = False
                try:
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
