"""Thin Prefect tasks over :mod:`coder_stack.litellm.admin` and :mod:`coder_stack.usecases.keys`.

Each task opens its own cluster client (``open_api``) and gateway endpoint (``open_endpoint``), reads the
secrets it needs itself, and returns a pydantic report with no key in it. Retries: only
:class:`~coder_stack.errors.RetriableError` (gateway unreachable / 503 / 429, API server hiccups).
"""

from __future__ import annotations

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import KeyUnusable, PreflightError, SpecError
from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.litellm import admin as litellm_admin
from coder_stack.litellm.admin import ModelRegistration, SpendRow
from coder_stack.spec import ModelSpec, StackSpec
from coder_stack.tasks._common import retrying, run_logger
from coder_stack.transport import scrub_url
from coder_stack.usecases.endpoints import open_gateway, read_ref
from coder_stack.usecases.keys import KeyReport, ensure_key


class GatewayHealth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(max_length=500, description="Gateway base URL used (no credentials).")
    ready: bool = Field(description="/health/readiness answered 200.")
    aliases: list[str] = Field(
        default_factory=list, max_length=200, description="Aliases the stack uses, each found in /model/info."
    )


_RETRY = retrying(2, 5, 10)


@task(name="gateway-ready", **_RETRY)
async def gateway_ready_task(target: ClusterTarget, spec: StackSpec) -> GatewayHealth:
    """LiteLLM answers /health/readiness (no auth) and serves every alias the stack calls (/model/info)."""
    log = run_logger()
    aliases = litellm_admin.expected_aliases(spec)
    async with open_api(target) as api, open_gateway(api, spec) as litellm_http:
        await litellm_admin.gateway_ready(litellm_http)
        url = scrub_url(litellm_http.base_url)
        master = await read_ref(api, spec.master_key)
        missing = await litellm_admin.missing_aliases(litellm_http, master, aliases)
    if missing:
        raise PreflightError(
            f"the gateway at {url} has no model named {', '.join(repr(a) for a in missing)} (/model/info): calls "
            "to it answer 400 'Invalid model name', though a key's /v1/models lists it. Add it to the gateway's "
            "proxy_config model_list (or fix the alias in the stack spec); nothing was changed"
        )
    log.info("The LiteLLM gateway at %s is ready and serves %s.", url, ", ".join(aliases))
    return GatewayHealth(url=url, ready=True, aliases=aliases)


@task(name="ensure-keys", **_RETRY)
async def ensure_keys_task(
    target: ClusterTarget, spec: StackSpec, aliases: list[str] | None = None, rotate: bool = False
) -> list[KeyReport]:
    """Mint / keep / correct each client's virtual key and deliver it to its home Secret."""
    log = run_logger()
    key_specs = [spec.key(a) for a in aliases] if aliases is not None else list(spec.virtual_keys)
    reports = []
    async with open_api(target) as api, open_gateway(api, spec) as litellm_http:
        master = await read_ref(api, spec.master_key)
        for ks in key_specs:
            rep = await ensure_key(api, litellm_http, master, spec, ks, rotate=rotate)
            restarted = f"; restarted {rep.consumer}" if rep.consumer_restarted else ""
            ident = f"id {rep.token_id[:12]}..." if rep.token_id else "id not given by the gateway"
            log.info("Key %r: %s (%s) in %s%s.", rep.alias, rep.action, ident, rep.delivered_to, restarted)
            for note in rep.notes:
                (log.info if rep.usable else log.error)("Key %r: %s", rep.alias, note)
            reports.append(rep)
    unusable = [r for r in reports if not r.usable]
    if unusable:
        raise KeyUnusable(
            "; ".join(f"key {r.alias!r} is {r.problem}: {r.notes[-1] if r.notes else ''}" for r in unusable)
        )
    return reports


@task(name="register-model", **_RETRY)
async def register_model_task(target: ClusterTarget, spec: StackSpec, model: ModelSpec) -> ModelRegistration:
    """Register a runtime model (e.g. coder-agent) in LiteLLM once, with the spec's prices."""
    log = run_logger()
    if not model.register_at_runtime:
        raise SpecError(f"{model.name} is defined in the gateway's values (register_at_runtime is false)")
    async with open_api(target) as api, open_gateway(api, spec) as litellm_http:
        master = await read_ref(api, spec.master_key)
        upstream = await read_ref(api, spec.upstream_key)
        reg = await litellm_admin.ensure_model_registered(litellm_http, master, upstream, spec, model)
    if reg.action == "registered":
        log.info("Registered %r in the gateway, routed to %s.", reg.alias, reg.api_base)
    else:
        log.info("%r is already registered in the gateway; nothing added.", reg.alias)
    for w in reg.warnings:
        log.warning("%s", w)
    return reg


@task(name="spend-baseline", **_RETRY)
async def spend_baseline_task(target: ClusterTarget, spec: StackSpec, aliases: list[str]) -> dict[str, float]:
    """Spend per key alias now (USD), to prove later that smoke calls were metered."""
    async with open_api(target) as api, open_gateway(api, spec) as litellm_http:
        master = await read_ref(api, spec.master_key)
        return await litellm_admin.read_spend_baseline(litellm_http, master, aliases)


@task(name="read-spend", **_RETRY)
async def read_spend_task(
    target: ClusterTarget,
    spec: StackSpec,
    aliases: list[str],
    before: dict[str, float] | None = None,
    called: list[str] | None = None,
    streamed: dict[str, list[str]] | None = None,
) -> list[SpendRow]:
    """Per-key spend, waiting (bounded by spec.timeouts.spend_visible_s) for LiteLLM's batched write;
    ``streamed``: per alias, ids of streamed calls whose metering the spend log decides."""
    log = run_logger()
    async with open_api(target) as api, open_gateway(api, spec) as litellm_http:
        master = await read_ref(api, spec.master_key)
        rows = await litellm_admin.read_spend(
            litellm_http,
            master,
            aliases,
            before=before,
            called=called or [],
            streamed=streamed,
            wait_s=spec.timeouts.spend_visible_s,
        )
    for r in rows:
        budget = f" of ${r.max_budget:.2f} ({(r.share_used or 0) * 100:.4f}%)" if r.max_budget else ""
        (log.warning if r.status == "not metered" else log.info)(
            "Key %r: spent $%.6f%s: %s. %s", r.alias, r.spend, budget, r.status, r.note
        )
    return rows


__all__ = [
    "GatewayHealth",
    "ensure_keys_task",
    "gateway_ready_task",
    "read_spend_task",
    "register_model_task",
    "spend_baseline_task",
]
