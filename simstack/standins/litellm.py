"""Stand-in for the LiteLLM proxy (image ``ghcr.io/berriai/litellm``), following ``shared/reference/litellm.md``.

Reads, like the real proxy: ``--config <path>`` (or env ``CONFIG_FILE_PATH``, else a mounted
``proxy_config.yaml``/``config.yaml``) with ``model_list`` and ``general_settings``; ``os.environ/X`` values
resolved from the container env; master key from ``general_settings.master_key``, env ``LITELLM_MASTER_KEY``
or ``PROXY_MASTER_KEY``; ``store_model_in_db`` from ``general_settings`` or env ``STORE_MODEL_IN_DB``.

All persistent state (virtual keys with their spend, models added with ``/model/new``) lives in
``SimServices.litellm_db`` (LiteLLM's Postgres), so it survives a pod restart. Spend of a call reaches the
database ``spend_write_delay_s * time_scale`` seconds later (the batched write); budget checks use the
proxy's in-memory view, which includes not-yet-written spend.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import posixpath
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from simstack.standins import FACTORIES, ContainerRun, RunningBackend, SimServices
from simstack.standins._server import AppServer, Handler, bump, counting_middleware, json_response, read_json, serve
from simstack.standins.vllm import count_tokens

IMAGE = "ghcr.io/berriai/litellm"
VERSION = "1.108.7"
CONFIG_NAMES = ("proxy_config.yaml", "config.yaml", "config.yml", "litellm_config.yaml", "proxy_server_config.yaml")
DATA_ROUTES = {"/chat/completions": "chat", "/completions": "completions", "/embeddings": "embeddings"}
PUBLIC_ROUTES = {"/health/readiness", "/health/liveliness", "/health/liveness", "/"}
NOT_PREMIUM = (
    "You must be a LiteLLM Enterprise user to use this feature. If you have a license please set `LITELLM_LICENSE` "
    "in your env. Get a 7 day trial key here: https://www.litellm.ai/#trial. \nPricing: https://www.litellm.ai/#pricing"
)
_DURATION_RE = re.compile(r"^(\d+)(s|m|h|d|w|mo)$")


class ProxyError(Exception):
    """LiteLLM's ProxyException: ``{"error": {"message", "type", "param", "code": "<status>"}}``."""

    def __init__(self, status: int, message: str, err_type: str | None, param: str | None = "None") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def response(self) -> web.Response:
        return json_response(
            {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": str(self.status)}},
            status=self.status,
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t else None


def parse_duration(value: str) -> dt.timedelta:
    m = _DURATION_RE.match(value.strip())
    if not m:
        raise ValueError(f"Invalid duration {value!r}: use e.g. 30s, 30m, 30h, 30d, 1w, 1mo")
    n, unit = int(m.group(1)), m.group(2)
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "mo": 2592000}[unit]
    return dt.timedelta(seconds=n * seconds)


def hash_token(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def abbreviate(key: str) -> str:
    return f"sk-...{key[-4:]}"


def resolve_env(value: Any, env: dict[str, str]) -> Any:
    """LiteLLM's ``os.environ/NAME`` references, recursively."""
    if isinstance(value, str) and value.startswith("os.environ/"):
        return env.get(value[len("os.environ/") :])
    if isinstance(value, dict):
        return {k: resolve_env(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env(v, env) for v in value]
    return value


def _encrypt_looking(value: str, salt: str) -> str:
    nonce = secrets.token_bytes(24)
    stream = b""
    counter = 0
    while len(stream) < len(value.encode()) + 16:
        stream += hashlib.sha256(salt.encode() + nonce + counter.to_bytes(4, "big")).digest()
        counter += 1
    data = value.encode()
    body = bytes(a ^ b for a, b in zip(data, stream, strict=False))
    mac = hashlib.sha256(nonce + body).digest()[:16]
    return base64.urlsafe_b64encode(nonce + mac + body).decode()


@dataclass
class Deployment:
    model_id: str
    model_name: str
    litellm_params: dict[str, Any]  # resolved (api_key in clear)
    model_info: dict[str, Any]
    db_model: bool

    @property
    def served_name(self) -> str:
        model = str(self.litellm_params.get("model") or "")
        return model.split("/", 1)[1] if "/" in model else model

    @property
    def provider(self) -> str:
        model = str(self.litellm_params.get("model") or "")
        return model.split("/", 1)[0] if "/" in model else "openai"

    def price(self, which: str) -> float:
        v = self.litellm_params.get(which, self.model_info.get(which))
        try:
            return float(v) if v is not None else 0.0
        except (TypeError, ValueError):
            return 0.0

    def public(self) -> dict[str, Any]:
        params = {k: v for k, v in self.litellm_params.items() if k not in ("api_key", "aws_secret_access_key")}
        info = {
            "id": self.model_id,
            "db_model": self.db_model,
            "key": self.served_name,
            "mode": self.model_info.get("mode", "chat"),
            "litellm_provider": self.provider,
            "input_cost_per_token": self.price("input_cost_per_token"),
            "output_cost_per_token": self.price("output_cost_per_token"),
            "max_tokens": self.model_info.get("max_tokens"),
            "max_input_tokens": self.model_info.get("max_input_tokens"),
            "max_output_tokens": self.model_info.get("max_output_tokens"),
        }
        info.update({k: v for k, v in self.model_info.items() if k not in info})
        info["id"] = self.model_id
        return {"model_name": self.model_name, "litellm_params": params, "model_info": info}


@dataclass
class Caller:
    is_master: bool
    token: str | None = None  # hashed token of a virtual key

    @property
    def label(self) -> str:
        return "master" if self.is_master else (self.token or "")[:8]


def find_config(run: ContainerRun) -> dict[str, Any]:
    path: str | None = None
    args = run.args
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    path = path or run.env.get("CONFIG_FILE_PATH")
    text: str | None = None
    if path is not None:
        text = run.files.get(path) or run.files.get(posixpath.normpath(path))
        if text is None:
            raise FileNotFoundError(f"Config file not found: {path}")
    else:
        for p, content in run.files.items():
            if posixpath.basename(p) in CONFIG_NAMES:
                text = content
                break
    if text is None:
        return {}
    cfg = yaml.safe_load(text) or {}
    if not isinstance(cfg, dict):
        raise ValueError("LiteLLM config must be a mapping")
    return cfg


class LiteLLMProxy:
    def __init__(self, run: ContainerRun, services: SimServices) -> None:
        self.run = run
        self.services = services
        env = dict(run.env)
        cfg = find_config(run)
        env.update({k: str(v) for k, v in (cfg.get("environment_variables") or {}).items()})
        self.env = env
        self.general = resolve_env(cfg.get("general_settings") or {}, env)
        self.master_key: str | None = (
            self.general.get("master_key") or env.get("LITELLM_MASTER_KEY") or env.get("PROXY_MASTER_KEY") or None
        )
        self.salt = env.get("LITELLM_SALT_KEY") or self.master_key or "litellm"
        self.store_model_in_db = bool(self.general.get("store_model_in_db")) or env.get(
            "STORE_MODEL_IN_DB", ""
        ).lower() in ("true", "1")
        self.config_deployments = [self._config_deployment(i, m) for i, m in enumerate(cfg.get("model_list") or [])]
        db = services.litellm_db
        db.setdefault("keys", {})
        db.setdefault("models", [])
        db.setdefault("spend_logs", [])
        self.db = db
        self.pending: list[tuple[float, str, float]] = []  # (due monotonic, token, cost)
        self.mem_spend: dict[str, float] = {}  # in-memory view (cache) of not-yet-written spend
        self.rr = itertools.count()
        self.session: aiohttp.ClientSession | None = None
        self.started = _now()

    # ------------------------------------------------------------------ models
    def _config_deployment(self, i: int, entry: dict[str, Any]) -> Deployment:
        params = resolve_env(entry.get("litellm_params") or {}, self.env)
        info = dict(entry.get("model_info") or {})
        mid = (
            info.get("id")
            or hashlib.sha256(
                json.dumps([entry.get("model_name"), entry.get("litellm_params")], sort_keys=True, default=str).encode()
            ).hexdigest()
        )
        return Deployment(str(mid), str(entry.get("model_name")), params, info, db_model=False)

    def deployments(self) -> list[Deployment]:
        out = list(self.config_deployments)
        for row in self.db["models"]:
            out.append(
                Deployment(
                    row["model_id"],
                    row["model_name"],
                    resolve_env(row["litellm_params"], self.env),
                    dict(row.get("model_info") or {}),
                    db_model=True,
                )
            )
        return out

    def model_names(self) -> list[str]:
        return list(dict.fromkeys(d.model_name for d in self.deployments()))

    # ------------------------------------------------------------------ spend
    def flush_due(self, everything: bool = False) -> None:
        now = time.monotonic()
        keep = []
        for due, token, cost in self.pending:
            if everything or due <= now:
                rec = self.db["keys"].get(token)
                if rec is not None:
                    rec["spend"] = rec.get("spend", 0.0) + cost
                    rec["updated_at"] = _iso(_now())
                self.mem_spend[token] = self.mem_spend.get(token, 0.0) - cost
            else:
                keep.append((due, token, cost))
        self.pending = keep

    def current_spend(self, token: str) -> float:
        rec = self.db["keys"].get(token) or {}
        return float(rec.get("spend", 0.0)) + self.mem_spend.get(token, 0.0)

    def record_spend(self, caller: Caller, dep: Deployment, usage: dict[str, Any] | None, route: str) -> float:
        usage = usage or {}
        pt = int(usage.get("prompt_tokens") or 0)
        ct = int(usage.get("completion_tokens") or 0)
        cost = pt * dep.price("input_cost_per_token") + ct * dep.price("output_cost_per_token")
        self.db["spend_logs"].append(
            {
                "request_id": str(uuid.uuid4()),
                "api_key": caller.token or "master",
                "model_group": dep.model_name,
                "model_id": dep.model_id,
                "call_type": route,
                "prompt_tokens": pt,
                "completion_tokens": ct,
                "spend": cost,
                "startTime": _iso(_now()),
            }
        )
        if caller.token is not None:
            delay = self.services.spend_write_delay_s * self.services.time_scale
            self.pending.append((time.monotonic() + delay, caller.token, cost))
            self.mem_spend[caller.token] = self.mem_spend.get(caller.token, 0.0) + cost
        return cost

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[
                counting_middleware(self.services.counters, ["litellm"], normalize_route),
                self._errors,
            ],
            client_max_size=64 * 1024 * 1024,
        )
        r = app.router
        r.add_get("/health/readiness", self.readiness)
        r.add_get("/health/liveliness", self.liveliness)
        r.add_get("/health/liveness", self.liveliness)
        r.add_get("/health", self.health)
        r.add_get("/", self.root)
        for prefix in ("", "/v1"):
            r.add_get(f"{prefix}/models", self.models)
            r.add_post(f"{prefix}/chat/completions", self.data_plane)
            r.add_post(f"{prefix}/completions", self.data_plane)
            r.add_post(f"{prefix}/embeddings", self.data_plane)
        r.add_post("/key/generate", self.key_generate)
        r.add_get("/key/info", self.key_info)
        r.add_get("/key/list", self.key_list)
        r.add_post("/key/update", self.key_update)
        r.add_post("/key/delete", self.key_delete)
        r.add_post("/key/regenerate", self.key_regenerate)
        r.add_post("/key/{key}/regenerate", self.key_regenerate)
        r.add_post("/model/new", self.model_new)
        r.add_get("/model/info", self.model_info)
        r.add_get("/v1/model/info", self.model_info)
        r.add_get("/v2/model/info", self.model_info)
        r.add_post("/model/delete", self.model_delete)
        r.add_get("/spend/logs", self.spend_logs)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600, connect=5))

    async def _on_cleanup(self, app: web.Application) -> None:
        self.flush_due(everything=True)
        if self.session is not None:
            await self.session.close()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.flush_due()
        try:
            return await handler(request)
        except ProxyError as e:
            return e.response()

    # ------------------------------------------------------------------ auth
    def authenticate(self, request: web.Request) -> Caller:
        raw = request.headers.get("Authorization") or request.headers.get("x-litellm-api-key") or ""
        key = raw[7:].strip() if raw[:7].lower() == "bearer " else raw.strip()
        if not key:
            raise ProxyError(401, "Authentication Error, No api key passed in.", "auth_error")
        if self.master_key and secrets.compare_digest(key, self.master_key):
            return Caller(is_master=True)
        if not key.startswith("sk-"):
            raise ProxyError(
                401,
                f"Authentication Error, LiteLLM Virtual Key expected. Received={abbreviate(key)}, "
                "expected to start with 'sk-'.",
                "auth_error",
            )
        token = hash_token(key)
        rec = self.db["keys"].get(token)
        if rec is None:
            raise ProxyError(401, "Authentication Error, Invalid API key provided.", "token_not_found_in_db", "key")
        expires = rec.get("expires")
        if expires and dt.datetime.fromisoformat(expires) < _now():
            raise ProxyError(
                400,
                f"Authentication Error - Expired Key. Key Expiry time {expires} and current time {_iso(_now())}",
                "expired_key",
                "key",
            )
        return Caller(is_master=False, token=token)

    def require_admin(self, request: web.Request) -> Caller:
        caller = self.authenticate(request)
        if not caller.is_master:
            raise ProxyError(
                401,
                "Authentication Error, Only proxy admin can be used to generate, delete, update info for new "
                f"keys/users/teams. Route={request.path}. Your role=None. Your user_id=None",
                "auth_error",
            )
        return caller

    # ------------------------------------------------------------------ health
    async def root(self, request: web.Request) -> web.Response:
        return json_response({"message": "LiteLLM: RUNNING"})

    async def readiness(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "status": "healthy",
                "db": "connected",
                "cache": None,
                "litellm_version": VERSION,
                "success_callbacks": [],
                "use_aiohttp_transport": True,
                "last_updated": _iso(_now()),
            }
        )

    async def liveliness(self, request: web.Request) -> web.Response:
        return json_response("I'm alive!")

    async def health(self, request: web.Request) -> web.Response:
        self.authenticate(request)
        healthy, unhealthy = [], []
        for dep in self.deployments():
            mode = dep.model_info.get("mode", "chat")
            path: str
            body: dict[str, Any]
            if mode == "embedding":
                path, body = "/embeddings", {"model": dep.served_name, "input": ["test"]}
            else:
                path, body = (
                    "/chat/completions",
                    {
                        "model": dep.served_name,
                        "messages": [{"role": "user", "content": "ping"}],
                        "max_tokens": 1,
                    },
                )
            entry = dep.public()["litellm_params"] | {"model_id": dep.model_id}
            try:
                status, resp = await self._upstream_json(dep, path, body)
            except aiohttp.ClientError as e:
                unhealthy.append(entry | {"error": f"litellm.APIConnectionError: {e}"})
                continue
            if status < 400:
                healthy.append(entry)
            else:
                unhealthy.append(entry | {"error": f"Error code: {status} - {resp}"})
        return json_response(
            {
                "healthy_endpoints": healthy,
                "unhealthy_endpoints": unhealthy,
                "healthy_count": len(healthy),
                "unhealthy_count": len(unhealthy),
            }
        )

    # ------------------------------------------------------------------ data plane
    def key_models(self, caller: Caller) -> list[str] | None:
        """The key's model scope; None means every model."""
        if caller.is_master or caller.token is None:
            return None
        models = list(self.db["keys"][caller.token].get("models") or [])
        if not models or "all-proxy-models" in models or "*" in models:
            return None
        return models

    async def models(self, request: web.Request) -> web.Response:
        caller = self.authenticate(request)
        scope = self.key_models(caller)
        names = scope if scope is not None else self.model_names()
        modes = {d.model_name: d.model_info.get("mode") for d in self.deployments()}
        data = []
        for name in dict.fromkeys(names):
            entry: dict[str, Any] = {"id": name, "object": "model", "created": 1677610602, "owned_by": "openai"}
            if modes.get(name) == "embedding":
                entry["mode"] = "embedding"
            data.append(entry)
        return json_response({"data": data, "object": "list"})

    def _check_budget(self, caller: Caller) -> None:
        if caller.token is None:
            return
        rec = self.db["keys"][caller.token]
        max_budget = rec.get("max_budget")
        if max_budget is None:
            return
        spend = self.current_spend(caller.token)
        if spend >= float(max_budget):
            raise ProxyError(
                422,
                f"Budget has been exceeded! Key={rec.get('key_alias')} ({rec.get('key_name')}) "
                f"Current cost: {spend}, Max budget: {float(max_budget)}",
                "budget_exceeded",
            )

    def pick(self, model: str) -> Deployment | None:
        deps = [d for d in self.deployments() if d.model_name == model]
        if not deps:
            return None
        return deps[next(self.rr) % len(deps)]

    async def data_plane(self, request: web.Request) -> web.StreamResponse:
        caller = self.authenticate(request)
        route = normalize_route(request.path).removeprefix("/v1")
        try:
            body = await read_json(request)
        except ValueError as e:
            raise ProxyError(400, f"Invalid request body: {e}", "bad_request_error") from e
        if not isinstance(body, dict):
            raise ProxyError(400, "Invalid request body: expected a JSON object", "bad_request_error")
        model = body.get("model")
        known = self.model_names()
        scope = self.key_models(caller)
        if not caller.is_master and (
            (scope is not None and model not in scope) or not isinstance(model, str) or model not in known
        ):
            raise ProxyError(
                403,
                f"The requested model '{model}' is not available for this API key, or the model name is invalid. "
                f"This key can only access models={scope if scope is not None else known}. Tried to access {model}",
                "key_model_access_denied",
                "model",
            )
        if not isinstance(model, str) or model not in known:
            raise ProxyError(
                400,
                f"{route}: Invalid model name passed in model={model}. Call `/v1/models` to view available models "
                "for your key.",
                "bad_request_error",
                "model",
            )
        self._check_budget(caller)
        dep = self.pick(model)
        assert dep is not None
        bump(self.services.counters, f"litellm:upstream:{model}")
        bump(self.services.counters, f"litellm:deployment:{dep.model_id}")
        upstream_body = dict(body)
        upstream_body["model"] = dep.served_name
        url = self._upstream_url(dep, route)
        if url is None:
            raise self._connection_error(model)
        headers = {"Content-Type": "application/json"}
        if dep.litellm_params.get("api_key"):
            headers["Authorization"] = f"Bearer {dep.litellm_params['api_key']}"
        assert self.session is not None
        stream = bool(body.get("stream")) and route != "/embeddings"
        try:
            resp = await self.session.post(url, data=json.dumps(upstream_body), headers=headers)
        except (aiohttp.ClientError, OSError) as e:
            raise self._connection_error(model) from e
        try:
            if resp.status >= 400:
                text = await resp.text()
                raise self._upstream_error(resp.status, text, model)
            if stream:
                return await self._relay_stream(request, resp, caller, dep, body, route)
            try:
                payload = await resp.json(content_type=None)
            except (json.JSONDecodeError, aiohttp.ContentTypeError) as e:
                raise ProxyError(
                    500, f"litellm.APIError: APIError: OpenAIException - invalid JSON from upstream: {e}", None, None
                ) from e
        except (aiohttp.ClientError, OSError) as e:
            raise self._connection_error(model) from e
        finally:
            resp.release()
        cost = self.record_spend(caller, dep, payload.get("usage"), route)
        return json_response(payload, headers=self._headers(caller, dep, cost))

    def _headers(self, caller: Caller, dep: Deployment, cost: float) -> dict[str, str]:
        h = {
            "x-litellm-model-id": dep.model_id,
            "x-litellm-model-group": dep.model_name,
            "x-litellm-response-cost": str(cost),
            "x-litellm-version": VERSION,
            "x-litellm-call-id": str(uuid.uuid4()),
            "x-litellm-model-api-base": str(dep.litellm_params.get("api_base") or ""),
        }
        if caller.token is not None:
            h["x-litellm-key-spend"] = str(self.current_spend(caller.token))
        return h

    async def _relay_stream(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        caller: Caller,
        dep: Deployment,
        body: dict[str, Any],
        route: str,
    ) -> web.StreamResponse:
        out = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream; charset=utf-8"} | self._headers(caller, dep, 0.0)
        )
        await out.prepare(request)
        usage: dict[str, Any] | None = None
        text_parts: list[str] = []
        buf = b""
        async for chunk in resp.content.iter_any():
            await out.write(chunk)
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                s = line.decode(errors="replace").strip()
                if not s.startswith("data:") or s == "data: [DONE]":
                    continue
                with contextlib.suppress(json.JSONDecodeError):
                    ev = json.loads(s[5:].strip())
                    if ev.get("usage"):
                        usage = ev["usage"]
                    for ch in ev.get("choices") or []:
                        text_parts.append((ch.get("delta") or {}).get("content") or ch.get("text") or "")
        if usage is None:  # LiteLLM counts the tokens itself when the backend sent no usage
            prompt = body.get("prompt") or " ".join(
                str(m.get("content") or "") for m in body.get("messages") or [] if isinstance(m, dict)
            )
            usage = {"prompt_tokens": count_tokens(str(prompt)), "completion_tokens": count_tokens("".join(text_parts))}
        self.record_spend(caller, dep, usage, route)
        await out.write_eof()
        return out

    def _upstream_url(self, dep: Deployment, route: str) -> str | None:
        base = str(dep.litellm_params.get("api_base") or "https://api.openai.com/v1").rstrip("/")
        return self.services.resolve_url(base + route)

    async def _upstream_json(self, dep: Deployment, route: str, body: dict[str, Any]) -> tuple[int, Any]:
        url = self._upstream_url(dep, route)
        if url is None:
            raise aiohttp.ClientConnectionError("Connection error.")
        headers = {}
        if dep.litellm_params.get("api_key"):
            headers["Authorization"] = f"Bearer {dep.litellm_params['api_key']}"
        assert self.session is not None
        async with self.session.post(url, json=body, headers=headers) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except json.JSONDecodeError:
                return resp.status, text

    @staticmethod
    def _connection_error(model: str) -> ProxyError:
        return ProxyError(
            500,
            "litellm.APIConnectionError: APIConnectionError: OpenAIException - Connection error.. "
            f"Received Model Group={model}\nAvailable Model Group Fallbacks=None",
            None,
            None,
        )

    @staticmethod
    def _upstream_error(status: int, text: str, model: str) -> ProxyError:
        names = {
            400: "BadRequestError",
            401: "AuthenticationError",
            403: "PermissionDeniedError",
            404: "NotFoundError",
            408: "Timeout",
            422: "UnprocessableEntityError",
            429: "RateLimitError",
            503: "ServiceUnavailableError",
        }
        cls = names.get(status, "InternalServerError" if status >= 500 else "APIError")
        try:
            parsed = json.loads(text)
            err = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
            detail = err.get("message", err) if isinstance(err, dict) else err
        except json.JSONDecodeError:
            detail = text
        return ProxyError(
            status,
            f"litellm.{cls}: {cls}: OpenAIException - {detail}. Received Model Group={model}\n"
            "Available Model Group Fallbacks=None",
            None,
            None,
        )

    # ------------------------------------------------------------------ keys
    def _find_key(self, value: str) -> dict[str, Any] | None:
        token = hash_token(value) if value.startswith("sk-") else value
        return self.db["keys"].get(token)

    def _alias_taken(self, alias: str, except_token: str | None = None) -> bool:
        return any(r.get("key_alias") == alias and t != except_token for t, r in self.db["keys"].items())

    @staticmethod
    def _validate_key_fields(body: dict[str, Any]) -> None:
        models = body.get("models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
            raise ProxyError(400, "models must be a list of model names", "bad_request_error", "models")
        mb = body.get("max_budget")
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int | float)):
            raise ProxyError(400, "max_budget must be a number", "bad_request_error", "max_budget")
        for f in ("budget_duration", "duration"):
            if body.get(f) is not None:
                try:
                    parse_duration(str(body[f]))
                except ValueError as e:
                    raise ProxyError(400, str(e), "bad_request_error", f) from e

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await read_json(request)
        except ValueError as e:
            raise ProxyError(400, f"Invalid request body: {e}", "bad_request_error") from e
        if not isinstance(body, dict):
            raise ProxyError(400, "Invalid request body: expected a JSON object", "bad_request_error")
        return body

    def _key_view(self, rec: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in rec.items() if not k.startswith("_")}

    async def key_generate(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        body = await self._body(request)
        self._validate_key_fields(body)
        alias = body.get("key_alias")
        if alias is not None and self._alias_taken(alias):
            raise ProxyError(
                400,
                f"Key with alias '{alias}' already exists. Unique key aliases across all keys are required.",
                "bad_request_error",
                "key_alias",
            )
        key = body.get("key") or "sk-" + secrets.token_urlsafe(16)
        if not isinstance(key, str) or not key.startswith("sk-"):
            raise ProxyError(400, "Invalid key format. LiteLLM Virtual Key must start with 'sk-'.", "bad_request_error")
        token = hash_token(key)
        if token in self.db["keys"]:
            raise ProxyError(400, "Unique key required: this key already exists.", "bad_request_error", "key")
        now = _now()
        budget_duration = body.get("budget_duration")
        expires = now + parse_duration(body["duration"]) if body.get("duration") else None
        rec = {
            "token": token,
            "key_name": abbreviate(key),
            "key_alias": alias,
            "spend": 0.0,
            "max_budget": float(body["max_budget"]) if body.get("max_budget") is not None else None,
            "budget_duration": budget_duration,
            "budget_reset_at": _iso(now + parse_duration(budget_duration)) if budget_duration else None,
            "expires": _iso(expires),
            "models": list(body.get("models") or []),
            "aliases": body.get("aliases") or {},
            "config": body.get("config") or {},
            "user_id": body.get("user_id"),
            "team_id": body.get("team_id"),
            "permissions": body.get("permissions") or {},
            "max_parallel_requests": body.get("max_parallel_requests"),
            "metadata": body.get("metadata") or {},
            "tpm_limit": body.get("tpm_limit"),
            "rpm_limit": body.get("rpm_limit"),
            "blocked": None,
            "model_spend": {},
            "model_max_budget": body.get("model_max_budget") or {},
            "soft_budget_cooldown": False,
            "created_at": _iso(now),
            "updated_at": _iso(now),
            "created_by": "default_user_id",
            "updated_by": "default_user_id",
        }
        self.db["keys"][token] = rec
        out = self._key_view(rec) | {
            "key": key,
            "token_id": token,
            "duration": body.get("duration"),
            "litellm_budget_table": None,
        }
        return json_response(out)

    async def key_info(self, request: web.Request) -> web.Response:
        caller = self.authenticate(request)
        value = request.query.get("key")
        if value is None:
            if caller.token is None:
                raise ProxyError(400, "Key not passed in. Pass `key` as a query parameter.", "bad_request_error", "key")
            rec = self.db["keys"].get(caller.token)
            value = caller.token
        else:
            rec = self._find_key(value)
        if rec is None:
            raise ProxyError(404, "Key not found in database.", "not_found_error", "key")
        return json_response({"key": value, "info": self._key_view(rec)})

    async def key_list(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        q = request.query
        recs = list(self.db["keys"].values())
        for field_ in ("key_alias", "user_id", "team_id"):
            if q.get(field_) is not None:
                recs = [r for r in recs if r.get(field_) == q[field_]]
        if q.get("key_hash"):
            recs = [r for r in recs if r["token"] == q["key_hash"]]
        full = q.get("return_full_object", "false").lower() == "true"
        try:
            page = max(1, int(q.get("page", "1")))
            size = max(1, min(100, int(q.get("size", "10"))))
        except ValueError as e:
            raise ProxyError(422, f"Invalid pagination: {e}", "bad_request_error") from e
        total = len(recs)
        chunk = recs[(page - 1) * size : page * size]
        keys: list[Any] = [self._key_view(r) for r in chunk] if full else [r["token"] for r in chunk]
        return json_response(
            {"keys": keys, "total_count": total, "current_page": page, "total_pages": max(1, -(-total // size))}
        )

    async def key_update(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        body = await self._body(request)
        value = body.get("key")
        if not isinstance(value, str):
            raise ProxyError(400, "key is required", "bad_request_error", "key")
        rec = self._find_key(value)
        if rec is None:
            raise ProxyError(404, f"Key not found: {abbreviate(value)}", "not_found_error", "key")
        self._validate_key_fields(body)
        alias = body.get("key_alias")
        if alias is not None and self._alias_taken(alias, except_token=rec["token"]):
            raise ProxyError(
                400,
                f"Key with alias '{alias}' already exists. Unique key aliases across all keys are required.",
                "bad_request_error",
                "key_alias",
            )
        for f in ("models", "key_alias", "metadata", "tpm_limit", "rpm_limit", "max_parallel_requests", "user_id"):
            if f in body:
                rec[f] = body[f]
        if "max_budget" in body:
            rec["max_budget"] = float(body["max_budget"]) if body["max_budget"] is not None else None
        if "budget_duration" in body:
            rec["budget_duration"] = body["budget_duration"]
            rec["budget_reset_at"] = (
                _iso(_now() + parse_duration(body["budget_duration"])) if body["budget_duration"] else None
            )
        if body.get("duration"):
            rec["expires"] = _iso(_now() + parse_duration(body["duration"]))
        if "spend" in body:
            rec["spend"] = float(body["spend"])
        rec["updated_at"] = _iso(_now())
        return json_response({"key": value} | {k: v for k, v in self._key_view(rec).items() if k != "token"})

    async def key_delete(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        body = await self._body(request)
        keys = body.get("keys") or []
        aliases = body.get("key_aliases") or []
        if not isinstance(keys, list) or not isinstance(aliases, list) or not (keys or aliases):
            raise ProxyError(400, "Pass `keys` (or `key_aliases`) as a non-empty list", "bad_request_error", "keys")
        tokens: list[tuple[str, str | None]] = []
        for v in keys:
            rec = self._find_key(str(v))
            tokens.append((str(v), rec["token"] if rec else None))
        for a in aliases:
            tok = next((t for t, r in self.db["keys"].items() if r.get("key_alias") == a), None)
            tokens.append((str(a), tok))
        missing = [abbreviate(v) if v.startswith("sk-") else v for v, t in tokens if t is None]
        if missing:
            raise ProxyError(
                400,
                f"Failed to delete all keys. Keys passed in which were not found in the database: {missing}",
                "bad_request_error",
                "keys",
            )
        for _, tok in tokens:
            self.db["keys"].pop(tok, None)
            self.mem_spend.pop(tok or "", None)
        self.pending = [p for p in self.pending if p[1] not in {t for _, t in tokens}]
        return json_response({"deleted_keys": [v for v, _ in tokens]})

    async def key_regenerate(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        raise ProxyError(
            500,
            f"Internal Server Error, Regenerating Virtual Keys is an Enterprise feature, {NOT_PREMIUM}",
            "internal_server_error",
        )

    # ------------------------------------------------------------------ models (admin)
    async def model_new(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        body = await self._body(request)
        if not self.store_model_in_db:
            raise ProxyError(
                500,
                "Set `'STORE_MODEL_IN_DB='True'` in your env to enable this feature.",
                "internal_server_error",
            )
        name = body.get("model_name")
        params = body.get("litellm_params")
        if not isinstance(name, str) or not name or not isinstance(params, dict) or not params.get("model"):
            raise ProxyError(
                400, "model_name and litellm_params.model are required", "bad_request_error", "litellm_params"
            )
        info = dict(body.get("model_info") or {})
        mid = str(info.get("id") or uuid.uuid4())
        if any(d.model_id == mid for d in self.deployments()):
            raise ProxyError(400, f"Model with id={mid} already exists.", "bad_request_error", "model_info")
        info["id"] = mid
        now = _iso(_now())
        row = {
            "model_id": mid,
            "model_name": name,
            "litellm_params": dict(params),
            "model_info": info,
            "created_at": now,
            "updated_at": now,
            "created_by": "default_user_id",
            "updated_by": "default_user_id",
        }
        self.db["models"].append(row)
        encrypted = {k: (_encrypt_looking(v, self.salt) if isinstance(v, str) else v) for k, v in dict(params).items()}
        return json_response(row | {"litellm_params": encrypted, "model_info": info | {"db_model": True}})

    async def model_info(self, request: web.Request) -> web.Response:
        caller = self.authenticate(request)
        scope = self.key_models(caller)
        deps = self.deployments()
        if scope is not None:
            deps = [d for d in deps if d.model_name in scope]
        mid = request.query.get("litellm_model_id") or request.query.get("model_id")
        if mid:
            deps = [d for d in deps if d.model_id == mid]
        return json_response({"data": [d.public() for d in deps]})

    async def model_delete(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        body = await self._body(request)
        mid = body.get("id")
        rows = self.db["models"]
        idx = next((i for i, r in enumerate(rows) if r["model_id"] == mid), None)
        if idx is None:
            raise ProxyError(400, f"Model with id={mid} not found in db", "bad_request_error", "id")
        rows.pop(idx)
        return json_response({"message": f"Model: {mid} deleted successfully"})

    async def spend_logs(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        return json_response(self.db["spend_logs"][-1000:])


def normalize_route(path: str) -> str:
    p = path.rstrip("/") or "/"
    if p in DATA_ROUTES or p == "/models":
        return "/v1" + p
    if p == "/v1/model/info":
        return "/model/info"
    return p


class _Running:
    def __init__(self, server: AppServer, proxy: LiteLLMProxy) -> None:
        self._server = server
        self.proxy = proxy
        self.port = server.port

    async def stop(self) -> None:
        await self._server.stop()


async def start_litellm(run: ContainerRun, services: SimServices) -> RunningBackend:
    proxy = LiteLLMProxy(run, services)
    server = await serve(proxy.app())
    return _Running(server, proxy)


FACTORIES[IMAGE] = start_litellm
