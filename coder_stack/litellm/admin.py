"""LiteLLM admin API (master key): keys, runtime model registration, spend, readiness.

Every function takes an ``httpx.AsyncClient`` whose ``base_url`` is the gateway (without ``/v1``) — made
with :func:`coder_stack.transport.make_client` — and the master key as ``SecretStr``. Key values only travel
wrapped, in headers and JSON bodies, never in a URL: ``/key/info`` is asked by the key's hash (LiteLLM's
``token`` is the SHA-256 hex of the value, and ``/key/info?key=<hash>`` answers exactly as by value), since an
ingress, a proxy or another gateway version in front of LiteLLM may log query strings.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from coder_stack.errors import EndpointUnavailable, GatewayRequestError
from coder_stack.spec import ModelSpec, StackSpec
from coder_stack.transport import bearer, error_detail, scrub_url

# --------------------------------------------------------------------------------------------- models


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeyRecord(_Report):
    """What the gateway knows about a virtual key — never the key itself.

    LiteLLM gives the hashed id (``token``) only in ``/key/generate`` and ``/key/list`` answers; ``/key/info``
    never carries it, and its display ``key_name`` (``sk-...last4``) is no identifier anywhere (404). So a
    key is addressed by its value (wrapped) or by a ``token`` from those two calls, never by ``key_name``.
    ``/key/info`` answers 200 for dead keys too and says why in ``status`` (``deleted``...).
    """

    token: str | None = Field(
        None, max_length=200, description="LiteLLM's hashed key id (safe to show); None when the answer had none."
    )
    alias: str | None = Field(None, max_length=253, description="key_alias.")
    models: list[str] = Field(default_factory=list, max_length=200, description="Models the key may call.")
    max_budget: float | None = Field(None, ge=0, description="USD cap per period; None = unlimited.")
    budget_duration: str | None = Field(None, max_length=20, description="Budget reset period.")
    budget_reset_at: str | None = Field(None, max_length=60, description="When the budget resets (gateway's time).")
    spend: float = Field(0.0, ge=0, description="USD spent so far (as of the last batched write).")
    status: str = Field(
        "active", max_length=40, description="The gateway's status for the key ('active', 'deleted', ...)."
    )
    blocked: bool = Field(False, description="An admin blocked the key (/key/block).")
    expires: dt.datetime | None = Field(None, description="When the key stops working; None = never.")

    def problem(self, now: dt.datetime | None = None) -> str | None:
        """Why the key cannot be used now, in plain words (``deleted``, ``blocked``, ``expired``, ``over
        budget`` or the gateway's own status); None when it can. LiteLLM 1.108.7 reports a key blocked with
        /key/block as ``status: "revoked", blocked: true``: that is a block (undone by /key/unblock), not a
        deletion, and is called so."""
        if self.status == "deleted":
            return "deleted"
        if self.blocked:
            return "blocked"
        if self.status != "active":
            return self.status
        now = now or dt.datetime.now(dt.UTC)
        if self.expires is not None and self.expires <= now:
            return "expired"
        if self.max_budget is not None and self.spend >= self.max_budget:
            return "over budget"
        return None


class MintedKey(BaseModel):
    """A key just minted: the record plus the value, wrapped. Never log, return from a task, or print it."""

    model_config = ConfigDict(frozen=True)

    record: KeyRecord
    key: SecretStr


class ModelRegistration(_Report):
    alias: str = Field(max_length=200, description="model_name in the gateway.")
    action: Literal["registered", "already-registered"] = Field(description="What this run did.")
    deployments: int = Field(ge=0, le=1000, description="Deployments of this model_name after the call.")
    api_base: str = Field(max_length=500, description="Upstream URL the gateway routes to.")
    warnings: list[str] = Field(default_factory=list, max_length=20, description="e.g. duplicates found.")


class SpendRow(_Report):
    alias: str = Field(max_length=253, description="key_alias.")
    spend: float = Field(ge=0, description="USD spent, as read now.")
    spend_before: float | None = Field(None, ge=0, description="USD spent before the smoke calls, if known.")
    expected_increase: float | None = Field(
        None, ge=0, description="USD the smoke calls should cost (tokens x the gateway's prices), if known."
    )
    max_budget: float | None = Field(None, ge=0, description="USD cap per period.")
    share_used: float | None = Field(None, ge=0, description="spend / max_budget (0..1+).")
    models: list[str] = Field(default_factory=list, max_length=200, description="Key scope.")
    status: Literal[
        "metered", "not metered", "no prices configured", "not moved", "not compared", "no calls", "key not found"
    ] = Field(description="What the numbers mean.")
    waited_s: float = Field(0.0, ge=0, description="How long we waited for the batched spend write.")
    note: str = Field("", max_length=500, description="Plain-words explanation for an operator.")


# --------------------------------------------------------------------------------------------- calls


async def _call(
    gw: httpx.AsyncClient,
    master: SecretStr,
    method: str,
    path: str,
    *,
    what: str,
    params: Mapping[str, str] | None = None,
    body: Mapping[str, Any] | None = None,
    secret_url: bool = False,
    ok_statuses: Iterable[int] = (200,),
) -> httpx.Response:
    """One admin call. Errors name ``what`` was attempted, never the key, the header or a secret URL."""
    where = "the gateway" if secret_url else f"the gateway at {scrub_url(gw.base_url)}"
    try:
        resp = await gw.request(method, path, params=params, json=body, headers=bearer(master))
    except httpx.TransportError as e:
        exc = EndpointUnavailable(
            f"could not {what}: {where} is unreachable ({type(e).__name__}); "
            "check that the litellm pod is Ready and the endpoint (port-forward / URL) is right"
        )
        if secret_url:
            raise exc from None
        raise exc from e
    if resp.status_code in set(ok_statuses):
        return resp
    etype, msg = error_detail(resp.content)
    detail = f"{resp.status_code} {etype}: {msg}".strip()
    if resp.status_code in (429, 500, 502, 503, 504):
        raise EndpointUnavailable(
            f"could not {what}: {where} answered {detail}; retry when the gateway is healthy",
            status=resp.status_code,
            resource=path,
        )
    if resp.status_code in (401, 403):
        raise GatewayRequestError(
            f"could not {what}: {where} refused the master key ({detail}); check the Secret named by "
            "spec.master_key (litellm/litellm-secrets PROXY_MASTER_KEY)",
            status=resp.status_code,
            resource=path,
        )
    raise GatewayRequestError(f"could not {what}: {where} answered {detail}", status=resp.status_code, resource=path)


def _json(resp: httpx.Response, what: str) -> Any:
    try:
        return resp.json()
    except ValueError:
        raise GatewayRequestError(f"could not {what}: the gateway answered with something that is not JSON") from None


def _expires(value: Any) -> dt.datetime | None:
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _record(obj: Mapping[str, Any], token: str | None = None) -> KeyRecord:
    """A record from a /key/generate, /key/list or /key/info object. Only ``token`` (or /key/generate's
    ``token_id``) identifies the key; ``key_name`` is a display string and is ignored."""
    found = obj.get("token") or obj.get("token_id") or token
    spend = obj.get("spend")
    return KeyRecord(
        token=str(found)[:200] if found else None,
        alias=obj.get("key_alias"),
        models=[str(m) for m in obj.get("models") or []],
        max_budget=obj.get("max_budget"),
        budget_duration=obj.get("budget_duration"),
        budget_reset_at=str(obj["budget_reset_at"])[:60] if obj.get("budget_reset_at") else None,
        spend=max(0.0, float(spend)) if isinstance(spend, int | float) else 0.0,
        status=str(obj.get("status") or "active")[:40],
        blocked=bool(obj.get("blocked")),
        expires=_expires(obj.get("expires")),
    )


async def gateway_ready(gw: httpx.AsyncClient) -> None:
    """``/health/readiness`` (no auth). Raises :class:`EndpointUnavailable` if the gateway is not ready."""
    try:
        resp = await gw.get("/health/readiness")
    except httpx.TransportError as e:
        raise EndpointUnavailable(
            f"the gateway at {scrub_url(gw.base_url)} is unreachable ({type(e).__name__}); "
            "check the litellm pod and its Service"
        ) from e
    if resp.status_code != 200:
        _, msg = error_detail(resp.content)
        raise EndpointUnavailable(f"the gateway is not ready: /health/readiness answered {resp.status_code} {msg}")


async def list_keys_by_alias(gw: httpx.AsyncClient, master: SecretStr, alias: str) -> list[KeyRecord]:
    """Every key with this ``key_alias`` (normally 0 or 1)."""
    what = f"look up keys with alias {alias!r}"
    resp = await _call(
        gw, master, "GET", "/key/list", what=what, params={"key_alias": alias, "return_full_object": "true"}
    )
    data = _json(resp, what)
    items = data.get("keys", []) if isinstance(data, dict) else data
    out = []
    for item in items or []:
        if isinstance(item, dict):
            rec = _record(item)
            if rec.alias == alias:
                out.append(rec)
        # bare hashed tokens (return_full_object ignored) carry no alias: resolve them one by one
        elif isinstance(item, str):
            rec2 = await key_info_by_token(gw, master, item)
            if rec2 is not None and rec2.alias == alias:
                out.append(rec2)
    return out


async def key_info_by_token(gw: httpx.AsyncClient, master: SecretStr, token: str) -> KeyRecord | None:
    """Info for a key by its hashed id. None only if the gateway never knew it (404); a deleted key is a
    record with ``status == "deleted"``."""
    what = "read key info"
    resp = await _call(gw, master, "GET", "/key/info", what=what, params={"key": token}, ok_statuses=(200, 404))
    if resp.status_code == 404:
        return None
    return _info_record(resp, what, token)


def key_hash(key: SecretStr) -> str:
    """LiteLLM's ``token`` for a key value: the SHA-256 hex of the value (safe to show and to put in a URL)."""
    return hashlib.sha256(key.get_secret_value().encode()).hexdigest()


async def key_info(gw: httpx.AsyncClient, master: SecretStr, key: SecretStr) -> KeyRecord | None:
    """What the gateway knows about this key value, asked by its hash (no key value in the URL). None only
    if it was never a key (404); a deleted, blocked, expired or spent key is a record whose
    :meth:`KeyRecord.problem` says so. The record has no ``token``: /key/info never returns the hash (use
    :func:`key_hash`)."""
    what = "read key info"
    resp = await _call(gw, master, "GET", "/key/info", what=what, params={"key": key_hash(key)}, ok_statuses=(200, 404))
    if resp.status_code == 404:
        return None
    return _info_record(resp, what, None)


def _info_record(resp: httpx.Response, what: str, token: str | None) -> KeyRecord:
    data = _json(resp, what)
    info = data.get("info") if isinstance(data, dict) else None
    if not isinstance(info, dict):
        raise GatewayRequestError(f"could not {what}: the gateway's answer has no 'info' object")
    return _record(info, token)


async def generate_key(
    gw: httpx.AsyncClient,
    master: SecretStr,
    *,
    alias: str,
    models: list[str],
    max_budget: float,
    budget_duration: str,
) -> MintedKey:
    """``/key/generate``. A duplicate alias is a :class:`GatewayRequestError` (LiteLLM answers 400)."""
    what = f"mint a key with alias {alias!r}"
    body = {"key_alias": alias, "models": models, "max_budget": max_budget, "budget_duration": budget_duration}
    resp = await _call(gw, master, "POST", "/key/generate", what=what, body=body)
    data = _json(resp, what)
    if not isinstance(data, dict) or not data.get("key"):
        raise GatewayRequestError(f"could not {what}: the answer has no key")
    value = SecretStr(str(data.pop("key")))
    rec = _record({**data, "key_alias": data.get("key_alias", alias)})
    return MintedKey(record=rec, key=value)


KeyRef = SecretStr | str
"""How a key is addressed in admin calls: its value (wrapped) or its hashed id from /key/generate or /key/list."""


def _ref(key: KeyRef) -> tuple[str, str]:
    """(the identifier to send, a label fit for a message)."""
    if isinstance(key, SecretStr):
        return key.get_secret_value(), "the key"
    return key, f"key {key[:12]}..."


async def update_key(
    gw: httpx.AsyncClient,
    master: SecretStr,
    key: KeyRef,
    *,
    models: list[str] | None = None,
    max_budget: float | None = None,
    budget_duration: str | None = None,
    alias: str | None = None,
) -> None:
    """``/key/update`` by value or hashed id: scope, budget or alias change; the key value stays the same."""
    ident, label = _ref(key)
    body: dict[str, Any] = {"key": ident}
    if models is not None:
        body["models"] = models
    if max_budget is not None:
        body["max_budget"] = max_budget
    if budget_duration is not None:
        body["budget_duration"] = budget_duration
    if alias is not None:
        body["key_alias"] = alias
    await _call(gw, master, "POST", "/key/update", what=f"update {label}", body=body)


async def delete_keys(gw: httpx.AsyncClient, master: SecretStr, keys: Iterable[KeyRef]) -> None:
    """``/key/delete`` by value or hashed id. Keys already gone count as deleted (safe to run twice):
    LiteLLM answers those with 404 ``{'error': 'No keys found'}``."""
    for key in keys:  # one at a time: LiteLLM refuses the whole batch if one key is already gone
        ident, label = _ref(key)
        resp = await _call(
            gw,
            master,
            "POST",
            "/key/delete",
            what=f"delete {label}",
            body={"keys": [ident]},
            ok_statuses=(200, 400, 404),
        )
        if resp.status_code == 400:
            _, msg = error_detail(resp.content)
            if "not found" not in msg.lower():
                raise GatewayRequestError(f"could not delete {label}: the gateway answered 400: {msg}")


# --------------------------------------------------------------------------------------------- models


async def model_deployments(gw: httpx.AsyncClient, master: SecretStr) -> list[dict[str, Any]]:
    """Every entry of ``/model/info`` (one per deployment; ``model_name`` is its alias)."""
    what = "read /model/info"
    data = _json(await _call(gw, master, "GET", "/model/info", what=what), what)
    items = data.get("data", []) if isinstance(data, dict) else []
    return [i for i in items if isinstance(i, dict)]


async def list_model_deployments(gw: httpx.AsyncClient, master: SecretStr, alias: str) -> list[dict[str, Any]]:
    """Entries of ``/model/info`` whose ``model_name`` is ``alias`` (one per deployment)."""
    return [i for i in await model_deployments(gw, master) if i.get("model_name") == alias]


async def ensure_model_registered(
    gw: httpx.AsyncClient, master: SecretStr, upstream_key: SecretStr, spec: StackSpec, model: ModelSpec
) -> ModelRegistration:
    """Register ``model`` in the gateway with ``/model/new`` unless a deployment of its alias exists.

    Never adds a deployment when one or more exist (a second run registers nothing); more than one is
    reported as a warning, since LiteLLM load-balances across same-name entries.
    """
    api_base = spec.model_incluster_url(model)
    existing = await list_model_deployments(gw, master, model.alias)
    warnings = []
    if len(existing) > 1:
        warnings.append(
            f"{len(existing)} deployments are registered as {model.alias!r}; LiteLLM load-balances across "
            "them. Delete the extra ones (/model/delete) unless that is intended."
        )
    if existing:
        return ModelRegistration(
            alias=model.alias,
            action="already-registered",
            deployments=len(existing),
            api_base=api_base,
            warnings=warnings,
        )
    body = {
        "model_name": model.alias,
        "litellm_params": {
            "model": f"openai/{model.served_model_name}",
            "api_base": api_base,
            "api_key": upstream_key.get_secret_value(),
            "input_cost_per_token": model.input_cost_per_token,
            "output_cost_per_token": model.output_cost_per_token,
        },
        "model_info": {"mode": "chat"},
    }
    await _call(gw, master, "POST", "/model/new", what=f"register model {model.alias!r}", body=body)
    after = await list_model_deployments(gw, master, model.alias)
    return ModelRegistration(
        alias=model.alias, action="registered", deployments=max(1, len(after)), api_base=api_base, warnings=warnings
    )


# --------------------------------------------------------------------------------------------- spend


async def _spend_of(gw: httpx.AsyncClient, master: SecretStr, alias: str) -> KeyRecord | None:
    recs = await list_keys_by_alias(gw, master, alias)
    if not recs:
        return None
    # /key/list may omit spend: confirm from /key/info by hashed id
    token = recs[0].token
    info = await key_info_by_token(gw, master, token) if token else None
    return info or recs[0]


async def spend_logs(gw: httpx.AsyncClient, master: SecretStr, token: str) -> list[dict[str, Any]]:
    """``/spend/logs?api_key=<hash>``: the key's spend-log entries (newest first), refused calls included.
    Each has ``request_id`` (the answer's ``id``), ``spend``, ``total_tokens``, ``status``, ``call_type``."""
    what = "read /spend/logs"
    resp = await _call(gw, master, "GET", "/spend/logs", what=what, params={"api_key": token})
    data = _json(resp, what)
    return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []


FIRST_POLL_S = 0.05


def poll_interval(waited_s: float, poll_s: float) -> float:
    """How long to sleep before reading spend again, ``waited_s`` into a wait for a batched write: a quarter of
    the time waited so far (at least FIRST_POLL_S, at most ``poll_s``). The write lands after an unknown delay
    (LiteLLM's batch period, 10 s by default, plus a few seconds); polls spaced in proportion to the wait see
    it at most a quarter of the wait late, with a handful more reads than a fixed interval: over a 10 s wait
    at poll_s 0.5, about 33 reads instead of 20."""
    return min(poll_s, max(FIRST_POLL_S, waited_s / 4))


async def _until_next_read(start: float, deadline: float, poll_s: float) -> None:
    """Sleep until the next read of a wait that began at ``start`` (monotonic), never past ``deadline``."""
    now = time.monotonic()
    await asyncio.sleep(min(poll_interval(now - start, poll_s), max(0.0, deadline - now)))


async def wait_for_spend_log_entries(
    gw: httpx.AsyncClient,
    master: SecretStr,
    token: str,
    request_ids: Iterable[str],
    *,
    wait_s: float,
    poll_s: float = 0.5,
) -> dict[str, dict[str, Any]]:
    """The spend-log entries of these calls (by the answers' ids), polling until all are there or
    ``wait_s`` has passed: LiteLLM writes the log in batches, seconds after the call."""
    wanted = set(request_ids)
    start = time.monotonic()
    deadline = start + wait_s
    while True:
        found = {e["request_id"]: e for e in await spend_logs(gw, master, token) if e.get("request_id") in wanted}
        if len(found) == len(wanted) or time.monotonic() >= deadline:
            return found
        await _until_next_read(start, deadline, poll_s)


STREAMED_FIM_ADVICE = (
    "this gateway logs streamed /v1/completions (how Tabby calls) at $0 and 0 tokens, so the key's budget does "
    "not limit Tabby: cap the key with rpm_limit/tpm_limit, or use a LiteLLM version that meters streamed "
    "completions (`coder-stack doctor` checks it)"
)


async def probe_streamed_calls(
    gw: httpx.AsyncClient, master: SecretStr, alias: str, request_ids: Iterable[str], *, wait_s: float, poll_s: float
) -> tuple[bool | None, str]:
    """Were these streamed calls metered? Waits (bounded) for their spend-log entries; returns (True: each
    was charged, False: logged at $0 and 0 tokens, None: not logged in time) and a note."""
    wanted = set(request_ids)
    recs = await list_keys_by_alias(gw, master, alias)
    token = recs[0].token if recs else None
    if not wanted or token is None:
        return None, "no spend-log entry to look at (no streamed call id, or the key has no hashed id)"
    found = await wait_for_spend_log_entries(gw, master, token, wanted, wait_s=wait_s, poll_s=poll_s)
    if len(found) < len(wanted):
        return None, f"the spend log had no entry for {len(wanted) - len(found)} streamed call(s) after {wait_s:.0f}s"
    charged = [e for e in found.values() if float(e.get("spend") or 0) > 0 or int(e.get("total_tokens") or 0) > 0]
    if len(charged) == len(found):
        return True, "streamed calls are metered"
    return False, STREAMED_FIM_ADVICE


def _moved_enough(spend: float, before: float, expected: float | None) -> bool:
    if expected is None or expected <= 0:
        return spend > before
    return spend - before >= expected * (1 - 1e-6)


def expected_aliases(spec: StackSpec) -> list[str]:
    """Every alias the stack calls that the gateway must already serve: the models' and the embeddings
    alias when a key uses it (models registered at run time are added by the flows, not expected)."""
    runtime = {m.alias for m in spec.models if m.register_at_runtime}
    used = {m.alias for m in spec.models} | {a for k in spec.virtual_keys for a in k.models}
    return sorted(used - runtime)


async def missing_aliases(gw: httpx.AsyncClient, master: SecretStr, aliases: Iterable[str]) -> list[str]:
    """The aliases with no deployment in ``/model/info``. A key's ``/v1/models`` cannot tell: it echoes the
    key's scope verbatim, aliases the gateway lacks included, and calling one answers 400 "Invalid model
    name"."""
    have = {str(i.get("model_name")) for i in await model_deployments(gw, master)}
    return sorted(set(aliases) - have)


async def model_prices(gw: httpx.AsyncClient, master: SecretStr) -> dict[str, tuple[float, float]]:
    """(input, output) USD per token for each model_name, as the gateway prices it (first deployment)."""
    return prices_of(await model_deployments(gw, master))


def prices_of(deployments: Iterable[Mapping[str, Any]]) -> dict[str, tuple[float, float]]:
    """(input, output) USD per token for each model_name of these ``/model/info`` entries (first one)."""
    out: dict[str, tuple[float, float]] = {}
    for item in deployments:
        if item.get("model_name") in out:
            continue
        info = item.get("model_info") or {}
        params = item.get("litellm_params") or {}

        def price(k: str, info: Any = info, params: Any = params) -> float:
            # model_info carries the price (null when unset); litellm_params too: take the first given
            v = info.get(k) if isinstance(info, dict) else None
            if v is None and isinstance(params, dict):
                v = params.get(k)
            try:
                return float(v or 0.0)
            except (TypeError, ValueError):
                return 0.0

        out[str(item.get("model_name"))] = (price("input_cost_per_token"), price("output_cost_per_token"))
    return out


def expected_cost(prices: Mapping[str, tuple[float, float]], usage: Iterable[tuple[str, int, int]]) -> float:
    """USD the gateway should charge for calls given as (model_name, prompt_tokens, completion_tokens)."""
    return sum(pt * prices.get(m, (0.0, 0.0))[0] + ct * prices.get(m, (0.0, 0.0))[1] for m, pt, ct in usage)


async def read_spend_baseline(gw: httpx.AsyncClient, master: SecretStr, aliases: Iterable[str]) -> dict[str, float]:
    """Spend per alias now, to compare against after smoke calls."""
    out: dict[str, float] = {}
    for alias in aliases:
        rec = await _spend_of(gw, master, alias)
        if rec is not None:
            out[alias] = rec.spend
    return out


async def read_spend(
    gw: httpx.AsyncClient,
    master: SecretStr,
    aliases: Iterable[str],
    *,
    before: Mapping[str, float] | None = None,
    called: Iterable[str] = (),
    expected: Mapping[str, float] | None = None,
    streamed: Mapping[str, list[str]] | None = None,
    wait_s: float = 0.0,
    poll_s: float = 0.5,
) -> list[SpendRow]:
    """Spend per key. For keys in ``called`` (smoke calls were made with them) wait, bounded by
    ``wait_s``, until spend moves past ``before`` (LiteLLM writes spend in batches, ~10 s late) — or, when
    ``expected`` USD is given for the alias, until it has moved by that much (the calls may land in
    different batches). ``streamed`` names, per alias, the ids of streamed calls made the way its consumer
    calls (Tabby streams FIM): their spend-log entries decide whether that way of calling is metered."""
    before = dict(before or {})
    expected = dict(expected or {})
    streamed = dict(streamed or {})
    called_set = set(called)
    aliases = list(aliases)
    deadline = time.monotonic() + wait_s
    start = time.monotonic()
    pending = {a for a in aliases if a in called_set}
    latest: dict[str, KeyRecord | None] = {}
    while True:
        for a in aliases:
            if a in latest and a not in pending:
                continue
            rec = await _spend_of(gw, master, a)
            latest[a] = rec
            if rec is None or a not in before or _moved_enough(rec.spend, before[a], expected.get(a)):
                pending.discard(a)
        if not pending or time.monotonic() >= deadline:
            break
        await _until_next_read(start, deadline, poll_s)
    waited = round(time.monotonic() - start, 3)
    rows = []
    for a in aliases:
        rec = latest.get(a)
        if rec is None:
            rows.append(
                SpendRow(alias=a, spend=0.0, status="key not found", note=f"no key with alias {a!r} in the gateway")
            )
            continue
        share = rec.spend / rec.max_budget if rec.max_budget else None
        prev = before.get(a)
        status, note = _spend_verdict(rec, a in called_set, prev, expected.get(a), waited)
        if a in streamed and status != "no calls":
            metered, how = await probe_streamed_calls(
                gw, master, a, streamed[a], wait_s=max(0.0, deadline - time.monotonic()), poll_s=poll_s
            )
            if metered is False:
                status, note = "not metered", how
            else:
                note = f"{note}; {how}"
        rows.append(
            SpendRow(
                alias=a,
                spend=rec.spend,
                spend_before=prev,
                expected_increase=expected.get(a),
                max_budget=rec.max_budget,
                share_used=share,
                models=rec.models,
                status=status,
                waited_s=waited if a in called_set else 0.0,
                note=note[:500],
            )
        )
    return rows


def _spend_verdict(
    rec: KeyRecord, called: bool, prev: float | None, expected: float | None, waited: float
) -> tuple[Any, str]:
    if not called:
        return "no calls", "no smoke calls were made with this key in this run"
    if prev is None:
        return "not compared", (
            f"spend is ${rec.spend:.6f}; there is no reading from before the calls to compare it with"
        )
    if rec.spend > prev:
        note = f"spend moved from ${prev:.6f} to ${rec.spend:.6f}"
        if expected is not None:
            note += f" (expected +${expected:.6f} from the calls' tokens x the gateway's prices)"
            if not _moved_enough(rec.spend, prev, expected):
                note += "; not all of it is written yet (LiteLLM batches spend writes)"
        return "metered", note
    if rec.spend == 0.0:
        return "no prices configured", (
            f"calls were made but spend stayed $0 after {waited:.1f}s: the models have no "
            "input_cost_per_token/output_cost_per_token in the gateway, so nothing is metered"
        )
    return "not moved", (
        f"spend stayed at ${rec.spend:.6f} for {waited:.1f}s after the calls; LiteLLM writes spend in "
        "batches (PROXY_BATCH_WRITE_AT) — read again later or raise spec.timeouts.spend_visible_s"
    )


__all__ = [
    "FIRST_POLL_S",
    "STREAMED_FIM_ADVICE",
    "KeyRecord",
    "KeyRef",
    "MintedKey",
    "ModelRegistration",
    "SpendRow",
    "delete_keys",
    "ensure_model_registered",
    "expected_aliases",
    "expected_cost",
    "gateway_ready",
    "generate_key",
    "key_hash",
    "key_info",
    "key_info_by_token",
    "list_keys_by_alias",
    "list_model_deployments",
    "missing_aliases",
    "model_deployments",
    "model_prices",
    "poll_interval",
    "prices_of",
    "probe_streamed_calls",
    "read_spend",
    "read_spend_baseline",
    "spend_logs",
    "update_key",
    "wait_for_spend_log_entries",
]
