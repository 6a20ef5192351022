"""Flows and tasks that exist only for the benchmark.

- :func:`bench_bringup`: scale one model to 1 and wait until it is Ready, with our wait task or a peer
  (the naive "fail and retry every 30 s" task, or ``kubectl rollout status``). Returns when the wait
  returned, on this process's monotonic clock (the simulated cluster's listener uses the same clock).
- :func:`sequential_runbook`: validate_coder_stack's chat + FIM stages done strictly one step at a time.
- :func:`gpu_session_run`: one GPU session for one model (hold ``tag:gpu``, scale up, wait Ready, scale
  down, wait gone), for the scale scenario where several GPUs may serve several models at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from coder_stack.errors import PodNotReady, WaitTimeout
from coder_stack.flows.gpu_steps import release
from coder_stack.flows.params import Connection
from coder_stack.flows.record import record_ready, record_smoke, spend_lines
from coder_stack.flows.run import Run
from coder_stack.flows.validate import Stage
from coder_stack.kubernetes.client import ClusterTarget, cluster_session, open_api
from coder_stack.kubernetes.workloads import deployment_status
from coder_stack.orchestration.gpu import gpu_session
from coder_stack.report import RunReport
from coder_stack.spec import ModelSpec
from coder_stack.tasks.cluster import (
    preflight_task,
    progress_written,
    scale_task,
    wait_frontend_ready_task,
    wait_model_ready_task,
)
from coder_stack.tasks.gateway import ensure_keys_task, gateway_ready_task, read_spend_task
from coder_stack.tasks.smoke import smoke_direct_task, smoke_frontends_task, smoke_gateway_task


# ------------------------------------------------------------------ peers of wait_model_ready_task
@task(name="naive-ready-check", cache_policy=NO_CACHE)
async def naive_ready_check(target: ClusterTarget, namespace: str, name: str) -> int:
    """Check readiness once and raise if not Ready: "retries absorb the cold start"."""
    async with open_api(target) as api:
        st = await deployment_status(api, namespace, name)
    if not st.ready:
        raise PodNotReady(f"{namespace}/{name}: {st.ready_replicas}/{st.replicas} ready")
    return st.ready_replicas


@task(name="kubectl-rollout-status", cache_policy=NO_CACHE)
async def kubectl_rollout_status(kubeconfig: str, namespace: str, name: str, timeout_s: float) -> str:
    """`kubectl rollout status deploy/<name>` (a watch-based peer).

    A cold start longer than the Deployment's progressDeadlineSeconds (600 s by default; coder-chat's is
    ~670 s) makes it exit with "exceeded its progress deadline" while the pod is still coming up; then,
    as an operator would, wait with `kubectl wait --for=condition=Available` (also a watch).
    Returns "rollout status" or "rollout status, then wait" (which path was taken).
    """
    base = ["kubectl", "--kubeconfig", kubeconfig, "-n", namespace]
    _out, err, code = await _run(*base, "rollout", "status", f"deploy/{name}", f"--timeout={int(timeout_s)}s")
    if code == 0:
        return "rollout status"
    if "progress deadline" not in err:
        raise WaitTimeout(f"kubectl rollout status failed: {err[-300:]}", phase="ready", elapsed_s=timeout_s)
    _out, err, code = await _run(
        *base, "wait", "--for=condition=Available", f"deploy/{name}", f"--timeout={int(timeout_s)}s"
    )
    if code != 0:
        raise WaitTimeout(f"kubectl wait failed: {err[-300:]}", phase="ready", elapsed_s=timeout_s)
    return "rollout status, then wait"


async def _run(*cmd: str) -> tuple[str, str, int]:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return out.decode(), err.decode(), int(proc.returncode or 0)


@flow(name="bench-bringup", log_prints=False)
async def bench_bringup(
    connection: Connection, model: str, peer: str = "ours", time_scale: float = 0.01
) -> dict[str, Any]:
    """Scale ``model`` to 1, wait until Ready with ``peer``; monotonic times of each step."""
    spec, target = await connection.resolve()
    async with cluster_session(target):
        m = spec.model(model)
        t_start = time.monotonic()
        await scale_task(target, spec, m, 1)
        t_scaled = time.monotonic()
        out: dict[str, Any] = {"peer": peer, "model": m.name}
        if peer == "ours":
            rep = await wait_model_ready_task(target, spec, m)
            out["ready_report"] = rep.model_dump(mode="json")
        elif peer == "naive":
            delay = 30.0 * time_scale
            retries = int(m.budgets.total / 30.0) + 2
            await naive_ready_check.with_options(retries=retries, retry_delay_seconds=delay)(
                target, spec.serving_namespace, m.name
            )
        elif peer == "kubectl":
            assert connection.kubeconfig is not None
            out["kubectl_path"] = await kubectl_rollout_status(
                connection.kubeconfig, spec.serving_namespace, m.name, m.budgets.total * time_scale + 30
            )
        else:
            raise ValueError(f"unknown peer {peer!r}")
        t_done = time.monotonic()
        await progress_written()  # the final progress write, off the timed path, lands before the run ends (as guarded)
        out.update(t_start=t_start, t_scaled=t_scaled, t_done=t_done)
        return out


# ------------------------------------------------------------------ the runbook without overlap
@flow(name="bench-sequential-runbook", log_prints=False)
async def sequential_runbook(connection: Connection) -> RunReport:
    """validate_coder_stack (chat, FIM) with every step after the previous one: no overlap at all."""
    spec, target = await connection.resolve()
    async with cluster_session(target):
        run = Run(target, spec, RunReport(flow="sequential_runbook"))
        report = run.report
        frontends = [f.name for f in spec.frontends]
        key_aliases = [k.alias for k in spec.virtual_keys if k.deliver_to != "keystore"]
        stages = [(Stage.CHAT, spec.model("coder-chat")), (Stage.FIM, spec.model("coder-fim"))]
        await preflight_task(target, spec, [m.name for _, m in stages])
        await gateway_ready_task(target, spec)
        started: list[ModelSpec] = []
        async with gpu_session(spec.timeouts.gpu_limit_s):
            await preflight_task(target, spec, [])
            try:
                await ensure_keys_task(target, spec, key_aliases)
                for f in spec.frontends:
                    await scale_task(target, spec, f, 1)
                    await wait_frontend_ready_task(target, spec, f)
                for i, (stage, model) in enumerate(stages):
                    if i > 0:
                        await release(target, spec, [started.pop()], [])
                    started.append(model)
                    await scale_task(target, spec, model, 1)
                    ready = await wait_model_ready_task(target, spec, model)
                    record_ready(report.section(model.name), ready)
                    await _smokes_one_by_one(run, stage, model)
                rows = await read_spend_task(
                    target, spec, [k.alias for k in spec.virtual_keys], called=["open-webui", "tabby"]
                )
                report.spend = spend_lines(rows)
            finally:
                await release(target, spec, started, frontends)
        report.finish("passed")  # a failed smoke raised above
        return report


async def _smokes_one_by_one(run: Run, stage: Stage, model: ModelSpec) -> None:
    """validate's smokes of a chat or FIM stage (the pod, the gateway with the client's key, the client), each
    after the previous one (validate runs the last two at once)."""
    target, spec = run.target, run.spec
    chat = stage is Stage.CHAT
    key = spec.key_delivered_to("openwebui-secrets" if chat else "tabby-config")
    section = run.report.section(model.name)
    record_smoke(section, await smoke_direct_task(target, spec, model), "direct (pod, vLLM key)")
    res = await smoke_gateway_task(target, spec, model, key_alias=key.alias if key else None)
    record_smoke(section, res.smoke, "gateway")
    record_smoke(section, await smoke_frontends_task(target, spec, openwebui=chat, tabby=not chat), "client")


# ------------------------------------------------------------------ one GPU session (scale scenario)
@flow(name="bench-gpu-session", log_prints=False)
async def gpu_session_run(connection: Connection, model: str) -> dict[str, float]:
    """Hold one GPU slot: scale ``model`` up, wait Ready, scale it down, wait until its pod is gone."""
    spec, target = await connection.resolve()
    async with cluster_session(target):
        m = spec.model(model)
        t_ask = time.monotonic()
        async with gpu_session(spec.timeouts.gpu_limit_s):
            t_got = time.monotonic()
            try:
                await scale_task(target, spec, m, 1)
                await wait_model_ready_task(target, spec, m, progress=False)
            finally:
                await release(target, spec, [m], [])
            t_end = time.monotonic()
        return {"t_ask": t_ask, "t_got": t_got, "t_end": t_end}
