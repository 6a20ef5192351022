"""The GPU steps the flows share: bring a model up (with keys and front-ends meanwhile), bring several up one
after another on a time-sliced GPU (:func:`start_models`, each under the start turn once its share is free:
:func:`wait_for_share`), free the GPU, and the fast clean-up (:func:`release`, typed outcome :class:`Released`).

Why models sharing a GPU start one at a time: vLLM measures the GPU's free memory when its worker initialises the
device (``request_memory``, ``vllm/v1/worker/utils.py``) and refuses to start when its share
(``ceil(total x gpu_memory_utilization)``) is not free; two servers starting at once each see the other's memory
as free, or not, depending on who loads first. So each model is started only when the shares of the pods already
on the GPU plus its own fit the card, and the next only once it is Ready.

Clean-up (:func:`release`) calls the cluster functions directly rather than through tasks: it runs in a
``finally`` while the run may be failing, cancelled or terminated, and must issue every scale-down within
seconds (the runner kills a cancelled flow 30 s after the request).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import CoderStackError, PreflightError
from coder_stack.flows.record import record_failure, record_ready, record_smoke
from coder_stack.flows.run import Run, logger, this_run_id
from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.kubernetes.wait import ReadyReport, wait_gone
from coder_stack.kubernetes.workloads import scale
from coder_stack.orchestration.gpu import start_turn
from coder_stack.spec import FrontendSpec, ModelSpec, StackSpec
from coder_stack.tasks.cluster import (
    free_gpu_task,
    scale_task,
    wait_for_share_task,
    wait_frontend_ready_task,
    wait_model_ready_task,
)
from coder_stack.tasks.gateway import ensure_keys_task
from coder_stack.tasks.smoke import smoke_direct_task, smoke_gateway_task
from coder_stack.tasks.wake import record_cold_start_task

# How long the clean-up may spend issuing scale-downs before it moves on to waiting.
RELEASE_ISSUE_S = 5.0


async def gather_or_cancel(*aws: Awaitable[Any]) -> list[Any]:
    """``asyncio.gather`` that, when one awaitable fails, cancels the others and waits for them before raising.

    Plain ``gather`` lets the siblings run on: a keys-and-front-ends branch kept scaling Open WebUI and Tabby to
    1 *after* the ``finally`` clean-up had scaled them to 0 (a model's wait failed, or SIGTERM landed in it).
    """
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def gather_all(*aws: Awaitable[Any]) -> list[Any]:
    """Run independent checks at once and wait for every one; a failure is raised only then, the first in the
    order given, whichever finished first (validate's preflight: the cluster's before the gateway's). Cancelled
    from outside, every check is cancelled with it."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)


async def model_up(run: Run, model: ModelSpec) -> ReadyReport:
    """Scale a model to 1 and wait through its cold start (phase budgets from the spec)."""
    run.step(f"scale {model.name} to 1 and wait through its cold start")
    await scale_task(run.target, run.spec, model, 1, held_by=this_run_id())
    ready = await wait_model_ready_task(run.target, run.spec, model)
    await model_ready(run, model, ready)
    return ready


async def model_ready(run: Run, model: ModelSpec, ready: ReadyReport) -> None:
    """A model's cold start ended: its Ready report in its section, the step, and its length kept as its estimate."""
    record_ready(run.report.section(model.name), ready)
    run.step(f"{model.name} Ready after {ready.total_s:.1f} s")
    await keep_cold_start(run, model, ready)


async def keep_cold_start(run: Run, model: ModelSpec, ready: ReadyReport) -> None:
    """After a wait that saw a cold start (not a model already Ready), keep its length on the model's Deployment
    (``coder-stack.io/cold-start-s``): the wake callback tells the person asking how long this model takes. Best
    effort: a model that came up is never failed for its estimate."""
    if ready.already_ready:
        return
    try:
        await record_cold_start_task(run.target, run.spec, model, ready.total_s)
    except Exception as e:
        logger().warning("Could not keep %s's cold start (%.1f s) as its estimate: %s", model.name, ready.total_s, e)


async def model_up_with_keys_and_frontends(
    run: Run,
    model: ModelSpec,
    key_aliases: list[str],
    frontends: list[FrontendSpec],
    then: Callable[[], Awaitable[Any]] | None = None,
) -> tuple[ReadyReport, Any]:
    """Scale a model to 1 and, while it cold starts, deliver the keys and bring the front-ends up, then run
    ``then`` (validate reads the keys' spend baseline there); returns the model's Ready report and what
    ``then`` returned.

    The front-ends need their keys' Secrets before they can start, and both are CPU work that fits
    inside the GPU model's ~10 min cold start.
    """
    target, spec = run.target, run.spec
    await scale_task(target, spec, model, 1, held_by=this_run_id())
    run.step(f"{model.name} cold start; keys and front-ends meanwhile")

    ready, after = await gather_or_cancel(
        wait_model_ready_task(target, spec, model), keys_and_frontends(run, key_aliases, frontends, then)
    )
    await model_ready(run, model, ready)
    return ready, after


async def keys_and_frontends(
    run: Run,
    key_aliases: list[str],
    frontends: Sequence[FrontendSpec],
    then: Callable[[], Awaitable[Any]] | None = None,
) -> Any:
    """The CPU work of a cold start: the keys delivered, then the front-ends (which read them) up and Ready, then
    ``then``; returns what ``then`` returned."""
    target, spec, report = run.target, run.spec, run.report
    reps = await ensure_keys_task(target, spec, key_aliases)
    report.key_actions += [f"{r.alias}: {r.action} ({r.delivered_to})" for r in reps]
    await asyncio.gather(*(scale_task(target, spec, f, 1) for f in frontends))
    await asyncio.gather(*(wait_frontend_ready_task(target, spec, f) for f in frontends))
    run.step(f"keys delivered; {', '.join(f.name for f in frontends) or 'no front-end'} Ready")
    return await then() if then is not None else None


async def smoke_served(run: Run, model: ModelSpec, key_alias: str | None = None) -> None:
    """The smokes of a model left serving (bring-up, wake): the pod directly with the vLLM key, then through the
    gateway with a client's key (``key_alias``; None: the first key scoped to the model); each recorded in the
    model's section, a failure recorded and raised."""
    section = run.report.section(model.name)
    try:
        direct = await smoke_direct_task(run.target, run.spec, model)
        record_smoke(section, direct, "direct (pod, vLLM key)")
        via_key = await smoke_gateway_task(run.target, run.spec, model, key_alias=key_alias)
        record_smoke(section, via_key.smoke, "gateway (client key)")
    except Exception as e:
        record_failure(section, "smoke", e)
        raise


async def free_gpu(run: Run, keep: ModelSpec | Sequence[ModelSpec] | None) -> list[ModelSpec]:
    """Scale every GPU model except ``keep`` (one model, several, or none) to 0 and wait until their pods are gone.
    Returns who was stopped.

    Called right after the GPU grant: one task (``free_gpu_task``) reads only what it needs, since the flow's
    preflight checked the rest, and every task run here is time a freed GPU idles in a hand-off."""
    kept: ModelSpec | list[ModelSpec] | None = keep if keep is None or isinstance(keep, ModelSpec) else list(keep)
    freed = await free_gpu_task(run.target, run.spec, kept)
    names = {h.name for h in freed.scaled_down}
    busy = [m for m in run.spec.models if m.name in names]
    if busy:
        run.step(f"free the GPU: {', '.join(m.name for m in busy)} scaled to 0 and gone")
    return busy


async def wait_for_share(run: Run, model: ModelSpec) -> None:
    """Time-sliced (under the start turn): until ``model``'s share of the GPU is free beside the models already on
    it (their replicas or pods, terminating ones included) and a replica of the card is free; waited for, never
    raced (vLLM would refuse to start), bounded by the deletion timeout, then an error naming what holds the GPU.
    Exclusive: nothing to do (the session has the whole card, freed by :func:`free_gpu`)."""
    if not run.spec.time_sliced:
        return
    await wait_for_share_task(run.target, run.spec, model)


async def start_models(
    run: Run,
    models: list[ModelSpec],
    key_aliases: list[str] | None = None,
    frontends: Sequence[FrontendSpec] | None = None,
    then: Callable[[], Awaitable[Any]] | None = None,
) -> tuple[list[ReadyReport], Any]:
    """Bring ``models`` up one after another: for each, under the start turn, wait for its share
    (:func:`wait_for_share`), scale it to 1 and wait until it is Ready; the next starts only then. When keys,
    front-ends or ``then`` are given, they run during the *first* model's cold start (as
    :func:`model_up_with_keys_and_frontends`). Returns each model's Ready report, in order, and what ``then``
    returned. Exclusive mode with one model: exactly :func:`model_up` / :func:`model_up_with_keys_and_frontends`.

    A failure or cancellation stops what is still running (the keys branch too) and is raised; scaling back is the
    caller's clean-up (:func:`release`)."""
    spec = run.spec
    extras = key_aliases is not None or frontends is not None or then is not None
    if not spec.time_sliced and len(models) == 1:
        if extras:
            ready, after = await model_up_with_keys_and_frontends(
                run, models[0], list(key_aliases or []), list(frontends or []), then
            )
            return [ready], after
        return [await model_up(run, models[0])], None
    if not models:
        raise ValueError("start_models needs at least one model")
    if not spec.fit_together(models):
        verdict = spec.shares_fit(models)
        raise PreflightError(
            f"{', '.join(m.name for m in models)} cannot serve on one GPU together ({verdict.summary()}); "
            f"{' '.join(verdict.problems()) or 'exclusive mode runs one model at a time'}; nothing was started"
        )
    target = run.target
    first_scaled = asyncio.Event()

    async def one_after_another() -> list[ReadyReport]:
        readies = []
        for i, m in enumerate(models):
            async with start_turn(spec.time_sliced, spec.timeouts.gpu_limit_s):
                await wait_for_share(run, m)
                run.step(f"scale {m.name} to 1 and wait through its cold start")
                await scale_task(target, spec, m, 1, held_by=this_run_id())
                if i == 0:
                    first_scaled.set()
                ready = await wait_model_ready_task(target, spec, m)
            await model_ready(run, m, ready)
            readies.append(ready)
        return readies

    if not extras:
        return await one_after_another(), None

    async def once_the_first_is_scaled() -> Any:
        await first_scaled.wait()
        return await keys_and_frontends(run, list(key_aliases or []), list(frontends or []), then)

    readies, after = await gather_or_cancel(one_after_another(), once_the_first_is_scaled())
    return readies, after


class ReleaseLine(BaseModel):
    """One Deployment's clean-up: was the scale-down to 0 confirmed, are its pods gone, and the words for it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Deployment name.")
    scaled: bool = Field(False, description="The scale-down to 0 was confirmed by the API server.")
    gone: bool | None = Field(None, description="Its pods are gone (None: not waited for).")
    pods_seen: bool = Field(False, description="It had pods that were waited out (the detail says how long).")
    detail: str = Field("", description="What happened, for the report (no secrets).")

    @property
    def released(self) -> bool:
        """Scaled to 0 and (when waited for) no pod left: it holds nothing."""
        return self.scaled and self.gone is not False


class Released(BaseModel):
    """What :func:`release` did, per Deployment: typed, so a caller decides on ``ok``/``left_up``, never on prose."""

    model_config = ConfigDict(extra="forbid")

    lines: dict[str, ReleaseLine] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(line.released for line in self.lines.values())

    @property
    def left_up(self) -> list[str]:
        """The Deployments that may still hold what they held: scale-down not confirmed, or pods still there."""
        return [n for n, line in self.lines.items() if not line.released]

    def detail(self, name: str) -> str:
        line = self.lines.get(name)
        return line.detail if line is not None else "no answer"

    def notes(self) -> list[str]:
        return [f"{n}: {line.detail}" for n, line in self.lines.items()]

    def _line(self, name: str) -> ReleaseLine:
        return self.lines.setdefault(name, ReleaseLine(name=name))


async def release(
    target: ClusterTarget, spec: StackSpec, models: list[ModelSpec], frontends: list[str], *, wait: bool = True
) -> Released:
    """Scale the given models and front-ends to 0 at once, then (optionally) wait until their pods are gone.

    Every scale-down is issued first, concurrently, within RELEASE_ISSUE_S; only then does it wait (only for
    those whose scale-down was confirmed). Never raises: what could not be done is returned (and logged) so the
    caller's own error is not masked; the caller decides on ``Released.ok`` / ``left_up``.
    """
    outcome = Released()
    if not models and not frontends:
        return outcome
    log = logger()
    targets = [(spec.serving_namespace, m.name) for m in models] + [(spec.experience_namespace, n) for n in frontends]
    try:
        async with open_api(target) as api:

            async def down(ns: str, name: str) -> None:
                line = outcome._line(name)
                try:
                    await scale(api, ns, name, 0)
                    line.scaled, line.detail = True, "scaled to 0"
                except CoderStackError as e:
                    line.detail = f"scale-down failed: {e}"

            # The scale-downs run in a task of their own that a cancellation of the caller does not stop (a lost
            # GPU lease, a cancel from the UI, a SIGTERM landing in this finally): once issued they finish, within
            # RELEASE_ISSUE_S, and only then does the cancellation go on. Nothing is left billing half-released.
            issuing = asyncio.ensure_future(
                asyncio.wait_for(asyncio.gather(*(down(ns, n) for ns, n in targets)), RELEASE_ISSUE_S)
            )
            try:
                await asyncio.shield(issuing)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await issuing
                log.warning(
                    "Clean-up interrupted after its scale-downs: %s.",
                    "; ".join(f"{n} {line.detail or 'not confirmed'}" for n, line in outcome.lines.items()),
                )
                raise
            except TimeoutError:
                for _, n in targets:
                    line = outcome._line(n)
                    if not line.scaled and not line.detail:
                        line.detail = f"scale-down not confirmed within {RELEASE_ISSUE_S:.0f} s"
            log.info("Clean-up: %s.", "; ".join(f"{n} {line.detail}" for n, line in outcome.lines.items()))
            if wait:
                for ns, n, sel in [(spec.serving_namespace, m.name, m.selector) for m in models] + [
                    (spec.experience_namespace, f.name, f.selector) for f in spec.frontends if f.name in frontends
                ]:
                    line = outcome._line(n)
                    if not line.scaled:
                        continue  # its pods will not go: waiting would only delay the caller's error
                    try:
                        gone = await wait_gone(api, ns, sel, spec.timeouts.deletion_s)
                        line.gone = True
                        line.pods_seen = bool(gone.pods_seen)
                        if gone.pods_seen:
                            line.detail = f"scaled to 0, pods gone after {gone.seconds:.1f} s"
                    except CoderStackError as e:
                        line.gone = False
                        line.detail = f"{line.detail}; still has pods: {e}"
    except CoderStackError as e:
        log.error("Clean-up could not reach the cluster: %s. Run `coder-stack down` to make sure nothing is left.", e)
        for _, n in targets:
            line = outcome._line(n)
            if not line.detail:
                line.detail = f"not released: {e}"
    if not outcome.ok:
        log.error("Clean-up left up: %s.", "; ".join(f"{n}: {outcome.detail(n)}" for n in outcome.left_up))
    return outcome
