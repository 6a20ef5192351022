"""The stack's workloads as the simulated cluster lays them out, derived once from a ``StackSpec``: every
Deployment with its Service (the gateway and its embeddings server, the models, the front-ends). The
spec knows the stack's own Deployments (``StackSpec.deployments``) and Service URLs
(``StackSpec.service_url``); the gateway's embeddings server and the Services' ports are the simulated
cluster's layout, read here by the objects (``cluster_objects``) and the sim's readiness wait (``stack``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from coder_stack.spec import StackSpec

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
