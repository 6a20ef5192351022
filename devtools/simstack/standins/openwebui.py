"""Stand-in for Open WebUI (image ``ghcr.io/open-webui/open-webui``).

Reads env like the real app (its ``backend/open_webui/config.py``): the ``;``-separated ``OPENAI_API_BASE_URLS``
when set and non-empty, else ``OPENAI_API_BASE_URL``; the ``;``-separated ``OPENAI_API_KEYS`` when set and non-empty,
else ``OPENAI_API_KEY`` (so ``OPENAI_API_KEYS`` wins when both are set), entries stripped and index-aligned;
the stand-in serves the first connection only. ``WEBUI_SECRET_KEY`` (generated when empty, as ``start.sh`` does),
``ENABLE_PERSISTENT_CONFIG`` (default true: the connection settings seen at first boot are stored in the app's
database and win over the environment on later boots; any value but ``true`` makes the environment win),
``AIOHTTP_CLIENT_TIMEOUT_MODEL_LIST`` (seconds; how long ``/api/models`` hangs on an unreachable upstream).

Routes: ``/health`` and ``/health/db`` -> ``{"status": true}``, ``/api/version``, ``/api/config`` (open);
``/api/models`` (needs a user's session JWT, HS256-signed with ``WEBUI_SECRET_KEY``) lists the upstream's
``/models`` fetched with the configured key.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

import aiohttp
from aiohttp import web

from simstack.standins import FACTORIES, ContainerRun, RunningBackend, SimServices
from simstack.standins._server import bearer_token, counting_middleware, json_response, serve

IMAGE = "ghcr.io/open-webui/open-webui"
VERSION = "0.6.18"


def _b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_session(secret: str, user_id: str = "admin", ttl_s: float | None = None) -> str:
    """A session token as Open WebUI issues it at sign-in (HS256 JWT over ``{"id": ...}``)."""
    payload: dict[str, Any] = {"id": user_id}
    if ttl_s is not None:
        payload["exp"] = int(time.time() + ttl_s)
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64url(json.dumps(payload).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64url(sig)}"


def verify_session(secret: str, token: str) -> dict[str, Any] | None:
    try:
        head, body, sig = token.split(".")
        expected = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _b64url_decode(sig)):
            return None
        payload = json.loads(_b64url_decode(body))
    except (ValueError, json.JSONDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    if "exp" in payload and float(payload["exp"]) < time.time():
        return None
    return payload


def _first_of(plural: str | None, singular: str | None) -> str:
    """The first entry of a ``;``-separated plural variable when it is set and non-empty, else the singular
    one: how Open WebUI's config.py picks OPENAI_API_KEYS over OPENAI_API_KEY (and the URLs alike)."""
    value = plural if plural else (singular or "")
    return value.split(";")[0].strip()


class OpenWebUI:
    def __init__(self, run: ContainerRun, services: SimServices) -> None:
        env = run.env
        self.services = services
        self.secret = env.get("WEBUI_SECRET_KEY") or secrets.token_hex(16)
        # From the app's source (backend/open_webui/config.py): the plural variable wins when set and non-empty.
        # GUESS: only the first connection is served (the real app lists the models of every connection).
        base = _first_of(env.get("OPENAI_API_BASE_URLS"), env.get("OPENAI_API_BASE_URL") or "https://api.openai.com/v1")
        base = base or "https://api.openai.com/v1"  # config.py: an empty URL entry means OpenAI's
        key = _first_of(env.get("OPENAI_API_KEYS"), env.get("OPENAI_API_KEY"))
        # Open WebUI's docs (env-configuration, "Important Note on PersistentConfig Environment Variables"):
        # PersistentConfig variables -- OPENAI_API_KEY(S) and OPENAI_API_BASE_URL(S) among them -- are taken
        # from the environment at the first launch and stored; on later starts the stored values are used
        # and the environment is ignored, unless ENABLE_PERSISTENT_CONFIG is False.
        # The parsing is the app's source (backend/open_webui/config.py), not the docs: persistence is on
        # only if the variable is absent or "true" in any case; any other value (even "0" or "") is off.
        persistent = env.get("ENABLE_PERSISTENT_CONFIG", "True").lower() == "true"
        # GUESS: one database per namespace (the chart's PVC survives pod restarts). GUESS: the connection
        # is stored at the first boot, as the docs word it; in the app's source (PersistentConfig) a stored
        # value is used only if the database has an entry for it, and when that entry is first written is
        # not in the docs, so a real instance may follow its environment a little longer. The stand-in
        # models the docs' (worst) case.
        store = services.app_data.setdefault(f"open-webui:{run.namespace}", {})
        if persistent and "config" in store:
            cfg = store["config"]  # the database wins over the environment after the first boot
        else:
            # ENABLE_PERSISTENT_CONFIG off, or the first boot: the environment is used (and stored).
            # GUESS: with persistence off the environment's value is stored too, so turning persistence
            # back on later keeps the last key the app saw.
            cfg = {"OPENAI_API_BASE_URL": base, "OPENAI_API_KEY": key}
            store["config"] = cfg
        self.base_url: str = cfg["OPENAI_API_BASE_URL"].rstrip("/")
        self.api_key: str = cfg["OPENAI_API_KEY"]
        self.model_list_timeout = float(env.get("AIOHTTP_CLIENT_TIMEOUT_MODEL_LIST") or 10) * services.time_scale
        self.name = run.app or "open-webui"
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        names = [self.name] + (["open-webui"] if self.name != "open-webui" else [])
        app = web.Application(middlewares=[counting_middleware(self.services.counters, names)])
        app.router.add_get("/health", self.health)
        app.router.add_get("/health/db", self.health)
        app.router.add_get("/api/version", self.version)
        app.router.add_get("/api/config", self.config)
        app.router.add_get("/api/models", self.models)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession()

    async def _cleanup(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def health(self, request: web.Request) -> web.Response:
        return json_response({"status": True})

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": VERSION})

    async def config(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "status": True,
                "name": "Open WebUI",
                "version": VERSION,
                "default_locale": "",
                "oauth": {"providers": {}},
                "features": {"auth": True, "auth_trusted_header": False, "enable_signup": True},
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        token = bearer_token(request)
        if token is None:
            return json_response({"detail": "Not authenticated"}, status=401)
        if verify_session(self.secret, token) is None:
            return json_response({"detail": "Invalid token"}, status=401)
        upstream = await self._upstream_models()
        data = [
            {
                "id": m.get("id"),
                "name": m.get("id"),
                "object": "model",
                "created": m.get("created", 0),
                "owned_by": "openai",
                "openai": m,
                "connection_type": "external",
                "urlIdx": 0,
            }
            for m in upstream
        ]
        return json_response({"data": data})

    async def _upstream_models(self) -> list[dict[str, Any]]:
        url = self.services.resolve_url(f"{self.base_url}/models")
        if url is None:
            await asyncio.sleep(self.model_list_timeout)  # Open WebUI waits out its client timeout
            return []
        assert self.session is not None
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with self.session.get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=max(self.model_list_timeout, 0.1))
            ) as resp:
                if resp.status != 200:
                    return []
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            return []
        data = body.get("data") if isinstance(body, dict) else None
        return [m for m in data or [] if isinstance(m, dict)]


async def start_openwebui(run: ContainerRun, services: SimServices) -> RunningBackend:
    return await serve(OpenWebUI(run, services).app())


FACTORIES[IMAGE] = start_openwebui
