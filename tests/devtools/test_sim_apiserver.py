"""The simulated Kubernetes API server, exercised with real clients (kubernetes-asyncio via
prefect-kubernetes, its WebSocket client for exec / port-forward, plain aiohttp for the hooks).

The server runs in its own thread and event loop (``ServerThread``), as the SimStack runs it; the
clients run on the test's loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.stream import WsApiClient
from kubernetes_asyncio.watch import Watch
from prefect_kubernetes.credentials import KubernetesClusterConfig, KubernetesCredentials
from simstack.apiserver import kubeconfig_yaml
from simstack.apiserver.patch import strategic_merge_patch
from simstack.apiserver.rbac import RBACAuthorizer
from simstack.apiserver.tables import pod_status_reason
from simstack.store import Store

from tests.kits.seeded_apiserver import SECRET_VALUE, ServerThread, deployment_obj, pod_obj, seed, ts


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    srv = ServerThread()
    srv.call(seed, srv.store)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def kubeconfig(server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text(kubeconfig_yaml(server.url, namespace="serving"))
    return path


@pytest.fixture(scope="module")
def creds(kubeconfig: Path) -> KubernetesCredentials:
    return KubernetesCredentials(cluster_config=KubernetesClusterConfig.from_file(kubeconfig, context_name="coder-sim"))


async def _ws_config(creds: KubernetesCredentials) -> k8s.Configuration:
    from kubernetes_asyncio import config

    cfg = k8s.Configuration()
    assert creds.cluster_config is not None
    await config.load_kube_config_from_dict(
        config_dict=creds.cluster_config.config, context="coder-sim", client_configuration=cfg
    )
    return cfg


def _status_of(e: ApiException) -> dict[str, Any]:
    return json.loads(e.body or b"{}")


# ====================================================================== discovery & CRUD
async def test_discovery_endpoints(server: ServerThread) -> None:
    async with aiohttp.ClientSession() as s:
        v = await (await s.get(f"{server.url}/version")).json()
        assert v["major"] == "1" and v["minor"] == "32"
        apis = await (await s.get(f"{server.url}/apis")).json()
        assert {g["name"] for g in apis["groups"]} >= {"apps", "rbac.authorization.k8s.io"}
        apps = await (await s.get(f"{server.url}/apis/apps/v1")).json()
        scale = next(r for r in apps["resources"] if r["name"] == "deployments/scale")
        assert (scale["group"], scale["version"], scale["kind"]) == ("autoscaling", "v1", "Scale")
        core = await (await s.get(f"{server.url}/api/v1")).json()
        assert {"pods", "pods/exec", "pods/portforward", "secrets", "events"} <= {r["name"] for r in core["resources"]}
        r = await s.get(f"{server.url}/apis/rbac.authorization.k8s.io/v1")
        assert r.status == 200
        r = await s.get(f"{server.url}/apis/nope/v1/things")
        assert r.status == 404 and (await r.json())["kind"] == "Status"


async def test_deployments_list_get_patch_and_scale(server: ServerThread, creds: KubernetesCredentials) -> None:
    async with creds.get_client("apps") as api:
        deps = await api.list_namespaced_deployment("serving")
        assert {d.metadata.name for d in deps.items} >= {"coder-chat", "coder-fim"}
        assert int(deps.metadata.resource_version) >= 100
        dep = await api.read_namespaced_deployment("coder-chat", "serving")
        gen = dep.metadata.generation
        assert dep.spec.selector.match_labels == {"app.kubernetes.io/name": "coder-chat"}

        # strategic merge: containers merge by name, env merges by name (A kept, B added)
        patch = {
            "spec": {"template": {"spec": {"containers": [{"name": "vllm", "env": [{"name": "B", "value": "2"}]}]}}}
        }
        dep = await api.patch_namespaced_deployment("coder-chat", "serving", patch)
        env = {e.name: e.value for e in dep.spec.template.spec.containers[0].env}
        assert env["A"] == "1" and env["B"] == "2" and "FOO" in env
        assert dep.spec.template.spec.containers[0].image == "vllm/vllm-openai:v0.32.0"
        assert dep.metadata.generation == gen + 1

        # json-patch (a list body)
        dep = await api.patch_namespaced_deployment(
            "coder-chat", "serving", [{"op": "add", "path": "/metadata/labels/tier", "value": "gpu"}]
        )
        assert dep.metadata.labels["tier"] == "gpu"

        # scale subresource
        scale = await api.read_namespaced_deployment_scale("coder-fim", "serving")
        assert scale.kind == "Scale" and scale.api_version == "autoscaling/v1"
        assert scale.spec.replicas == 0 and scale.status.replicas == 0
        assert scale.status.selector == "app.kubernetes.io/name=coder-fim"
        scale = await api.patch_namespaced_deployment_scale("coder-fim", "serving", {"spec": {"replicas": 1}})
        assert scale.spec.replicas == 1
        dep = await api.read_namespaced_deployment("coder-fim", "serving")
        assert dep.spec.replicas == 1 and dep.metadata.generation == 2
        scale = await api.replace_namespaced_deployment_scale(
            "coder-fim",
            "serving",
            {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": {"name": "coder-fim", "namespace": "serving"},
                "spec": {"replicas": 0},
            },
        )
        assert scale.spec.replicas == 0

        # status subresource: PATCH status changes status only; PATCH main resource never status
        await api.patch_namespaced_deployment_status(
            "coder-fim", "serving", {"status": {"observedGeneration": 3, "replicas": 0}}
        )
        await api.patch_namespaced_deployment("coder-fim", "serving", {"status": {"observedGeneration": 99}})
        dep = await api.read_namespaced_deployment("coder-fim", "serving")
        assert dep.status.observed_generation == 3

        with pytest.raises(ApiException) as ei:
            await api.read_namespaced_deployment("nope", "serving")
        assert ei.value.status == 404
        body = _status_of(ei.value)
        assert body["kind"] == "Status" and body["reason"] == "NotFound"
        assert body["message"] == 'deployments.apps "nope" not found'
        assert body["details"] == {"name": "nope", "group": "apps", "kind": "deployments"}


async def test_replace_with_stale_resource_version_conflicts(
    server: ServerThread, creds: KubernetesCredentials
) -> None:
    async with creds.get_client("apps") as api:
        dep = await api.read_namespaced_deployment("coder-chat", "serving")
        stale = dep.metadata.resource_version
        dep.metadata.annotations = {"touched": "yes"}
        dep = await api.replace_namespaced_deployment("coder-chat", "serving", dep)
        assert dep.metadata.resource_version != stale
        dep.metadata.resource_version = stale
        with pytest.raises(ApiException) as ei:
            await api.replace_namespaced_deployment("coder-chat", "serving", dep)
        assert ei.value.status == 409
        assert _status_of(ei.value)["reason"] == "Conflict"


async def test_pods_selectors_and_events(server: ServerThread, creds: KubernetesCredentials) -> None:
    async with creds.get_client("core") as core:
        pods = await core.list_namespaced_pod("serving", label_selector="app.kubernetes.io/name=coder-chat")
        assert [p.metadata.name for p in pods.items] == ["coder-chat-5d8f-abcde"]
        assert pods.items[0].status.container_statuses[0].ready is True
        pods = await core.list_namespaced_pod("serving", label_selector="app.kubernetes.io/name in (a,b)")
        assert pods.items == []
        pods = await core.list_namespaced_pod("serving", field_selector="status.phase=Running")
        assert len(pods.items) == 1
        allpods = await core.list_pod_for_all_namespaces(label_selector="app.kubernetes.io/name")
        assert len(allpods.items) == 1
        evs = await core.list_namespaced_event(
            "serving", field_selector="involvedObject.kind=Pod,involvedObject.name=coder-chat-5d8f-abcde"
        )
        assert [e.reason for e in evs.items] == ["Scheduled"]
        nodes = await core.list_node()
        assert [n.metadata.name for n in nodes.items] == ["default-pool-1"]


async def test_secrets_create_read_replace_patch(server: ServerThread, creds: KubernetesCredentials) -> None:
    async with creds.get_client("core") as core:
        body = k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name="openwebui-secrets"),
            string_data={"WEBUI_SECRET_KEY": "w1"},
            data={"OPENAI_API_KEY": base64.b64encode(b"k1").decode()},
        )
        created = await core.create_namespaced_secret("experience", body)
        assert created.type == "Opaque"
        assert base64.b64decode(created.data["WEBUI_SECRET_KEY"]) == b"w1"
        assert created.string_data is None
        with pytest.raises(ApiException) as ei:
            await core.create_namespaced_secret("experience", body)
        assert ei.value.status == 409 and _status_of(ei.value)["reason"] == "AlreadyExists"

        # patch one key: the others stay
        new = base64.b64encode(b"k2").decode()
        patched = await core.patch_namespaced_secret(
            "openwebui-secrets", "experience", {"data": {"OPENAI_API_KEY": new}}
        )
        assert set(patched.data) == {"WEBUI_SECRET_KEY", "OPENAI_API_KEY"}
        assert base64.b64decode(patched.data["OPENAI_API_KEY"]) == b"k2"

        # replace (with the read resourceVersion)
        cur = await core.read_namespaced_secret("openwebui-secrets", "experience")
        cur.data["EXTRA"] = base64.b64encode(b"x").decode()
        rep = await core.replace_namespaced_secret("openwebui-secrets", "experience", cur)
        assert set(rep.data) == {"WEBUI_SECRET_KEY", "OPENAI_API_KEY", "EXTRA"}
        assert base64.b64decode(rep.data["WEBUI_SECRET_KEY"]) == b"w1"

        st = await core.delete_namespaced_secret("openwebui-secrets", "experience")
        assert st.status == "Success"
        with pytest.raises(ApiException) as ei:
            await core.read_namespaced_secret("openwebui-secrets", "experience")
        assert ei.value.status == 404
        assert _status_of(ei.value)["message"] == 'secrets "openwebui-secrets" not found'


async def test_pod_delete_is_graceful_when_bound(server: ServerThread, creds: KubernetesCredentials) -> None:
    await server.acall(server.store.create, "pods", pod_obj("grace-1", "grace"), "default")
    await server.acall(server.store.create, "pods", pod_obj("unbound-1", "grace", node=None, running=False), "default")
    async with creds.get_client("core") as core:
        pod = await core.delete_namespaced_pod("grace-1", "default")
        assert pod.metadata.deletion_timestamp is not None
        assert pod.metadata.deletion_grace_period_seconds == 30
        still = await core.read_namespaced_pod("grace-1", "default")
        assert still.metadata.deletion_timestamp is not None
        # grace 0 and unbound pods go at once
        await core.delete_namespaced_pod("unbound-1", "default")
        await core.delete_namespaced_pod("grace-1", "default", grace_period_seconds=0)
        left = await core.list_namespaced_pod("default", label_selector="app.kubernetes.io/name=grace")
        assert left.items == []


async def test_delete_deployment_collects_dependents(server: ServerThread, creds: KubernetesCredentials) -> None:
    dep = await server.acall(server.store.create, "deployments", deployment_obj("gc-me"), "default")
    owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gc-me", "uid": dep["metadata"]["uid"]}
    rs = {"metadata": {"name": "gc-me-1", "ownerReferences": [owner]}, "spec": deployment_obj("gc-me")["spec"]}
    await server.acall(server.store.create, "replicasets", rs, "default")
    async with creds.get_client("apps") as api:
        st = await api.delete_namespaced_deployment("gc-me", "default")
        assert st.status == "Success"
        rss = await api.list_namespaced_replica_set("default")
        assert [r.metadata.name for r in rss.items] == []


# ====================================================================== watch
async def _collect(w: Watch, stream: Any, n: int, timeout: float = 5) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []

    async def run() -> None:
        async for ev in stream:
            if ev["type"] == "BOOKMARK":
                continue
            out.append((ev["type"], ev["object"].metadata.name))
            if len(out) >= n:
                w.stop()
                return

    await asyncio.wait_for(run(), timeout)
    return out


async def test_watch_pods_with_label_selector(server: ServerThread, creds: KubernetesCredentials) -> None:
    store = server.store
    await server.acall(store.create, "pods", pod_obj("w-a", "watched"), "default")
    async with creds.get_client("core") as core:
        w = Watch()
        stream = w.stream(core.list_namespaced_pod, "default", label_selector="app.kubernetes.io/name=watched")
        first = await _collect(w, stream, 1)
        assert first == [("ADDED", "w-a")]  # initial state of a watch without resourceVersion
        rv = w.resource_version
        assert rv

        def mutate() -> None:
            store.create("pods", pod_obj("w-b", "watched"), "default")
            store.create("pods", pod_obj("w-other", "other"), "default")  # never seen
            p = store.get("pods", "default", "w-a")
            p["metadata"]["annotations"] = {"x": "1"}
            store.update("pods", p)  # MODIFIED
            p = store.get("pods", "default", "w-a")
            p["metadata"]["labels"] = {"app.kubernetes.io/name": "gone"}
            store.update("pods", p)  # stops matching: DELETED
            p = store.get("pods", "default", "w-other")
            p["metadata"]["labels"] = {"app.kubernetes.io/name": "watched"}
            store.update("pods", p)  # starts matching: ADDED
            store.delete("pods", "default", "w-b")

        await server.acall(mutate)
        w2 = Watch()
        stream = w2.stream(
            core.list_namespaced_pod, "default", label_selector="app.kubernetes.io/name=watched", resource_version=rv
        )
        events = await _collect(w2, stream, 5)
        assert events == [
            ("ADDED", "w-b"),
            ("MODIFIED", "w-a"),
            ("DELETED", "w-a"),
            ("ADDED", "w-other"),
            ("DELETED", "w-b"),
        ]
        # resume from the middle: no duplicates of what came before
        mid = await server.acall(lambda: store.get("pods", "default", "w-other")["metadata"]["resourceVersion"])
        w3 = Watch()
        stream = w3.stream(
            core.list_namespaced_pod,
            "default",
            label_selector="app.kubernetes.io/name=watched",
            resource_version=mid,
            timeout_seconds=1,
        )
        rest = [(e["type"], e["object"].metadata.name) async for e in stream if e["type"] != "BOOKMARK"]
        assert rest == [("DELETED", "w-b")]
        await w.close()
        await w2.close()
        await w3.close()


async def test_watch_too_old_resource_version_is_410(server: ServerThread, creds: KubernetesCredentials) -> None:
    store = server.store
    old = await server.acall(lambda: str(store.resource_version))
    await server.acall(store.create, "configmaps", {"metadata": {"name": "c410"}, "data": {}}, "default")
    await server.acall(store.compact)
    async with creds.get_client("core") as core:
        # with timeout_seconds kubernetes-asyncio raises at once
        w = Watch()
        with pytest.raises(ApiException) as ei:
            async for _ in w.stream(core.list_namespaced_pod, "default", resource_version=old, timeout_seconds=5):
                pass
        assert ei.value.status == 410 and "Expired" in str(ei.value.reason)
        # watching forever it retries once from the same version, then raises as well
        w = Watch()
        with pytest.raises(ApiException) as ei:
            async for _ in w.stream(core.list_namespaced_pod, "default", resource_version=old):
                pass
        assert ei.value.status == 410
    # the raw stream: HTTP 200, one ERROR event carrying a Status
    async with aiohttp.ClientSession() as s:
        r = await s.get(f"{server.url}/api/v1/namespaces/default/pods?watch=True&resourceVersion={old}")
        assert r.status == 200
        line = json.loads((await r.content.readline()).decode())
        assert line["type"] == "ERROR"
        assert line["object"]["code"] == 410 and line["object"]["reason"] == "Expired"
        assert line["object"]["message"].startswith("too old resource version")


async def test_watch_timeout_ends_stream_and_bookmarks_are_sent(
    server: ServerThread, creds: KubernetesCredentials
) -> None:
    import time

    rv = await server.acall(lambda: str(server.store.resource_version))
    async with creds.get_client("core") as core:
        w = Watch()
        t0 = time.monotonic()
        types = []
        async for ev in w.stream(
            core.list_namespaced_secret,
            "litellm",
            resource_version=rv,
            timeout_seconds=1,
            allow_watch_bookmarks=True,
        ):
            types.append(ev["type"])
            if ev["type"] == "BOOKMARK":
                assert isinstance(ev["object"], dict)  # a raw dict: consumers must skip it
                assert int(ev["object"]["metadata"]["resourceVersion"]) >= int(rv)
        assert time.monotonic() - t0 > 0.9  # the stream lasted its timeoutSeconds (a hung one stops the test)
        assert "BOOKMARK" in types and set(types) == {"BOOKMARK"}
    async with aiohttp.ClientSession() as s:
        for flag in ("true", "1", "True"):
            r = await s.get(f"{server.url}/api/v1/namespaces/litellm/secrets?watch={flag}&timeoutSeconds=0.2")
            assert r.status == 200
            assert await r.read() == b""
        r = await s.get(f"{server.url}/api/v1/namespaces/litellm/secrets?watch=yes")
        assert r.status == 400


async def test_watch_sends_events_queued_while_a_bookmark_is_overdue(server: ServerThread) -> None:
    """An event still queued when a BOOKMARK is overdue is sent, not spun on until timeoutSeconds.

    Regression: the handler waited with ``asyncio.wait_for(queue.get(), timeout=0)`` once the bookmark
    was due; on Python 3.11 that cancels the get before it runs, so a non-empty queue made it loop
    forever (no event, no bookmark). Under CPU load a busy server loop got there by itself; here the
    loop is blocked past the bookmark interval (0.3 s) right after two changes, deterministically.
    """
    import time

    store = server.store
    rv = await server.acall(lambda: str(store.resource_version))
    url = (
        f"{server.url}/api/v1/namespaces/default/configmaps?watch=1&allowWatchBookmarks=1"
        f"&resourceVersion={rv}&timeoutSeconds=10"
    )

    def burst() -> None:
        store.create("configmaps", {"metadata": {"name": "bm-1"}, "data": {}}, "default")
        store.create("configmaps", {"metadata": {"name": "bm-2"}, "data": {}}, "default")
        time.sleep(0.45)  # the server loop is busy past the bookmark interval

    async with aiohttp.ClientSession() as s:
        r = await s.get(url)
        assert r.status == 200
        first = json.loads(await asyncio.wait_for(r.content.readline(), 5))
        assert first["type"] == "BOOKMARK"  # the handler now waits on its queue until the next bookmark
        await server.acall(burst)
        names: list[str] = []

        async def read() -> None:
            while len(names) < 2:
                ev = json.loads(await r.content.readline())
                if ev["type"] != "BOOKMARK":
                    names.append(ev["object"]["metadata"]["name"])

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read(), 3)
        assert names == ["bm-1", "bm-2"]


# ====================================================================== tables
async def test_tables_for_kubectl_get(server: ServerThread) -> None:
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    async with aiohttp.ClientSession(headers={"Accept": accept}) as s:
        t = await (await s.get(f"{server.url}/apis/apps/v1/namespaces/serving/deployments")).json()
        assert t["kind"] == "Table"
        assert [c["name"] for c in t["columnDefinitions"] if c["priority"] == 0] == [
            "Name",
            "Ready",
            "Up-to-date",
            "Available",
            "Age",
        ]
        row = next(r for r in t["rows"] if r["cells"][0] == "coder-chat")
        assert row["cells"][1] == "0/1" and row["object"]["metadata"]["name"] == "coder-chat"
        t = await (await s.get(f"{server.url}/api/v1/namespaces/serving/pods")).json()
        assert t["rows"][0]["cells"][1:4] == ["1/1", "Running", "0"]


def _cs(state: dict, ready: bool = False, restarts: int = 0, **extra: Any) -> dict:
    return {"name": "c", "image": "i", "imageID": "", "ready": ready, "restartCount": restarts, "state": state} | extra


@pytest.mark.parametrize(
    ("status", "deleting", "expected"),
    [
        ({"phase": "Pending"}, False, "Pending"),
        (
            {"phase": "Pending", "containerStatuses": [_cs({"waiting": {"reason": "ContainerCreating"}})]},
            False,
            "ContainerCreating",
        ),
        (
            {
                "phase": "Pending",
                "initContainerStatuses": [_cs({"running": {}})],
                "containerStatuses": [_cs({"waiting": {"reason": "PodInitializing"}})],
            },
            False,
            "Init:0/1",
        ),
        (
            {"phase": "Pending", "initContainerStatuses": [_cs({"waiting": {"reason": "ImagePullBackOff"}})]},
            False,
            "Init:ImagePullBackOff",
        ),
        (
            {
                "phase": "Pending",
                "initContainerStatuses": [_cs({"terminated": {"exitCode": 0, "reason": "Completed"}})],
                "containerStatuses": [_cs({"waiting": {"reason": "PodInitializing"}})],
            },
            False,
            "PodInitializing",
        ),
        ({"phase": "Running", "containerStatuses": [_cs({"running": {}}, ready=True)]}, False, "Running"),
        (
            {"phase": "Running", "containerStatuses": [_cs({"waiting": {"reason": "CrashLoopBackOff"}}, restarts=3)]},
            False,
            "CrashLoopBackOff",
        ),
        ({"phase": "Running", "containerStatuses": [_cs({"running": {}}, ready=True)]}, True, "Terminating"),
        (
            {"phase": "Succeeded", "containerStatuses": [_cs({"terminated": {"exitCode": 0, "reason": "Completed"}})]},
            True,
            "Completed",
        ),
    ],
)
def test_pod_status_column_like_kubectl(status: dict, deleting: bool, expected: str) -> None:
    pod: dict[str, Any] = {
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c"}], "initContainers": [{"name": "i"}]},
        "status": status,
    }
    if deleting:
        pod["metadata"]["deletionTimestamp"] = ts()
    assert pod_status_reason(pod)[0] == expected


def test_store_defaults_on_create_and_keeps_status_on_update() -> None:
    store = Store()
    pod = pod_obj("p", "x", running=False)
    pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    created = store.create("pods", pod, "default")
    assert created["status"]["qosClass"] == "Burstable"
    assert created["spec"]["containers"][0]["ports"][0]["protocol"] == "TCP"
    created["status"] = {"phase": "Running"}
    store.update("pods", created, status_only=True)
    p = store.get("pods", "default", "p")
    del p["status"]
    p["metadata"]["labels"] = {"a": "b"}
    assert store.update("pods", p)["status"] == {"phase": "Running"}  # an update without status keeps it
    sec = store.create("secrets", {"metadata": {"name": "s"}, "stringData": {"k": "v"}}, "default")
    assert sec["type"] == "Opaque" and sec["data"] == {"k": base64.b64encode(b"v").decode()}
    assert "stringData" not in sec


def test_strategic_merge_patch_merges_lists_by_key() -> None:
    orig = {
        "spec": {
            "containers": [
                {"name": "a", "env": [{"name": "X", "value": "1"}], "ports": [{"containerPort": 80}]},
                {"name": "b"},
            ],
            "tolerations": [{"key": "t"}],
        }
    }
    patch = {
        "spec": {
            "containers": [
                {"name": "a", "env": [{"name": "Y", "value": "2"}, {"name": "X", "$patch": "delete"}]},
                {"name": "c"},
            ],
            "tolerations": [{"key": "u"}],
        }
    }
    out = strategic_merge_patch(orig, patch)
    assert [c["name"] for c in out["spec"]["containers"]] == ["a", "b", "c"]
    assert out["spec"]["containers"][0]["env"] == [{"name": "Y", "value": "2"}]
    assert out["spec"]["containers"][0]["ports"] == [{"containerPort": 80}]
    assert out["spec"]["tolerations"] == [{"key": "u"}]  # no merge key: replaced


# ====================================================================== exec
async def _exec(creds: KubernetesCredentials, pod: str, command: list[str], **kw: Any) -> tuple[str, str, int | None]:
    cfg = await _ws_config(creds)
    out, err, code = "", "", None
    async with WsApiClient(configuration=cfg) as ws_api:
        core: Any = k8s.CoreV1Api(api_client=ws_api)
        ctx = await core.connect_get_namespaced_pod_exec(
            pod,
            "serving",
            command=command,
            stderr=True,
            stdout=True,
            stdin=False,
            tty=False,
            _preload_content=False,
            **kw,
        )
        async with ctx as ws:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                ch, data = msg.data[0], msg.data[1:]
                if ch == 1:
                    out += data.decode()
                elif ch == 2:
                    err += data.decode()
                elif ch == 3:
                    code = WsApiClient.parse_error_data(data)
    return out, err, code


async def test_exec_runs_with_container_env_and_reports_exit_code(
    server: ServerThread, creds: KubernetesCredentials
) -> None:
    pod = "coder-chat-5d8f-abcde"
    out, _err, code = await _exec(creds, pod, ["sh", "-c", "echo $FOO; echo $PLAIN-$X_ONE"])
    assert out == f"{SECRET_VALUE}\nplain-value-uno\n" and code == 0
    out, err, code = await _exec(creds, pod, ["sh", "-c", "echo oops >&2; exit 3"], container="vllm")
    assert err == "oops\n" and code == 3
    # the preloaded form (what most callers use) gets stdout+stderr as text
    cfg = await _ws_config(creds)
    async with WsApiClient(configuration=cfg) as ws_api:
        core: Any = k8s.CoreV1Api(api_client=ws_api)
        text = await core.connect_get_namespaced_pod_exec(
            pod, "serving", command=["sh", "-c", "echo hi"], stderr=True, stdout=True
        )
        assert text == "hi\n"


async def test_exec_refused_like_a_real_server(server: ServerThread, creds: KubernetesCredentials) -> None:
    await server.acall(server.store.create, "pods", pod_obj("pending-1", "pend", running=False), "serving")
    cases = [
        ("pending-1", "", 400, 'unable to upgrade connection: container not found ("vllm")'),
        ("coder-chat-5d8f-abcde", "&container=nope", 400, "container nope is not valid for pod coder-chat-5d8f-abcde"),
        ("missing", "", 404, 'pods "missing" not found'),
    ]
    for pod, extra, status, message in cases:
        with pytest.raises(aiohttp.WSServerHandshakeError) as ei:
            await _exec(creds, pod, ["true"], **({"container": "nope"} if extra else {}))
        assert ei.value.status == status
        async with aiohttp.ClientSession() as s:
            r = await s.get(
                f"{server.url}/api/v1/namespaces/serving/pods/{pod}/exec?command=true&stdout=1{extra}",
                headers={
                    "Connection": "Upgrade",
                    "Upgrade": "websocket",
                    "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                },
            )
            body = await r.json()
            assert r.status == status and body["kind"] == "Status" and body["message"] == message


async def test_exec_v5_protocol_stdin_and_close_signal(server: ServerThread) -> None:
    url = f"{server.url}/api/v1/namespaces/serving/pods/coder-chat-5d8f-abcde/exec?command=cat&stdin=true&stdout=true"
    async with aiohttp.ClientSession() as s, s.ws_connect(url, protocols=("v5.channel.k8s.io",)) as ws:
        assert ws.protocol == "v5.channel.k8s.io"
        await ws.send_bytes(b"\x00hello")
        await ws.send_bytes(b"\xff\x00")  # v5: close stdin
        got, status = b"", None
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            if msg.data[0] == 1:
                got += msg.data[1:]
            elif msg.data[0] == 3:
                status = json.loads(msg.data[1:])
        assert got == b"hello" and status == {"metadata": {}, "status": "Success"}


# ====================================================================== port-forward
async def _start_backend() -> tuple[web.AppRunner, int]:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "ok": True})

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def test_portforward_to_registered_backend(server: ServerThread, creds: KubernetesCredentials) -> None:
    backend, bport = await _start_backend()
    pod = "coder-chat-5d8f-abcde"
    await server.acall(server.backends.register, "serving", pod, 8000, "127.0.0.1", bport)
    cfg = await _ws_config(creds)
    ws_api = WsApiClient(configuration=cfg)
    core: Any = k8s.CoreV1Api(api_client=ws_api)
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ctx = await core.connect_get_namespaced_pod_portforward(pod, "serving", ports=8000, _preload_content=False)
        async with ctx as ws:
            # first frame on each channel: the port, little-endian
            first = [await ws.receive_bytes(), await ws.receive_bytes()]
            assert sorted(first) == [b"\x00\x40\x1f", b"\x01\x40\x1f"]

            async def up() -> None:
                while data := await reader.read(65536):
                    await ws.send_bytes(b"\x00" + data)
                await ws.close()

            task = asyncio.create_task(up())
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY and msg.data[0] == 0:
                    writer.write(msg.data[1:])
                    await writer.drain()
            task.cancel()
        writer.close()
        closed.set()

    pump = await asyncio.start_server(handle, "127.0.0.1", 0)
    lport = pump.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as s:
            r = await s.get(f"http://127.0.0.1:{lport}/health", headers={"Connection": "close"})
            assert r.status == 200 and await r.json() == {"path": "/health", "ok": True}
        await asyncio.wait_for(closed.wait(), 5)

        # no backend: an error on the error channel, then the server closes
        ctx = await core.connect_get_namespaced_pod_portforward(pod, "serving", ports=9999, _preload_content=False)
        async with ctx as ws:
            msgs = [m async for m in ws if m.type == aiohttp.WSMsgType.BINARY]
        errors = b"".join(m.data[1:] for m in msgs if m.data[0] == 1 and len(m.data) > 3)
        assert b"error forwarding port 9999" in errors
    finally:
        pump.close()
        await ws_api.close()
        await backend.cleanup()
        await server.acall(server.backends.unregister, "serving", pod)


# ====================================================================== hooks: faults & authorizer
async def test_fault_injection(server: ServerThread, creds: KubernetesCredentials) -> None:
    server.faults.fail("GET", r"/deployments/coder-chat$", 500, times=2)
    server.faults.fail("PATCH", r"/scale$", 429, retry_after=2)
    server.faults.fail("*", r"/namespaces/litellm/secrets", 403)
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            r = await s.get(f"{server.url}/apis/apps/v1/namespaces/serving/deployments/coder-chat")
            assert r.status == 500 and (await r.json())["reason"] == "InternalError"
        r = await s.get(f"{server.url}/apis/apps/v1/namespaces/serving/deployments/coder-chat")
        assert r.status == 200
        r = await s.patch(
            f"{server.url}/apis/apps/v1/namespaces/serving/deployments/coder-fim/scale",
            data=b'{"spec":{"replicas":0}}',
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert r.status == 429 and r.headers["Retry-After"] == "2"
        assert (await r.json())["details"]["retryAfterSeconds"] == 2
        r = await s.get(f"{server.url}/api/v1/namespaces/litellm/secrets")
        assert r.status == 403

    # a watch dropped after one event (as a load balancer would cut it)
    server.faults.drop_watch(r"/namespaces/serving/pods$", after_events=1)
    async with creds.get_client("core") as core:
        w = Watch()
        got = [e["type"] async for e in w.stream(core.list_namespaced_pod, "serving", timeout_seconds=5)]
        assert got == ["ADDED"]  # two pods exist; the stream ended after the first
        # abort=True resets the connection instead: the client sees a broken stream, not an end
        server.faults.drop_watch(r"/namespaces/serving/pods$", after_events=1, abort=True)
        w = Watch()
        with pytest.raises(aiohttp.ClientError):
            async for _ in w.stream(core.list_namespaced_pod, "serving", timeout_seconds=5):
                pass
        await w.close()
    assert server.faults.fired[:2] == [
        ("GET", "/apis/apps/v1/namespaces/serving/deployments/coder-chat", 500),
        ("GET", "/apis/apps/v1/namespaces/serving/deployments/coder-chat", 500),
    ]


async def test_rbac_authorizer(tmp_path: Path) -> None:
    tokens = {"tok-flow": ("serving", "flow"), "tok-none": ("serving", "nobody")}
    srv = ServerThread(lambda store: RBACAuthorizer(store, tokens, superusers={"tok-admin"}))
    try:

        def setup() -> None:
            seed(srv.store)
            srv.store.create(
                "roles",
                {
                    "metadata": {"name": "scaler"},
                    "rules": [
                        {
                            "apiGroups": ["apps"],
                            "resources": ["deployments", "deployments/scale"],
                            "verbs": ["get", "list", "patch"],
                        }
                    ],
                },
                "serving",
            )
            srv.store.create(
                "rolebindings",
                {
                    "metadata": {"name": "scaler"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "scaler"},
                    "subjects": [{"kind": "ServiceAccount", "name": "flow", "namespace": "serving"}],
                },
                "serving",
            )

        srv.call(setup)

        def creds_for(token: str) -> KubernetesCredentials:
            p = tmp_path / f"{token}.yaml"
            p.write_text(kubeconfig_yaml(srv.url, token=token))
            return KubernetesCredentials(cluster_config=KubernetesClusterConfig.from_file(p, context_name="coder-sim"))

        async with creds_for("tok-flow").get_client("apps") as api:
            await api.patch_namespaced_deployment_scale("coder-fim", "serving", {"spec": {"replicas": 1}})
            assert (await api.list_namespaced_deployment("serving")).items
        async with creds_for("tok-flow").get_client("core") as core:
            with pytest.raises(ApiException) as ei:
                await core.list_namespaced_pod("serving")
            assert ei.value.status == 403
            assert _status_of(ei.value)["message"] == (
                'pods is forbidden: User "system:serviceaccount:serving:flow" cannot list resource "pods" '
                'in API group "" in the namespace "serving"'
            )
            with pytest.raises(ApiException) as ei:
                await core.read_namespaced_secret("vllm-api-key", "serving")
            assert _status_of(ei.value)["message"].startswith('secrets "vllm-api-key" is forbidden: User')
        async with creds_for("tok-none").get_client("apps") as api:
            with pytest.raises(ApiException) as ei:
                await api.list_namespaced_deployment("serving")
            assert ei.value.status == 403
        async with creds_for("tok-bogus").get_client("core") as core:
            with pytest.raises(ApiException) as ei:
                await core.list_namespaced_pod("serving")
            assert ei.value.status == 401
        async with creds_for("tok-admin").get_client("core") as core:
            assert (await core.list_namespaced_pod("serving")).items
    finally:
        srv.stop()
