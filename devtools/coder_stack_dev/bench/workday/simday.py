"""The same day on the simulated cluster (:class:`SimDay`): the replay's policy logic driving a ``SimStack``."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from typing import Any

import httpx

from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.spec import StackSpec
from coder_stack.usecases.idle import read_idleness
from coder_stack_dev.bench.workday.day import Day, GpuNode, Pod
from coder_stack_dev.bench.workday.policy import Policy
from coder_stack_dev.bench.workday.result import Result
from coder_stack_dev.bench.workday.schedules import MINUTE, Schedules, hm, read_schedules
from coder_stack_dev.bench.workday.trace import Trace


class SimDay(Day):
    """The same policy logic as :class:`Day`, but the cluster is the real simulated one: a ``SimStack``
    (autoscaled GPU pool, empty at the start, ``time_scale``), its deployment controller, scheduler, kubelet
    and cluster-autoscaler; the requests are HTTP requests to the stand-in vLLM pod; each reclaim tick calls
    ``coder_stack.usecases.idle.read_idleness`` through the Kubernetes API (port-forward to /metrics, the
    reading kept on the Deployment). The sim runs on the wall clock compressed by ``time_scale``, so the spec
    given to read_idleness has ``idle_after_s`` and ``idle_grace_s`` times ``time_scale``. Still modelled as in
    the replay: the GPU slot (no Prefect server), the flows' own durations (the driver's calls take wall time
    that counts as simulated time), the users' instant bring-back, the wake's latency (a delay in simulated time
    before the wake flow acts, as in the replay).
    """

    def __init__(self, policy: Policy, trace: Trace, schedules: Schedules, time_scale: float, start_s: float) -> None:
        super().__init__(policy, trace, schedules)
        self.scale_f = time_scale
        self.start_s = start_s
        self.wall_spec = self.spec.model_copy(
            update={
                "idle_after_s": self.spec.idle_after_s * time_scale,
                "idle_grace_s": self.spec.idle_grace_s * time_scale,
            }
        )
        self.sim_pods: dict[str, set[str]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.sim: Any = None
        self.api: Any = None
        self._m0 = 0.0
        self._aloop: asyncio.AbstractEventLoop | None = None

    # ---- clocks
    def _vnow(self) -> float:
        return self.start_s + (time.monotonic() - self._m0) / self.scale_f

    def _wall(self, v: float) -> float:
        return self._m0 + (v - self.start_s) * self.scale_f

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """From the sim's thread: run ``fn`` on the driver's loop at the simulated now."""

        def call() -> None:
            self.now = self._vnow()
            fn(*args)

        assert self._aloop is not None
        self._aloop.call_soon_threadsafe(call)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- run
    def run(self) -> Result:
        from simstack.stack import SimStack

        with SimStack(spec=StackSpec(), time_scale=self.scale_f, gpu_pool="autoscaled") as sim:
            self.sim = sim
            # a workday after the first: every model's weights already on the model-cache PVC
            assert sim.cluster is not None
            sim.call(sim.cluster.kubelet.weights_cached.update, [m.name for m in self.spec.models])
            sim.call(sim.store.listeners.append, self._listen)
            return asyncio.run(self._arun())

    async def _arun(self) -> Result:
        self._aloop = asyncio.get_running_loop()
        self.now = self.start_s
        self._seed()
        self._q = [e for e in self._q if e[0] >= self.start_s]  # nothing happens before the start
        heapq.heapify(self._q)
        self.at(self.trace.end, lambda: None)  # run until the end: nodes drain after the last event
        kubeconfig = str(self.sim.kubeconfig_path)
        async with open_api(ClusterTarget(kubeconfig=kubeconfig)) as api:
            self.api = api
            self._m0 = time.monotonic()
            while self._q:
                t = self._q[0][0]
                if t > self.trace.end:
                    break
                delay = self._wall(t) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(min(delay, 0.01))
                    continue
                _, _, fn = heapq.heappop(self._q)
                self.now = max(t, self._vnow())
                fn()
                await asyncio.sleep(0)
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self.now = self.trace.end
        return self._result()

    # ---- what the sim's store shows (its listener runs on the sim's thread)
    def _listen(self, ev: Any) -> None:
        from simstack.cluster_objects import GPU_POOL, POOL_LABEL

        obj = ev.obj
        meta = obj.get("metadata") or {}
        if ev.plural == "nodes" and (meta.get("labels") or {}).get(POOL_LABEL) == GPU_POOL:
            if ev.type == "ADDED":
                self._post(self._node_added, meta["name"])
            elif ev.type == "DELETED":
                self._post(self._node_deleted, meta["name"])
        elif ev.plural == "events" and ev.type == "ADDED" and obj.get("reason") == "TriggeredScaleUp":
            self._post(self._scale_up)
        elif ev.plural == "pods" and meta.get("namespace") == self.spec.serving_namespace:
            model = (meta.get("labels") or {}).get("app.kubernetes.io/name", "")
            if model not in self.replicas:
                return
            if ev.type == "ADDED":
                self._post(self._pod_added, model, meta["name"])
            elif ev.type == "DELETED":
                self._post(self._pod_deleted, model, meta["name"])
            elif _pod_ready(obj) and not _pod_ready(ev.old):
                self._post(self._pod_ready, model)

    def _scale_up(self) -> None:
        self.nodes.append(GpuNode("", self.now))
        self.log("TriggeredScaleUp: GPU node provisioning (billed from now)")

    def _node_added(self, name: str) -> None:
        node = next((n for n in self.nodes if not n.name), None)
        if node is None:
            node = GpuNode(name, self.now)
            self.nodes.append(node)
        node.name, node.ready = name, self.now
        self.log(f"GPU node {name} Ready")

    def _node_deleted(self, name: str) -> None:
        for n in self.nodes:
            if n.name == name and n.removed is None:
                n.removed = self.now
                self.log(f"GPU node {name} removed by the autoscaler (billed {hm(n.requested)}-{hm(self.now)})")

    def _pod_added(self, model: str, name: str) -> None:
        self.sim_pods.setdefault(model, set()).add(name)

    def _pod_deleted(self, model: str, name: str) -> None:
        left = self.sim_pods.setdefault(model, set())
        left.discard(name)
        if not left:
            self.log(f"{model} pod gone")
            for fn in self._on_gone.pop(model, []):
                fn()

    def _pod_ready(self, model: str) -> None:
        pod = self.pods.get(model)
        if self.replicas[model] == 1 and pod is not None and pod.ready_at is None:
            pod.ready_at = self.now
            self.log(f"{model} Ready")
            for fn in self._on_ready.pop(model, []):
                fn()

    # ---- what the day does to the sim
    def _has_pods(self, model: str) -> bool:
        return bool(self.sim_pods.get(model))

    def _apply(self, model: str, replicas: int) -> None:
        from simstack.store import Store

        if replicas == 1:
            self.pods[model] = Pod(model, self.now)
        else:
            self.pods.pop(model, None)
        ns = self.spec.serving_namespace

        def _scale(store: Store) -> None:
            d = store.get("deployments", ns, model)
            d["spec"]["replicas"] = replicas
            store.update("deployments", d)

        self.sim.call(_scale, self.sim.store)

    def serve(self, model: str, n: int = 1) -> None:
        self._spawn(self._requests(model, n))

    async def _requests(self, model: str, n: int) -> None:
        m = self.spec.model(model)
        base = self.sim.backends.resolve_url(self.spec.service_url(m.name, self.spec.serving_namespace, m.port))
        headers = {"Authorization": f"Bearer {self.sim.secrets['vllm_key']}"}
        body = {"model": m.served_model_name, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(timeout=30) as http:
            for _ in range(n):
                resp = await http.post(f"{base}/v1/chat/completions", json=body, headers=headers)
                if resp.status_code != 200:
                    self.log(f"request to {model} answered {resp.status_code}")

    def _read_and_reclaim(self) -> None:
        self._spawn(self._areclaim())

    async def _areclaim(self) -> None:
        for name, reps in list(self.replicas.items()):
            if not reps or not self.is_ready(name):
                continue
            idle = await read_idleness(self.api, self.wall_spec, self.wall_spec.model(name))
            self.now = self._vnow()
            if idle.idle and self.replicas[name] and self.slot is None:
                reason = f"idle {idle.idle_s / self.scale_f / MINUTE:.1f} simulated min (read_idleness: {idle.reason})"
                self.log(f"reclaim: {name} {reason}: scaled to 0")
                self.reclaims.append({"model": name, "at": hm(self.now), "reason": reason})
                self.scale(name, 0, "reclaim_idle_models")


def _pod_ready(obj: dict[str, Any] | None) -> bool:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def sim_day(policy: Policy, trace: Trace, time_scale: float, schedules: Schedules | None = None) -> Result:
    """``policy``'s day on the simulated cluster, from a minute before its first event to ``trace.end``."""
    starts = [policy.up_s, trace.first] + ([trace.killed_start] if trace.killed_run else [])
    start = min(starts) - 5 * MINUTE
    return SimDay(policy, trace, schedules or read_schedules(), time_scale, start).run()
