"""The simulated API server over a hand-seeded Store, in its own thread and event loop (``ServerThread``), as
the SimStack runs it; the clients run on the test's loop. ``seed`` writes the objects the API-server and
kubectl tests read (namespaces, nodes, Deployments, pods, Secrets, events); no controllers run.

Shared by tests/devtools/test_sim_apiserver.py and tests/devtools/test_sim_kubectl.py.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from typing import Any

from simstack.apiserver import start_apiserver
from simstack.backends import Backends
from simstack.store import Store, now_rfc3339

SECRET_VALUE = "s3cr3t-from-secret"


class ServerThread:
    """The API server on its own loop in a background thread (never the clients' loop)."""

    def __init__(self, authorizer_factory: Callable[[Store], Any] | None = None, bookmark_interval: float = 0.3):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sim-apiserver", daemon=True)
        self.thread.start()
        self.store = Store()
        self.backends = Backends(self.store)
        self.authorizer = authorizer_factory(self.store) if authorizer_factory else None
        self.runner, self.url = self.run(
            start_apiserver(self.store, self.backends, authorizer=self.authorizer, bookmark_interval=bookmark_interval)
        )
        self.app = self.runner.app
        self.faults = self.app["faults"]

    def run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a plain function on the server loop (the store is single-threaded)."""

        async def wrapper() -> Any:
            return fn(*args, **kwargs)

        return self.run(wrapper())

    async def acall(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``call`` from async test code without blocking the test loop."""

        async def wrapper() -> Any:
            return fn(*args, **kwargs)

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(wrapper(), self.loop))

    def stop(self) -> None:
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            self.run(self.runner.cleanup(), timeout=5)

        async def cancel_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            self.run(cancel_rest(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def ts(offset: float = 0) -> str:
    import time

    return now_rfc3339(time.time() + offset)


def pod_obj(name: str, app: str, *, node: str | None = "default-pool-1", running: bool = True, **status: Any) -> dict:
    labels = {"app.kubernetes.io/name": app}
    st: dict[str, Any] = {"phase": "Pending"}
    if running:
        st = {
            "phase": "Running",
            "podIP": "10.0.0.7",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
            ],
            "containerStatuses": [
                {
                    "name": "vllm",
                    "image": "vllm/vllm-openai:v0.32.0",
                    "imageID": "docker.io/vllm/vllm-openai@sha256:0",
                    "ready": True,
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": ts(-30)}},
                }
            ],
        }
    st.update(status)
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "vllm",
                "image": "vllm/vllm-openai:v0.32.0",
                "env": [
                    {"name": "FOO", "valueFrom": {"secretKeyRef": {"name": "vllm-api-key", "key": "api-key"}}},
                    {"name": "PLAIN", "value": "plain-value"},
                ],
                "envFrom": [{"secretRef": {"name": "extra-env"}, "prefix": "X_"}],
                "ports": [{"containerPort": 8000}],
            }
        ],
        "terminationGracePeriodSeconds": 30,
    }
    if node:
        spec["nodeName"] = node
    return {"metadata": {"name": name, "labels": labels}, "spec": spec, "status": st}


def deployment_obj(name: str, replicas: int = 1) -> dict:
    labels = {"app.kubernetes.io/name": name}
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "vllm",
                            "image": "vllm/vllm-openai:v0.32.0",
                            "env": [
                                {"name": "A", "value": "1"},
                                {
                                    "name": "FOO",
                                    "valueFrom": {"secretKeyRef": {"name": "vllm-api-key", "key": "api-key"}},
                                },
                            ],
                        }
                    ]
                },
            },
        },
    }


def seed(store: Store) -> None:
    for ns in ("serving", "litellm", "experience", "default", "kube-system"):
        store.create("namespaces", {"metadata": {"name": ns}, "status": {"phase": "Active"}})
    store.create(
        "nodes",
        {
            "metadata": {"name": "default-pool-1", "labels": {"kubernetes.io/hostname": "default-pool-1"}},
            "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "nodeInfo": {
                    "kubeletVersion": "v1.32.0",
                    "kubeProxyVersion": "v1.32.0",
                    "architecture": "amd64",
                    "operatingSystem": "linux",
                    "osImage": "Container-Optimized OS",
                    "kernelVersion": "6.1.0",
                    "containerRuntimeVersion": "containerd://1.7.0",
                    "bootID": "b",
                    "machineID": "m",
                    "systemUUID": "s",
                },
            },
        },
    )
    b64 = base64.b64encode(SECRET_VALUE.encode()).decode()
    store.create("secrets", {"metadata": {"name": "vllm-api-key"}, "data": {"api-key": b64}}, "serving")
    store.create(
        "secrets",
        {"metadata": {"name": "extra-env"}, "data": {"ONE": base64.b64encode(b"uno").decode()}},
        "serving",
    )
    dep = store.create("deployments", deployment_obj("coder-chat"), "serving")
    store.create("deployments", deployment_obj("coder-fim", 0), "serving")
    owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "coder-chat", "uid": dep["metadata"]["uid"]}
    rs_obj = {
        "metadata": {
            "name": "coder-chat-5d8f",
            "labels": {"app.kubernetes.io/name": "coder-chat", "pod-template-hash": "5d8f"},
            "ownerReferences": [{**owner, "controller": True}],
            "annotations": {"deployment.kubernetes.io/revision": "1"},
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": "coder-chat", "pod-template-hash": "5d8f"}},
            "template": dep["spec"]["template"],
        },
    }
    rs = store.create("replicasets", rs_obj, "serving")
    pod = pod_obj("coder-chat-5d8f-abcde", "coder-chat")
    pod["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "name": rs_obj["metadata"]["name"],
            "uid": rs["metadata"]["uid"],
            "controller": True,
        }
    ]
    pod = store.create("pods", pod, "serving")
    store.create(
        "events",
        {
            "metadata": {"name": "coder-chat-5d8f-abcde.1"},
            "involvedObject": {
                "kind": "Pod",
                "namespace": "serving",
                "name": "coder-chat-5d8f-abcde",
                "apiVersion": "v1",
                "uid": pod["metadata"]["uid"],
            },
            "reason": "Scheduled",
            "message": "Successfully assigned serving/coder-chat-5d8f-abcde to default-pool-1",
            "type": "Normal",
            "source": {"component": "default-scheduler"},
            "firstTimestamp": ts(-60),
            "lastTimestamp": ts(-60),
            "count": 1,
        },
        "serving",
    )
    store.create(
        "events",
        {
            "metadata": {"name": "coder-chat.1"},
            "involvedObject": {
                "kind": "Deployment",
                "namespace": "serving",
                "name": "coder-chat",
                "apiVersion": "apps/v1",
                "uid": dep["metadata"]["uid"],
            },
            "reason": "ScalingReplicaSet",
            "message": "Scaled up replica set coder-chat-5d8f to 1",
            "type": "Normal",
            "source": {"component": "deployment-controller"},
            "firstTimestamp": ts(-60),
            "lastTimestamp": ts(-60),
            "count": 1,
        },
        "serving",
    )
