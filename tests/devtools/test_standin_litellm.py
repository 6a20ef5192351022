"""The LiteLLM stand-in against shared/reference/litellm.md, routing to vLLM stand-ins over real HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from simstack.recordings import LITELLM, QUOTED, exchange
from simstack.standins import ContainerRun, RunningBackend, SimServices, start_standin
from simstack.standins import litellm as litellm_standin
from simstack.standins import litellm_fields as F

from tests.conformance.shape import shape_diff
from tests.kits.gateway import litellm_run, service_resolver

MASTER = "sk-master-test-0123456789"
UPSTREAM = "upstream-test-key"
DOM = "svc.cluster.local"
IN_PRICE, OUT_PRICE = 5e-7, 1.5e-6
FIM_PROMPT = "<|fim_prefix|>def add(a, b):\n    return <|fim_suffix|>\n<|fim_middle|>"
CONFIG = {
    "model_list": [
        {
            "model_name": "coder-chat",
            "litellm_params": {
                "model": "openai/qwen2.5-coder-7b-instruct",
                "api_base": f"http://coder-chat.serving.{DOM}:8000/v1",
                "api_key": "os.environ/UPSTREAM_API_KEY",
                "input_cost_per_token": IN_PRICE,
                "output_cost_per_token": OUT_PRICE,
            },
        },
        {
            "model_name": "coder-fim",
            "litellm_params": {
                "model": "openai/qwen2.5-coder-1.5b",
                "api_base": f"http://coder-fim.serving.{DOM}:8000/v1",
                "api_key": "os.environ/UPSTREAM_API_KEY",
            },
        },
        {
            "model_name": "embeddings",
            "litellm_params": {
                "model": "openai/bge-small",
                "api_base": f"http://embeddings.litellm.{DOM}:8000/v1",
                "api_key": "os.environ/UPSTREAM_API_KEY",
                "input_cost_per_token": 2e-8,
                "output_cost_per_token": 0.0,
            },
            "model_info": {"mode": "embedding"},
        },
    ],
    "general_settings": {"master_key": "os.environ/PROXY_MASTER_KEY", "store_model_in_db": True},
}


@dataclass
class Stack:
    services: SimServices
    hosts: dict[str, int]  # cluster host -> local port of a running backend
    backends: list[RunningBackend] = field(default_factory=list)
    gw: RunningBackend | None = None

    @property
    def url(self) -> str:
        assert self.gw is not None
        return f"http://127.0.0.1:{self.gw.port}"


def _litellm_run(config: dict[str, Any] = CONFIG, path: str = "/etc/litellm/proxy_config.yaml") -> ContainerRun:
    return litellm_run(config, MASTER, UPSTREAM, path=path)


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[Stack]:
    hosts: dict[str, int] = {}
    services = SimServices(resolve_url=service_resolver(hosts), time_scale=0.01, spend_write_delay_s=10)
    st = Stack(services, hosts)
    vllms = [
        ("coder-chat", "serving", ["--served-model-name", "qwen2.5-coder-7b-instruct"]),
        ("coder-fim", "serving", ["--served-model-name", "qwen2.5-coder-1.5b"]),
        ("coder-agent", "serving", ["--served-model-name", "qwen2.5-coder-14b-instruct",
                                    "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]),
        ("embeddings", "litellm", ["--served-model-name", "bge-small", "--task", "embed"]),
    ]  # fmt: skip
    try:
        for app, ns, args in vllms:
            run = ContainerRun(
                ns, f"{app}-0", app, "vllm/vllm-openai:v0.32.0", [*args, "--api-key", "$(K)"], {"K": UPSTREAM}
            )
            b = await start_standin(run, services)
            assert b is not None
            st.backends.append(b)
            hosts[f"{app}.{ns}.{DOM}"] = b.port
        st.gw = await start_standin(_litellm_run(), services)
        yield st
    finally:
        if st.gw is not None:
            await st.gw.stop()
        for b in st.backends:
            await b.stop()


def _m() -> dict[str, str]:
    return {"Authorization": f"Bearer {MASTER}"}


def _b(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _mint(c: httpx.AsyncClient, url: str, alias: str, **kw: Any) -> dict[str, Any]:
    r = await c.post(f"{url}/key/generate", headers=_m(), json={"key_alias": alias, **kw})
    assert r.status_code == 200, r.text
    return r.json()


async def _spend(c: httpx.AsyncClient, url: str, key: str) -> float:
    r = await c.get(f"{url}/key/info", headers=_m(), params={"key": key})
    assert r.status_code == 200, r.text
    return float(r.json()["info"]["spend"])


async def _poll_spend(c: httpx.AsyncClient, url: str, key: str, old: float, bound_s: float = 3.0) -> float:
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        s = await _spend(c, url, key)
        if s != old:
            return s
        await asyncio.sleep(0.02)
    return await _spend(c, url, key)


def _oa(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


# ---------------------------------------------------------------------------------------------- health


async def test_health_routes(stack: Stack) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.get(f"{stack.url}/health/readiness")
        assert r.status_code == 200 and r.json()["db"] == "connected"
        r = await c.get(f"{stack.url}/health/liveliness")
        assert r.status_code == 200 and r.json() == "I'm alive!"
        r = await c.get(f"{stack.url}/health")
        assert r.status_code == 401 and r.json()["error"]["type"] == "auth_error"
        r = await c.get(f"{stack.url}/health", headers=_m())
        body = r.json()
        assert r.status_code == 200 and body["healthy_count"] == 3 and body["unhealthy_count"] == 0
        assert all("api_key" not in e for e in body["healthy_endpoints"])


# ---------------------------------------------------------------------------------------------- keys


async def test_key_generate_shape_and_duplicate_alias(stack: Stack) -> None:
    async with httpx.AsyncClient() as c:
        body = {
            "key_alias": "tabby",
            "models": ["coder-fim", "embeddings"],
            "max_budget": 5.0,
            "budget_duration": "30d",
        }
        r = await c.post(f"{stack.url}/key/generate", headers=_m(), json=body)
        assert r.status_code == 200
        k = r.json()
        assert re.fullmatch(r"sk-[A-Za-z0-9_-]{22}", k["key"])
        assert k["token"] == hashlib.sha256(k["key"].encode()).hexdigest()
        assert k["key_alias"] == "tabby" and k["models"] == ["coder-fim", "embeddings"]
        assert k["max_budget"] == 5.0 and k["budget_duration"] == "30d" and "expires" in k
        r = await c.post(f"{stack.url}/key/generate", headers=_m(), json=body)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["type"] == "bad_request_error"
        assert "Key with alias 'tabby' already exists" in err["message"]
        # only the master key may mint
        r = await c.post(f"{stack.url}/key/generate", headers=_b(k["key"]), json={"key_alias": "x"})
        assert r.status_code == 401


async def test_key_info_list_update_delete(stack: Stack) -> None:
    async with httpx.AsyncClient() as c:
        k = await _mint(c, stack.url, "crud", models=["coder-chat"], max_budget=1.0, budget_duration="30d")
        r = await c.get(f"{stack.url}/key/info", headers=_m(), params={"key": k["key"]})
        info = r.json()["info"]
        assert r.json()["key"] == k["key"]
        assert info["spend"] == 0.0 and info["max_budget"] == 1.0 and info["models"] == ["coder-chat"]
        assert info["key_alias"] == "crud" and info["budget_duration"] == "30d" and info["budget_reset_at"]
        assert k["key"] not in json.dumps(info)
        r = await c.get(f"{stack.url}/key/list", headers=_m(), params={"key_alias": "crud"})
        assert r.json()["keys"] == [k["token"]]
        r = await c.get(
            f"{stack.url}/key/list", headers=_m(), params={"key_alias": "crud", "return_full_object": "true"}
        )
        full = r.json()["keys"]
        assert len(full) == 1 and full[0]["token"] == k["token"] and full[0]["key_alias"] == "crud"
        assert k["key"] not in r.text
        assert (await c.get(f"{stack.url}/key/list", headers=_m(), params={"key_alias": "nope"})).json()["keys"] == []
        # update scope + budget, same value
        r = await c.post(
            f"{stack.url}/key/update", headers=_m(), json={"key": k["key"], "models": ["coder-fim"], "max_budget": 2.0}
        )
        assert r.status_code == 200
        info = (await c.get(f"{stack.url}/key/info", headers=_m(), params={"key": k["key"]})).json()["info"]
        assert info["models"] == ["coder-fim"] and info["max_budget"] == 2.0
        models = (await c.get(f"{stack.url}/v1/models", headers=_b(k["key"]))).json()["data"]
        assert [m["id"] for m in models] == ["coder-fim"]
        # regenerate is Enterprise-only
        r = await c.post(f"{stack.url}/key/regenerate", headers=_m(), json={"key": k["key"]})
        assert r.status_code >= 400 and "Enterprise" in r.json()["error"]["message"]
        # delete by hashed token; a second key by value
        k2 = await _mint(c, stack.url, "crud-2")
        r = await c.post(f"{stack.url}/key/delete", headers=_m(), json={"keys": [k["token"], k2["key"]]})
        assert r.status_code == 200
        for key in (k["key"], k2["key"]):
            r = await c.get(f"{stack.url}/v1/models", headers=_b(key))
            assert r.status_code == 401 and r.json()["error"]["type"] == "token_not_found_in_db"
        # a deleted key's info is still there, status "deleted" (recorded: key-info-deleted-by-hash)
        r = await c.get(f"{stack.url}/key/info", headers=_m(), params={"key": k["key"]})
        assert r.status_code == 200 and r.json()["info"]["status"] == "deleted"


async def test_missing_and_invalid_keys(stack: Stack) -> None:
    async with httpx.AsyncClient() as c:
        body = {"model": "coder-chat", "messages": [{"role": "user", "content": "hi"}]}
        r = await c.post(f"{stack.url}/v1/chat/completions", json=body)
        assert r.status_code == 401
        err = r.json()["error"]
        assert err["type"] == "auth_error" and "No api key passed in" in err["message"] and err["code"] == "401"
        r = await c.post(f"{stack.url}/chat/completions", headers=_b("sk-doesnotexist1234567890"), json=body)
        assert r.status_code == 401
        err = r.json()["error"]
        assert err["type"] == "token_not_found_in_db"
        assert "Authentication Error, Invalid API key provided." in err["message"]
    with pytest.raises(openai.AuthenticationError):
        await _oa(stack.url, "sk-nope-nope-nope").models.list()


# ---------------------------------------------------------------------------------------------- data plane


async def test_models_are_the_key_scope(stack: Stack) -> None:
    async with httpx.AsyncClient() as c:
        k = await _mint(c, stack.url, "open-webui-scope", models=["coder-chat", "coder-fim", "embeddings"])
        for path in ("/v1/models", "/models"):
            data = (await c.get(f"{stack.url}{path}", headers=_b(k["key"]))).json()["data"]
            assert [m["id"] for m in data] == ["coder-chat", "coder-fim", "embeddings"]
            assert next(m for m in data if m["id"] == "embeddings").get("mode") == "embedding"
        t = await _mint(c, stack.url, "tabby-scope", models=["coder-fim", "embeddings"])
        ids = [m.id async for m in _oa(stack.url, t["key"]).models.list()]
        assert ids == ["coder-fim", "embeddings"]
        all_ids = [m["id"] for m in (await c.get(f"{stack.url}/v1/models", headers=_m())).json()["data"]]
        assert {"coder-chat", "coder-fim", "embeddings"} <= set(all_ids)


async def test_scope_403(stack: Stack) -> None:
    async with httpx.AsyncClient() as c:
        t = await _mint(c, stack.url, "tabby-403", models=["coder-fim", "embeddings"])
        for model in ("coder-chat", "no-such-model"):
            r = await c.post(
                f"{stack.url}/v1/chat/completions",
                headers=_b(t["key"]),
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 403
            err = r.json()["error"]
            assert err["type"] == "key_model_access_denied" and err["param"] == "model" and err["code"] == "403"
            assert err["message"].startswith(f"The requested model '{model}' is not available for this API key")
    with pytest.raises(openai.PermissionDeniedError):
        await _oa(stack.url, t["key"]).chat.completions.create(
            model="coder-chat", messages=[{"role": "user", "content": "hi"}]
        )


async def test_chat_through_key_and_spend_after_batch_write(stack: Stack) -> None:
    async with httpx.AsyncClient() as c:
        k = await _mint(c, stack.url, "metered", models=["coder-chat"], max_budget=5.0)
        before = stack.services.counters.get("coder-chat:/v1/chat/completions", 0)
        r = await _oa(stack.url, k["key"]).chat.completions.with_raw_response.create(
            model="coder-chat",
            messages=[{"role": "user", "content": "reverse a string in python, code only"}],
            max_tokens=40,
        )
        resp = r.parse()
        assert "[::-1]" in (resp.choices[0].message.content or "")
        assert resp.model == "coder-chat"  # the answer names the alias (recorded: chat-reverse)
        assert stack.services.counters["coder-chat:/v1/chat/completions"] == before + 1
        assert resp.usage is not None and resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
        expected = resp.usage.prompt_tokens * IN_PRICE + resp.usage.completion_tokens * OUT_PRICE
        assert float(r.headers["x-litellm-response-cost"]) == pytest.approx(expected)
        # the batched write: not visible right away ...
        assert await _spend(c, stack.url, k["key"]) == 0.0
        # ... and visible after spend_write_delay_s * time_scale (0.1 s)
        spend = await _poll_spend(c, stack.url, k["key"], 0.0)  # bounded: it fails if the write never shows
        assert spend == pytest.approx(expected)
        assert stack.services.counters["litellm:/v1/chat/completions"] >= 1


async def test_spend_zero_without_prices(stack: Stack) -> None:
    async with httpx.AsyncClient() as c:
        k = await _mint(c, stack.url, "fim-noprice", models=["coder-fim"])
        r = await _oa(stack.url, k["key"]).completions.create(
            model="coder-fim", prompt=FIM_PROMPT, max_tokens=16, stop=["<|endoftext|>", "<|fim_pad|>", "\n\n"]
        )
        assert r.choices[0].text == "a + b"
        assert r.usage is not None and r.usage.completion_tokens > 0
        await asyncio.sleep(0.3)
        assert await _spend(c, stack.url, k["key"]) == 0.0


async def test_fim_runs_on_through_gateway(stack: Stack) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.post(
            f"{stack.url}/completions",
            headers=_m(),
            json={"model": "coder-fim", "prompt": FIM_PROMPT, "max_tokens": 16},
        )
    ch = r.json()["choices"][0]
    assert ch["text"].startswith("a + b") and len(ch["text"]) > 5 and ch["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 16


async def test_embeddings_through_gateway(stack: Stack) -> None:
    async with httpx.AsyncClient() as c:
        k = await _mint(c, stack.url, "emb-key", models=["embeddings"])
    r = await _oa(stack.url, k["key"]).embeddings.create(model="embeddings", input=["hello", "world"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 384 and r.usage.prompt_tokens > 0


async def test_streaming_through_gateway_is_metered(stack: Stack) -> None:
    async with httpx.AsyncClient() as c:
        k = await _mint(c, stack.url, "streamer", models=["coder-chat"])
        body = {"model": "coder-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with c.stream("POST", f"{stack.url}/v1/chat/completions", headers=_b(k["key"]), json=body) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        first = json.loads(lines[0][6:])
        assert first["object"] == "chat.completion.chunk"
        assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert await _poll_spend(c, stack.url, k["key"], 0.0) > 0


async def test_budget_422_on_the_call_after_going_over(stack: Stack) -> None:
    async with httpx.AsyncClient() as c:
        k = await _mint(c, stack.url, "budgeted", models=["coder-chat"], max_budget=1e-6)
        body: Any = {"model": "coder-chat", "messages": [{"role": "user", "content": "reverse a string in python"}]}
        r1 = await c.post(f"{stack.url}/v1/chat/completions", headers=_b(k["key"]), json=body)
        assert r1.status_code == 200  # the call that goes over succeeds
        r2 = await c.post(f"{stack.url}/v1/chat/completions", headers=_b(k["key"]), json=body)
        assert r2.status_code == 422  # the next one fails, before the spend is even written
        err = r2.json()["error"]
        assert err["type"] == "budget_exceeded"
        # before the batched write the message names the hash (recorded: budget-immediate-call-2) ...
        assert re.fullmatch(
            rf"Budget has been exceeded! Key={k['token']} Current cost: [0-9.e-]+, Max budget: 1e-06", err["message"]
        ), err["message"]
        assert k["key"] not in err["message"]
        # ... after it, the alias and key_name (recorded: budget-call-2)
        await _poll_spend(c, stack.url, k["key"], 0.0)
        r2 = await c.post(f"{stack.url}/v1/chat/completions", headers=_b(k["key"]), json=body)
        assert r2.status_code == 422
        err = r2.json()["error"]
        assert re.fullmatch(
            rf"Budget has been exceeded! Key=budgeted \(sk-\.\.\.{re.escape(k['key'][-4:])}\) "
            r"Current cost: [0-9.e-]+, Max budget: 1e-06",
            err["message"],
        ), err["message"]
        assert k["key"] not in err["message"]
        # the master key bypasses budgets
        r3 = await c.post(f"{stack.url}/v1/chat/completions", headers=_m(), json=body)
        assert r3.status_code == 200
        with pytest.raises(openai.UnprocessableEntityError):
            await _oa(stack.url, k["key"]).chat.completions.create(model="coder-chat", messages=body["messages"])


async def test_model_new_twice_makes_two_deployments_and_balances(stack: Stack) -> None:
    new: Any = {
        "model_name": "coder-agent",
        "litellm_params": {
            "model": "openai/qwen2.5-coder-14b-instruct",
            "api_base": f"http://coder-agent.serving.{DOM}:8000/v1",
            "api_key": UPSTREAM,
            "input_cost_per_token": IN_PRICE,
            "output_cost_per_token": OUT_PRICE,
        },
    }
    async with httpx.AsyncClient() as c:
        scoped = await _mint(c, stack.url, "coder-agent", models=["coder-agent"])
        r = await c.post(f"{stack.url}/model/new", headers=_m(), json=new)
        assert r.status_code == 200
        assert UPSTREAM not in r.text and new["litellm_params"]["api_base"] not in r.text  # encrypted
        assert (await c.post(f"{stack.url}/model/new", headers=_b(scoped["key"]), json=new)).status_code == 401
        r2 = await c.post(f"{stack.url}/model/new", headers=_m(), json=new)
        assert r2.status_code == 200
        for path in ("/model/info", "/v2/model/info"):
            data = (await c.get(f"{stack.url}{path}", headers=_m())).json()["data"]
            agents = [d for d in data if d["model_name"] == "coder-agent"]
            assert len(agents) == 2 and agents[0]["model_info"]["id"] != agents[1]["model_info"]["id"]
            assert all("api_key" not in d["litellm_params"] for d in data)
            assert agents[0]["litellm_params"]["api_base"] == new["litellm_params"]["api_base"]
        # callable at once by the master key and by the scoped key; load-balanced across both deployments
        ids = set()
        for key in (MASTER, scoped["key"]):
            r = await c.post(
                f"{stack.url}/v1/chat/completions",
                headers=_b(key),
                json={"model": "coder-agent", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            )
            assert r.status_code == 200, r.text
            ids.add(r.headers["x-litellm-model-id"])
        assert ids == {a["model_info"]["id"] for a in agents}
        # tool loop through the gateway: required -> a proper call
        tr = await _oa(stack.url, scoped["key"]).chat.completions.create(
            model="coder-agent",
            messages=[{"role": "user", "content": "What's the weather in Paris?"}],
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "parameters": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                            "required": ["city"],
                        },
                    },
                }
            ],
            tool_choice="required",
        )
        assert tr.choices[0].finish_reason == "tool_calls" and tr.choices[0].message.tool_calls
        # delete one deployment
        r = await c.post(f"{stack.url}/model/delete", headers=_m(), json={"id": agents[1]["model_info"]["id"]})
        assert r.status_code == 200
        data = (await c.get(f"{stack.url}/model/info", headers=_m())).json()["data"]
        assert len([d for d in data if d["model_name"] == "coder-agent"]) == 1


async def test_backend_down_is_500_connection_error(stack: Stack) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.post(
            f"{stack.url}/model/new",
            headers=_m(),
            json={
                "model_name": "coder-down",
                "litellm_params": {"model": "openai/x", "api_base": f"http://coder-down.serving.{DOM}:8000/v1"},
            },
        )
        assert r.status_code == 200
        r = await c.post(
            f"{stack.url}/v1/chat/completions",
            headers=_m(),
            json={"model": "coder-down", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["message"].startswith(
            "litellm.InternalServerError: InternalServerError: OpenAIException - Connection error."
        )
        assert err["type"] == "internal_server_error" and "model group 'coder-down'" in err["message"]
        health = (await c.get(f"{stack.url}/health", headers=_m())).json()
        assert health["unhealthy_count"] >= 1


async def test_backend_errors_are_mapped(stack: Stack) -> None:
    async with httpx.AsyncClient() as c:
        for name, model, key in (
            ("coder-wrongname", "openai/not-served", UPSTREAM),
            ("coder-wrongkey", "openai/qwen2.5-coder-7b-instruct", "bad-upstream-key"),
        ):
            r = await c.post(
                f"{stack.url}/model/new",
                headers=_m(),
                json={
                    "model_name": name,
                    "litellm_params": {
                        "model": model,
                        "api_base": f"http://coder-chat.serving.{DOM}:8000/v1",
                        "api_key": key,
                    },
                },
            )
            assert r.status_code == 200
        body = {"messages": [{"role": "user", "content": "hi"}]}
        r = await c.post(f"{stack.url}/v1/chat/completions", headers=_m(), json={"model": "coder-wrongname", **body})
        assert r.status_code == 404 and r.json()["error"]["message"].startswith("litellm.NotFoundError")
        r = await c.post(f"{stack.url}/v1/chat/completions", headers=_m(), json={"model": "coder-wrongkey", **body})
        assert r.status_code == 401 and "AuthenticationError" in r.json()["error"]["message"]


async def test_state_survives_restart(stack: Stack) -> None:
    async with httpx.AsyncClient() as c:
        k = await _mint(c, stack.url, "survivor", models=["coder-chat", "coder-survivor"], max_budget=5.0)
        r = await c.post(
            f"{stack.url}/model/new",
            headers=_m(),
            json={
                "model_name": "coder-survivor",
                "litellm_params": {
                    "model": "openai/qwen2.5-coder-7b-instruct",
                    "api_base": f"http://coder-chat.serving.{DOM}:8000/v1",
                    "api_key": "os.environ/UPSTREAM_API_KEY",
                },
            },
        )
        assert r.status_code == 200
        r = await c.post(
            f"{stack.url}/v1/chat/completions",
            headers=_b(k["key"]),
            json={"model": "coder-chat", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 200
        spend = await _poll_spend(c, stack.url, k["key"], 0.0)
        assert spend > 0
        # restart: a new proxy process on the same database
        assert stack.gw is not None
        await stack.gw.stop()
        stack.gw = await start_standin(_litellm_run(), stack.services)
        assert (await c.get(f"{stack.url}/health/readiness")).status_code == 200
        assert await _spend(c, stack.url, k["key"]) == pytest.approx(spend)
        r = await c.post(
            f"{stack.url}/v1/chat/completions",
            headers=_b(k["key"]),
            json={"model": "coder-survivor", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 200, r.text
        aliases = {d["model_name"] for d in (await c.get(f"{stack.url}/model/info", headers=_m())).json()["data"]}
        assert {"coder-survivor", "coder-chat"} <= aliases


async def test_model_new_needs_store_model_in_db(stack: Stack) -> None:
    cfg = dict(CONFIG, general_settings={"master_key": "os.environ/PROXY_MASTER_KEY"})
    gw = await start_standin(_litellm_run(cfg, "/app/config.yaml"), SimServices(resolve_url=stack.services.resolve_url))
    assert gw is not None
    try:
        async with httpx.AsyncClient(timeout=30) as c:  # a loaded CI machine once took over httpx's default 5 s
            r = await c.post(
                f"http://127.0.0.1:{gw.port}/model/new",
                headers=_m(),
                json={"model_name": "x", "litellm_params": {"model": "openai/x"}},
            )
        assert r.status_code == 500 and "STORE_MODEL_IN_DB" in r.json()["error"]["message"]
    finally:
        await gw.stop()


# ---------------------------------------------------------------------------------------------- field model


async def test_answers_come_from_the_stand_ins_own_field_model(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer's field set is the stand-in's declaration (devtools/simstack/standins/litellm_fields.py), not a
    recorded answer: a field dropped from or added to the declaration drops from or shows in the answer, so the
    missing/extra-field check conformance makes against the recording sees it; and a declared REQUIRED field
    that nothing computed refuses the answer instead of being filled in."""
    recorded = exchange(LITELLM, "key-info-by-value").body["info"]
    async with httpx.AsyncClient() as c:
        k = await _mint(c, stack.url, "field-model", models=["coder-chat"], max_budget=5.0, budget_duration="30d")

        async def info() -> httpx.Response:
            return await c.get(f"{stack.url}/key/info", headers=_m(), params={"key": k["key"]})

        base = (await info()).json()["info"]
        assert list(base) == list(F.KEY_INFO) and set(base) == set(recorded)
        assert shape_diff(recorded, base) == []  # the declaration agrees with the real proxy
        monkeypatch.delitem(F.KEY_INFO, "rotation_count")
        monkeypatch.setitem(F.KEY_INFO, "not_a_litellm_field", None)
        changed = (await info()).json()["info"]
        assert "rotation_count" not in changed and changed["not_a_litellm_field"] is None
        diffs = shape_diff(recorded, changed)
        assert any(d.startswith("$.rotation_count: missing") for d in diffs), diffs
        assert any(d.startswith("$.not_a_litellm_field: present") for d in diffs), diffs
        monkeypatch.setitem(F.KEY_INFO, "key_type", F.REQUIRED)  # declared computed, and nothing computes it
        assert (await info()).status_code == 500


def test_the_stand_in_reads_no_recording() -> None:
    """The field model is the stand-in's own code: neither module imports simstack.recordings, and the
    LiteLLM side of the corpus is held out whole (conformance reports all of it)."""
    for module in (litellm_standin, F):
        source = Path(str(module.__file__)).read_text()
        assert "simstack.recordings" not in source and "recordings import" not in source, module.__name__
    assert QUOTED[LITELLM] == frozenset()


def test_no_module_of_the_split_stand_in_reads_a_recording() -> None:
    """The stand-in is a package of one module per concern: each of them (not only its ``__init__``, which
    the test above reads) is its own code, importing nothing from simstack.recordings."""
    package = Path(str(litellm_standin.__file__)).parent
    sources = sorted(package.glob("*.py"))
    names = {p.stem for p in sources}
    assert {"__init__", "app", "keys", "models", "spend", "routing"} <= names, names
    for path in sources:
        source = path.read_text()
        assert "simstack.recordings" not in source and "recordings import" not in source, path.name
