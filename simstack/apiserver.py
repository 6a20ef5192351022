"""The simulated cluster's Kubernetes API server: the real REST API over :class:`simstack.store.Store`.

Real clients (kubernetes-asyncio, kubectl 1.32) talk to it unchanged through a kubeconfig
(:func:`kubeconfig_yaml`). It serves legacy discovery, CRUD + watch for every resource in
``store.RESOURCES``, the ``status`` and ``scale`` subresources, server-side Tables for ``kubectl get``,
and the ``exec`` / ``portforward`` WebSocket subresources (channel protocol v4/v5).

Everything runs on the event loop the server is started on (the store is not thread-safe).

Hooks for reliability tests:

* ``app["faults"]`` (:class:`ApiFaults`): queue failures (500/429/403/...) for the next N requests
  matching a method and a path regex, or drop the next watch stream matching a path after K events.
* ``app["requests"]``: the last requests seen, as ``(method, path_qs)``.
* ``authorizer``: ``authorizer(token, verb, resource, namespace, name) -> bool | str`` (``str`` = the
  reason, refused). :class:`RBACAuthorizer` evaluates Role/RoleBinding objects of the store for
  ServiceAccount tokens.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import os
import re
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import yaml
from aiohttp import WSMsgType, web

from simstack.backends import Backends
from simstack.store import (
    RESOURCES,
    GoneError,
    Obj,
    ResourceType,
    Store,
    StoreError,
    default_object,
    labels_of,
    now_rfc3339,
    parse_label_selector,
)

K8S_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-sim",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-12-11T00:00:00Z",
    "goVersion": "go1.23.3",
    "compiler": "gc",
    "platform": "linux/amd64",
}

#: resources with a status subresource: PUT/PATCH on the main resource keep the stored status
STATUS_SUBRESOURCE = {"pods", "deployments", "replicasets", "nodes", "services", "namespaces"}
CATEGORY_ALL = {"pods", "services", "deployments", "replicasets"}
SINGULAR = {p: rt.kind.lower() for p, rt in RESOURCES.items()}

Authorizer = Callable[[str | None, str, str, str | None, str | None], "bool | str | Awaitable[bool | str]"]


# ====================================================================== errors
class ApiError(Exception):
    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}


def status_obj(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> Obj:
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success" if code < 400 else "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def _status_response(err: ApiError) -> web.Response:
    return web.json_response(
        status_obj(err.code, err.reason, err.message, err.details), status=err.code, headers=err.headers
    )


def _details(rt: ResourceType | None, name: str | None) -> dict[str, Any] | None:
    if rt is None:
        return None
    d: dict[str, Any] = {"kind": rt.plural}
    if name:
        d["name"] = name
    if rt.group:
        d["group"] = rt.group
    return d


def _from_store_error(e: StoreError, rt: ResourceType | None, name: str | None) -> ApiError:
    return ApiError(e.code, e.reason, str(e), _details(rt, name))


def not_found_resource() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def bad_request(msg: str) -> ApiError:
    return ApiError(400, "BadRequest", msg)


_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_bool(value: str | None, param: str = "") -> bool:
    """Go's strconv.ParseBool, as the API server decodes ``?watch=``; an empty value is false."""
    if value is None or value == "":
        return False
    if value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    raise bad_request(f'strconv.ParseBool: parsing "{value}": invalid syntax ({param})')


# ====================================================================== faults
@dataclass
class _Fault:
    method: str
    path: re.Pattern[str]
    status: int
    remaining: int
    retry_after: int | None
    message: str | None


@dataclass
class _WatchDrop:
    path: re.Pattern[str]
    after_events: int
    remaining: int
    abort: bool


_FAULT_REASON = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@dataclass
class ApiFaults:
    """Faults a test queues on the running API server (``app["faults"]``). Thread-safe enough for
    use from a test thread: every method only appends/pops Python lists."""

    _faults: list[_Fault] = field(default_factory=list)
    _drops: list[_WatchDrop] = field(default_factory=list)
    fired: list[tuple[str, str, int]] = field(default_factory=list)

    def fail(
        self,
        method: str,
        path: str,
        status: int = 500,
        *,
        times: int = 1,
        retry_after: int | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``times`` requests matching ``method`` ("*" = any) and ``path`` (a regex
        searched in the URL path) with ``status`` (429 adds ``Retry-After``, default 1 s)."""
        if status == 429 and retry_after is None:
            retry_after = 1
        self._faults.append(_Fault(method.upper(), re.compile(path), status, times, retry_after, message))

    def drop_watch(self, path: str, after_events: int = 0, *, times: int = 1, abort: bool = False) -> None:
        """End the next ``times`` watch streams matching ``path`` after ``after_events`` events (the
        server closes the stream, as a load balancer would; ``abort=True`` resets the connection)."""
        self._drops.append(_WatchDrop(re.compile(path), after_events, times, abort))

    def clear(self) -> None:
        self._faults.clear()
        self._drops.clear()

    def take_failure(self, method: str, path: str) -> ApiError | None:
        for f in list(self._faults):
            if f.method in ("*", method) and f.path.search(path):
                f.remaining -= 1
                if f.remaining <= 0:
                    self._faults.remove(f)
                self.fired.append((method, path, f.status))
                reason = _FAULT_REASON.get(f.status, "InternalError")
                headers: dict[str, str] = {}
                details: dict[str, Any] = {}
                if f.retry_after is not None:
                    headers["Retry-After"] = str(f.retry_after)
                    details["retryAfterSeconds"] = f.retry_after
                msg = f.message or {
                    429: "Too many requests, please try again later.",
                    403: "forbidden: injected fault",
                    503: "the server is currently unable to handle the request",
                    504: "the server was unable to return a response in the time allotted",
                }.get(f.status, "Internal error occurred: injected fault")
                return ApiError(f.status, reason, msg, details or None, headers)
        return None

    def take_watch_drop(self, path: str) -> _WatchDrop | None:
        for d in list(self._drops):
            if d.path.search(path):
                d.remaining -= 1
                if d.remaining <= 0:
                    self._drops.remove(d)
                return d
        return None


# ====================================================================== RBAC
class RBACAuthorizer:
    """Authorise ServiceAccount bearer tokens with the store's Role/RoleBinding objects.

    ``tokens`` maps a token to ``(namespace, serviceaccount)``. Unknown tokens are unauthenticated
    (401). ``superusers`` are tokens allowed everything (e.g. the kubeconfig's admin token).
    """

    def __init__(self, store: Store, tokens: dict[str, tuple[str, str]], superusers: set[str] | None = None) -> None:
        self.store = store
        self.tokens = tokens
        self.superusers = superusers or set()

    def authenticate(self, token: str | None) -> str | None:
        if token in self.superusers:
            return "system:admin"
        if token is None or token not in self.tokens:
            return None
        ns, sa = self.tokens[token]
        return f"system:serviceaccount:{ns}:{sa}"

    def __call__(self, token: str | None, verb: str, resource: str, namespace: str | None, name: str | None) -> bool:
        if token in self.superusers:
            return True
        if token is None or token not in self.tokens:
            return False
        sa_ns, sa = self.tokens[token]
        base = resource.partition("/")[0]
        rt = RESOURCES.get(base)
        group = rt.group if rt else ""

        def bound(binding: Obj) -> bool:
            return any(
                s.get("kind") == "ServiceAccount"
                and s.get("name") == sa
                and (s.get("namespace") or binding["metadata"].get("namespace")) == sa_ns
                for s in binding.get("subjects") or []
            )

        roles: list[Obj | None] = []
        # ClusterRoleBindings grant their ClusterRole everywhere (cluster scope and every namespace).
        for crb in self.store.list("clusterrolebindings", None):
            ref = crb.get("roleRef") or {}
            if bound(crb) and ref.get("kind") == "ClusterRole":
                roles.append(self.store.find("clusterroles", None, ref.get("name", "")))
        # RoleBindings grant a Role (or a ClusterRole's rules) in their own namespace only.
        if namespace:
            for rb in self.store.list("rolebindings", namespace):
                ref = rb.get("roleRef") or {}
                if not bound(rb):
                    continue
                if ref.get("kind") == "Role":
                    roles.append(self.store.find("roles", namespace, ref.get("name", "")))
                elif ref.get("kind") == "ClusterRole":
                    roles.append(self.store.find("clusterroles", None, ref.get("name", "")))
        for role in roles:
            for rule in (role or {}).get("rules") or []:
                if not _matches(rule.get("apiGroups"), group):
                    continue
                if not _matches(rule.get("resources"), resource):
                    continue
                if not _matches(rule.get("verbs"), verb):
                    continue
                names = rule.get("resourceNames")
                if names and name not in names:
                    continue
                return True
        return False


def _matches(allowed: list[str] | None, value: str) -> bool:
    return bool(allowed) and ("*" in allowed or value in allowed)  # type: ignore[operator]


# ====================================================================== patches
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "conditions": "type",
    "imagePullSecrets": "name",
    "containerStatuses": "name",
    "initContainerStatuses": "name",
    "hostAliases": "ip",
    "ownerReferences": "uid",
    "topologySpreadConstraints": "topologyKey",
}


def json_merge_patch(orig: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(orig) if isinstance(orig, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = json_merge_patch(out.get(k), v)
    return out


def _list_merge_key(fieldname: str, orig: list[Any], patch: list[Any]) -> str | None:
    if fieldname == "ports":
        items = [i for i in orig + patch if isinstance(i, dict)]
        return "containerPort" if any("containerPort" in i for i in items) else "port"
    return _MERGE_KEYS.get(fieldname)


def strategic_merge_patch(orig: Any, patch: Any) -> Any:
    """Strategic merge patch for the built-in types used here (merge keys by field name)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    out = copy.deepcopy(orig) if isinstance(orig, dict) else {}
    for k, v in patch.items():
        if k.startswith("$deleteFromPrimitiveList/"):
            fname = k.split("/", 1)[1]
            if isinstance(out.get(fname), list):
                out[fname] = [x for x in out[fname] if x not in v]
            continue
        if k.startswith("$"):
            continue  # $setElementOrder/..., $retainKeys, $patch: ordering hints only
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict):
            if v.get("$patch") == "delete":
                out.pop(k, None)
            else:
                out[k] = strategic_merge_patch(out.get(k), v)
        elif isinstance(v, list):
            cur: list[Any] = out[k] if isinstance(out.get(k), list) else []
            key = _list_merge_key(k, cur, v)
            if key and all(isinstance(i, dict) for i in v):
                out[k] = _merge_list(cur, v, key)
            else:
                out[k] = [copy.deepcopy(i) for i in v if not (isinstance(i, dict) and "$patch" in i)]
        else:
            out[k] = v
    return out


def _merge_list(cur: list[Any], patch: list[dict[str, Any]], key: str) -> list[Any]:
    if any(i.get("$patch") == "replace" for i in patch):
        return [copy.deepcopy(i) for i in patch if "$patch" not in i]
    result = [copy.deepcopy(i) for i in cur]
    for item in patch:
        kv = item.get(key)
        idx = next((n for n, x in enumerate(result) if isinstance(x, dict) and x.get(key) == kv), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                result.pop(idx)
        elif idx is None:
            result.append(strategic_merge_patch({}, item))
        else:
            result[idx] = strategic_merge_patch(result[idx], item)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for p in parts:
        if isinstance(doc, list):
            doc = doc[int(p)]
        elif isinstance(doc, dict):
            doc = doc[p]
        else:
            raise KeyError(p)
    return doc


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind = op.get("op")
        parts = _pointer(op.get("path", ""))
        try:
            if kind == "test":
                if _walk(doc, parts) != op.get("value"):
                    raise ApiError(
                        422,
                        "Invalid",
                        f"the server rejected our request: test failed at {op.get('path')}",
                    )
                continue
            if kind in ("move", "copy"):
                src = _pointer(op.get("from", ""))
                value = copy.deepcopy(_walk(doc, src))
                if kind == "move":
                    doc = _remove(doc, src)
                doc = _add(doc, parts, value)
            elif kind == "add":
                doc = _add(doc, parts, copy.deepcopy(op.get("value")))
            elif kind == "remove":
                doc = _remove(doc, parts)
            elif kind == "replace":
                _walk(doc, parts)  # must exist
                doc = _remove(doc, parts)
                doc = _add(doc, parts, copy.deepcopy(op.get("value")))
            else:
                raise bad_request(f"Unexpected kind: {kind}")
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(
                422,
                "Invalid",
                f"the server rejected our request: {kind} operation does not apply: "
                f'doc is missing path: "{op.get("path")}"',
            ) from None
    return doc


def _add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            i = int(last)
            if i > len(parent):
                raise IndexError(i)
            parent.insert(i, value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise KeyError(last)
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    if not parts:
        return None
    parent = _walk(doc, parts[:-1])
    if isinstance(parent, list):
        parent.pop(int(parts[-1]))
    else:
        del parent[parts[-1]]
    return doc


def apply_patch(obj: Obj, content_type: str, body: bytes) -> Obj:
    ctype = content_type.split(";")[0].strip().lower()
    try:
        patch = json.loads(body or b"null")
    except ValueError as e:
        raise bad_request(f"error decoding patch: {e}") from None
    if ctype == "application/json-patch+json":
        if not isinstance(patch, list):
            raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
        out = json_patch(obj, patch)
    elif ctype == "application/merge-patch+json":
        out = json_merge_patch(obj, patch)
    elif ctype == "application/strategic-merge-patch+json":
        out = strategic_merge_patch(obj, patch)
    else:
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media types include: "
            f"application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json"
            f" (got {ctype})",
        )
    if not isinstance(out, dict):
        raise bad_request("patch did not produce an object")
    return out


# ====================================================================== helpers
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
            conds = st.get("conditions") or []
            pod_ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)
            reason = "Running" if pod_ready else "NotReady"
    if pod["metadata"].get("deletionTimestamp"):
        reason = "Unknown" if st.get("reason") == "NodeLost" else "Terminating"
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


def _wants_table(request: web.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


# ------------------------------------------------------------------ defaulting
# ====================================================================== discovery
def _api_resource(rt: ResourceType) -> Obj:
    r: Obj = {
        "name": rt.plural,
        "singularName": SINGULAR[rt.plural],
        "namespaced": rt.namespaced,
        "kind": rt.kind,
        "verbs": sorted({*rt.verbs, "deletecollection"}),
    }
    if rt.short_names:
        r["shortNames"] = list(rt.short_names)
    if rt.plural in CATEGORY_ALL:
        r["categories"] = ["all"]
    return r


def _sub(rt: ResourceType, sub: str, verbs: list[str], kind: str | None = None, group: str | None = None) -> Obj:
    r: Obj = {
        "name": f"{rt.plural}/{sub}",
        "singularName": "",
        "namespaced": rt.namespaced,
        "kind": kind or rt.kind,
        "verbs": verbs,
    }
    if group is not None:
        r["group"], r["version"] = group.split("/")
    return r


def resource_list(group_version: str) -> Obj | None:
    rts = [rt for rt in RESOURCES.values() if rt.api_version == group_version]
    if not rts:
        return None
    resources: list[Obj] = []
    for rt in rts:
        resources.append(_api_resource(rt))
        if rt.plural in STATUS_SUBRESOURCE:
            resources.append(_sub(rt, "status", ["get", "patch", "update"]))
        if rt.plural in ("deployments", "replicasets"):
            resources.append(_sub(rt, "scale", ["get", "patch", "update"], "Scale", "autoscaling/v1"))
        if rt.plural == "pods":
            resources.append(_sub(rt, "exec", ["create", "get"], "PodExecOptions"))
            resources.append(_sub(rt, "portforward", ["create", "get"], "PodPortForwardOptions"))
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}


def api_groups() -> Obj:
    groups: dict[str, list[str]] = {}
    for rt in RESOURCES.values():
        if rt.group:
            groups.setdefault(rt.group, [])
            if rt.version not in groups[rt.group]:
                groups[rt.group].append(rt.version)
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [_api_group(g, vs) for g, vs in sorted(groups.items())],
    }


def _api_group(group: str, versions: list[str]) -> Obj:
    vs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": vs, "preferredVersion": vs[0]}


# ====================================================================== the server
@dataclass
class _Target:
    rt: ResourceType
    namespace: str | None
    name: str | None
    sub: str | None


class ApiServer:
    def __init__(
        self,
        store: Store,
        backends: Backends,
        authorizer: Authorizer | None = None,
        bookmark_interval: float = 1.0,
    ) -> None:
        self.store = store
        self.backends = backends
        self.authorizer = authorizer
        self.bookmark_interval = bookmark_interval
        self.faults = ApiFaults()
        self.requests: deque[tuple[str, str]] = deque(maxlen=2000)
        self._streams: set[web.StreamResponse] = set()
        self._watch_tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ app
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        with warnings.catch_warnings():  # plain string keys: the documented hook names
            warnings.simplefilter("ignore")
            app["apiserver"] = self
            app["store"] = self.store
            app["backends"] = self.backends
            app["faults"] = self.faults
            app["requests"] = self.requests
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, app: web.Application) -> None:
        for ws in list(self._streams):
            if isinstance(ws, web.WebSocketResponse):
                with contextlib.suppress(Exception):
                    await ws.close()
        tasks = [t for t in self._watch_tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        try:
            fault = self.faults.take_failure(request.method, request.path)
            if fault is not None:
                raise fault
            return await self._dispatch(request)
        except ApiError as e:
            return _status_response(e)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        parts = [p for p in path.split("/") if p]
        if path == "/version":
            return web.json_response(K8S_VERSION)
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if path == "/api":
            return web.json_response(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}],
                }
            )
        if path == "/apis":
            return web.json_response(api_groups())
        if parts and parts[0] == "apis" and len(parts) == 2:
            groups = {g["name"]: g for g in api_groups()["groups"]}
            if parts[1] in groups:
                return web.json_response(groups[parts[1]])
            raise not_found_resource()
        if (parts[:1] == ["api"] and len(parts) == 2) or (parts[:1] == ["apis"] and len(parts) == 3):
            gv = "/".join(parts[1:])
            rl = resource_list(gv)
            if rl is None:
                raise not_found_resource()
            return web.json_response(rl)
        target = self._parse(parts)
        if target is None:
            raise not_found_resource()
        return await self._resource(request, target)

    def _parse(self, parts: list[str]) -> _Target | None:
        if parts[:2] == ["api", "v1"]:
            gv, rest = "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return None
        by_plural = {rt.plural: rt for rt in RESOURCES.values() if rt.api_version == gv}
        ns: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in by_plural:
            ns, rest = rest[1], rest[2:]
        if not rest or rest[0] not in by_plural or len(rest) > 3:
            return None
        rt = by_plural[rest[0]]
        if ns is not None and not rt.namespaced:
            return None
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if name is not None and rt.namespaced and ns is None:
            return None
        if sub is not None and sub not in ("status", "scale", "exec", "portforward", "attach", "log"):
            return None
        if sub == "scale" and rt.plural not in ("deployments", "replicasets"):
            return None
        if sub in ("exec", "portforward", "attach", "log") and rt.plural != "pods":
            return None
        return _Target(rt, ns, name, sub)

    # ------------------------------------------------------------------ authz
    async def _authorize(self, request: web.Request, t: _Target, verb: str) -> None:
        if self.authorizer is None:
            return
        auth = request.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        authenticate = getattr(self.authorizer, "authenticate", None)
        user = "system:anonymous"
        if authenticate is not None:
            who = authenticate(token)
            if who is None:
                raise ApiError(401, "Unauthorized", "Unauthorized")
            user = who
        resource = f"{t.rt.plural}/{t.sub}" if t.sub else t.rt.plural
        verdict = self.authorizer(token, verb, resource, t.namespace, t.name)
        if asyncio.iscoroutine(verdict):
            verdict = await verdict
        if verdict is True:
            return
        scope = f'in the namespace "{t.namespace}"' if t.namespace else "at the cluster scope"
        reason = (
            verdict
            if isinstance(verdict, str)
            else f'User "{user}" cannot {verb} resource "{resource}" in API group "{t.rt.group}" {scope}'
        )
        who = f'{self.store.qualified(t.rt.plural)} "{t.name}"' if t.name else self.store.qualified(t.rt.plural)
        raise ApiError(403, "Forbidden", f"{who} is forbidden: {reason}", _details(t.rt, t.name))

    # ------------------------------------------------------------------ resources
    async def _resource(self, request: web.Request, t: _Target) -> web.StreamResponse:
        q = request.query
        m = request.method
        if t.sub in ("exec", "attach"):
            await self._authorize(request, t, "create")
            if t.sub == "attach":
                raise bad_request("attach is not supported by the simulated cluster")
            return await self._exec(request, t)
        if t.sub == "portforward":
            await self._authorize(request, t, "create")
            return await self._portforward(request, t)
        if t.sub == "log":
            await self._authorize(request, t, "get")
            self._get(t)
            return web.Response(text="", content_type="text/plain")
        if m == "GET" and t.name is None:
            watch = parse_bool(q.get("watch"), "watch")
            await self._authorize(request, t, "watch" if watch else "list")
            if watch:
                return await self._watch(request, t)
            return self._list(request, t)
        if m == "GET":
            await self._authorize(request, t, "get")
            obj = self._get(t)
            if t.sub == "scale":
                return web.json_response(self._scale_of(obj))
            if _wants_table(request):
                return web.json_response(
                    to_table(t.rt.plural, [obj], obj["metadata"]["resourceVersion"], q.get("includeObject", "Metadata"))
                )
            return web.json_response(obj)
        if m == "POST" and t.name is None:
            await self._authorize(request, t, "create")
            return await self._create(request, t)
        if m == "PUT" and t.name is not None:
            await self._authorize(request, t, "update")
            return await self._replace(request, t)
        if m == "PATCH" and t.name is not None:
            await self._authorize(request, t, "patch")
            return await self._patch(request, t)
        if m == "DELETE" and t.name is not None and t.sub is None:
            await self._authorize(request, t, "delete")
            return await self._delete(request, t)
        if m == "DELETE" and t.name is None:
            await self._authorize(request, t, "deletecollection")
            return await self._delete_collection(request, t)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _get(self, t: _Target) -> Obj:
        try:
            return self.store.get(t.rt.plural, t.namespace, t.name or "")
        except StoreError as e:
            raise _from_store_error(e, t.rt, t.name) from None

    def _list(self, request: web.Request, t: _Target) -> web.Response:
        q = request.query
        rv = str(self.store.resource_version)
        items = self.store.list(t.rt.plural, t.namespace, q.get("labelSelector"), q.get("fieldSelector"))
        if _wants_table(request):
            return web.json_response(to_table(t.rt.plural, items, rv, q.get("includeObject", "Metadata")))
        for it in items:
            it.pop("apiVersion", None)
            it.pop("kind", None)
        return web.json_response(
            {
                "kind": f"{t.rt.kind}List",
                "apiVersion": t.rt.api_version,
                "metadata": {"resourceVersion": rv},
                "items": items,
            }
        )

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            if "yaml" in request.content_type:
                return yaml.safe_load(raw)
            return json.loads(raw or b"null")
        except (ValueError, yaml.YAMLError) as e:
            raise bad_request(f"error decoding request body: {e}") from None

    async def _create(self, request: web.Request, t: _Target) -> web.Response:
        if t.sub is not None:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        body = await self._body(request)
        if not isinstance(body, dict):
            raise bad_request("the body of the request is not an object")
        body_ns = (body.get("metadata") or {}).get("namespace")
        if t.rt.namespaced and body_ns and body_ns != t.namespace:
            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
        if body.get("kind") and body["kind"] != t.rt.kind:
            raise bad_request(f"the kind of the provided object ({body['kind']}) does not match {t.rt.kind}")
        meta = body.setdefault("metadata", {})
        for f in ("resourceVersion", "uid", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"):
            meta.pop(f, None)
        if t.rt.plural not in ("pods", "namespaces") and t.rt.plural in STATUS_SUBRESOURCE:
            body.pop("status", None)
        default_object(t.rt.plural, body)
        if parse_bool(request.query.get("dryRun") and "true"):
            body["metadata"].setdefault("creationTimestamp", now_rfc3339())
            return web.json_response(body, status=201)
        try:
            obj = self.store.create(t.rt.plural, body, t.namespace)
        except StoreError as e:
            raise _from_store_error(e, t.rt, meta.get("name")) from None
        return web.json_response(obj, status=201)

    def _write(self, t: _Target, new: Obj, *, check_rv: bool) -> Obj:
        """Store an updated main resource / status subresource, as the real registry would."""
        new.setdefault("metadata", {})
        if (new["metadata"].get("name") or t.name) != t.name:
            raise bad_request(
                f"the name of the object ({new['metadata'].get('name')}) does not match the name on the URL ({t.name})"
            )
        new["metadata"]["name"] = t.name
        if t.rt.namespaced:
            new["metadata"]["namespace"] = t.namespace
        try:
            if t.sub == "status":
                return self.store.update(t.rt.plural, new, status_only=True, check_rv=check_rv)
            if t.rt.plural in STATUS_SUBRESOURCE:
                cur = self.store.get(t.rt.plural, t.namespace, t.name or "")
                if "status" in cur:
                    new["status"] = cur["status"]
            default_object(t.rt.plural, new, creating=False)
            return self.store.update(t.rt.plural, new, check_rv=check_rv)
        except StoreError as e:
            raise _from_store_error(e, t.rt, t.name) from None

    async def _replace(self, request: web.Request, t: _Target) -> web.Response:
        body = await self._body(request)
        if not isinstance(body, dict):
            raise bad_request("the body of the request is not an object")
        if t.sub == "scale":
            cur = self._get(t)
            return web.json_response(self._set_scale(t, cur, body, check_rv=True))
        return web.json_response(self._write(t, body, check_rv=True))

    async def _patch(self, request: web.Request, t: _Target) -> web.Response:
        raw = await request.read()
        cur = self._get(t)
        if t.sub == "scale":
            patched = apply_patch(self._scale_of(cur), request.content_type, raw)
            return web.json_response(self._set_scale(t, cur, patched, check_rv=True))
        patched = apply_patch(cur, request.content_type, raw)
        # a patch carrying a resourceVersion is a precondition, like an update's
        check = patched["metadata"].get("resourceVersion") != cur["metadata"]["resourceVersion"]
        return web.json_response(self._write(t, patched, check_rv=check))

    # ------------------------------------------------------------------ scale
    def _scale_of(self, obj: Obj) -> Obj:
        meta = obj["metadata"]
        spec, st = obj.get("spec") or {}, obj.get("status") or {}
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                "name": meta["name"],
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
                "creationTimestamp": meta.get("creationTimestamp"),
            },
            "spec": {"replicas": spec.get("replicas", 1)},
            "status": {"replicas": st.get("replicas", 0), "selector": selector_string(spec.get("selector"))},
        }

    def _set_scale(self, t: _Target, cur: Obj, scale: Obj, *, check_rv: bool) -> Obj:
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise ApiError(
                422,
                "Invalid",
                f'Scale.autoscaling "{t.name}" is invalid: spec.replicas: Invalid value: {replicas}: '
                "must be greater than or equal to 0",
            )
        rv = (scale.get("metadata") or {}).get("resourceVersion")
        if check_rv and rv and rv != cur["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {self.store.qualified(t.rt.plural)} "{t.name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
                _details(t.rt, t.name),
            )
        cur.setdefault("spec", {})["replicas"] = replicas
        main = _Target(t.rt, t.namespace, t.name, None)
        return self._scale_of(self._write(main, cur, check_rv=False))

    # ------------------------------------------------------------------ delete
    async def _delete_options(self, request: web.Request) -> Obj:
        opts: Obj = {}
        raw = await request.read()
        if raw.strip():
            with contextlib.suppress(ValueError):
                body = json.loads(raw)
                if isinstance(body, dict):
                    opts = body
        if "gracePeriodSeconds" in request.query:
            try:
                opts["gracePeriodSeconds"] = int(request.query["gracePeriodSeconds"])
            except ValueError:
                raise bad_request("invalid gracePeriodSeconds") from None
        if "propagationPolicy" in request.query:
            opts["propagationPolicy"] = request.query["propagationPolicy"]
        return opts

    def delete_object(self, plural: str, namespace: str | None, name: str, opts: Obj) -> Obj:
        """Delete like the real registry: pods gracefully (the kubelet finishes), the rest at once;
        dependents (ownerReferences) are garbage-collected unless ``propagationPolicy: Orphan``."""
        rt = RESOURCES[plural]
        cur = self.store.get(plural, namespace, name)
        pre = opts.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != cur["metadata"].get("uid"):
            raise ApiError(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {pre['uid']}, "
                f"UID in object meta: {cur['metadata'].get('uid')}",
            )
        if pre.get("resourceVersion") and pre["resourceVersion"] != cur["metadata"].get("resourceVersion"):
            raise ApiError(
                409,
                "Conflict",
                f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                f"ResourceVersion in object meta: {cur['metadata'].get('resourceVersion')}",
            )
        if plural == "pods":
            grace = opts.get("gracePeriodSeconds")
            if grace is None:
                grace = (cur.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
            grace = max(0, int(grace))
            if grace == 0 or not (cur.get("spec") or {}).get("nodeName"):
                return self.store.delete(plural, namespace, name)
            return self.store.mark_deleting(plural, namespace, name, grace)
        gone = self.store.delete(plural, namespace, name)
        if opts.get("propagationPolicy") != "Orphan":
            self._collect_dependents(gone["metadata"].get("uid"))
        if plural == "namespaces":
            for other in RESOURCES.values():
                if other.namespaced:
                    for o in self.store.list(other.plural, name):
                        with contextlib.suppress(StoreError):
                            self.delete_object(other.plural, name, o["metadata"]["name"], {})
        del rt
        return gone

    def _collect_dependents(self, uid: str | None) -> None:
        if not uid:
            return
        for rt in RESOURCES.values():
            for o in self.store.list(rt.plural):
                if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or []):
                    with contextlib.suppress(StoreError):
                        self.delete_object(rt.plural, o["metadata"].get("namespace"), o["metadata"]["name"], {})

    async def _delete(self, request: web.Request, t: _Target) -> web.Response:
        opts = await self._delete_options(request)
        try:
            out = self.delete_object(t.rt.plural, t.namespace, t.name or "", opts)
        except StoreError as e:
            raise _from_store_error(e, t.rt, t.name) from None
        if t.rt.plural == "pods":
            return web.json_response(out)
        details = _details(t.rt, t.name) or {}
        details["uid"] = out["metadata"].get("uid")
        return web.json_response(
            {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}
        )

    async def _delete_collection(self, request: web.Request, t: _Target) -> web.Response:
        opts = await self._delete_options(request)
        q = request.query
        items = self.store.list(t.rt.plural, t.namespace, q.get("labelSelector"), q.get("fieldSelector"))
        out = []
        for o in items:
            with contextlib.suppress(StoreError):
                out.append(self.delete_object(t.rt.plural, o["metadata"].get("namespace"), o["metadata"]["name"], opts))
        return web.json_response(
            {
                "kind": f"{t.rt.kind}List",
                "apiVersion": t.rt.api_version,
                "metadata": {"resourceVersion": str(self.store.resource_version)},
                "items": out,
            }
        )

    # ------------------------------------------------------------------ watch
    async def _watch(self, request: web.Request, t: _Target) -> web.StreamResponse:
        q = request.query
        rv_param = q.get("resourceVersion", "")
        try:
            timeout = float(q.get("timeoutSeconds") or 1800)
        except ValueError:
            raise bad_request("invalid timeoutSeconds") from None
        bookmarks = parse_bool(q.get("allowWatchBookmarks"), "allowWatchBookmarks")
        send_initial = parse_bool(q.get("sendInitialEvents"), "sendInitialEvents")
        lsel, fsel = q.get("labelSelector"), q.get("fieldSelector")
        if rv_param not in ("", "0"):
            try:
                since = int(rv_param)
            except ValueError:
                raise bad_request(f"invalid resource version: {rv_param}") from None
        else:
            since = self.store.resource_version
        initial: list[Obj] = []
        if rv_param in ("", "0") or send_initial:
            initial = self.store.list(t.rt.plural, t.namespace, lsel, fsel)
            since = self.store.resource_version
        drop = self.faults.take_watch_drop(request.path)

        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json", "Cache-Control": "no-cache"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self._streams.add(resp)
        me = asyncio.current_task()
        if me is not None:
            self._watch_tasks.add(me)

        table = _wants_table(request)
        include = q.get("includeObject", "Metadata")

        async def send(etype: str, obj: Obj) -> None:
            if table and etype in ("ADDED", "MODIFIED", "DELETED"):
                obj = to_table(t.rt.plural, [obj], obj["metadata"].get("resourceVersion", ""), include)
            await resp.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

        queue: asyncio.Queue[tuple[str, Obj] | None] = asyncio.Queue()
        progress = [since]
        store = self.store

        async def produce() -> None:
            try:
                async for ev in store.watch(
                    t.rt.plural, t.namespace, since, lsel, fsel, on_progress=lambda rv: progress.__setitem__(0, rv)
                ):
                    queue.put_nowait((ev.type, ev.obj))
            except GoneError as e:
                queue.put_nowait(("ERROR", status_obj(410, "Expired", str(e))))
                queue.put_nowait(None)

        producer: asyncio.Task[None] | None = None
        sent = 0
        deadline = time.monotonic() + timeout
        try:
            if since < store.compacted_rv:
                await send(
                    "ERROR", status_obj(410, "Expired", f"too old resource version: {since} ({store.compacted_rv})")
                )
                return resp
            for obj in initial:
                await send("ADDED", obj)
                sent += 1
                if drop and sent >= drop.after_events:
                    return self._drop(request, resp, drop)
            if send_initial and bookmarks:
                await send(
                    "BOOKMARK",
                    {
                        "kind": t.rt.kind,
                        "apiVersion": t.rt.api_version,
                        "metadata": {
                            "resourceVersion": str(since),
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    },
                )
            if drop and sent >= drop.after_events:
                return self._drop(request, resp, drop)
            producer = asyncio.create_task(produce())
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                wait = deadline - now
                if bookmarks:
                    wait = min(wait, max(0.0, next_bookmark - now))
                try:
                    # Queued events are taken without a timed wait. Once a bookmark is overdue ``wait`` is 0,
                    # and on Python 3.11 ``wait_for(queue.get(), 0)`` cancels the get before it runs: with an
                    # event queued (the bookmark waits for an empty queue) the stream then spun here, sending
                    # nothing, until timeoutSeconds.
                    if queue.empty():
                        item = await asyncio.wait_for(queue.get(), timeout=wait)
                    else:
                        item = queue.get_nowait()
                except TimeoutError:
                    if bookmarks and time.monotonic() >= next_bookmark and queue.empty():
                        await send(
                            "BOOKMARK",
                            {
                                "kind": t.rt.kind,
                                "apiVersion": t.rt.api_version,
                                "metadata": {"resourceVersion": str(progress[0])},
                            },
                        )
                        next_bookmark = time.monotonic() + self.bookmark_interval
                    continue
                if item is None:
                    break
                await send(*item)
                sent += 1
                if drop and sent >= drop.after_events:
                    return self._drop(request, resp, drop)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            if producer is not None:
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await producer
            self._streams.discard(resp)
            if me is not None:
                self._watch_tasks.discard(me)
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await resp.write_eof()
        return resp

    def _drop(self, request: web.Request, resp: web.StreamResponse, drop: _WatchDrop) -> web.StreamResponse:
        if drop.abort and request.transport is not None:
            request.transport.abort()
        else:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().create_task(resp.write_eof())
        return resp

    # ------------------------------------------------------------------ exec
    def _exec_target(self, t: _Target, container: str | None) -> tuple[Obj, Obj]:
        pod = self._get(t)
        spec = pod.get("spec") or {}
        containers = spec.get("containers") or []
        if not spec.get("nodeName"):
            raise bad_request(f"pod {t.name} does not have a host assigned")
        name = container or (containers[0]["name"] if containers else "")
        c = next((c for c in containers if c.get("name") == name), None)
        if c is None:
            names = " ".join(x.get("name", "") for x in containers)
            raise bad_request(
                f"container {name} is not valid for pod {t.name}"
                if container
                else f"a container name must be specified for pod {t.name}, choose one of: [{names}]"
            )
        st = pod.get("status") or {}
        if st.get("phase") in ("Succeeded", "Failed"):
            raise bad_request(f"cannot exec into a container in a completed pod; current phase is {st.get('phase')}")
        cs = next((x for x in st.get("containerStatuses") or [] if x.get("name") == name), None)
        if st.get("phase") != "Running" or cs is None or not (cs.get("state") or {}).get("running"):
            raise bad_request(f'unable to upgrade connection: container not found ("{name}")')
        return pod, c

    def container_env(self, pod: Obj, container: Obj) -> dict[str, str]:
        """The container's environment as a kubelet would build it (plus the host PATH)."""
        ns = pod["metadata"].get("namespace")
        env: dict[str, str] = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": pod["metadata"]["name"]}

        def secret_data(name: str) -> dict[str, str] | None:
            s = self.store.find("secrets", ns, name)
            if s is None:
                return None
            return {k: base64.b64decode(v).decode(errors="replace") for k, v in (s.get("data") or {}).items()}

        def cm_data(name: str) -> dict[str, str] | None:
            cm = self.store.find("configmaps", ns, name)
            return None if cm is None else dict(cm.get("data") or {})

        for ef in container.get("envFrom") or []:
            prefix = ef.get("prefix", "")
            src = None
            if ef.get("secretRef"):
                src = secret_data(ef["secretRef"].get("name", ""))
            elif ef.get("configMapRef"):
                src = cm_data(ef["configMapRef"].get("name", ""))
            for k, v in (src or {}).items():
                env[prefix + k] = v
        for e in container.get("env") or []:
            name = e.get("name")
            if not name:
                continue
            if "value" in e:
                env[name] = re.sub(
                    r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), str(e["value"])
                )
                continue
            vf = e.get("valueFrom") or {}
            value: str | None = None
            if vf.get("secretKeyRef"):
                ref = vf["secretKeyRef"]
                value = (secret_data(ref.get("name", "")) or {}).get(ref.get("key", ""))
            elif vf.get("configMapKeyRef"):
                ref = vf["configMapKeyRef"]
                value = (cm_data(ref.get("name", "")) or {}).get(ref.get("key", ""))
            elif vf.get("fieldRef"):
                fp = vf["fieldRef"].get("fieldPath", "")
                value = {
                    "metadata.name": pod["metadata"]["name"],
                    "metadata.namespace": ns,
                    "spec.nodeName": (pod.get("spec") or {}).get("nodeName"),
                    "status.podIP": (pod.get("status") or {}).get("podIP"),
                    "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName"),
                }.get(fp)
            if value is not None:
                env[name] = value
        return env

    async def _exec(self, request: web.Request, t: _Target) -> web.StreamResponse:
        q = request.query
        command = q.getall("command", [])
        if not command:
            raise bad_request("you must specify at least 1 command")
        want_stdin = parse_bool(q.get("stdin"), "stdin")
        want_stdout = parse_bool(q.get("stdout"), "stdout")
        want_stderr = parse_bool(q.get("stderr"), "stderr")
        tty = parse_bool(q.get("tty"), "tty")
        pod, container = self._exec_target(t, q.get("container"))
        if request.headers.get("Upgrade", "").lower() != "websocket":
            raise bad_request("Upgrade request required")
        env = self.container_env(pod, container)

        ws = web.WebSocketResponse(protocols=("v5.channel.k8s.io", "v4.channel.k8s.io"), autoping=True)
        await ws.prepare(request)
        self._streams.add(ws)
        v5 = ws.ws_protocol == "v5.channel.k8s.io"
        proc: asyncio.subprocess.Process | None = None
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *command,
                    env=env,
                    cwd=os.environ.get("HOME", "/"),
                    stdin=asyncio.subprocess.PIPE if want_stdin else asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT if tty else asyncio.subprocess.PIPE,
                )
            except OSError as e:
                msg = (
                    f'OCI runtime exec failed: exec failed: unable to start container process: exec: "{command[0]}": '
                    f"{'executable file not found in $PATH' if isinstance(e, FileNotFoundError) else e}: unknown\r\n"
                )
                if want_stderr or want_stdout:
                    await ws.send_bytes(bytes([2 if want_stderr else 1]) + msg.encode())
                await ws.send_bytes(b"\x03" + json.dumps(self._exit_status(command, 127)).encode())
                return ws

            async def pump(stream: asyncio.StreamReader | None, channel: int, forward: bool) -> None:
                if stream is None:
                    return
                while True:
                    chunk = await stream.read(32768)
                    if not chunk:
                        return
                    if forward and not ws.closed:
                        await ws.send_bytes(bytes([channel]) + chunk)

            async def read_client() -> None:
                async for msg in ws:
                    if msg.type != WSMsgType.BINARY or not msg.data:
                        continue
                    ch, data = msg.data[0], msg.data[1:]
                    if ch == 0 and proc is not None and proc.stdin is not None and data:
                        proc.stdin.write(data)
                        with contextlib.suppress(ConnectionError):
                            await proc.stdin.drain()
                    elif ch == 255 and v5 and data[:1] == b"\x00" and proc is not None and proc.stdin is not None:
                        proc.stdin.close()
                # the client went away: stop the process, as the kubelet would
                if proc is not None and proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()

            reader = asyncio.create_task(read_client())
            await asyncio.gather(pump(proc.stdout, 1, want_stdout or tty), pump(proc.stderr, 2, want_stderr))
            code = await proc.wait()
            if not ws.closed:
                await ws.send_bytes(b"\x03" + json.dumps(self._exit_status(command, code)).encode())
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        finally:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            with contextlib.suppress(Exception):
                await ws.close()
            self._streams.discard(ws)
        return ws

    @staticmethod
    def _exit_status(command: list[str], code: int) -> Obj:
        if code == 0:
            return {"metadata": {}, "status": "Success"}
        if code < 0:  # killed by a signal
            code = 128 - code
        return {
            "metadata": {},
            "status": "Failure",
            "message": "command terminated with non-zero exit code: error executing command "
            f"{json.dumps(command)}, exit code {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
        }

    # ------------------------------------------------------------------ port-forward
    async def _portforward(self, request: web.Request, t: _Target) -> web.StreamResponse:
        pod = self._get(t)
        if not (pod.get("spec") or {}).get("nodeName"):
            raise bad_request(f"pod {t.name} does not have a host assigned")
        ports: list[int] = []
        for value in request.query.getall("ports", []):
            for p in value.split(","):
                try:
                    port = int(p)
                except ValueError:
                    raise bad_request(f'unable to parse "{p}" as a port: invalid syntax') from None
                if not 0 < port < 65536:
                    raise bad_request(f"port {port} must be > 0 and < 65536")
                ports.append(port)
        if not ports:
            raise bad_request('query parameter "port" is required')
        if request.headers.get("Upgrade", "").lower() != "websocket":
            raise bad_request("Upgrade request required")
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io", "channel.k8s.io"), autoping=True)
        await ws.prepare(request)
        self._streams.add(ws)
        ns, name, uid = t.namespace or "", t.name or "", pod["metadata"].get("uid", "")
        writers: dict[int, asyncio.StreamWriter] = {}
        tasks: list[asyncio.Task[None]] = []
        send_lock = asyncio.Lock()

        async def send(channel: int, data: bytes) -> None:
            async with send_lock:
                if not ws.closed:
                    await ws.send_bytes(bytes([channel]) + data)

        async def backend_to_ws(i: int, reader: asyncio.StreamReader) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    await send(2 * i, chunk)
            writers.pop(i, None)
            if not writers:
                await ws.close()

        try:
            for i, port in enumerate(ports):
                prefix = port.to_bytes(2, "little")
                await send(2 * i, prefix)
                await send(2 * i + 1, prefix)
            for i, port in enumerate(ports):
                addr = self.backends.lookup(ns, name, port)
                err: str | None = None
                if addr is None:
                    err = "connection refused"
                else:
                    try:
                        reader, writer = await asyncio.open_connection(addr.host, addr.port)
                    except OSError as e:
                        err = str(e) or "connection refused"
                    else:
                        writers[i] = writer
                        tasks.append(asyncio.create_task(backend_to_ws(i, reader)))
                if err is not None:
                    await send(
                        2 * i + 1,
                        (
                            f"error forwarding port {port} to pod {uid}, uid : failed to execute portforward in "
                            "network "
                            f"namespace: failed to connect to localhost:{port} inside namespace: {err}"
                        ).encode(),
                    )
            if not writers:
                await ws.close()
            async for msg in ws:
                if msg.type != WSMsgType.BINARY or not msg.data:
                    continue
                ch, data = msg.data[0], msg.data[1:]
                if ch % 2 == 0 and ch // 2 in writers and data:
                    w = writers[ch // 2]
                    w.write(data)
                    with contextlib.suppress(ConnectionError):
                        await w.drain()
        finally:
            for w in list(writers.values()):
                with contextlib.suppress(Exception):
                    w.close()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for w in list(writers.values()):
                with contextlib.suppress(Exception):
                    await w.wait_closed()
            with contextlib.suppress(Exception):
                await ws.close()
            self._streams.discard(ws)
        return ws


# ====================================================================== entry points
async def start_apiserver(
    store: Store,
    backends: Backends,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    authorizer: Authorizer | None = None,
    bookmark_interval: float = 1.0,
) -> tuple[web.AppRunner, str]:
    """Start the API server on the running loop. Returns the runner (``await runner.cleanup()`` stops
    it; ``runner.app["faults"]`` etc.) and the base URL ``http://127.0.0.1:PORT``."""
    server = ApiServer(store, backends, authorizer=authorizer, bookmark_interval=bookmark_interval)
    runner = web.AppRunner(server.make_app(), handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    actual = sockets[0].getsockname()[1] if sockets else port
    return runner, f"http://{host}:{actual}"


def kubeconfig_yaml(url: str, context: str = "coder-sim", token: str | None = None, namespace: str = "default") -> str:
    user: dict[str, Any] = {"token": token} if token else {}
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": url}}],
        "users": [{"name": context, "user": user}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": context, "namespace": namespace}}],
        "current-context": context,
        "preferences": {},
    }
    return yaml.safe_dump(cfg, sort_keys=False)


__all__ = [
    "ApiError",
    "ApiFaults",
    "ApiServer",
    "RBACAuthorizer",
    "apply_patch",
    "json_merge_patch",
    "json_patch",
    "kubeconfig_yaml",
    "parse_bool",
    "parse_label_selector",
    "pod_status_reason",
    "start_apiserver",
    "strategic_merge_patch",
]
