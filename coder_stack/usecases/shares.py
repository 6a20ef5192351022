"""The GPU's shares as ``coder-stack status`` shows them in time-sliced mode (read-only).

Per GPU node: what it advertises (its ``nvidia.com/gpu`` capacity, the time-slicing replicas and one GPU's memory
from its labels, read exactly as the preflight reads them: :func:`coder_stack.kubernetes.preflight.gpu_node`),
the spec's model pods placed on it with each one's share (its ``gpu_memory_utilization`` x the GPU's memory), and
what is left of the memory and of the replicas. A pod holds its share while its container runs (vLLM takes the
share when it starts and gives it back when it stops); a pod on the node whose container does not run (waiting
to restart, still being created) is listed but holds nothing. Exclusive mode: nothing is read (``None``).
"""

from __future__ import annotations

from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import Forbidden
from coder_stack.kubernetes.client import API_TIMEOUT, ClusterTarget, api_errors, open_api
from coder_stack.kubernetes.pods import kubectl_status, list_pods
from coder_stack.kubernetes.preflight import GpuNode, gpu_capacity, gpu_node
from coder_stack.spec import SELECTOR_KEY, StackSpec


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PodShare(_Report):
    model: str = Field(description="The model's Deployment.")
    pod: str = Field(description="Its pod on this node.")
    status: str = Field(description="The pod's STATUS as kubectl shows it.")
    utilization: float = Field(description="The model's gpu_memory_utilization (vLLM --gpu-memory-utilization).")
    share_gb: float = Field(ge=0, description="utilization x the node's GPU memory, in GB.")
    holds: bool = Field(description="Its container runs, so its share of the GPU memory is taken.")


class NodeShares(_Report):
    node: GpuNode = Field(description="What the node advertises, as the preflight reads it.")
    gpu_memory_gb: float = Field(ge=0, description="One GPU's memory the shares are counted against.")
    gpu_memory_source: str = Field(description="node label (nvidia.com/gpu.memory) or spec (gpu_sharing).")
    replicas: int = Field(ge=0, description="Model servers the GPU takes: the advertised replicas, else the spec's.")
    pods: list[PodShare] = Field(description="The spec's model pods placed on this node, oldest first.")

    @property
    def used_gb(self) -> float:
        return round(sum(p.share_gb for p in self.pods if p.holds), 2)

    @property
    def left_gb(self) -> float:
        return round(self.gpu_memory_gb - self.used_gb, 2)

    @property
    def replicas_left(self) -> int:
        return self.replicas - len(self.pods)


class GpuShares(_Report):
    nodes: list[NodeShares] = Field(description="The GPU nodes (nvidia.com/gpu capacity > 0), by name.")
    unplaced: list[PodShare] = Field(
        description="Model pods not on a GPU node yet (Pending), share at the spec's card."
    )
    notes: list[str] = Field(default_factory=list, description="What could not be read, and what that means.")


async def read_gpu_shares(api: ApiClient, spec: StackSpec) -> GpuShares | None:
    """The GPU's shares now (see the module); ``None`` in exclusive mode, without reading anything."""
    sharing = spec.gpu_sharing
    if sharing.mode != "time-sliced":
        return None
    core = client.CoreV1Api(api)
    notes: list[str] = []
    nodes: list[GpuNode] = []
    try:
        with api_errors("list", "nodes"):
            listed = await core.list_node(_request_timeout=API_TIMEOUT)
        for item in listed.items or []:
            gpus = gpu_capacity(item)
            if gpus > 0:
                nodes.append(gpu_node(item.metadata.name, gpus, item.metadata.labels or {}))
    except Forbidden:
        notes.append("not allowed to list nodes: the GPU nodes' shares cannot be shown")
    if not nodes and not notes:
        notes.append("no GPU node exists now (autoscaled pool at 0?): no model holds a share of a GPU")

    by_name = {m.name: m for m in spec.models}
    selector = f"{SELECTOR_KEY} in ({','.join(by_name)})"
    on_node: dict[str, list[tuple[str, client.V1Pod]]] = {}
    unplaced: list[PodShare] = []
    for p in await list_pods(api, spec.serving_namespace, selector):
        model = (p.metadata.labels or {}).get(SELECTOR_KEY, "")
        if model not in by_name or (p.status and p.status.phase in ("Succeeded", "Failed")):
            continue
        node_name = p.spec.node_name if p.spec else None
        if node_name:
            on_node.setdefault(node_name, []).append((model, p))
        else:
            u = by_name[model].gpu_memory_utilization
            unplaced.append(_pod_share(model, p, u, sharing.gpu_memory_gb))

    out = []
    for n in sorted(nodes, key=lambda n: n.name):
        memory, source = (n.gpu_memory_gb, "node label") if n.gpu_memory_gb else (sharing.gpu_memory_gb, "spec")
        pods = [_pod_share(m, p, by_name[m].gpu_memory_utilization, memory) for m, p in on_node.get(n.name, [])]
        out.append(
            NodeShares(
                node=n,
                gpu_memory_gb=memory,
                gpu_memory_source=source,
                replicas=n.replicas or (sharing.replicas if n.time_sliced else 1),
                pods=pods,
            )
        )
        if not n.time_sliced:
            notes.append(
                f"GPU node {n.name} does not advertise time-slicing: each model pod there takes a whole GPU "
                "(coder-stack preflight says what to configure)"
            )
    return GpuShares(nodes=out, unplaced=unplaced, notes=notes)


def _pod_share(model: str, pod: client.V1Pod, utilization: float, memory_gb: float) -> PodShare:
    statuses = (pod.status.container_statuses if pod.status else None) or []
    running = any(c.state and c.state.running for c in statuses)
    return PodShare(
        model=model,
        pod=pod.metadata.name,
        status=kubectl_status(pod),
        utilization=utilization,
        share_gb=round(utilization * memory_gb, 2),
        holds=running,
    )


async def gpu_shares(target: ClusterTarget, spec: StackSpec) -> GpuShares | None:
    """:func:`read_gpu_shares` with a client of its own for ``target`` (``coder-stack status``)."""
    if spec.gpu_sharing.mode != "time-sliced":
        return None
    async with open_api(target) as api:
        return await read_gpu_shares(api, spec)


__all__ = ["GpuShares", "NodeShares", "PodShare", "gpu_shares", "read_gpu_shares"]
