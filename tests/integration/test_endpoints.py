"""open_endpoint in each access mode."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from aiohttp import web

from coder_stack.errors import SpecError
from coder_stack.spec import AccessSpec, EndpointOverrides, StackSpec
from coder_stack.usecases.endpoints import open_endpoint
from tests.kits.apiserver import PodScript, ServerThread, namespace, service


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = ServerThread(tmp_path_factory.mktemp("endpoints"))

    async def setup() -> None:
        for ns in ("serving", "litellm", "experience"):
            srv.store.create("namespaces", namespace(ns))
        srv.store.create("services", service("litellm", "litellm", port=4000, target=4000))
        srv.store.create("services", service("tabby", "experience", port=8080, target=8080))
        pod = PodScript(srv.store, ns="litellm", app="litellm", name="litellm-pod", init=False)
        for step in (pod.create, pod.bind, pod.main_running, pod.ready):
            step()

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    app = web.Application()
    app.router.add_get("/health/readiness", health)
    srv.run(setup())
    srv.run(srv.start_backend("litellm", "litellm-pod", 4000, app))
    yield srv
    srv.stop()


async def test_port_forward_mode_yields_a_working_local_base_url(server: ServerThread) -> None:
    async with server.api() as api, open_endpoint(api, StackSpec(), "gateway") as url:
        assert url.startswith("http://127.0.0.1:") and not url.endswith("/v1")
        async with httpx.AsyncClient(timeout=5) as http:
            assert (await http.get(f"{url}/health/readiness")).json() == {"status": "healthy"}


async def test_in_cluster_mode_yields_service_dns_names(server: ServerThread) -> None:
    spec = StackSpec(access=AccessSpec(mode="in-cluster", cluster_domain="cluster.local"))
    async with server.api() as api:
        async with open_endpoint(api, spec, "gateway") as url:
            assert url == "http://litellm.litellm.svc.cluster.local:4000"
        async with open_endpoint(api, spec, "coder-fim") as url:
            assert url == "http://coder-fim.serving.svc.cluster.local:8000"
        async with open_endpoint(api, spec, "tabby") as url:  # front-end: port read from its Service
            assert url == "http://tabby.experience.svc.cluster.local:8080"


async def test_override_url_wins_and_loses_its_v1(server: ServerThread) -> None:
    spec = StackSpec(
        access=AccessSpec(
            mode="in-cluster",
            overrides=EndpointOverrides(
                gateway="https://llm.example.com/v1/", models={"coder-chat": "http://10.0.0.5:8000"}
            ),
        )
    )
    async with server.api() as api:
        async with open_endpoint(api, spec, "gateway") as url:
            assert url == "https://llm.example.com"
        async with open_endpoint(api, spec, "coder-chat") as url:
            assert url == "http://10.0.0.5:8000"


async def test_unknown_target_is_a_spec_error_listing_known_ones(server: ServerThread) -> None:
    async with server.api() as api:
        with pytest.raises(SpecError) as info:
            async with open_endpoint(api, StackSpec(), "nope"):
                pass
    assert "gateway" in str(info.value) and "coder-chat" in str(info.value)
