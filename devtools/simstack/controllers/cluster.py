"""The simulated cluster's controllers assembled (:class:`Cluster`): the deployment/replica-set
controller, the Job controller, the scheduler, the GPU autoscaler and the kubelet over one
:class:`ClusterContext`, woken by store changes, started and stopped together on the sim's loop; the
CPU node (and a static GPU pool) registered at start.
"""

from __future__ import annotations

from coder_stack.spec import StackSpec
from simstack.backends import Backends
from simstack.cluster_objects import CPU_IMAGES, GPU_POOL, cpu_node
from simstack.controllers.autoscaler import Autoscaler
from simstack.controllers.context import ClusterContext, StandinStarter
from simstack.controllers.deployment import DeploymentController
from simstack.controllers.job import JobController
from simstack.controllers.kubelet import Kubelet
from simstack.controllers.scheduler import Scheduler
from simstack.standins import SimServices
from simstack.store import Store, WatchEvent
from simstack.timings import Timings


class Cluster(ClusterContext):
    """All controllers of one simulated cluster. Create, then ``start()`` on the sim's loop."""

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
        super().__init__(
            store,
            backends,
            services,
            spec,
            time_scale=time_scale,
            gpu_pool=gpu_pool,
            faults=faults,
            timings=timings,
            start_standin=start_standin,
        )
        self.deployments = DeploymentController(self)
        self.scheduler = Scheduler(self)
        self.autoscaler = Autoscaler(self)
        self.kubelet = Kubelet(self)
        self.jobs = JobController(self)
        self._loops = [
            self.deployments.loop,
            self.jobs.loop,
            self.scheduler.loop,
            self.autoscaler.loop,
            self.kubelet.loop,
        ]

    def faults_changed(self) -> None:
        for lp in getattr(self, "_loops", []):  # set_fault runs in __init__ before the loops exist
            lp.kick()

    # life cycle
    def start(self) -> None:
        self.add_node(cpu_node("default-pool-1", 0), CPU_IMAGES)
        if self.gpu_pool == "static":
            for i in range(self.spec.gpus):
                self.new_gpu_node(f"{GPU_POOL}-{i + 1}")
        self.store.listeners.append(self._on_change)
        for lp in self._loops:
            lp.start()
            lp.kick()

    async def stop(self) -> None:
        if self._on_change in self.store.listeners:
            self.store.listeners.remove(self._on_change)
        self.autoscaler.stop()
        for lp in self._loops:
            await lp.stop()
        await self.kubelet.stop_all()

    def _on_change(self, ev: WatchEvent) -> None:
        p = ev.plural
        if p in ("deployments", "replicasets", "pods"):
            self.deployments.loop.kick()
        if p in ("jobs", "pods", "serviceaccounts"):
            self.jobs.loop.kick()
        if p in ("pods", "nodes"):
            self.scheduler.loop.kick()
            self.autoscaler.loop.kick()
        if p in ("pods", "nodes", "secrets", "configmaps"):
            self.kubelet.loop.kick()
        if p in ("secrets", "configmaps"):
            self.kubelet.config_changed()
