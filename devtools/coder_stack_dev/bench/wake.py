"""The wake scenario: from a request through the gateway for a reclaimed coder-chat to coder-chat Ready, with no
human action, through the whole chain as deployed.

Real pieces: the product's LiteLLM callback installed by `coder-stack wake-setup --apply` into the simulated gateway
(it reads the Deployment with the gateway pod's ServiceAccount and posts the event to this Prefect API), the Prefect
server's own trigger service (prefect.yaml's ``wake-model`` trigger, deployed with `prefect deploy`), a
``prefect worker start`` process on the process pool, and the ``wake_model`` flow run it starts. Each repetition is
a fresh simulated cluster whose coder-chat is at 0 (as reclaimed); the person's request is one chat call with the
master key.

What is timed (wall clock, real seconds, except the cold start):
- ``answer_ms``: the request until the person has the gateway's answer (the readable 503);
- ``to_run_s``: the request until the ``wake_model`` run exists (the callback's event, the trigger);
- ``to_running_s``: until it runs (the worker's poll, the flow process starting);
- ``to_scale_up_s``: until the flow scales coder-chat to 1 (its preflight and the GPU limit): **what the wake adds**
  to a cold start;
- ``cold_start_sim_s``: scale-up to Ready in simulated seconds (the simulated cold start, node to Ready), so
  request-to-Ready on a real cluster is about ``to_scale_up_s + cold_start_sim_s``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL
from simstack.stack import SimStack

from coder_stack.app.setup import PROJECT_DIR, DeploymentConnections, deploy_all, ensure_work_pools
from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.orchestration.gpu_limit import ensure_gpu_limit
from coder_stack.spec import StackSpec
from coder_stack.usecases import wake_setup
from coder_stack_dev.bench.crash import POOL, _env, worker_env
from coder_stack_dev.bench.simrec import SimRecorder
from coder_stack_dev.processes import stop_group

WAKE_DEPLOYMENT = "wake-model"


async def _wake_run(after: datetime) -> Any:
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["wake_model"])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=10,
        )
    return next((r for r in runs if r.created and r.created > after), None)


def _scaled_up_at(sim: SimStack, model: str, after: float) -> float | None:
    return next(
        (t for t, ns, name, n in sim.timeline if name == model and ns == "serving" and n >= 1 and t >= after), None
    )


async def one_wake(time_scale: float, kubeconfig: Path, log: Any, timeout_s: float = 300) -> dict[str, float]:
    """One reclaimed coder-chat, one request, timed until Ready; the wake run is waited for to its end."""
    with SimStack(time_scale=time_scale, gpu_pool="autoscaled", pod_api=True) as sim:
        rec = SimRecorder.attach(sim, 1)
        sim.write_kubeconfig(kubeconfig)  # where the deployed wake-model's connection looks
        async with open_api(ClusterTarget(kubeconfig=str(kubeconfig), context="coder-sim")) as api:
            await wake_setup.apply(api, StackSpec(), str(PREFECT_API_URL.value()), timeout_s=60, poll_s=0.05)
        after_wall = datetime.now(UTC) - timedelta(seconds=1)
        t0 = time.monotonic()
        wall0 = datetime.now(UTC)
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.post(
                f"{sim.gateway_url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {sim.secrets['master_key']}"},
                json={"model": "coder-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
            )
        answer_ms = (time.monotonic() - t0) * 1000
        if r.status_code != 503:
            raise RuntimeError(f"the gateway answered {r.status_code} for a reclaimed coder-chat: {r.text[:300]}")
        run = None
        ready = None
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            run = run or await _wake_run(after_wall)
            ready = rec.first_ready("coder-chat", after=t0)
            if run is not None and ready is not None:
                break
            await asyncio.sleep(0.2)
        if run is None or ready is None:
            raise RuntimeError(f"no wake within {timeout_s:.0f} s: run {run}, Ready {ready}")
        async with get_client() as client:
            while time.monotonic() < deadline:
                run = await client.read_flow_run(run.id)
                if run.state is not None and run.state.is_final():
                    break
                await asyncio.sleep(0.5)
        if run.state is None or not run.state.is_completed():
            raise RuntimeError(f"the wake run ended {run.state}")
        up = _scaled_up_at(sim, "coder-chat", t0)
        if up is None or run.start_time is None or run.created is None:
            raise RuntimeError("the wake's scale-up or the run's times were not recorded")
        out = {
            "answer_ms": answer_ms,
            "to_run_s": (run.created - wall0).total_seconds(),
            "to_running_s": (run.start_time - wall0).total_seconds(),
            "to_scale_up_s": up - t0,
            "cold_start_sim_s": (ready.mono - up) / time_scale,
        }
        log(
            "  request -> 503 {answer_ms:.0f} ms, run created {to_run_s:.1f} s, running {to_running_s:.1f} s, "
            "coder-chat scaled up {to_scale_up_s:.1f} s; cold start {cold_start_sim_s:.0f} simulated s".format(**out)
        )
        return out


async def wake(time_scale: float, reps: int, log: Any, worker_query_s: float | None = None) -> dict[str, Any]:
    """``reps`` wakes through one deployed chain; the worker polls every ``worker_query_s`` (Prefect's default, 10 s,
    when None)."""
    api_url = str(PREFECT_API_URL.value())
    await ensure_gpu_limit(1)
    await ensure_work_pools({POOL: "process"})
    with tempfile.TemporaryDirectory(prefix="coder-bench-wake-") as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        conns = DeploymentConnections(process={"kubeconfig": str(kubeconfig)}, in_cluster={}, says="the bench's sim")
        await asyncio.to_thread(deploy_all, PROJECT_DIR, 180, [WAKE_DEPLOYMENT], {"PREFECT_API_URL": api_url}, conns)
        env = worker_env(_env(api_url, Path(tmp) / "home"))
        if worker_query_s is not None:
            env["PREFECT_WORKER_QUERY_SECONDS"] = str(worker_query_s)
        worker = subprocess.Popen(  # noqa: ASYNC220 (returns at once)
            [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", POOL],
            cwd=PROJECT_DIR,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wakes = [await one_wake(time_scale, kubeconfig, log) for _ in range(reps)]
        finally:
            stop_group(worker)
    keys = ("answer_ms", "to_run_s", "to_running_s", "to_scale_up_s", "cold_start_sim_s")
    med = {k: statistics.median(w[k] for w in wakes) for k in keys}
    return {
        "wakes": [{k: round(v, 2) for k, v in w.items()} for w in wakes],
        "wake_worker_query_s": worker_query_s if worker_query_s is not None else 10.0,
        **{f"wake_{k}_median": round(v, 2) for k, v in med.items()},
        "wake_request_to_ready_real_s_estimate": round(med["to_scale_up_s"] + med["cold_start_sim_s"], 1),
        "wake_added_max_s": round(max(w["to_scale_up_s"] for w in wakes), 2),
        "wake_env": {k: os.environ.get(k) for k in ("PREFECT_WORKER_QUERY_SECONDS",) if os.environ.get(k)},
    }
