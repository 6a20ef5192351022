"""clean_up_crashed_run: give back the GPU a dead flow run left behind.

Started by the ``clean-up-crashed-run`` deployment's trigger (prefect.yaml) when a coder-stack GPU flow run
ends Crashed — its process was SIGKILLed, OOM-killed or lost with its node, and the crash automation
(``coder-stack setup``) marked it Crashed after its heartbeats stopped — or by hand:
``coder-stack cleanup <run-id>``.

It scales to 0 the models the dead run holds (stamped ``coder-stack.io/held-by`` with its id), never one a live run
has taken over, waits until their pods are gone, removes a wake claim the run left (``coder-stack.io/wake``, so the
LiteLLM callback asks for a new wake instead of saying "starting"), frees the run's GPU slot if it still holds one,
and publishes what it found. It never takes the GPU limit, so it runs while another session holds the GPU; safe to
run twice (the second finds nothing). A run that is still alive is left alone: it decides only once the server's
clock reads the dead mark plus ``settle_s`` (one heartbeat interval plus 10 s), and a heartbeat received after the
mark proves the run alive. Every change to a model is conditional on the stamp it read (a JSON patch ``test`` op),
so a session that took the model over since keeps it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Crashed

from coder_stack.errors import CoderStackError
from coder_stack.flows.errors import CleanupIncomplete
from coder_stack.flows.guard import guarded
from coder_stack.flows.params import Connection
from coder_stack.flows.run import logger
from coder_stack.kubernetes.client import cluster_session, open_api
from coder_stack.orchestration.gpu_limit import GPU_LIMIT, START_LIMIT
from coder_stack.orchestration.liveness import (
    CLEANUP_FLOW,
    CRASH_SETTLE_S,
    HEARTBEAT_S,
    SILENT_AFTER_S,
    RunLiveness,
    heartbeat_after,
    parse_run_id,
    read_liveness,
    release_lease_of,
    release_turn_of,
    server_now,
)
from coder_stack.report import RunReport
from coder_stack.spec import ModelSpec
from coder_stack.usecases.stamps import held_by, release_held
from coder_stack.usecases.wake import clear_wake_of

# The flows that hold the GPU: the crash automation watches these (and prefect.yaml's trigger lists them).
GPU_FLOWS = ("validate_coder_stack", "swap_model", "bring_up", "reclaim_idle_models", "wake_model")


@dataclass(frozen=True)
class Verdict:
    """Whether the run's process is gone (only then is anything changed), and why, for the report."""

    headline: str  # "dead", "alive" or "ended <STATE>"
    detail: str

    @property
    def dead(self) -> bool:
        return self.headline == "dead"

    def __str__(self) -> str:
        return f"{self.headline}: {self.detail}"


@flow(name=CLEANUP_FLOW, log_prints=False)
async def clean_up_crashed_run(
    crashed_run: str, connection: Connection | None = None, settle_s: float = CRASH_SETTLE_S
) -> RunReport:
    """Scale to 0 what a dead run holds, wait until the pods are gone, free its GPU slot; report what was found.

    Args:
        crashed_run: The crashed flow run's id (the trigger passes its event resource id, prefect.flow-run.<id>).
        connection: Which cluster and stack; empty: the dead run's own (from its parameters).
        settle_s: How long after the run was marked dead (by the server's clock) a heartbeat received from it
            still proves it alive; the clean-up decides only then. Default: one heartbeat interval plus 10 s.
    """
    run_id = parse_run_id(crashed_run)
    report = RunReport(flow="clean_up_crashed_run")
    async with guarded(report, "crash-cleanup", "clean_up_crashed_run", final_state_of=None):
        report.step(f"read flow run {run_id}")
        live = await read_liveness(run_id)
        verdict = await _verdict(live, settle_s)
        report.notes.append(f"found: {live.label()} {verdict}")
        logger().info("Flow run %s %s.", live.label(), verdict)
        if not verdict.dead:
            report.finish(f"skipped: {live.label()} {verdict.headline}")
            return report
        conn = connection or _connection_of(live)
        spec, target = await conn.resolve()
        freed: list[str] = []
        async with cluster_session(target):
            report.step("find the models the dead run holds")
            async with open_api(target) as api:
                held = await held_by(api, spec, str(run_id))
                serving = [m for m, st in held if st.replicas or st.pods]
                if serving:
                    report.step(f"scale {', '.join(m.name for m in serving)} to 0 and wait until the pods are gone")
                else:
                    report.notes.append("it holds no serving model (none stamped with its id, or already at 0)")
                # Each change only while the model is still stamped with the dead run's id: a session that took
                # the GPU since (the dead run's lease expired) and stamped the model keeps it.
                outcome: dict[str, str] = {}
                bad: dict[str, str] = {}

                async def one(m: ModelSpec, up: bool) -> None:
                    try:
                        done = await release_held(api, spec, m, str(run_id), serving=up)
                    except CoderStackError as e:
                        bad[m.name] = outcome[m.name] = f"still has pods: {e}"
                        return
                    outcome[m.name] = done.detail
                    if done.scaled_down:
                        freed.append(m.name)

                await asyncio.gather(*(one(m, m in serving) for m, _ in held))
                # A dead wake's claim (coder-stack.io/wake) is removed after its model was scaled down: the
                # callback then asks for a new wake instead of saying "starting" for a run that is gone. (The
                # next wake would take a dead run's claim over anyway; this only makes it prompt.)
                cleared = await clear_wake_of(api, spec, str(run_id))
                if cleared:
                    report.notes.append(f"its wake claim removed from {', '.join(cleared)}")
            report.notes += [f"{k}: {v}" for k, v in outcome.items() if k in {m.name for m in serving}]
            if bad:
                raise CleanupIncomplete(
                    f"the dead run's {', '.join(bad)} could not be scaled down: "
                    + "; ".join(f"{k}: {v}" for k, v in bad.items())
                    + ". Run `coder-stack down`, then check the cluster"
                )
        report.step("free its GPU slot")
        slot = await release_lease_of(live, GPU_LIMIT)
        report.notes.append(slot.text)
        # time-sliced: the turn to start a model on the shared GPU, if the run died while starting one
        turn = await release_turn_of(live.run_id, START_LIMIT)
        if turn is not None and turn.freed:
            report.notes.append(turn.text)
        report.finish(
            "passed: " + (f"{', '.join(freed)} scaled to 0" if freed else "no model left") + f"; {slot.headline}"
        )
        return report


async def _verdict(live: RunLiveness, settle_s: float) -> Verdict:
    """Dead when the run's process is gone, else why it is left alone.

    A run marked dead (Crashed by the automation, or Failed/Cancelled) is judged only once the server's clock
    reads the mark plus ``settle_s``: a heartbeat the server receives after the mark proves it alive (the
    automation acts on missing events, not on a dead process: a lagging server marks live runs Crashed)."""
    age = "none seen" if live.heartbeat_age_s is None else f"last {live.heartbeat_age_s:.0f} s ago"
    if live.state in {"CRASHED", "FAILED", "CANCELLED"} and live.state_at is not None:
        beat = await heartbeat_after(live.run_id, live.state_at, settle_s)
        if beat is not None:
            return Verdict(
                "alive",
                f"marked {live.state} but a heartbeat came after the mark (received {beat:%H:%M:%S} UTC); "
                "nothing done — cancel it from the Prefect UI to stop it",
            )
        return Verdict(
            "dead", f"{live.state} ({live.state_message or 'no message'}; heartbeat {age}, none since the mark)"
        )
    if live.final:
        return Verdict(f"ended {live.state}", "its models are what it left; nothing to do")
    if live.silent:
        async with get_client() as client:
            mark = await server_now(client)
        # The server's clock (its Date header: whole seconds, behind under load) can read earlier than the receipt of
        # the very heartbeat that made the run look silent; that one must not count as a heartbeat after the look.
        if live.last_received is not None and live.last_received > mark:
            mark = live.last_received
        beat = await heartbeat_after(live.run_id, mark, settle_s)
        if beat is not None:
            return Verdict("alive", f"{live.state}, a heartbeat came after {age}; nothing done")
        async with get_client() as client:
            msg = f"no heartbeat for over {SILENT_AFTER_S} s ({age}): marked Crashed by coder-stack's clean-up"
            await client.set_flow_run_state(live.run_id, Crashed(message=msg), force=True)
        return Verdict("dead", f"{live.state} but silent ({age}); marked Crashed")
    return Verdict(
        "alive",
        f"{live.state}, heartbeat {age} (one every {HEARTBEAT_S} s); nothing done — a live run is never "
        "touched (cancel it from the Prefect UI to stop it)",
    )


def _connection_of(live: RunLiveness) -> Connection:
    raw: Any = live.parameters.get("connection")
    return Connection.model_validate(raw) if isinstance(raw, dict) else Connection()
