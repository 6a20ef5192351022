"""Which flow run holds a GPU model: the run whose GPU session brought it up, or took it over, stamps its
flow run id on the model's Deployment (annotation ``coder-stack.io/held-by``, written by ``scale_task(...,
held_by=...)`` just before it scales).

The crash clean-up scales to 0 exactly the models a dead run holds — never one a live run has taken over
since (its stamp is the live run's). A run that ends normally leaves its stamp; only the crash clean-up reads
it, and only for a run that ended Crashed.
"""

from __future__ import annotations

from kubernetes_asyncio.client import ApiClient

from coder_stack.kubernetes.workloads import DeploymentStatus, annotate_deployment, deployment_status
from coder_stack.spec import ModelSpec, StackSpec

HELD_BY = "coder-stack.io/held-by"


async def held_by(api: ApiClient, spec: StackSpec, run_id: str) -> list[tuple[ModelSpec, DeploymentStatus]]:
    """The spec's models stamped with ``run_id``, with their status (serving or not)."""
    out = []
    for m in spec.models:
        st = await deployment_status(api, spec.serving_namespace, m.name)
        if st.annotations.get(HELD_BY) == run_id:
            out.append((m, st))
    return out


async def clear_held(api: ApiClient, spec: StackSpec, model: ModelSpec) -> None:
    await annotate_deployment(api, spec.serving_namespace, model.name, {HELD_BY: None})
