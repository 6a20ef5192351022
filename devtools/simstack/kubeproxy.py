"""Services reached by address from outside the simulated cluster's API: :class:`ServiceForwarder` (a local
port that reaches a Ready pod behind a Service, as an ingress or a ClusterIP would) and
:class:`ServiceProxies` (one forwarder per Service port for the processes of runnable pods, and the DNS names
that resolve to them).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

from simstack.backends import Backends
from simstack.store import Store


class ServiceForwarder:
    """A local port that always reaches a Ready pod behind a Service.

    ``ingress`` (what an ingress in front of the Service would be): no Ready pod is an HTTP 503. Otherwise a
    Service's ClusterIP as kube-proxy makes it: no Ready pod resets the connection.
    """

    def __init__(self, backends: Backends, namespace: str, service: str, port: int, *, ingress: bool = True) -> None:
        self._backends = backends
        self._ingress = ingress
        self._target = (namespace, service, port)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            addr = self._backends.service_backend(*self._target)
            if addr is None:
                await self._no_endpoint(reader, writer)
                return
            try:
                up_r, up_w = await asyncio.open_connection(addr.host, addr.port)
            except OSError:
                await self._no_endpoint(reader, writer)
                return
            try:
                await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))
            finally:
                up_w.close()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _no_endpoint(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._ingress:
            await self._unavailable(reader, writer)
            return
        # GUESS: kube-proxy's REJECT rule refuses the connection to a ClusterIP without endpoints; a local
        # listener has already accepted it, so it is reset (the client sees a connection error either way).
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    @staticmethod
    async def _unavailable(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """No Ready pod behind the Service: answer like an ingress with no endpoints (503)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
        body = b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>\n"
        writer.write(
            b"HTTP/1.1 503 Service Temporarily Unavailable\r\nContent-Type: text/html\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except (ConnectionError, OSError):
            dst.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


class ServiceProxies:
    """kube-proxy for the processes of runnable pods: every Service gets a ClusterIP-like address (an unbound
    loopback address, 127.96.x.y) and every Service port a local forwarder on 127.0.0.1; the cluster DNS names of
    the Service (``<svc>.<ns>``, ``<svc>.<ns>.svc``, ``<svc>.<ns>.svc.<cluster domain>``, and ``<svc>`` from a pod
    in the same namespace) resolve to its address. The pod's process maps a connection to (address, Service
    port) onto the forwarder (``devtools/simstack/podshim/sitecustomize.py``)."""

    def __init__(self, store: Store, backends: Backends, cluster_domain: str) -> None:
        self._store = store
        self._backends = backends
        self._domain = cluster_domain
        self._forwarders: dict[tuple[str, str, int], ServiceForwarder] = {}
        self._ips: dict[tuple[str, str], str] = {}

    def _cluster_ip(self, namespace: str, name: str) -> str:
        ip = self._ips.get((namespace, name))
        if ip is None:
            n = len(self._ips) + 1
            ip = self._ips[(namespace, name)] = f"127.96.{n // 250}.{n % 250 + 1}"
        return ip

    async def dns(self, namespace: str) -> dict[str, Any]:
        """``{"names": {host name: address}, "addresses": {address: {service port: local port}}}`` for every
        Service that exists now, as a pod in ``namespace`` resolves them (resolv.conf search path
        ``<ns>.svc.<domain> svc.<domain> <domain>``)."""
        names: dict[str, str] = {}
        addresses: dict[str, dict[str, int]] = {}
        for svc in self._store.list("services"):
            meta = svc["metadata"]
            ns, name = meta["namespace"], meta["name"]
            ip = self._cluster_ip(ns, name)
            ports = addresses.setdefault(ip, {})
            for p in (svc.get("spec") or {}).get("ports") or []:
                port = int(p["port"])
                fwd = self._forwarders.get((ns, name, port))
                if fwd is None:
                    fwd = ServiceForwarder(self._backends, ns, name, port, ingress=False)
                    await fwd.start()
                    self._forwarders[(ns, name, port)] = fwd
                ports[str(port)] = fwd.port
            hosts = [f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.{self._domain}"]
            if ns == namespace:
                hosts.append(name)
            names.update(dict.fromkeys(hosts, ip))
        return {"names": names, "addresses": addresses}

    async def stop(self) -> None:
        for fwd in self._forwarders.values():
            await fwd.stop()
        self._forwarders.clear()
