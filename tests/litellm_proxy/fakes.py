"""Local stand-ins the wake hook talks to, each an aiohttp app on 127.0.0.1: the Kubernetes API (the Deployments
whose state a test sets), Prefect's events endpoint (records what it is sent, answers 204) and a tiny
OpenAI-compatible upstream. Used by the hook's unit tests and by the real-LiteLLM tier."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeCluster:
    """What the fake Kubernetes API serves, and what it and the event sink saw."""

    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    reads: int = 0
    hang: bool = False
    gate: asyncio.Event | None = None  # when set to an Event, a Deployment read waits for it
    read_started: asyncio.Event = field(default_factory=asyncio.Event)
    read_auth: list[str] = field(default_factory=list)  # the Authorization header of every Deployment read
    ready_from_read: dict[str, int] = field(default_factory=dict)  # name -> from this read on, one ready replica
    events: list[Any] = field(default_factory=list)
    event_headers: list[dict[str, str]] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)  # every request body the fakes received, raw
    posted: asyncio.Event = field(default_factory=asyncio.Event)

    def set(self, name: str, ready: int, wake: dict[str, Any] | None = None, cold_start_s: float | None = None) -> None:
        notes: dict[str, str] = {}
        if wake is not None:
            notes["coder-stack.io/wake"] = json.dumps(wake)
        if cold_start_s is not None:
            notes["coder-stack.io/cold-start-s"] = str(cold_start_s)
        self.deployments[name] = {"ready": ready, "annotations": notes}


def _app(c: FakeCluster) -> web.Application:
    async def deployment(request: web.Request) -> web.Response:
        c.reads += 1
        c.read_auth.append(request.headers.get("Authorization", ""))
        c.read_started.set()
        if c.gate is not None:
            await c.gate.wait()
        if c.hang:
            await asyncio.sleep(3600)
        d = c.deployments.get(request.match_info["name"])
        if d is not None and c.reads >= c.ready_from_read.get(request.match_info["name"], 1 << 30):
            d["ready"] = 1
        if d is None:
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        body: dict[str, Any] = {
            "metadata": {"name": request.match_info["name"], "annotations": d["annotations"]},
            "spec": {"replicas": d["ready"]},
            "status": {"readyReplicas": d["ready"]} if d["ready"] else {},
        }
        return web.json_response(body)

    async def events(request: web.Request) -> web.Response:
        text = await request.text()
        c.bodies.append(text)
        c.events.extend(json.loads(text))
        c.event_headers.append(dict(request.headers))
        c.posted.set()
        return web.Response(status=204)

    async def chat(request: web.Request) -> web.StreamResponse:
        text = await request.text()
        c.bodies.append(text)
        body = json.loads(text)
        msg = {"role": "assistant", "content": "pong"}
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        base = {"id": "chatcmpl-1", "created": int(time.time()), "model": body.get("model", "m")}
        if body.get("stream"):
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            for choice in (
                {"index": 0, "delta": msg, "finish_reason": None},
                {"index": 0, "delta": {}, "finish_reason": "stop"},
            ):
                chunk = base | {"object": "chat.completion.chunk", "choices": [choice]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        choice = {"index": 0, "message": msg, "finish_reason": "stop"}
        return web.json_response(base | {"object": "chat.completion", "choices": [choice], "usage": usage})

    async def completions(request: web.Request) -> web.Response:
        text = await request.text()
        c.bodies.append(text)
        choice = {"index": 0, "text": "pass", "finish_reason": "stop", "logprobs": None}
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        return web.json_response(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 0,
                "model": "m",
                "choices": [choice],
                "usage": usage,
            }
        )

    app = web.Application()
    app.router.add_get("/apis/apps/v1/namespaces/{ns}/deployments/{name}", deployment)
    app.router.add_post("/api/events", events)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    return app


@asynccontextmanager
async def serve(cluster: FakeCluster, tls: ssl.SSLContext | None = None) -> Any:
    """Start the fakes on a free port of 127.0.0.1 (https with ``tls``); yields the base URL."""
    runner = web.AppRunner(_app(cluster), shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def settings(base: str, **over: Any) -> dict[str, Any]:
    """The hook's settings file for the fakes at ``base`` (the contract's shape)."""
    s: dict[str, Any] = {
        "version": 1,
        "namespace": "serving",
        "models": {
            "coder-chat": {"deployment": "coder-chat", "role": "chat", "fallback": None, "cold_start_s": 600},
            "coder-fim": {"deployment": "coder-fim", "role": "fim", "fallback": None, "cold_start_s": 600},
        },
        "prefect_api_url": f"{base}/api",
        "prefect_auth_env": "PREFECT_API_AUTH_STRING",
        "chat_as_message": False,
        "hold_s": 20,
        "burst_s": 120,
        "cache_s": 5,
        "kubernetes": {"url": base, "token_file": "/var/run/secrets/token", "ca_file": "/var/run/secrets/ca.crt"},
    }
    return s | over
