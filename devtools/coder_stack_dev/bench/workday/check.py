"""The check of the replay's cluster model: the node steps measured on a fresh simulated cluster
(:func:`sim_check`) beside the same steps through the replay (:func:`modelled_durations`)."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from simstack.timings import Timings, model_timings

from coder_stack.spec import StackSpec
from coder_stack_dev.bench.workday.day import CHAT, Day, GpuNode
from coder_stack_dev.bench.workday.policy import Policy
from coder_stack_dev.bench.workday.schedules import read_schedules
from coder_stack_dev.bench.workday.trace import Trace


@dataclass
class _SimMarks:
    nodes_added: list[float] = field(default_factory=list)
    nodes_deleted: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)
    gone: list[float] = field(default_factory=list)


def modelled_durations(timings: Timings | None = None) -> dict[str, float]:
    """The same steps as :func:`sim_check`, through the replay's own cluster model (:class:`Day`).

    The replay assumes the weights are on the PVC; the sim check's first start stages them, so its first step
    is the replay's cold start plus the staging the replay never does (``model_timings`` of coder-chat)."""
    t = timings or Timings()
    day = Day(
        Policy("check", "check", 0.0, 0.0, False), Trace((0.0,), 0.0, 0.0, 60.0, 0.0), read_schedules(), timings=t
    )
    marks: dict[str, float] = {}

    def step(name: str, then: Callable[[], None] | None = None) -> Callable[[], None]:
        def fn() -> None:
            marks[name] = day.now
            if then is not None:
                then()

        return fn

    def first_down() -> None:
        node = day._node()
        day.scale(CHAT, 0)
        wait_removed(node)

    def wait_removed(node: GpuNode | None) -> None:
        def poll() -> None:
            if node is not None and node.removed is None:
                day.at(day.now + 1.0, poll)
            else:
                marks["removed"] = day.now
                up_again()

        poll()

    def up_again() -> None:
        marks["up2"] = day.now
        day.scale(CHAT, 1)
        day.when_ready(CHAT, step("ready2", down_up))

    def down_up() -> None:
        def again() -> None:
            marks["up3"] = day.now
            day.up(CHAT, step("ready3"))

        day.when_gone([CHAT], again)

    day.scale(CHAT, 1)
    day.when_ready(CHAT, step("ready1", first_down))
    while day._q:
        tt, _, fn = heapq.heappop(day._q)
        day.now = tt
        fn()
    staging = model_timings(StackSpec().model(CHAT)).weights_s - t.weights_cached_s
    return {
        "first_cold_start_s": marks["ready1"] + staging,
        "scale_to_0_until_node_removed_s": marks["removed"] - marks["ready1"],
        "cold_start_new_node_s": marks["ready2"] - marks["up2"],
        "warm_start_same_node_s": marks["ready3"] - marks["up3"],
    }


def sim_check(time_scale: float, timeout_s: float = 120.0) -> dict[str, Any]:
    """On a fresh simulated cluster (autoscaled GPU pool, empty): coder-chat up from nothing; down until the
    autoscaler removes the node; up again on a new node (weights now on the PVC); down and at once up again
    on the same node. The measured simulated seconds of each step, and the replay's."""
    from simstack.cluster_objects import GPU_POOL, POOL_LABEL
    from simstack.stack import SimStack
    from simstack.store import Store, WatchEvent

    spec = StackSpec()
    ns = spec.serving_namespace
    marks = _SimMarks()

    def on_event(ev: WatchEvent) -> None:
        obj, mono = ev.obj, time.monotonic()
        if ev.plural == "nodes" and (obj["metadata"].get("labels") or {}).get(POOL_LABEL) == GPU_POOL:
            (marks.nodes_deleted if ev.type == "DELETED" else marks.nodes_added if ev.type == "ADDED" else []).append(
                mono
            )
        if ev.plural == "pods" and (obj["metadata"].get("labels") or {}).get("app.kubernetes.io/name") == CHAT:
            conds = (obj.get("status") or {}).get("conditions") or []
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)
            old = ((ev.old or {}).get("status") or {}).get("conditions") or []
            was = any(c.get("type") == "Ready" and c.get("status") == "True" for c in old)
            if ev.type == "DELETED":
                marks.gone.append(mono)
            elif ready and not was:
                marks.ready.append(mono)

    def wait(pred: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError(f"sim check: {what} did not happen within {timeout_s:.0f} s")
            time.sleep(0.002)

    with SimStack(spec=spec, time_scale=time_scale, gpu_pool="autoscaled") as sim:
        sim.call(sim.store.listeners.append, on_event)

        def scale(n: int) -> float:
            def _scale(store: Store) -> None:
                d = store.get("deployments", ns, CHAT)
                d["spec"]["replicas"] = n
                store.update("deployments", d)

            t = time.monotonic()
            sim.call(_scale, sim.store)
            return t

        t0 = scale(1)
        wait(lambda: len(marks.ready) >= 1, "coder-chat Ready (fresh cluster)")
        t1 = scale(0)
        wait(lambda: len(marks.nodes_deleted) >= 1, "the GPU node removed")
        t2 = scale(1)
        wait(lambda: len(marks.ready) >= 2, "coder-chat Ready on a new node")
        scale(0)
        wait(lambda: len(marks.gone) >= 2, "coder-chat pod gone")
        t3 = scale(1)
        wait(lambda: len(marks.ready) >= 3, "coder-chat Ready on the same node")
        scale(0)
        same_node = len(marks.nodes_added) == 2
    measured = {
        "first_cold_start_s": (marks.ready[0] - t0) / time_scale,
        "scale_to_0_until_node_removed_s": (marks.nodes_deleted[0] - t1) / time_scale,
        "cold_start_new_node_s": (marks.ready[1] - t2) / time_scale,
        "warm_start_same_node_s": (marks.ready[2] - t3) / time_scale,
    }
    modelled = modelled_durations()
    return {
        "time_scale": time_scale,
        "measured_s": {k: round(v, 1) for k, v in measured.items()},
        "modelled_s": modelled,
        "ratio": {k: round(measured[k] / modelled[k], 3) for k in measured},
        "third_start_on_the_same_node": same_node,
    }
