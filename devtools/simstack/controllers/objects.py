"""Small readers and makers of wire-form objects that several controllers share: a condition by type,
a pod's effective resource requests, the random name suffixes of generated objects, and a pod made from
its controller's template.
"""

from __future__ import annotations

import copy
import random

from simstack.cluster_objects import parse_quantity
from simstack.store import Obj

SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def condition(obj: Obj, ctype: str) -> Obj | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None


def rand_suffix(n: int = 5) -> str:
    return "".join(random.choice(SAFE_ALPHABET) for _ in range(n))


def pod_requests(spec: Obj) -> dict[str, float]:
    """Effective requests: max(sum of containers, any init container), requests defaulting to limits."""

    def one(c: Obj) -> dict[str, float]:
        res = c.get("resources") or {}
        req = dict(res.get("limits") or {})
        req.update(res.get("requests") or {})
        return {k: parse_quantity(v) for k, v in req.items()}

    total: dict[str, float] = {}
    for c in spec.get("containers") or []:
        for k, v in one(c).items():
            total[k] = total.get(k, 0.0) + v
    for c in spec.get("initContainers") or []:
        for k, v in one(c).items():
            total[k] = max(total.get(k, 0.0), v)
    return total


def pod_from_template(owner: Obj, template: Obj, restart_policy: str = "Always") -> Obj:
    """The pod a controller (ReplicaSet, Job) creates from its template: the registry's pod defaults, the
    template's labels and annotations, ``generateName`` from the owner and a controller ownerReference."""
    tmeta = template.get("metadata") or {}
    spec = copy.deepcopy(template["spec"])
    spec.setdefault("restartPolicy", restart_policy)
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("serviceAccountName", "default")
    spec.setdefault("serviceAccount", spec["serviceAccountName"])
    spec.setdefault("securityContext", {})
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("priority", 0)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    tol = spec.setdefault("tolerations", [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        tol.append({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300})
    for c in (spec.get("initContainers") or []) + spec["containers"]:
        c.setdefault("imagePullPolicy", "IfNotPresent")
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        c.setdefault("resources", {})
    qos = "Burstable" if pod_requests(spec) else "BestEffort"
    meta = owner["metadata"]
    pod: Obj = {
        "metadata": {
            "name": f"{meta['name']}-{rand_suffix()}",
            "generateName": f"{meta['name']}-",
            "namespace": meta["namespace"],
            "labels": dict(tmeta.get("labels") or {}),
            "ownerReferences": [
                {
                    "apiVersion": owner["apiVersion"],
                    "kind": owner["kind"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
        "status": {"phase": "Pending", "qosClass": qos},
    }
    if tmeta.get("annotations"):
        pod["metadata"]["annotations"] = dict(tmeta["annotations"])
    return pod
