"""Small readers and makers of wire-form objects that several controllers share: a condition by type,
a pod's effective resource requests, and the random name suffixes of generated objects.
"""

from __future__ import annotations

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
