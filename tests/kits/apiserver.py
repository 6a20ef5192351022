"""Harness for the cluster-client tests: the simulated API server over a bare Store in its own thread,
and pod statuses written step by step exactly as docs/DESIGN.md's "pod life cycle" table describes.

No controllers run here: the tests play the scheduler, kubelet and autoscaler themselves, so phase and
fault classification can be timed precisely.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio.client import ApiClient
from simstack.apiserver import kubeconfig_yaml, start_apiserver
from simstack.backends import Backends
from simstack.store import Store, now_rfc3339

from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.spec import StackSpec

NS = "serving"
NAME = "coder-chat"
SELECTOR = f"app.kubernetes.io/name={NAME}"
IMAGE = "vllm/vllm-openai:v0.32.0"


class ServerThread:
    """The simulated API server on its own event loop in a background thread."""

    def __init__(self, tmp: Path, bookmark_interval: float = 0.3) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kube-test-apiserver", daemon=True)
        self.thread.start()
        self.store = Store()
        self.backends = Backends(self.store)
        self.runner, self.url = self.run(
            start_apiserver(self.store, self.backends, bookmark_interval=bookmark_interval)
        )
        self.faults = self.runner.app["faults"]
        self.kubeconfig = tmp / "kubeconfig"
        self.kubeconfig.write_text(kubeconfig_yaml(self.url, context="coder-sim"))
        self.target = ClusterTarget(kubeconfig=str(self.kubeconfig), context="coder-sim")
        self._sites: list[web.AppRunner] = []

    def run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def acall(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a plain function on the server loop (the store is single-threaded), from async test code."""

        async def wrapper() -> Any:
            return fn(*args, **kwargs)

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(wrapper(), self.loop))

    async def write(self, fn: Callable[..., Any], *args: Any) -> float:
        """Apply a store change on the server loop; returns time.monotonic() right after the write."""

        def stamped() -> float:
            fn(*args)
            return time.monotonic()

        return float(await self.acall(stamped))

    async def start_backend(self, namespace: str, pod: str, container_port: int, app: web.Application) -> None:
        async def start() -> None:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.backends.register(namespace, pod, container_port, "127.0.0.1", port)
            self._sites.append(runner)

        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(start(), self.loop))

    def stop(self) -> None:
        async def shutdown() -> None:
            for r in self._sites:
                await r.cleanup()
            await self.runner.cleanup()

        with contextlib.suppress(Exception):
            self.run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    @contextlib.asynccontextmanager
    async def api(self) -> AsyncIterator[ApiClient]:
        async with open_api(self.target) as api:
            yield api


# ------------------------------------------------------------------------------ objects
def namespace(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {}, "status": {"phase": "Active"}}


def deployment(name: str = NAME, ns: str = NS, replicas: int = 1, *, gpu: bool = True) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": name}
    container: dict[str, Any] = {
        "name": "vllm" if gpu else "app",
        "image": IMAGE,
        "ports": [{"containerPort": 8000, "name": "http"}],
    }
    if gpu:
        container["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
        "status": {"observedGeneration": 1, "replicas": 0, "readyReplicas": 0},
    }


def service(name: str = NAME, ns: str = NS, port: int = 8000, target: int | str = 8000) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": {"app.kubernetes.io/name": name},
            "ports": [{"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}],
        },
    }


def node(name: str, memory: str = "16Gi", gpus: int = 1) -> dict[str, Any]:
    cap = {"cpu": "4", "memory": memory, "pods": "110"}
    if gpus:
        cap["nvidia.com/gpu"] = str(gpus)
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {"capacity": cap, "allocatable": dict(cap), "conditions": [{"type": "Ready", "status": "True"}]},
    }


def _cs(
    name: str, state: dict[str, Any], *, ready: bool = False, restarts: int = 0, last: dict[str, Any] | None = None
):
    return {
        "name": name,
        "image": IMAGE,
        "imageID": "",
        "ready": ready,
        "restartCount": restarts,
        "started": "running" in state,
        "state": state,
        "lastState": last or {},
    }


def _cond(ctype: str, status: bool, reason: str | None = None, message: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"type": ctype, "status": "True" if status else "False", "lastTransitionTime": now_rfc3339()}
    if reason:
        c["reason"] = reason
    if message:
        c["message"] = message
    return c


class PodScript:
    """One GPU model pod, moved through the DESIGN.md life cycle by writing its status to the store."""

    def __init__(self, store: Store, name: str | None = None, ns: str = NS, app: str = NAME, *, init: bool = True):
        self.store = store
        self.ns = ns
        self.name = name or f"{app}-7d9f8c6b5-{uuid.uuid4().hex[:5]}"
        self.init = init
        self.app = app

    # ---- the pod
    def create(self) -> None:
        labels = {"app.kubernetes.io/name": self.app, "pod-template-hash": "7d9f8c6b5"}
        spec: dict[str, Any] = {
            "containers": [
                {
                    "name": "vllm",
                    "image": IMAGE,
                    "ports": [{"containerPort": 8000, "name": "http"}],
                    "env": [{"name": "VLLM_API_KEY", "value": "from-test"}],
                }
            ],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }
        if self.init:
            spec["initContainers"] = [{"name": "stage-weights", "image": IMAGE}]
        self.store.create(
            "pods",
            {
                "metadata": {"name": self.name, "namespace": self.ns, "labels": labels},
                "spec": spec,
                "status": {
                    "phase": "Pending",
                    "conditions": [
                        _cond(
                            "PodScheduled",
                            False,
                            "Unschedulable",
                            "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are "
                            "available: 1 No preemption victims found for incoming pod.",
                        )
                    ],
                    "qosClass": "Burstable",
                },
            },
        )
        self.event(
            "Warning",
            "FailedScheduling",
            "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
            "default-scheduler",
        )

    def _pod(self) -> dict[str, Any]:
        return self.store.get("pods", self.ns, self.name)

    def _status(self, **status: Any) -> None:
        pod = self._pod()
        new = copy.deepcopy(pod.get("status") or {})
        new.update(status)
        pod["status"] = new
        self.store.update("pods", pod, status_only=True)

    def event(self, etype: str, reason: str, message: str, component: str = "kubelet") -> None:
        pod = self._pod()
        now = now_rfc3339()
        self.store.create(
            "events",
            {
                "metadata": {"name": f"{self.name}.{uuid.uuid4().hex[:12]}", "namespace": self.ns},
                "involvedObject": {
                    "kind": "Pod",
                    "namespace": self.ns,
                    "name": self.name,
                    "uid": pod["metadata"]["uid"],
                    "apiVersion": "v1",
                },
                "reason": reason,
                "message": message,
                "type": etype,
                "source": {"component": component},
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
                "reportingComponent": component,
            },
        )

    # ---- phases (DESIGN.md table)
    def scale_up_triggered(self) -> None:
        self.event(
            "Normal",
            "TriggeredScaleUp",
            "pod triggered scale-up: [{gpu-pool 0->1 (max: 1)}]",
            "cluster-autoscaler",
        )

    def not_trigger_scale_up(self) -> None:
        self.event(
            "Normal",
            "NotTriggerScaleUp",
            "pod didn't trigger scale-up: 1 max node group size reached",
            "cluster-autoscaler",
        )

    def bind(self, node_name: str = "gpu-pool-1") -> None:
        pod = self._pod()
        pod["spec"]["nodeName"] = node_name
        self.store.update("pods", pod)
        waiting = {"waiting": {"reason": "PodInitializing"}}
        status: dict[str, Any] = {
            "phase": "Pending",
            "hostIP": "10.0.0.9",
            "startTime": now_rfc3339(),
            "conditions": [_cond("PodScheduled", True), _cond("Initialized", not self.init), _cond("Ready", False)],
            "containerStatuses": [
                _cs("vllm", {"waiting": {"reason": "PodInitializing" if self.init else "ContainerCreating"}})
            ],
        }
        if self.init:
            status["initContainerStatuses"] = [_cs("stage-weights", waiting)]
        self._status(**status)
        self.event(
            "Normal", "Scheduled", f"Successfully assigned {self.ns}/{self.name} to {node_name}", "default-scheduler"
        )
        self.event("Normal", "Pulling", f'Pulling image "{IMAGE}"')

    def init_running(self) -> None:
        self.event("Normal", "Pulled", f'Successfully pulled image "{IMAGE}"')
        self._status(initContainerStatuses=[_cs("stage-weights", {"running": {"startedAt": now_rfc3339()}})])
        self.event("Normal", "Started", "Started container stage-weights")

    def main_running(self) -> None:
        done = {
            "terminated": {
                "exitCode": 0,
                "reason": "Completed",
                "startedAt": now_rfc3339(),
                "finishedAt": now_rfc3339(),
            }
        }
        self._status(
            phase="Running",
            podIP="10.8.0.12",
            initContainerStatuses=[_cs("stage-weights", done)] if self.init else [],
            containerStatuses=[_cs("vllm", {"running": {"startedAt": now_rfc3339()}})],
            conditions=[
                _cond("PodScheduled", True),
                _cond("Initialized", True),
                _cond("ContainersReady", False),
                _cond("Ready", False),
            ],
        )

    def ready(self) -> None:
        self._status(
            containerStatuses=[_cs("vllm", {"running": {"startedAt": now_rfc3339()}}, ready=True)],
            conditions=[
                _cond("PodScheduled", True),
                _cond("Initialized", True),
                _cond("ContainersReady", True),
                _cond("Ready", True),
            ],
        )

    # ---- faults (DESIGN.md "Faults")
    def crashloop(self, exit_code: int = 1, reason: str = "Error") -> None:
        last = {
            "terminated": {
                "exitCode": exit_code,
                "reason": reason,
                "startedAt": now_rfc3339(),
                "finishedAt": now_rfc3339(),
            }
        }
        self._status(
            phase="Running",
            containerStatuses=[
                _cs(
                    "vllm",
                    {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s restarting failed container"}},
                    restarts=1,
                    last=last,
                )
            ],
        )
        self.event("Warning", "BackOff", "Back-off restarting failed container vllm")

    def oom_killed(self) -> None:
        """lastState OOMKilled while the container is running again (before CrashLoopBackOff)."""
        last = {
            "terminated": {
                "exitCode": 137,
                "reason": "OOMKilled",
                "startedAt": now_rfc3339(),
                "finishedAt": now_rfc3339(),
            }
        }
        self._status(containerStatuses=[_cs("vllm", {"running": {"startedAt": now_rfc3339()}}, restarts=1, last=last)])

    def image_pull_error(self, reason: str = "ErrImagePull") -> None:
        self._status(
            initContainerStatuses=[
                _cs("stage-weights", {"waiting": {"reason": reason, "message": f'rpc error: "{IMAGE}": not found'}})
            ]
        )
        self.event("Warning", "Failed", f'Failed to pull image "{IMAGE}": not found')

    def config_error(self) -> None:
        msg = "couldn't find key api-key in Secret serving/vllm-api-key"
        self._status(
            containerStatuses=[_cs("vllm", {"waiting": {"reason": "CreateContainerConfigError", "message": msg}})]
        )
        self.event("Warning", "Failed", f"Error: {msg}")

    def mark_deleting(self) -> None:
        self.store.mark_deleting("pods", self.ns, self.name, 1)

    def delete(self) -> None:
        self.store.delete("pods", self.ns, self.name)


def set_deployment_ready(store: Store, name: str = NAME, ns: str = NS, ready: int = 1) -> None:
    dep = store.get("deployments", ns, name)
    dep["status"] = {
        "observedGeneration": dep["metadata"].get("generation", 1),
        "replicas": dep["spec"]["replicas"],
        "readyReplicas": ready,
        "updatedReplicas": dep["spec"]["replicas"],
        "availableReplicas": ready,
    }
    store.update("deployments", dep, status_only=True)


def reference_cluster(tmp: Path, spec: StackSpec) -> ServerThread:
    """A started API server holding the stack's namespaces, its model and front-end Deployments at 0 and one CPU
    node (no GPU node: tests add the ones they need)."""
    srv = ServerThread(tmp)

    async def setup() -> None:
        for ns in (spec.serving_namespace, spec.gateway_namespace, spec.experience_namespace):
            srv.store.create("namespaces", namespace(ns))
        for m in spec.models:
            srv.store.create("deployments", deployment(m.name, replicas=0))
        for f in spec.frontends:
            srv.store.create("deployments", deployment(f.name, spec.experience_namespace, replicas=0, gpu=False))
        srv.store.create("nodes", node("default-pool-1", "16Gi", gpus=0))

    srv.run(setup())
    return srv


def record_requests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every request the Kubernetes client sends from now on (in this process), as (method, path after the API
    group's prefix), in order."""
    from kubernetes_asyncio.client.rest import RESTClientObject

    sent: list[tuple[str, str]] = []
    orig = RESTClientObject.request

    async def request(self: RESTClientObject, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        path = url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
        sent.append((method, path.split("/v1", 1)[-1]))
        return await orig(self, method, url, *args, **kwargs)

    monkeypatch.setattr(RESTClientObject, "request", request)
    return sent
