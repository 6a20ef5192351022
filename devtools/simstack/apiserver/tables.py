"""Server-side Tables for ``kubectl get`` (``Accept: ...;as=Table``): the columns and cells kubectl
prints per resource, with kubectl's duration format for AGE and its pod printer for the STATUS, READY
and RESTARTS columns (:func:`pod_status_reason`, the one place the sim computes a pod's STATUS).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from simstack.pods import pod_is_ready
from simstack.store import Obj, labels_of


def parse_time(ts: str | None) -> float | None:
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        dy = (hours // 24) % 365
        return f"{hours // 24 // 365}y{dy}d" if dy else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def age(ts: str | None) -> str:
    t = parse_time(ts)
    return "<unknown>" if t is None else human_duration(time.time() - t)


def selector_string(sel: dict[str, Any] | None) -> str:
    """A LabelSelector as the string form (``status.selector`` of a Scale)."""
    if not sel:
        return ""
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for expr in sel.get("matchExpressions") or []:
        op, key, vals = expr.get("operator"), expr.get("key"), expr.get("values") or []
        if op == "In":
            parts.append(f"{key} in ({','.join(sorted(vals))})")
        elif op == "NotIn":
            parts.append(f"{key} notin ({','.join(sorted(vals))})")
        elif op == "Exists":
            parts.append(str(key))
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
    return ",".join(parts)


def pod_status_reason(pod: Obj) -> tuple[str, int, int, int, str | None]:
    """kubectl's printPod: (STATUS, ready containers, total containers, restarts, last restart time)."""
    spec = pod.get("spec") or {}
    st = pod.get("status") or {}
    total = len(spec.get("containers") or [])
    reason = st.get("reason") or st.get("phase") or "Pending"
    restarts = 0
    ready = 0
    last_restart: float | None = None

    def note_restart(cs: Obj) -> None:
        nonlocal last_restart
        t = parse_time(((cs.get("lastState") or {}).get("terminated") or {}).get("finishedAt"))
        if t is not None and (last_restart is None or t > last_restart):
            last_restart = t

    initializing = False
    init_specs = spec.get("initContainers") or []
    for i, cs in enumerate(st.get("initContainerStatuses") or []):
        restarts += int(cs.get("restartCount") or 0)
        note_restart(cs)
        state = cs.get("state") or {}
        term, wait = state.get("terminated"), state.get("waiting")
        if term and term.get("exitCode") == 0:
            continue
        if term:
            if term.get("reason"):
                reason = "Init:" + term["reason"]
            elif term.get("signal"):
                reason = f"Init:Signal:{term['signal']}"
            else:
                reason = f"Init:ExitCode:{term.get('exitCode')}"
        elif wait and wait.get("reason") and wait["reason"] != "PodInitializing":
            reason = "Init:" + wait["reason"]
        else:
            reason = f"Init:{i}/{len(init_specs)}"
        initializing = True
        break
    if not initializing:
        restarts = 0
        has_running = False
        for cs in reversed(st.get("containerStatuses") or []):
            restarts += int(cs.get("restartCount") or 0)
            note_restart(cs)
            state = cs.get("state") or {}
            term, wait = state.get("terminated"), state.get("waiting")
            if wait and wait.get("reason"):
                reason = wait["reason"]
            elif term and term.get("reason"):
                reason = term["reason"]
            elif term:
                reason = f"Signal:{term['signal']}" if term.get("signal") else f"ExitCode:{term.get('exitCode')}"
            elif cs.get("ready") and state.get("running") is not None:
                has_running = True
                ready += 1
        if reason == "Completed" and has_running:
            reason = "Running" if pod_is_ready(pod) else "NotReady"
    if pod["metadata"].get("deletionTimestamp") and st.get("reason") == "NodeLost":
        reason = "Unknown"
    elif pod["metadata"].get("deletionTimestamp") and st.get("phase") not in ("Succeeded", "Failed"):
        reason = "Terminating"  # kubectl: a finished pod being deleted keeps its Completed/Error
    last = f"{human_duration(time.time() - last_restart)} ago" if last_restart is not None else None
    return reason, ready, total, restarts, last


# ------------------------------------------------------------------ tables
def _col(name: str, typ: str = "string", fmt: str = "", priority: int = 0, desc: str = "") -> Obj:
    return {"name": name, "type": typ, "format": fmt, "description": desc or name, "priority": priority}


def _table_columns_and_cells(plural: str) -> tuple[list[Obj], Callable[[Obj], list[Any]]]:
    if plural == "deployments":

        def dep(o: Obj) -> list[Any]:
            spec, st = o.get("spec") or {}, o.get("status") or {}
            cs = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
            return [
                o["metadata"]["name"],
                f"{st.get('readyReplicas', 0)}/{spec.get('replicas', 1)}",
                st.get("updatedReplicas", 0),
                st.get("availableReplicas", 0),
                age(o["metadata"].get("creationTimestamp")),
                ",".join(c.get("name", "") for c in cs),
                ",".join(c.get("image", "") for c in cs),
                selector_string(spec.get("selector")),
            ]

        return [
            _col("Name", fmt="name"),
            _col("Ready"),
            _col("Up-to-date", "integer"),
            _col("Available", "integer"),
            _col("Age"),
            _col("Containers", priority=1),
            _col("Images", priority=1),
            _col("Selector", priority=1),
        ], dep
    if plural == "replicasets":

        def rs(o: Obj) -> list[Any]:
            spec, st = o.get("spec") or {}, o.get("status") or {}
            return [
                o["metadata"]["name"],
                spec.get("replicas", 1),
                st.get("replicas", 0),
                st.get("readyReplicas", 0),
                age(o["metadata"].get("creationTimestamp")),
            ]

        return [
            _col("Name", fmt="name"),
            _col("Desired", "integer"),
            _col("Current", "integer"),
            _col("Ready", "integer"),
            _col("Age"),
        ], rs
    if plural == "pods":

        def pod(o: Obj) -> list[Any]:
            reason, ready, total, restarts, last = pod_status_reason(o)
            st = o.get("status") or {}
            return [
                o["metadata"]["name"],
                f"{ready}/{total}",
                reason,
                f"{restarts} ({last})" if last and restarts else str(restarts),
                age(o["metadata"].get("creationTimestamp")),
                st.get("podIP") or "<none>",
                (o.get("spec") or {}).get("nodeName") or "<none>",
                st.get("nominatedNodeName") or "<none>",
                "<none>",
            ]

        return [
            _col("Name", fmt="name"),
            _col("Ready"),
            _col("Status"),
            _col("Restarts"),
            _col("Age"),
            _col("IP", priority=1),
            _col("Node", priority=1),
            _col("Nominated Node", priority=1),
            _col("Readiness Gates", priority=1),
        ], pod
    if plural == "nodes":

        def node(o: Obj) -> list[Any]:
            conds = (o.get("status") or {}).get("conditions") or []
            ready = next((c for c in conds if c.get("type") == "Ready"), None)
            status = "Unknown" if ready is None else ("Ready" if ready.get("status") == "True" else "NotReady")
            if (o.get("spec") or {}).get("unschedulable"):
                status += ",SchedulingDisabled"
            roles = sorted(
                k.split("/", 1)[1] for k in labels_of(o) if k.startswith("node-role.kubernetes.io/") and "/" in k
            )
            info = (o.get("status") or {}).get("nodeInfo") or {}
            return [
                o["metadata"]["name"],
                status,
                ",".join(roles) or "<none>",
                age(o["metadata"].get("creationTimestamp")),
                info.get("kubeletVersion", ""),
            ]

        return [_col("Name", fmt="name"), _col("Status"), _col("Roles"), _col("Age"), _col("Version")], node
    if plural == "services":

        def svc(o: Obj) -> list[Any]:
            spec = o.get("spec") or {}
            ports = ",".join(
                f"{p.get('port')}{':' + str(p['nodePort']) if p.get('nodePort') else ''}/{p.get('protocol', 'TCP')}"
                for p in spec.get("ports") or []
            )
            lb = ((o.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            ext = ",".join(i.get("ip") or i.get("hostname", "") for i in lb) or (
                "<pending>" if spec.get("type") == "LoadBalancer" else "<none>"
            )
            return [
                o["metadata"]["name"],
                spec.get("type", "ClusterIP"),
                spec.get("clusterIP") or "<none>",
                ext,
                ports or "<none>",
                age(o["metadata"].get("creationTimestamp")),
                ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items())) or "<none>",
            ]

        return [
            _col("Name", fmt="name"),
            _col("Type"),
            _col("Cluster-IP"),
            _col("External-IP"),
            _col("Port(s)"),
            _col("Age"),
            _col("Selector", priority=1),
        ], svc
    if plural == "secrets":

        def sec(o: Obj) -> list[Any]:
            return [
                o["metadata"]["name"],
                o.get("type", "Opaque"),
                len(o.get("data") or {}),
                age(o["metadata"].get("creationTimestamp")),
            ]

        return [_col("Name", fmt="name"), _col("Type"), _col("Data", "integer"), _col("Age")], sec
    if plural == "namespaces":

        def ns(o: Obj) -> list[Any]:
            return [
                o["metadata"]["name"],
                (o.get("status") or {}).get("phase", "Active"),
                age(o["metadata"].get("creationTimestamp")),
            ]

        return [_col("Name", fmt="name"), _col("Status"), _col("Age")], ns

    def generic(o: Obj) -> list[Any]:
        return [o["metadata"]["name"], age(o["metadata"].get("creationTimestamp"))]

    return [_col("Name", fmt="name"), _col("Created At", "date")], generic


def to_table(plural: str, items: list[Obj], rv: str, include: str) -> Obj:
    cols, cells = _table_columns_and_cells(plural)
    rows = []
    for o in items:
        row: Obj = {"cells": cells(o)}
        if include == "Object":
            row["object"] = o
        elif include != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": o.get("metadata", {}),
            }
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": cols,
        "rows": rows,
    }


def wants_table(request: web.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")
