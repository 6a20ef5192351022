"""``GET /api/v1/namespaces/{ns}/pods/{name}/log``: a container's output, as the kubelet serves it through
the API server (``container``, ``tailLines``, ``limitBytes``, ``follow``, ``previous``).

The output of a runnable pod's container is its process's stdout and stderr (a file the kubelet names through
``log_file``); a stand-in's container has none (an empty log, as before), except what the vLLM stand-in writes
when it fails to start on a time-sliced GPU. A container waiting to restart (CrashLoopBackOff) serves its last
terminated instance's log, as the kubelet does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from simstack.apiserver.errors import ApiError, bad_request, parse_bool
from simstack.apiserver.target import Target
from simstack.store import Obj, Store

LogFile = Callable[[str, str, str, bool], Path | None]  # namespace, pod, container, previous


def _container(pod: Obj, wanted: str | None) -> str:
    spec = pod.get("spec") or {}
    mains = [c["name"] for c in spec.get("containers") or []]
    inits = [c["name"] for c in spec.get("initContainers") or []]
    name = pod["metadata"]["name"]
    if not wanted:
        if len(mains) == 1:
            return mains[0]
        choices = " ".join(mains)
        extra = f" or one of the init containers: [{' '.join(inits)}]" if inits else ""
        raise bad_request(f"a container name must be specified for pod {name}, choose one of: [{choices}]{extra}")
    if wanted not in mains + inits:
        raise bad_request(f"container {wanted} is not valid for pod {name}")
    return wanted


def _status(pod: Obj, container: str) -> Obj:
    st = pod.get("status") or {}
    for cs in (st.get("containerStatuses") or []) + (st.get("initContainerStatuses") or []):
        if cs.get("name") == container:
            return cs
    return {}


def _state(pod: Obj, container: str) -> Obj:
    return _status(pod, container).get("state") or {}


def _tail(data: bytes, lines: int | None, limit: int | None) -> bytes:
    if lines is not None:
        parts = data.splitlines(keepends=True)
        data = b"".join(parts[-lines:]) if lines > 0 else b""
    if limit is not None:
        data = data[:limit]
    return data


def _int(q: str | None, what: str) -> int | None:
    if q is None or q == "":
        return None
    try:
        value = int(q)
    except ValueError:
        raise bad_request(f"invalid {what}: {q}") from None
    if value < 0:
        raise bad_request(f"{what} must be greater than or equal to 0")
    return value


async def pod_log(request: web.Request, t: Target, store: Store, log_file: LogFile | None) -> web.StreamResponse:
    q = request.query
    ns, name = t.namespace or "", t.name or ""
    pod = store.find("pods", ns, name)
    if pod is None:
        raise ApiError(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"})
    container = _container(pod, q.get("container"))
    state = _state(pod, container)
    last = (_status(pod, container).get("lastState") or {}).get("terminated") or {}
    if "waiting" in state and last.get("containerID"):
        # the kubelet's validateContainerLogStatus: a container waiting to restart (CrashLoopBackOff) serves the
        # log of its last terminated instance
        pass
    elif "waiting" in state or not state:
        reason = (state.get("waiting") or {}).get("reason", "ContainerCreating")
        raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: {reason}')
    previous = False
    if parse_bool(q.get("previous"), "previous"):
        if not last.get("containerID"):
            raise bad_request(f'previous terminated container "{container}" in pod "{name}" not found')
        # waiting to restart, the last terminated instance is the current log; running again, the one before.
        # GUESS: the simulated kubelet keeps a previous instance's log for the stand-ins' containers only
        previous = "waiting" not in state
        if previous and (log_file is None or log_file(ns, name, container, True) is None):
            raise bad_request(f'previous terminated container "{container}" in pod "{name}" not found')
    tail = _int(q.get("tailLines"), "tailLines")
    limit = _int(q.get("limitBytes"), "limitBytes")
    path = log_file(ns, name, container, previous) if log_file is not None else None
    data = path.read_bytes() if path is not None and path.exists() else b""
    if not parse_bool(q.get("follow"), "follow"):
        return web.Response(body=_tail(data, tail, limit), content_type="text/plain")
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await resp.prepare(request)
    first = _tail(data, tail, limit)
    sent = len(first)
    if first:
        await resp.write(first)
    offset = len(data)
    while path is not None and (limit is None or sent < limit):
        running = "running" in _state(store.find("pods", ns, name) or {}, container)
        chunk = b""
        if path.exists():
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read(65536)
        if chunk:
            offset += len(chunk)
            if limit is not None:
                chunk = chunk[: limit - sent]
            sent += len(chunk)
            await resp.write(chunk)
            continue
        if not running:
            break
        await asyncio.sleep(0.1)
    await resp.write_eof()
    return resp
