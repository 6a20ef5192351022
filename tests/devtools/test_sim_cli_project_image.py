"""`coder-stack sim --project-image IMAGE`: what a user rehearsing the README's in-cluster steps against the sim
gets. A Job's pod of IMAGE runs this checkout (its command a local process in the checkout, reaching the API as
its ServiceAccount); a Job's pod of an image the sim cannot run sits in ImagePullBackOff, as on a real cluster,
with the hint to start the sim with that option, instead of showing Running while nothing runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client import ApiClient

from coder_stack.kubernetes.client import ClusterTarget, open_api
from tests.kits.flowkit import PROJECT
from tests.kits.incluster import apply_rbac

CLI = Path(sys.executable).with_name("coder-stack")
PROJECT_IMAGE = "coder-stack:sim-cli"
OTHER_IMAGE = "coder-stack:not-built"
NS, SA = "prefect", "coder-stack-flows"

IN_POD = """
    import asyncio, os, coder_stack
    from kubernetes_asyncio import client, config
    print("cwd", os.getcwd())
    print("package", os.path.dirname(os.path.dirname(os.path.abspath(coder_stack.__file__))))
    async def main():
        config.load_incluster_config()
        async with client.ApiClient() as api:
            deps = await client.AppsV1Api(api).list_namespaced_deployment("serving")
            print("deployments", len(deps.items))
    asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def cli_sim(kubeconfig: Path, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``coder-stack sim`` as a user starts it, until its ``ready:`` line; SIGTERM at the end (exit 0)."""
    proc = await asyncio.create_subprocess_exec(
        str(CLI),
        "sim",
        "--kubeconfig",
        str(kubeconfig),
        "--time-scale",
        "0.01",
        "--gpu-pool",
        "static",
        "--exit-after",
        "300",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
            assert line, "coder-stack sim ended before it was ready:\n" + "".join(seen)
            seen.append(line)
            if line.startswith("ready:"):
                break
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, "".join(seen) + rest[0].decode()
    assert any(f"pods of image {PROJECT_IMAGE} run {PROJECT}" in ln for ln in seen), seen


def job(name: str, image: str, script: str) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": SA,
                    "containers": [{"name": "main", "image": image, "args": ["python", "-c", textwrap.dedent(script)]}],
                }
            },
        },
    }


async def until_complete(api: ApiClient, name: str) -> client.V1Job:
    batch = client.BatchV1Api(api)
    async with watch.Watch().stream(batch.list_namespaced_job, NS, timeout_seconds=120) as stream:
        async for ev in stream:
            j = ev["object"]
            conds = {c.type for c in j.status.conditions or [] if c.status == "True"} if j.status else set()
            if j.metadata.name == name and conds & {"Complete", "Failed"}:
                return j
    raise AssertionError(f"Job {name} did not finish")


async def until_event(api: ApiClient, pod_prefix: str, message_start: str) -> client.CoreV1Event:
    core = client.CoreV1Api(api)
    async with watch.Watch().stream(core.list_namespaced_event, NS, timeout_seconds=60) as stream:
        async for ev in stream:
            e = ev["object"]
            if e.involved_object.name.startswith(pod_prefix) and e.message.startswith(message_start):
                return e
    raise AssertionError(f"no event {message_start!r} for {pod_prefix}")


async def test_coder_stack_sim_runs_the_project_image_and_backs_off_an_image_it_cannot_run(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "sim.kubeconfig"
    sim = cli_sim(kubeconfig, "--project-image", PROJECT_IMAGE)
    async with sim, open_api(ClusterTarget(kubeconfig=str(kubeconfig))) as api:
        await apply_rbac(api)  # README step 2
        batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
        await batch.create_namespaced_job(NS, job("flows", PROJECT_IMAGE, IN_POD))  # type: ignore[arg-type]
        await batch.create_namespaced_job(NS, job("typo", OTHER_IMAGE, "print('never')"))  # type: ignore[arg-type]

        done = await until_complete(api, "flows")
        pod = (await core.list_namespaced_pod(NS, label_selector="job-name=flows")).items[0]
        log = await core.read_namespaced_pod_log(pod.metadata.name, NS)
        pull_error = await until_event(api, "typo-", f'Failed to pull image "{OTHER_IMAGE}"')
        typo = (await core.list_namespaced_pod(NS, label_selector="job-name=typo")).items[0]
        typo_job = await batch.read_namespaced_job("typo", NS)

    assert done.status.succeeded == 1, done.status
    assert f"cwd {PROJECT}\n" in log and f"package {PROJECT}\n" in log, log
    assert "deployments 3" in log, log  # the API as the pod's ServiceAccount, over the cluster's TLS listener
    assert pull_error.type == "Warning"
    assert f"`coder-stack sim --project-image {OTHER_IMAGE}`" in pull_error.message, pull_error.message
    assert typo.status.phase == "Pending"
    state = typo.status.container_statuses[0].state
    assert state.running is None and state.terminated is None and state.waiting is not None
    assert state.waiting.reason in ("ErrImagePull", "ImagePullBackOff"), state.waiting
    assert typo_job.status.active == 1 and not typo_job.status.succeeded and not typo_job.status.failed


def test_coder_stack_sim_refuses_a_stand_ins_image_as_the_project_image(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run(
        [str(CLI), "sim", "--kubeconfig", str(tmp_path / "k"), "--project-image", "vllm/vllm-openai:v0.32.0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=os.environ.copy(),
    )
    assert done.returncode == 1 and "is a stand-in's image" in done.stderr, done.stderr
    assert not (tmp_path / "k").exists()
