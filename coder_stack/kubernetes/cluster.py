"""Cluster functions the flows call: scale, wait for Ready (per cold-start phase), wait until gone,
status, exec, preflight.

Written against real Kubernetes semantics with kubernetes-asyncio. Every function takes an ``ApiClient``
first. Waits are watch-based (pods, their events, the deployment), never sleep loops: a watch stream
that ends (``timeoutSeconds``) is resumed from the last resourceVersion, a 410 Gone re-lists, BOOKMARK
events are skipped. Library errors are translated with :func:`coder_stack.kubernetes.client.api_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.stream import WsApiClient
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import (
    ClusterError,
    ClusterRequestError,
    ClusterUnavailable,
    CoderStackError,
    Forbidden,
    NotFound,
    PodFailed,
    PodNotReady,
    PreflightError,
    SpecError,
    WaitTimeout,
)
from coder_stack.kubernetes.client import API_TIMEOUT, api_errors
from coder_stack.spec import PhaseBudgets, StackSpec

# Server-side watch timeout (seconds). A stream that ends is resumed from the last resourceVersion.
WATCH_TIMEOUT_S = 55
# After the pod is Ready, how long the deployment's status may lag behind (one reconcile) at least.
DEPLOYMENT_LAG_MIN_S = 5.0
# Watch reconnects tolerated in a row on connection errors before giving up.
WATCH_RECONNECTS = 4

PHASES: tuple[str, ...] = ("node", "image", "weights", "start")
Phase = Literal["node", "image", "weights", "start", "ready"]

GPU_RESOURCE = "nvidia.com/gpu"
# GCP G2 machine types (one L4) by host RAM: the memory caps the model size (weights staged through RAM).
G2_BY_MEMORY_GB: tuple[tuple[int, str], ...] = (
    (16, "g2-standard-4"),
    (32, "g2-standard-8"),
    (64, "g2-standard-16"),
    (128, "g2-standard-32"),
)

_TRANSIENT_STATUS = frozenset({0, 429, 500, 502, 503, 504})
_IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
_CONFIG_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError"})


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ============================================================================================ scale
class ScaleResult(_Report):
    namespace: str = Field(description="Namespace of the deployment.")
    name: str = Field(description="Deployment name.")
    found: int = Field(ge=0, description="spec.replicas before the call.")
    requested: int = Field(ge=0, description="spec.replicas asked for.")
    changed: bool = Field(description="Whether the call changed anything (False on a rerun).")


async def scale(api: ApiClient, namespace: str, name: str, replicas: int) -> ScaleResult:
    """`kubectl scale`: set spec.replicas through the scale subresource. Idempotent."""
    if replicas < 0:
        raise SpecError(f"replicas must be 0 or more, got {replicas}")
    apps = client.AppsV1Api(api)
    with _deployment_not_found(namespace, name), api_errors("get", "deployments/scale", namespace, name):
        current = await apps.read_namespaced_deployment_scale(name, namespace, _request_timeout=API_TIMEOUT)
    found = int(current.spec.replicas or 0) if current.spec else 0
    if found == replicas:
        return ScaleResult(namespace=namespace, name=name, found=found, requested=replicas, changed=False)
    body = {"spec": {"replicas": replicas}}
    with _deployment_not_found(namespace, name), api_errors("patch", "deployments/scale", namespace, name):
        await apps.patch_namespaced_deployment_scale(name, namespace, body, _request_timeout=API_TIMEOUT)
    return ScaleResult(namespace=namespace, name=name, found=found, requested=replicas, changed=True)


@contextlib.contextmanager
def _deployment_not_found(namespace: str, name: str) -> Iterator[None]:
    try:
        yield
    except NotFound as e:
        raise NotFound(
            f"deployment {name!r} not found in namespace {namespace!r}; check the stack spec's names "
            f"(`kubectl -n {namespace} get deploy`)"
        ) from e.__cause__


# ============================================================================================ pods
def is_pod_ready(pod: client.V1Pod) -> bool:
    if pod.metadata and pod.metadata.deletion_timestamp:
        return False
    for c in (pod.status.conditions if pod.status else None) or []:
        if c.type == "Ready":
            return c.status == "True"
    return False


def _is_deleting(pod: client.V1Pod) -> bool:
    return bool(pod.metadata and pod.metadata.deletion_timestamp)


def _condition(pod: client.V1Pod, ctype: str) -> client.V1PodCondition | None:
    for c in (pod.status.conditions if pod.status else None) or []:
        if c.type == ctype:
            return c
    return None


def _created(pod: client.V1Pod) -> tuple[float, str]:
    ts = pod.metadata.creation_timestamp if pod.metadata else None
    t = ts.timestamp() if isinstance(ts, datetime) else 0.0
    return (t, pod.metadata.name if pod.metadata else "")


def kubectl_status(pod: client.V1Pod) -> str:
    """The STATUS column of `kubectl get pods` (the printer's rules, simplified)."""
    st = pod.status or client.V1PodStatus()
    reason = st.reason or st.phase or "Unknown"
    init_specs = (pod.spec.init_containers if pod.spec else None) or []
    initializing = False
    for i, c in enumerate(st.init_container_statuses or []):
        state = c.state or client.V1ContainerState()
        if state.terminated and state.terminated.exit_code == 0:
            continue
        if state.terminated:
            t = state.terminated
            reason = "Init:" + (t.reason or (f"Signal:{t.signal}" if t.signal else f"ExitCode:{t.exit_code}"))
        elif state.waiting and state.waiting.reason and state.waiting.reason != "PodInitializing":
            reason = "Init:" + state.waiting.reason
        else:
            reason = f"Init:{i}/{len(init_specs) or len(st.init_container_statuses or [])}"
        initializing = True
        break
    if not initializing:
        has_running = False
        for c in reversed(st.container_statuses or []):
            state = c.state or client.V1ContainerState()
            if state.waiting and state.waiting.reason:
                reason = state.waiting.reason
            elif state.terminated and state.terminated.reason:
                reason = state.terminated.reason
            elif state.terminated:
                t = state.terminated
                reason = f"Signal:{t.signal}" if t.signal else f"ExitCode:{t.exit_code}"
            elif c.ready and state.running:
                has_running = True
        if reason == "Completed" and has_running:
            reason = "Running"
    if _is_deleting(pod):
        reason = "Terminating"
    return str(reason)


class PodSummary(_Report):
    name: str = Field(description="Pod name.")
    status: str = Field(description="STATUS as `kubectl get pods` shows it (Running, Init:0/1, CrashLoopBackOff...).")
    phase: str = Field(description="status.phase (Pending, Running, Succeeded, Failed, Unknown).")
    ready: str = Field(description="READY column: ready containers / containers.")
    is_ready: bool = Field(description="The pod's Ready condition is True and it is not being deleted.")
    restarts: int = Field(ge=0, description="Restarts of the main containers.")
    node: str | None = Field(None, description="Node the pod is bound to, if any.")
    deleting: bool = Field(False, description="metadata.deletionTimestamp is set.")


def _summarise(pod: client.V1Pod) -> PodSummary:
    st = pod.status or client.V1PodStatus()
    statuses = st.container_statuses or []
    total = len((pod.spec.containers if pod.spec else None) or []) or len(statuses)
    return PodSummary(
        name=pod.metadata.name,
        status=kubectl_status(pod),
        phase=st.phase or "Unknown",
        ready=f"{sum(1 for c in statuses if c.ready)}/{total}",
        is_ready=is_pod_ready(pod),
        restarts=sum(int(c.restart_count or 0) for c in statuses),
        node=pod.spec.node_name if pod.spec else None,
        deleting=_is_deleting(pod),
    )


async def list_pods(api: ApiClient, namespace: str, selector: str) -> list[client.V1Pod]:
    core = client.CoreV1Api(api)
    with api_errors("list", "pods", namespace):
        pods = await core.list_namespaced_pod(namespace, label_selector=selector, _request_timeout=API_TIMEOUT)
    return sorted(pods.items or [], key=_created)


async def pod_summary(api: ApiClient, namespace: str, selector: str) -> list[PodSummary]:
    """The pods matching a label selector, oldest first, as `kubectl get pods -l` shows them."""
    return [_summarise(p) for p in await list_pods(api, namespace, selector)]


class DeploymentStatus(_Report):
    namespace: str = Field(description="Namespace of the deployment.")
    name: str = Field(description="Deployment name.")
    replicas: int = Field(ge=0, description="spec.replicas (what was asked for).")
    ready_replicas: int = Field(ge=0, description="status.readyReplicas.")
    updated_replicas: int = Field(ge=0, description="status.updatedReplicas.")
    generation: int = Field(ge=0, description="metadata.generation.")
    observed_generation: int = Field(ge=0, description="status.observedGeneration.")
    ready: bool = Field(description="observedGeneration >= generation and readyReplicas == replicas.")
    pods: list[PodSummary] = Field(default_factory=list, description="Pods of the deployment.")


def _deployment_ready(dep: client.V1Deployment) -> bool:
    want = int(dep.spec.replicas if dep.spec and dep.spec.replicas is not None else 1)
    st = dep.status or client.V1DeploymentStatus()
    gen = int(dep.metadata.generation or 0) if dep.metadata else 0
    return int(st.observed_generation or 0) >= gen and int(st.ready_replicas or 0) == want


def _selector_of(dep: client.V1Deployment) -> str:
    labels = (dep.spec.selector.match_labels if dep.spec and dep.spec.selector else None) or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


async def read_deployment(api: ApiClient, namespace: str, name: str) -> client.V1Deployment:
    """A Deployment, or NotFound naming it and pointing at the stack spec's names."""
    apps = client.AppsV1Api(api)
    with _deployment_not_found(namespace, name), api_errors("get", "deployments", namespace, name):
        return await apps.read_namespaced_deployment(name, namespace, _request_timeout=API_TIMEOUT)


async def deployment_status(api: ApiClient, namespace: str, name: str) -> DeploymentStatus:
    """Replicas, readiness and pods of one deployment (for `coder-stack status`)."""
    dep = await read_deployment(api, namespace, name)
    selector = _selector_of(dep)
    pods = await pod_summary(api, namespace, selector) if selector else []
    st = dep.status or client.V1DeploymentStatus()
    return DeploymentStatus(
        namespace=namespace,
        name=name,
        replicas=int(dep.spec.replicas if dep.spec and dep.spec.replicas is not None else 1),
        ready_replicas=int(st.ready_replicas or 0),
        updated_replicas=int(st.updated_replicas or 0),
        generation=int(dep.metadata.generation or 0),
        observed_generation=int(st.observed_generation or 0),
        ready=_deployment_ready(dep),
        pods=pods,
    )


# ============================================================================================ watching
_Item = tuple[str, str, str, Any]  # (kind: "list"|"event"|"error", resource, event type, payload)


class _Watch(watch.Watch):
    """``watch.Watch`` that decodes events with the caller's ``ApiClient``.

    The library's ``Watch()`` builds an ``ApiClient`` of its own (a default Configuration and a new SSL
    context, ~30 ms of CPU) only to deserialise events, and closes it with the watch: once per reconnect.
    """

    def __init__(self, api_client: ApiClient) -> None:
        self._raw_return_type = None
        self._stop = False
        self._api_client = api_client
        self.resource_version = None
        self.resp = None

    async def close(self) -> None:  # the API client is the caller's: release only the stream
        if self.resp is not None:
            self.resp.release()
            self.resp = None


async def _list_into(
    queue: asyncio.Queue[_Item],
    resource: str,
    list_fn: Callable[..., Awaitable[Any]],
    namespace: str,
    kwargs: dict[str, Any],
) -> str:
    with api_errors("list", resource, namespace):
        result = await list_fn(namespace, _request_timeout=API_TIMEOUT, **kwargs)
    await queue.put(("list", resource, "", list(result.items or [])))
    return str(result.metadata.resource_version or "")


async def _watch_into(
    queue: asyncio.Queue[_Item],
    resource: str,
    list_fn: Callable[..., Awaitable[Any]],
    namespace: str,
    **kwargs: Any,
) -> None:
    """List, then watch from that resourceVersion forever, feeding ``queue``.

    A stream that ends is resumed from the last resourceVersion seen (BOOKMARKs included); 410 Gone
    re-lists (the consumer replaces its state); errors are put into the queue for the consumer to raise.
    Anything else the list or the stream raises (an undecodable event, a client bug) ends the watch as a
    :class:`ClusterError` in the queue at once, so the wait fails now instead of at its phase budget.
    """
    try:
        rv = await _list_into(queue, resource, list_fn, namespace, kwargs)
        failures = 0
        while True:
            w = _Watch(list_fn.__self__.api_client)  # type: ignore[attr-defined]  # a bound *Api method
            try:
                async with w:
                    stream = w.stream(
                        list_fn,
                        namespace,
                        resource_version=rv,
                        timeout_seconds=WATCH_TIMEOUT_S,
                        allow_watch_bookmarks=True,
                        _request_timeout=aiohttp.ClientTimeout(sock_connect=5, sock_read=WATCH_TIMEOUT_S + 15),
                        **kwargs,
                    )
                    async for ev in stream:
                        failures = 0
                        raw = ev.get("raw_object")
                        if isinstance(raw, dict):
                            rv = str((raw.get("metadata") or {}).get("resourceVersion") or rv)
                        if ev.get("type") == "BOOKMARK":
                            continue
                        await queue.put(("event", resource, str(ev["type"]), ev["object"]))
                # The server closed the stream (timeoutSeconds): resume from rv.
            except ApiException as e:
                if e.status == 410:  # our resourceVersion was compacted: re-list, the consumer resyncs
                    rv = await _list_into(queue, resource, list_fn, namespace, kwargs)
                    continue
                if e.status not in _TRANSIENT_STATUS or failures >= WATCH_RECONNECTS:
                    with api_errors("watch", resource, namespace):
                        raise
                failures += 1
                await asyncio.sleep(min(0.2 * 2**failures, 3.0))  # reconnect back-off, not a poll
            except (aiohttp.ClientError, ConnectionError, TimeoutError) as e:  # the connection dropped
                failures += 1
                if failures > WATCH_RECONNECTS:
                    raise ClusterUnavailable(
                        f"the watch on {resource} in namespace {namespace!r} kept dropping ({type(e).__name__}); "
                        "check the API server"
                    ) from e
                await asyncio.sleep(min(0.2 * 2**failures, 3.0))  # reconnect back-off, not a poll
    except CoderStackError as e:
        await queue.put(("error", resource, "", e))
    except Exception as e:  # not a timeout, a reconnect or a 410: the watch is dead, say so now
        await queue.put(("error", resource, "", _watch_died(resource, namespace, kwargs, e)))


def _watch_died(resource: str, namespace: str, kwargs: dict[str, Any], e: Exception) -> ClusterError:
    """The error for a watch that died of something unexpected, chained to it as ``raise ... from e`` does.

    Only the exception's type is named: its text may quote the event's object (a pod's env, say).
    """
    selector = kwargs.get("label_selector") or kwargs.get("field_selector")
    err = ClusterError(
        f"the watch on {resource} in namespace {namespace!r}"
        + (f" ({selector})" if selector else "")
        + f" failed unexpectedly ({type(e).__name__}), so the wait stopped: this is not a timeout. "
        "The API server (or a proxy in front of it) sent a response the client could not read, or the client "
        "failed: retry the wait; if it fails the same way again, check the API server's address in the "
        "kubeconfig and the kubernetes-asyncio version, and report it with the chained traceback"
    )
    err.__cause__ = e
    err.__suppress_context__ = True
    return err


@contextlib.asynccontextmanager
async def _watching(*watchers: Awaitable[None]) -> AsyncIterator[None]:
    tasks = [asyncio.ensure_future(w) for w in watchers]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ============================================================================================ wait_ready
class PhaseTiming(_Report):
    phase: str = Field(description="node, image, weights or start.")
    seen: bool = Field(description="Whether the pod was observed in this phase (False: skipped or done before).")
    budget_s: float = Field(ge=0, description="The phase's budget in seconds.")
    seconds: float = Field(ge=0, description="How long the phase took.")
    started_monotonic: float = Field(description="time.monotonic() when the phase began.")
    ended_monotonic: float = Field(description="time.monotonic() when the phase ended.")
    started_at: datetime = Field(description="Wall-clock start (UTC).")
    ended_at: datetime = Field(description="Wall-clock end (UTC).")


class ReadyReport(_Report):
    namespace: str = Field(description="Namespace of the deployment.")
    deployment: str = Field(description="Deployment waited for.")
    pod: str = Field(description="The pod that became Ready.")
    node: str | None = Field(None, description="Node the pod runs on.")
    phases: list[PhaseTiming] = Field(description="node, image, weights, start, in order.")
    seconds: dict[str, float] = Field(description="Seconds per phase.")
    total_s: float = Field(ge=0, description="From the start of the wait until the pod was Ready.")
    scale_up_seen: bool = Field(description="A TriggeredScaleUp event was seen: a node was provisioned for the pod.")
    already_ready: bool = Field(description="The pod was already Ready when the wait began.")
    deployment_lag_s: float = Field(ge=0, description="Pod Ready -> deployment status confirmed it.")
    ready_at: datetime = Field(description="Wall-clock time the pod was seen Ready (UTC).")


class PhaseUpdate(_Report):
    """What ``on_phase`` receives: where the cold start is now."""

    phase: str = Field(description="The phase just entered: node, image, weights, start or ready.")
    pod: str | None = Field(None, description="The pod followed, once one exists.")
    node: str | None = Field(None, description="Its node, once bound.")
    elapsed_s: float = Field(ge=0, description="Seconds since the wait began.")
    budget_s: float = Field(ge=0, description="Budget of this phase (0 for ready).")
    progress: float = Field(ge=0, le=1, description="Share of the whole budget used by the phases before this one.")
    scale_up_seen: bool = Field(description="A TriggeredScaleUp event was seen so far.")
    detail: str = Field("", description="One line in operator words.")


OnPhase = Callable[[str, PhaseUpdate], Awaitable[None] | None]


def _derive_phase(pod: client.V1Pod) -> Phase:
    """Which cold-start phase a pod is in, read from its status (see DESIGN.md, pod life cycle)."""
    spec = pod.spec or client.V1PodSpec(containers=[])
    st = pod.status or client.V1PodStatus()
    if not spec.node_name:
        return "node"
    if is_pod_ready(pod):
        return "ready"
    inits = st.init_container_statuses or []
    mains = st.container_statuses or []
    if spec.init_containers:
        done = (
            bool(inits)
            and all(c.state and c.state.terminated and c.state.terminated.exit_code == 0 for c in inits)
            and len(inits) >= len(spec.init_containers)
        )
        if not done:
            if any(c.state and c.state.running for c in inits):
                return "weights"
            if any(c.state and c.state.terminated for c in inits) and not any(
                c.state and c.state.waiting for c in inits
            ):
                return "weights"
            return "image"
        return "start"
    if st.phase == "Running" or any(c.state and (c.state.running or c.state.terminated) for c in mains):
        return "start"
    return "image"


def _event_key(ev: client.CoreV1Event) -> str:
    md = ev.metadata
    return str((md.uid or md.name) if md else id(ev))


def _event_time(ev: client.CoreV1Event) -> float:
    for ts in (ev.last_timestamp, ev.event_time, ev.first_timestamp, ev.metadata.creation_timestamp):
        if isinstance(ts, datetime):
            return ts.timestamp()
    return 0.0


class _PodEvents:
    """Events of pods, by pod name, in arrival order; kept for pods not seen yet too."""

    MAX = 2000

    def __init__(self) -> None:
        self.by_pod: dict[str, dict[str, tuple[int, client.CoreV1Event]]] = {}
        self.seq = 0
        self.count = 0

    def add(self, ev: client.CoreV1Event) -> None:
        io = ev.involved_object
        if io is None or (io.kind and io.kind != "Pod") or not io.name:
            return
        self.seq += 1
        bucket = self.by_pod.setdefault(io.name, {})
        if _event_key(ev) not in bucket:
            self.count += 1
        bucket[_event_key(ev)] = (self.seq, ev)
        if self.count > self.MAX:  # bound memory on a busy namespace: drop the oldest bucket
            oldest = min(self.by_pod, key=lambda n: max((s for s, _ in self.by_pod[n].values()), default=0))
            self.count -= len(self.by_pod.pop(oldest))

    def replace(self, events: list[client.CoreV1Event]) -> None:
        self.by_pod.clear()
        self.count = 0
        for ev in sorted(events, key=_event_time):
            self.add(ev)

    def of(self, pod: client.V1Pod) -> list[client.CoreV1Event]:
        uid = pod.metadata.uid
        out = []
        for seq, ev in sorted(self.by_pod.get(pod.metadata.name, {}).values(), key=lambda x: x[0]):
            ev_uid = ev.involved_object.uid
            if uid and ev_uid and ev_uid != uid:
                continue
            out.append((seq, ev))
        return [ev for _, ev in out]


def _last_termination(cs: client.V1ContainerStatus) -> client.V1ContainerStateTerminated | None:
    if cs.state and cs.state.terminated:
        return cs.state.terminated
    if cs.last_state and cs.last_state.terminated:
        return cs.last_state.terminated
    return None


OOM_HINT = (
    "host RAM caps model size, not VRAM: vLLM stages the weights through host RAM. "
    "Use a smaller model, or a GPU node with more memory (e.g. g2-standard-8 with 32 GB)"
)


def _fatal(pod: client.V1Pod, events: list[client.CoreV1Event], namespace: str, phase: str) -> PodFailed | None:
    """A state the pod will not recover from by waiting, or None."""
    name = pod.metadata.name
    st = pod.status or client.V1PodStatus()
    where = f"pod {namespace}/{name}"
    if st.phase in ("Failed", "Succeeded"):
        why = st.reason or st.phase
        return PodFailed(
            f"{where} ended with phase {st.phase} ({why}: {st.message or 'no message'}); "
            f"the deployment will replace it — look at `kubectl -n {namespace} describe pod {name}`",
            pod=name,
            reason=str(why),
            phase=phase,
        )
    statuses = [(c, True) for c in st.init_container_statuses or []] + [(c, False) for c in st.container_statuses or []]
    for cs, is_init in statuses:
        kind = "init container" if is_init else "container"
        waiting = cs.state.waiting if cs.state else None
        term = _last_termination(cs)
        if term is not None and (term.reason == "OOMKilled"):
            return PodFailed(
                f"{where}: {kind} {cs.name!r} was OOMKilled (exit code {term.exit_code}). {OOM_HINT}",
                pod=name,
                reason="OOMKilled",
                phase=phase,
            )
        if waiting is None or not waiting.reason:
            continue
        if waiting.reason == "CrashLoopBackOff":
            code = term.exit_code if term is not None else None
            return PodFailed(
                f"{where}: {kind} {cs.name!r} is in CrashLoopBackOff (last exit code {code}, "
                f"restarts {cs.restart_count}). Read its log: `kubectl -n {namespace} logs {name} -c {cs.name} "
                "--previous`, fix the cause (args, model, config), then restart the deployment",
                pod=name,
                reason="CrashLoopBackOff",
                phase=phase,
            )
        if waiting.reason in _IMAGE_PULL_REASONS:
            image = cs.image or _spec_image(pod, cs.name)
            return PodFailed(
                f"{where}: {kind} {cs.name!r} cannot pull image {image!r} ({waiting.reason}: "
                f"{waiting.message or _last_warning(events) or 'no message'}). Check the image name and tag, "
                "and that the node can reach the registry (pull secret)",
                pod=name,
                reason=waiting.reason,
                phase=phase,
            )
        if waiting.reason in _CONFIG_REASONS:
            return PodFailed(
                f"{where}: {kind} {cs.name!r} cannot be created ({waiting.reason}: "
                f"{waiting.message or _last_warning(events) or 'no message'}). A Secret or ConfigMap it reads "
                "(env secretKeyRef / envFrom) is missing or lacks the key: create it, then the pod starts by itself",
                pod=name,
                reason=waiting.reason,
                phase=phase,
            )
    if not (pod.spec and pod.spec.node_name):
        verdict = None
        for ev in events:
            if ev.reason in ("TriggeredScaleUp", "NotTriggerScaleUp"):
                verdict = ev
        if verdict is not None and verdict.reason == "NotTriggerScaleUp":
            sched = _condition(pod, "PodScheduled")
            why = sched.message if sched and sched.message else "unschedulable"
            return PodFailed(
                f"{where} cannot be scheduled ({why}) and the cluster autoscaler will not add a node "
                f"({verdict.message or 'NotTriggerScaleUp'}). Free the GPU (scale the other model to 0), "
                "or fix the pod's node selector/tolerations, or raise the GPU pool's maximum size",
                pod=name,
                reason="NotTriggerScaleUp",
                phase=phase,
            )
    return None


def _spec_image(pod: client.V1Pod, container: str) -> str:
    spec = pod.spec
    for c in ((spec.init_containers or []) + (spec.containers or [])) if spec else []:
        if c.name == container:
            return str(c.image)
    return "?"


def _last_warning(events: list[client.CoreV1Event]) -> str:
    for ev in reversed(events):
        if ev.type == "Warning":
            return f"{ev.reason}: {ev.message}"
    return ""


_TIMEOUT_HINTS = {
    "node": "the pod is not on a node yet. Look at the pod's events (FailedScheduling, TriggeredScaleUp) with "
    "`kubectl -n {ns} describe pod {pod}`: is the GPU still held by another model's pod, is the GPU node pool "
    "at its maximum? Raise budgets.node if the node is merely slow to provision",
    "image": "the image is still being pulled or the container created. Look at the pod's events (Pulling, "
    "FailedMount) with `kubectl -n {ns} describe pod {pod}`; the vLLM image is ~10 GB, raise budgets.image "
    "on a slow registry",
    "weights": "the init container is still staging the weights. Look at "
    "`kubectl -n {ns} logs {pod} -c {container}` and the model-cache PVC; raise budgets.weights for a slow download",
    "start": "the server has not passed its readiness probe. Look at `kubectl -n {ns} logs {pod} -c {container}` "
    "(vLLM loading the model) and the readiness probe; raise budgets.start for a large model",
}


class _Clock:
    def __init__(self) -> None:
        self.mono = time.monotonic()
        self.wall = datetime.now(UTC)

    @staticmethod
    def now() -> tuple[float, datetime]:
        return time.monotonic(), datetime.now(UTC)


class _ReadyWait:
    def __init__(
        self,
        namespace: str,
        name: str,
        budgets: PhaseBudgets,
        on_phase: OnPhase | None,
        deadline_s: float | None,
    ) -> None:
        self.ns = namespace
        self.name = name
        self.budgets = budgets
        self.on_phase = on_phase
        self.begin_mono, self.begin_wall = _Clock.now()
        self.deadline = self.begin_mono + deadline_s if deadline_s else None
        self.pods: dict[str, client.V1Pod] = {}
        self.known_uids: set[str] = set()
        self.events = _PodEvents()
        self.deployment: client.V1Deployment | None = None
        self.lists_seen: set[str] = set()
        self.phase: Phase = "node"
        self.phase_started: tuple[float, datetime] = (self.begin_mono, self.begin_wall)
        self.seen: dict[str, bool] = {"node": False}
        self.timings: list[PhaseTiming] = []
        self.ready_at: tuple[float, datetime] | None = None
        self.ready_pod: client.V1Pod | None = None
        self.already_ready = False
        self.scale_up_seen = False
        self.started_callbacks = False

    # ---- state updates
    def apply(self, item: _Item) -> None:
        kind, resource, etype, payload = item
        if kind == "error":
            raise payload
        if resource == "pods":
            if kind == "list":
                self.pods = {p.metadata.name: p for p in payload}
            elif etype == "DELETED":
                self.pods.pop(payload.metadata.name, None)
            else:
                self.pods[payload.metadata.name] = payload
            for p in self.pods.values():
                if p.metadata.uid:
                    self.known_uids.add(p.metadata.uid)
        elif resource == "events":
            if kind == "list":
                self.events.replace(payload)
            elif etype != "DELETED":
                self.events.add(payload)
        elif resource == "deployments":
            if kind == "list":
                self.deployment = payload[0] if payload else None
            elif etype == "DELETED":
                self.deployment = None
            else:
                self.deployment = payload
        if kind == "list":
            self.lists_seen.add(resource)

    def live_pods(self) -> list[client.V1Pod]:
        return sorted((p for p in self.pods.values() if not _is_deleting(p)), key=_created)

    def followed(self) -> client.V1Pod | None:
        live = self.live_pods()
        ready = [p for p in live if is_pod_ready(p)]
        candidates = ready or live
        return candidates[-1] if candidates else None

    # ---- phases
    def budget(self, phase: str) -> float:
        return float(getattr(self.budgets, phase)) if phase in PHASES else 0.0

    def _progress(self, phase: str) -> float:
        if phase == "ready":
            return 1.0
        idx = PHASES.index(phase)
        return sum(self.budget(p) for p in PHASES[:idx]) / self.budgets.total

    async def enter(self, new: Phase, pod: client.V1Pod | None, detail: str = "") -> None:
        order = (*PHASES, "ready")
        if order.index(new) <= order.index(self.phase):
            return
        now_mono, now_wall = _Clock.now()
        for p in order[order.index(self.phase) : order.index(new)]:
            started = self.phase_started if p == self.phase else (now_mono, now_wall)
            self.timings.append(
                PhaseTiming(
                    phase=p,
                    seen=self.seen.get(p, False),
                    budget_s=self.budget(p),
                    seconds=round(now_mono - started[0], 4),
                    started_monotonic=started[0],
                    ended_monotonic=now_mono,
                    started_at=started[1],
                    ended_at=now_wall,
                )
            )
        self.phase = new
        self.phase_started = (now_mono, now_wall)
        self.seen[new] = True
        if new != "ready":  # "ready" is announced once the deployment agrees
            await self.notify(new, pod, detail)

    async def notify(self, phase: str, pod: client.V1Pod | None, detail: str = "") -> None:
        if self.on_phase is None:
            return
        update = PhaseUpdate(
            phase=phase,
            pod=pod.metadata.name if pod else None,
            node=pod.spec.node_name if pod and pod.spec else None,
            elapsed_s=round(time.monotonic() - self.begin_mono, 3),
            budget_s=self.budget(phase),
            progress=self._progress(phase),
            scale_up_seen=self.scale_up_seen,
            detail=detail,
        )
        result = self.on_phase(phase, update)
        if inspect.isawaitable(result):
            await result

    def detail(self, phase: str, pod: client.V1Pod | None) -> str:
        if pod is None:
            return f"waiting for deployment {self.ns}/{self.name} to create a pod"
        name = pod.metadata.name
        if phase == "node":
            if self.scale_up_seen:
                return f"pod {name} is waiting for a node; the autoscaler is adding one (TriggeredScaleUp)"
            return f"pod {name} is waiting to be scheduled on a node"
        node = pod.spec.node_name if pod.spec else None
        return {
            "image": f"pod {name} on node {node}: pulling the image",
            "weights": f"pod {name} on node {node}: staging the model weights",
            "start": f"pod {name} on node {node}: the server is loading the model",
            "ready": f"pod {name} on node {node} is Ready",
        }.get(phase, "")

    # ---- the decision after each change
    async def step(self) -> ReadyReport | None:
        if "deployments" in self.lists_seen:
            if self.deployment is None:
                raise NotFound(
                    f"deployment {self.name!r} not found in namespace {self.ns!r} (or it was deleted while "
                    f"waiting); check the stack spec's names (`kubectl -n {self.ns} get deploy`)"
                )
            if self.deployment.spec and self.deployment.spec.replicas == 0:
                raise PodFailed(
                    f"deployment {self.ns}/{self.name} has replicas 0, so no pod will start. Scale it up first; "
                    "if it was scaled up, something scaled it back (a GitOps controller with self-heal?)",
                    pod="",
                    reason="ScaledToZero",
                    phase=self.phase,
                )
        scale_up_before = self.scale_up_seen
        for live in self.live_pods():
            evs = self.events.of(live)
            if any(ev.reason == "TriggeredScaleUp" for ev in evs):
                self.scale_up_seen = True
            failure = _fatal(live, evs, self.ns, self.phase)
            if failure is not None:
                raise failure
        pod = self.followed()
        if not self.started_callbacks:
            self.started_callbacks = True
            self.seen["node"] = True
            self.already_ready = pod is not None and is_pod_ready(pod)
            await self.notify("node", pod, self.detail("node", pod))
        if pod is not None:
            phase = _derive_phase(pod)
            if self.scale_up_seen and not scale_up_before and phase == "node" and self.phase == "node":
                await self.notify("node", pod, self.detail("node", pod))  # a node is on its way
            await self.enter(phase, pod, self.detail(phase, pod))
            if phase == "ready":
                if self.ready_at is None:
                    self.ready_at = _Clock.now()
                self.ready_pod = pod
            else:
                self.ready_at = None  # not Ready (any more): keep waiting
                self.ready_pod = None
        else:
            self.ready_at = None  # the Ready pod went away: the deployment replaces it
            self.ready_pod = None
        if self.ready_at is not None and self.deployment is not None and _deployment_ready(self.deployment):
            return self.report()
        return None

    def report(self) -> ReadyReport:
        assert self.ready_at is not None and self.ready_pod is not None
        done_mono, _ = _Clock.now()
        seconds = {t.phase: t.seconds for t in self.timings}
        return ReadyReport(
            namespace=self.ns,
            deployment=self.name,
            pod=self.ready_pod.metadata.name,
            node=self.ready_pod.spec.node_name if self.ready_pod.spec else None,
            phases=[t for t in self.timings if t.phase in PHASES],
            seconds={p: seconds.get(p, 0.0) for p in PHASES},
            total_s=round(self.ready_at[0] - self.begin_mono, 4),
            scale_up_seen=self.scale_up_seen,
            already_ready=self.already_ready,
            deployment_lag_s=round(max(0.0, done_mono - self.ready_at[0]), 4),
            ready_at=self.ready_at[1],
        )

    def time_left(self) -> float:
        now = time.monotonic()
        if self.ready_at is not None:
            left = max(DEPLOYMENT_LAG_MIN_S, self.budget("start") - (self.ready_at[0] - self.phase_started[0]))
            limit = self.ready_at[0] + left
        else:  # a pod seen Ready that is not Ready any more is back in "start"
            limit = self.phase_started[0] + self.budget("start" if self.phase == "ready" else self.phase)
        if self.deadline is not None:
            limit = min(limit, self.deadline)
        return limit - now

    def timeout_error(self) -> WaitTimeout:
        now = time.monotonic()
        pod = self.followed()
        pod_name = pod.metadata.name if pod else "(none yet)"
        if self.ready_at is not None and self.deployment is not None:
            st = self.deployment.status or client.V1DeploymentStatus()
            return WaitTimeout(
                f"pod {self.ns}/{pod_name} is Ready but deployment {self.name} still reports readyReplicas="
                f"{st.ready_replicas or 0}/{self.deployment.spec.replicas} (observedGeneration "
                f"{st.observed_generation}, generation {self.deployment.metadata.generation}) after "
                f"{now - self.ready_at[0]:.1f}s. Look at the deployment controller and "
                f"`kubectl -n {self.ns} get deploy {self.name}`",
                phase="ready",
                elapsed_s=now - self.ready_at[0],
            )
        phase = "start" if self.phase == "ready" else self.phase
        elapsed = now - self.phase_started[0]
        overall = self.deadline is not None and now >= self.deadline - 0.001
        container = _main_container(pod, init=phase == "weights")
        hint = _TIMEOUT_HINTS[phase].format(ns=self.ns, pod=pod_name, container=container)
        warning = _last_warning(self.events.of(pod)) if pod else ""
        status = f" (pod status {kubectl_status(pod)})" if pod else ""
        budget = (
            f"the overall deadline of {self.deadline - self.begin_mono:.0f}s"
            if overall and self.deadline is not None
            else f"its budget of {self.budget(phase):.0f}s"
        )
        return WaitTimeout(
            f"deployment {self.ns}/{self.name}: phase {phase!r} took {elapsed:.1f}s, over {budget}"
            f"{status}: {hint}." + (f" Last warning event: {warning}" if warning else ""),
            phase=phase,
            elapsed_s=elapsed,
        )


def _main_container(pod: client.V1Pod | None, *, init: bool) -> str:
    if pod is None or pod.spec is None:
        return "<container>"
    cs = (pod.spec.init_containers or []) if init else (pod.spec.containers or [])
    return str(cs[0].name) if cs else "<container>"


async def wait_ready(
    api: ApiClient,
    namespace: str,
    name: str,
    selector: str,
    budgets: PhaseBudgets,
    *,
    on_phase: OnPhase | None = None,
    deadline_s: float | None = None,
) -> ReadyReport:
    """Follow the deployment's pod through node, image, weights, start until Ready.

    Each phase has its own budget; over it -> :class:`WaitTimeout` naming the phase. A state the pod
    cannot recover from (CrashLoopBackOff, image pull errors, OOMKilled, a missing Secret key,
    Unschedulable with NotTriggerScaleUp) -> :class:`PodFailed` at once. Pending with TriggeredScaleUp is
    progress. Returns once the pod's Ready condition is True and the deployment's status agrees
    (observedGeneration >= generation, readyReplicas == replicas). ``deadline_s`` caps the whole wait.
    """
    core = client.CoreV1Api(api)
    apps = client.AppsV1Api(api)
    queue: asyncio.Queue[_Item] = asyncio.Queue()
    state = _ReadyWait(namespace, name, budgets, on_phase, deadline_s)
    async with _watching(
        _watch_into(queue, "pods", core.list_namespaced_pod, namespace, label_selector=selector),
        _watch_into(queue, "events", core.list_namespaced_event, namespace, field_selector="involvedObject.kind=Pod"),
        _watch_into(
            queue, "deployments", apps.list_namespaced_deployment, namespace, field_selector=f"metadata.name={name}"
        ),
    ):
        while True:
            left = state.time_left()
            if left <= 0:
                raise state.timeout_error()
            try:
                item = await asyncio.wait_for(queue.get(), timeout=left)
            except TimeoutError:
                raise state.timeout_error() from None
            state.apply(item)
            while not queue.empty():  # apply everything already delivered before deciding
                state.apply(queue.get_nowait())
            if state.lists_seen >= {"pods", "events", "deployments"}:
                report = await state.step()
                if report is not None:
                    await state.notify("ready", state.ready_pod, state.detail("ready", state.ready_pod))
                    return report


# ============================================================================================ wait_gone
class GoneReport(_Report):
    namespace: str = Field(description="Namespace watched.")
    selector: str = Field(description="Label selector of the pods.")
    seconds: float = Field(ge=0, description="How long until no pod matched.")
    pods_seen: int = Field(ge=0, description="How many distinct pods were seen while waiting.")
    pod_names: list[str] = Field(default_factory=list, description="Their names.")


async def wait_gone(api: ApiClient, namespace: str, selector: str, timeout_s: float) -> GoneReport:
    """Watch until no pod matches the selector — not merely replicas 0: the GPU is free only then."""
    core = client.CoreV1Api(api)
    begin = time.monotonic()
    queue: asyncio.Queue[_Item] = asyncio.Queue()
    pods: dict[str, client.V1Pod] = {}
    seen: list[str] = []
    listed = False
    async with _watching(_watch_into(queue, "pods", core.list_namespaced_pod, namespace, label_selector=selector)):
        while True:
            left = begin + timeout_s - time.monotonic()
            if listed and not pods:
                return GoneReport(
                    namespace=namespace,
                    selector=selector,
                    seconds=round(time.monotonic() - begin, 4),
                    pods_seen=len(seen),
                    pod_names=seen,
                )
            try:
                if left <= 0:
                    raise TimeoutError
                kind, _resource, etype, payload = await asyncio.wait_for(queue.get(), timeout=left)
            except TimeoutError:
                remaining = ", ".join(f"{p.metadata.name} ({kubectl_status(p)})" for p in pods.values())
                raise WaitTimeout(
                    f"pods matching {selector!r} in namespace {namespace!r} were still present after {timeout_s:.0f}s: "
                    f"{remaining}. A pod stuck Terminating may have a finalizer or an unreachable node: "
                    f"`kubectl -n {namespace} describe pod`; the GPU is not free until they are gone",
                    phase="gone",
                    elapsed_s=time.monotonic() - begin,
                ) from None
            if kind == "error":
                raise payload
            if kind == "list":
                pods = {p.metadata.name: p for p in payload}
                listed = True
            elif etype == "DELETED":
                pods.pop(payload.metadata.name, None)
            else:
                pods[payload.metadata.name] = payload
            for n in pods:
                if n not in seen:
                    seen.append(n)


# ============================================================================================ exec
class ExecResult(_Report):
    pod: str = Field(description="The pod the command ran in.")
    exit_code: int = Field(description="The command's exit code.")
    stdout: str = Field(description="What it wrote to stdout.")
    stderr: str = Field(description="What it wrote to stderr.")


async def ready_pod(api: ApiClient, namespace: str, selector: str) -> client.V1Pod:
    """A Ready, not-deleting pod matching the selector (newest first), else :class:`PodNotReady`."""
    pods = [p for p in await list_pods(api, namespace, selector) if is_pod_ready(p)]
    if not pods:
        raise PodNotReady(
            f"no Ready pod matches {selector!r} in namespace {namespace!r}; bring the deployment up "
            f"(`kubectl -n {namespace} get pods -l {selector}`)"
        )
    return pods[-1]


@contextlib.contextmanager
def ws_errors(verb: str, resource: str, namespace: str, name: str) -> Iterator[None]:
    """api_errors for WebSocket upgrades: a refused handshake carries the HTTP status."""
    with api_errors(verb, resource, namespace, name):
        try:
            yield
        except aiohttp.WSServerHandshakeError as e:
            raise ApiException(status=e.status, reason=e.message) from e


def _exit_code(status: dict[str, Any]) -> int | None:
    if status.get("status") == "Success":
        return 0
    for cause in (status.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            try:
                return int(cause.get("message"))
            except (TypeError, ValueError):
                return None
    return None


async def exec_in_deployment(
    api: ApiClient,
    namespace: str,
    deployment_selector: str,
    command: list[str],
    timeout_s: float,
    *,
    container: str | None = None,
) -> ExecResult:
    """`kubectl exec deploy/x -- command`: run a command in a Ready pod of the deployment.

    The exit code comes from the Status on channel 3. stdout/stderr are returned as written: callers
    must not log them if the command can print a secret.
    """
    if not command:
        raise SpecError("exec needs a command")
    pod = await ready_pod(api, namespace, deployment_selector)
    pod_name = pod.metadata.name
    container = container or _main_container(pod, init=False)
    out, err = bytearray(), bytearray()
    status: dict[str, Any] | None = None
    async with WsApiClient(configuration=api.configuration) as ws_api:
        core = client.CoreV1Api(ws_api)
        try:
            async with asyncio.timeout(timeout_s):
                with ws_errors("create", "pods/exec", namespace, pod_name):
                    ctx: Any = await core.connect_get_namespaced_pod_exec(
                        pod_name,
                        namespace,
                        command=command,  # type: ignore[arg-type]  # WsApiClient expands a list
                        container=container,
                        stderr=True,
                        stdin=False,
                        stdout=True,
                        tty=False,
                        _preload_content=False,
                    )
                    async with ctx as ws:
                        async for msg in ws:
                            if msg.type == aiohttp.WSMsgType.BINARY:
                                data = bytes(msg.data)
                            elif msg.type == aiohttp.WSMsgType.TEXT:
                                data = str(msg.data).encode()
                            else:
                                break
                            if not data:
                                continue
                            channel, payload = data[0], data[1:]
                            if channel == 1:
                                out += payload
                            elif channel == 2:
                                err += payload
                            elif channel == 3 and payload:
                                try:
                                    status = json.loads(payload)
                                except ValueError:
                                    status = {"status": "Failure", "message": payload.decode(errors="replace")}
        except TimeoutError:
            raise WaitTimeout(
                f"command in pod {namespace}/{pod_name} did not finish within {timeout_s:.0f}s",
                phase="exec",
                elapsed_s=timeout_s,
            ) from None
    if status is None:
        raise ClusterUnavailable(
            f"exec in pod {namespace}/{pod_name}: the stream ended without an exit status; retry the command"
        )
    code = _exit_code(status)
    if code is None:
        raise ClusterRequestError(
            f"exec in pod {namespace}/{pod_name} (container {container}) could not run the command: "
            f"{status.get('message') or status.get('reason') or 'unknown error'}"
        )
    return ExecResult(
        pod=pod_name,
        exit_code=code,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
    )


# ============================================================================================ preflight
def parse_memory_gb(quantity: str) -> float:
    """A Kubernetes memory quantity in GB, binary units counted as GB ("16Gi" -> 16.0) as machine types are."""
    q = str(quantity).strip()
    units = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "Pi": 2**50,
        "k": 10**3,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
        "P": 10**15,
    }
    for suffix in sorted(units, key=len, reverse=True):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * units[suffix] / 2**30
    if q.endswith("m"):
        return float(q[:-1]) / 1000 / 2**30
    return float(q) / 2**30


def node_size_for(need_gb: float) -> str:
    for gb, machine in G2_BY_MEMORY_GB:
        if need_gb <= gb:
            return f"{machine} ({gb} GB)"
    return f"a node with more than {G2_BY_MEMORY_GB[-1][0]} GB of RAM"


class ModelFit(_Report):
    name: str = Field(description="Model deployment name.")
    weights_gb: float = Field(ge=0, description="Size of the weights.")
    need_gb: float = Field(ge=0, description="Weights plus vLLM's host-RAM overhead.")
    node_memory_gb: float = Field(ge=0, description="Host RAM of the GPU node.")
    fits: bool = Field(description="need_gb <= node_memory_gb.")


class ActiveModel(_Report):
    name: str = Field(description="Model deployment name.")
    replicas: int = Field(ge=0, description="spec.replicas.")
    ready_replicas: int = Field(ge=0, description="status.readyReplicas.")


class PreflightReport(_Report):
    namespaces: list[str] = Field(description="Namespaces that exist.")
    deployments: list[str] = Field(description="Deployments checked (namespace/name).")
    gpu_nodes: list[str] = Field(description="Nodes with nvidia.com/gpu capacity.")
    gpu_node_memory_gb: float = Field(ge=0, description="Host RAM of the smallest GPU node (or the spec's value).")
    memory_source: str = Field(description="Where gpu_node_memory_gb came from: nodes or spec.")
    models: list[ModelFit] = Field(description="Each requested model against the node memory.")
    active_models: list[ActiveModel] = Field(description="GPU models with replicas > 0 right now.")
    gpu_pods: list[str] = Field(description="Pods of GPU models that still exist (the GPU is busy until gone).")
    notes: list[str] = Field(default_factory=list, description="Anything the operator should know.")


async def preflight(api: ApiClient, spec: StackSpec, models: list[str] | None = None) -> PreflightReport:
    """Check before anything is scaled: namespaces and Deployments exist, each model fits the GPU node's RAM.

    ``models`` limits the fit check to those model names (default: all of the spec's models).
    Reports which GPU models have replicas > 0 now, for take-over decisions.
    """
    core = client.CoreV1Api(api)
    apps = client.AppsV1Api(api)
    notes: list[str] = []
    missing: list[str] = []
    namespaces = [spec.serving_namespace, spec.gateway_namespace, spec.experience_namespace]
    present_ns: list[str] = []
    for ns in dict.fromkeys(namespaces):
        try:
            with api_errors("get", "namespaces", None, ns):
                await core.read_namespace(ns, _request_timeout=API_TIMEOUT)
            present_ns.append(ns)
        except NotFound:
            missing.append(f"namespace {ns}")
    wanted = [(spec.serving_namespace, m.name) for m in spec.models] + [
        (spec.experience_namespace, f.name) for f in spec.frontends
    ]
    deployments: dict[tuple[str, str], client.V1Deployment] = {}
    for ns in dict.fromkeys(ns for ns, _ in wanted):
        if ns not in present_ns:
            continue
        with api_errors("list", "deployments", ns):
            deps = await apps.list_namespaced_deployment(ns, _request_timeout=API_TIMEOUT)
        for d in deps.items or []:
            deployments[(ns, d.metadata.name)] = d
    for ns, name in wanted:
        if ns in present_ns and (ns, name) not in deployments:
            missing.append(f"deployment {ns}/{name}")
    if missing:
        raise NotFound(
            f"the cluster lacks what the stack needs: {', '.join(missing)}. Sync the platform's apps "
            "(coder-chat, coder-fim, coder-agent, open-webui, tabby) or fix the stack spec's names; nothing was changed"
        )

    gpu_nodes: list[str] = []
    memory = spec.gpu_node_memory_gb
    source = "spec"
    try:
        with api_errors("list", "nodes"):
            nodes = await core.list_node(_request_timeout=API_TIMEOUT)
        mems = []
        for n in nodes.items or []:
            cap = (n.status.capacity if n.status else None) or {}
            try:
                gpus = int(str(cap.get(GPU_RESOURCE, "0")))
            except ValueError:
                gpus = 0
            if gpus > 0:
                gpu_nodes.append(n.metadata.name)
                if cap.get("memory"):
                    mems.append(parse_memory_gb(cap["memory"]))
        if mems:
            memory = round(min(mems), 2)
            source = "nodes"
        else:
            notes.append(f"no GPU node exists now (autoscaled pool at 0?): using spec.gpu_node_memory_gb={memory:g} GB")
    except Forbidden:
        notes.append(f"not allowed to list nodes: using spec.gpu_node_memory_gb={memory:g} GB")

    names = models if models is not None else [m.name for m in spec.models]
    fits = []
    for model_name in names:
        m = spec.model(model_name)
        need = m.weights_gb + spec.host_ram_overhead_gb
        fits.append(
            ModelFit(name=m.name, weights_gb=m.weights_gb, need_gb=need, node_memory_gb=memory, fits=need <= memory)
        )
    too_big = [f for f in fits if not f.fits]
    if too_big:
        f = too_big[0]
        raise PreflightError(
            f"model {f.name} needs {f.need_gb:g} GB of host RAM ({f.weights_gb:g} GB weights + "
            f"{spec.host_ram_overhead_gb:g} GB vLLM overhead) but the GPU node has {memory:g} GB ({source}); "
            "vLLM stages weights through host RAM, so it would be OOMKilled while loading. Use a smaller model or "
            f"a GPU node pool of {node_size_for(f.need_gb)}; nothing was changed"
            + (f" (also too big: {', '.join(x.name for x in too_big[1:])})" if len(too_big) > 1 else "")
        )

    active = []
    gpu_pods: list[str] = []
    for m in spec.models:
        d = deployments[(spec.serving_namespace, m.name)]
        replicas = int(d.spec.replicas or 0) if d.spec else 0
        if replicas > 0:
            st = d.status or client.V1DeploymentStatus()
            active.append(ActiveModel(name=m.name, replicas=replicas, ready_replicas=int(st.ready_replicas or 0)))
        gpu_pods += [p.metadata.name for p in await list_pods(api, spec.serving_namespace, m.selector)]
    return PreflightReport(
        namespaces=present_ns,
        deployments=[f"{ns}/{n}" for ns, n in wanted],
        gpu_nodes=gpu_nodes,
        gpu_node_memory_gb=memory,
        memory_source=source,
        models=fits,
        active_models=active,
        gpu_pods=gpu_pods,
        notes=notes,
    )


__all__ = [
    "ActiveModel",
    "DeploymentStatus",
    "ExecResult",
    "GoneReport",
    "ModelFit",
    "PhaseTiming",
    "PhaseUpdate",
    "PodSummary",
    "PreflightReport",
    "ReadyReport",
    "ScaleResult",
    "deployment_status",
    "exec_in_deployment",
    "is_pod_ready",
    "kubectl_status",
    "list_pods",
    "node_size_for",
    "parse_memory_gb",
    "pod_summary",
    "preflight",
    "read_deployment",
    "ready_pod",
    "scale",
    "wait_gone",
    "wait_ready",
]
