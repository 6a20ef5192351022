"""The stack's workloads as the simulated cluster lays them out, derived once from a ``StackSpec``: every
Deployment with its Service (the gateway and its embeddings server, the models, the front-ends). The
spec knows the stack's own Deployments (``StackSpec.deployments``) and Service URLs
(``StackSpec.service_url``); the gateway's embeddings server and the Services' ports are the simulated
cluster's layout, read here by the objects (``cluster_objects``) and the sim's readiness wait (``stack``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from coder_stack.spec import ModelSpec, StackSpec

EMBEDDINGS_SERVICE = "embeddings"
EMBEDDINGS_PORT = 8000
FRONTEND_PORT = 8080


@dataclass(frozen=True)
class Workload:
    """One Deployment of the stack and its Service (same name, same namespace)."""

    kind: Literal["gateway", "embeddings", "model", "frontend"]
    namespace: str
    name: str
    port: int
    app_label: str | None = None  # app.kubernetes.io/name when it is not the name


VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's own default for --gpu-memory-utilization
EXCLUSIVE_GPU_MEMORY_UTILIZATION = "0.90"  # what the model Deployments pass in exclusive mode (unchanged)


@dataclass(frozen=True)
class GpuShare:
    """How the cluster shares its GPUs, as the simulator lays it out: ``StackSpec.gpu_sharing`` read
    defensively (``exclusive`` when the spec has no such field). ``time_sliced`` nodes advertise
    ``replicas`` x their physical GPUs as ``nvidia.com/gpu`` and carry the sharing labels."""

    mode: str = "exclusive"
    gpu_memory_gb: float = 24.0  # one physical GPU's memory, read as GiB (an L4)
    replicas: int = 2

    @property
    def time_sliced(self) -> bool:
        return self.mode == "time-sliced"

    @property
    def gpu_memory_bytes(self) -> int:
        return round(self.gpu_memory_gb * 1024**3)

    @property
    def gpu_memory_mib(self) -> int:
        return round(self.gpu_memory_gb * 1024)


def gpu_share(spec: StackSpec) -> GpuShare:
    """The spec's GPU sharing (``spec.gpu_sharing``), or exclusive when the spec does not say."""
    s = getattr(spec, "gpu_sharing", None)
    if s is None:
        return GpuShare()
    return GpuShare(
        mode=str(getattr(s, "mode", "exclusive")),
        gpu_memory_gb=float(getattr(s, "gpu_memory_gb", 24.0)),
        replicas=int(getattr(s, "replicas", 2)),
    )


def model_gpu_share(model: ModelSpec) -> float:
    """A model's share of its GPU (``ModelSpec.gpu_memory_utilization``; vLLM's default 0.9 when absent)."""
    return float(getattr(model, "gpu_memory_utilization", VLLM_DEFAULT_GPU_MEMORY_UTILIZATION))


def gpu_memory_utilization_arg(spec: StackSpec, model: ModelSpec) -> str:
    """The ``--gpu-memory-utilization`` a model's Deployment passes: its share when time-sliced, else 0.90."""
    if gpu_share(spec).time_sliced:
        return f"{model_gpu_share(model):g}"
    return EXCLUSIVE_GPU_MEMORY_UTILIZATION


def gateway_workloads(spec: StackSpec) -> list[Workload]:
    """The Deployments that must be Ready before the gateway answers: LiteLLM and its embeddings server."""
    gw = spec.gateway_namespace
    return [
        Workload("gateway", gw, spec.gateway_service, spec.gateway_port),
        Workload("embeddings", gw, EMBEDDINGS_SERVICE, EMBEDDINGS_PORT),
    ]


def stack_workloads(spec: StackSpec) -> list[Workload]:
    """Every Deployment of the stack, in creation order: the gateway's, the models, the front-ends."""
    return (
        gateway_workloads(spec)
        + [Workload("model", spec.serving_namespace, m.name, m.port) for m in spec.models]
        + [
            Workload("frontend", spec.experience_namespace, fe.name, FRONTEND_PORT, fe.selector_name)
            for fe in spec.frontends
        ]
    )
