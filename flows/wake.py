"""wake_model (a request for a model that is down): bring it up with its keys and front-ends, never evicting a
model someone is using.

Started by the ``wake-model`` deployment's trigger on the event the LiteLLM callback sends
(``coder-stack.model.wake-requested``; ``model`` is the Deployment name), or by hand (``coder-stack wake MODEL``).
Idempotent: a model already Ready, or a wake already pending under a live run, is left to it. Otherwise the run
*claims* the wake (the ``coder-stack.io/wake`` annotation, one conditional patch: of two wakes at once, one
claims, the other does nothing; a claim naming a dead run is taken over) and, under the GPU limit:

- no other model serves: the model comes up as ``bring_up`` brings it (keys and front-ends during the cold start,
  smoked directly and through the gateway), state ``starting`` with ``ready_by`` from its measured cold start;
- another model serves and is idle by the reclaim rule (``read_idleness`` + ``moved_since``, the checks
  ``reclaim_idle_models`` makes): it is reclaimed, then the model comes up;
- on a time-sliced GPU where the model fits beside every model that serves (``spec.fit_together``): it comes up
  beside them — nothing is read, reclaimed or waited for; its session occupies its share only, and it starts under
  the start turn once its share is free;
- another model is in use: it is **never evicted**. The state is ``waiting-for-gpu`` (``busy`` names it), the GPU
  limit is given back, and the run looks again every :data:`GPU_POLL_S` seconds — within ``wake.wait_for_gpu_s``,
  then it fails saying what to do.

The claim is removed when the run ends however it ends; a failure or cancellation scales the model back to 0
(the front-ends, CPU work other models' users may be looking at, are left as they are).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime

from prefect import flow

from coder_stack.errors import CoderStackError, GpuSlotTimeout, SpecError
from coder_stack.flows.errors import ReclaimIncomplete, WakeGaveUp, WakeTakenOver
from coder_stack.flows.gpu_steps import release, smoke_served, start_models
from coder_stack.flows.guard import guarded
from coder_stack.flows.params import Connection
from coder_stack.flows.run import Run, logger, this_run_id
from coder_stack.kubernetes.client import cluster_session, open_api
from coder_stack.orchestration.gpu import gpu_session
from coder_stack.report import RunReport
from coder_stack.spec import ModelSpec, StackSpec
from coder_stack.tasks.cluster import stack_status_task
from coder_stack.tasks.idle import mark_reclaimed_task, moved_since_task, read_idleness_task
from coder_stack.tasks.wake import claim_wake_task, cold_start_estimate_task, update_wake_task
from coder_stack.usecases.wake import Claim, WakeState, release_claim

# How often a wake waiting for the GPU looks again (the whole wait is bounded by spec.wake.wait_for_gpu_s).
GPU_POLL_S = 30.0
# How long the claim's removal may take when the run ends (it runs while the run may be cancelled).
RELEASE_CLAIM_S = 5.0


def model_of(spec: StackSpec, name: str) -> ModelSpec:
    """The spec's model whose Deployment is ``name`` (what the trigger passes), or a clear error."""
    for m in spec.models:
        if m.name == name:
            return m
    raise SpecError(
        f"wake_model: {name!r} is not a model of this stack (its models' Deployments: "
        f"{', '.join(m.name for m in spec.models)}); nothing was changed — check the callback's settings "
        "(`coder-stack wake-setup`) against the stack spec"
    )


@flow(name="wake_model", log_prints=False)
async def wake_model(model: str, connection: Connection = Connection()) -> RunReport:
    """Bring ``model`` (its Deployment name) up with its keys and front-ends, unless it is Ready or a live wake is
    pending; wait for the GPU while another model is in use, never evicting it."""
    spec, target = await connection.resolve()
    m = model_of(spec, model)
    async with cluster_session(target):
        run = Run(target, spec, RunReport(flow="wake_model"))
        report = run.report
        async with guarded(report, "wake-report", "wake_model", final_state_of=(target, spec)):
            run_id = this_run_id()
            if run_id is None:
                raise SpecError("wake_model runs only as a flow run (its claim names the run); nothing was changed")
            run.step(f"claim the wake of {m.name}")
            got = await claim_wake_task(target, spec, m, run_id)
            if got.ready:
                report.notes.append(f"{m.name} is already Ready: nothing to do")
                report.finish("passed: already serving")
                return report
            if got.pending is not None:
                p = got.pending
                report.notes.append(f"a wake of {m.name} is already pending ({p.state} since {p.since}, run {p.run})")
                report.finish("passed: a wake is already pending")
                return report
            assert got.claim is not None
            if got.took_over:
                report.notes.append(f"took over the wake claimed by {got.took_over}")
            holder = _Held(got.claim)
            try:
                await _wake(run, m, holder)
            finally:
                await _end(run, m, holder)
            report.finish(f"passed: {m.name} serving")
            logger().info("%s is serving behind the gateway (woken on demand).", m.name)
            return report


class _Held:
    """The run's claim as it changes (None once it is no longer this run's)."""

    def __init__(self, claim: Claim) -> None:
        self.claim: Claim | None = claim


async def _set(run: Run, held: _Held, state: WakeState) -> None:
    assert held.claim is not None
    now = await update_wake_task(run.target, run.spec, held.claim, state)
    if now is None:
        held.claim = None
        raise WakeTakenOver(
            f"the wake claim on {held_model(held)} was taken over or removed while this run held it; this run "
            "changes nothing more (the wake that holds it now brings the model up)"
        )
    held.claim = now


def held_model(held: _Held) -> str:
    return held.claim.model if held.claim else "the model"


async def _wake(run: Run, m: ModelSpec, held: _Held) -> None:
    spec = run.spec
    budget = spec.wake.wait_for_gpu_s
    deadline = time.monotonic() + budget
    assert held.claim is not None
    while True:
        left = deadline - time.monotonic()
        busy: list[str] = []
        holding = False
        try:
            async with gpu_session(max(1.0, min(GPU_POLL_S, left)), occupy=spec.occupy([m])):
                holding = True
                run.step(f"holding the GPU limit; what serves besides {m.name}?")
                busy = await _make_room(run, m)
                if not busy:
                    await _bring_up(run, m, held)
                    return
        except GpuSlotTimeout:
            if holding:
                raise
            busy = await _serving_besides(run, m)
            run.step(f"the GPU limit is held by another run ({', '.join(busy) or 'no model serving yet'})")
        left = deadline - time.monotonic()
        if left <= 0:
            what = ", ".join(busy) or "another coder-stack run"
            raise WakeGaveUp(
                f"{m.name} waited {budget:.0f} s (wake.wait_for_gpu_s) for the GPU and {what} stayed in use; nothing "
                f"was evicted and {m.name} is at 0. It comes up with the next request once {what} is idle (reclaimed "
                f"after idle_after_s), or when {what} is no longer needed: `coder-stack swap {m.name}` (that stops it)"
            )
        assert held.claim is not None
        now = held.claim.state
        if now.state != "waiting-for-gpu" or now.busy != sorted(busy):  # `since`: when it began waiting for these
            await _set(run, held, WakeState.waiting(held.claim.run, busy))
        run.step(f"{m.name} waits for the GPU: {', '.join(busy) or 'another run'} in use; looking again")
        logger().info("%s waits for the GPU: %s in use (never evicted).", m.name, ", ".join(busy) or "another run")
        await asyncio.sleep(min(GPU_POLL_S, left))


async def _serving_besides(run: Run, m: ModelSpec) -> list[str]:
    statuses = await stack_status_task(run.target, run.spec)
    names = {o.name for o in run.spec.models if o.name != m.name}
    return sorted(
        s.name
        for s in statuses
        if s.namespace == run.spec.serving_namespace and s.name in names and (s.replicas or s.pods)
    )


async def _make_room(run: Run, m: ModelSpec) -> list[str]:
    """Holding the GPU limit: make room for ``m``. On a time-sliced GPU where ``m`` fits beside every model that
    serves (``spec.fit_together``), nothing is read or changed: it comes up beside them. Otherwise the other
    serving models are read by the reclaim rule (read, then read again right before its scale-down, as
    ``reclaim_idle_models`` does): if ``m`` does not fit beside the ones in use, nothing is changed and they are
    returned (it waits); else each idle one that does not fit beside ``m`` and the ones in use is reclaimed (in
    exclusive mode: every idle one, and only when none is in use). Returns [] when there is room for ``m``."""
    target, spec = run.target, run.spec
    others = [o for o in spec.models if o.name in set(await _serving_besides(run, m))]
    if not others:
        return []
    if spec.time_sliced and spec.fit_together([m, *others]):
        run.report.notes.append(f"{m.name} fits beside {', '.join(o.name for o in others)}: nothing reclaimed")
        return []
    readings = [(o, await read_idleness_task(target, spec, o)) for o in others]
    in_use = [o for o, i in readings if not i.idle]
    busy = [o.name for o in in_use]
    for o, i in readings:
        run.report.notes.append(f"{o.name}: {'idle' if i.idle else 'in use'}: {i.reason}")
    if busy and not spec.fit_together([m, *in_use]):
        return busy
    # time-sliced: an idle model that fits beside m and the ones in use stays
    keep = [*in_use, *spec.fit_beside([m, *in_use], [o for o, i in readings if i.idle])]
    for o, i in readings:
        if o in keep:
            continue
        moved = await moved_since_task(target, spec, o, i.activity) if i.activity is not None else "no reading"
        if moved:
            run.report.notes.append(f"{o.name}: in use: {moved}")
            return [o.name]
        run.step(f"{o.name} {i.reason}: reclaim it for {m.name}")
        freed = await release(target, spec, [o], [])
        if not freed.ok:
            raise ReclaimIncomplete(f"{o.name} was idle but could not be reclaimed: {freed.detail(o.name)}")
        await mark_reclaimed_task(target, spec, o, datetime.now(UTC))
        run.report.notes.append(f"{o.name}: reclaimed (idle) to wake {m.name}")
    return []


async def _bring_up(run: Run, m: ModelSpec, held: _Held) -> None:
    target, spec, report = run.target, run.spec, run.report
    estimate = await cold_start_estimate_task(target, spec, m)
    assert held.claim is not None
    await _set(run, held, WakeState.starting(held.claim.run, estimate))
    run.step(f"bring {m.name} up (its cold start took {estimate:.0f} s last time)")
    aliases = [k.alias for k in spec.virtual_keys if k.deliver_to != "keystore"]
    ok = False
    try:
        # one model: exclusive mode is model_up_with_keys_and_frontends; time-sliced, its start waits for its share
        # under the start turn (never two models starting on the shared GPU at once)
        await start_models(run, [m], aliases, list(spec.frontends))
        await smoke_served(run, m)
        ok = True
    finally:
        if not ok:  # still holding the GPU limit: no other session scales up before the model is gone
            run.step(f"wake failed: scale {m.name} back to 0", cleanup=True)
            outcome = await release(target, spec, [m], [])
            report.notes += outcome.notes()


async def _end(run: Run, m: ModelSpec, held: _Held) -> None:
    """However the run ends, the claim is removed (only while it is still this run's), to the end even while the
    run is being cancelled. (A failed or cancelled bring-up scaled the model back to 0 already, in ``_bring_up``.)"""
    claim = held.claim
    if claim is None:
        return

    async def remove() -> bool:
        async with open_api(run.target) as api:
            return await release_claim(api, run.spec, claim)

    removing = asyncio.ensure_future(asyncio.wait_for(remove(), RELEASE_CLAIM_S))
    try:
        gone = await asyncio.shield(removing)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await removing
        raise
    except (CoderStackError, TimeoutError) as e:
        logger().error(
            "Could not remove the wake claim on %s (%s): the next wake takes it over once this run has ended.",
            m.name,
            e,
        )
        return
    if not gone:
        run.report.notes.append(f"the wake claim on {m.name} was no longer this run's: left as it is")
