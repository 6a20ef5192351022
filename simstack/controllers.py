"""The simulated cluster's controllers: deployment + replicaset controller, scheduler, cluster-autoscaler
and kubelet (with faults), all on the sim's one event loop, writing real-form objects to the store.

Every controller is woken by store changes (``Store.listeners``) or by asyncio timers; nothing polls.
Simulated durations (``simstack.timings``) are multiplied by ``time_scale``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import json
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from coder_stack.spec import ModelSpec, StackSpec
from simstack.backends import Backends
from simstack.cluster_objects import (
    ACCEL_LABEL,
    CPU_IMAGES,
    GPU_POOL,
    NAME_LABEL,
    POOL_LABEL,
    VLLM_IMAGE,
    cpu_node,
    gpu_node,
    gpu_node_template,
    parse_quantity,
)
from simstack.standins import ContainerRun, RunningBackend, SimServices
from simstack.store import NotFoundError, Store, StoreError, WatchEvent, controller_uid, now_rfc3339
from simstack.timings import Timings, model_timings

log = logging.getLogger("simstack.controllers")

Obj = dict[str, Any]
FAULTS = ("crashloop", "imagepull", "oom", "unschedulable", "slow-node")
FAULT_KINDS = FAULTS  # the name the CLI imports
HASH_LABEL = "pod-template-hash"
SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
StandinStarter = Callable[[ContainerRun, SimServices], Awaitable[RunningBackend | None]]


# ------------------------------------------------------------------ helpers
class MissingConfigError(Exception):
    """A Secret/ConfigMap (or a key of one) that a container needs does not exist."""


def _decode(s: str) -> str:
    return base64.b64decode(s).decode(errors="replace")


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion in env values, command and args; $$ escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        name = m.group(1)
        return env.get(name, m.group(0))

    return re.sub(r"\$\$\([^)]*\)|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)", sub, value)


def resolve_container_env(store: Store, namespace: str, container: Obj, pod: Obj | None = None) -> dict[str, str]:
    """A container's environment as the kubelet builds it (envFrom, env, valueFrom). Raises MissingConfigError."""
    env: dict[str, str] = {}
    for ef in container.get("envFrom") or []:
        prefix = ef.get("prefix", "")
        for kind, plural in (("secretRef", "secrets"), ("configMapRef", "configmaps")):
            ref = ef.get(kind)
            if not ref:
                continue
            obj = store.find(plural, namespace, ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise MissingConfigError(f'{plural[:-1].replace("configmap", "configmap")} "{ref["name"]}" not found')
            data = obj.get("data") or {}
            for k, v in data.items():
                env[prefix + k] = _decode(v) if plural == "secrets" else v
    for e in container.get("env") or []:
        name = e["name"]
        if "value" in e:
            env[name] = _expand(str(e["value"]), env)
            continue
        vf = e.get("valueFrom") or {}
        if "secretKeyRef" in vf or "configMapKeyRef" in vf:
            plural, kindname, ref = (
                ("secrets", "Secret", vf["secretKeyRef"])
                if "secretKeyRef" in vf
                else ("configmaps", "ConfigMap", vf["configMapKeyRef"])
            )
            obj = store.find(plural, namespace, ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise MissingConfigError(
                    f'{"secret" if plural == "secrets" else "configmap"} "{ref["name"]}" not found'
                )
            data = obj.get("data") or {}
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise MissingConfigError(f"couldn't find key {ref['key']} in {kindname} {namespace}/{ref['name']}")
            env[name] = _decode(data[ref["key"]]) if plural == "secrets" else data[ref["key"]]
        elif "fieldRef" in vf and pod is not None:
            path = vf["fieldRef"].get("fieldPath", "")
            cur: Any = pod
            for part in path.split("."):
                cur = cur.get(part) if isinstance(cur, dict) else None
            env[name] = "" if cur is None else str(cur)
        else:
            env[name] = ""
    return env


def missing_volumes(store: Store, namespace: str, pod_spec: Obj) -> list[tuple[str, str]]:
    """(volume name, message) for every Secret/ConfigMap volume that cannot be mounted."""
    out = []
    for vol in pod_spec.get("volumes") or []:
        if "secret" in vol:
            ref = vol["secret"]
            if not ref.get("optional") and store.find("secrets", namespace, ref["secretName"]) is None:
                out.append((vol["name"], f'secret "{ref["secretName"]}" not found'))
        elif "configMap" in vol:
            ref = vol["configMap"]
            if not ref.get("optional") and store.find("configmaps", namespace, ref["name"]) is None:
                out.append((vol["name"], f'configmap "{ref["name"]}" not found'))
    return out


def mounted_files(store: Store, namespace: str, pod_spec: Obj, container: Obj) -> dict[str, str]:
    """Mounted path -> content for the container's Secret and ConfigMap volumes."""
    vols = {v["name"]: v for v in pod_spec.get("volumes") or []}
    files: dict[str, str] = {}
    for vm in container.get("volumeMounts") or []:
        vol = vols.get(vm["name"]) or {}
        if "secret" in vol:
            obj = store.find("secrets", namespace, vol["secret"]["secretName"])
            data = {k: _decode(v) for k, v in ((obj or {}).get("data") or {}).items()}
            items = vol["secret"].get("items")
        elif "configMap" in vol:
            obj = store.find("configmaps", namespace, vol["configMap"]["name"])
            data = dict((obj or {}).get("data") or {})
            items = vol["configMap"].get("items")
        else:
            continue
        paths = {it["key"]: it["path"] for it in items} if items else {k: k for k in data}
        mount = vm["mountPath"].rstrip("/")
        if vm.get("subPath"):
            for key, rel in paths.items():
                if rel == vm["subPath"] and key in data:
                    files[mount] = data[key]
            continue
        for key, rel in paths.items():
            if key in data:
                files[f"{mount}/{rel}"] = data[key]
    return files


def pod_is_ready(pod: Obj) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def _cond(obj: Obj, ctype: str) -> Obj | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None


def _match_labels(selector: Obj, labels: dict[str, str]) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, vals = expr["key"], expr["operator"], expr.get("values") or []
        if (
            (op == "In" and labels.get(key) not in vals)
            or (op == "NotIn" and labels.get(key) in vals)
            or (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
        ):
            return False
    return True


def template_hash(template: Obj) -> str:
    """FNV-1a 32 of the template, safe-encoded like the deployment controller's pod-template-hash."""
    h = 0x811C9DC5
    for b in json.dumps(template, sort_keys=True).encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return "".join(SAFE_ALPHABET[ord(c) % len(SAFE_ALPHABET)] for c in str(h))


def _rand_suffix(n: int = 5) -> str:
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


def _image_ref(image: str) -> str:
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return "docker.io/" + (image if "/" in image else "library/" + image)


def _image_id(image: str) -> str:
    return _image_ref(image).rsplit(":", 1)[0] + "@sha256:" + hashlib.sha256(image.encode()).hexdigest()


class _Loop:
    """A reconcile loop: runs ``fn`` whenever kicked (coalescing kicks), never polls."""

    def __init__(self, name: str, fn: Callable[[], None]) -> None:
        self.name = name
        self._fn = fn
        self._event = asyncio.Event()
        self._timers: list[asyncio.TimerHandle] = []
        self.task: asyncio.Task[None] | None = None

    def kick(self) -> None:
        self._event.set()

    def kick_later(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._timers = [t for t in self._timers if not t.cancelled() and t.when() > loop.time()]
        self._timers.append(loop.call_later(max(delay, 0.0), self.kick))

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while True:
            await self._event.wait()
            self._event.clear()
            try:
                self._fn()
            except Exception:
                log.exception("%s reconcile failed", self.name)
            await asyncio.sleep(0)

    async def stop(self) -> None:
        for t in self._timers:
            t.cancel()
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


# ------------------------------------------------------------------ events
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


# ------------------------------------------------------------------ the cluster
class Cluster:
    """All controllers of one simulated cluster. Create, then ``start()`` on the sim's loop."""

    def __init__(
        self,
        store: Store,
        backends: Backends,
        services: SimServices,
        spec: StackSpec,
        *,
        time_scale: float = 1.0,
        gpu_pool: str = "autoscaled",
        faults: dict[str, str] | None = None,
        timings: Timings | None = None,
        start_standin: StandinStarter | None = None,
    ) -> None:
        if gpu_pool not in ("autoscaled", "static"):
            raise ValueError(f"gpu_pool must be 'autoscaled' or 'static', got {gpu_pool!r}")
        self.store = store
        self.backends = backends
        self.services = services
        self.spec = spec
        self.time_scale = time_scale
        self.gpu_pool = gpu_pool
        self.timings = timings or Timings()
        self.faults: dict[str, str] = {}
        for name, fault in (faults or {}).items():
            self.set_fault(name, fault)
        self._start_standin = start_standin
        self.events = EventRecorder(store)
        self.deployments = DeploymentController(self)
        self.scheduler = Scheduler(self)
        self.autoscaler = Autoscaler(self)
        self.kubelet = Kubelet(self)
        self._loops = [self.deployments.loop, self.scheduler.loop, self.autoscaler.loop, self.kubelet.loop]
        self._node_index = 0
        self.image_cache: dict[str, set[str]] = {}

    # time
    def scaled(self, sim_seconds: float) -> float:
        return sim_seconds * self.time_scale

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(self.scaled(sim_seconds))

    # faults
    def set_fault(self, deployment: str, fault: str | None) -> None:
        if fault is None or fault == "" or fault == "none":
            self.faults.pop(deployment, None)
        elif fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r} for {deployment}; known: {', '.join(FAULTS)}")
        else:
            self.faults[deployment] = fault
        for lp in getattr(self, "_loops", []):
            lp.kick()

    def fault_of(self, pod: Obj) -> str | None:
        return self.faults.get((pod["metadata"].get("labels") or {}).get(NAME_LABEL, ""))

    def model_of(self, pod: Obj) -> ModelSpec | None:
        if pod["metadata"].get("namespace") != self.spec.serving_namespace:
            return None
        app = (pod["metadata"].get("labels") or {}).get(NAME_LABEL)
        for m in self.spec.models:
            if m.name == app:
                return m
        return None

    # nodes
    def add_node(self, node: Obj, cached_images: tuple[str, ...] = ()) -> Obj:
        node = copy.deepcopy(node)
        now = now_rfc3339()
        node["status"]["conditions"] = [
            {
                "type": t,
                "status": "False",
                "reason": r,
                "message": m,
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
            for t, r, m in (
                ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            )
        ] + [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        ]
        self.image_cache[node["metadata"]["name"]] = set(cached_images)
        return self.store.create("nodes", node)

    def next_node_index(self) -> int:
        self._node_index += 1
        return self._node_index

    def new_gpu_node(self, name: str) -> Obj:
        return self.add_node(gpu_node(self.spec, name, self.next_node_index()))

    # life cycle
    def start(self) -> None:
        self.add_node(cpu_node("default-pool-1", 0), CPU_IMAGES)
        if self.gpu_pool == "static":
            for i in range(self.spec.gpus):
                self.new_gpu_node(f"{GPU_POOL}-{i + 1}")
        self.store.listeners.append(self._on_change)
        for lp in self._loops:
            lp.start()
            lp.kick()

    async def stop(self) -> None:
        if self._on_change in self.store.listeners:
            self.store.listeners.remove(self._on_change)
        self.autoscaler.stop()
        for lp in self._loops:
            await lp.stop()
        await self.kubelet.stop_all()

    def _on_change(self, ev: WatchEvent) -> None:
        p = ev.plural
        if p in ("deployments", "replicasets", "pods"):
            self.deployments.loop.kick()
        if p in ("pods", "nodes"):
            self.scheduler.loop.kick()
            self.autoscaler.loop.kick()
        if p in ("pods", "nodes", "secrets", "configmaps"):
            self.kubelet.loop.kick()
        if p in ("secrets", "configmaps"):
            self.kubelet.config_changed()

    async def start_standin(self, run: ContainerRun) -> RunningBackend | None:
        if self._start_standin is not None:
            return await self._start_standin(run, self.services)
        from simstack import standins

        try:
            return await standins.start_standin(run, self.services)
        except ImportError as e:  # the stand-in modules are not there (yet): a pod without a backend
            log.warning("no stand-in for %s (%s)", run.image, e)
            return None


# ------------------------------------------------------------------ deployment + replicaset controller
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
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.loop = _Loop("deployment-controller", self.reconcile)
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
        for ns, name, _uid, owner, deleting in self.store.ownership("pods"):
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
        template = rs["spec"]["template"]
        tmeta = template.get("metadata") or {}
        spec = copy.deepcopy(template["spec"])
        spec.setdefault("restartPolicy", "Always")
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
        reqs = pod_requests(spec)
        qos = "Burstable" if reqs else "BestEffort"
        name = f"{rs['metadata']['name']}-{_rand_suffix()}"
        pod = {
            "metadata": {
                "name": name,
                "generateName": f"{rs['metadata']['name']}-",
                "namespace": rs["metadata"]["namespace"],
                "labels": dict(tmeta.get("labels") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "ReplicaSet",
                        "name": rs["metadata"]["name"],
                        "uid": rs["metadata"]["uid"],
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
        return self.store.create("pods", pod)

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


def _creation_seq(p: Obj) -> int:
    try:
        return int(p["metadata"].get("resourceVersion", "0"))
    except ValueError:
        return 0


# ------------------------------------------------------------------ scheduler
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
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.loop = _Loop("default-scheduler", self.reconcile)

    def extra_selector(self, pod: Obj) -> dict[str, str]:
        # fault "unschedulable": the pod asks for an accelerator no pool has
        return {ACCEL_LABEL: "nvidia-h100-80gb"} if self.c.fault_of(pod) == "unschedulable" else {}

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
            cur = _cond(pod, "PodScheduled")
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


# ------------------------------------------------------------------ cluster-autoscaler
@dataclass
class _Upcoming:
    name: str
    pod_uid: str
    handle: asyncio.TimerHandle


class Autoscaler:
    """The GPU pool as one node group: scale-up for pending pods it can take, scale-down of idle nodes.

    With a static pool the group's min = max = spec.gpus (it only ever answers NotTriggerScaleUp).
    """

    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.loop = _Loop("cluster-autoscaler", self.reconcile)
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
        reserved = {u.pod_uid for u in self.upcoming.values()}
        live_uids = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            live_uids.add(uid)
            if pod["spec"].get("nodeName") or pod["metadata"].get("deletionTimestamp"):
                continue
            cond = _cond(pod, "PodScheduled")
            if not cond or cond.get("status") != "False" or cond.get("reason") != "Unschedulable":
                continue
            if uid in reserved:
                continue
            reasons = fit_reasons(pod, template, {}, self.c.scheduler.extra_selector(pod))
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
        name = f"{GPU_POOL}-{_rand_suffix(4)}"
        t = self.c.timings
        delay = t.slow_node_provision_s if self.c.fault_of(pod) == "slow-node" else t.node_provision_s
        loop = asyncio.get_running_loop()
        handle = loop.call_later(self.c.scaled(delay), self._node_arrives, name)
        self.upcoming[name] = _Upcoming(name, pod["metadata"]["uid"], handle)
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


# ------------------------------------------------------------------ kubelet
@dataclass
class _CState:
    name: str
    image: str
    init: bool
    state: Obj
    last_state: Obj = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    restart_count: int = 0
    image_id: str = ""
    container_id: str | None = None

    def to_status(self) -> Obj:
        out: Obj = {
            "name": self.name,
            "image": self.image,
            "imageID": self.image_id,
            "ready": self.ready,
            "restartCount": self.restart_count,
            "started": self.started,
            "state": copy.deepcopy(self.state),
            "lastState": copy.deepcopy(self.last_state),
        }
        if self.container_id:
            out["containerID"] = self.container_id
        return out


@dataclass
class _PodRun:
    uid: str
    namespace: str
    name: str
    node: str
    init: list[_CState]
    main: list[_CState]
    phase: str = "Pending"
    host_ip: str = ""
    pod_ip: str = ""
    start_time: str = ""
    conditions: dict[str, Obj] = field(default_factory=dict)

    def set_condition(self, ctype: str, status: bool, reason: str | None = None, message: str | None = None) -> None:
        s = "True" if status else "False"
        cur = self.conditions.get(ctype)
        ltt = cur["lastTransitionTime"] if cur and cur["status"] == s else now_rfc3339()
        c: Obj = {"type": ctype, "status": s, "lastProbeTime": None, "lastTransitionTime": ltt}
        if reason:
            c["reason"] = reason
        if message:
            c["message"] = message
        self.conditions[ctype] = c

    def refresh_conditions(self) -> None:
        if self.init:
            pending = [c.name for c in self.init if "terminated" not in c.state]
            if pending:
                self.set_condition(
                    "Initialized",
                    False,
                    "ContainersNotInitialized",
                    f"containers with incomplete status: [{' '.join(pending)}]",
                )
            else:
                self.set_condition("Initialized", True)
        else:
            self.set_condition("Initialized", True)
        unready = [c.name for c in self.main if not c.ready]
        if unready:
            msg = f"containers with unready status: [{' '.join(unready)}]"
            self.set_condition("Ready", False, "ContainersNotReady", msg)
            self.set_condition("ContainersReady", False, "ContainersNotReady", msg)
        else:
            self.set_condition("Ready", True)
            self.set_condition("ContainersReady", True)

    def status(self, base: Obj) -> Obj:
        self.refresh_conditions()
        order = ["PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"]
        conds = {c["type"]: c for c in base.get("conditions") or []}
        conds.update(self.conditions)
        st: Obj = {
            "phase": self.phase,
            "conditions": [conds[t] for t in order if t in conds],
            "hostIP": self.host_ip,
            "hostIPs": [{"ip": self.host_ip}],
            "startTime": self.start_time,
            "qosClass": base.get("qosClass", "BestEffort"),
            "containerStatuses": [c.to_status() for c in self.main],
        }
        if self.pod_ip:
            st["podIP"] = self.pod_ip
            st["podIPs"] = [{"ip": self.pod_ip}]
        if self.init:
            st["initContainerStatuses"] = [c.to_status() for c in self.init]
        return st


class _PodGone(Exception):
    pass


class Kubelet:
    """One kubelet for every node: walks bound pods through their phases, runs and stops stand-ins."""

    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.loop = _Loop("kubelet", self.reconcile)
        self.workers: dict[str, asyncio.Task[None]] = {}
        self.terminating: dict[str, asyncio.Task[None]] = {}
        self.running: dict[str, RunningBackend] = {}  # pod uid -> stand-in
        self.weights_cached: set[str] = set()  # models on the model-cache PVC
        self._pull_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._config_waiters: set[asyncio.Future[None]] = set()
        self._ip_seq: dict[str, int] = {}
        self._pods: dict[str, tuple[str, str]] = {}  # uid -> (namespace, name)
        self._cleanups: set[asyncio.Future[None]] = set()

    # -- manager
    def reconcile(self) -> None:
        store = self.c.store
        pods = store.list("pods")
        seen = set()
        for pod in pods:
            meta = pod["metadata"]
            uid = meta["uid"]
            seen.add(uid)
            self._pods[uid] = (meta["namespace"], meta["name"])
            if meta.get("deletionTimestamp"):
                if not pod["spec"].get("nodeName"):
                    # never bound: nothing runs, the API server removes it at once
                    store.delete("pods", meta["namespace"], meta["name"])
                elif uid not in self.terminating:
                    self.terminating[uid] = asyncio.get_running_loop().create_task(self._terminate(pod))
                continue
            node = pod["spec"].get("nodeName")
            if node and uid not in self.workers and store.find("nodes", None, node) is not None:
                self.workers[uid] = asyncio.get_running_loop().create_task(
                    self._run_pod(pod), name=f"pod {meta['name']}"
                )
        for uid in [u for u in list(self.workers) if u not in seen]:  # removed without a graceful deletion
            self.workers.pop(uid).cancel()
            asyncio.get_running_loop().create_task(self._stop_backend(uid))

    def config_changed(self) -> None:
        for fut in self._config_waiters:
            if not fut.done():
                fut.set_result(None)
        self._config_waiters.clear()

    async def _wait_config(self, timeout: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._config_waiters.add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            self._config_waiters.discard(fut)

    async def stop_all(self) -> None:
        tasks = list(self.workers.values()) + list(self.terminating.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for uid in list(self.running):
            await self._stop_backend(uid)

    async def _stop_backend(self, uid: str) -> None:
        ns_name = self._pods.get(uid)
        if ns_name:
            self.c.backends.unregister(*ns_name)
        backend = self.running.pop(uid, None)
        if backend is not None:
            try:
                await backend.stop()
            except Exception:
                log.exception("stopping stand-in of %s failed", ns_name)

    # -- status writing
    def _write(self, r: _PodRun) -> Obj:
        store = self.c.store
        pod = store.find("pods", r.namespace, r.name)
        if pod is None or pod["metadata"]["uid"] != r.uid:
            raise _PodGone(r.name)
        pod["status"] = r.status(pod.get("status") or {})
        return store.update("pods", pod, status_only=True)

    def _event(self, r: _PodRun, reason: str, message: str, type_: str = "Normal", cs: _CState | None = None) -> None:
        pod = self.c.store.find("pods", r.namespace, r.name)
        if pod is None:
            return
        fp = None
        if cs is not None:
            fp = f"spec.{'initContainers' if cs.init else 'containers'}{{{cs.name}}}"
        self.c.events.emit(pod, reason, message, type_, component="kubelet", host=r.node, field_path=fp)

    def _backoff(self, n: int) -> float:
        t = self.c.timings
        return float(min(t.backoff_initial_s * (2 ** max(n - 1, 0)), t.backoff_max_s))

    # -- pod life
    async def _run_pod(self, pod: Obj) -> None:
        try:
            await self._walk(pod)
        except (_PodGone, NotFoundError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("kubelet: pod %s failed", pod["metadata"]["name"])

    def _containers(self, pod: Obj) -> tuple[list[_CState], list[_CState]]:
        spec = pod["spec"]
        inits = [
            _CState(c["name"], c["image"], True, {"waiting": {"reason": "PodInitializing"}})
            for c in spec.get("initContainers") or []
        ]
        main_reason = "PodInitializing" if inits else "ContainerCreating"
        mains = [
            _CState(c["name"], c["image"], False, {"waiting": {"reason": main_reason}}) for c in spec["containers"]
        ]
        return inits, mains

    async def _walk(self, pod: Obj) -> None:
        store = self.c.store
        meta, spec = pod["metadata"], pod["spec"]
        node = store.get("nodes", None, spec["nodeName"])
        inits, mains = self._containers(pod)
        r = _PodRun(meta["uid"], meta["namespace"], meta["name"], spec["nodeName"], inits, mains)
        r.host_ip = next(
            (a["address"] for a in node["status"].get("addresses") or [] if a["type"] == "InternalIP"), "10.128.0.1"
        )
        r.start_time = now_rfc3339()
        r.set_condition("PodReadyToStartContainers", False)
        r.set_condition("PodScheduled", True)
        self._write(r)

        # volumes: Secret / ConfigMap volumes must exist before the sandbox starts
        last_report = -math.inf
        while True:
            missing = missing_volumes(store, r.namespace, spec)
            if not missing:
                break
            mono = time.monotonic()
            if mono - last_report >= self.c.scaled(self.c.timings.mount_retry_s):
                last_report = mono
                for vol, why in missing:
                    self._event(r, "FailedMount", f'MountVolume.SetUp failed for volume "{vol}" : {why}', "Warning")
            await self._wait_config(self.c.scaled(self.c.timings.mount_retry_s))

        idx = self._ip_seq.get(r.node, 1) + 1
        self._ip_seq[r.node] = idx
        cidr = node["spec"].get("podCIDR", "10.8.0.0/24")
        r.pod_ip = cidr.rsplit(".", 1)[0] + f".{idx}"
        r.set_condition("PodReadyToStartContainers", True)
        self._write(r)

        model = self.c.model_of(pod)
        mt = model_timings(model) if model else None
        app = (meta.get("labels") or {}).get(NAME_LABEL, "")

        for cs, cspec in zip(inits, spec.get("initContainers") or [], strict=False):
            await self._pull(r, pod, cs)
            await self._env(r, pod, cs, cspec)
            self._start_container(r, cs)
            self._write(r)
            if model is not None and mt is not None:
                cached = model.name in self.weights_cached
                await self.c.sleep(self.c.timings.weights_cached_s if cached else mt.weights_s)
                self.weights_cached.add(model.name)
            else:
                await self.c.sleep(1.0)
            cs.state = {
                "terminated": {
                    "exitCode": 0,
                    "reason": "Completed",
                    "startedAt": cs.state["running"]["startedAt"],
                    "finishedAt": now_rfc3339(),
                    "containerID": cs.container_id,
                }
            }
            cs.ready = True
            cs.started = False
            if cs is not inits[-1]:
                self._write(r)  # the last one is reported together with the main container's start

        for cs in mains:
            if inits:
                cs.state = {"waiting": {"reason": "PodInitializing"}}
        for cs in mains:
            await self._pull(r, pod, cs)
        main, mspec = mains[0], spec["containers"][0]
        start_s = mt.server_start_s if mt else self.c.timings.cpu_start_s
        while True:
            env = await self._env(r, pod, main, mspec)
            for cs in mains:
                self._start_container(r, cs)
            r.phase = "Running"
            self._write(r)
            crash = self._crash(pod, r.node)
            if crash is not None:
                delay, reason, code = crash
                await self.c.sleep(min(delay, start_s) if reason == "Error" else start_s * 0.6)
                await self._crash_loop(r, main, reason, code)
                continue
            await self.c.sleep(start_s)
            if await self._serve(r, pod, main, mspec, env, app):
                break
        for cs in mains:
            cs.ready = True
        self._write(r)

    def _crash(self, pod: Obj, node_name: str) -> tuple[float, str, int] | None:
        fault = self.c.fault_of(pod)
        if fault == "crashloop":
            return (self.c.timings.crash_after_s, "Error", 1)
        if fault == "oom":
            return (0.0, "OOMKilled", 137)
        model = self.c.model_of(pod)
        if model is not None:
            node = self.c.store.find("nodes", None, node_name)
            mem_gb = parse_quantity((node or {}).get("status", {}).get("capacity", {}).get("memory", "0")) / 1024**3
            if model.weights_gb + self.c.spec.host_ram_overhead_gb > mem_gb:
                return (0.0, "OOMKilled", 137)
        return None

    async def _crash_loop(self, r: _PodRun, cs: _CState, reason: str, code: int) -> None:
        started = cs.state.get("running", {}).get("startedAt", now_rfc3339())
        cs.last_state = {
            "terminated": {
                "exitCode": code,
                "reason": reason,
                "startedAt": started,
                "finishedAt": now_rfc3339(),
                "containerID": cs.container_id,
            }
        }
        cs.restart_count += 1
        cs.started = False
        cs.ready = False
        backoff = self._backoff(cs.restart_count)
        cs.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {_fmt_sim(backoff)} restarting failed container={cs.name} "
                f"pod={r.name}_{r.namespace}({r.uid})",
            }
        }
        self._write(r)
        self._event(
            r,
            "BackOff",
            f"Back-off restarting failed container {cs.name} in pod {r.name}_{r.namespace}({r.uid})",
            "Warning",
            cs,
        )
        await self.c.sleep(backoff)
        self._event(r, "Pulled", f'Container image "{cs.image}" already present on machine', cs=cs)

    async def _serve(self, r: _PodRun, pod: Obj, cs: _CState, cspec: Obj, env: dict[str, str], app: str) -> bool:
        """Start the stand-in and register it (before Ready is written). False if it failed to start."""
        ports = cspec.get("ports") or []
        port = int(ports[0]["containerPort"]) if ports else 8000
        run = ContainerRun(
            namespace=r.namespace,
            pod_name=r.name,
            app=app,
            image=cs.image,
            args=[_expand(a, env) for a in cspec.get("args") or []],
            env=dict(env),
            files=mounted_files(self.c.store, r.namespace, pod["spec"], cspec),
            container_port=port,
        )
        task = asyncio.ensure_future(self.c.start_standin(run))
        try:
            backend = await asyncio.shield(task)
        except asyncio.CancelledError:

            def _cleanup(t: asyncio.Future[RunningBackend | None]) -> None:
                if not t.cancelled() and t.exception() is None and t.result() is not None:
                    res = t.result()
                    assert res is not None
                    self._cleanups.add(asyncio.ensure_future(res.stop()))

            task.add_done_callback(_cleanup)
            raise
        except Exception:
            log.exception("stand-in of %s/%s failed to start", r.namespace, r.name)
            await self._crash_loop(r, cs, "Error", 1)
            return False
        if backend is not None:
            self.running[r.uid] = backend
            self.c.backends.register(r.namespace, r.name, port, "127.0.0.1", backend.port)
        return True

    def _start_container(self, r: _PodRun, cs: _CState) -> None:
        cs.container_id = "containerd://" + hashlib.sha256(f"{r.uid}/{cs.name}/{cs.restart_count}".encode()).hexdigest()
        self._event(r, "Created", f"Created container: {cs.name}", cs=cs)
        self._event(r, "Started", f"Started container {cs.name}", cs=cs)
        cs.state = {"running": {"startedAt": now_rfc3339()}}
        cs.started = True

    async def _env(self, r: _PodRun, pod: Obj, cs: _CState, cspec: Obj) -> dict[str, str]:
        reported = ""
        while True:
            try:
                return resolve_container_env(self.c.store, r.namespace, cspec, pod)
            except MissingConfigError as e:
                msg = str(e)
            if msg != reported:
                reported = msg
                cs.state = {"waiting": {"reason": "CreateContainerConfigError", "message": msg}}
                self._write(r)
                self._event(r, "Failed", f"Error: {msg}", "Warning", cs)
            await self._wait_config(self.c.scaled(self.c.timings.backoff_max_s))

    async def _pull(self, r: _PodRun, pod: Obj, cs: _CState) -> None:
        image = cs.image
        t = self.c.timings
        attempt = 0
        while self.c.fault_of(pod) == "imagepull":
            attempt += 1
            self._event(r, "Pulling", f'Pulling image "{image}"', cs=cs)
            await self.c.sleep(t.image_pull_fail_s)
            ref = _image_ref(image)
            why = (
                f'rpc error: code = NotFound desc = failed to pull and unpack image "{ref}": '
                f'failed to resolve reference "{ref}": {ref}: not found'
            )
            cs.state = {"waiting": {"reason": "ErrImagePull", "message": why}}
            self._write(r)
            self._event(r, "Failed", f'Failed to pull image "{image}": {why}', "Warning", cs)
            self._event(r, "Failed", "Error: ErrImagePull", "Warning", cs)
            backoff = self._backoff(attempt)
            await self.c.sleep(min(1.0, backoff))
            cs.state = {
                "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": f'Back-off pulling image "{image}": ErrImagePull: {why}',
                }
            }
            self._write(r)
            self._event(r, "BackOff", f'Back-off pulling image "{image}"', cs=cs)
            self._event(r, "Failed", "Error: ImagePullBackOff", "Warning", cs)
            await self.c.sleep(backoff)
        lock = self._pull_locks.setdefault((r.node, image), asyncio.Lock())
        async with lock:
            cache = self.c.image_cache.setdefault(r.node, set())
            if image in cache:
                self._event(r, "Pulled", f'Container image "{image}" already present on machine', cs=cs)
            else:
                self._event(r, "Pulling", f'Pulling image "{image}"', cs=cs)
                dur = t.gpu_image_pull_s if image == VLLM_IMAGE else t.cpu_image_pull_s
                await self.c.sleep(dur)
                cache.add(image)
                size = 10_442_000_000 if image == VLLM_IMAGE else 1_200_000_000
                took = _fmt_sim(dur)
                self._event(
                    r,
                    "Pulled",
                    f'Successfully pulled image "{image}" in {took} ({took} including waiting). '
                    f"Image size: {size} bytes.",
                    cs=cs,
                )
        cs.image_id = _image_id(image)

    async def _terminate(self, pod: Obj) -> None:
        meta = pod["metadata"]
        uid, ns, name = meta["uid"], meta["namespace"], meta["name"]
        worker = self.workers.pop(uid, None)
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
        try:
            self.c.backends.unregister(ns, name)
            for c in pod["spec"]["containers"]:
                st = next(
                    (s for s in (pod.get("status") or {}).get("containerStatuses") or [] if s["name"] == c["name"]),
                    None,
                )
                if st and "running" in (st.get("state") or {}):
                    self.c.events.emit(
                        pod,
                        "Killing",
                        f"Stopping container {c['name']}",
                        component="kubelet",
                        host=pod["spec"].get("nodeName"),
                        field_path=f"spec.containers{{{c['name']}}}",
                    )
            await self._stop_backend(uid)
            grace = float(meta.get("deletionGracePeriodSeconds", 30))
            await self.c.sleep(min(grace, self.c.timings.termination_s))
            cur = self.c.store.find("pods", ns, name)
            if cur is not None and cur["metadata"]["uid"] == uid:
                status = cur.get("status") or {}
                for cs in status.get("containerStatuses") or []:
                    started = (cs.get("state") or {}).get("running", {}).get("startedAt")
                    if started:
                        cs["state"] = {
                            "terminated": {
                                "exitCode": 0,
                                "reason": "Completed",
                                "startedAt": started,
                                "finishedAt": now_rfc3339(),
                                "containerID": cs.get("containerID"),
                            }
                        }
                    cs["ready"] = False
                    cs["started"] = False
                for c in status.get("conditions") or []:
                    if c["type"] in ("Ready", "ContainersReady") and c["status"] == "True":
                        c.update(status="False", reason="PodCompleted", lastTransitionTime=now_rfc3339())
                cur["status"] = status
                self.c.store.update("pods", cur, status_only=True)
                self.c.store.delete("pods", ns, name)
        except NotFoundError:
            pass
        finally:
            self.terminating.pop(uid, None)
            self._pods.pop(uid, None)


def _fmt_sim(sim_seconds: float) -> str:
    """Go's time.Duration formatting of a simulated duration (what the real message would say)."""
    s = float(sim_seconds)
    if s < 1:
        return f"{s * 1000:g}ms"
    m, sec = divmod(s, 60)
    h, m = divmod(int(m), 60)
    secs = f"{sec:.3f}".rstrip("0").rstrip(".")
    if h:
        return f"{h}h{m}m{secs}s"
    if m:
        return f"{m}m{secs}s"
    return f"{secs}s"
