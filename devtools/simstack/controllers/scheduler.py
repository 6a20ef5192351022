"""The default scheduler: pending pods, oldest first, bound to the least-loaded Ready node they fit
(unschedulable, taints and tolerations, node selector, allocatable resources), or marked Unschedulable
with the real scheduler's "0/N nodes are available: ..." message and a FailedScheduling event.
"""

from __future__ import annotations

from simstack.cluster_objects import parse_quantity
from simstack.controllers.context import ClusterContext
from simstack.controllers.faults import scheduling_selector
from simstack.controllers.loop import Loop
from simstack.controllers.objects import condition, pod_requests
from simstack.store import Obj, now_rfc3339


def _creation_seq(p: Obj) -> int:
    try:
        return int(p["metadata"].get("resourceVersion", "0"))
    except ValueError:
        return 0


def _tolerates(pod_spec: Obj, taint: Obj) -> bool:
    for t in pod_spec.get("tolerations") or []:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists":
            if not t.get("key") or t["key"] == taint["key"]:
                return True
        elif t.get("key") == taint["key"] and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _node_ready(node: Obj) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (node.get("status") or {}).get("conditions") or []
    )


def fit_reasons(pod: Obj, node: Obj, used: dict[str, float], extra_selector: dict[str, str] | None = None) -> list[str]:
    """Why the pod does not fit the node ([] = it fits), in the scheduler's filter order."""
    spec = pod["spec"]
    if node["spec"].get("unschedulable"):
        return ["node(s) were unschedulable"]
    for taint in node["spec"].get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(spec, taint):
            return [f"node(s) had untolerated taint {{{taint['key']}: {taint.get('value', '')}}}"]
    selector = {**(spec.get("nodeSelector") or {}), **(extra_selector or {})}
    labels = node["metadata"].get("labels") or {}
    if any(labels.get(k) != v for k, v in selector.items()):
        return ["node(s) didn't match Pod's node affinity/selector"]
    alloc = {k: parse_quantity(v) for k, v in (node["status"].get("allocatable") or {}).items()}
    reasons = []
    if used.get("pods", 0) + 1 > alloc.get("pods", 110):
        reasons.append("Too many pods")
    for res, amount in sorted(pod_requests(spec).items()):
        if amount <= 0:
            continue
        if used.get(res, 0.0) + amount > alloc.get(res, 0.0) + 1e-9:
            reasons.append(f"Insufficient {res}")
    return reasons


class Scheduler:
    def __init__(self, cluster: ClusterContext) -> None:
        self.c = cluster
        self.loop = Loop("default-scheduler", self.reconcile)

    def extra_selector(self, pod: Obj) -> dict[str, str]:
        return scheduling_selector(self.c.fault_of(pod))

    def usage(self, pods: list[Obj]) -> dict[str, dict[str, float]]:
        used: dict[str, dict[str, float]] = {}
        for p in pods:
            node = p["spec"].get("nodeName")
            if not node or (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            u = used.setdefault(node, {})
            u["pods"] = u.get("pods", 0) + 1
            for k, v in pod_requests(p["spec"]).items():
                u[k] = u.get(k, 0.0) + v
        return used

    def reconcile(self) -> None:
        store = self.c.store
        nodes = [n for n in store.list("nodes") if _node_ready(n) and not n["metadata"].get("deletionTimestamp")]
        pods = store.list("pods")
        used = self.usage(pods)
        pending = [
            p
            for p in pods
            if not p["spec"].get("nodeName")
            and not p["metadata"].get("deletionTimestamp")
            and p["spec"].get("schedulerName", "default-scheduler") == "default-scheduler"
        ]
        pending.sort(key=lambda p: (p["metadata"].get("creationTimestamp", ""), _creation_seq(p)))
        for pod in pending:
            extra = self.extra_selector(pod)
            counts: dict[str, int] = {}
            fitting = []
            for node in nodes:
                reasons = fit_reasons(pod, node, used.get(node["metadata"]["name"], {}), extra)
                if reasons:
                    for r in reasons:
                        counts[r] = counts.get(r, 0) + 1
                else:
                    fitting.append(node)
            if fitting:
                # least allocated first, then by name
                node = min(
                    fitting, key=lambda n: (used.get(n["metadata"]["name"], {}).get("pods", 0), n["metadata"]["name"])
                )
                self._bind(pod, node)
                u = used.setdefault(node["metadata"]["name"], {})
                u["pods"] = u.get("pods", 0) + 1
                for k, v in pod_requests(pod["spec"]).items():
                    u[k] = u.get(k, 0.0) + v
                continue
            n = len(nodes)
            if n == 0:
                msg = "no nodes available to schedule pods"
            else:
                detail = ", ".join(f"{cnt} {r}" for r, cnt in sorted(counts.items()))
                msg = (
                    f"0/{n} nodes are available: {detail}. preemption: 0/{n} nodes are available: "
                    f"{n} Preemption is not helpful for scheduling."
                )
            cur = condition(pod, "PodScheduled")
            if cur and cur.get("status") == "False" and cur.get("message") == msg:
                continue
            now = now_rfc3339()
            pod.setdefault("status", {})["phase"] = "Pending"
            pod["status"]["conditions"] = [
                c for c in pod["status"].get("conditions") or [] if c.get("type") != "PodScheduled"
            ] + [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": msg,
                    "lastProbeTime": None,
                    "lastTransitionTime": cur.get("lastTransitionTime", now) if cur else now,
                }
            ]
            pod = store.update("pods", pod, status_only=True)
            self.c.events.emit(pod, "FailedScheduling", msg, "Warning", component="default-scheduler")

    def _bind(self, pod: Obj, node: Obj) -> None:
        store = self.c.store
        now = now_rfc3339()
        name = node["metadata"]["name"]
        pod["spec"]["nodeName"] = name
        pod.setdefault("status", {})["conditions"] = [
            c for c in pod["status"].get("conditions") or [] if c.get("type") != "PodScheduled"
        ] + [{"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": now}]
        pod = store.update("pods", pod)
        ns = pod["metadata"]["namespace"]
        self.c.events.emit(
            pod,
            "Scheduled",
            f"Successfully assigned {ns}/{pod['metadata']['name']} to {name}",
            component="default-scheduler",
        )
