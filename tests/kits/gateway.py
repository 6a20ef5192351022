"""Start the LiteLLM stand-in with vLLM stand-ins behind it, on 127.0.0.1, as the simulated cluster configures
them (its own proxy_config), with in-cluster Service names resolved to the local ports.

Shared by the gateway function tests, the contract tier and the stand-in tests.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml
from simstack.cluster_objects import EMBEDDINGS_SERVED, proxy_config
from simstack.standins import ContainerRun, RunningBackend, SimServices, start_standin

from coder_stack.spec import StackSpec


@dataclass
class GwStack:
    services: SimServices
    hosts: dict[str, int]
    master: str
    upstream: str
    backends: dict[str, RunningBackend] = field(default_factory=dict)
    gw: RunningBackend | None = None

    @property
    def url(self) -> str:
        assert self.gw is not None
        return f"http://127.0.0.1:{self.gw.port}"

    def backend_url(self, app: str) -> str:
        return f"http://127.0.0.1:{self.backends[app].port}"

    async def stop_model(self, name: str) -> None:
        b = self.backends.pop(name)
        host = next(h for h, p in self.hosts.items() if p == b.port)
        del self.hosts[host]
        await b.stop()


def service_resolver(hosts: dict[str, int]) -> Callable[[str], str | None]:
    """In-cluster ``*.svc.*`` URLs to the local port of the stand-in serving that host (None: nobody is)."""

    def resolve(url: str) -> str | None:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ".svc." not in host:
            return url
        port = hosts.get(host)
        if port is None:
            return None
        return urlunsplit((parts.scheme, f"127.0.0.1:{port}", parts.path, parts.query, parts.fragment))

    return resolve


def litellm_run(
    config: dict[str, Any], master: str, upstream: str, *, path: str = "/etc/litellm/proxy_config.yaml"
) -> ContainerRun:
    """The LiteLLM container as the cluster would run it: this proxy config, the keys in its environment."""
    return ContainerRun(
        namespace="litellm",
        pod_name="litellm-0",
        app="litellm",
        image="ghcr.io/berriai/litellm:main-v1.108.7",
        args=["--config", path, "--port", "4000"],
        env={"PROXY_MASTER_KEY": master, "UPSTREAM_API_KEY": upstream, "DATABASE_URL": "postgresql://x"},
        files={path: yaml.safe_dump(config)},
        container_port=4000,
    )


@asynccontextmanager
async def gateway_stack(
    spec: StackSpec,
    *,
    spend_write_delay_s: float = 10,
    master: str | None = None,
    upstream: str | None = None,
) -> AsyncIterator[GwStack]:
    """LiteLLM + every model's vLLM + embeddings. Keys are made up per start unless given."""
    master = master or "sk-master-" + secrets.token_hex(12)
    upstream = upstream or "upstream-" + secrets.token_hex(12)
    hosts: dict[str, int] = {}
    services = SimServices(
        resolve_url=service_resolver(hosts), time_scale=0.01, spend_write_delay_s=spend_write_delay_s
    )
    st = GwStack(services, hosts, master, upstream)
    dom = spec.access.cluster_domain
    servers: list[tuple[str, str, str, list[str]]] = [
        (m.name, spec.serving_namespace, m.served_model_name, []) for m in spec.models
    ]
    servers.append(("embeddings", spec.gateway_namespace, EMBEDDINGS_SERVED, ["--task", "embed"]))
    try:
        for app, ns, served, extra in servers:
            args = ["--served-model-name", served, "--api-key", upstream, "--enable-auto-tool-choice",
                    "--tool-call-parser", "hermes", *extra]  # fmt: skip
            b = await start_standin(ContainerRun(ns, f"{app}-0", app, "vllm/vllm-openai:v0.32.0", args, {}), services)
            assert b is not None
            st.backends[app] = b
            hosts[f"{app}.{ns}.svc.{dom}"] = b.port
        path = "/etc/litellm/proxy_config.yaml"
        run = ContainerRun(
            spec.gateway_namespace,
            "litellm-0",
            "litellm",
            "ghcr.io/berriai/litellm:main-v1.108.7",
            ["--config", path, "--port", str(spec.gateway_port)],
            {"PROXY_MASTER_KEY": master, "UPSTREAM_API_KEY": upstream, "STORE_MODEL_IN_DB": "True"},
            files={path: proxy_config(spec)},
            container_port=spec.gateway_port,
        )
        st.gw = await start_standin(run, services)
        yield st
    finally:
        if st.gw is not None:
            await st.gw.stop()
        for b in st.backends.values():
            await b.stop()


__all__ = ["GwStack", "gateway_stack", "litellm_run", "service_resolver"]
