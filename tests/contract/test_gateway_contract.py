"""What the flows rely on from LiteLLM 1.108.7 (and vLLM), run against each target of ``conftest.target``.

Every test mints only throwaway keys (unique ``coder-stack-contract-*`` / ``coder-stack-doctor-*`` aliases)
and deletes them afterwards, even when it fails.
"""

from __future__ import annotations

import logging
import re
import secrets

import httpx
import pytest
from pydantic import SecretStr

from coder_stack.errors import SmokeFailed
from coder_stack.litellm import admin as gateway
from coder_stack.litellm.smoke import smoke_gateway
from coder_stack.spec import ClientKeySpec
from coder_stack.transport import bearer, error_detail, make_client
from coder_stack.usecases import doctor
from coder_stack.vllm.smoke import smoke_direct
from tests.contract.conftest import ALIAS_PREFIX, Mint, Target


async def _chat(gw: httpx.AsyncClient, key: SecretStr, model: str) -> httpx.Response:
    return await gw.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        headers=bearer(key),
    )


async def test_gateway_is_ready_without_auth(target: Target, gw: httpx.AsyncClient) -> None:
    await gateway.gateway_ready(gw)
    resp = await gw.get("/health/readiness")
    body = resp.json()
    assert (resp.status_code, body.get("status"), body.get("db")) == (200, "healthy", "connected")


async def test_key_lifecycle_as_the_flows_need_it(target: Target, gw: httpx.AsyncClient, throwaway: Mint) -> None:
    m = target.master
    alias, minted = await throwaway([target.chat])
    key = minted.key

    info = await gateway.key_info(gw, m, key)
    assert info is not None, "/key/info by value must know a key just minted"
    assert (info.status, info.alias, info.models, info.problem()) == ("active", alias, [target.chat], None)
    assert info.token is None, "/key/info never returns the hashed token: nothing may rely on it"

    [listed] = await gateway.list_keys_by_alias(gw, m, alias)
    assert listed.token, "/key/list?key_alias=...&return_full_object=true must give the token"
    if minted.record.token:
        assert listed.token == minted.record.token
    token = listed.token

    await gateway.update_key(gw, m, key, max_budget=0.02)
    by_value = await gateway.key_info(gw, m, key)
    assert by_value is not None and by_value.max_budget == pytest.approx(0.02)
    await gateway.update_key(gw, m, token, models=[target.chat, target.fim], max_budget=0.03)
    by_hash = await gateway.key_info(gw, m, key)
    assert by_hash is not None and sorted(by_hash.models) == sorted([target.chat, target.fim])
    assert by_hash.max_budget == pytest.approx(0.03)

    await gateway.delete_keys(gw, m, [token])
    await gateway.delete_keys(gw, m, [key])  # already gone (404 "No keys found"): counts as deleted

    gone = await gateway.key_info(gw, m, key)
    assert gone is not None, "/key/info of a deleted key answers 200 with status 'deleted' (404 is for never-keys)"
    assert gone.status == "deleted" and gone.problem() == "deleted"
    gone_by_hash = await gateway.key_info_by_token(gw, m, token)
    assert gone_by_hash is not None and gone_by_hash.status == "deleted"
    assert await gateway.list_keys_by_alias(gw, m, alias) == []

    resp = await _chat(gw, key, target.chat)
    assert resp.status_code == 401, f"a deleted key must be refused, got {resp.status_code}"
    assert error_detail(resp.content)[0] == "token_not_found_in_db"


async def test_key_info_of_a_value_that_was_never_a_key_is_none(target: Target, gw: httpx.AsyncClient) -> None:
    assert await gateway.key_info(gw, target.master, SecretStr("sk-" + secrets.token_hex(16))) is None


async def test_v1_models_echoes_a_ghost_scope_that_model_info_lacks(
    target: Target, gw: httpx.AsyncClient, throwaway: Mint
) -> None:
    ghost = f"{ALIAS_PREFIX}ghost-{secrets.token_hex(4)}"
    _, minted = await throwaway([ghost])
    resp = await gw.get("/v1/models", headers=bearer(minted.key))
    assert resp.status_code == 200
    assert [d["id"] for d in resp.json()["data"]] == [ghost], "a key's /v1/models echoes its scope verbatim"
    assert await gateway.list_model_deployments(gw, target.master, ghost) == [], "/model/info is what counts"
    call = await _chat(gw, minted.key, ghost)
    etype, msg = error_detail(call.content)
    assert (call.status_code, etype) == (400, "invalid_request_error")
    assert f"Invalid model name passed in model={ghost}" in msg


async def test_direct_smoke_of_the_chat_model(target: Target) -> None:
    if target.vllm_url is None or target.vllm_key is None:
        pytest.skip("real gateway: set CODER_STACK_CONTRACT_VLLM_URL and CODER_STACK_CONTRACT_VLLM_KEY for this")
    chat = target.spec.model(target.chat)
    async with make_client(target.spec.timeouts) as http:
        res = await smoke_direct(http, target.vllm_url, target.vllm_key, chat, target.spec.timeouts)
    assert res.kind == "direct" and res.ttft_s is not None and res.excerpt
    assert target.vllm_key.get_secret_value() not in res.model_dump_json()


async def test_gateway_smoke_of_the_chat_model_and_its_spend(
    target: Target, gw: httpx.AsyncClient, throwaway: Mint
) -> None:
    alias, minted = await throwaway([target.chat], budget=0.05)
    ks = ClientKeySpec(alias=alias, models=[target.chat], max_budget=0.05, budget_duration="1d")
    chat = target.spec.model(target.chat)
    if not target.is_serving(target.chat):
        with pytest.raises(SmokeFailed) as ei:
            await smoke_gateway(gw, target.gateway_url, minted.key, ks, chat, target.spec)
        assert ei.value.hop == "model"
        return
    res = await smoke_gateway(gw, target.gateway_url, minted.key, ks, chat, target.spec)
    assert [c.name for c in res.checks] == ["/v1/models = key scope", "chat via /v1/chat/completions"]
    assert minted.key.get_secret_value() not in res.model_dump_json()
    prices = await gateway.model_prices(gw, target.master)
    expected = gateway.expected_cost(prices, [(u.model, u.prompt_tokens, u.completion_tokens) for u in res.usage])
    [row] = await gateway.read_spend(
        gw,
        target.master,
        [alias],
        before={alias: 0.0},
        called=[alias],
        expected={alias: expected},
        wait_s=target.spec.timeouts.spend_visible_s,
        poll_s=0.25,
    )
    assert row.status == ("metered" if expected > 0 else "no prices configured"), row.note
    if expected > 0:
        assert row.spend == pytest.approx(expected, rel=1e-6)


def _rows(rows: list[doctor.DoctorRow], prefix: str) -> list[doctor.DoctorRow]:
    return [r for r in rows if r.name.startswith(prefix)]


async def test_doctor_gateway_checks_pass_and_clean_up(
    target: Target, gw: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rows = await doctor.gateway_checks(gw, target.master, target.spec, serving=target.serving)
    by_name = {r.name: r for r in rows}
    failed = [f"{r.name}: {r.seen}" for r in rows if r.status == "fail"]
    assert not failed, failed
    assert by_name["gateway ready"].status == "ok"
    version = by_name["gateway version"]
    if target.is_serving(target.chat):
        assert version.status in ("ok", "warn") and "LiteLLM " in version.seen, version.seen
    lifecycle = _rows(rows, "key: ")
    assert [r.name for r in lifecycle][:3] == ["key: mint", "key: /key/info by hash", "key: /key/list full object"]
    assert all(r.status in ("ok", "skipped") for r in lifecycle), [(r.name, r.status, r.seen) for r in lifecycle]
    assert by_name["key: /key/info after delete"].status == "ok", by_name["key: /key/info after delete"].seen
    fim = by_name["streamed FIM metering"]
    if target.is_serving(target.fim):
        # LiteLLM 1.108.7 logs streamed /v1/completions at $0 and 0 tokens; a gateway that meters them says so
        assert (fim.status, fim.seen) == ("warn", doctor.NOT_METERED) or (
            fim.status == "ok" and fim.seen.startswith("metered: $")
        ), (fim.status, fim.seen)
    else:
        assert fim.status == "skipped"
    # the throwaway keys are gone
    [throwaway_alias] = re.findall(r"'(coder-stack-doctor-[0-9a-f]+)'", by_name["key: mint"].seen)
    assert await gateway.list_keys_by_alias(gw, target.master, throwaway_alias) == []
    text = "\n".join(r.getMessage() for r in caplog.records) + "".join(r.model_dump_json() for r in rows)
    assert target.master.get_secret_value() not in text


async def test_doctor_fails_on_an_alias_the_gateway_lacks(target: Target, gw: httpx.AsyncClient) -> None:
    ghost = f"{ALIAS_PREFIX}missing-{secrets.token_hex(4)}"
    models = [m.model_copy(update={"alias": ghost}) if m.role == "chat" else m for m in target.spec.models]
    keys = [k.model_copy(update={"models": [ghost if a == target.chat else a for a in k.models]})
            for k in target.spec.virtual_keys]  # fmt: skip
    spec = target.spec.model_copy(update={"models": models, "virtual_keys": keys})
    rows = await doctor.gateway_checks(gw, target.master, spec, serving={})
    [aliases] = _rows(rows, "aliases in /model/info")
    assert aliases.status == "fail" and f"missing: {ghost}" in aliases.seen, aliases.seen
    assert "400" in aliases.seen
    assert not _rows(rows, f"prices: {ghost}")
    assert doctor.DoctorReport(rows=rows).ok is False
