"""Deployments: `kubectl scale` (the scale subresource), reading one, its status (replicas, readiness,
pods) for `coder-stack status`, and `kubectl rollout restart`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime

from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import NotFound, SpecError
from coder_stack.kubernetes.client import API_TIMEOUT, api_errors
from coder_stack.kubernetes.pods import PodSummary, pod_summary

# The prefix of the annotations coder-stack keeps on Deployments (e.g. a model's activity reading).
OWN_ANNOTATIONS = "coder-stack.io/"


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScaleResult(_Report):
    namespace: str = Field(description="Namespace of the deployment.")
    name: str = Field(description="Deployment name.")
    found: int = Field(ge=0, description="spec.replicas before the call.")
    requested: int = Field(ge=0, description="spec.replicas asked for.")
    changed: bool = Field(description="Whether the call changed anything (False on a rerun).")


async def scale(api: ApiClient, namespace: str, name: str, replicas: int, found: int | None = None) -> ScaleResult:
    """`kubectl scale`: set spec.replicas through the scale subresource. Idempotent.

    ``found``: spec.replicas as the caller has just read it (a Deployment list, the answer to a patch of the
    Deployment): not read again, one round trip fewer on the way to the GPU. None: read here first."""
    if replicas < 0:
        raise SpecError(f"replicas must be 0 or more, got {replicas}")
    apps = client.AppsV1Api(api)
    if found is None:
        with _deployment_not_found(namespace, name), api_errors("get", "deployments/scale", namespace, name):
            current = await apps.read_namespaced_deployment_scale(name, namespace, _request_timeout=API_TIMEOUT)
        found = int(current.spec.replicas or 0) if current.spec else 0
    if found == replicas:
        return ScaleResult(namespace=namespace, name=name, found=found, requested=replicas, changed=False)
    body = {"spec": {"replicas": replicas}}
    with _deployment_not_found(namespace, name), api_errors("patch", "deployments/scale", namespace, name):
        await apps.patch_namespaced_deployment_scale(name, namespace, body, _request_timeout=API_TIMEOUT)
    return ScaleResult(namespace=namespace, name=name, found=found, requested=replicas, changed=True)


async def deployment_replicas(api: ApiClient, namespace: str) -> dict[str, int]:
    """spec.replicas of every Deployment in ``namespace`` (`kubectl get deploy`), in one list."""
    apps = client.AppsV1Api(api)
    with api_errors("list", "deployments", namespace):
        deps = await apps.list_namespaced_deployment(namespace, _request_timeout=API_TIMEOUT)
    return {d.metadata.name: int(d.spec.replicas or 0) if d.spec else 0 for d in deps.items or []}


@contextlib.contextmanager
def _deployment_not_found(namespace: str, name: str) -> Iterator[None]:
    try:
        yield
    except NotFound as e:
        raise NotFound(
            f"deployment {name!r} not found in namespace {namespace!r}; check the stack spec's names "
            f"(`kubectl -n {namespace} get deploy`)"
        ) from e.__cause__


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
    annotations: dict[str, str] = Field(
        default_factory=dict, description=f"The Deployment's own annotations under {OWN_ANNOTATIONS!r}."
    )


def is_deployment_ready(dep: client.V1Deployment) -> bool:
    """observedGeneration >= generation and readyReplicas == spec.replicas (1 if unset)."""
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
        ready=is_deployment_ready(dep),
        pods=pods,
        annotations=own_annotations(dep),
    )


def own_annotations(dep: client.V1Deployment) -> dict[str, str]:
    """The Deployment's annotations under :data:`OWN_ANNOTATIONS`."""
    found = (dep.metadata.annotations if dep.metadata else None) or {}
    return {k: str(v) for k, v in found.items() if k.startswith(OWN_ANNOTATIONS)}


async def annotate_deployment(
    api: ApiClient, namespace: str, name: str, annotations: dict[str, str | None]
) -> client.V1Deployment | None:
    """`kubectl annotate deploy/<name> k=v` (None removes ``k``). A metadata-only merge patch: no rollout.
    Returns the Deployment as the API server wrote it (None when there was nothing to write)."""
    if not annotations:
        return None
    apps = client.AppsV1Api(api)
    body = {"metadata": {"annotations": annotations}}
    with _deployment_not_found(namespace, name), api_errors("patch", "deployments", namespace, name):
        written: client.V1Deployment = await apps.patch_namespaced_deployment(
            name, namespace, body, _request_timeout=API_TIMEOUT
        )
    return written


def _annotation_path(key: str) -> str:
    """The JSON pointer (RFC 6901) of annotation ``key``: ``/`` is written ``~1``, ``~`` is written ``~0``."""
    return "/metadata/annotations/" + key.replace("~", "~0").replace("/", "~1")


async def _patch_if_annotated(
    api: ApiClient, namespace: str, name: str, key: str, value: str, ops: list[dict[str, object]]
) -> bool:
    """Apply the JSON patch ``ops`` (RFC 6902) only while annotation ``key`` reads ``value``: the patch starts with
    a ``test`` op, so the API server checks and writes in one step (422 Unprocessable when the test fails, also
    when the annotation is gone). True when written, False when the annotation reads otherwise (nothing changed)."""
    apps = client.AppsV1Api(api)
    body = [{"op": "test", "path": _annotation_path(key), "value": value}, *ops]
    with _deployment_not_found(namespace, name), api_errors("patch", "deployments", namespace, name):
        try:
            await apps.patch_namespaced_deployment(name, namespace, body, _request_timeout=API_TIMEOUT)
        except ApiException as e:
            if e.status != 422:
                raise
            dep = await apps.read_namespaced_deployment(name, namespace, _request_timeout=API_TIMEOUT)
            if ((dep.metadata.annotations if dep.metadata else None) or {}).get(key) == value:
                raise  # the test held: the 422 is about something else
            return False
    return True


async def scale_if_annotated(api: ApiClient, namespace: str, name: str, replicas: int, key: str, value: str) -> bool:
    """Set spec.replicas to ``replicas`` only while annotation ``key`` reads ``value`` (one conditional patch, see
    :func:`_patch_if_annotated`). True when written; False when the annotation reads otherwise (nothing changed)."""
    if replicas < 0:
        raise SpecError(f"replicas must be 0 or more, got {replicas}")
    return await _patch_if_annotated(
        api, namespace, name, key, value, [{"op": "replace", "path": "/spec/replicas", "value": replicas}]
    )


async def unannotate_if(api: ApiClient, namespace: str, name: str, key: str, value: str) -> bool:
    """Remove annotation ``key`` only while it reads ``value``. True when removed; False when it reads otherwise
    (or is gone): nothing changed."""
    remove: dict[str, object] = {"op": "remove", "path": _annotation_path(key)}
    return await _patch_if_annotated(api, namespace, name, key, value, [remove])


async def restart_deployment(api: ApiClient, namespace: str, name: str) -> None:
    """`kubectl rollout restart`: stamp the pod template so the controller replaces the pods."""
    apps = client.AppsV1Api(api)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": stamp}}}}}
    with api_errors("patch", "deployments", namespace, name):
        await apps.patch_namespaced_deployment(name, namespace, body, _request_timeout=API_TIMEOUT)


__all__ = [
    "OWN_ANNOTATIONS",
    "DeploymentStatus",
    "ScaleResult",
    "annotate_deployment",
    "deployment_replicas",
    "deployment_status",
    "is_deployment_ready",
    "own_annotations",
    "read_deployment",
    "restart_deployment",
    "scale",
    "scale_if_annotated",
    "unannotate_if",
]
