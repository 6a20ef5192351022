"""Stand-in for Tabby (image ``tabbyml/tabby``).

Reads ``$TABBY_ROOT/config.toml`` (default ``/data/config.toml``) from the mounted files, as Tabby does:
``[model.completion.http]`` with ``kind = "vllm/completion"``, ``api_endpoint`` (an OpenAI-style base URL ending
in ``/v1``), ``api_key``, ``model_name`` and ``prompt_template``. A config that is not valid TOML makes Tabby
exit at start (the factory raises).

Every HTTP path, ``/v1/health`` included, answers 401 without the registration token that a real Tabby creates
in its web UI at first run; readiness therefore is a TCP probe (being bound is "ready"). The token lives in
Tabby's database under ``/data``, here ``SimServices.app_data["tabby:<namespace>"]["auth_token"]`` (created on
first start, kept across restarts).

With the token: ``GET /v1/health``; ``POST /v1/completions`` (Tabby's protocol: ``{"language", "segments":
{"prefix", "suffix"}}``) formats the prompt with ``prompt_template`` and calls ``<api_endpoint>/completions``
with ``api_key``, cutting the answer at the first blank line like Tabby's stop words.
"""

from __future__ import annotations

import json
import posixpath
import secrets
import tomllib
import uuid
from typing import Any

import aiohttp
from aiohttp import web

from simstack.standins import FACTORIES, ContainerRun, RunningBackend, SimServices
from simstack.standins._server import Handler, bearer_token, counting_middleware, json_response, read_json, serve

IMAGE = "tabbyml/tabby"
VERSION = "0.31.2"
STOP_WORDS = ("\n\n",)


class TabbyConfigError(RuntimeError):
    pass


def load_config(run: ContainerRun) -> dict[str, Any]:
    root = run.env.get("TABBY_ROOT") or "/data"
    path = posixpath.join(root, "config.toml")
    text = run.files.get(path)
    if text is None:
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TabbyConfigError(f"Failed to parse {path}: {e}") from e


class Tabby:
    def __init__(self, run: ContainerRun, services: SimServices) -> None:
        self.run = run
        self.services = services
        cfg = load_config(run)
        http = ((cfg.get("model") or {}).get("completion") or {}).get("http") or {}
        self.kind: str | None = http.get("kind")
        self.api_endpoint: str | None = http.get("api_endpoint")
        self.api_key: str | None = http.get("api_key")
        self.model_name: str | None = http.get("model_name")
        self.prompt_template: str = http.get("prompt_template") or "{prefix}"
        store = services.app_data.setdefault(f"tabby:{run.namespace}", {})
        if "auth_token" not in store:
            store["auth_token"] = "auth_" + secrets.token_hex(16)
        self.token: str = store["auth_token"]
        self.name = run.app or "tabby"
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        names = [self.name] + (["tabby"] if self.name != "tabby" else [])
        app = web.Application(middlewares=[counting_middleware(self.services.counters, names), self._auth])
        app.router.add_get("/v1/health", self.health)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60, connect=5))

    async def _cleanup(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        token = bearer_token(request)
        if token is None or not secrets.compare_digest(token, self.token):
            return web.Response(status=401)
        return await handler(request)

    async def not_found(self, request: web.Request) -> web.Response:
        return web.Response(status=404)

    async def health(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "model": self.model_name or self.kind,
                "chat_model": None,
                "device": "cpu",
                "arch": "x86_64",
                "cpu_info": "Simulated CPU",
                "cpu_count": 4,
                "cuda_devices": [],
                "version": {"build_date": "2025-01-01", "git_describe": f"v{VERSION}", "git_sha": "0" * 40},
                "webserver": True,
            }
        )

    async def completions(self, request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
        except ValueError:
            return web.Response(status=400, text="invalid JSON")
        segments = body.get("segments") or {}
        prefix = str(segments.get("prefix") or "")
        suffix = str(segments.get("suffix") or "")
        cid = f"cmpl-{uuid.uuid4()}"
        text = await self._complete(prefix, suffix)
        choices = [{"index": 0, "text": text}] if text is not None else []
        return json_response({"id": cid, "choices": choices})

    async def _complete(self, prefix: str, suffix: str) -> str | None:
        if self.kind != "vllm/completion" or not self.api_endpoint:
            return None
        prompt = self.prompt_template.replace("{prefix}", prefix).replace("{suffix}", suffix)
        url = self.services.resolve_url(self.api_endpoint.rstrip("/") + "/completions")
        if url is None:
            return None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req: dict[str, Any] = {"prompt": prompt, "max_tokens": 64, "temperature": 0.1, "stream": False}
        if self.model_name:
            req["model"] = self.model_name
        assert self.session is not None
        try:
            async with self.session.post(url, data=json.dumps(req), headers=headers) as resp:
                if resp.status != 200:
                    return None  # Tabby logs the backend error and serves no completion
                payload = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            return None
        choices = payload.get("choices") or []
        if not choices:
            return None
        text = str(choices[0].get("text") or "")
        for stop in STOP_WORDS:
            idx = text.find(stop)
            if idx != -1:
                text = text[:idx]
        return text


async def start_tabby(run: ContainerRun, services: SimServices) -> RunningBackend:
    return await serve(Tabby(run, services).app())


FACTORIES[IMAGE] = start_tabby
