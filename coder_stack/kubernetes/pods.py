"""Pods as `kubectl get pods` shows them: the Ready test, the STATUS column, summaries, listing by label
selector (oldest first), and picking a Ready pod or a pod's main container.
"""

from __future__ import annotations

from datetime import datetime

from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import PodNotReady
from coder_stack.kubernetes.client import API_TIMEOUT, api_errors


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def is_pod_ready(pod: client.V1Pod) -> bool:
    if pod.metadata and pod.metadata.deletion_timestamp:
        return False
    for c in (pod.status.conditions if pod.status else None) or []:
        if c.type == "Ready":
            return c.status == "True"
    return False


def ready_since(pod: client.V1Pod) -> datetime | None:
    """When the pod last became Ready (its Ready condition's lastTransitionTime); None if it is not Ready."""
    if not is_pod_ready(pod):
        return None
    for c in (pod.status.conditions if pod.status else None) or []:
        if c.type == "Ready" and isinstance(c.last_transition_time, datetime):
            return c.last_transition_time
    return None


def is_deleting(pod: client.V1Pod) -> bool:
    """metadata.deletionTimestamp is set: the pod is terminating."""
    return bool(pod.metadata and pod.metadata.deletion_timestamp)


def by_creation(pod: client.V1Pod) -> tuple[float, str]:
    """Sort key, oldest first: (creation time, name)."""
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
    if is_deleting(pod):
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
        deleting=is_deleting(pod),
    )


async def list_pods(api: ApiClient, namespace: str, selector: str) -> list[client.V1Pod]:
    core = client.CoreV1Api(api)
    with api_errors("list", "pods", namespace):
        pods = await core.list_namespaced_pod(namespace, label_selector=selector, _request_timeout=API_TIMEOUT)
    return sorted(pods.items or [], key=by_creation)


async def pod_summary(api: ApiClient, namespace: str, selector: str) -> list[PodSummary]:
    """The pods matching a label selector, oldest first, as `kubectl get pods -l` shows them."""
    return [_summarise(p) for p in await list_pods(api, namespace, selector)]


async def ready_pod(api: ApiClient, namespace: str, selector: str) -> client.V1Pod:
    """A Ready, not-deleting pod matching the selector (newest first), else :class:`PodNotReady`."""
    pods = [p for p in await list_pods(api, namespace, selector) if is_pod_ready(p)]
    if not pods:
        raise PodNotReady(
            f"no Ready pod matches {selector!r} in namespace {namespace!r}; bring the deployment up "
            f"(`kubectl -n {namespace} get pods -l {selector}`)"
        )
    return pods[-1]


def main_container(pod: client.V1Pod | None, *, init: bool) -> str:
    """The pod's first container's name (first init container with ``init``), or a placeholder."""
    if pod is None or pod.spec is None:
        return "<container>"
    cs = (pod.spec.init_containers or []) if init else (pod.spec.containers or [])
    return str(cs[0].name) if cs else "<container>"


__all__ = [
    "PodSummary",
    "by_creation",
    "is_deleting",
    "is_pod_ready",
    "kubectl_status",
    "list_pods",
    "main_container",
    "pod_summary",
    "ready_pod",
    "ready_since",
]
