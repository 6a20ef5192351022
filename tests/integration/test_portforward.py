"""port_forward through the simulated API server's WebSocket to a backend registered for a Ready pod."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from aiohttp import web

from coder_stack.errors import EndpointUnavailable, NotFound
from coder_stack.kubernetes.portforward import port_forward, resolve_service
from tests.kits.apiserver import NS, PodScript, ServerThread, namespace, service

APP = "pf-model"


def _backend() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "pod": "pf"})

    async def big(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=body[::-1])

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_get("/health", hello)
    app.router.add_post("/echo", big)
    return app


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = ServerThread(tmp_path_factory.mktemp("pf"))

    async def setup() -> None:
        srv.store.create("namespaces", namespace(NS))
        srv.store.create("services", service(APP, target="http"))
        srv.store.create("services", service("refusing", port=9000, target=9000))
        srv.store.create("services", service("nobody", port=8000))
        for app in (APP, "refusing"):
            pod = PodScript(srv.store, app=app, name=f"{app}-pod")
            for step in (pod.create, pod.bind, pod.main_running, pod.ready):
                step()

    srv.run(setup())
    srv.run(srv.start_backend(NS, f"{APP}-pod", 8000, _backend()))  # no backend for "refusing"
    yield srv
    srv.stop()


async def test_resolves_service_port_and_named_target_port_to_a_ready_pod(server: ServerThread) -> None:
    async with server.api() as api:
        assert await resolve_service(api, NS, APP, 8000) == (f"{APP}-pod", 8000)
        with pytest.raises(NotFound):
            await resolve_service(api, NS, APP, 1234)
        with pytest.raises(NotFound):
            await resolve_service(api, NS, "no-such-svc", 8000)


async def test_forwards_http_both_ways_over_several_connections(server: ServerThread) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, binary: frames must be stripped exactly
    async with server.api() as api, port_forward(api, NS, APP, 8000) as (host, port):
        assert host == "127.0.0.1"
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as http:
            r = await http.get("/health")
            assert r.json() == {"path": "/health", "pod": "pf"}
            big = await http.post("/echo", content=payload)
            assert big.content == payload[::-1]
        # a second client = new TCP connection = new WebSocket
        async with httpx.AsyncClient(timeout=10) as other:
            results = await asyncio.gather(*(other.get(f"http://{host}:{port}/health") for _ in range(5)))
            assert all(x.status_code == 200 for x in results)


async def test_closes_listener_and_tasks_when_the_block_exits(server: ServerThread) -> None:
    before = {t for t in asyncio.all_tasks() if not t.done()}
    async with (
        server.api() as api,
        port_forward(api, NS, APP, 8000) as (host, port),
        httpx.AsyncClient(timeout=10) as http,
    ):
        assert (await http.get(f"http://{host}:{port}/health")).status_code == 200
    await asyncio.sleep(0.05)
    leaked = {t for t in asyncio.all_tasks() if not t.done()} - before - {asyncio.current_task()}
    assert not leaked, leaked
    with pytest.raises(OSError):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()


async def test_error_channel_message_surfaces_as_endpoint_unavailable(server: ServerThread) -> None:
    async with server.api() as api:
        with pytest.raises(EndpointUnavailable) as info:
            async with port_forward(api, NS, "refusing", 9000) as (host, port), httpx.AsyncClient(timeout=5) as http:
                await http.get(f"http://{host}:{port}/health")
    assert "connection refused" in str(info.value) and "refusing-pod" in str(info.value)
    assert isinstance(info.value.__cause__, httpx.HTTPError)
    assert info.value.retriable


async def test_no_ready_pod_is_a_retriable_endpoint_unavailable(server: ServerThread) -> None:
    async with server.api() as api:
        with pytest.raises(EndpointUnavailable) as info:
            async with port_forward(api, NS, "nobody", 8000):
                pass
    assert info.value.retriable and "no Ready pod" in str(info.value)
