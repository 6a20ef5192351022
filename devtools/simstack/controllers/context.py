"""What every controller shares of one simulated cluster (:class:`ClusterContext`): the store, the
Service backends, the stand-ins' services, the spec, simulated time, the injected faults, the image
cache of the nodes, events, and how a node joins and a stand-in starts. :class:`Cluster` adds the
controllers on top; the controllers see only this.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable

from coder_stack.spec import ModelSpec, StackSpec
from simstack.backends import Backends
from simstack.cluster_objects import NAME_LABEL, gpu_node
from simstack.controllers.events import EventRecorder
from simstack.controllers.faults import check_fault
from simstack.podruntime import PodRuntime
from simstack.standins import ContainerRun, RunningBackend, SimServices
from simstack.store import Obj, Store, now_rfc3339
from simstack.timings import Timings

log = logging.getLogger("simstack.controllers")
StandinStarter = Callable[[ContainerRun, SimServices], Awaitable[RunningBackend | None]]


class ClusterContext:
    """One simulated cluster's shared state and services, as the controllers use them."""

    def __init__(
        self,
        store: Store,
        backends: Backends,
        services: SimServices,
        spec: StackSpec,
        *,
        time_scale: float = 1.0,
        gpu_pool: str = "autoscaled",
        faults: dict[str, str] | None = None,
        timings: Timings | None = None,
        start_standin: StandinStarter | None = None,
    ) -> None:
        if gpu_pool not in ("autoscaled", "static"):
            raise ValueError(f"gpu_pool must be 'autoscaled' or 'static', got {gpu_pool!r}")
        self.store = store
        self.backends = backends
        self.services = services
        self.spec = spec
        self.time_scale = time_scale
        self.gpu_pool = gpu_pool
        self.timings = timings or Timings()
        self.faults: dict[str, str] = {}
        for name, fault in (faults or {}).items():
            self.set_fault(name, fault)
        self._start_standin = start_standin
        self.events = EventRecorder(store)
        self._node_index = 0
        self.image_cache: dict[str, set[str]] = {}
        self.runtime: PodRuntime | None = None  # runnable images (SimStack's runnable_images)

    # time
    def scaled(self, sim_seconds: float) -> float:
        return sim_seconds * self.time_scale

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(self.scaled(sim_seconds))

    # faults
    def set_fault(self, deployment: str, fault: str | None) -> None:
        check_fault(deployment, fault)
        if fault is None or fault == "" or fault == "none":
            self.faults.pop(deployment, None)
        else:
            self.faults[deployment] = fault
        self.faults_changed()

    def faults_changed(self) -> None:
        """Hook: the faults changed (the cluster kicks its controllers)."""

    def fault_of(self, pod: Obj) -> str | None:
        return self.faults.get((pod["metadata"].get("labels") or {}).get(NAME_LABEL, ""))

    def model_of(self, pod: Obj) -> ModelSpec | None:
        if pod["metadata"].get("namespace") != self.spec.serving_namespace:
            return None
        app = (pod["metadata"].get("labels") or {}).get(NAME_LABEL)
        for m in self.spec.models:
            if m.name == app:
                return m
        return None

    # nodes
    def add_node(self, node: Obj, cached_images: tuple[str, ...] = ()) -> Obj:
        node = copy.deepcopy(node)
        now = now_rfc3339()
        node["status"]["conditions"] = [
            {
                "type": t,
                "status": "False",
                "reason": r,
                "message": m,
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
            for t, r, m in (
                ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            )
        ] + [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        ]
        self.image_cache[node["metadata"]["name"]] = set(cached_images)
        return self.store.create("nodes", node)

    def next_node_index(self) -> int:
        self._node_index += 1
        return self._node_index

    def new_gpu_node(self, name: str) -> Obj:
        return self.add_node(gpu_node(self.spec, name, self.next_node_index()))

    def has_standin(self, image: str) -> bool:
        """Whether the kubelet can give a container of this image its behaviour through a stand-in (a custom
        starter is asked for every image)."""
        if self._start_standin is not None:
            return True
        from simstack import standins

        try:
            return standins.has_standin(image)
        except ImportError:  # the stand-in modules are not there (yet): pods without a backend, as before
            return True

    async def start_standin(self, run: ContainerRun) -> RunningBackend | None:
        if self._start_standin is not None:
            return await self._start_standin(run, self.services)
        from simstack import standins

        try:
            return await standins.start_standin(run, self.services)
        except ImportError as e:  # the stand-in modules are not there (yet): a pod without a backend
            log.warning("no stand-in for %s (%s)", run.image, e)
            return None
