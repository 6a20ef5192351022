"""Shared helpers of the stand-ins: start an aiohttp app on 127.0.0.1 (free port), count requests."""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AppServer:
    """A running aiohttp app; satisfies ``RunningBackend`` (``port``, ``async stop()``)."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self._runner = runner
        self.port = port
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self._runner.cleanup()


async def serve(app: web.Application) -> AppServer:
    """Bind ``app`` to 127.0.0.1 on a free port and start serving."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    site = web.SockSite(runner, sock)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return AppServer(runner, port)


def bump(counters: dict[str, int], key: str, n: int = 1) -> None:
    counters[key] = counters.get(key, 0) + n


def counting_middleware(
    counters: dict[str, int], names: list[str], normalize: Callable[[str], str] = lambda p: p
) -> Middleware:
    """Count every request as ``<name>:<normalized path>`` for each name in ``names``."""

    @web.middleware
    async def _count(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = normalize(request.path)
        for name in names:
            bump(counters, f"{name}:{route}")
        return await handler(request)

    return _count


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, or raise ValueError."""
    raw = await request.read()
    if not raw:
        raise ValueError("empty body")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"invalid JSON: {e}") from e


def bearer_token(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        token = auth[7:].strip()
        return token or None
    return None


def expand_k8s_vars(value: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion of command/args (done by the kubelet on a real cluster)."""
    out = []
    i = 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("$(", i):
            end = value.find(")", i + 2)
            name = value[i + 2 : end] if end != -1 else ""
            if end != -1 and name in env:
                out.append(env[name])
                i = end + 1
            else:
                out.append(value[i])
                i += 1
        else:
            out.append(value[i])
            i += 1
    return "".join(out)
