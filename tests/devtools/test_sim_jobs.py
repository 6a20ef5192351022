"""batch/v1 Jobs in the simulated cluster, and pods of runnable images run as local processes.

What the in-cluster rehearsal relies on (tests/flows/test_in_cluster.py): a Job's pod carries the labels and
owner the real Job controller gives it, its container runs as a process with what a real pod gets (the API
over TLS as its ServiceAccount, authorised by the store's RBAC; Service DNS names), its output is the
container's log, its exit code becomes the pod's and the Job's status, back-off and ``backoffLimit`` are
honoured, and deleting the Job (or stopping the sim) stops the process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from simstack.apiserver.rbac import RBACAuthorizer
from simstack.stack import SimStack
from simstack.store import Store

from coder_stack.kubernetes.client import ClusterTarget, open_api
from tests.conftest import events_of, record, wait_for

IMAGE = "example/runnable:1"
ADMIN = "tok-admin"
NS = "jobs"
SA = "runner"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "workdir"
    d.mkdir()
    return d


@pytest.fixture
def rsim(workdir: Path) -> Iterator[SimStack]:
    """A sim with RBAC (admin kubeconfig) where ``example/runnable:1`` runs from ``workdir``; namespace ``jobs``
    with ServiceAccount ``runner`` allowed to list pods there and nothing else."""
    sim = SimStack(
        time_scale=0.01,
        gpu_pool="static",
        api_token=ADMIN,
        authorizer=lambda store: RBACAuthorizer(store, {}, superusers={ADMIN}),
        runnable_images={IMAGE: workdir},
    ).start()

    def setup(store: Store) -> None:
        store.create("namespaces", {"metadata": {"name": NS}})
        store.create("serviceaccounts", {"metadata": {"name": SA, "namespace": NS}})
        rule = {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}
        store.create("roles", {"metadata": {"name": "r", "namespace": NS}, "rules": [rule]})
        store.create(
            "rolebindings",
            {
                "metadata": {"name": "r", "namespace": NS},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
                "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": NS}],
            },
        )

    sim.call(setup, sim.store)
    try:
        yield sim
    finally:
        sim.stop()


def job_manifest(script: str, name: str = "j", **spec: Any) -> dict[str, Any]:
    pod_spec = {
        "restartPolicy": "Never",
        "serviceAccountName": SA,
        "containers": [{"name": "main", "image": IMAGE, "args": ["python", "-c", textwrap.dedent(script)]}],
    }
    pod_spec |= spec.pop("pod", {})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app": "demo"}},
        "spec": {"backoffLimit": 0, "template": {"spec": pod_spec}, **spec},
    }


async def create_job(api: ApiClient, manifest: dict[str, Any]) -> client.V1Job:
    """POST the manifest as it is (a dict, as the Prefect worker sends it)."""
    return await client.BatchV1Api(api).create_namespaced_job(NS, manifest)  # type: ignore[arg-type]


def target(sim: SimStack) -> ClusterTarget:
    return ClusterTarget(kubeconfig=str(sim.kubeconfig_path))


def finished(store: Store, name: str = "j") -> dict[str, Any] | None:
    job = store.find("jobs", NS, name)
    conds = {c["type"] for c in (job or {}).get("status", {}).get("conditions") or [] if c["status"] == "True"}
    return job if conds & {"Complete", "Failed"} else None


def job_pods(store: Store, name: str = "j") -> list[dict[str, Any]]:
    return store.list("pods", NS, label_selector=f"job-name={name}")


IN_POD = """
    import asyncio, os, socket, httpx
    from kubernetes_asyncio import client, config
    print("api", os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"], "cwd", os.getcwd())
    async def main():
        config.load_incluster_config()
        async with client.ApiClient() as api:
            core = client.CoreV1Api(api)
            pods = await core.list_namespaced_pod("jobs")
            print("pods", len(pods.items))
            try:
                await core.list_namespaced_secret("jobs")
            except client.ApiException as e:
                print("secrets", e.status)
        async with httpx.AsyncClient() as http:
            r = await http.get("http://litellm.litellm.svc.cluster.local:4000/health/liveliness")
            print("gateway", r.status_code)
        print("address", socket.getaddrinfo("litellm.litellm", 4000)[0][4][0])
    asyncio.run(main())
"""


async def test_a_job_runs_its_pod_as_a_process_with_a_pods_api_access_and_dns(rsim: SimStack, workdir: Path) -> None:
    sim = rsim
    async with open_api(target(sim)) as api:
        created = await create_job(api, job_manifest(IN_POD))
        job = await asyncio.to_thread(wait_for, sim, finished, 60, "the Job to finish")
        pods = sim.call(job_pods, sim.store)
        assert len(pods) == 1
        pod = pods[0]
        log = await client.CoreV1Api(api).read_namespaced_pod_log(pod["metadata"]["name"], NS)
    uid = created.metadata.uid
    # the Job registry's selector and template labels, the controller's pod labels and owner
    assert created.spec.selector.match_labels == {"batch.kubernetes.io/controller-uid": uid}
    labels = pod["metadata"]["labels"]
    assert labels["job-name"] == labels["batch.kubernetes.io/job-name"] == "j"
    assert labels["controller-uid"] == labels["batch.kubernetes.io/controller-uid"] == uid
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("Job", "j", uid, True)
    # the process's output, exit code and the statuses that follow from it
    assert f"cwd {workdir}" in log, log
    assert "pods 1" in log and "secrets 403" in log and "gateway 200" in log, log
    assert "address 127.96." in log, log
    assert pod["status"]["phase"] == "Succeeded"
    state = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (state["exitCode"], state["reason"]) == (0, "Completed")
    status = job["status"]
    assert status["succeeded"] == 1 and "failed" not in status and "active" not in status
    assert [c["type"] for c in status["conditions"]] == ["SuccessCriteriaMet", "Complete"]
    assert status["startTime"] and status["completionTime"]
    reasons = [e["reason"] for e in sim.call(events_of, sim.store, NS, "j")]
    assert reasons == ["SuccessfulCreate", "Completed"], reasons
    # the pod's calls were made as its ServiceAccount; the token never appears in the log
    user = f"system:serviceaccount:{NS}:{SA}"
    calls = [(a[1], a[2], a[5]) for a in sim.api_server.audit if a[0] == user]
    assert calls == [("list", "pods", True), ("list", "secrets", False)], calls
    token = sim.service_account_tokens(NS, SA)[0]
    assert token not in log


async def test_a_failing_pod_is_replaced_until_the_backoff_limit_then_the_job_fails(rsim: SimStack) -> None:
    sim = rsim
    script = "import sys; print('boom'); sys.exit(3)"
    async with open_api(target(sim)) as api:
        await create_job(api, job_manifest(script, backoffLimit=1))
        job = await asyncio.to_thread(wait_for, sim, finished, 60, "the Job to fail")
        pods = sim.call(job_pods, sim.store)
        logs = [await client.CoreV1Api(api).read_namespaced_pod_log(p["metadata"]["name"], NS) for p in pods]
    assert len(pods) == 2
    for p in pods:
        assert p["status"]["phase"] == "Failed"
        term = p["status"]["containerStatuses"][0]["state"]["terminated"]
        assert (term["exitCode"], term["reason"]) == (3, "Error")
    assert logs == ["boom\n", "boom\n"]
    status = job["status"]
    assert status["failed"] == 2 and "succeeded" not in status
    failed = [c for c in status["conditions"] if c["type"] == "Failed"]
    assert failed and failed[0]["reason"] == "BackoffLimitExceeded"
    reasons = [e["reason"] for e in sim.call(events_of, sim.store, NS, "j")]
    assert reasons.count("SuccessfulCreate") == 2 and "BackoffLimitExceeded" in reasons


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return False


def _pid(workdir: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with_pid = workdir / "pid"
        if with_pid.exists() and with_pid.read_text().strip():
            return int(with_pid.read_text())
        time.sleep(0.05)
    raise TimeoutError("the pod's process never started")


STUBBORN = """
    import os, signal, time
    signal.signal(signal.SIGTERM, lambda *a: print("SIGTERM ignored", flush=True))
    open("pid.tmp", "w").write(str(os.getpid())); os.replace("pid.tmp", "pid")
    while True:
        time.sleep(0.1)
"""


async def test_deleting_the_job_terminates_its_process_sigkill_after_the_grace_period(
    rsim: SimStack, workdir: Path
) -> None:
    sim = rsim
    manifest = job_manifest(STUBBORN, pod={"terminationGracePeriodSeconds": 1})
    async with open_api(target(sim)) as api:
        batch = client.BatchV1Api(api)
        await create_job(api, manifest)
        pid = await asyncio.to_thread(_pid, workdir)
        pod = sim.call(job_pods, sim.store)[0]
        assert pod["status"]["phase"] == "Running" and _alive(pid)
        log = await client.CoreV1Api(api).read_namespaced_pod_log(pod["metadata"]["name"], NS)
        assert log == ""
        t0 = time.monotonic()
        # what the Kubernetes worker's kill_infrastructure sends
        await batch.delete_namespaced_job("j", NS, grace_period_seconds=30, propagation_policy="Foreground")
        await asyncio.to_thread(wait_for, sim, lambda s: not job_pods(s), 20, "the pod to be gone")
    took = time.monotonic() - t0
    assert not _alive(pid)
    # SIGTERM ignored, SIGKILL after the pod's 1 s grace: not before it, and not after the delete's 30 s grace
    assert 0.8 < took < 30, took


# a container whose process starts another in a session of its own (as Prefect's executor starts its engine)
WITH_GRANDCHILD = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    open("child", "w").write(str(child.pid))
""") + textwrap.dedent(STUBBORN)


async def test_stopping_the_sim_kills_the_pod_processes(make_sim: Callable[..., SimStack], workdir: Path) -> None:
    sim = make_sim(runnable_images={IMAGE: workdir}, time_scale=0.01)

    def create(store: Store) -> None:
        store.create("namespaces", {"metadata": {"name": NS}})
        manifest = job_manifest(WITH_GRANDCHILD)
        manifest["spec"]["template"]["spec"]["serviceAccountName"] = "default"
        store.create("jobs", {k: v for k, v in manifest.items() if k not in ("apiVersion", "kind")}, NS)

    sim.call(create, sim.store)
    pid = await asyncio.to_thread(_pid, workdir)
    child = int((workdir / "child").read_text())
    assert _alive(child)
    await asyncio.to_thread(sim.stop)
    assert not _alive(pid)
    await asyncio.sleep(0.2)  # SIGKILL is asynchronous; the reaper is init
    assert not _alive(child) or _zombie(child)


async def test_follow_streams_the_log_until_the_container_exits(rsim: SimStack) -> None:
    sim = rsim
    script = """
        import time
        for i in range(5):
            print("line", i, flush=True)
            time.sleep(0.2)
    """
    async with open_api(target(sim)) as api:
        await create_job(api, job_manifest(script))
        running = await asyncio.to_thread(
            wait_for,
            sim,
            lambda s: next((p for p in job_pods(s) if p["status"].get("phase") == "Running"), None),
            30,
            "a Running pod",
        )
        resp: Any = await client.CoreV1Api(api).read_namespaced_pod_log(
            running["metadata"]["name"], NS, follow=True, _preload_content=False
        )  # an aiohttp response: the stream as it comes
        body = (await asyncio.wait_for(resp.read(), 30)).decode()
        resp.release()
        tail = await client.CoreV1Api(api).read_namespaced_pod_log(running["metadata"]["name"], NS, tail_lines=2)
    assert body == "".join(f"line {i}\n" for i in range(5)), body
    assert tail == "line 3\nline 4\n"


async def test_a_missing_service_account_is_a_failed_create_and_no_pod(rsim: SimStack) -> None:
    sim = rsim
    manifest = job_manifest("print('never')", pod={"serviceAccountName": "nobody"})
    async with open_api(target(sim)) as api:
        await create_job(api, manifest)
    ev = await asyncio.to_thread(
        wait_for,
        sim,
        lambda s: [e for e in events_of(s, NS, "j") if e["reason"] == "FailedCreate"],
        10,
        "FailedCreate",
    )
    assert 'serviceaccount "nobody" not found' in ev[0]["message"]
    assert ev[0]["type"] == "Warning"
    assert sim.call(job_pods, sim.store) == []


async def test_ttl_after_finished_deletes_the_job_and_its_pod(rsim: SimStack) -> None:
    sim = rsim
    async with open_api(target(sim)) as api:
        # 100 s at this sim's time scale (0.01) is 1 s: long enough for the wait below to see the finished Job before
        # the TTL deletes it (1 s, 10 ms here, was missed on a loaded CI machine and the wait ran out)
        await create_job(api, job_manifest("print('done')", ttlSecondsAfterFinished=100))
    await asyncio.to_thread(wait_for, sim, lambda s: s.find("jobs", NS, "j") is not None and finished(s), 30, "done")
    await asyncio.to_thread(
        wait_for, sim, lambda s: s.find("jobs", NS, "j") is None and not job_pods(s), 30, "the Job and pod gone"
    )


async def test_a_job_needs_restart_policy_never_or_on_failure(rsim: SimStack) -> None:
    async with open_api(target(rsim)) as api:
        with pytest.raises(client.ApiException) as info:
            await create_job(api, job_manifest("print()", pod={"restartPolicy": "Always"}))
    assert info.value.status == 422
    assert "spec.template.spec.restartPolicy" in str(info.value.body)


def test_the_pod_shim_only_touches_what_the_sim_maps() -> None:
    """Without the emulation's variables the sitecustomize changes nothing (it is loaded by pods only)."""
    shim = Path(__file__).resolve().parents[2] / "devtools" / "simstack" / "podshim"

    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMSTACK_")} | {"PYTHONPATH": str(shim)}
    code = "import socket, sitecustomize; print(socket.getaddrinfo is sitecustomize._real_getaddrinfo)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out.stderr


async def test_a_command_not_on_the_images_path_is_a_start_error(rsim: SimStack) -> None:
    sim = rsim
    manifest = job_manifest("")
    manifest["spec"]["template"]["spec"]["containers"][0]["args"] = ["no-such-program", "--flag"]
    async with open_api(target(sim)) as api:
        await create_job(api, manifest)
    await asyncio.to_thread(wait_for, sim, finished, 30, "the Job to fail")
    pod = sim.call(job_pods, sim.store)[0]
    assert pod["status"]["phase"] == "Failed"
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (128, "StartError")
    assert 'exec: "no-such-program": executable file not found in $PATH' in term["message"]


UNKNOWN = "example/not-runnable:1"


async def test_an_image_the_sim_cannot_run_is_an_image_pull_back_off_with_the_hint_and_never_runs(
    rsim: SimStack,
) -> None:
    """An image that is neither a stand-in's nor a runnable one: its pull fails as on a cluster whose registry does
    not have it (ErrImagePull, then ImagePullBackOff with back-off, the pod Pending, the Job active), and what the
    user reads names the option that runs it. The stand-ins' images and the runnable one are still run."""
    sim = rsim
    pods_seen = record(sim, "pods")
    manifest = job_manifest("print('never')")
    manifest["spec"]["template"]["spec"]["containers"][0]["image"] = UNKNOWN
    async with open_api(target(sim)) as api:
        await create_job(api, manifest)

    def pod_events(store: Store) -> list[dict[str, Any]]:
        pods = job_pods(store)
        return events_of(store, NS, pods[0]["metadata"]["name"]) if pods else []

    def backed_off_twice(store: Store) -> list[dict[str, Any]] | None:
        evs = pod_events(store)
        again = [e for e in evs if e["message"] == "Error: ImagePullBackOff" and int(e.get("count") or 1) >= 2]
        return evs if again else None

    evs = await asyncio.to_thread(wait_for, sim, backed_off_twice, 30, "a second ImagePullBackOff")
    pod = sim.call(job_pods, sim.store)[0]
    name = pod["metadata"]["name"]
    hint = f"`coder-stack sim --project-image {UNKNOWN}`"

    # the events a kubelet writes for a pull that fails, in order, the pull error carrying the hint
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for e in evs:
        first.setdefault((e["reason"], e["message"].split(": ")[0]), e)
    keys = list(first)
    pulling = keys.index(("Pulling", f'Pulling image "{UNKNOWN}"'))
    failed_pull = keys.index(("Failed", f'Failed to pull image "{UNKNOWN}"'))
    err_pull = keys.index(("Failed", "Error"))
    back_off = keys.index(("BackOff", f'Back-off pulling image "{UNKNOWN}"'))
    assert pulling < failed_pull < err_pull < back_off, keys
    messages = [e["message"] for e in evs if e["reason"] == "Failed"]
    assert "Error: ErrImagePull" in messages and "Error: ImagePullBackOff" in messages, messages
    pull_error = first[("Failed", f'Failed to pull image "{UNKNOWN}"')]
    assert pull_error["type"] == "Warning" and hint in pull_error["message"], pull_error
    assert "not found" in pull_error["message"]
    assert pull_error["involvedObject"]["fieldPath"] == "spec.containers{main}"
    assert not [e for e in evs if e["reason"] in ("Created", "Started", "Pulled")], [e["reason"] for e in evs]

    # the pod: Pending, its container waiting in ImagePullBackOff (or ErrImagePull between two tries)
    assert pod["status"]["phase"] == "Pending"
    waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] in ("ImagePullBackOff", "ErrImagePull") and hint in waiting["message"], waiting
    # and it was never anything else: no Running phase, no running container, ErrImagePull before ImagePullBackOff
    mine = [o for _t, _type, o in pods_seen if o["metadata"]["name"] == name]
    assert mine and {o["status"].get("phase", "Pending") for o in mine} == {"Pending"}
    states = [s.get("state") or {} for o in mine for s in o["status"].get("containerStatuses") or []]
    assert not [s for s in states if "running" in s or "terminated" in s], states
    reasons = [s["waiting"]["reason"] for s in states if "waiting" in s]
    assert reasons.index("ErrImagePull") < reasons.index("ImagePullBackOff"), reasons
    assert sim.cluster is not None and sim.cluster.kubelet.processes == {}
    job = sim.call(sim.store.get, "jobs", NS, "j")
    assert job["status"].get("active") == 1 and not finished(sim.store)

    # every image the sim runs today is still run: the stand-ins' (the reference objects) and the runnable one
    kubelet = sim.cluster.kubelet
    images = sim.call(
        lambda s: {c["image"] for d in s.list("deployments") for c in d["spec"]["template"]["spec"]["containers"]},
        sim.store,
    )
    assert len(images) >= 4, images  # vLLM (models, embeddings), LiteLLM, Open WebUI, Tabby
    assert all(kubelet.can_run(i) for i in images | {IMAGE}), images
    assert not kubelet.can_run(UNKNOWN)
