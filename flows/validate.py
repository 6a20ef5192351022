"""validate_coder_stack: the whole runbook, end to end, leaving the GPU as it found it.

Preflight -> keys and front-ends while coder-chat cold starts -> chat smokes (direct, gateway, Open WebUI)
-> swap to coder-fim -> FIM smokes (direct, gateway, Tabby's key) -> optionally the agent stage (swap to
coder-agent, register it, scoped key, tool loop) -> spend per key -> tear down.

On a time-sliced GPU, consecutive stages whose models fit the card together run as one group: the group's models
start one after another (the first with the keys, front-ends and spend baseline), then its stages' smokes run
together; the next group starts only once the previous one is released (pods gone). So chat and FIM are
validated together, and the agent stage, which needs the whole card, waits until both are gone. Models taken
over are restored at the end one after another, each once its share is free.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import GpuBusy, SpecError
from coder_stack.flows.errors import ReleaseIncomplete
from coder_stack.flows.gpu_steps import (
    free_gpu,
    gather_all,
    release,
    start_models,
    wait_for_share,
)
from coder_stack.flows.guard import guarded
from coder_stack.flows.params import Connection
from coder_stack.flows.record import read_replicas, record_failure, record_smoke, spend_lines
from coder_stack.flows.run import Run, this_run_id
from coder_stack.kubernetes.client import cluster_session
from coder_stack.orchestration.gpu import gpu_session, start_turn
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


@dataclass
class Validation:
    """One validate run: what it was asked, what it works on, and what it has done so far (for the clean-up)."""

    run: Run
    options: ValidateOptions
    stages: list[Stage]
    models: list[ModelSpec]  # one per stage, in order
    groups: list[list[int]] = field(default_factory=list)  # time-sliced: indexes of consecutive stages run together
    started: list[ModelSpec] = field(default_factory=list)  # models this run scaled up and has not released
    restore: list[ModelSpec] = field(default_factory=list)  # models serving before it (take_over): put back at the end
    ours: list[str] = field(default_factory=list)  # front-ends this run starts (those already up are the users')
    spend_before: dict[str, float] = field(default_factory=dict)
    streamed: dict[str, list[str]] = field(default_factory=dict)  # alias -> ids of calls streamed as its consumer does

    @property
    def spec(self) -> StackSpec:
        return self.run.spec

    @property
    def frontends(self) -> list[str]:
        return [f.name for f in self.spec.frontends]

    @property
    def client_keys(self) -> list[str]:
        """The keys delivered to a front-end's Secret (minted while the first model cold starts)."""
        return [k.alias for k in self.spec.virtual_keys if k.deliver_to != "keystore"]

    @property
    def agent_keys(self) -> list[str]:
        """The keys kept in the keystore (minted in the agent stage)."""
        return [k.alias for k in self.spec.virtual_keys if k.deliver_to == "keystore"]


@flow(name="validate_coder_stack", log_prints=False)
async def validate_coder_stack(
    options: ValidateOptions = ValidateOptions(),
    connection: Connection = Connection(),
) -> RunReport:
    """The whole runbook, end to end; everything it started is scaled back to 0."""
    spec, target = await connection.resolve()
    async with cluster_session(target):
        v = _plan(Run(target, spec, RunReport(flow="validate_coder_stack")), options)
        async with guarded(v.run.report, "validate-report", "validate_coder_stack", final_state_of=(target, spec)):
            serving = await preflight(v)
            if options.dry_run:
                return report_dry_run(v, serving)
            await validate_in_groups(v, serving)
            v.run.report.finish("passed")  # every failed smoke raised above
            return v.run.report


def _plan(run: Run, options: ValidateOptions) -> Validation:
    stages = list(dict.fromkeys(options.stages))
    models = [model_for_role(run.spec, s.value) for s in stages]
    return Validation(run, options, stages, models, groups=plan_groups(run.spec, models))


def plan_groups(spec: StackSpec, models: list[ModelSpec]) -> list[list[int]]:
    """Consecutive stages whose models fit the GPU together (``spec.fit_together``), as lists of stage indexes.
    Exclusive mode: one stage per group."""
    groups: list[list[int]] = []
    for i, m in enumerate(models):
        if groups and spec.fit_together([*(models[j] for j in groups[-1]), m]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


async def preflight(v: Validation) -> list[str]:
    """Deployments exist, the models fit the GPU node's RAM, the gateway is ready; returns who serves now.
    Time-sliced: each group of models is checked as a set that shares the GPU."""
    v.run.step("preflight: Deployments exist, models fit the GPU node's RAM, gateway ready")
    if v.spec.time_sliced:
        sets = [[v.models[i].name for i in g] for g in v.groups]
        *pfs, _ = await gather_all(
            *(preflight_task(v.run.target, v.spec, names) for names in sets), gateway_ready_task(v.run.target, v.spec)
        )
        return [a.name for a in pfs[0].active_models]
    pf, _ = await gather_all(
        preflight_task(v.run.target, v.spec, [m.name for m in v.models]), gateway_ready_task(v.run.target, v.spec)
    )
    return [a.name for a in pf.active_models]


async def validate_in_groups(v: Validation, serving: list[str]) -> None:
    """The runbook over the stages' groups (``plan_groups``; exclusive mode: one stage per group, so chat, then the
    swap to FIM, then the agent): each group's models start one after another, its stages' smokes run together,
    and the next group starts once this one is released. The session occupies the most any group (or the models
    to restore) needs of the GPU (exclusive: its one slot)."""
    spec = v.spec
    groups = [[v.models[i] for i in g] for g in v.groups]
    sets = [*groups, [spec.model(n) for n in serving]] if v.options.take_over and serving else groups
    occupy = max(spec.occupy(g) for g in sets)
    async with gpu_session(spec.timeouts.gpu_limit_s, occupy=occupy):
        await take_the_gpu(v)
        body_done = False
        try:
            await stop_taken_over_models(v)
            await first_group_up_with_keys_and_frontends(v, groups[0])
            await run_group(v, v.groups[0])
            for k in range(1, len(groups)):
                idx = v.groups[k]
                await swap_group_on_gpu(v, groups[k - 1], groups[k], [v.stages[i] for i in idx])
                await run_group(v, idx)
            await read_spend_per_key(v)
            body_done = True
        finally:
            await tear_down(v, raise_if_left_up=body_done)
            await restore_taken_over_models(v)


async def first_group_up_with_keys_and_frontends(v: Validation, models: list[ModelSpec]) -> None:
    """The first group's models, one after another; the client keys, the front-ends and the keys' spend baseline
    during the first one's cold start."""
    v.started += models
    aliases = [k.alias for k in v.spec.virtual_keys]
    _, v.spend_before = await start_models(
        v.run,
        models,
        v.client_keys,
        list(v.spec.frontends),
        then=lambda: spend_baseline_task(v.run.target, v.spec, aliases),
    )


async def swap_group_on_gpu(
    v: Validation, leaving: list[ModelSpec], coming: list[ModelSpec], stages: list[Stage]
) -> None:
    """The previous group to 0 and its pods gone before the next group's models start (one after another)."""
    names = ", ".join(m.name for m in leaving)
    v.run.step(f"swap: scale {names} to 0 and wait until their pods are gone")
    freed = await release(v.run.target, v.spec, leaving, [])
    if not freed.ok:
        raise ReleaseIncomplete(
            f"{', '.join(freed.left_up)} is still up: "
            + "; ".join(f"{n}: {freed.detail(n)}" for n in freed.left_up)
            + f". The {', '.join(s.value for s in stages)} stage{' was' if len(stages) == 1 else 's were'} not "
            f"started, so that {', '.join(m.name for m in coming)} does not share the GPU with it"
        )
    for m in leaving:
        v.started.remove(m)
    v.started += coming
    await start_models(v.run, coming)


async def run_group(v: Validation, idx: list[int]) -> None:
    """The group's stages, their smokes at once; every one ends, then the first failure is raised."""
    await gather_all(*(run_stage(v, v.stages[i], v.models[i]) for i in idx))


def report_dry_run(v: Validation, serving: list[str]) -> RunReport:
    report = v.run.report
    keys = v.client_keys + (v.agent_keys if Stage.AGENT in v.stages else [])
    report.notes.append(
        f"dry run: would mint/check keys {keys}, "
        f"scale {', '.join(v.frontends)} to 1, then bring up {' -> '.join(m.name for m in v.models)} one at "
        f"a time; register {[m.name for m in v.models if m.register_at_runtime]}; "
        f"serving now: {', '.join(serving) or 'nothing'}."
    )
    report.finish("dry run: nothing changed")
    return report


async def take_the_gpu(v: Validation) -> None:
    """Holding the GPU limit: read what serves now (it may have changed while waiting). Another model serving
    is refused unless ``take_over`` (then it is restored at the end); front-ends already up are left as found."""
    v.run.step("holding the GPU limit")
    spec = v.spec
    now = await read_replicas(v.run.target, spec)
    active = [m for m in spec.models if now.get(f"{spec.serving_namespace}/{m.name}")]
    if active and not v.options.take_over:
        raise GpuBusy(
            f"{', '.join(sorted(m.name for m in active))} is serving on the GPU (perhaps the morning bring-up). "
            "Nothing was changed. "
            "Rerun with take_over (--take-over) to validate anyway; that model is restored at the end"
        )
    v.restore = active
    v.ours = [f for f in v.frontends if not now.get(f"{spec.experience_namespace}/{f}")]


async def stop_taken_over_models(v: Validation) -> None:
    if v.restore:
        await free_gpu(v.run, None)


async def run_stage(v: Validation, stage: Stage, model: ModelSpec) -> None:
    """The stage's own step (chat smokes, FIM smokes or the agent stage); notes which calls were streamed."""
    if stage is Stage.CHAT:
        results = await smoke_chat(v.run, model)
    elif stage is Stage.FIM:
        results = await smoke_fim(v.run, model)
    else:
        results = await agent_stage(v.run, model, v.agent_keys)
        # the agent key is minted in its stage: its spend before the calls is 0
        v.spend_before.update({a: 0.0 for a in v.agent_keys if a not in v.spend_before})
    for res in results:
        for u in res.usage:
            if u.streamed and u.request_id and u.key_alias:
                v.streamed.setdefault(u.key_alias, []).append(u.request_id)


async def smoke_chat(run: Run, model: ModelSpec) -> list[SmokeResult]:
    """Chat: the pod directly, the gateway with Open WebUI's key, and Open WebUI's pod listing its models."""
    return await _pod_gateway_client(run, model, "openwebui-secrets", "gateway chat", "Open WebUI pod lists its models")


async def smoke_fim(run: Run, model: ModelSpec) -> list[SmokeResult]:
    """FIM: the pod directly, the gateway with Tabby's key, and Tabby's configured key completing FIM."""
    return await _pod_gateway_client(run, model, "tabby-config", "gateway FIM", "Tabby's configured key completes FIM")


async def _pod_gateway_client(
    run: Run, model: ModelSpec, home: KeyDestination, gateway_label: str, client_label: str
) -> list[SmokeResult]:
    """The pod, the gateway with the key delivered to ``home``, and that key's client (Open WebUI or Tabby)."""
    smokes = _Smokes(run, model)
    alias = _alias_delivered_to(run.spec, home)
    openwebui = home == "openwebui-secrets"
    await smokes.together(
        smokes.pod(),
        (f"{gateway_label} ({alias} key)", smoke_gateway_task(run.target, run.spec, model, key_alias=alias)),
        (client_label, smoke_frontends_task(run.target, run.spec, openwebui=openwebui, tabby=not openwebui)),
    )
    return smokes.results


async def agent_stage(run: Run, model: ModelSpec, agent_keys: list[str]) -> list[SmokeResult]:
    """Agent: the pod directly, then register it in the gateway, mint its scoped key, and run a tool loop."""
    smokes = _Smokes(run, model)
    await smokes.direct()
    reg = await register_model_task(run.target, run.spec, model)
    run.step(f"{model.name} {reg.action} in the gateway")
    reps = await ensure_keys_task(run.target, run.spec, agent_keys)
    run.report.key_actions += [f"{r.alias}: {r.action} ({r.delivered_to})" for r in reps]
    await smokes("tool loop through the gateway (agent key)", smoke_agent_task(run.target, run.spec, model))
    return smokes.results


async def read_spend_per_key(v: Validation) -> None:
    """Spend per key, waiting until the keys the smokes called show what they spent."""
    spec, stages = v.spec, v.stages
    webui_alias = _alias_delivered_to(spec, "openwebui-secrets")
    tabby_alias = _alias_delivered_to(spec, "tabby-config")
    used = [a for a, st in ((webui_alias, Stage.CHAT), (tabby_alias, Stage.FIM)) if a and st in stages]
    if Stage.AGENT in stages:
        used += v.agent_keys
    rows = await read_spend_task(
        v.run.target, spec, [k.alias for k in spec.virtual_keys], v.spend_before, called=used, streamed=v.streamed
    )
    v.run.report.spend = spend_lines(rows)
    v.run.step("spend read back per key")


async def tear_down(v: Validation, *, raise_if_left_up: bool) -> None:
    """Scale to 0 what this run started (its front-ends too unless keep_frontends). Something left up cancels
    the restore, and is the run's failure when no error of its own is in flight (``raise_if_left_up``)."""
    report, keep = v.run.report, v.options.keep_frontends
    v.run.step("tear down what this run started", cleanup=True)
    outcome = await release(v.run.target, v.spec, v.started, [] if keep else v.ours)
    if keep:
        report.notes.append("front-ends left running (keep_frontends)")
    report.notes += outcome.notes()
    if outcome.ok:
        return
    left = ", ".join(outcome.left_up)
    report.notes.append(f"left up: {left}; run `coder-stack down` (or the evening teardown) to scale it to 0")
    if v.restore:
        report.notes.append(f"not restored: {', '.join(m.name for m in v.restore)} ({left} is up)")
        v.restore = []
    if raise_if_left_up:
        raise ReleaseIncomplete(
            f"{left} could not be scaled to 0 at the end: "
            + "; ".join(f"{n}: {outcome.detail(n)}" for n in outcome.left_up)
            + ". Run `coder-stack down`, then check the cluster"
        )


async def restore_taken_over_models(v: Validation) -> None:
    """take_over: bring back the models that were serving before this run."""
    if not v.restore:
        return
    names = ", ".join(m.name for m in v.restore)
    v.run.step(f"restore {names} (take_over)", cleanup=True)
    spec = v.spec
    for m in v.restore:
        # time-sliced: one after another, each once its share is free (exclusive: no turn, nothing to wait for)
        async with start_turn(spec.time_sliced, spec.timeouts.gpu_limit_s):
            await wait_for_share(v.run, m)
            await scale_task(v.run.target, spec, m, 1, held_by=this_run_id())
            await wait_model_ready_task(v.run.target, spec, m, progress=False)
    v.run.report.notes.append(f"restored {names} as it was before this run")


def _alias_delivered_to(spec: StackSpec, home: KeyDestination) -> str | None:
    key = spec.key_delivered_to(home)
    return key.alias if key else None


class _Smokes:
    """A model's smokes, each recorded in its report section (a failure too, before it propagates)."""

    def __init__(self, run: Run, model: ModelSpec) -> None:
        self.run, self.model = run, model
        self.section = run.report.section(model.name)
        self.results: list[SmokeResult] = []

    def pod(self) -> tuple[str, Awaitable[Any]]:
        return "direct (pod, vLLM key)", smoke_direct_task(self.run.target, self.run.spec, self.model)

    async def direct(self) -> None:
        await self(*self.pod())

    async def __call__(self, label: str, coro: Awaitable[Any]) -> None:
        try:
            res = await coro
        except Exception as e:
            record_failure(self.section, label, e)
            raise
        self._record(label, res)

    async def together(self, pod: tuple[str, Awaitable[Any]], *others: tuple[str, Awaitable[Any]]) -> None:
        """The pod's smoke and the smokes through the gateway, at once; recorded in the order given.

        The pod's failure explains the others': when it fails they are cancelled and its failure is raised at
        once (as when the pod was smoked first). Otherwise every smoke ends, and the first failure in the order
        given is raised (the gateway's before its client's, whose failure it would explain)."""
        smokes = (pod, *others)
        runs = [asyncio.ensure_future(coro) for _, coro in smokes]
        try:
            try:
                await runs[0]
            except Exception:
                for r in runs[1:]:
                    r.cancel()
            await asyncio.gather(*runs[1:], return_exceptions=True)
        except BaseException:  # cancelled from outside: every smoke with it
            for r in runs:
                r.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            raise
        failed: BaseException | None = None
        for (label, _), run in zip(smokes, runs, strict=True):
            if run.cancelled():
                continue
            err = run.exception()
            if err is None:
                self._record(label, run.result())
                continue
            if isinstance(err, Exception):
                record_failure(self.section, label, err)
            failed = failed or err
            if run is runs[0]:
                break  # the pod failed: the others were cancelled, not judged
        if failed is not None:
            raise failed

    def _record(self, label: str, res: Any) -> None:
        result = getattr(res, "smoke", res)
        record_smoke(self.section, result, label)
        self.results.append(result)


def model_for_role(spec: StackSpec, role: str) -> ModelSpec:
    for m in spec.models:
        if m.role == role:
            return m
    raise SpecError(
        f"the stack has no model with role {role!r}; roles present: {sorted({m.role for m in spec.models})}"
    )
