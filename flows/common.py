"""Steps the flows share: parameters, bringing a model up, freeing the GPU, the fast clean-up, the report.

Clean-up (:func:`release`) calls the cluster functions directly rather than through tasks: it runs in a
``finally`` while the run may be failing, cancelled or terminated, and must issue every scale-down within
seconds (the runner kills a cancelled flow 30 s after the request).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal
from prefect.logging import get_run_logger
from prefect.states import Cancelled
from pydantic import BaseModel, ConfigDict, Field, model_validator

from coder_stack.errors import CoderStackError, PermanentError, SpecError, UnexpectedError
from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.kubernetes.wait import ReadyReport, wait_gone
from coder_stack.kubernetes.workloads import deployment_replicas, scale
from coder_stack.orchestration.stack_block import load_stack_block
from coder_stack.probe import SmokeResult
from coder_stack.report import ModelSection, RunReport, SmokeLine, SpendLine
from coder_stack.spec import ModelSpec, StackSpec, load_spec
from coder_stack.tasks.cluster import (
    free_gpu_task,
    scale_task,
    wait_frontend_ready_task,
    wait_model_ready_task,
)
from coder_stack.tasks.gateway import ensure_keys_task

# How long the clean-up may spend issuing scale-downs before it moves on to waiting.
RELEASE_ISSUE_S = 5.0


class Connection(BaseModel):
    """Which cluster and which stack.

    The stack: a ``CoderStackSpec`` block named by ``stack_block`` (kept in Prefect, for runs in a Job pod),
    or a YAML file at ``stack_file`` (read on the machine that runs the flow), or neither (the runbook's
    reference deployment). The cluster: a ``KubernetesCredentials`` block named by ``credentials_block``, or
    a kubeconfig path, or neither (inside a pod its ServiceAccount, else $KUBECONFIG, else ~/.kube/config).
    Only names and paths: credentials never appear in a parameter.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kubeconfig: str | None = Field(
        None, max_length=4096, description="Kubeconfig path; empty: in-cluster, then $KUBECONFIG, then ~/.kube/config."
    )
    context: str | None = Field(None, max_length=253, description="Kubeconfig context; empty: the current one.")
    stack_file: str | None = Field(
        None, max_length=4096, description="Stack spec YAML; empty: the runbook's reference deployment."
    )
    stack_block: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="Name of the Coder Stack Spec block holding the stack spec (instead of stack_file).",
    )
    credentials_block: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="Name of a Kubernetes Credentials block for runs outside the cluster (instead of kubeconfig).",
    )

    @model_validator(mode="after")
    def _one_source_each(self) -> Connection:
        if self.stack_file and self.stack_block:
            raise ValueError("give stack_file or stack_block, not both")
        if self.kubeconfig and self.credentials_block:
            raise ValueError("give kubeconfig or credentials_block, not both")
        return self

    def cluster_target(self) -> ClusterTarget:
        """The cluster to talk to (serialisable; the credentials block, if any, is read when a client opens)."""
        return ClusterTarget(kubeconfig=self.kubeconfig, context=self.context, credentials_block=self.credentials_block)

    async def resolve(self) -> tuple[StackSpec, ClusterTarget]:
        """The spec and cluster target; a bad file or block fails here, before anything changes."""
        spec = await load_stack_block(self.stack_block) if self.stack_block else load_spec(self.stack_file)
        return spec, self.cluster_target()


@dataclass(frozen=True)
class Run:
    """What every step of a flow run works with: the cluster, the stack, and the run's report."""

    target: ClusterTarget
    spec: StackSpec
    report: RunReport

    def step(self, text: str, *, cleanup: bool = False) -> None:
        self.report.step(text, cleanup=cleanup)


def logger() -> Any:
    return get_run_logger()


def model_for_role(spec: StackSpec, role: str) -> ModelSpec:
    for m in spec.models:
        if m.role == role:
            return m
    raise SpecError(
        f"the stack has no model with role {role!r}; roles present: {sorted({m.role for m in spec.models})}"
    )


def record_ready(section: ModelSection, ready: ReadyReport) -> None:
    section.phases = {k: round(v, 3) for k, v in ready.seconds.items()}
    section.ready_s = round(ready.total_s, 3)
    section.scale_up_seen = ready.scale_up_seen


def record_smoke(section: ModelSection, res: SmokeResult, label: str | None = None) -> None:
    via = f" via key {res.key_alias}" if res.key_alias else ""
    checks = "; ".join(c.name for c in res.checks)
    detail = f"{checks}. {res.excerpt!r}" if res.excerpt else checks
    for d in res.diagnostics:
        detail += f" [diagnostic: {d}]"
    section.smokes.append(SmokeLine(check=label or f"{res.kind}{via}", ok=True, detail=detail, seconds=res.total_s))
    if res.ttft_s is not None and section.ttft_ms is None:
        section.ttft_ms = round(res.ttft_s * 1000, 1)


def record_failure(section: ModelSection, label: str, err: BaseException) -> None:
    section.smokes.append(SmokeLine(check=label, ok=False, detail=str(err)))


class SigtermGuard:
    """Turn SIGTERM into a cancellation of the running flow, delivered inside the event loop.

    Prefect's own handler raises ``TerminationSignal`` wherever the main thread happens to be; when that
    is inside an asyncio I/O callback, asyncio swallows it, the flow's ``finally`` never runs and the GPU
    keeps billing until the worker kills the process. Cancelling the flow's task from the loop instead
    always unwinds through the ``finally`` (scale-downs first); :meth:`reraise` then hands Prefect the
    ``TerminationSignal`` it expects, so a cancel from the UI still ends the run Cancelled. The first
    SIGTERM cancels; later ones are ignored so they cannot interrupt the clean-up. Main thread only.
    """

    def __init__(self) -> None:
        self.fired = False
        self._restore: Callable[[], None] = lambda: None
        task = asyncio.current_task()
        if threading.current_thread() is not threading.main_thread() or task is None:
            return
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm() -> None:
            if not self.fired:
                self.fired = True
                logger().warning("SIGTERM: cancelling the run; scaling down what it started.")
                task.cancel()

        try:
            loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        except (NotImplementedError, RuntimeError, ValueError):
            return

        def restore() -> None:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGTERM)
                signal.signal(signal.SIGTERM, previous)

        self._restore = restore

    def restore(self) -> None:
        self._restore()

    async def reraise(self, exc: BaseException) -> None:
        """After the clean-up: mark the run Cancelled (it was asked to stop, and stopped cleanly) and hand
        Prefect the ``TerminationSignal`` it expects from a SIGTERM."""
        if not (self.fired and isinstance(exc, asyncio.CancelledError)):
            return
        ctx = FlowRunContext.get()
        if ctx is not None and ctx.flow_run is not None:
            with contextlib.suppress(Exception):
                async with get_client() as client:
                    cancelled: State[Any] = Cancelled(message="SIGTERM: stopped after scaling down what it started")
                    state = (await client.set_flow_run_state(ctx.flow_run.id, cancelled, force=True)).state
                # The engine's own copy of the run must see the final state too: when the worker's cancel
                # intent has not reached the engine yet (a race seen under load), the engine turns the
                # TerminationSignal into a forced Crashed unless its run is already final.
                if state is not None:
                    ctx.flow_run.state = state
        raise TerminationSignal(signal.SIGTERM) from exc


@asynccontextmanager
async def guarded(
    report: RunReport, artifact_key: str, flow_name: str, final_state_of: tuple[ClusterTarget, StackSpec] | None
) -> AsyncIterator[None]:
    """Every flow's body runs inside this: SIGTERM becomes a clean cancellation (:class:`SigtermGuard`), a
    failure is recorded in the report and logged, and the report is published whatever happens (with
    the cluster's replicas as they are at the end when ``final_state_of`` is given)."""
    sigterm = SigtermGuard()
    try:
        yield
    except BaseException as e:
        step = report.current_step
        report.finish(f"failed: {type(e).__name__}")
        if isinstance(e, CoderStackError):
            e.step = e.step or step
        logger().error("%s failed at %r: %s", flow_name, step, e)
        await sigterm.reraise(e)
        if isinstance(e, Exception) and not isinstance(e, CoderStackError):
            # Whatever fails, the user gets one line naming the step (the report is still published below)
            wrapped = UnexpectedError(e, step=step)
            wrapped.report = report
            raise wrapped from e
        if isinstance(e, CoderStackError):
            e.report = report
        raise
    finally:
        sigterm.restore()
        if final_state_of is not None:
            report.final_state = await final_state(*final_state_of)
        await publish(report, artifact_key)


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


def holder() -> str | None:
    """This flow run's id, stamped on the models it brings up or uses (see coder_stack.usecases.holders)."""
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else None


async def model_up(run: Run, model: ModelSpec) -> ReadyReport:
    """Scale a model to 1 and wait through its cold start (phase budgets from the spec)."""
    run.step(f"scale {model.name} to 1 and wait through its cold start")
    await scale_task(run.target, run.spec.serving_namespace, model.name, 1, held_by=holder())
    ready = await wait_model_ready_task(run.target, run.spec, model)
    record_ready(run.report.section(model.name), ready)
    run.step(f"{model.name} Ready after {ready.total_s:.1f} s")
    return ready


async def model_up_with_keys_and_frontends(
    run: Run, model: ModelSpec, key_aliases: list[str], frontends: list[str]
) -> ReadyReport:
    """Scale a model to 1 and, while it cold starts, deliver the keys and bring the front-ends up.

    The front-ends need their keys' Secrets before they can start, and both are CPU work that fits
    inside the GPU model's ~10 min cold start.
    """
    target, spec, report = run.target, run.spec, run.report
    await scale_task(target, spec.serving_namespace, model.name, 1, held_by=holder())
    run.step(f"{model.name} cold start; keys and front-ends meanwhile")

    async def keys_and_frontends() -> None:
        reps = await ensure_keys_task(target, spec, key_aliases)
        report.key_actions += [f"{r.alias}: {r.action} ({r.delivered_to})" for r in reps]
        await asyncio.gather(*(scale_task(target, spec.experience_namespace, f, 1) for f in frontends))
        await asyncio.gather(*(wait_frontend_ready_task(target, spec, f) for f in frontends))
        run.step(f"keys delivered; {', '.join(frontends)} Ready")

    ready, _ = await gather_or_cancel(wait_model_ready_task(target, spec, model), keys_and_frontends())
    record_ready(report.section(model.name), ready)
    run.step(f"{model.name} Ready after {ready.total_s:.1f} s")
    return ready


async def free_gpu(run: Run, keep: ModelSpec | None) -> list[ModelSpec]:
    """Scale every GPU model except ``keep`` to 0 and wait until their pods are gone. Returns who was stopped.

    Called right after the GPU grant: one task (``free_gpu_task``) reads only what it needs, since the flow's
    preflight checked the rest, and every task run here is time a freed GPU idles in a hand-off."""
    freed = await free_gpu_task(run.target, run.spec, keep.name if keep else None)
    names = {h.name for h in freed.holders}
    busy = [m for m in run.spec.models if m.name in names]
    if busy:
        run.step(f"free the GPU: {', '.join(m.name for m in busy)} scaled to 0 and gone")
    return busy


class ReleaseLine(BaseModel):
    """One Deployment's clean-up: was the scale-down to 0 confirmed, are its pods gone, and the words for it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Deployment name.")
    scaled: bool = Field(False, description="The scale-down to 0 was confirmed by the API server.")
    gone: bool | None = Field(None, description="Its pods are gone (None: not waited for).")
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


class ReleaseIncomplete(PermanentError):
    """A clean-up scale-down was not confirmed, or the pods stayed: the model may still hold the GPU."""


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


async def final_state(target: ClusterTarget, spec: StackSpec) -> dict[str, int]:
    """spec.replicas of every Deployment the stack scales, as the run leaves them: one Deployment list per
    namespace (it runs as the GPU passes to the next session; a read per Deployment and its pods slowed
    that hand-off)."""
    deployments = spec.deployments()
    try:
        async with open_api(target) as api:
            by_ns = {ns: await deployment_replicas(api, ns) for ns in dict.fromkeys(ns for ns, _ in deployments)}
    except CoderStackError as e:
        logger().warning("Could not read the final state: %s", e)
        return {}
    missing = [f"{ns}/{name}" for ns, name in deployments if name not in by_ns[ns]]
    if missing:
        logger().warning("Could not read the final state of %s: no such Deployment.", ", ".join(missing))
    return {f"{ns}/{name}": by_ns[ns][name] for ns, name in deployments if name in by_ns[ns]}


def spend_lines(rows: list[Any]) -> list[SpendLine]:
    out = []
    for r in rows:
        note = r.status if not r.note else f"{r.status}: {r.note}"
        out.append(
            SpendLine(
                alias=r.alias,
                spend=r.spend,
                max_budget=r.max_budget,
                share_used=r.share_used,
                models=list(r.models),
                note=note,
            )
        )
    return out


async def publish(report: RunReport, key: str) -> None:
    """The run's markdown report and spend table as Prefect artifacts (no secrets in either)."""
    try:
        await acreate_markdown_artifact(key=key, markdown=report.to_markdown(), description=f"{report.flow} report")
        if report.spend:
            await acreate_table_artifact(
                key=f"{key}-spend",
                table=[s.model_dump() for s in report.spend],
                description="Spend per virtual key",
            )
    except Exception as e:  # an artifact must never turn a clean-up into a crash
        logger().warning("Could not publish the report artifact: %s", type(e).__name__)
