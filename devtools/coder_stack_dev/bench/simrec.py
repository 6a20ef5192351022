"""What the simulated cluster itself saw, recorded by a store listener on the sim's own thread.

- when each pod's Ready condition turned True (``time.monotonic()`` and ``time.time()`` at the store
  write of that status: the simulated cluster's own clock, in this process);
- when a container of a pod first showed each waiting reason (``CrashLoopBackOff``, ``ErrImagePull`` ...),
  at the store write of that status;
- GPU pods: how many exist (Pending, bound, Running or Terminating: a GPU is not free until the pod is
  gone) and how many are bound to a node, the maximum of each, and how often either exceeded the GPUs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from simstack.stack import SimStack
from simstack.store import WatchEvent

GPU_RESOURCE = "nvidia.com/gpu"


def _is_ready(obj: dict[str, Any] | None) -> bool:
    if not obj:
        return False
    conds = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def _is_gpu_pod(obj: dict[str, Any]) -> bool:
    for c in (obj.get("spec") or {}).get("containers") or []:
        limits = (c.get("resources") or {}).get("limits") or {}
        if str(limits.get(GPU_RESOURCE, "0")) not in ("0", ""):
            return True
    return False


@dataclass
class ReadyMark:
    mono: float
    wall: float
    namespace: str
    pod: str
    app: str


@dataclass
class WaitingMark:
    mono: float
    pod: str
    app: str
    reason: str


def _waiting_reasons(obj: dict[str, Any] | None) -> set[str]:
    st = (obj or {}).get("status") or {}
    statuses = (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or [])
    return {str(w["reason"]) for c in statuses if (w := (c.get("state") or {}).get("waiting")) and w.get("reason")}


@dataclass
class SimRecorder:
    gpus: int
    ready: list[ReadyMark] = field(default_factory=list)
    waiting: list[WaitingMark] = field(default_factory=list)
    live: set[str] = field(default_factory=set)
    bound: set[str] = field(default_factory=set)
    max_live: int = 0
    max_bound: int = 0
    overcommit_live: int = 0  # times the GPU pods in existence went above the GPUs
    overcommit_bound: int = 0  # times the GPU pods bound to nodes went above the GPUs
    gpu_pods_seen: int = 0

    @classmethod
    def attach(cls, sim: SimStack, gpus: int) -> SimRecorder:
        rec = cls(gpus=gpus)
        sim.call(sim.store.listeners.append, rec.on_event)
        return rec

    def on_event(self, ev: WatchEvent) -> None:
        if ev.plural != "pods":
            return
        obj = ev.obj
        meta = obj.get("metadata") or {}
        if ev.type != "DELETED" and _is_ready(obj) and not _is_ready(ev.old):
            self.ready.append(
                ReadyMark(
                    time.monotonic(),
                    time.time(),
                    meta.get("namespace", ""),
                    meta.get("name", ""),
                    (meta.get("labels") or {}).get("app.kubernetes.io/name", ""),
                )
            )
        if ev.type != "DELETED":
            app = (meta.get("labels") or {}).get("app.kubernetes.io/name", "")
            for reason in sorted(_waiting_reasons(obj) - _waiting_reasons(ev.old)):
                self.waiting.append(WaitingMark(time.monotonic(), meta.get("name", ""), app, reason))
        if not _is_gpu_pod(obj):
            return
        uid = meta.get("uid") or meta.get("name", "")
        if ev.type == "DELETED":
            self.live.discard(uid)
            self.bound.discard(uid)
            return
        if uid not in self.live:
            self.gpu_pods_seen += 1
            self.live.add(uid)
            if len(self.live) > self.gpus:
                self.overcommit_live += 1
        if (obj.get("spec") or {}).get("nodeName") and uid not in self.bound:
            self.bound.add(uid)
            if len(self.bound) > self.gpus:
                self.overcommit_bound += 1
        self.max_live = max(self.max_live, len(self.live))
        self.max_bound = max(self.max_bound, len(self.bound))

    def first_ready(self, app: str, after: float = 0.0) -> ReadyMark | None:
        return next((r for r in self.ready if r.app == app and r.mono >= after), None)

    def first_waiting(self, app: str, reason: str) -> WaitingMark | None:
        return next((w for w in self.waiting if w.app == app and w.reason == reason), None)
