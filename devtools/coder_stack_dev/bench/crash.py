"""The crash scenario: seconds from a SIGKILL of a flow process in the middle of a cold start until the GPU is at
0 (no replica, no pod) and the dead run's ``tag:gpu`` slot is free — through the whole chain as deployed.

Real pieces: the Prefect server's own trigger and action services, the crash automation `coder-stack setup`
installs, the ``clean-up-crashed-run`` deployment with its prefect.yaml trigger (`prefect deploy`), a
``prefect worker start`` process on the process pool (default poll, 10 s), and a flow process running
``validate_coder_stack`` that is killed with SIGKILL. Heartbeats are real time (every 30 s), so each repetition
takes one to two minutes whatever the time scale; the time scale only shortens the cold start it is killed in,
and never below ``MIN_TIME_SCALE``: the victim must still be in its cold start when the poller sees it hold the GPU.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterName,
)
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL
from prefect.states import Crashed

from coder_stack.app.setup import PROJECT_DIR, deploy_all, ensure_work_pools
from coder_stack.flows.cleanup import GPU_FLOWS
from coder_stack.orchestration.liveness import (
    CLEANUP_FLOW,
    CRASH_AUTOMATION,
    CRASH_SETTLE_S,
    LEASE_LABEL,
    RELEASED,
    ensure_crash_automation,
)
from coder_stack_dev.bench.scenarios import fresh_sim
from coder_stack_dev.processes import sigkill, stop_group

POOL = "coder-stack-process"
# coder-chat's cold start (670 simulated s on an empty autoscaled pool) at least ~13 s: a tiny run's 1.3 s cold
# start once ended, smoke and teardown included, between two polls of a loaded CI machine.
MIN_TIME_SCALE = 0.02
CLEANUP = "clean-up-crashed-run"
VICTIM = """
import asyncio, sys
from coder_stack.flows.params import Connection
from coder_stack.flows.validate import ValidateOptions, validate_coder_stack

options = ValidateOptions(stages=["chat"])
asyncio.run(validate_coder_stack(options=options, connection=Connection(kubeconfig=sys.argv[1])))
"""


def _env(api_url: str, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(PROJECT_DIR),
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    return env


def _serving(sim: Any, model: str) -> tuple[int, int]:
    """(replicas, pods) of ``model`` on the simulated cluster."""

    def read(store: Any) -> tuple[int, int]:
        dep = store.get("deployments", "serving", model)
        pods = [
            p
            for p in store.list("pods", "serving")
            if all(
                p["metadata"].get("labels", {}).get(k) == v for k, v in dep["spec"]["selector"]["matchLabels"].items()
            )
        ]
        return int(dep["spec"]["replicas"]), len(pods)

    result: tuple[int, int] = sim.call(read, sim.store)
    return result


async def _victim_run(started: datetime) -> tuple[UUID, str | None] | None:
    async with get_client() as client:
        # newest first: the server's default order is by (random) id, and the bench's earlier groups leave runs
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["validate_coder_stack"])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=10,
        )
    for r in runs:
        if r.created and r.created > started:
            label = (r.labels or {}).get(LEASE_LABEL)
            return r.id, None if label is None else str(label)
    return None


async def _label(run_id: UUID) -> str | None:
    async with get_client() as client:
        value = ((await client.read_flow_run(run_id)).labels or {}).get(LEASE_LABEL)
    return None if value is None else str(value)


async def one_kill(time_scale: float, env: dict[str, str], log: Any, timeout_s: float = 240) -> dict[str, float]:
    """One victim killed mid cold start; seconds from the kill to Crashed, GPU at 0 and slot free."""
    with fresh_sim(time_scale) as b, tempfile.TemporaryFile() as out:
        started = datetime.now(UTC) - timedelta(seconds=2)
        proc = subprocess.Popen(  # noqa: ASYNC220 (returns at once; the victim is polled below)
            [sys.executable, "-c", VICTIM, str(b.sim.kubeconfig_path)], cwd=PROJECT_DIR, env=env, stdout=out, stderr=out
        )
        try:
            deadline = time.monotonic() + 120
            run_id = None
            while time.monotonic() < deadline:
                found = await _victim_run(started)
                if found and found[1] not in (None, RELEASED) and _serving(b.sim, "coder-chat")[1]:
                    run_id = found[0]
                    break
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.2)
            if run_id is None:
                out.seek(0)
                how = (
                    "was never seen holding the GPU in 120 s"
                    if proc.poll() is None
                    else (f"ended (exit code {proc.returncode}) before it was seen holding the GPU mid cold start")
                )
                raise RuntimeError(f"the victim {how}: {out.read()[-2000:]!r}")
        finally:
            sigkill(proc)  # the kill itself, or, after a failure, no victim left behind
        t_kill = time.monotonic()
        gpu_s = slot_s = crashed_s = None
        while time.monotonic() - t_kill < timeout_s and None in (gpu_s, slot_s, crashed_s):
            now = time.monotonic() - t_kill
            if gpu_s is None and _serving(b.sim, "coder-chat") == (0, 0):
                gpu_s = now
            if slot_s is None and await _label(run_id) == RELEASED:
                slot_s = now
            if crashed_s is None:
                async with get_client() as client:
                    st = (await client.read_flow_run(run_id)).state
                if st is not None and st.is_crashed():
                    crashed_s = now
            await asyncio.sleep(0.25)
        if None in (gpu_s, slot_s, crashed_s):
            raise RuntimeError(f"not freed within {timeout_s:.0f} s: GPU {gpu_s}, slot {slot_s}, crashed {crashed_s}")
        assert gpu_s is not None and slot_s is not None and crashed_s is not None
        log(f"  SIGKILL -> Crashed {crashed_s:.1f} s, GPU at 0 {gpu_s:.1f} s, slot free {slot_s:.1f} s")
        return {"crashed_s": crashed_s, "gpu0_s": gpu_s, "slot_free_s": slot_s}


@asynccontextmanager
async def crash_chain(api_url: str, deployments: list[str]) -> AsyncIterator[None]:
    """The crash chain as `coder-stack setup` installs it: the process pool, the crash automation and
    ``deployments`` from prefect.yaml (the clean-up's with its trigger), deployed against ``api_url``.

    On exit what it added goes and what was there before stays (a server given with --prefect-api keeps its
    own); an added deployment's unfinished runs are marked Crashed first, once no automation watches them, so
    no worker picks them up later."""
    await ensure_work_pools({POOL: "process"})
    added_automation = (await ensure_crash_automation(list(GPU_FLOWS))).startswith("created")
    flt = DeploymentFilter(name=DeploymentFilterName(any_=deployments))
    async with get_client() as client:
        had = {d.name for d in await client.read_deployments(deployment_filter=flt)}
    await asyncio.to_thread(deploy_all, PROJECT_DIR, 180, deployments, {"PREFECT_API_URL": api_url})
    try:
        yield
    finally:
        async with get_client() as client:
            for a in await client.read_automations():
                if (a.name == CRASH_AUTOMATION and added_automation) or any(
                    a.name.startswith(d) and d not in had for d in deployments
                ):
                    await client.delete_automation(a.id)
            for d in await client.read_deployments(deployment_filter=flt):
                if d.name in had:
                    continue
                runs = await client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id]))
                )
                for r in runs:
                    if r.state and not r.state.is_final():
                        await client.set_flow_run_state(r.id, Crashed(message="crash chain removed"), force=True)
                await client.delete_deployment(d.id)


def worker_env(env: dict[str, str]) -> dict[str, str]:
    """A process worker's environment: without the heartbeat setting, which its flow runs get from prefect.yaml."""
    out = dict(env)
    out.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
    return out


async def crash(time_scale: float, reps: int, log: Any, settle_s: float | None = None) -> dict[str, Any]:
    """``settle_s``: the deployed clean-up's wait after the mark (its ``settle_s`` parameter), if not production's
    CRASH_SETTLE_S — the tests' plumbing run shortens it; the figures of a real run keep the default."""
    time_scale = max(time_scale, MIN_TIME_SCALE)
    api_url = str(PREFECT_API_URL.value())
    async with crash_chain(api_url, [CLEANUP]):
        if settle_s is not None:
            async with get_client() as client:
                dep = await client.read_deployment_by_name(f"{CLEANUP_FLOW}/{CLEANUP}")
                await client.update_deployment(
                    dep.id, DeploymentUpdate(parameters={**(dep.parameters or {}), "settle_s": settle_s})
                )
        with tempfile.TemporaryDirectory(prefix="coder-bench-crash-") as tmp:
            env = _env(api_url, Path(tmp))
            worker = subprocess.Popen(  # noqa: ASYNC220 (returns at once)
                [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", POOL],
                cwd=PROJECT_DIR,
                env=worker_env(env),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                env.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
                kills = [await one_kill(time_scale, env, log) for _ in range(reps)]
            finally:
                stop_group(worker)
    med = {k: round(statistics.median(x[k] for x in kills), 1) for k in ("crashed_s", "gpu0_s", "slot_free_s")}
    return {
        "crash_kills": [{k: round(v, 1) for k, v in x.items()} for x in kills],
        "crash_gpu0_median_s": med["gpu0_s"],
        "crash_slot_free_median_s": med["slot_free_s"],
        "crash_crashed_median_s": med["crashed_s"],
        "crash_gpu0_max_s": round(max(x["gpu0_s"] for x in kills), 1),
        "crash_settle_s": CRASH_SETTLE_S if settle_s is None else settle_s,
    }
