"""The flows when their process is told to stop: SIGTERM (a pod eviction, `kill`, systemd) and a cancel from the
UI/API of a worker-run deployment (the process worker terminates the flow's process).

What users rely on: the flow's ``finally`` scales its GPU models down before the process exits, so a stopped
run never leaves a GPU billing. These tests start flow processes and a worker against the tier's shared
Prefect API; ``gpu_limit`` frees a slot one of them left held before the next test, so a failure here does
not leave a held ``tag:gpu`` slot for the other flow tests.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from simstack.stack import SimStack

from tests.conftest import is_ready, pods_of
from tests.kits.flowkit import (
    PREFECT_BIN,
    PROJECT,
    SERVING,
    SLOW_SCALE,
    assert_all_down,
    flow_process_env,
    latest_run_of,
    pod_names,
    scaled_up,
    start_flow_process,
    stop_group,
    until,
)

# Every test starts with ``tag:gpu`` = 1 slot and may leave none held (tests/flows/conftest.py).
pytestmark = pytest.mark.usefixtures("gpu_limit")


# ------------------------------------------------------------------ 7. SIGTERM
SUBPROCESS_FLOW = """
import asyncio, sys
from coder_stack.flows.params import Connection
from coder_stack.flows.validate import ValidateOptions, validate_coder_stack

options = ValidateOptions(stages=["chat"])
asyncio.run(validate_coder_stack(options=options, connection=Connection(kubeconfig=sys.argv[1])))
"""


async def test_sigterm_mid_cold_start_scales_the_gpu_down(
    make_sim: Callable[..., SimStack], prefect_api: str, tmp_path: Path
) -> None:
    sim = make_sim(gpu_pool="autoscaled", time_scale=SLOW_SCALE)
    proc, log = start_flow_process(SUBPROCESS_FLOW, sim, prefect_api, tmp_path)
    try:
        await until(lambda: scaled_up(sim, "coder-chat") or proc.poll() is not None, 60, "coder-chat scaled up")
        assert proc.poll() is None, log.read_text()[-3000:]
        await until(lambda: sim.call(pod_names, sim.store, SERVING, ["coder-chat"]), 10, "a coder-chat pod")
        ready = sim.call(lambda s: [is_ready(p) for p in pods_of(s, SERVING, "coder-chat")], sim.store)
        assert ready == [False], "the signal must land during the cold start"
        proc.send_signal(signal.SIGTERM)
        rc = await until(lambda: proc.poll() is not None and (proc.returncode,), 30, "the flow process to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    # The flow's SigtermGuard turns SIGTERM into a cancellation of the flow's task: the finally scales
    # everything down, the run is marked Cancelled, and Prefect gets its TerminationSignal (exit non-zero).
    # A bare SIGTERM carries no cancel intent for Prefect's engine, which turns a TerminationSignal into a
    # forced Crashed unless the run is already final: the run must still end Cancelled.
    assert rc[0] != 0, (rc, text[-3000:])
    assert "Clean-up:" in text, f"the flow's finally did not run on SIGTERM (exit {rc[0]}):\n{text[-3000:]}"
    assert_all_down(sim)  # the finally also waited until the pods were gone, before the process exited
    _, run_state = await latest_run_of("validate_coder_stack")
    assert run_state.is_cancelled(), (run_state, text[-3000:])


# ------------------------------------------------------------------ cancel from the API (worker-run)
WORKER_POOL = "flows-test-process"


async def test_api_cancel_of_a_worker_run_validate_scales_its_models_down(
    make_sim: Callable[..., SimStack], prefect_api: str, tmp_path: Path
) -> None:
    """Cancel from the UI/API, as in production: a process worker runs the deployment, sees the run Cancelling,
    and terminates the flow's process; the flow's finally scales the GPU model down first."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.states import Cancelling
    from prefect.workers.process import ProcessWorker

    sim = make_sim(gpu_pool="autoscaled", time_scale=SLOW_SCALE)
    async with get_client() as client:
        try:
            await client.read_work_pool(WORKER_POOL)
        except ObjectNotFound:
            await client.create_work_pool(
                WorkPoolCreate(
                    name=WORKER_POOL, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
                )
            )
        flow_id = await client.create_flow_from_name("validate_coder_stack")
        deployment_id = await client.create_deployment(
            flow_id=flow_id,
            name="cancel-probe",
            work_pool_name=WORKER_POOL,
            entrypoint="flows/validate.py:validate_coder_stack",
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT)}}],
        )
        run = await client.create_flow_run_from_deployment(
            deployment_id,
            parameters={"options": {"stages": ["chat"]}, "connection": {"kubeconfig": str(sim.kubeconfig_path)}},
        )
    log = tmp_path / "worker.log"
    env = flow_process_env(prefect_api, tmp_path) | {"PREFECT_WORKER_QUERY_SECONDS": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(PREFECT_BIN), "worker", "start", "--pool", WORKER_POOL, "--limit", "1", "--install-policy", "never"],
            cwd=PROJECT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        await until(lambda: scaled_up(sim, "coder-chat") or proc.poll() is not None, 90, "coder-chat scaled up")
        assert proc.poll() is None, log.read_text()[-3000:]
        async with get_client() as client:
            await client.set_flow_run_state(run.id, Cancelling(message="cancelled by test"), force=True)
            deadline = time.monotonic() + 60
            while not (state := (await client.read_flow_run(run.id)).state) or not state.is_final():
                assert time.monotonic() < deadline, (state, log.read_text()[-3000:])
                await asyncio.sleep(0.2)
    finally:
        stop_group(proc)
    text = log.read_text()
    assert state.is_cancelled(), (state, text[-3000:])
    assert "Clean-up:" in text, f"the flow's finally did not run on the worker's cancel:\n{text[-3000:]}"
    assert_all_down(sim, pods_timeout=10)
