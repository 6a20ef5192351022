"""In-memory object store of the simulated cluster: resourceVersions, watch history, selectors.

Everything here runs on the simulated stack's own event loop (one thread); nothing is thread-safe on
purpose. Objects are plain dicts in Kubernetes wire form; callers always get deep copies.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import pickle
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ("create", "delete", "get", "list", "patch", "update", "watch")

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES: dict[str, ResourceType] = {
    r.plural: r
    for r in [
        ResourceType("", "v1", "namespaces", "Namespace", False, ("ns",)),
        ResourceType("", "v1", "nodes", "Node", False, ("no",)),
        ResourceType("", "v1", "pods", "Pod", True, ("po",)),
        ResourceType("", "v1", "services", "Service", True, ("svc",)),
        ResourceType("", "v1", "secrets", "Secret", True),
        ResourceType("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
        ResourceType("", "v1", "events", "Event", True, ("ev",)),
        ResourceType("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",)),
        ResourceType("apps", "v1", "deployments", "Deployment", True, ("deploy",)),
        ResourceType("apps", "v1", "replicasets", "ReplicaSet", True, ("rs",)),
        ResourceType("batch", "v1", "jobs", "Job", True),
        ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
        ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
        ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
        ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    ]
}


class StoreError(Exception):
    code = 500
    reason = "InternalError"


class NotFoundError(StoreError):
    code = 404
    reason = "NotFound"


class AlreadyExistsError(StoreError):
    code = 409
    reason = "AlreadyExists"


class ConflictError(StoreError):
    code = 409
    reason = "Conflict"


class GoneError(StoreError):
    code = 410
    reason = "Expired"


class InvalidError(StoreError):
    code = 422
    reason = "Invalid"


def now_rfc3339(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_rfc3339_micro(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _default_pod_spec(spec: Obj | None) -> None:
    if not isinstance(spec, dict):
        return
    for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        image = str(c.get("image", ""))
        c.setdefault("imagePullPolicy", "Always" if image.endswith(":latest") or ":" not in image else "IfNotPresent")
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        for port in c.get("ports") or []:
            port.setdefault("protocol", "TCP")


def _qos_class(spec: Obj) -> str:
    """The pod's QoS class from its containers' resources, as the API server computes it."""
    containers = spec.get("containers") or []
    any_set = False
    guaranteed = bool(containers)
    for c in containers:
        res = c.get("resources") or {}
        limits, requests = res.get("limits") or {}, res.get("requests") or {}
        if limits or requests:
            any_set = True
        for r in ("cpu", "memory"):
            if r not in limits or requests.get(r, limits[r]) != limits[r]:
                guaranteed = False
    if guaranteed and any_set:
        return "Guaranteed"
    return "Burstable" if any_set else "BestEffort"


JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
JOB_UID_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")


def _default_job(obj: Obj) -> None:
    """batch/v1 Job defaults (pkg/apis/batch/v1/defaults.go); the selector and the template's job labels
    need the uid and are added by :meth:`Store.create`."""
    spec = obj.setdefault("spec", {})
    spec.setdefault("parallelism", 1)
    spec.setdefault("completions", 1)
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("manualSelector", False)
    spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
    template = spec.setdefault("template", {})
    _default_pod_spec(template.get("spec"))
    if isinstance(template.get("spec"), dict):
        template["spec"].setdefault("terminationGracePeriodSeconds", 30)
        template["spec"].setdefault("dnsPolicy", "ClusterFirst")
        template["spec"].setdefault("schedulerName", "default-scheduler")


def _label_job(obj: Obj) -> None:
    """What the Job registry adds on create: the generated selector and the pod template's job labels."""
    meta, spec = obj["metadata"], obj.setdefault("spec", {})
    labels = {JOB_UID_LABELS[0]: meta["uid"], JOB_UID_LABELS[1]: meta["uid"]}
    labels |= {JOB_NAME_LABELS[0]: meta["name"], JOB_NAME_LABELS[1]: meta["name"]}
    template_meta = spec.setdefault("template", {}).setdefault("metadata", {})
    template_meta["labels"] = {**(template_meta.get("labels") or {}), **labels}
    if not spec.get("manualSelector"):
        spec["selector"] = {"matchLabels": {JOB_UID_LABELS[0]: meta["uid"]}}


def default_object(plural: str, obj: Obj, *, creating: bool = True) -> Obj:
    """The API server's defaulting that clients rely on (applied on every create and spec update)."""
    if plural == "secrets":
        obj.setdefault("type", "Opaque")
        string_data = obj.pop("stringData", None) or {}
        if string_data:
            data = obj.get("data") or {}
            data.update({k: _b64(v) for k, v in string_data.items()})
            obj["data"] = data
    elif plural == "pods":
        spec = obj.setdefault("spec", {})
        _default_pod_spec(spec)
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("schedulerName", "default-scheduler")
        spec.setdefault("serviceAccountName", "default")
        if creating:
            status = obj.setdefault("status", {})
            status.setdefault("phase", "Pending")
            status.setdefault("qosClass", _qos_class(spec))
    elif plural == "deployments":
        spec = obj.setdefault("spec", {})
        _default_pod_spec((spec.get("template") or {}).get("spec"))
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        spec.setdefault(
            "strategy", {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}
        )
    elif plural == "replicasets":
        spec = obj.setdefault("spec", {})
        spec.setdefault("replicas", 1)
        _default_pod_spec((spec.get("template") or {}).get("spec"))
    elif plural == "jobs":
        _default_job(obj)
    elif plural == "services":
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for p in spec.get("ports") or []:
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p.get("port"))
    elif plural == "namespaces":
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        if creating:
            obj.setdefault("status", {}).setdefault("phase", "Active")
    return obj


# ------------------------------------------------------------------ selectors
_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(sel: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in sel:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(sel: str | None) -> Callable[[dict[str, str]], bool]:
    """Kubernetes label selector syntax: a=b, a==b, a!=b, a in (x,y), a notin (x), a, !a."""
    terms: list[tuple[str, str, frozenset[str]]] = []
    for term in _split_selector(sel or ""):
        m = _SET_RE.match(term)
        if m:
            vals = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            terms.append((m.group(2), m.group(1), vals))
        elif "!=" in term:
            k, v = (x.strip() for x in term.split("!=", 1))
            terms.append(("notin", k, frozenset([v])))
        elif "=" in term:
            k, v = (x.strip() for x in re.split(r"==?", term, maxsplit=1))
            terms.append(("in", k, frozenset([v])))
        elif term.startswith("!"):
            terms.append(("absent", term[1:].strip(), frozenset()))
        else:
            terms.append(("present", term, frozenset()))

    def match(labels: dict[str, str]) -> bool:
        for op, key, vals in terms:
            value = labels.get(key)
            ok = {
                "in": value in vals,
                "notin": value not in vals,
                "absent": key not in labels,
                "present": key in labels,
            }[op]
            if not ok:
                return False
        return True

    return match


def _path_get(obj: Obj, path: str) -> Any:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def parse_field_selector(sel: str | None) -> Callable[[Obj], bool]:
    """Field selectors: metadata.name=x, involvedObject.name=x, spec.nodeName=x, status.phase!=Running."""
    terms: list[tuple[bool, str, str]] = []
    for term in _split_selector(sel or ""):
        neg = "!=" in term
        k, v = (x.strip() for x in re.split(r"!=|==?", term, maxsplit=1))
        terms.append((neg, k, v))

    def match(obj: Obj) -> bool:
        for neg, key, want in terms:
            value = _path_get(obj, key)
            got = "" if value is None else str(value)
            if (got == want) == neg:
                return False
        return True

    return match


def _clone(obj: Any) -> Any:
    """A deep copy. Stored objects are plain JSON-like data; a pickle round trip copies them ~4x faster
    than ``copy.deepcopy`` (the simulated cluster copies on every read and write, as the API server
    hands out fresh objects)."""
    return pickle.loads(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))  # noqa: S301  # our own bytes, this process


def controller_uid(obj: Obj) -> str | None:
    """The uid of the object's controlling owner (``ownerReferences[].controller``), if any."""
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref["uid"])
    return None


def controller_kind(obj: Obj) -> str | None:
    """The kind of the object's controlling owner, if any."""
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("kind", ""))
    return None


def labels_of(obj: Obj | None) -> dict[str, str]:
    if not obj:
        return {}
    return obj.get("metadata", {}).get("labels") or {}


@dataclass
class WatchEvent:
    rv: int
    plural: str
    type: str  # ADDED / MODIFIED / DELETED
    obj: Obj
    old: Obj | None


class Store:
    """Objects by resource, a global resourceVersion, and a bounded history for watches."""

    def __init__(self, history: int = 20000) -> None:
        self._rv = 100
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {p: {} for p in RESOURCES}
        self._history: deque[WatchEvent] = deque(maxlen=history)
        self._compacted_rv = self._rv
        self._waiters: set[asyncio.Future[None]] = set()
        self.listeners: list[Callable[[WatchEvent], None]] = []

    # ------------------------------------------------------------------ basics
    @property
    def resource_version(self) -> int:
        return self._rv

    @property
    def compacted_rv(self) -> int:
        return self._compacted_rv

    def compact(self) -> None:
        """Forget all history (tests use it to force 410 Gone on resumed watches)."""
        self._history.clear()
        self._compacted_rv = self._rv

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _record(self, plural: str, etype: str, obj: Obj, old: Obj | None) -> None:
        if len(self._history) == self._history.maxlen and self._history:
            self._compacted_rv = self._history[0].rv
        ev = WatchEvent(int(obj["metadata"]["resourceVersion"]), plural, etype, _clone(obj), old)
        self._history.append(ev)
        for fn in list(self.listeners):
            fn(ev)
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def wait_change(self, timeout: float | None = None) -> bool:
        """Wait until anything in the store changes. True if something did, False on timeout."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters.discard(fut)

    @staticmethod
    def rtype(plural: str) -> ResourceType:
        try:
            return RESOURCES[plural]
        except KeyError:
            raise NotFoundError(f"the server could not find the requested resource ({plural})") from None

    @staticmethod
    def qualified(plural: str) -> str:
        """``deployments.apps`` / ``pods``: how the real API server names a resource in messages."""
        rt = RESOURCES.get(plural)
        return f"{plural}.{rt.group}" if rt is not None and rt.group else plural

    def _key(self, plural: str, namespace: str | None, name: str) -> tuple[str, str]:
        return ((namespace or "") if self.rtype(plural).namespaced else "", name)

    # ------------------------------------------------------------------ reads
    def get(self, plural: str, namespace: str | None, name: str) -> Obj:
        obj = self._objects[plural].get(self._key(plural, namespace, name))
        if obj is None:
            self.rtype(plural)
            raise NotFoundError(f'{self.qualified(plural)} "{name}" not found')
        return _clone(obj)

    def find(self, plural: str, namespace: str | None, name: str) -> Obj | None:
        try:
            return self.get(plural, namespace, name)
        except NotFoundError:
            return None

    def list(
        self,
        plural: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        owners: set[str] | None = None,
    ) -> list[Obj]:
        """Copies of the matching objects; ``owners``: only those whose controlling owner is one of these
        uids (what a controller's informer index answers without copying the rest)."""
        self.rtype(plural)
        lmatch = parse_label_selector(label_selector)
        fmatch = parse_field_selector(field_selector)
        out = []
        for (ns, _name), obj in sorted(self._objects[plural].items()):
            if namespace and ns != namespace:
                continue
            if owners is not None and controller_uid(obj) not in owners:
                continue
            if lmatch(labels_of(obj)) and fmatch(obj):
                out.append(_clone(obj))
        return out

    def ownership(
        self, plural: str, owner_kind: str | None = None
    ) -> builtins.list[tuple[str, str, str, str | None, bool]]:
        """(namespace, name, uid, controller uid, being deleted) of every object (only those whose
        controlling owner is an ``owner_kind``, if given): for garbage collection, without copying them."""
        self.rtype(plural)
        return [
            (ns, name, o["metadata"]["uid"], controller_uid(o), bool(o["metadata"].get("deletionTimestamp")))
            for (ns, name), o in sorted(self._objects[plural].items())
            if owner_kind is None or controller_kind(o) in (owner_kind, None)
        ]

    # ------------------------------------------------------------------ writes
    def create(self, plural: str, obj: Obj, namespace: str | None = None) -> Obj:
        rt = self.rtype(plural)
        obj = _clone(obj)
        meta = obj.setdefault("metadata", {})
        if rt.namespaced:
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            else:
                raise InvalidError(
                    f"{rt.kind} is invalid: metadata.name: Required value: name or generateName is required"
                )
        key = self._key(plural, meta.get("namespace"), meta["name"])
        if key in self._objects[plural]:
            raise AlreadyExistsError(f'{self.qualified(plural)} "{meta["name"]}" already exists')
        default_object(plural, obj)
        obj["apiVersion"] = rt.api_version
        obj["kind"] = rt.kind
        meta["uid"] = str(uuid.uuid4())
        meta.setdefault("creationTimestamp", now_rfc3339())
        meta["resourceVersion"] = self._next_rv()
        if plural in ("deployments", "replicasets", "jobs"):
            meta["generation"] = 1
        if plural == "jobs":
            _label_job(obj)
        self._objects[plural][key] = obj
        self._record(plural, "ADDED", obj, None)
        return _clone(obj)

    def update(self, plural: str, obj: Obj, *, status_only: bool = False, check_rv: bool = False) -> Obj:
        """Replace an object. ``status_only`` keeps the stored spec (the status subresource)."""
        rt = self.rtype(plural)
        obj = _clone(obj)
        meta = obj.setdefault("metadata", {})
        key = self._key(plural, meta.get("namespace"), meta.get("name", ""))
        old = self._objects[plural].get(key)
        if old is None:
            raise NotFoundError(f'{self.qualified(plural)} "{meta.get("name")}" not found')
        if check_rv and meta.get("resourceVersion") and meta["resourceVersion"] != old["metadata"]["resourceVersion"]:
            raise ConflictError(
                f'Operation cannot be fulfilled on {self.qualified(plural)} "{meta["name"]}": '
                "the object has been modified; please apply your changes to the latest version and try again"
            )
        if status_only:
            new = _clone(old)
            new["status"] = obj.get("status", {})
        else:
            new = default_object(plural, obj, creating=False)
            if "status" not in new and "status" in old:
                new["status"] = _clone(old["status"])
            # immutable / server-owned metadata
            for f in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds"):
                if f in old["metadata"]:
                    new["metadata"][f] = old["metadata"][f]
            if "generation" in old["metadata"]:
                gen = old["metadata"]["generation"]
                new["metadata"]["generation"] = gen + 1 if new.get("spec") != old.get("spec") else gen
        new["apiVersion"] = rt.api_version
        new["kind"] = rt.kind
        if rt.namespaced:
            new["metadata"]["namespace"] = old["metadata"]["namespace"]
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return _clone(old)  # a no-op write changes nothing, as on a real API server
        new["metadata"]["resourceVersion"] = self._next_rv()
        self._objects[plural][key] = new
        self._record(plural, "MODIFIED", new, _clone(old))
        return _clone(new)

    def mark_deleting(self, plural: str, namespace: str | None, name: str, grace_s: int) -> Obj:
        """Graceful deletion: set deletionTimestamp; the kubelet removes the object later."""
        obj = self.get(plural, namespace, name)
        if obj["metadata"].get("deletionTimestamp"):
            return obj
        key = self._key(plural, namespace, name)
        old = self._objects[plural][key]
        new = _clone(old)
        new["metadata"]["deletionTimestamp"] = now_rfc3339(time.time() + grace_s)
        new["metadata"]["deletionGracePeriodSeconds"] = grace_s
        new["metadata"]["resourceVersion"] = self._next_rv()
        self._objects[plural][key] = new
        self._record(plural, "MODIFIED", new, _clone(old))
        return _clone(new)

    def delete(self, plural: str, namespace: str | None, name: str) -> Obj:
        key = self._key(plural, namespace, name)
        old = self._objects[plural].pop(key, None)
        if old is None:
            raise NotFoundError(f'{self.qualified(plural)} "{name}" not found')
        gone = _clone(old)
        gone["metadata"]["resourceVersion"] = self._next_rv()
        self._record(plural, "DELETED", gone, _clone(old))
        return _clone(gone)

    # ------------------------------------------------------------------ watch
    async def watch(
        self,
        plural: str,
        namespace: str | None,
        since_rv: int,
        label_selector: str | None = None,
        field_selector: str | None = None,
        stop: asyncio.Event | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """Events after ``since_rv`` matching the selectors, as a real watch sends them.

        An object that starts matching a selector arrives as ADDED, one that stops matching as
        DELETED. Raises :class:`GoneError` if ``since_rv`` is older than the retained history.
        ``on_progress(rv)`` is called each time every event up to ``rv`` has been yielded or skipped
        (what a BOOKMARK may safely carry).
        """
        if since_rv < self._compacted_rv:
            raise GoneError(f"too old resource version: {since_rv} ({self._compacted_rv})")
        lmatch = parse_label_selector(label_selector)
        fmatch = parse_field_selector(field_selector)
        last = since_rv
        while stop is None or not stop.is_set():
            snapshot = self._rv  # every event up to here is in ``pending`` (or was handled before)
            pending: list[WatchEvent] = []
            for e in reversed(self._history):  # history is in rv order: walk back to ``last`` only
                if e.rv <= last:
                    break
                if e.plural == plural:
                    pending.append(e)
            pending.reverse()
            if not pending and self._history and self._history[0].rv > last + 1 and last < self._compacted_rv:
                raise GoneError(f"too old resource version: {last} ({self._compacted_rv})")
            for ev in pending:
                last = ev.rv
                ns = ev.obj.get("metadata", {}).get("namespace")
                if namespace and ns != namespace:
                    continue
                new_match = lmatch(labels_of(ev.obj)) and fmatch(ev.obj)
                old_match = ev.old is not None and lmatch(labels_of(ev.old)) and fmatch(ev.old)
                if ev.type == "ADDED":
                    if new_match:
                        yield ev
                elif ev.type == "DELETED":
                    if old_match or new_match:
                        yield ev
                elif new_match and old_match:
                    yield ev
                elif new_match:
                    yield WatchEvent(ev.rv, plural, "ADDED", ev.obj, ev.old)
                elif old_match:
                    yield WatchEvent(ev.rv, plural, "DELETED", ev.obj, ev.old)
            if on_progress is not None:
                on_progress(max(last, snapshot))
            if stop is not None and stop.is_set():
                return
            if self._rv != snapshot:
                continue  # something changed while the consumer held an event: rescan at once
            await self.wait_change(timeout=1.0)
