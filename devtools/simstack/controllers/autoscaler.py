"""The cluster-autoscaler of the GPU pool (one node group, max = ``spec.gpus``): a node added for a pod
that is Unschedulable but would fit the pool's node template, after the provisioning delay; idle nodes
removed after the scale-down delay; NotTriggerScaleUp / TriggeredScaleUp events as the real one writes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from simstack.cluster_objects import GPU_POOL, POOL_LABEL, gpu_node_template
from simstack.controllers.context import ClusterContext
from simstack.controllers.faults import provision_delay, scheduling_selector
from simstack.controllers.loop import Loop, log
from simstack.controllers.objects import condition, pod_requests, rand_suffix
from simstack.controllers.scheduler import fit_reasons
from simstack.store import Obj, StoreError


@dataclass
class _Upcoming:
    name: str
    pod_uid: str
    handle: asyncio.TimerHandle
    used: dict[str, float] = field(default_factory=dict)  # requests of the pods the node is coming for
    riders: list[str] = field(default_factory=list)  # further pods it will take (a time-sliced GPU node)

    def take(self, pod: Obj) -> None:
        self.used["pods"] = self.used.get("pods", 0) + 1
        for k, v in pod_requests(pod["spec"]).items():
            self.used[k] = self.used.get(k, 0.0) + v


class Autoscaler:
    """The GPU pool as one node group: scale-up for pending pods it can take, scale-down of idle nodes.

    With a static pool the group's min = max = spec.gpus (it only ever answers NotTriggerScaleUp).
    """

    def __init__(self, cluster: ClusterContext) -> None:
        self.c = cluster
        self.loop = Loop("cluster-autoscaler", self.reconcile)
        self.upcoming: dict[str, _Upcoming] = {}
        self._decided: dict[str, str] = {}  # pod uid -> last NotTriggerScaleUp message
        self._idle_since: dict[str, float] = {}

    @property
    def max_nodes(self) -> int:
        return self.c.spec.gpus

    def stop(self) -> None:
        for up in self.upcoming.values():
            up.handle.cancel()
        self.upcoming.clear()

    def reconcile(self) -> None:
        store = self.c.store
        nodes = store.list("nodes")
        pool = [n for n in nodes if (n["metadata"].get("labels") or {}).get(POOL_LABEL) == GPU_POOL]
        pods = store.list("pods")
        template = gpu_node_template(self.c.spec)
        reserved = {u.pod_uid for u in self.upcoming.values()} | {r for u in self.upcoming.values() for r in u.riders}
        live_uids = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            live_uids.add(uid)
            if pod["spec"].get("nodeName") or pod["metadata"].get("deletionTimestamp"):
                continue
            cond = condition(pod, "PodScheduled")
            if not cond or cond.get("status") != "False" or cond.get("reason") != "Unschedulable":
                continue
            if uid in reserved:
                continue
            selector = scheduling_selector(self.c.fault_of(pod))
            # a node already coming up that still has room (time-sliced GPUs: replicas x GPUs) takes the pod too
            up = next((u for u in self.upcoming.values() if not fit_reasons(pod, template, u.used, selector)), None)
            if up is not None:
                up.riders.append(uid)
                up.take(pod)
                reserved.add(uid)
                continue
            reasons = fit_reasons(pod, template, {}, selector)
            size = len(pool) + len(self.upcoming)
            if reasons:
                msg = f"pod didn't trigger scale-up: 1 {reasons[0]}"
            elif size >= self.max_nodes or self.c.gpu_pool == "static":
                msg = "pod didn't trigger scale-up: 1 max node group size reached"
            else:
                self._scale_up(pod, size)
                reserved.add(uid)
                continue
            if self._decided.get(uid) != msg:
                self._decided[uid] = msg
                self.c.events.emit(pod, "NotTriggerScaleUp", msg, component="cluster-autoscaler")
        for uid in [u for u in self._decided if u not in live_uids]:
            del self._decided[uid]
        if self.c.gpu_pool == "autoscaled":
            self._scale_down(pool, pods)

    def _scale_up(self, pod: Obj, size: int) -> None:
        name = f"{GPU_POOL}-{rand_suffix(4)}"
        delay = provision_delay(self.c.fault_of(pod), self.c.timings)
        loop = asyncio.get_running_loop()
        handle = loop.call_later(self.c.scaled(delay), self._node_arrives, name)
        self.upcoming[name] = up = _Upcoming(name, pod["metadata"]["uid"], handle)
        up.take(pod)
        self.c.events.emit(
            pod,
            "TriggeredScaleUp",
            f"pod triggered scale-up: [{{{GPU_POOL} {size}->{size + 1} (max: {self.max_nodes})}}]",
            component="cluster-autoscaler",
        )

    def _node_arrives(self, name: str) -> None:
        self.upcoming.pop(name, None)
        try:
            self.c.new_gpu_node(name)
        except StoreError:
            log.exception("could not add node %s", name)

    def _scale_down(self, pool: list[Obj], pods: list[Obj]) -> None:
        busy = {p["spec"].get("nodeName") for p in pods if p["spec"].get("nodeName")}
        mono = time.monotonic()
        unneeded = self.c.scaled(self.c.timings.scale_down_unneeded_s)
        names = set()
        for node in pool:
            name = node["metadata"]["name"]
            names.add(name)
            if name in busy:
                self._idle_since.pop(name, None)
                continue
            since = self._idle_since.setdefault(name, mono)
            if mono - since >= unneeded:
                self.c.events.emit(
                    node,
                    "ScaleDown",
                    "node removed by cluster autoscaler",
                    component="cluster-autoscaler",
                )
                self.c.store.delete("nodes", None, name)
                self.c.image_cache.pop(name, None)
                self._idle_since.pop(name, None)
            else:
                self.loop.kick_later(since + unneeded - mono + 0.001)
        for name in [n for n in self._idle_since if n not in names]:
            del self._idle_since[name]
