"""The deployment and replica-set controllers: a ReplicaSet per pod template (pod-template-hash),
rolling updates within maxSurge/maxUnavailable or Recreate, revisions and rollbacks, history clean-up,
pods created and deleted to the replica count, garbage collection of orphans, and the status and
conditions (Available, Progressing, ProgressDeadlineExceeded) the real controllers write.
"""

from __future__ import annotations

import copy
import json
import math
import time
from typing import Any

from simstack.controllers.context import ClusterContext
from simstack.controllers.loop import Loop, log
from simstack.controllers.objects import SAFE_ALPHABET, pod_from_template
from simstack.pods import pod_is_ready
from simstack.store import Obj, Store, StoreError, controller_uid, now_rfc3339

HASH_LABEL = "pod-template-hash"


def template_hash(template: Obj) -> str:
    """FNV-1a 32 of the template, safe-encoded like the deployment controller's pod-template-hash."""
    h = 0x811C9DC5
    for b in json.dumps(template, sort_keys=True).encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return "".join(SAFE_ALPHABET[ord(c) % len(SAFE_ALPHABET)] for c in str(h))


def _set_condition(conds: list[Obj], new: Obj, *, deployment: bool = True) -> None:
    """SetDeploymentCondition: same status and reason -> unchanged; same status -> keep lastTransitionTime."""
    for i, c in enumerate(conds):
        if c["type"] == new["type"]:
            if c["status"] == new["status"] and c.get("reason") == new.get("reason"):
                return
            if c["status"] == new["status"]:
                new["lastTransitionTime"] = c["lastTransitionTime"]
            conds[i] = new
            return
    conds.append(new)


def _resolve_int_or_percent(value: Any, total: int, round_up: bool) -> int:
    if value is None:
        value = "25%"
    if isinstance(value, str) and value.endswith("%"):
        f = int(value[:-1]) * total / 100
        return math.ceil(f) if round_up else math.floor(f)
    return int(value)


class DeploymentController:
    def __init__(self, cluster: ClusterContext) -> None:
        self.c = cluster
        self.loop = Loop("deployment-controller", self.reconcile)
        self._progress_mark: dict[str, float] = {}  # deployment uid -> monotonic time of the last progress
        self._hashes: dict[tuple[str, int], str] = {}  # (deployment uid, generation) -> pod-template-hash

    @property
    def store(self) -> Store:
        return self.c.store

    def reconcile(self) -> None:
        deployments = self.store.list("deployments")
        uids = {d["metadata"]["uid"] for d in deployments}
        for d in deployments:
            try:
                self._sync(d)
            except StoreError as e:
                log.debug("deployment sync %s: %s", d["metadata"]["name"], e)
                self.loop.kick_later(0.01)
        # garbage collection: replica sets of deleted deployments, pods of deleted replica sets
        rs_uids = set()
        for ns, name, uid, owner, _deleting in self.store.ownership("replicasets"):
            if owner and owner not in uids:
                self.store.delete("replicasets", ns, name)
            else:
                rs_uids.add(uid)
        for ns, name, _uid, owner, deleting in self.store.ownership("pods", owner_kind="ReplicaSet"):
            if owner and owner not in rs_uids and not deleting:
                pod = self.store.find("pods", ns, name)
                if pod is not None:
                    self._delete_pod(pod)

    def _delete_pod(self, pod: Obj) -> None:
        grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
        self.store.mark_deleting("pods", pod["metadata"]["namespace"], pod["metadata"]["name"], grace)

    # -- replica sets
    def _new_rs(self, d: Obj, h: str, revision: int) -> Obj:
        meta = d["metadata"]
        template = copy.deepcopy(d["spec"]["template"])
        template.setdefault("metadata", {}).setdefault("labels", {})[HASH_LABEL] = h
        selector = copy.deepcopy(d["spec"]["selector"])
        selector.setdefault("matchLabels", {})[HASH_LABEL] = h
        rs = {
            "metadata": {
                "name": f"{meta['name']}-{h}",
                "namespace": meta["namespace"],
                "labels": dict(template["metadata"]["labels"]),
                "annotations": {
                    "deployment.kubernetes.io/desired-replicas": str(d["spec"].get("replicas", 1)),
                    "deployment.kubernetes.io/max-replicas": str(d["spec"].get("replicas", 1)),
                    "deployment.kubernetes.io/revision": str(revision),
                },
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": {"replicas": 0, "selector": selector, "template": template},
            "status": {"replicas": 0},
        }
        return self.store.create("replicasets", rs)

    def _scale_rs(self, d: Obj, rs: Obj, replicas: int) -> Obj:
        cur = int(rs["spec"].get("replicas", 0))
        if cur == replicas:
            return rs
        rs["spec"]["replicas"] = replicas
        ann = rs["metadata"].setdefault("annotations", {})
        ann["deployment.kubernetes.io/desired-replicas"] = str(d["spec"].get("replicas", 1))
        ann["deployment.kubernetes.io/max-replicas"] = str(d["spec"].get("replicas", 1))
        rs = self.store.update("replicasets", rs)
        verb = "up" if replicas > cur else "down"
        self.c.events.emit(
            d,
            "ScalingReplicaSet",
            f"Scaled {verb} replica set {rs['metadata']['name']} from {cur} to {replicas}",
            component="deployment-controller",
        )
        return rs

    def _rs_pods(self, rs: Obj, pods: list[Obj]) -> list[Obj]:
        uid = rs["metadata"]["uid"]
        return [p for p in pods if controller_uid(p) == uid]

    def _sync_rs(self, rs: Obj, pods: list[Obj]) -> Obj:
        """The replicaset controller: create/delete pods, then write status."""
        active = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        want = int(rs["spec"].get("replicas", 0))
        if len(active) < want:
            for _ in range(want - len(active)):
                pod = self._create_pod(rs)
                active.append(pod)
                self.c.events.emit(
                    rs, "SuccessfulCreate", f"Created pod: {pod['metadata']['name']}", component="replicaset-controller"
                )
        elif len(active) > want:
            by_age = sorted(active, key=lambda p: p["metadata"].get("creationTimestamp", ""))
            age = {p["metadata"]["uid"]: i for i, p in enumerate(by_age)}

            def rank(p: Obj) -> tuple[int, int, int, int]:
                # unscheduled < scheduled, pending < running, not ready < ready, then newest first
                return (
                    1 if p["spec"].get("nodeName") else 0,
                    1 if (p.get("status") or {}).get("phase") == "Running" else 0,
                    1 if pod_is_ready(p) else 0,
                    -age[p["metadata"]["uid"]],
                )

            victims = sorted(active, key=rank)
            for p in victims[: len(active) - want]:
                self._delete_pod(p)
                active.remove(p)
                self.c.events.emit(
                    rs, "SuccessfulDelete", f"Deleted pod: {p['metadata']['name']}", component="replicaset-controller"
                )
        ready = sum(1 for p in active if pod_is_ready(p))
        status: Obj = {
            "replicas": len(active),
            "fullyLabeledReplicas": len(active),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "observedGeneration": rs["metadata"].get("generation", 1),
        }
        status = {k: v for k, v in status.items() if v or k == "replicas"}
        if rs.get("status") != status:
            rs["status"] = status
            rs = self.store.update("replicasets", rs, status_only=True)
        return rs

    def _create_pod(self, rs: Obj) -> Obj:
        return self.store.create("pods", pod_from_template(rs, rs["spec"]["template"]))

    # -- deployments
    def _template_hash(self, d: Obj) -> str:
        """pod-template-hash, computed once per spec generation (a template change bumps it)."""
        key = (d["metadata"]["uid"], d["metadata"].get("generation", 0))
        h = self._hashes.get(key)
        if h is None:
            h = self._hashes[key] = template_hash(d["spec"]["template"])
        return h

    def _sync(self, d: Obj) -> None:
        meta = d["metadata"]
        if meta.get("deletionTimestamp"):
            return
        ns, uid = meta["namespace"], meta["uid"]
        dspec = d["spec"]
        desired = int(dspec.get("replicas", 1))
        rss = self.store.list("replicasets", ns, owners={uid})
        pods = self.store.list("pods", ns, owners={rs["metadata"]["uid"] for rs in rss})
        h = self._template_hash(d)
        new = next((rs for rs in rss if (rs["metadata"].get("labels") or {}).get(HASH_LABEL) == h), None)
        old = [rs for rs in rss if rs is not new]
        created_new = False
        revisions = [
            int((rs["metadata"].get("annotations") or {}).get("deployment.kubernetes.io/revision", 0)) for rs in rss
        ]
        if new is None:
            new = self._new_rs(d, h, max(revisions, default=0) + 1)
            created_new = True
        elif old and int((new["metadata"].get("annotations") or {}).get("deployment.kubernetes.io/revision", 0)) < max(
            revisions
        ):
            # rolled back to an older template: it becomes the newest revision
            new["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = str(max(revisions) + 1)
            new = self.store.update("replicasets", new)
        rev = new["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
        if (meta.get("annotations") or {}).get("deployment.kubernetes.io/revision") != rev:
            d["metadata"].setdefault("annotations", {})["deployment.kubernetes.io/revision"] = rev
            d = self.store.update("deployments", d)
        # RS statuses as of now (availability drives the rollout)
        new = self._sync_rs(new, self._rs_pods(new, pods))
        old = [self._sync_rs(rs, self._rs_pods(rs, pods)) for rs in old]
        strategy = dspec.get("strategy") or {}
        max_unavailable = 0
        if strategy.get("type") == "Recreate":
            if any(int(rs["spec"].get("replicas", 0)) > 0 for rs in old):
                old = [self._scale_rs(d, rs, 0) for rs in old]
            elif not self.store.list("pods", ns, owners={rs["metadata"]["uid"] for rs in old}):
                new = self._scale_rs(d, new, desired)
        else:
            ru = strategy.get("rollingUpdate") or {}
            surge = _resolve_int_or_percent(ru.get("maxSurge"), desired, True)
            max_unavailable = _resolve_int_or_percent(ru.get("maxUnavailable"), desired, False)
            if surge == 0 and max_unavailable == 0:
                max_unavailable = 1
            active_old = [rs for rs in old if int(rs["spec"].get("replicas", 0)) > 0]
            if not active_old:
                new = self._scale_rs(d, new, desired)
            else:
                # scale up the new replica set within maxSurge
                total = sum(int(rs["spec"].get("replicas", 0)) for rs in [new, *old])
                max_total = desired + surge
                new_reps = int(new["spec"].get("replicas", 0))
                if new_reps > desired:
                    new = self._scale_rs(d, new, desired)
                elif total < max_total:
                    new = self._scale_rs(d, new, new_reps + min(max_total - total, desired - new_reps))
                # scale down old replica sets within maxUnavailable
                all_rs = [new, *old]
                total = sum(int(rs["spec"].get("replicas", 0)) for rs in all_rs)
                min_available = desired - max_unavailable
                new_unavailable = int(new["spec"].get("replicas", 0)) - int(new["status"].get("availableReplicas", 0))
                max_down = total - min_available - new_unavailable
                if max_down > 0:
                    # unhealthy old replicas first
                    for i, rs in enumerate(old):
                        if max_down <= 0:
                            break
                        reps = int(rs["spec"].get("replicas", 0))
                        unhealthy = reps - int(rs["status"].get("availableReplicas", 0))
                        if unhealthy > 0:
                            n = min(unhealthy, max_down)
                            old[i] = self._scale_rs(d, rs, reps - n)
                            max_down -= n
                available = sum(int(rs["status"].get("availableReplicas", 0)) for rs in [new, *old])
                down = available - min_available
                for i, rs in enumerate(sorted(old, key=lambda r: r["metadata"].get("creationTimestamp", ""))):
                    if down <= 0:
                        break
                    reps = int(rs["spec"].get("replicas", 0))
                    n = min(reps, down)
                    if n > 0:
                        idx = old.index(rs) if rs in old else i
                        old[idx] = self._scale_rs(d, rs, reps - n)
                        down -= n
        # pods of the (re)scaled replica sets
        pods = self.store.list("pods", ns, owners={rs["metadata"]["uid"] for rs in [new, *old]})
        new = self._sync_rs(new, self._rs_pods(new, pods))
        old = [self._sync_rs(rs, self._rs_pods(rs, pods)) for rs in old]
        self._cleanup_history(d, old)
        self._write_status(d, new, old, desired, max_unavailable, created_new)

    def _cleanup_history(self, d: Obj, old: list[Obj]) -> None:
        limit = int(d["spec"].get("revisionHistoryLimit", 10))
        idle = [
            rs for rs in old if int(rs["spec"].get("replicas", 0)) == 0 and int(rs["status"].get("replicas", 0)) == 0
        ]
        idle.sort(key=lambda r: int(r["metadata"]["annotations"].get("deployment.kubernetes.io/revision", 0)))
        for rs in idle[: max(len(idle) - limit, 0)]:
            if not self.store.list("pods", rs["metadata"]["namespace"], owners={rs["metadata"]["uid"]}):
                self.store.delete("replicasets", rs["metadata"]["namespace"], rs["metadata"]["name"])

    def _write_status(
        self, d: Obj, new: Obj, old: list[Obj], desired: int, max_unavailable: int, created_new: bool
    ) -> None:
        all_rs = [new, *old]
        st = lambda rs, k: int((rs.get("status") or {}).get(k, 0))  # noqa: E731
        available = sum(st(rs, "availableReplicas") for rs in all_rs)
        total_spec = sum(int(rs["spec"].get("replicas", 0)) for rs in all_rs)
        prev = d.get("status") or {}
        status: Obj = {
            "observedGeneration": d["metadata"].get("generation", 1),
            "replicas": sum(st(rs, "replicas") for rs in all_rs),
            "updatedReplicas": st(new, "replicas"),
            "readyReplicas": sum(st(rs, "readyReplicas") for rs in all_rs),
            "availableReplicas": available,
            "unavailableReplicas": max(total_spec - available, 0),
        }
        status = {k: v for k, v in status.items() if v}
        conds = copy.deepcopy(prev.get("conditions") or [])
        now = now_rfc3339()

        def cond(ctype: str, cstatus: str, reason: str, message: str) -> Obj:
            return {
                "type": ctype,
                "status": cstatus,
                "lastUpdateTime": now,
                "lastTransitionTime": now,
                "reason": reason,
                "message": message,
            }

        if available >= desired - max_unavailable:
            _set_condition(
                conds, cond("Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
            )
        else:
            _set_condition(
                conds,
                cond(
                    "Available", "False", "MinimumReplicasUnavailable", "Deployment does not have minimum availability."
                ),
            )
        rs_name = new["metadata"]["name"]
        uid = d["metadata"]["uid"]
        mono = time.monotonic()
        progressing = next((c for c in conds if c["type"] == "Progressing"), None)
        complete = (
            status.get("updatedReplicas", 0) == desired
            and status.get("replicas", 0) == desired
            and status.get("availableReplicas", 0) == desired
        )
        made_progress = (
            status.get("updatedReplicas", 0) > int(prev.get("updatedReplicas", 0))
            or status.get("replicas", 0) < int(prev.get("replicas", 0))
            or status.get("readyReplicas", 0) > int(prev.get("readyReplicas", 0))
            or status.get("availableReplicas", 0) > int(prev.get("availableReplicas", 0))
        )
        deadline = self.c.scaled(float(d["spec"].get("progressDeadlineSeconds", self.c.timings.progress_deadline_s)))

        def set_progressing(new_cond: Obj) -> None:
            for i, c in enumerate(conds):
                if c["type"] == "Progressing":
                    if c["status"] == new_cond["status"]:
                        new_cond["lastTransitionTime"] = c["lastTransitionTime"]
                    conds[i] = new_cond
                    break
            else:
                conds.append(new_cond)
            self._progress_mark[uid] = mono

        if created_new:
            set_progressing(cond("Progressing", "True", "NewReplicaSetCreated", f'Created new replica set "{rs_name}"'))
        elif progressing is None:
            set_progressing(cond("Progressing", "True", "FoundNewReplicaSet", f'Found new replica set "{rs_name}"'))
        if complete:
            cur = next(c for c in conds if c["type"] == "Progressing")
            if cur.get("reason") != "NewReplicaSetAvailable" or cur.get("message") != (
                f'ReplicaSet "{rs_name}" has successfully progressed.'
            ):
                set_progressing(
                    cond(
                        "Progressing",
                        "True",
                        "NewReplicaSetAvailable",
                        f'ReplicaSet "{rs_name}" has successfully progressed.',
                    )
                )
        elif made_progress or (
            progressing and progressing.get("reason") == "NewReplicaSetAvailable" and not created_new
        ):
            set_progressing(cond("Progressing", "True", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.'))
        else:
            cur = next(c for c in conds if c["type"] == "Progressing")
            if cur.get("reason") not in ("ProgressDeadlineExceeded", "NewReplicaSetAvailable"):
                mark = self._progress_mark.setdefault(uid, mono)
                if mono - mark >= deadline:
                    set_progressing(
                        cond(
                            "Progressing",
                            "False",
                            "ProgressDeadlineExceeded",
                            f'ReplicaSet "{rs_name}" has timed out progressing.',
                        )
                    )
                else:
                    self.loop.kick_later(mark + deadline - mono + 0.001)
        order = {"Available": 0, "Progressing": 1, "ReplicaFailure": 2}
        conds.sort(key=lambda c: order.get(c["type"], 9))
        status["conditions"] = conds
        if prev.get("collisionCount") is not None:
            status["collisionCount"] = prev["collisionCount"]
        if status != prev:
            d["status"] = status
            self.store.update("deployments", d, status_only=True)
