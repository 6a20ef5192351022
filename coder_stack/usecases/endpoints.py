"""Where the flows reach a Service: an override URL, the in-cluster DNS name, or a port-forward."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from kubernetes_asyncio.client import ApiClient
from pydantic import SecretStr

from coder_stack.errors import NotFound, SpecError
from coder_stack.kubernetes.client import require_secret_key
from coder_stack.kubernetes.portforward import port_forward, read_service
from coder_stack.spec import AccessMode, SecretRef, StackSpec
from coder_stack.transport import make_client


def _strip_v1(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


async def _service_port(api: ApiClient, namespace: str, service: str) -> int:
    svc = await read_service(api, namespace, service)
    ports = (svc.spec.ports if svc.spec else None) or []
    if not ports:
        raise NotFound(f"service {namespace}/{service} exposes no port")
    return int(ports[0].port)


async def resolve_target(api: ApiClient, spec: StackSpec, target: str) -> tuple[str, str, int, str | None]:
    """(namespace, service, port, override URL or None) for "gateway", a model or a front-end name."""
    if target == "gateway":
        override = spec.access.overrides.gateway
        return spec.gateway_namespace, spec.gateway_service, spec.gateway_port, str(override) if override else None
    for m in spec.models:
        if target == m.name:
            override = spec.access.overrides.models.get(m.name)
            return spec.serving_namespace, m.name, m.port, str(override) if override else None
    for f in spec.frontends:
        if target == f.name:
            return spec.experience_namespace, f.name, await _service_port(api, spec.experience_namespace, f.name), None
    known = ["gateway", *(m.name for m in spec.models), *(f.name for f in spec.frontends)]
    raise SpecError(f"unknown endpoint {target!r}; this stack has: {', '.join(known)}")


@asynccontextmanager
async def open_endpoint(api: ApiClient, spec: StackSpec, target: str) -> AsyncIterator[str]:
    """Yield the base URL (without ``/v1``) of ``target``: ``"gateway"``, a model or a front-end name.

    An override URL in ``spec.access.overrides`` wins; ``in-cluster`` gives the Service's DNS name;
    ``port-forward`` forwards a local port for as long as the block runs.
    """
    namespace, service, port, override = await resolve_target(api, spec, target)
    if override:
        yield _strip_v1(override)
    elif spec.access.mode == AccessMode.IN_CLUSTER:
        yield spec.service_url(service, namespace, port)
    else:
        async with port_forward(api, namespace, service, port) as (host, local_port):
            yield f"http://{host}:{local_port}"


async def read_ref(api: ApiClient, ref: SecretRef) -> SecretStr:
    """The secret a spec field points at (master key, upstream key, vLLM key)."""
    return await require_secret_key(api, ref.namespace, ref.name, ref.key)


@asynccontextmanager
async def open_gateway(api: ApiClient, spec: StackSpec) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the gateway's base URL, however the spec reaches it (port-forward, in-cluster, URL)."""
    async with open_endpoint(api, spec, "gateway") as base_url, make_client(spec.timeouts, base_url=base_url) as gw:
        yield gw


__all__ = ["open_endpoint", "open_gateway", "read_ref", "resolve_target"]
