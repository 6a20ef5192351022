"""``pods/portforward`` over WebSocket (channel protocol v4): for each requested port a data and an error
channel, bytes relayed to the pod's stand-in found in :class:`simstack.backends.Backends`, and the
real kubelet's error text when nothing listens there.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import WSMsgType, web

from simstack.apiserver.crud import Resources
from simstack.apiserver.errors import bad_request
from simstack.apiserver.target import Target
from simstack.backends import Backends


class PortForward:
    """The port-forward handler; its WebSockets go into ``sockets`` (closed at shutdown)."""

    def __init__(self, resources: Resources, backends: Backends, sockets: set[web.WebSocketResponse]) -> None:
        self.resources = resources
        self.backends = backends
        self._sockets = sockets

    async def portforward(self, request: web.Request, t: Target) -> web.StreamResponse:
        pod = self.resources.read(t)
        if not (pod.get("spec") or {}).get("nodeName"):
            raise bad_request(f"pod {t.name} does not have a host assigned")
        ports: list[int] = []
        for value in request.query.getall("ports", []):
            for p in value.split(","):
                try:
                    port = int(p)
                except ValueError:
                    raise bad_request(f'unable to parse "{p}" as a port: invalid syntax') from None
                if not 0 < port < 65536:
                    raise bad_request(f"port {port} must be > 0 and < 65536")
                ports.append(port)
        if not ports:
            raise bad_request('query parameter "port" is required')
        if request.headers.get("Upgrade", "").lower() != "websocket":
            raise bad_request("Upgrade request required")
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io", "channel.k8s.io"), autoping=True)
        await ws.prepare(request)
        self._sockets.add(ws)
        ns, name, uid = t.namespace or "", t.name or "", pod["metadata"].get("uid", "")
        writers: dict[int, asyncio.StreamWriter] = {}
        tasks: list[asyncio.Task[None]] = []
        send_lock = asyncio.Lock()

        async def send(channel: int, data: bytes) -> None:
            async with send_lock:
                if not ws.closed:
                    await ws.send_bytes(bytes([channel]) + data)

        async def backend_to_ws(i: int, reader: asyncio.StreamReader) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    await send(2 * i, chunk)
            writers.pop(i, None)
            if not writers:
                await ws.close()

        try:
            for i, port in enumerate(ports):
                prefix = port.to_bytes(2, "little")
                await send(2 * i, prefix)
                await send(2 * i + 1, prefix)
            for i, port in enumerate(ports):
                addr = self.backends.lookup(ns, name, port)
                err: str | None = None
                if addr is None:
                    err = "connection refused"
                else:
                    try:
                        reader, writer = await asyncio.open_connection(addr.host, addr.port)
                    except OSError as e:
                        err = str(e) or "connection refused"
                    else:
                        writers[i] = writer
                        tasks.append(asyncio.create_task(backend_to_ws(i, reader)))
                if err is not None:
                    await send(
                        2 * i + 1,
                        (
                            f"error forwarding port {port} to pod {uid}, uid : failed to execute portforward in "
                            "network "
                            f"namespace: failed to connect to localhost:{port} inside namespace: {err}"
                        ).encode(),
                    )
            if not writers:
                await ws.close()
            async for msg in ws:
                if msg.type != WSMsgType.BINARY or not msg.data:
                    continue
                ch, data = msg.data[0], msg.data[1:]
                if ch % 2 == 0 and ch // 2 in writers and data:
                    w = writers[ch // 2]
                    w.write(data)
                    with contextlib.suppress(ConnectionError):
                        await w.drain()
        finally:
            for w in list(writers.values()):
                with contextlib.suppress(Exception):
                    w.close()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for w in list(writers.values()):
                with contextlib.suppress(Exception):
                    await w.wait_closed()
            with contextlib.suppress(Exception):
                await ws.close()
            self._sockets.discard(ws)
        return ws
