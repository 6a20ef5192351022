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
import copy
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
from simstack.standins import litellm_fields as F
from simstack.standins._server import AppServer, Handler, bump, counting_middleware, json_response, read_json, serve
from simstack.standins.vllm import count_tokens

IMAGE = "ghcr.io/berriai/litellm"
VERSION = "1.108.7"
CONFIG_NAMES = ("proxy_config.yaml", "config.yaml", "config.yml", "litellm_config.yaml", "proxy_server_config.yaml")
DATA_ROUTES = {"/chat/completions": "chat", "/completions": "completions", "/embeddings": "embeddings"}
PUBLIC_ROUTES = {"/health/readiness", "/health/liveliness", "/health/liveness", "/"}
NOT_PREMIUM = (
    "You must be a LiteLLM Enterprise user to use this feature. If you have a license please set `LITELLM_LICENSE` "
    "in your env. Get a 7 day trial key here: https://www.litellm.ai/enterprise#trial. \nPricing: "
    "https://www.litellm.ai/#pricing"
)
ACCESS_DENIED = (
    "The requested model '{model}' is not available for this API key, or the model name is invalid. "
    "Check the models available to you and try again."
)
_DURATION_RE = re.compile(r"^(\d+)(s|m|h|d|w|mo)$")


# ------------------------------------------------------------------ field model
# The answers of real LiteLLM 1.108.7 carry many fields the stand-in has no behaviour behind (team, org,
# rotation ... all null/empty for these keys). devtools/simstack/standins/litellm_fields.py declares the field set of
# each answer and the value of every field no logic here decides; an answer is the stand-in's own values molded
# into that declaration. Nothing is read from the recordings: conformance holds the result to them.
_T_GENERATE = F.KEY_GENERATE
_T_INFO = F.KEY_INFO
_T_INFO_DELETED = F.KEY_INFO_DELETED
_T_UPDATE = F.KEY_UPDATE
_T_BLOCK = F.KEY_BLOCK
_T_UNBLOCK = F.KEY_UNBLOCK
_T_LIST_FULL = F.KEY_LIST_FULL
_T_MODEL_NEW_FLAGS = F.MODEL_NEW_FLAGS
_T_MODEL_INFO = F.MODEL_INFO
_T_SPEND_OK = F.SPEND_OK
_T_SPEND_FAIL = F.SPEND_FAIL
_T_SPEND_STREAM = F.SPEND_STREAM
_T_SPEND_V2_OK = F.SPEND_V2_OK
_T_SPEND_V2_FAIL = F.SPEND_V2_FAIL
_KEY_EXTRA = ("_deleted", "_last4")


def mold(value: Any, fields: Any, path: str = "$") -> Any:
    """``value`` with exactly the declared ``fields`` (a field model of litellm_fields), each declared field
    missing from ``value`` at its declared value, with the declared number types.

    A field declared ``REQUIRED`` that ``value`` leaves out (or holds as ``REQUIRED``) is a stand-in bug: the
    logic did not compute it, and the answer is refused rather than filled."""
    if value is F.REQUIRED:
        raise AssertionError(f"LiteLLM stand-in: {path} is declared REQUIRED and nothing computed it")
    if isinstance(fields, dict) and isinstance(value, dict):
        out = {}
        for k, t in fields.items():
            if k in value:
                out[k] = mold(value[k], t, f"{path}.{k}")
            elif t is F.REQUIRED or F.uncomputed(t):
                raise AssertionError(f"LiteLLM stand-in: {path}.{k} is declared REQUIRED and nothing computed it")
            else:
                out[k] = copy.deepcopy(t)
        return out
    if isinstance(fields, bool) or isinstance(value, bool):
        return value
    if isinstance(fields, float) and isinstance(value, int):
        return float(value)
    if isinstance(fields, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if F.uncomputed(value):
        raise AssertionError(f"LiteLLM stand-in: {F.uncomputed(value, path)} declared REQUIRED, not computed")
    return value


def _jsonb(v: Any) -> Any:
    """Postgres jsonb round trip (recorded: spend-logs-v2-dated): 0.0 comes back as 0."""
    if isinstance(v, dict):
        return {k: _jsonb(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonb(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _z(t: str | None) -> str | None:
    """``...+00:00`` -> ``...Z`` (how /key/generate, /key/list and /spend/logs spell times)."""
    if t is None:
        return None
    d = dt.datetime.fromisoformat(t)
    return d.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def _plus(t: str | None) -> str | None:
    """``...+00:00`` with microseconds (how /key/info spells times)."""
    if t is None:
        return None
    d = dt.datetime.fromisoformat(t)
    return d.strftime("%Y-%m-%dT%H:%M:%S.%f") + "+00:00"


def budget_reset_at(start: dt.datetime, duration: str) -> dt.datetime:
    """Recorded (key-info-by-value): created 2026-12-01 08:40 with 30d -> 2027-01-01T00:00:00, i.e. the
    midnight after created + duration. GUESS: the same midnight rounding for s/m/h durations."""
    t = start + parse_duration(duration)
    day = dt.datetime(t.year, t.month, t.day, tzinfo=dt.UTC)
    return day if t == day else day + dt.timedelta(days=1)


class ProxyError(Exception):
    """LiteLLM's ProxyException: ``{"error": {"message", "type", "param", "code": "<status>"}}``."""

    def __init__(self, status: int, message: str, err_type: str | None, param: str | None = "None") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param
        self.extra: dict[str, Any] = {}
        self.headers: dict[str, str] = {}

    def response(self) -> web.Response:
        err = {"message": self.message, "type": self.err_type, "param": self.param, "code": str(self.status)}
        return json_response({"error": err | self.extra}, status=self.status, headers=self.headers or None)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _expired(rec: dict[str, Any]) -> bool:
    expires = rec.get("expires")
    return bool(expires) and dt.datetime.fromisoformat(str(expires)) <= _now()


def _ms(t: dt.datetime) -> dt.datetime:
    """Postgres keeps milliseconds (recorded: key-generate-expiring answers .362256Z, key-info-expired .362000)."""
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


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
        """A /model/info entry on the declared one of its alias (litellm_fields.MODEL_INFO): prices sit both in
        ``litellm_params`` and in ``model_info``; ``api_key`` never shows."""
        if self.model_name in _T_MODEL_INFO:
            tpl = _T_MODEL_INFO[self.model_name]
        else:  # GUESS: other aliases look like the declared ones of their kind
            tpl = _T_MODEL_INFO["coder-agent" if self.db_model else "coder-chat"]
        params = {k: v for k, v in self.litellm_params.items() if k not in ("api_key", "aws_secret_access_key")}
        params |= {k: v for k, v in tpl["litellm_params"].items() if isinstance(v, bool)}
        prices = {k: self.price(k) for k in ("input_cost_per_token", "output_cost_per_token")}
        info = copy.deepcopy(tpl["model_info"]) | dict(self.model_info) | prices
        info |= {
            "id": self.model_id,
            "db_model": self.db_model,
            "key": str(self.litellm_params.get("model") or ""),
            "litellm_provider": self.provider,
            "mode": self.model_info.get("mode"),
            "pricing_overrides": [k for k in prices if k in self.litellm_params],
        }
        if self.provider == "text-completion-openai":
            info["supported_openai_params"] = _T_MODEL_INFO["coder-fim"]["model_info"]["supported_openai_params"]
        for k in ("max_tokens", "max_input_tokens", "max_output_tokens"):
            info[k] = self.model_info.get(k)
        if self.db_model:
            info["blocked"] = False
        else:
            info.pop("blocked", None)
        entry = {"model_name": self.model_name, "litellm_params": params, "model_info": info}
        if missing := F.uncomputed(entry):
            raise AssertionError(f"LiteLLM stand-in: /model/info {missing} declared REQUIRED, not computed")
        return entry


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
        db.setdefault("deleted_keys", {})
        db.setdefault("models", [])
        db.setdefault("spend_logs", [])
        self.db = db
        self.pending: list[tuple[float, str | None, float, dict[str, Any] | None]] = []  # (due, token, cost, log row)
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
        """The batched write (PROXY_BATCH_WRITE_AT): key spend and spend-log rows reach the database late."""
        now = time.monotonic()
        keep = []
        for item in self.pending:
            due, token, cost, log = item
            if everything or due <= now:
                rec = self.db["keys"].get(token) if token else None
                if rec is not None:
                    rec["spend"] = rec.get("spend", 0.0) + cost
                    rec["updated_at"] = rec["last_active"] = _iso(_now())
                if token:
                    self.mem_spend[token] = self.mem_spend.get(token, 0.0) - cost
                if log is not None:
                    self.db["spend_logs"].append(log)
            else:
                keep.append(item)
        self.pending = keep

    def current_spend(self, token: str) -> float:
        rec = self.db["keys"].get(token) or {}
        return float(rec.get("spend", 0.0)) + self.mem_spend.get(token, 0.0)

    def cost_of(self, dep: Deployment, usage: dict[str, Any] | None) -> tuple[float, float]:
        usage = usage or {}
        pt = int(usage.get("prompt_tokens") or 0)
        ct = int(usage.get("completion_tokens") or 0)
        return pt * dep.price("input_cost_per_token"), ct * dep.price("output_cost_per_token")

    def record_spend(
        self,
        caller: Caller,
        dep: Deployment | None,
        usage: dict[str, Any] | None,
        route: str,
        *,
        model: str | None = None,
        error: ProxyError | None = None,
        stream: bool = False,
        started: dt.datetime | None = None,
        request_id: str | None = None,
        user_agent: str = "",
    ) -> float:
        usage = usage or {}
        pt = int(usage.get("prompt_tokens") or 0)
        ct = int(usage.get("completion_tokens") or 0)
        cin, cout = self.cost_of(dep, usage) if dep is not None and error is None else (0.0, 0.0)
        cost = cin + cout
        now = _now()
        rec = self.db["keys"].get(caller.token or "") or {}
        call_id = str(uuid.uuid4())
        log = {
            "request_id": request_id or call_id,
            "litellm_call_id": call_id,
            "call_type": {"/chat/completions": "acompletion", "/completions": "atext_completion"}.get(
                route, "aembedding"
            ),
            "api_key": caller.token or "litellm_proxy_master_key",  # GUESS: what the master key's rows say
            "alias": rec.get("key_alias"),
            "spend": cost,
            "cost_in": cin,
            "cost_out": cout,
            "prompt_tokens": pt,
            "completion_tokens": ct,
            "total_tokens": pt + ct,
            "startTime": _iso(started or now),
            "endTime": _iso(now),
            "model": str(dep.litellm_params.get("model") or "") if dep else "",
            "model_id": dep.model_id if dep else "",
            "model_group": model or (dep.model_name if dep else ""),
            "provider": dep.provider if dep else "",
            "api_base": str(dep.litellm_params.get("api_base") or "") if dep and error is None else "",
            "status": "failure" if error else "success",
            "error": error,
            "stream": stream,
            "user_agent": user_agent,
        }
        log["error"] = (
            {"code": str(error.status), "message": error.message, "class": type(error).__name__} if error else None
        )
        delay = self.services.spend_write_delay_s * self.services.time_scale
        self.pending.append((time.monotonic() + delay, caller.token, cost, log))
        if caller.token is not None:
            self.mem_spend[caller.token] = self.mem_spend.get(caller.token, 0.0) + cost
        return cost

    def _log_template(self, e: dict[str, Any]) -> dict[str, Any]:
        if e["status"] == "failure":
            return _T_SPEND_FAIL
        return _T_SPEND_STREAM if e["stream"] and e["call_type"] == "atext_completion" else _T_SPEND_OK

    def _model_map(self, e: dict[str, Any]) -> dict[str, Any]:
        # The declared model_map_information per alias (litellm_fields.MODEL_MAP, as spend-logs-poll-04 shows
        # it), with the row's model, deployment id and that deployment's prices. GUESS: other aliases look like
        # coder-chat's; a deployment deleted since shows prices 0.
        mmi = copy.deepcopy(F.MODEL_MAP.get(e["model_group"]) or F.MODEL_MAP["coder-chat"])
        mmi["model_map_key"] = e["model"]
        value = mmi["model_map_value"]
        value["key"] = e["model_id"]
        dep = next((d for d in self.deployments() if d.model_id == e["model_id"]), None)
        for k in ("input_cost_per_token", "output_cost_per_token"):
            if k in value:
                value[k] = dep.price(k) if dep else 0.0
        return mmi

    def _log_view(self, e: dict[str, Any]) -> dict[str, Any]:
        """A spend-log row as /spend/logs shows it (recorded: spend-logs-poll-04, spend-fim-stream-logs-poll-03)."""
        tpl = self._log_template(e)
        usage = {"total_tokens": e["total_tokens"], "prompt_tokens": e["prompt_tokens"]}
        usage["completion_tokens"] = e["completion_tokens"]
        ok = e["status"] == "success"
        meta = copy.deepcopy(tpl["metadata"]) | {
            "user_agent": e["user_agent"],
            "user_api_key": e["api_key"],
            "user_api_key_alias": e["alias"],
            "litellm_call_id": e["litellm_call_id"],
            "model_map_information": self._model_map(e),
            "original_model_group": e["model_group"] if ok else None,
            # GUESS: a fixed overhead (the recording has real milliseconds, null for streams and failures)
            "litellm_overhead_time_ms": 1.5
            if ok and not e["stream"] and e["provider"] != "text-completion-openai"
            else None,
        }
        if ok:
            meta["usage_object"] = mold(usage, tpl["metadata"]["usage_object"])
            meta["cost_breakdown"] = tpl["metadata"]["cost_breakdown"] | {
                "input_cost": e["cost_in"],
                "output_cost": e["cost_out"],
                "total_cost": e["spend"],
                "original_cost": e["spend"],
            }
        else:
            err = e["error"] or {}
            meta["error_information"] = tpl["metadata"]["error_information"] | {
                "error_code": err.get("code"),
                "error_message": err.get("message"),
            }
        t0 = dt.datetime.fromisoformat(e["startTime"])
        t1 = dt.datetime.fromisoformat(e["endTime"])
        return {
            "request_id": e["request_id"],
            "call_type": e["call_type"],
            "api_key": e["api_key"],
            "spend": e["spend"],
            "total_tokens": e["total_tokens"],
            "prompt_tokens": e["prompt_tokens"],
            "completion_tokens": e["completion_tokens"],
            "startTime": _z(e["startTime"]),
            "endTime": _z(e["endTime"]),
            "completionStartTime": _z(e["endTime"]),
            "request_duration_ms": int((t1 - t0).total_seconds() * 1000),
            "model": e["model"],
            "model_id": e["model_id"],
            "model_group": e["model_group"],
            "custom_llm_provider": e["provider"],
            "api_base": e["api_base"],
            "status": e["status"],
            "metadata": meta,
            "session_id": str(uuid.uuid5(uuid.NAMESPACE_URL, e["litellm_call_id"])),
            "litellm_call_id": e["litellm_call_id"],
            "created_at": _z(e["endTime"]),
            "updated_at": _z(e["endTime"]),
            "cache_hit": "None" if ok and not e["stream"] else "False",
            "request_tags": (
                [f"User-Agent: {e['user_agent'].split('/')[0]}", f"User-Agent: {e['user_agent']}"]
                if ok and e["user_agent"]
                else []
            ),
        }

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
        r.add_post("/key/block", self.key_block)
        r.add_post("/key/unblock", self.key_unblock)
        r.add_post("/key/regenerate", self.key_regenerate)
        r.add_post("/key/{key}/regenerate", self.key_regenerate)
        r.add_post("/model/new", self.model_new)
        r.add_get("/model/info", self.model_info)
        r.add_get("/v1/model/info", self.model_info)
        r.add_get("/v2/model/info", self.model_info)
        r.add_post("/model/delete", self.model_delete)
        r.add_get("/spend/logs", self.spend_logs)
        r.add_get("/spend/logs/v2", self.spend_logs_v2)
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
        # GUESS: which check comes first for a key both blocked and expired (each was recorded alone)
        if rec.get("blocked"):  # recorded (chat-blocked-key)
            raise ProxyError(
                401, "Authentication Error, Key is blocked. Update via `/key/unblock` if you're an admin.", "auth_error"
            )
        if _expired(rec):  # recorded (chat-expired-key): 401, both times as Python prints them, param the hash's
            now = _now()
            raise ProxyError(
                401,
                f"Authentication Error - Expired Key. Key Expiry time {dt.datetime.fromisoformat(rec['expires'])} "
                f"and current time {now}",
                "expired_key",
                abbreviate(token),
            )
        return Caller(is_master=False, token=token)

    def require_admin(self, request: web.Request) -> Caller:
        # GUESS: a virtual key on an admin route was not recorded (except /key/info, which any key may read:
        # key-info-other-key-as-vkey); the 401 auth_error text is from memory of LiteLLM's route checks.
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
        # GUESS: "/" was not recorded
        return json_response({"message": "LiteLLM: RUNNING"})

    async def readiness(self, request: web.Request) -> web.Response:
        return json_response({"status": "healthy", "db": "connected"})  # recorded: health-readiness

    async def liveliness(self, request: web.Request) -> web.Response:
        return json_response("I'm alive!")

    async def health(self, request: web.Request) -> web.Response:
        # GUESS: /health (which calls every model) was not recorded; its shape is from LiteLLM's docs
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
        # recorded (models-v1-ghost): a key's scope verbatim, aliases that do not exist included
        names = scope if scope is not None else self.model_names()
        infos = {d.model_name: d.model_info for d in self.deployments()}
        data = []
        for name in dict.fromkeys(names):
            entry: dict[str, Any] = {"id": name, "object": "model", "created": 1677610602, "owned_by": "openai"}
            info = infos.get(name) or {}
            if info.get("mode") == "embedding":
                entry["mode"] = "embedding"
            else:
                for k in ("max_input_tokens", "max_output_tokens"):
                    if info.get(k) is not None:
                        entry[k] = info[k]
            data.append(entry)
        return json_response({"data": data, "object": "list"})

    def _check_budget(self, caller: Caller) -> None:
        if caller.token is None:
            return
        rec = self.db["keys"][caller.token]
        max_budget = rec.get("max_budget")
        if max_budget is None:
            return
        written = float(rec.get("spend", 0.0))
        spend = self.current_spend(caller.token)
        if written >= float(max_budget):  # recorded (budget-call-2): after the write, alias and key_name
            who = f"{rec.get('key_alias')} ({rec.get('key_name')})"
        elif spend >= float(max_budget):  # recorded (budget-immediate-call-2): before it, the hash
            who = caller.token
        else:
            return
        raise ProxyError(
            422,
            f"Budget has been exceeded! Key={who} Current cost: {spend if who == caller.token else written}, "
            f"Max budget: {float(max_budget)}",
            "budget_exceeded",
            None,
        )

    def pick(self, model: str) -> Deployment | None:
        deps = [d for d in self.deployments() if d.model_name == model]
        if not deps:
            return None
        return deps[next(self.rr) % len(deps)]

    def _router_error(self, caller: Caller, message: str, param: str | None, echo: bool) -> ProxyError:
        """Recorded (chat-ghost, chat-missing-messages): router 400s carry call-id, cost 0, key spend."""
        err = ProxyError(400, message, "invalid_request_error", param)
        err.extra = {"provider_specific_fields": {"error": message}} if echo else {}
        err.headers = {"x-litellm-call-id": str(uuid.uuid4()), "x-litellm-response-cost": "0"}
        rec = self.db["keys"].get(caller.token or "") or {}
        if rec.get("max_budget") is not None:
            err.headers["x-litellm-key-max-budget"] = str(float(rec["max_budget"]))
        err.headers["x-litellm-key-spend"] = "0.0"
        return err

    async def data_plane(self, request: web.Request) -> web.StreamResponse:
        caller = self.authenticate(request)
        route = normalize_route(request.path).removeprefix("/v1")
        started = _now()
        ua = request.headers.get("User-Agent", "")
        try:
            body = await read_json(request)
        except ValueError as e:
            raise ProxyError(400, f"Invalid request body: {e}", "bad_request_error") from e  # GUESS
        if not isinstance(body, dict):
            raise ProxyError(400, "Invalid request body: expected a JSON object", "bad_request_error")  # GUESS
        model = body.get("model")
        known = self.model_names()
        scope = self.key_models(caller)
        if not caller.is_master and scope is not None and model not in scope:
            # recorded (chat-out-of-scope, chat-unknown-model): 403 for anything outside the scope, and
            # the refusal is logged as a failed call of the key
            err = ProxyError(403, ACCESS_DENIED.format(model=model), "key_model_access_denied", "model")
            dep = self.pick(str(model)) if isinstance(model, str) else None
            self.record_spend(caller, dep, None, route, model=str(model), error=err, started=started, user_agent=ua)
            raise err
        # GUESS: the order scope -> budget -> unknown model is recorded only pairwise (an over-budget key calling
        # a model it lacks, or an alias the gateway lacks, was not recorded)
        self._check_budget(caller)
        if not isinstance(model, str) or model not in known:
            msg = (
                f"{route}: Invalid model name passed in model={model}. Call `/v1/models` to view available models "
                "for your key."
            )
            raise self._router_error(caller, msg, None, echo=True)
        if route == "/chat/completions" and "messages" not in body:
            raise self._router_error(caller, f"{route}: Missing required parameter: 'messages'.", "messages", False)
        dep = self.pick(model)
        assert dep is not None
        bump(self.services.counters, f"litellm:upstream:{model}")
        bump(self.services.counters, f"litellm:deployment:{dep.model_id}")
        upstream_body = dict(body)
        upstream_body["model"] = dep.served_name
        upstream_route = route
        text_model = dep.provider == "text-completion-openai"
        if text_model and route == "/chat/completions":
            # recorded (fim-via-chat): a text-completion model on the chat route gets the messages' content
            # as the raw prompt; the completion comes back as message.content
            upstream_body.pop("messages", None)
            upstream_body["prompt"] = "".join(
                str(m.get("content") or "") for m in body.get("messages") or [] if isinstance(m, dict)
            )
            upstream_route = "/completions"
        url = self._upstream_url(dep, upstream_route)
        if url is None:
            raise self._connection_error(model)
        headers = {"Content-Type": "application/json"}
        if dep.litellm_params.get("api_key"):
            headers["Authorization"] = f"Bearer {dep.litellm_params['api_key']}"
        assert self.session is not None
        stream = bool(body.get("stream")) and route != "/embeddings"
        if stream and route == "/chat/completions" and not text_model:
            upstream_body["stream_options"] = {"include_usage": True}  # LiteLLM meters chat streams itself
        try:
            resp = await self.session.post(url, data=json.dumps(upstream_body), headers=headers)
        except (aiohttp.ClientError, OSError) as e:
            raise self._connection_error(model) from e
        try:
            if resp.status >= 400:
                text = await resp.text()
                raise self._upstream_error(resp.status, text, model)
            if stream:
                return await self._relay_stream(request, resp, caller, dep, body, route, started, ua)
            try:
                payload = await resp.json(content_type=None)
            except (json.JSONDecodeError, aiohttp.ContentTypeError) as e:
                raise ProxyError(  # GUESS
                    500, f"litellm.APIError: APIError: OpenAIException - invalid JSON from upstream: {e}", None, None
                ) from e
        except (aiohttp.ClientError, OSError) as e:
            raise self._connection_error(model) from e
        finally:
            resp.release()
        usage = payload.get("usage") if isinstance(payload, dict) else None
        self.record_spend(caller, dep, usage, route, started=started, request_id=payload.get("id"), user_agent=ua)
        out = self._reshape(payload, model, route, text_model)
        return json_response(out, headers=self._headers(caller, dep, usage, started, route))

    @staticmethod
    def _reshape(payload: dict[str, Any], alias: str, route: str, text_model: bool) -> dict[str, Any]:
        """vLLM's answer as LiteLLM passes it on (recorded: chat-reverse, fim-stop, fim-via-chat, embeddings)."""
        usage = payload.get("usage") or {}
        u3 = {k: usage.get(k) for k in ("completion_tokens", "prompt_tokens", "total_tokens")}
        if route == "/embeddings":
            return {
                "model": alias,
                "data": payload.get("data") or [],
                "object": "list",
                "usage": u3
                | {"completion_tokens": 0, "completion_tokens_details": None, "prompt_tokens_details": None},
            }
        if route == "/completions":
            out = dict(payload) | {"model": alias}
            out["usage"] = u3 | {"completion_tokens_details": None, "prompt_tokens_details": None}
            for k in ("system_fingerprint", "service_tier", "kv_transfer_params", "ec_transfer_params", "metrics"):
                out.setdefault(k, None)
            choices = []
            for ch in payload.get("choices") or []:
                c = {k: ch.get(k) for k in ("stop_reason", "token_ids", "prompt_logprobs", "prompt_token_ids")}
                c |= {"routed_experts": ch.get("routed_experts"), "finish_reason": ch.get("finish_reason")}
                c |= {"index": ch.get("index", 0), "text": ch.get("text"), "logprobs": ch.get("logprobs")}
                choices.append(c)
            out["choices"] = choices
            return out
        if text_model:  # a text completion answered on the chat route (fim-via-chat)
            return {
                "id": payload.get("id"),
                "created": payload.get("created"),
                "model": alias,
                "object": "chat.completion",
                "choices": [
                    {
                        "finish_reason": ch.get("finish_reason"),
                        "index": ch.get("index", 0),
                        "message": {"content": ch.get("text"), "role": "assistant"},
                    }
                    for ch in payload.get("choices") or []
                ],
                "usage": u3,
            }
        choices = []
        for ch in payload.get("choices") or []:
            m = ch.get("message") or {}
            msg: dict[str, Any] = {"content": m.get("content"), "role": m.get("role", "assistant")}
            if m.get("tool_calls"):
                msg["tool_calls"] = [
                    {
                        "function": {"arguments": tc["function"].get("arguments"), "name": tc["function"].get("name")},
                        "id": tc.get("id"),  # recorded (agent-tools-required): vLLM's chatcmpl-tool- id
                        "type": "function",
                    }
                    for tc in m["tool_calls"]
                ]
            msg |= {"provider_specific_fields": {"reasoning": m.get("reasoning")}, "refusal": m.get("refusal")}
            choices.append(
                {
                    "finish_reason": ch.get("finish_reason"),
                    "index": ch.get("index", 0),
                    "message": msg,
                    "provider_specific_fields": {
                        "token_ids": ch.get("token_ids"),
                        "routed_experts": ch.get("routed_experts"),
                        "stop_reason": ch.get("stop_reason"),
                    },
                    "logprobs": ch.get("logprobs"),
                }
            )
        return {
            "id": payload.get("id"),
            "created": payload.get("created"),
            "model": alias,
            "object": "chat.completion",
            "system_fingerprint": payload.get("system_fingerprint"),
            "choices": choices,
            "usage": u3,
        }

    def _headers(
        self,
        caller: Caller,
        dep: Deployment,
        usage: dict[str, Any] | None,
        started: dt.datetime,
        route: str,
        stream: bool = False,
    ) -> dict[str, str]:
        """Recorded x-litellm-* headers: cost parts of this call; key-spend is this call's own cost."""
        cin, cout = self.cost_of(dep, usage) if not stream else (0.0, 0.0)
        text_model = dep.provider == "text-completion-openai"
        ms = str((_now() - started).total_seconds() * 1000)
        h = {
            "x-litellm-call-id": str(uuid.uuid4()),
            "x-litellm-model-id": dep.model_id,
            "x-litellm-model-name": str(dep.litellm_params.get("model") or ""),
        }
        fim_stream = stream and text_model
        if not fim_stream:
            h["x-litellm-model-api-base"] = str(dep.litellm_params.get("api_base") or "")
        h["x-litellm-version"] = VERSION
        if not stream:
            h["x-litellm-response-cost"] = str(cin + cout)
        if not fim_stream:
            h |= {
                "x-litellm-response-cost-original": str(cin + cout),
                "x-litellm-response-cost-discount-amount": "0.0",
                "x-litellm-response-cost-margin-amount": "0.0",
                "x-litellm-response-cost-margin-percent": "0.0",
                "x-litellm-response-cost-input": str(cin),
                "x-litellm-response-cost-output": str(cout),
                "x-litellm-response-cost-tool-usage": "0.0",
            }
        rec = self.db["keys"].get(caller.token or "") or {}
        if rec.get("max_budget") is not None:
            h["x-litellm-key-max-budget"] = str(float(rec["max_budget"]))
        h["x-litellm-key-spend"] = str(cin + cout)
        h["x-litellm-response-duration-ms"] = ms
        if not text_model:
            h["x-litellm-overhead-duration-ms"] = "1.0"
        if not fim_stream:
            h["x-litellm-callback-duration-ms"] = "0.0"
        h |= {
            "x-litellm-model-group": dep.model_name,
            "x-litellm-attempted-retries": "0",
            "x-litellm-attempted-fallbacks": "0",
        }
        return h

    async def _relay_stream(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        caller: Caller,
        dep: Deployment,
        body: dict[str, Any],
        route: str,
        started: dt.datetime,
        ua: str,
    ) -> web.StreamResponse:
        """Reshaped like LiteLLM (recorded: chat-reverse-stream(-usage), fim-stop-stream, agent-tools-required-stream).

        GUESS: more than one choice (n > 1) in a stream; every recorded stream has one."""
        out = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream; charset=utf-8"}
            | self._headers(caller, dep, None, started, route, stream=True),
        )
        await out.prepare(request)
        alias = dep.model_name
        text_route = route == "/completions" or dep.provider == "text-completion-openai"

        async def send(obj: dict[str, Any]) -> None:
            await out.write(f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode())

        usage: dict[str, Any] | None = None
        text_parts: list[str] = []
        finish: str | None = None
        finish_had_content = False
        head: dict[str, Any] = {}
        fingerprint: str | None = None
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                s = line.decode(errors="replace").strip()
                if not s.startswith("data:") or s == "data: [DONE]":
                    continue
                try:
                    ev = json.loads(s[5:].strip())
                except json.JSONDecodeError:
                    continue
                head = head or {"id": ev.get("id"), "created": ev.get("created")}
                fingerprint = ev.get("system_fingerprint") or fingerprint
                if ev.get("usage"):
                    usage = ev["usage"]
                for ch in ev.get("choices") or []:
                    if ch.get("finish_reason"):
                        finish = ch["finish_reason"]
                    if text_route:
                        text_parts.append(ch.get("text") or "")
                        continue
                    delta = ch.get("delta") or {}
                    content = delta.get("content")
                    if content:
                        text_parts.append(content)
                    if "role" in delta:
                        d = {"role": delta["role"], "content": content or ""}
                    elif delta.get("tool_calls"):
                        d = {"tool_calls": []}
                        for tc in delta["tool_calls"]:
                            fn = tc.get("function") or {}
                            t: dict[str, Any] = {}
                            if tc.get("id"):
                                t["id"] = tc["id"]
                            t["function"] = {"arguments": fn.get("arguments") or ""}
                            if fn.get("name"):
                                t["function"]["name"] = fn["name"]
                            t |= {"type": "function", "index": tc.get("index", 0)}
                            d["tool_calls"].append(t)
                    elif content:
                        d = {"content": content}
                        finish_had_content = finish_had_content or bool(ch.get("finish_reason"))
                    else:
                        continue
                    base = {"id": ev.get("id"), "object": "chat.completion.chunk", "created": ev.get("created")}
                    await send(base | {"model": alias, "choices": [{"index": ch.get("index", 0), "delta": d}]})
        base = {"id": head.get("id"), "created": head.get("created"), "model": alias}
        if text_route:
            # recorded (fim-stop-stream): vLLM's empty chunks dropped, the text in one chunk, then the finish;
            # every chunk with zero usage, and the call is not metered (spend 0, tokens 0)
            zero = {"completion_tokens": 0, "prompt_tokens": 0, "total_tokens": 0}
            tbase = {"id": head.get("id"), "object": "text_completion", "created": head.get("created"), "model": alias}
            await send(tbase | {"choices": [{"index": 0, "text": "".join(text_parts)}], "usage": zero})
            await send(tbase | {"choices": [{"finish_reason": finish or "stop", "index": 0}], "usage": zero})
            self.record_spend(
                caller, dep, zero, route, stream=True, started=started, request_id=head.get("id"), user_agent=ua
            )
        else:
            if finish_had_content or finish != "tool_calls":
                await send(
                    base
                    | {"object": "chat.completion.chunk", "system_fingerprint": fingerprint}
                    | {"choices": [{"finish_reason": finish, "index": 0, "delta": {}}]}
                )
            else:
                await send(
                    {"id": head.get("id"), "object": "chat.completion.chunk", "created": head.get("created")}
                    | {"model": alias, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
                )
            if usage is None:  # LiteLLM counts the tokens itself when the backend sent no usage
                prompt = " ".join(
                    str(m.get("content") or "") for m in body.get("messages") or [] if isinstance(m, dict)
                )
                n = count_tokens("".join(text_parts))
                usage = {"prompt_tokens": count_tokens(prompt), "completion_tokens": n}
                usage["total_tokens"] = usage["prompt_tokens"] + n
            cost = self.record_spend(
                caller, dep, usage, route, stream=True, started=started, request_id=head.get("id"), user_agent=ua
            )
            if (body.get("stream_options") or {}).get("include_usage"):
                ct = int(usage.get("completion_tokens") or 0)
                u = {k: usage.get(k) for k in ("completion_tokens", "prompt_tokens", "total_tokens")}
                u |= {"completion_tokens_details": {"reasoning_tokens": 0, "text_tokens": ct}, "cost": cost}
                await send(
                    base
                    | {"object": "chat.completion.chunk", "system_fingerprint": fingerprint}
                    | {"choices": [{"index": 0, "delta": {}}], "usage": u}
                )
        await out.write(b"data: [DONE]\n\n")
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
        # GUESS: an unreachable upstream was not recorded; 500 and this message are from memory of LiteLLM
        return ProxyError(
            500,
            "litellm.APIConnectionError: APIConnectionError: OpenAIException - Connection error.. "
            f"Received Model Group={model}\nAvailable Model Group Fallbacks=None",
            None,
            None,
        )

    @staticmethod
    def _upstream_error(status: int, text: str, model: str) -> ProxyError:
        # GUESS: upstream errors passed through the gateway were not recorded (the recorded 400s come from
        # LiteLLM's own router); status kept and the exception class names are from memory of LiteLLM
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
    def _find_key(self, value: str, deleted: bool = False) -> dict[str, Any] | None:
        """By value (``sk-...``) or by hash. The display ``key_name`` (``sk-...abcd``) is no identifier: it
        hashes to nothing (recorded: key-info-by-key-name, key-update-by-key-name, key-delete-by-key-name)."""
        token = hash_token(value) if value.startswith("sk-") else value
        rec = self.db["keys"].get(token)
        if rec is None and deleted:
            rec = self.db["deleted_keys"].get(token)
        return rec

    def _alias_taken(self, alias: str, except_token: str | None = None) -> bool:
        return any(r.get("key_alias") == alias and t != except_token for t, r in self.db["keys"].items())

    @staticmethod
    def _validate_key_fields(body: dict[str, Any]) -> None:
        # GUESS: the validation messages (no recording sends a malformed key body).
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

    @staticmethod
    def _key_view(rec: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in rec.items() if not k.startswith("_")}
        out["total_spend"] = out.get("spend", 0.0)
        return out

    def _info_view(self, rec: dict[str, Any]) -> dict[str, Any]:
        """/key/info's ``info``: never the hashed ``token`` (recorded: key-info-by-value/-by-hash/-self)."""
        v = self._key_view(rec)
        v.pop("token", None)
        for f in ("created_at", "updated_at", "settings_updated_at", "last_active", "budget_reset_at", "expires"):
            v[f] = _plus(v.get(f))
        deleted = rec.get("_deleted")
        if deleted:
            v |= deleted | {"deleted_at": _plus(deleted["deleted_at"]), "status": "deleted"}
            return mold(v, _T_INFO_DELETED)
        # recorded (key-info-blocked, key-info-expired): a blocked key is "revoked", an expired one "expired"
        # GUESS: "revoked" wins over "expired" for a key both blocked and expired
        status = "revoked" if rec.get("blocked") else "expired" if _expired(rec) else "active"
        return mold(v | {"status": status}, _T_INFO)

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
            # GUESS: the message for a custom key without the sk- prefix
            raise ProxyError(400, "Invalid key format. LiteLLM Virtual Key must start with 'sk-'.", "bad_request_error")
        token = hash_token(key)
        if token in self.db["keys"]:
            raise ProxyError(400, "Unique key required: this key already exists.", "bad_request_error", "key")  # GUESS
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
            "budget_reset_at": _iso(budget_reset_at(now, budget_duration)) if budget_duration else None,
            "expires": _iso(_ms(expires)) if expires else None,
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
            "settings_updated_at": None,
            "last_active": None,
            "created_by": "default_user_id",
            "updated_by": "default_user_id",
        }
        self.db["keys"][token] = rec
        # recorded (key-generate-*): no status, no budget_reset_at; times as ...Z; token and token_id
        view = self._key_view(rec)
        view |= {f: _z(view.get(f)) for f in ("created_at", "updated_at", "expires")}
        # recorded (key-generate-expiring): `duration` comes back null even when it was sent
        out = view | {"key": key, "token_id": token, "duration": None, "litellm_budget_table": None}
        out["expires"] = _z(_iso(expires))  # the answer has the value before the database rounded it
        return json_response(mold(out, _T_GENERATE))

    async def key_info(self, request: web.Request) -> web.Response:
        # recorded (key-info-other-key-as-vkey): any virtual key may read any key's info
        caller = self.authenticate(request)
        value = request.query.get("key")
        if value is None:
            if caller.token is None:
                # GUESS: the master key's self lookup
                raise ProxyError(404, "Key not found in database", "not_found_error", "key")
            rec = self.db["keys"].get(caller.token)
            value = caller.token  # recorded (key-info-self): the top-level key is the hash
        else:
            rec = self._find_key(value, deleted=True)
        if rec is None:
            raise ProxyError(404, "Key not found in database", "not_found_error", "key")
        return json_response({"key": value, "info": self._info_view(rec)})

    async def key_list(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        q = request.query
        recs = list(self.db["keys"].values())  # deleted keys are not listed (recorded: key-list-deleted-alias)
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
            raise ProxyError(422, f"Invalid pagination: {e}", "bad_request_error") from e  # GUESS
        total = len(recs)
        chunk = recs[(page - 1) * size : page * size]
        keys: list[Any] = []
        for r in chunk:
            if not full:
                keys.append(r["token"])
                continue
            v = self._key_view(r)
            times = ("created_at", "updated_at", "settings_updated_at", "last_active", "budget_reset_at", "expires")
            v |= {f: _z(v.get(f)) for f in times}
            keys.append(mold(v, _T_LIST_FULL))
        # recorded (key-list-deleted-alias): total_pages 0 when nothing matches
        return json_response(
            {"keys": keys, "total_count": total, "current_page": page, "total_pages": -(-total // size)}
        )

    async def key_update(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        body = await self._body(request)
        value = body.get("key")
        if not isinstance(value, str):
            raise ProxyError(400, "key is required", "bad_request_error", "key")  # GUESS
        rec = self._find_key(value)
        if rec is None:
            raise ProxyError(404, "Key not found.", "not_found_error", "key")
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
                _iso(budget_reset_at(_now(), body["budget_duration"])) if body["budget_duration"] else None
            )
        if body.get("duration"):
            rec["expires"] = _iso(_now() + parse_duration(body["duration"]))
        if "spend" in body:
            rec["spend"] = float(body["spend"])
        rec["updated_at"] = rec["settings_updated_at"] = _iso(_now())
        # recorded (key-update-by-value/-by-hash): key as sent, token, the info fields without status
        view = self._info_view(rec)
        view.pop("status", None)
        return json_response(mold({"key": value, "token": rec["token"]} | view, _T_UPDATE))

    async def key_delete(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        body = await self._body(request)
        keys = body.get("keys") or []
        aliases = body.get("key_aliases") or []
        if not isinstance(keys, list) or not isinstance(aliases, list) or not (keys or aliases):
            # GUESS: the message for an empty delete
            raise ProxyError(400, "Pass `keys` (or `key_aliases`) as a non-empty list", "bad_request_error", "keys")
        found: list[str] = []
        for v in keys:
            rec = self._find_key(str(v))
            if rec is not None:
                found.append(rec["token"])
        for a in aliases:
            found += [t for t, r in self.db["keys"].items() if r.get("key_alias") == a]
        if not found:
            # recorded (key-delete-by-value-again, key-delete-never-minted, key-delete-by-key-name)
            raise ProxyError(404, "{'error': 'No keys found'}", "internal_server_error", None)
        # GUESS: a mixture of found and unknown keys deletes the found ones and answers 200
        now = _iso(_now())
        for tok in dict.fromkeys(found):
            rec = self.db["keys"].pop(tok)
            rec["_deleted"] = {
                "id": str(uuid.uuid4()),
                "org_id": None,
                "deleted_at": now,
                "deleted_by": "default_user_id",
                "deleted_by_api_key": "litellm_proxy_master_key",
                "litellm_changed_by": None,
            }
            self.db["deleted_keys"][tok] = rec
            self.mem_spend.pop(tok, None)
        self.pending = [p for p in self.pending if p[1] not in found]
        # recorded: deleted_keys is exactly what was sent (values, hashes or the aliases)
        return json_response({"deleted_keys": [*keys, *aliases]})

    async def _set_blocked(self, request: web.Request, blocked: bool, template: dict[str, Any]) -> web.Response:
        """/key/block and /key/unblock by value or hash (recorded: key-block, key-unblock): 200 with the whole
        key row, times as ...Z. GUESS: the 404 for a key that is not there (not recorded)."""
        self.require_admin(request)
        body = await self._body(request)
        value = body.get("key")
        rec = self._find_key(value) if isinstance(value, str) else None
        if rec is None:
            raise ProxyError(404, "Key not found.", "not_found_error", "key")
        rec["blocked"] = blocked
        rec["updated_at"] = rec["settings_updated_at"] = _iso(_now())
        view = self._key_view(rec)
        times = ("created_at", "updated_at", "settings_updated_at", "last_active", "budget_reset_at", "expires")
        view |= {f: _z(view.get(f)) for f in times}
        return json_response(mold(view, template))

    async def key_block(self, request: web.Request) -> web.Response:
        return await self._set_blocked(request, True, _T_BLOCK)

    async def key_unblock(self, request: web.Request) -> web.Response:
        return await self._set_blocked(request, False, _T_UNBLOCK)

    async def key_regenerate(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        raise ProxyError(
            500, f"Regenerating Virtual Keys is an Enterprise feature, {NOT_PREMIUM}", "internal_server_error", None
        )

    # ------------------------------------------------------------------ models (admin)
    async def model_new(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        body = await self._body(request)
        if not self.store_model_in_db:
            # GUESS: no recording without store_model_in_db
            raise ProxyError(
                500,
                "Set `'STORE_MODEL_IN_DB='True'` in your env to enable this feature.",
                "internal_server_error",
            )
        name = body.get("model_name")
        params = body.get("litellm_params")
        if not isinstance(name, str) or not name or not isinstance(params, dict) or not params.get("model"):
            raise ProxyError(  # GUESS
                400, "model_name and litellm_params.model are required", "bad_request_error", "litellm_params"
            )
        info = dict(body.get("model_info") or {})
        mid = str(info.get("id") or uuid.uuid4())  # recorded (model-new-again): the same body twice, two rows
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
        enc = {
            k: (_encrypt_looking(v, self.salt) if k in ("model", "api_base", "api_key") and isinstance(v, str) else v)
            for k, v in dict(params).items()
        }
        flags = dict(_T_MODEL_NEW_FLAGS)
        out = row | {
            "litellm_params": enc | flags,
            # recorded: db_model false in this answer, true in /model/info
            "model_info": info | {"db_model": False, "member_auto_router": False},
            "blocked": False,
            "created_at": _z(now),
            "updated_at": _z(now),
        }
        return json_response(out)

    async def model_info(self, request: web.Request) -> web.Response:
        caller = self.authenticate(request)
        scope = self.key_models(caller)
        deps = self.deployments()
        if scope is not None:
            deps = [d for d in deps if d.model_name in scope]  # GUESS: a scoped key sees its models only
        mid = request.query.get("litellm_model_id") or request.query.get("model_id")
        if mid:
            deps = [d for d in deps if d.model_id == mid]
            if not deps:
                # recorded (model-info-unknown-id): FastAPI's detail, not LiteLLM's error object
                return json_response({"detail": {"error": f"Model id = {mid} not found on litellm proxy"}}, 400)
        return json_response({"data": [d.public() for d in deps]})

    async def model_delete(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        body = await self._body(request)
        mid = body.get("id")
        rows = self.db["models"]
        idx = next((i for i, r in enumerate(rows) if r["model_id"] == mid), None)
        if idx is None:
            # recorded (model-delete-unknown): type auth_error, param "None"
            raise ProxyError(400, f"{{'error': 'Model with id={mid} not found in db'}}", "auth_error")
        rows.pop(idx)
        return json_response({"message": f"Model: {mid} deleted successfully"})

    # ------------------------------------------------------------------ spend logs
    def _token_of(self, value: str) -> str:
        return hash_token(value) if value.startswith("sk-") else value

    async def spend_logs(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        logs = self.db["spend_logs"]
        api_key = request.query.get("api_key")
        if api_key:
            # recorded (spend-logs-by-key-value): the hash or the raw key
            token = self._token_of(api_key)
            logs = [e for e in logs if e["api_key"] == token]
        # recorded: newest first
        return json_response([mold(self._log_view(e), self._log_template(e)) for e in reversed(logs[-1000:])])

    async def spend_logs_v2(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        q = request.query
        if not q.get("start_date") or not q.get("end_date"):
            raise ProxyError(400, "Start date and end date are required", "bad_request")
        try:
            start = dt.datetime.fromisoformat(q["start_date"]).replace(tzinfo=dt.UTC)
            end = dt.datetime.fromisoformat(q["end_date"]).replace(tzinfo=dt.UTC)
            page = max(1, int(q.get("page", "1")))
            size = max(1, min(100, int(q.get("page_size", "50"))))
        except ValueError as exc:
            raise ProxyError(400, f"Invalid query: {exc}", "bad_request") from exc  # GUESS
        logs = [
            row
            for row in reversed(self.db["spend_logs"])
            if start <= dt.datetime.fromisoformat(row["startTime"]) <= end
        ]
        if q.get("api_key"):
            token = self._token_of(q["api_key"])
            logs = [row for row in logs if row["api_key"] == token]
        total = len(logs)
        chunk = logs[(page - 1) * size : page * size]
        data = []
        for row in chunk:
            v = self._log_view(row)
            for f, src in (("startTime", "startTime"), ("endTime", "endTime"), ("completionStartTime", "endTime")):
                d = dt.datetime.fromisoformat(row[src])
                v[f] = d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}+00:00"
            molded = mold(v, _T_SPEND_V2_OK if row["status"] == "success" else _T_SPEND_V2_FAIL)
            data.append(molded | {"metadata": _jsonb(molded["metadata"])})
        return json_response(
            {
                "data": data,
                "total": total,
                "page": page,
                "page_size": size,
                "total_pages": -(-total // size),
                "total_is_capped": False,
            }
        )


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
