"""Gateway admin calls and gateway smokes against the LiteLLM stand-in routing to vLLM stand-ins (real HTTP).

The stand-ins are started directly (no simulated cluster): LiteLLM gets the simulated cluster's own
proxy_config, vLLM stand-ins answer for the in-cluster Service names.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

import httpx
import pytest
from pydantic import SecretStr

from coder_stack.errors import EndpointUnavailable, GatewayRequestError, SmokeFailed
from coder_stack.litellm import admin as gateway
from coder_stack.litellm.smoke import smoke_agent, smoke_gateway
from coder_stack.probe import SmokeResult
from coder_stack.spec import ClientKeySpec, StackSpec, Timeouts
from coder_stack.transport import make_client
from tests.kits.gateway import GwStack, gateway_stack

MASTER = "sk-master-gw-test-0123456789abcdef"
UPSTREAM = "upstream-gw-test-key-0123456789"
SPEC = StackSpec(timeouts=Timeouts(spend_visible_s=5, request_s=20))
EMBED_PRICE = 2e-8  # the simulated cluster's proxy_config prices embeddings at this


def local_stack(spec: StackSpec = SPEC) -> AbstractAsyncContextManager[GwStack]:
    return gateway_stack(spec, master=MASTER, upstream=UPSTREAM)


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[GwStack]:
    async with local_stack() as st:
        yield st


@pytest.fixture
async def gw(stack: GwStack) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(SPEC.timeouts, base_url=stack.url, backoff_s=0.05, max_wait_s=0.5) as c:
        yield c


M = SecretStr(MASTER)
_n = 0


async def mint(gw: httpx.AsyncClient, models: list[str], budget: float = 5.0) -> tuple[ClientKeySpec, SecretStr]:
    global _n
    _n += 1
    ks = ClientKeySpec(alias=f"test-key-{_n}", models=models, max_budget=budget)
    minted = await gateway.generate_key(
        gw, M, alias=ks.alias, models=ks.models, max_budget=ks.max_budget, budget_duration=ks.budget_duration
    )
    return ks, minted.key


def prices(spec: StackSpec) -> dict[str, tuple[float, float]]:
    out = {m.alias: (m.input_cost_per_token, m.output_cost_per_token) for m in spec.models}
    out[spec.embeddings_alias] = (EMBED_PRICE, 0.0)
    return out


def expected_spend(res: SmokeResult, spec: StackSpec = SPEC) -> float:
    p = prices(spec)
    return sum(u.prompt_tokens * p[u.model][0] + u.completion_tokens * p[u.model][1] for u in res.usage)


# ---------------------------------------------------------------------------------------------- admin


async def test_gateway_ready_and_gateway_down() -> None:
    async with (
        local_stack() as st,
        make_client(SPEC.timeouts, base_url=st.url) as c,
    ):
        await gateway.gateway_ready(c)
    async with make_client(SPEC.timeouts, base_url="http://127.0.0.1:9", backoff_s=0.01, max_wait_s=0.1) as c:
        with pytest.raises(EndpointUnavailable, match="unreachable"):
            await gateway.gateway_ready(c)


async def test_key_lifecycle_by_alias_and_the_key_never_in_errors(gw: httpx.AsyncClient) -> None:
    ks, key = await mint(gw, ["coder-chat"])
    [rec] = await gateway.list_keys_by_alias(gw, M, ks.alias)
    assert rec.models == ["coder-chat"] and rec.max_budget == 5.0
    info = await gateway.key_info(gw, M, key)
    # /key/info never carries the hash (recorded: key-info-*); /key/list does
    assert info is not None and info.alias == ks.alias and info.token is None and rec.token
    await gateway.update_key(gw, M, rec.token, models=["coder-chat", "coder-fim"], max_budget=2.0)
    info2 = await gateway.key_info(gw, M, key)
    assert info2 is not None and sorted(info2.models) == ["coder-chat", "coder-fim"] and info2.max_budget == 2.0
    with pytest.raises(GatewayRequestError, match="already exists") as ei:
        await mint_alias(gw, ks.alias)
    assert key.get_secret_value() not in str(ei.value)
    await gateway.delete_keys(gw, M, [rec.token])
    await gateway.delete_keys(gw, M, [rec.token])  # twice: already gone counts as deleted
    gone = await gateway.key_info(gw, M, key)  # still 200, status "deleted" (recorded: key-info-deleted-*)
    assert gone is not None and gone.problem() == "deleted"
    assert await gateway.list_keys_by_alias(gw, M, ks.alias) == []


async def mint_alias(gw: httpx.AsyncClient, alias: str) -> None:
    await gateway.generate_key(gw, M, alias=alias, models=["coder-chat"], max_budget=1.0, budget_duration="30d")


async def test_wrong_master_key_is_a_gateway_request_error_naming_the_secret(gw: httpx.AsyncClient) -> None:
    with pytest.raises(GatewayRequestError, match="master key") as ei:
        await gateway.list_keys_by_alias(gw, SecretStr("sk-not-the-master-000000"), "x")
    assert "sk-not-the-master" not in str(ei.value) and "PROXY_MASTER_KEY" in str(ei.value)


async def test_registering_twice_leaves_one_deployment(stack: GwStack, gw: httpx.AsyncClient) -> None:
    agent = SPEC.model("coder-agent")
    first = await gateway.ensure_model_registered(gw, M, SecretStr(UPSTREAM), SPEC, agent)
    second = await gateway.ensure_model_registered(gw, M, SecretStr(UPSTREAM), SPEC, agent)
    assert (first.action, second.action) == ("registered", "already-registered")
    assert len(await gateway.list_model_deployments(gw, M, agent.alias)) == 1
    assert first.api_base == "http://coder-agent.serving.svc.cluster.local:8000/v1"
    row = stack.services.litellm_db["models"][-1]
    assert row["litellm_params"]["model"] == "openai/qwen2.5-coder-14b-instruct"
    assert row["litellm_params"]["input_cost_per_token"] == agent.input_cost_per_token
    assert UPSTREAM not in first.model_dump_json()


async def test_existing_duplicates_are_reported_and_not_added_to() -> None:
    async with (
        local_stack() as st,
        make_client(SPEC.timeouts, base_url=st.url) as c,
    ):
        body = {"model_name": "coder-agent", "litellm_params": {"model": "openai/x", "api_base": "http://x/v1"}}
        for _ in range(2):
            r = await c.post("/model/new", json=body, headers={"Authorization": f"Bearer {MASTER}"})
            assert r.status_code == 200
        reg = await gateway.ensure_model_registered(c, M, SecretStr(UPSTREAM), SPEC, SPEC.model("coder-agent"))
        assert reg.action == "already-registered" and reg.deployments == 2
        assert "2 deployments" in reg.warnings[0]
        assert len(await gateway.list_model_deployments(c, M, "coder-agent")) == 2


# ---------------------------------------------------------------------------------------------- smokes


async def test_chat_smoke_through_a_key_passes_and_spend_equals_tokens_times_prices(
    stack: GwStack, gw: httpx.AsyncClient
) -> None:
    ks, key = await mint(gw, ["coder-chat", "coder-fim", "embeddings"])
    before = await gateway.read_spend_baseline(gw, M, [ks.alias])
    res = await smoke_gateway(gw, stack.url, key, ks, SPEC.model("coder-chat"), SPEC)
    assert [c.name for c in res.checks] == [
        "/v1/models = key scope",
        "chat via /v1/chat/completions",
        "embeddings",
    ]
    exp = {ks.alias: expected_spend(res)}
    [row] = await gateway.read_spend(
        gw, M, [ks.alias], before=before, called=[ks.alias], expected=exp, wait_s=5, poll_s=0.05
    )
    assert row.status == "metered" and row.spend > 0
    assert row.spend == pytest.approx(expected_spend(res), rel=1e-9)
    assert row.share_used == pytest.approx(row.spend / 5.0)
    assert key.get_secret_value() not in res.model_dump_json() + row.model_dump_json()


async def test_fim_smoke_goes_to_raw_completions_and_judges_the_start(stack: GwStack, gw: httpx.AsyncClient) -> None:
    ks, key = await mint(gw, ["coder-fim", "embeddings"])
    before = stack.services.counters.get("litellm:/v1/chat/completions", 0)
    res = await smoke_gateway(gw, stack.url, key, ks, SPEC.model("coder-fim"), SPEC)
    assert res.checks[1].name == "FIM via /v1/completions" and res.excerpt.startswith("a + b")
    assert "def subtract" not in res.excerpt  # stop sequences cut the run-on code
    assert stack.services.counters.get("litellm:/v1/chat/completions", 0) == before


async def test_scope_drift_fails_at_key_scope_naming_missing_and_extra(stack: GwStack, gw: httpx.AsyncClient) -> None:
    ks, key = await mint(gw, ["coder-chat", "coder-agent"])
    wanted = ks.model_copy(update={"models": ["coder-chat", "embeddings"]})
    with pytest.raises(SmokeFailed) as ei:
        await smoke_gateway(gw, stack.url, key, wanted, SPEC.model("coder-chat"), SPEC)
    assert ei.value.hop == "key-scope"
    assert "missing ['embeddings']" in str(ei.value) and "extra ['coder-agent']" in str(ei.value)


async def test_model_outside_the_key_is_a_403_at_key_scope(stack: GwStack, gw: httpx.AsyncClient) -> None:
    ks, key = await mint(gw, ["coder-fim"])
    lying = ks.model_copy(update={"models": ["coder-fim", "coder-chat"]})
    # the gateway lists only coder-fim; bypass the list check to provoke the 403 on the call itself
    with pytest.raises(SmokeFailed) as ei:
        await smoke_gateway(gw, stack.url, key, lying, SPEC.model("coder-chat"), SPEC)
    assert ei.value.hop == "key-scope"
    from coder_stack.probe import chat_once, hops
    from coder_stack.transport import openai_client

    oai = openai_client(gw, stack.url, key, SPEC.timeouts)

    with pytest.raises(SmokeFailed) as ei2, hops("chat", via="gateway", unreachable="gateway"):
        await chat_once(oai, SPEC.model("coder-chat"), "coder-chat")
    assert ei2.value.hop == "key-scope" and "key_model_access_denied" in str(ei2.value)


async def test_budget_exceeded_fails_at_the_budget_hop(stack: GwStack, gw: httpx.AsyncClient) -> None:
    ks, key = await mint(gw, ["coder-chat"], budget=1e-9)
    await smoke_gateway(gw, stack.url, key, ks, SPEC.model("coder-chat"), SPEC)  # the first call over budget passes
    with pytest.raises(SmokeFailed) as ei:
        await smoke_gateway(gw, stack.url, key, ks, SPEC.model("coder-chat"), SPEC)
    assert ei.value.hop == "budget" and "budget_exceeded" in str(ei.value)
    assert key.get_secret_value() not in str(ei.value)


async def test_invalid_key_fails_at_the_key_hop(stack: GwStack, gw: httpx.AsyncClient) -> None:
    ks = ClientKeySpec(alias="nobody", models=["coder-chat"])
    bad = "sk-deleted-key-0123456789abcdef"
    with pytest.raises(SmokeFailed) as ei:
        await smoke_gateway(gw, stack.url, SecretStr(bad), ks, SPEC.model("coder-chat"), SPEC)
    assert ei.value.hop == "key" and "token_not_found_in_db" in str(ei.value)
    assert bad not in str(ei.value)


async def test_gateway_down_fails_at_the_gateway_hop() -> None:
    ks = ClientKeySpec(alias="x", models=["coder-chat"])
    async with make_client(SPEC.timeouts, backoff_s=0.01, max_wait_s=0.1) as c:
        with pytest.raises(SmokeFailed) as ei:
            await smoke_gateway(
                c, "http://127.0.0.1:9", SecretStr("sk-x-0123456789ab"), ks, SPEC.model("coder-chat"), SPEC
            )
    assert ei.value.hop == "gateway" and "unreachable" in str(ei.value)


async def test_model_down_behind_the_gateway_fails_at_the_model_hop() -> None:
    async with (
        local_stack() as st,
        make_client(SPEC.timeouts, base_url=st.url, max_wait_s=0.2) as c,
    ):
        await st.stop_model("coder-chat")
        ks, key = await mint(c, ["coder-chat"])
        with pytest.raises(SmokeFailed) as ei:
            await smoke_gateway(c, st.url, key, ks, SPEC.model("coder-chat"), SPEC)
    assert ei.value.hop == "model" and "Connection error" in str(ei.value)


async def test_agent_tool_loop_through_the_gateway_is_metered(stack: GwStack, gw: httpx.AsyncClient) -> None:
    agent = SPEC.model("coder-agent")
    await gateway.ensure_model_registered(gw, M, SecretStr(UPSTREAM), SPEC, agent)
    ks, key = await mint(gw, ["coder-agent"])
    res = await smoke_agent(gw, stack.url, key, agent, SPEC.timeouts, key_alias=ks.alias)
    assert res.checks[-1].detail == "plain-json"
    exp = gateway.expected_cost(
        await gateway.model_prices(gw, M), [(u.model, u.prompt_tokens, u.completion_tokens) for u in res.usage]
    )
    assert exp == pytest.approx(expected_spend(res), rel=1e-12)
    [row] = await gateway.read_spend(
        gw, M, [ks.alias], before={ks.alias: 0.0}, called=[ks.alias], expected={ks.alias: exp}, wait_s=5, poll_s=0.05
    )
    assert row.status == "metered" and row.spend == pytest.approx(expected_spend(res), rel=1e-9)
    assert row.expected_increase == pytest.approx(exp)


async def test_spend_stays_zero_without_prices_and_says_so() -> None:
    free = StackSpec(
        models=[m.model_copy(update={"input_cost_per_token": 0.0, "output_cost_per_token": 0.0}) for m in SPEC.models]
    )
    async with (
        local_stack(free) as st,
        make_client(SPEC.timeouts, base_url=st.url) as c,
    ):
        ks, key = await mint(c, ["coder-chat"])
        await smoke_gateway(c, st.url, key, ks, free.model("coder-chat"), free)
        [row] = await gateway.read_spend(c, M, [ks.alias], before={ks.alias: 0.0}, called=[ks.alias], wait_s=0.5)
    assert row.status == "no prices configured" and row.spend == 0.0
    assert "no input_cost_per_token" in row.note


async def test_no_key_in_log_records_or_results(
    stack: GwStack, gw: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ks, key = await mint(gw, ["coder-chat", "coder-fim", "embeddings"])
    assert await gateway.key_info(gw, M, key) is not None  # the one URL that carries a key
    res = await smoke_gateway(gw, stack.url, key, ks, SPEC.model("coder-chat"), SPEC)
    rows = await gateway.read_spend(gw, M, [ks.alias], called=[ks.alias], wait_s=1, poll_s=0.05)
    secrets = [key.get_secret_value(), MASTER]
    text = "\n".join(r.getMessage() for r in caplog.records) + res.model_dump_json() + rows[0].model_dump_json()
    assert "/key/info" in text  # the request was logged, without its query
    for s in secrets:
        assert s not in text


async def test_minted_key_repr_and_dump_hide_the_value(gw: httpx.AsyncClient) -> None:
    minted = await gateway.generate_key(
        gw, M, alias="repr-check", models=["coder-chat"], max_budget=1.0, budget_duration="30d"
    )
    value = minted.key.get_secret_value()
    assert value.startswith("sk-")
    for text in (repr(minted), str(minted), minted.model_dump_json(), repr(minted.record)):
        assert value not in text
