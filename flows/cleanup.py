"""clean_up_crashed_run: give back the GPU a dead flow run left behind.

Started by the ``clean-up-crashed-run`` deployment's trigger (prefect.yaml) when a coder-stack GPU flow run
ends Crashed — its process was SIGKILLed, OOM-killed or lost with its node, and the crash automation
(``coder-stack setup``) marked it Crashed after its heartbeats stopped — or by hand:
``coder-stack cleanup <run-id>``.

It scales to 0 the models the dead run holds (stamped ``coder-stack.io/held-by`` with its id), never one a
live run has taken over, waits until their pods are gone, frees the run's GPU slot if it still holds one,
and publishes what it found. It never takes the GPU limit, so it runs while another session holds the GPU;
safe to run twice (the second finds nothing). A run that is still alive is left alone.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Crashed

from coder_stack.errors import PermanentError
from coder_stack.kubernetes.client import cluster_session, open_api
from coder_stack.orchestration.gpu import GPU_LIMIT
from coder_stack.orchestration.liveness import (
    HEARTBEAT_S,
    SILENT_AFTER_S,
    RunLiveness,
    parse_run_id,
    read_liveness,
    release_lease_of,
)
from coder_stack.report import RunReport
from coder_stack.usecases.holders import clear_held, held_by
from flows.common import Connection, guarded, logger, release

# The flows that hold the GPU: the crash automation watches these (and prefect.yaml's trigger lists them).
GPU_FLOWS = ("validate_coder_stack", "swap_model", "bring_up", "reclaim_idle_models")


class CleanupIncomplete(PermanentError):
    """A dead run's model could not be scaled down (its pods are still there)."""


@flow(name="clean_up_crashed_run", log_prints=False)
async def clean_up_crashed_run(crashed_run: str, connection: Connection | None = None) -> RunReport:
    """Scale to 0 what a dead run holds, wait until the pods are gone, free its GPU slot; report what was found.

    Args:
        crashed_run: The crashed flow run's id (the trigger passes its event resource id, prefect.flow-run.<id>).
        connection: Which cluster and stack; empty: the dead run's own (from its parameters).
    """
    run_id = parse_run_id(crashed_run)
    report = RunReport(flow="clean_up_crashed_run")
    async with guarded(report, "crash-cleanup", "clean_up_crashed_run", final_state_of=None):
        report.step(f"read flow run {run_id}")
        live = await read_liveness(run_id)
        verdict = await _verdict(live)
        report.notes.append(f"found: {live.label()} {verdict}")
        logger().info("Flow run %s %s.", live.label(), verdict)
        if not verdict.startswith("dead"):
            report.finish(f"skipped: {live.label()} {verdict.split(':')[0]}")
            return report
        conn = connection or _connection_of(live)
        spec, target = await conn.resolve()
        async with cluster_session(target):
            report.step("find the models the dead run holds")
            async with open_api(target) as api:
                held = await held_by(api, spec, str(run_id))
            serving = [m for m, st in held if st.replicas or st.pods]
            if serving:
                names = ", ".join(m.name for m in serving)
                report.step(f"scale {names} to 0 and wait until the pods are gone")
                outcome = await release(target, spec, serving, [])
                report.notes += outcome.notes()
                bad = {k: outcome.detail(k) for k in outcome.left_up}
                if bad:
                    raise CleanupIncomplete(
                        f"the dead run's {', '.join(bad)} could not be scaled down: "
                        + "; ".join(f"{k}: {v}" for k, v in bad.items())
                        + ". Run `coder-stack down`, then check the cluster"
                    )
            else:
                report.notes.append("it holds no serving model (none stamped with its id, or already at 0)")
            async with open_api(target) as api:
                for m, _ in held:
                    await clear_held(api, spec, m)
        report.step("free its GPU slot")
        slot = await release_lease_of(live, GPU_LIMIT)
        report.notes.append(slot)
        freed = [m.name for m in serving]
        report.finish(
            "passed: " + (f"{', '.join(freed)} scaled to 0" if freed else "no model left") + f"; {slot.split(' (')[0]}"
        )
        return report


async def _verdict(live: RunLiveness) -> str:
    """``dead: …`` when the run's process is gone (and it is marked Crashed), else why it is left alone."""
    age = "none seen" if live.heartbeat_age_s is None else f"last {live.heartbeat_age_s:.0f} s ago"
    if live.state == "CRASHED":
        if live.heartbeats_after(live.state_at):
            return (
                f"alive: marked Crashed but still sending heartbeats (heartbeat {age}); nothing done — "
                "cancel it from the Prefect UI to stop it"
            )
        return f"dead: Crashed ({live.state_message or 'no message'}; heartbeat {age})"
    if live.final:
        return f"ended {live.state}: its own clean-up ran; nothing to do"
    if live.silent:
        async with get_client() as client:
            msg = f"no heartbeat for over {SILENT_AFTER_S} s ({age}): marked Crashed by coder-stack's clean-up"
            await client.set_flow_run_state(live.run_id, Crashed(message=msg), force=True)
        return f"dead: {live.state} but silent ({age}); marked Crashed"
    return (
        f"alive: {live.state}, heartbeat {age} (one every {HEARTBEAT_S} s); nothing done — a live run is never "
        "touched (cancel it from the Prefect UI to stop it)"
    )


def _connection_of(live: RunLiveness) -> Connection:
    raw: Any = live.parameters.get("connection")
    return Connection.model_validate(raw) if isinstance(raw, dict) else Connection()
