"""LiteLLM admin API (master key): keys, runtime model registration, spend, readiness.

Every function takes an ``httpx.AsyncClient`` whose ``base_url`` is the gateway (without ``/v1``) — made
with :func:`coder_stack.http.make_client` — and the master key as ``SecretStr``. Key values only travel
wrapped; ``/key/info?key=`` is the one URL that carries a key, so it is never logged nor put in an error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from coder_stack.errors import EndpointUnavailable, GatewayRequestError
from coder_stack.http import bearer, error_detail, scrub_url
from coder_stack.spec import ModelSpec, StackSpec

# --------------------------------------------------------------------------------------------- models


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeyRecord(_Report):
    """What the gateway knows about a virtual key — never the key itself."""

    token: str = Field(max_length=200, description="LiteLLM's hashed key id (safe to show).")
    alias: str | None = Field(None, max_length=253, description="key_alias.")
    models: list[str] = Field(default_factory=list, max_length=200, description="Models the key may call.")
    max_budget: float | None = Field(None, ge=0, description="USD cap per period; None = unlimited.")
    budget_duration: str | None = Field(None, max_length=20, description="Budget reset period.")
    spend: float = Field(0.0, ge=0, description="USD spent so far (as of the last batched write).")


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
    status: Literal["metered", "no prices configured", "not moved", "no calls", "key not found"] = Field(
        description="What the numbers mean."
    )
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
        raise EndpointUnavailable(f"could not {what}: {where} answered {detail}; retry when the gateway is healthy")
    if resp.status_code in (401, 403):
        raise GatewayRequestError(
            f"could not {what}: {where} refused the master key ({detail}); check the Secret named by "
            "spec.master_key (litellm/litellm-secrets PROXY_MASTER_KEY)"
        )
    raise GatewayRequestError(f"could not {what}: {where} answered {detail}")


def _json(resp: httpx.Response, what: str) -> Any:
    try:
        return resp.json()
    except ValueError:
        raise GatewayRequestError(f"could not {what}: the gateway answered with something that is not JSON") from None


def _record(obj: Mapping[str, Any]) -> KeyRecord:
    return KeyRecord(
        token=str(obj.get("token") or obj.get("key_name") or "")[:200],
        alias=obj.get("key_alias"),
        models=[str(m) for m in obj.get("models") or []],
        max_budget=obj.get("max_budget"),
        budget_duration=obj.get("budget_duration"),
        spend=float(obj.get("spend") or 0.0),
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
    """Info for a key by its hashed id (LiteLLM accepts either the key or its hash). None if unknown."""
    what = "read key info"
    resp = await _call(
        gw, master, "GET", "/key/info", what=what, params={"key": token}, ok_statuses=(200, 404), secret_url=True
    )
    if resp.status_code == 404:
        return None
    return _info_record(resp, what, token)


async def key_info(gw: httpx.AsyncClient, master: SecretStr, key: SecretStr) -> KeyRecord | None:
    """What the gateway knows about this key value; None if the gateway does not know it (deleted)."""
    what = "read key info"
    resp = await _call(
        gw,
        master,
        "GET",
        "/key/info",
        what=what,
        params={"key": key.get_secret_value()},
        ok_statuses=(200, 400, 401, 404),
        secret_url=True,
    )
    if resp.status_code != 200:
        return None
    return _info_record(resp, what, None)


def _info_record(resp: httpx.Response, what: str, token: str | None) -> KeyRecord | None:
    data = _json(resp, what)
    info = data.get("info") if isinstance(data, dict) else None
    if not isinstance(info, dict):
        return None
    info = dict(info)
    if not info.get("token"):
        info["token"] = token or ""
    return _record(info)


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


async def update_key(
    gw: httpx.AsyncClient,
    master: SecretStr,
    token: str,
    *,
    models: list[str] | None = None,
    max_budget: float | None = None,
    budget_duration: str | None = None,
    alias: str | None = None,
) -> None:
    """``/key/update`` by hashed id: scope, budget or alias change; the key value stays the same."""
    body: dict[str, Any] = {"key": token}
    if models is not None:
        body["models"] = models
    if max_budget is not None:
        body["max_budget"] = max_budget
    if budget_duration is not None:
        body["budget_duration"] = budget_duration
    if alias is not None:
        body["key_alias"] = alias
    await _call(gw, master, "POST", "/key/update", what=f"update key {token[:12]}...", body=body)


async def delete_keys(gw: httpx.AsyncClient, master: SecretStr, tokens: list[str]) -> None:
    """``/key/delete`` by hashed ids. Keys already gone count as deleted (safe to run twice)."""
    for token in tokens:  # one at a time: LiteLLM refuses the whole batch if one key is already gone
        resp = await _call(
            gw,
            master,
            "POST",
            "/key/delete",
            what=f"delete key {token[:12]}...",
            body={"keys": [token]},
            ok_statuses=(200, 400, 404),
        )
        if resp.status_code == 400:
            _, msg = error_detail(resp.content)
            if "not found" not in msg.lower():
                raise GatewayRequestError(f"could not delete key {token[:12]}...: the gateway answered 400: {msg}")


# --------------------------------------------------------------------------------------------- models


def model_api_base(spec: StackSpec, model: ModelSpec) -> str:
    return f"http://{model.name}.{spec.serving_namespace}.svc.{spec.access.cluster_domain}:{model.port}/v1"


async def list_model_deployments(gw: httpx.AsyncClient, master: SecretStr, alias: str) -> list[dict[str, Any]]:
    """Entries of ``/model/info`` whose ``model_name`` is ``alias`` (one per deployment)."""
    what = "read /model/info"
    resp = await _call(gw, master, "GET", "/model/info", what=what)
    data = _json(resp, what)
    items = data.get("data", []) if isinstance(data, dict) else []
    return [i for i in items if isinstance(i, dict) and i.get("model_name") == alias]


async def ensure_model_registered(
    gw: httpx.AsyncClient, master: SecretStr, upstream_key: SecretStr, spec: StackSpec, model: ModelSpec
) -> ModelRegistration:
    """Register ``model`` in the gateway with ``/model/new`` unless a deployment of its alias exists.

    Never adds a deployment when one or more exist (a second run registers nothing); more than one is
    reported as a warning, since LiteLLM load-balances across same-name entries.
    """
    api_base = model_api_base(spec, model)
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
    info = await key_info_by_token(gw, master, recs[0].token)
    return info or recs[0]


def _moved_enough(spend: float, before: float, expected: float | None) -> bool:
    if expected is None or expected <= 0:
        return spend > before
    return spend - before >= expected * (1 - 1e-6)


async def model_prices(gw: httpx.AsyncClient, master: SecretStr) -> dict[str, tuple[float, float]]:
    """(input, output) USD per token for each model_name, as the gateway prices it (first deployment)."""
    what = "read /model/info"
    data = _json(await _call(gw, master, "GET", "/model/info", what=what), what)
    out: dict[str, tuple[float, float]] = {}
    for item in data.get("data", []) if isinstance(data, dict) else []:
        if not isinstance(item, dict) or item.get("model_name") in out:
            continue
        info = item.get("model_info") or {}
        params = item.get("litellm_params") or {}

        def price(k: str, info: Any = info, params: Any = params) -> float:
            v = info.get(k, params.get(k)) if isinstance(info, dict) else None
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
    wait_s: float = 0.0,
    poll_s: float = 0.5,
) -> list[SpendRow]:
    """Spend per key. For keys in ``called`` (smoke calls were made with them) wait, bounded by
    ``wait_s``, until spend moves past ``before`` (LiteLLM writes spend in batches, ~10 s late) — or, when
    ``expected`` USD is given for the alias, until it has moved by that much (the calls may land in
    different batches)."""
    before = dict(before or {})
    expected = dict(expected or {})
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
            if rec is None or _moved_enough(rec.spend, before.get(a, 0.0), expected.get(a)):
                pending.discard(a)
        if not pending or time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
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
        if a not in called_set:
            status, note = "no calls", "no smoke calls were made with this key in this run"
        elif rec.spend > (prev or 0.0):
            status, note = "metered", f"spend moved from ${prev or 0.0:.6f} to ${rec.spend:.6f}"
            if a in expected:
                note += f" (expected +${expected[a]:.6f} from the calls' tokens x the gateway's prices)"
                if not _moved_enough(rec.spend, prev or 0.0, expected[a]):
                    note += "; not all of it is written yet (LiteLLM batches spend writes)"
        elif rec.spend == 0.0:
            status = "no prices configured"
            note = (
                f"calls were made but spend stayed $0 after {waited:.1f}s: the models have no "
                "input_cost_per_token/output_cost_per_token in the gateway, so nothing is metered"
            )
        else:
            status = "not moved"
            note = (
                f"spend stayed at ${rec.spend:.6f} for {waited:.1f}s after the calls; LiteLLM writes spend in "
                "batches (PROXY_BATCH_WRITE_AT) — read again later or raise spec.timeouts.spend_visible_s"
            )
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
                note=note,
            )
        )
    return rows


__all__ = [
    "KeyRecord",
    "MintedKey",
    "ModelRegistration",
    "SpendRow",
    "delete_keys",
    "ensure_model_registered",
    "expected_cost",
    "gateway_ready",
    "generate_key",
    "key_info",
    "key_info_by_token",
    "list_keys_by_alias",
    "list_model_deployments",
    "model_api_base",
    "model_prices",
    "read_spend",
    "read_spend_baseline",
    "update_key",
]
