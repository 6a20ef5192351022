"""Imported by Python at the start of every process of a simulated pod of a runnable image (this directory is
on the pod process's PYTHONPATH, and nowhere else): the two things a real pod gets from its node that a local
process cannot, emulated for this process only.

1. The ServiceAccount mount: kubernetes-asyncio's in-cluster config reads the token and CA from
   ``/var/run/secrets/kubernetes.io/serviceaccount/``; a local process may not write there, so its two path
   constants are pointed at the pod's sandbox (``SIMSTACK_POD_SERVICEACCOUNT``) when the module is imported.
2. Cluster DNS and the Services' ClusterIPs: ``socket.getaddrinfo`` resolves the Service names in
   ``SIMSTACK_POD_DNS`` to the Service's address (an unbound loopback address), and ``socket.socket.connect``
   sends a connection to (that address, a Service port) to the port's local forwarder on 127.0.0.1, as
   kube-proxy would. Every other name and address is left alone. (The port cannot be changed in what
   getaddrinfo returns: anyio, under httpx, connects to the resolved address with the port it asked for.)

The flow code knows nothing of this: it calls ``load_incluster_config()`` and connects to ``http://<svc>.<ns>.svc.
cluster.local:<port>`` exactly as in a real pod.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import socket
import sys
from types import ModuleType
from typing import Any

_INCLUSTER = "kubernetes_asyncio.config.incluster_config"
# a port nothing listens on: a Service name with a port the Service does not expose is refused
_CLOSED_PORT = 1


def _mount(module: ModuleType) -> None:
    sa_dir = os.environ.get("SIMSTACK_POD_SERVICEACCOUNT")
    if sa_dir:
        module.SERVICE_TOKEN_FILENAME = os.path.join(sa_dir, "token")  # type: ignore[attr-defined]
        module.SERVICE_CERT_FILENAME = os.path.join(sa_dir, "ca.crt")  # type: ignore[attr-defined]


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _mount(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Patches the in-cluster config module when it is imported (importing it here would cost every process
    the whole kubernetes-asyncio client at start)."""

    def find_spec(
        self, fullname: str, path: Any, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _INCLUSTER:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target)  # type: ignore[attr-defined]
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec  # type: ignore[no-any-return]
        return None


def _load_dns() -> tuple[dict[str, str], dict[str, dict[int, int]]]:
    path = os.environ.get("SIMSTACK_POD_DNS")
    if not path:
        return {}, {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}, {}
    names = {str(k).lower(): str(v) for k, v in (data.get("names") or {}).items()}
    addresses = {}
    for ip, ports in (data.get("addresses") or {}).items():
        addresses[str(ip)] = {int(p): int(local) for p, local in ports.items()}
    return names, addresses


_NAMES, _ADDRESSES = _load_dns()
_real_getaddrinfo = socket.getaddrinfo
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
    """A Service name resolves to its address (as cluster DNS answers with the ClusterIP); the rest as before."""
    name = host.decode() if isinstance(host, bytes) else host
    if isinstance(name, str):
        ip = _NAMES.get(name.rstrip(".").lower())
        if ip is not None:
            return _real_getaddrinfo(ip, port, family, type, proto, flags)
    return _real_getaddrinfo(host, port, family, type, proto, flags)


def _target(address: Any) -> Any:
    """A connection to (Service address, Service port) goes to that port's local forwarder (kube-proxy's
    job); a port the Service does not expose is refused."""
    if isinstance(address, tuple) and len(address) >= 2 and address[0] in _ADDRESSES:
        return ("127.0.0.1", _ADDRESSES[address[0]].get(int(address[1]), _CLOSED_PORT))
    return address


def _connect(self: socket.socket, address: Any) -> None:
    _real_connect(self, _target(address))


def _connect_ex(self: socket.socket, address: Any) -> int:
    return _real_connect_ex(self, _target(address))


if os.environ.get("SIMSTACK_POD_SERVICEACCOUNT"):
    if _INCLUSTER in sys.modules:
        _mount(sys.modules[_INCLUSTER])
    else:
        sys.meta_path.insert(0, _Finder())
if _NAMES:
    socket.getaddrinfo = _getaddrinfo
    socket.socket.connect = _connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign,assignment]
