"""Thin Prefect tasks over the smokes (:mod:`coder_stack.vllm.smoke`, :mod:`coder_stack.litellm.smoke`,
:mod:`coder_stack.usecases.frontends`): open the cluster client and endpoints, read the keys from their
homes, smoke, and return reports without secrets. ``SmokeFailed`` is permanent (no retry);
only :class:`~coder_stack.errors.RetriableError` is retried. No ``gpu`` tag: these run inside a GPU session.
"""

from __future__ import annotations

import httpx
from prefect import task
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from coder_stack.errors import SmokeFailed, SpecError
from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.kubernetes.exec import exec_in_deployment
from coder_stack.litellm import smoke as litellm_smoke
from coder_stack.litellm.admin import SpendRow, expected_cost, model_prices, read_spend, read_spend_baseline
from coder_stack.probe import SmokeResult
from coder_stack.spec import ClientKeySpec, ModelSpec, StackSpec
from coder_stack.tasks._common import retrying, run_logger
from coder_stack.transport import make_client, scrub_url
from coder_stack.usecases import frontends
from coder_stack.usecases.endpoints import open_endpoint, open_gateway, read_ref
from coder_stack.usecases.keys import read_client_key
from coder_stack.vllm import smoke as vllm_smoke


class MeteredSmoke(BaseModel):
    """A smoke through a virtual key, and what the gateway metered for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    smoke: SmokeResult = Field(description="What was checked and how long it took.")
    spend: SpendRow | None = Field(None, description="The key's spend after the calls (None if not checked).")


_RETRY = retrying(3, 10)


def _key_spec(spec: StackSpec, model: ModelSpec, key_alias: str | None) -> ClientKeySpec:
    if key_alias is not None:
        return spec.key(key_alias)
    ks = spec.key_for_model(model)
    if ks is None:
        raise SpecError(f"no key in spec.virtual_keys is scoped to {model.alias!r}; add one or pass key_alias")
    return ks


def _log_result(res: SmokeResult) -> None:
    log = run_logger()
    ttft = f", first token after {res.ttft_s:.3f}s" if res.ttft_s is not None else ""
    via = f" through key {res.key_alias!r}" if res.key_alias else ""
    log.info("Smoke %s of %s%s passed in %.2fs%s: %s.", res.kind, res.target, via, res.total_s, ttft,
             "; ".join(c.name for c in res.checks))  # fmt: skip
    for d in res.diagnostics:
        log.warning("Diagnostic for %s: %s", res.target, d)


def _log_spend(row: SpendRow | None) -> None:
    if row is None:
        return
    log = run_logger()
    if row.status == "metered":
        log.info("Key %r is metered: %s.", row.alias, row.note)
    else:
        log.warning("Key %r: %s. %s", row.alias, row.status, row.note)


async def _metered(
    litellm_http: httpx.AsyncClient,
    master: SecretStr,
    spec: StackSpec,
    alias: str,
    res: SmokeResult,
    before: dict[str, float] | None,
) -> SpendRow:
    """The key's spend after the smoke, waiting for the calls' expected cost (tokens x gateway prices)."""
    prices = await model_prices(litellm_http, master)
    cost = expected_cost(prices, [(u.model, u.prompt_tokens, u.completion_tokens) for u in res.usage])
    rows = await read_spend(
        litellm_http,
        master,
        [alias],
        before=before,
        called=[alias],
        expected={alias: cost},
        wait_s=spec.timeouts.spend_visible_s,
    )
    return rows[0]


@task(name="smoke-direct", **_RETRY)
async def smoke_direct_task(target: ClusterTarget, spec: StackSpec, model: ModelSpec) -> SmokeResult:
    """The model pod itself, with the shared vLLM key: /health, served name, one streamed completion."""
    async with open_api(target) as api:
        vllm_key = await read_ref(api, spec.vllm_key)
        async with open_endpoint(api, spec, model.name) as base_url, make_client(spec.timeouts) as http:
            run_logger().info("Smoking %s directly at %s.", model.name, scrub_url(base_url))
            res = await vllm_smoke.smoke_direct(http, base_url, vllm_key, model, spec.timeouts)
    _log_result(res)
    return res


@task(name="smoke-gateway", **_RETRY)
async def smoke_gateway_task(
    target: ClusterTarget,
    spec: StackSpec,
    model: ModelSpec,
    key_alias: str | None = None,
    check_spend: bool = True,
) -> MeteredSmoke:
    """The model through the gateway with a client's own key (read from its home), then its metered spend."""
    ks = _key_spec(spec, model, key_alias)
    async with open_api(target) as api, open_gateway(api, spec) as litellm_http:
        client_key = await read_client_key(api, spec, ks.alias)
        master = await read_ref(api, spec.master_key)
        before = await read_spend_baseline(litellm_http, master, [ks.alias]) if check_spend else None
        res = await litellm_smoke.smoke_gateway(litellm_http, str(litellm_http.base_url), client_key, ks, model, spec)
        spend = await _metered(litellm_http, master, spec, ks.alias, res, before) if check_spend else None
    _log_result(res)
    _log_spend(spend)
    return MeteredSmoke(smoke=res, spend=spend)


@task(name="smoke-agent", **_RETRY)
async def smoke_agent_task(
    target: ClusterTarget,
    spec: StackSpec,
    model: ModelSpec,
    key_alias: str | None = None,
    check_spend: bool = True,
) -> MeteredSmoke:
    """A real tool loop through the gateway with the agent's key (from the keystore Secret)."""
    if model.role != "agent":
        raise SpecError(f"{model.name} has role {model.role!r}; the tool-loop smoke is for agent models")
    ks = _key_spec(spec, model, key_alias)
    async with open_api(target) as api, open_gateway(api, spec) as litellm_http:
        agent_key = await read_client_key(api, spec, ks.alias)
        master = await read_ref(api, spec.master_key)
        before = await read_spend_baseline(litellm_http, master, [ks.alias]) if check_spend else None
        res = await litellm_smoke.smoke_agent(
            litellm_http, str(litellm_http.base_url), agent_key, model, spec.timeouts, key_alias=ks.alias
        )
        spend = await _metered(litellm_http, master, spec, ks.alias, res, before) if check_spend else None
    _log_result(res)
    _log_spend(spend)
    return MeteredSmoke(smoke=res, spend=spend)


@task(name="smoke-frontends", **_RETRY)
async def smoke_frontends_task(
    target: ClusterTarget, spec: StackSpec, openwebui: bool = True, tabby: bool = True
) -> SmokeResult:
    """Open WebUI's own environment lists its key's models; Tabby's configured key completes FIM via the gateway.

    Open WebUI must be Ready; for ``tabby`` the FIM model must be serving.
    """
    async with open_api(target) as api, open_gateway(api, spec) as litellm_http:
        try:
            res = await frontends.smoke_frontends(
                api,
                spec,
                exec_in_deployment,
                str(litellm_http.base_url),
                http=litellm_http,
                openwebui=openwebui,
                tabby=tabby,
            )
        except SmokeFailed as e:
            run_logger().error("Front-end smoke failed at the %s hop: %s", e.hop, e.message)
            raise
    _log_result(res)
    return res


__all__ = [
    "MeteredSmoke",
    "smoke_agent_task",
    "smoke_direct_task",
    "smoke_frontends_task",
    "smoke_gateway_task",
]
