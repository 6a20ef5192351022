"""`kubectl port-forward svc/x`, in-process.

The Python clients port-forward to pods only, so the Service's selector and targetPort are resolved to a
Ready pod here. A local listener on 127.0.0.1 accepts TCP connections; each one gets its own WebSocket
(``connect_get_namespaced_pod_portforward``, subprotocol v4.channel.k8s.io) and bytes are pumped both
ways: data on channel 0, errors on channel 1, and the first frame on each channel is the 2-byte
little-endian port, which is stripped. Everything is closed when the block exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.stream import WsApiClient

from coder_stack.errors import ClusterError, EndpointUnavailable, NotFound
from coder_stack.kubernetes.client import API_TIMEOUT, api_errors, ws_errors
from coder_stack.kubernetes.pods import is_pod_ready, list_pods

log = logging.getLogger(__name__)

DATA_CHANNEL = 0
ERROR_CHANNEL = 1
CHUNK = 64 * 1024


async def read_service(api: ApiClient, namespace: str, service: str) -> client.V1Service:
    """A Service, or NotFound naming it and pointing at the stack spec."""
    core = client.CoreV1Api(api)
    try:
        with api_errors("get", "services", namespace, service):
            return await core.read_namespaced_service(service, namespace, _request_timeout=API_TIMEOUT)
    except NotFound as e:
        raise NotFound(
            f"service {service!r} not found in namespace {namespace!r}; check the stack spec's names"
        ) from e.__cause__


async def resolve_service(api: ApiClient, namespace: str, service: str, port: int) -> tuple[str, int]:
    """(Ready pod name, container port) behind a Service port, as kube-proxy would pick."""
    svc = await read_service(api, namespace, service)
    selector = (svc.spec.selector if svc.spec else None) or {}
    if not selector:
        raise EndpointUnavailable(f"service {namespace}/{service} has no selector: there is no pod to forward to")
    ports = (svc.spec.ports if svc.spec else None) or []
    match = next((p for p in ports if p.port == port), None)
    if match is None:
        raise NotFound(
            f"service {namespace}/{service} has no port {port}; its ports are "
            f"{', '.join(str(p.port) for p in ports) or 'none'}"
        )
    label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    pods = [p for p in await list_pods(api, namespace, label_selector) if is_pod_ready(p)]
    if not pods:
        raise EndpointUnavailable(
            f"service {namespace}/{service} has no Ready pod to forward to (selector {label_selector}); "
            "bring its deployment up and wait until it is Ready"
        )
    pod = pods[-1]
    target: Any = match.target_port if match.target_port is not None else port
    if isinstance(target, str) and not target.isdigit():
        named = [cp.container_port for c in (pod.spec.containers or []) for cp in (c.ports or []) if cp.name == target]
        if not named:
            raise EndpointUnavailable(
                f"service {namespace}/{service} targets port name {target!r}, which pod {pod.metadata.name} lacks"
            )
        target = named[0]
    return pod.metadata.name, int(target)


class _Forwarder:
    def __init__(self, ws_api: WsApiClient, namespace: str, pod: str, port: int) -> None:
        self.core = client.CoreV1Api(ws_api)
        self.namespace = namespace
        self.pod = pod
        self.port = port
        self.tasks: set[asyncio.Task[None]] = set()
        self.errors: list[str] = []

    def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with ws_errors("create", "pods/portforward", self.namespace, self.pod):
                ctx: Any = await self.core.connect_get_namespaced_pod_portforward(
                    self.pod,
                    self.namespace,
                    ports=str(self.port),  # type: ignore[arg-type]  # the query wants a string
                    _preload_content=False,
                )
                async with ctx as ws:
                    await self._pump(ws, reader, writer)
        except (ClusterError, aiohttp.ClientError, OSError) as e:
            self.errors.append(f"{type(e).__name__}: {e}")
            log.warning("port-forward to pod %s/%s:%s failed: %s", self.namespace, self.pod, self.port, e)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    async def _pump(
        self, ws: aiohttp.ClientWebSocketResponse, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        async def local_to_pod() -> None:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    return
                await ws.send_bytes(bytes([DATA_CHANNEL]) + data)

        async def pod_to_local() -> None:
            header_seen = {DATA_CHANNEL: False, ERROR_CHANNEL: False}
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    frame = bytes(msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    frame = str(msg.data).encode()
                else:
                    return
                if not frame:
                    continue
                channel, payload = frame[0], frame[1:]
                if channel in header_seen and not header_seen[channel]:
                    header_seen[channel] = True
                    payload = payload[2:]  # the first frame on each channel carries the port (2 bytes LE)
                if not payload:
                    continue
                if channel == DATA_CHANNEL:
                    writer.write(payload)
                    await writer.drain()
                elif channel == ERROR_CHANNEL:
                    message = payload.decode(errors="replace").strip()
                    self.errors.append(message)
                    log.warning("port-forward to pod %s/%s:%s: %s", self.namespace, self.pod, self.port, message)
                    return

        up = asyncio.ensure_future(local_to_pod())
        down = asyncio.ensure_future(pod_to_local())
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if up.done() and not up.cancelled() and up.exception() is None and not down.done():
                # The local client finished sending; keep delivering the answer until the pod side closes.
                await down
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            await ws.close()


@contextlib.asynccontextmanager
async def port_forward(api: ApiClient, namespace: str, service: str, port: int) -> AsyncIterator[tuple[str, int]]:
    """Forward a local port on 127.0.0.1 to a Ready pod behind ``service:port``; yields (host, local_port).

    No Ready pod -> :class:`EndpointUnavailable` (retriable). A message on the error channel (e.g. the pod
    refused the connection) closes that connection and, if the block then fails, is raised as
    :class:`EndpointUnavailable` chained to the block's error.
    """
    pod, target = await resolve_service(api, namespace, service, port)
    async with WsApiClient(configuration=api.configuration) as ws_api:
        fwd = _Forwarder(ws_api, namespace, pod, target)
        server = await asyncio.start_server(fwd.accept, host="127.0.0.1", port=0)
        local_port = int(server.sockets[0].getsockname()[1])
        try:
            yield "127.0.0.1", local_port
        except Exception as e:
            if fwd.errors:
                raise EndpointUnavailable(
                    f"port-forward to {namespace}/{service}:{port} (pod {pod}, port {target}) failed: {fwd.errors[-1]}"
                ) from e
            raise
        finally:
            server.close()
            for t in list(fwd.tasks):
                t.cancel()
            await asyncio.gather(*fwd.tasks, return_exceptions=True)
            await server.wait_closed()


__all__ = ["port_forward", "resolve_service"]
