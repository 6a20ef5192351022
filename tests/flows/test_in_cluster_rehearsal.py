"""The in-cluster rehearsal: the flows run as Kubernetes Jobs, picked up by a real ``prefect worker start --type
kubernetes``, inside the simulated cluster, under deployments/rbac.yaml (docs/IN_CLUSTER_REHEARSAL.md).

The simulated cluster runs the Job's pod as a local process of the checkout (the image's WORKDIR) with what a
real pod gets: ``KUBERNETES_SERVICE_HOST``/``PORT`` for the API server's TLS listener, a token of the pod's
ServiceAccount with the cluster's CA, and Service DNS names that resolve. The flows' stack file says
``access.mode: in-cluster``; the worker itself reaches the cluster through a kubeconfig (an admin token).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import prefect.logging
import pytest
import yaml
from kubernetes_asyncio import client as client_v1
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling
from simstack.apiserver.rbac import RBACAuthorizer
from simstack.stack import SimStack
from simstack.store import Store

from coder_stack.app.setup import ensure_stack_block, ensure_work_pools
from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.orchestration.stack_block import DEFAULT_STACK_BLOCK
from coder_stack.spec import AccessMode, AccessSpec, StackSpec
from tests.kits.flowkit import (
    PREFECT_BIN,
    PROJECT,
    SERVING,
    assert_no_gpu_model_running,
    flow_process_env,
    gpu_overlaps,
    scaled_up,
    until,
)
from tests.kits.incluster import load_rbac, rbac_docs

pytestmark = pytest.mark.usefixtures("gpu_limit")

POOL = "coder-stack-k8s"
NAMESPACE = "prefect"
SERVICE_ACCOUNT = "coder-stack-flows"
FLOWS_USER = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
# The image the project's Dockerfile builds (WORKDIR /opt/coder-stack); the sim runs it from this checkout.
IMAGE = "coder-stack:rehearsal"
ADMIN = "tok-worker-admin"
# Cold starts of a few seconds: the flow pod is a real Python process, the GPU model's start is simulated.
TIME_SCALE = 0.004


@pytest.fixture
def cluster() -> Iterator[SimStack]:
    sim = SimStack(
        time_scale=TIME_SCALE,
        gpu_pool="static",
        api_token=ADMIN,
        authorizer=lambda store: RBACAuthorizer(store, {}, superusers={ADMIN}),
        runnable_images={IMAGE: PROJECT},
    ).start()
    try:
        sim.call(load_rbac, sim.store, rbac_docs())
        yield sim
    finally:
        sim.stop()


def _jobs(store: Store, run_id: UUID) -> list[dict[str, Any]]:
    return store.list("jobs", NAMESPACE, label_selector=f"prefect.io/flow-run-id={run_id}")


def _job_complete(sim: SimStack, run_id: UUID) -> bool:
    return any(_complete(j) for j in sim.call(_jobs, sim.store, run_id))


def _complete(job: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Complete" and c["status"] == "True" for c in (job.get("status") or {}).get("conditions") or []
    )


async def _setup(spec: StackSpec) -> None:
    """What `coder-stack setup --stack FILE --image IMAGE` does for the in-cluster path (README, "In the
    cluster"): the CoderStackSpec block the in-cluster deployments name, and the Kubernetes pool with the image,
    namespace, ServiceAccount and pod watch timeout in its base job template."""
    async with get_client() as client:
        with contextlib.suppress(ObjectNotFound):  # another test's template would linger in the shared API
            await client.delete_work_pool(POOL)
    await ensure_stack_block(DEFAULT_STACK_BLOCK, spec)
    await ensure_work_pools({POOL: "kubernetes"}, image=IMAGE, image_given=True)
    async with get_client() as client:
        props = (await client.read_work_pool(POOL)).base_job_template["variables"]["properties"]
    assert (props["image"]["default"], props["namespace"]["default"]) == (IMAGE, NAMESPACE)
    assert props["service_account_name"]["default"] == SERVICE_ACCOUNT


def _deploy(prefect_api: str, tmp_path: Path, *names: str) -> None:
    """``prefect deploy`` of prefect.yaml's in-cluster deployments, as ``coder-stack setup`` runs it (their
    ``pull: []`` and the pool's job variables: image, namespace, ServiceAccount)."""
    env = flow_process_env(prefect_api, tmp_path) | {"CODER_STACK_IMAGE": IMAGE, "CODER_STACK_DIR": str(PROJECT)}
    args = [str(PREFECT_BIN), "--no-prompt", "deploy"]
    for name in names:
        args += ["--name", name]
    done = subprocess.run(args, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


async def _run_deployment(name: str, parameters: dict[str, Any], timeout: float) -> Any:
    """Run a deployment and wait until the run is final; the final flow run."""
    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
        # the code is in the image: no pull step, no path of the deployer's checkout
        assert deployment.pull_steps in (None, []) and deployment.path is None, (deployment.pull_steps, deployment.path)
        # the stack from the block the deployment names; image, namespace, ServiceAccount from the pool
        assert deployment.parameters["connection"] == {"stack_block": DEFAULT_STACK_BLOCK}, deployment.parameters
        run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        deadline = time.monotonic() + timeout
        while True:
            fr = await client.read_flow_run(run.id)
            if fr.state is not None and fr.state.is_final():
                return fr
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: run still {fr.state!r} after {timeout:.0f}s")
            await asyncio.sleep(0.5)


async def _pod_events(run_id: UUID) -> set[str]:
    """The observer's replicated pod events for a flow run (``prefect.kubernetes.pod.<phase>``)."""
    async with get_client() as client:
        flt = EventFilter(
            event=EventNameFilter(prefix=["prefect.kubernetes.pod."]),
            related=EventRelatedFilter(id=[f"prefect.flow-run.{run_id}"]),
        )
        resp = await client.request("POST", "/events/filter", json={"filter": flt.model_dump(mode="json")})
    return {e["event"] for e in resp.json()["events"]}


async def _log_messages(run_id: UUID) -> list[str]:
    async with get_client() as client:
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return [entry.message for entry in logs]


def _observer_logging(tmp_path: Path) -> Path:
    """Prefect's own logging configuration plus the observer's per-object logger (kopf's ``kopf.objects``) at
    DEBUG: the observer's verdict on each Job event (``Flow run <id> is in 'Cancelled', skipping``) is a
    DEBUG line, and the tests wait for that verdict instead of sleeping."""
    config = yaml.safe_load((Path(prefect.logging.__file__).parent / "logging.yml").read_text())
    config["loggers"]["kopf.objects"] = {"level": "DEBUG"}
    path = tmp_path / "worker-logging.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start_worker(sim: SimStack, prefect_api: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "worker.log"
    env = flow_process_env(prefect_api, tmp_path) | {
        "KUBECONFIG": str(sim.kubeconfig_path),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_CONFIG_PATH": str(_observer_logging(tmp_path)),
    }
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):  # the worker runs outside the cluster
        env.pop(name, None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(PREFECT_BIN), "worker", "start", "--type", "kubernetes", "--pool", POOL, "--install-policy", "never"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _pod_log(sim: SimStack, job: dict[str, Any]) -> str:
    def read(store: Store) -> str:
        out = []
        for pod in store.list("pods", NAMESPACE, label_selector=f"job-name={job['metadata']['name']}"):
            path = sim.cluster.kubelet.log_file(NAMESPACE, pod["metadata"]["name"], "prefect-job")  # type: ignore[union-attr]
            if path is not None and path.exists():
                out.append(path.read_text(errors="replace"))
        return "\n".join(out)

    result: str = sim.call(read, sim.store)
    return result


async def _assert_ran_as_a_job(sim: SimStack, run: Any, worker_log: Path) -> None:
    """The run Completed, its Job completed with one succeeded pod of the flows' ServiceAccount, its logs
    reached Prefect, and the worker's observer replicated the pod's phases as Prefect events."""
    jobs = sim.call(_jobs, sim.store, run.id)
    assert len(jobs) == 1, (run.name, jobs, worker_log.read_text(errors="replace")[-3000:])
    assert run.state.is_completed(), (run.state, _pod_log(sim, jobs[0])[-4000:])
    # the run is final once its engine reports it; the Job completes when the pod's process has exited
    await until(partial(_job_complete, sim, run.id), 30, f"the Job of {run.name} to complete")
    job = sim.call(_jobs, sim.store, run.id)[0]
    assert job["status"].get("succeeded") == 1 and not job["status"].get("failed"), job["status"]
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == SERVICE_ACCOUNT
    messages = await _log_messages(run.id)
    assert any("Finished in state Completed" in m for m in messages), messages[-20:]
    want = {f"prefect.kubernetes.pod.{phase}" for phase in ("pending", "running", "succeeded")}
    deadline = time.monotonic() + 30  # the server persists events in batches
    while not want <= (seen := await _pod_events(run.id)) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert want <= seen, seen


async def test_validate_and_teardown_run_as_kubernetes_jobs_under_the_role(
    cluster: SimStack, prefect_api: str, tmp_path: Path
) -> None:
    sim = cluster
    # The stack in Prefect (no file in the pod), access.mode in-cluster; no kubeconfig: the pod's ServiceAccount.
    await _setup(StackSpec(access=AccessSpec(mode=AccessMode.IN_CLUSTER)))
    await asyncio.to_thread(
        _deploy, prefect_api, tmp_path, "validate-coder-stack-in-cluster", "evening-teardown-in-cluster"
    )
    worker, worker_log = _start_worker(sim, prefect_api, tmp_path)
    try:
        validate = await _run_deployment(
            "validate_coder_stack/validate-coder-stack-in-cluster",
            {},  # the deployment's own parameters: the whole runbook (chat, then the swap to coder-fim)
            timeout=180,
        )
        down = await _run_deployment("teardown/evening-teardown-in-cluster", {}, timeout=90)
        for run in (validate, down):  # the worker (and its observer) keeps running until the pods are done
            await _assert_ran_as_a_job(sim, run, worker_log)
    finally:
        _stop(worker)
    # the flow's own log lines (its clean-up) were sent from the pod to Prefect, not only the engine's
    assert any(m.startswith("Clean-up:") for m in await _log_messages(validate.id))

    # nothing left on the GPU, never two models at once
    await assert_no_gpu_model_running(sim)
    assert not gpu_overlaps(sim)

    # the flows' calls were made as the pod's ServiceAccount, and every one was allowed by rbac.yaml
    audit = list(sim.api_server.audit)
    flows_calls = [a for a in audit if a[0] == FLOWS_USER]
    assert ("patch", "deployments/scale", SERVING) in {a[1:4] for a in flows_calls}, flows_calls[:20]
    assert [a for a in flows_calls if not a[5]] == []
    # the worker (kubeconfig, admin) created the Jobs; the flows never did
    assert ("system:admin", "create", "jobs", NAMESPACE) in {a[:4] for a in audit}
    assert not any(a[1:3] == ("create", "jobs") for a in flows_calls)

    # the Role is enforced, not bypassed: the same ServiceAccount's token is refused what rbac.yaml does not grant
    token = sim.service_account_tokens(NAMESPACE, SERVICE_ACCOUNT)[0]
    runtime = sim.cluster.runtime  # type: ignore[union-attr]
    assert runtime is not None
    tls_url = sim.api_server.tls_url
    async with httpx.AsyncClient(
        base_url=tls_url, verify=str(runtime.ca_file), headers={"Authorization": f"Bearer {token}"}
    ) as api:
        listed = await api.get(f"/api/v1/namespaces/{SERVING}/secrets")
        deleted = await api.delete(f"/apis/apps/v1/namespaces/{SERVING}/deployments/coder-chat")
        jobs = await api.get(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs")
    assert listed.status_code == 403, listed.text
    assert FLOWS_USER in listed.json()["message"]
    assert deleted.status_code == 403, deleted.text
    assert jobs.status_code == 403, jobs.text


async def test_a_cancelled_in_cluster_run_scales_its_model_down_from_inside_the_pod(
    cluster: SimStack, prefect_api: str, tmp_path: Path
) -> None:
    """Cancel from the UI/API. With Prefect 3.9 the flow-run executor in the pod sees the run Cancelling and
    stops its engine with SIGTERM; the flow's finally scales the GPU model down, the run ends Cancelled, the pod
    exits non-zero and the Job fails (backoffLimit 0); the worker deletes nothing and the observer leaves the
    Cancelled run alone."""
    sim = cluster
    await _setup(StackSpec(access=AccessSpec(mode=AccessMode.IN_CLUSTER)))
    await asyncio.to_thread(_deploy, prefect_api, tmp_path, "validate-coder-stack-in-cluster")
    worker, worker_log = _start_worker(sim, prefect_api, tmp_path)
    try:
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("validate_coder_stack/validate-coder-stack-in-cluster")
            assert deployment.path is None, deployment.path
            run = await client.create_flow_run_from_deployment(
                deployment.id,
                parameters={"options": {"stages": ["chat"]}},
            )
            await until(lambda: scaled_up(sim, "coder-chat"), 120, "coder-chat scaled up by the flow pod")
            await client.set_flow_run_state(run.id, Cancelling(message="cancelled by test"), force=True)
            deadline = time.monotonic() + 90
            while not (state := (await client.read_flow_run(run.id)).state) or not state.is_final():
                assert time.monotonic() < deadline, (state, worker_log.read_text(errors="replace")[-3000:])
                await asyncio.sleep(0.5)
        await until(partial(_job_failed, sim, run.id), 60, "the Job to end")
        # The observer's own verdict on the failed Job (its crash check, prefect_kubernetes.observer
        # `_mark_flow_run_as_crashed`): it read the run, found it Cancelled and left it alone. Had it found the
        # run unsettled, it would have proposed Crashed and logged "marking as crashed" instead.
        verdict = f"Flow run {run.id} is in 'Cancelled', skipping"
        await until(lambda: verdict in worker_log.read_text(errors="replace"), 60, "the observer's verdict on the Job")
        async with get_client() as client:
            after = (await client.read_flow_run(run.id)).state
    finally:
        _stop(worker)
    assert state.is_cancelled(), state
    assert after is not None and after.is_cancelled(), after  # not marked Crashed by the observer
    observer_log = worker_log.read_text(errors="replace")
    assert f"found for flow run {run.id}, marking as crashed" not in observer_log, observer_log[-3000:]
    await assert_no_gpu_model_running(sim, timeout=30)
    # the flow's finally ran in the pod before its process exited: `kubectl logs` of the Job's pod
    job = sim.call(_jobs, sim.store, run.id)[0]
    pod = sim.call(lambda s: s.list("pods", NAMESPACE, label_selector=f"job-name={job['metadata']['name']}"), sim.store)
    async with open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api:
        text = await client_v1.CoreV1Api(api).read_namespaced_pod_log(pod[0]["metadata"]["name"], NAMESPACE)
    cleanup = [line for line in text.splitlines() if "Clean-up:" in line]
    assert cleanup and "coder-chat scaled to 0" in cleanup[0], text[-3000:]
    assert pod[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] != 0
    assert not any(a[1:3] == ("delete", "jobs") for a in sim.api_server.audit)


def _job_failed(sim: SimStack, run_id: UUID) -> bool:
    return any(
        c["type"] == "Failed" and c["status"] == "True"
        for j in sim.call(_jobs, sim.store, run_id)
        for c in (j.get("status") or {}).get("conditions") or []
    )
