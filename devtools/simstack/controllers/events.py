"""core/v1 Events as the real components write them (kubelet, scheduler, controllers, autoscaler):
one Event per (object, reason, message, source), repeats bump ``count`` and ``lastTimestamp``.
"""

from __future__ import annotations

import time
from typing import Any

from simstack.store import Obj, Store, now_rfc3339


class EventRecorder:
    """core/v1 Events as the real components write them; repeats bump count and lastTimestamp."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._names: dict[tuple[Any, ...], tuple[str, str]] = {}
        self._seq = 0

    def emit(
        self,
        obj: Obj,
        reason: str,
        message: str,
        type_: str = "Normal",
        component: str = "kubelet",
        host: str | None = None,
        field_path: str | None = None,
    ) -> None:
        meta = obj["metadata"]
        ns = meta.get("namespace") or "default"
        key = (meta.get("uid"), reason, message, type_, component, field_path)
        now = now_rfc3339()
        known = self._names.get(key)
        if known:
            ev = self._store.find("events", known[0], known[1])
            if ev is not None:
                ev["count"] = int(ev.get("count") or 1) + 1
                ev["lastTimestamp"] = now
                self._store.update("events", ev)
                return
        self._seq += 1
        name = f"{meta['name']}.{time.time_ns() + self._seq:x}"
        involved = {
            "kind": obj.get("kind"),
            "namespace": meta.get("namespace"),
            "name": meta["name"],
            "uid": meta.get("uid"),
            "apiVersion": obj.get("apiVersion"),
            "resourceVersion": meta.get("resourceVersion"),
        }
        if field_path:
            involved["fieldPath"] = field_path
        source: Obj = {"component": component}
        if host:
            source["host"] = host
        ev = {
            "metadata": {"name": name, "namespace": ns},
            "involvedObject": {k: v for k, v in involved.items() if v is not None},
            "reason": reason,
            "message": message,
            "type": type_,
            "source": source,
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "eventTime": None,
            "reportingComponent": component,
            "reportingInstance": host or "",
        }
        self._store.create("events", ev, namespace=ns)
        self._names[key] = (ns, name)
