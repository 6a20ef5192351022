"""validate_coder_stack: the whole runbook, end to end, leaving the GPU as it found it.

Preflight -> keys and front-ends while coder-chat cold starts -> chat smokes (direct, gateway, Open WebUI)
-> swap to coder-fim -> FIM smokes (direct, gateway, Tabby's key) -> optionally the agent stage (swap to
coder-agent, register it, scoped key, tool loop) -> spend per key -> tear down.
"""

from __future__ import annotations

from collections.abc import Awaitable
from enum import StrEnum
from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import GpuBusy
from coder_stack.flows.common import (
    Connection,
    ReleaseIncomplete,
    Run,
    final_state,
    free_gpu,
    guarded,
    holder,
    model_for_role,
    model_up,
    model_up_with_keys_and_frontends,
    record_failure,
    record_smoke,
    release,
    spend_lines,
)
from coder_stack.kubernetes.client import cluster_session
from coder_stack.orchestration.gpu import gpu_session
from coder_stack.probe import SmokeResult
from coder_stack.report import RunReport
from coder_stack.spec import KeyDestination, ModelSpec, StackSpec
from coder_stack.tasks.cluster import preflight_task, scale_task, wait_model_ready_task
from coder_stack.tasks.gateway import (
    ensure_keys_task,
    gateway_ready_task,
    read_spend_task,
    register_model_task,
    spend_baseline_task,
)
from coder_stack.tasks.smoke import smoke_agent_task, smoke_direct_task, smoke_frontends_task, smoke_gateway_task


class Stage(StrEnum):
    CHAT = "chat"
    FIM = "fim"
    AGENT = "agent"


class ValidateOptions(BaseModel):
    """What to validate and how to leave the stack."""

    model_config = ConfigDict(extra="forbid")

    stages: list[Stage] = Field(
        default_factory=lambda: [Stage.CHAT, Stage.FIM],
        min_length=1,
        max_length=3,
        description="Models to validate, in order (one GPU: each swaps out the previous).",
    )
    keep_frontends: bool = Field(False, description="Leave Open WebUI and Tabby running at the end.")
    take_over: bool = Field(
        False,
        description="If another model is serving (e.g. the morning bring-up's), take the GPU and restore that "
        "model at the end. Without it the run refuses and changes nothing.",
    )
    dry_run: bool = Field(False, description="Only check and report what would be scaled, minted and registered.")


@flow(name="validate_coder_stack", log_prints=False)
async def validate_coder_stack(
    options: ValidateOptions = ValidateOptions(),
    connection: Connection = Connection(),
) -> RunReport:
    """The whole runbook, end to end; everything it started is scaled back to 0."""
    spec, target = await connection.resolve()
    async with cluster_session(target):
        run = Run(target, spec, RunReport(flow="validate_coder_stack"))
        report = run.report
        stages = list(dict.fromkeys(options.stages))
        models = [model_for_role(spec, s.value) for s in stages]
        frontends = [f.name for f in spec.frontends]
        key_aliases = [k.alias for k in spec.virtual_keys if k.deliver_to != "keystore"]
        agent_keys = [k.alias for k in spec.virtual_keys if k.deliver_to == "keystore"]
        async with guarded(report, "validate-report", "validate_coder_stack", final_state_of=(target, spec)):
            run.step("preflight: Deployments exist, models fit the GPU node's RAM, gateway ready")
            pf = await preflight_task(target, spec, [m.name for m in models])
            await gateway_ready_task(target, spec)
            if options.dry_run:
                serving = ", ".join(a.name for a in pf.active_models) or "nothing"
                report.notes.append(
                    f"dry run: would mint/check keys {key_aliases + (agent_keys if Stage.AGENT in stages else [])}, "
                    f"scale {', '.join(frontends)} to 1, then bring up {' -> '.join(m.name for m in models)} one at "
                    f"a time; register {[m.name for m in models if m.register_at_runtime]}; serving now: {serving}."
                )
                report.finish("dry run: nothing changed")
                return report

            started: list[ModelSpec] = []
            restore: list[ModelSpec] = []
            spend_before: dict[str, float] = {}
            streamed: dict[str, list[str]] = {}  # alias -> ids of calls streamed the way its consumer calls
            async with gpu_session(spec.timeouts.gpu_limit_s):
                run.step("holding the GPU limit")
                pf = await preflight_task(target, spec, [])
                active = {a.name for a in pf.active_models}
                if active and not options.take_over:
                    raise GpuBusy(
                        f"{', '.join(sorted(active))} is serving on the GPU (perhaps the morning bring-up). "
                        "Nothing was changed. "
                        "Rerun with take_over (--take-over) to validate anyway; that model is restored at the end"
                    )
                restore = [m for m in spec.models if m.name in active]
                # Front-ends already running (the morning bring-up's) are the users': this run did not start them.
                before = await final_state(target, spec)
                ours = [f for f in frontends if not before.get(f"{spec.experience_namespace}/{f}")]
                body_done = False
                try:
                    if restore:
                        await free_gpu(run, None)
                    for i, (stage, model) in enumerate(zip(stages, models, strict=True)):
                        if i > 0:
                            prev = models[i - 1]
                            run.step(f"swap: scale {prev.name} to 0 and wait until its pod is gone")
                            freed = await release(target, spec, [prev], [])
                            if not freed.ok:
                                # The next stage would be scheduled beside it (an autoscaled pool adds a second
                                # GPU node): stop here; the ``finally`` below tries it again with the rest.
                                raise ReleaseIncomplete(
                                    f"{prev.name} is still up: {freed.detail(prev.name)}. The {stage.value} stage "
                                    f"was not started, so that {model.name} does not share the GPU with it"
                                )
                            started.remove(prev)
                        started.append(model)
                        if i == 0:
                            await model_up_with_keys_and_frontends(run, model, key_aliases, frontends)
                            spend_before = await spend_baseline_task(target, spec, [k.alias for k in spec.virtual_keys])
                        else:
                            await model_up(run, model)
                        for res in await _smoke_stage(run, stage, model, agent_keys):
                            for u in res.usage:
                                if u.streamed and u.request_id and u.key_alias:
                                    streamed.setdefault(u.key_alias, []).append(u.request_id)
                        if stage is Stage.AGENT:
                            # the agent key is minted in its stage: its spend before the calls is 0
                            spend_before.update({a: 0.0 for a in agent_keys if a not in spend_before})
                    webui_alias = _alias_delivered_to(spec, "openwebui-secrets")
                    tabby_alias = _alias_delivered_to(spec, "tabby-config")
                    used = [a for a, st in ((webui_alias, Stage.CHAT), (tabby_alias, Stage.FIM)) if a and st in stages]
                    if Stage.AGENT in stages:
                        used += agent_keys
                    rows = await read_spend_task(
                        target, spec, [k.alias for k in spec.virtual_keys], spend_before, called=used, streamed=streamed
                    )
                    report.spend = spend_lines(rows)
                    run.step("spend read back per key")
                    body_done = True
                finally:
                    run.step("tear down what this run started", cleanup=True)
                    outcome = await release(target, spec, started, [] if options.keep_frontends else ours)
                    if options.keep_frontends:
                        report.notes.append("front-ends left running (keep_frontends)")
                    report.notes += outcome.notes()
                    if not outcome.ok:
                        left = ", ".join(outcome.left_up)
                        report.notes.append(
                            f"left up: {left}; run `coder-stack down` (or the evening teardown) to scale it to 0"
                        )
                        if restore:
                            report.notes.append(f"not restored: {', '.join(m.name for m in restore)} ({left} is up)")
                            restore = []
                        if body_done:  # no error of the run's own in flight: this one is the run's failure
                            raise ReleaseIncomplete(
                                f"{left} could not be scaled to 0 at the end: "
                                + "; ".join(f"{n}: {outcome.detail(n)}" for n in outcome.left_up)
                                + ". Run `coder-stack down`, then check the cluster"
                            )
                    if restore:
                        names = ", ".join(m.name for m in restore)
                        run.step(f"restore {names} (take_over)", cleanup=True)
                        for m in restore:
                            await scale_task(target, spec.serving_namespace, m.name, 1, held_by=holder())
                            await wait_model_ready_task(target, spec, m, progress=False)
                        report.notes.append(f"restored {names} as it was before this run")
            report.finish("passed")  # every failed smoke raised above
            return report


def _alias_delivered_to(spec: StackSpec, home: KeyDestination) -> str | None:
    key = spec.key_delivered_to(home)
    return key.alias if key else None


async def _smoke_stage(run: Run, stage: Stage, model: ModelSpec, agent_keys: list[str]) -> list[SmokeResult]:
    """The stage's smokes, recorded in the report; returns their results."""
    target, spec = run.target, run.spec
    section = run.report.section(model.name)
    results: list[SmokeResult] = []

    async def smoke(label: str, coro: Awaitable[Any]) -> Any:
        try:
            res = await coro
        except Exception as e:
            record_failure(section, label, e)
            raise
        result = getattr(res, "smoke", res)
        record_smoke(section, result, label)
        results.append(result)
        return res

    await smoke("direct (pod, vLLM key)", smoke_direct_task(target, spec, model))
    webui_key = _alias_delivered_to(spec, "openwebui-secrets")
    tabby_key = _alias_delivered_to(spec, "tabby-config")
    if stage is Stage.CHAT:
        await smoke(f"gateway chat ({webui_key} key)", smoke_gateway_task(target, spec, model, key_alias=webui_key))
        await smoke("Open WebUI pod lists its models", smoke_frontends_task(target, spec, openwebui=True, tabby=False))
    elif stage is Stage.FIM:
        await smoke(f"gateway FIM ({tabby_key} key)", smoke_gateway_task(target, spec, model, key_alias=tabby_key))
        await smoke(
            "Tabby's configured key completes FIM", smoke_frontends_task(target, spec, openwebui=False, tabby=True)
        )
    else:
        reg = await register_model_task(target, spec, model)
        run.step(f"{model.name} {reg.action} in the gateway")
        reps = await ensure_keys_task(target, spec, agent_keys)
        run.report.key_actions += [f"{r.alias}: {r.action} ({r.delivered_to})" for r in reps]
        await smoke("tool loop through the gateway (agent key)", smoke_agent_task(target, spec, model))
    return results
