"""Open WebUI and Tabby stand-ins, wired to the LiteLLM and vLLM stand-ins over real HTTP."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

import httpx
import pytest
import yaml
from simstack.standins import ContainerRun, RunningBackend, SimServices, start_standin
from simstack.standins.openwebui import sign_session
from simstack.standins.tabby import TabbyConfigError

from tests.kits.gateway import service_resolver

MASTER = "sk-master-frontends-0123"
UPSTREAM = "upstream-frontends"
DOM = "svc.cluster.local"
GATEWAY = f"http://litellm.litellm.{DOM}:4000"
SECRET = "webui-secret-for-tests"
PROXY_CONFIG = {
    "model_list": [
        {
            "model_name": name,
            "litellm_params": {
                "model": f"openai/{served}",
                "api_base": f"http://{name}.serving.{DOM}:8000/v1",
                "api_key": "os.environ/UPSTREAM_API_KEY",
            },
        }
        for name, served in (("coder-chat", "qwen2.5-coder-7b-instruct"), ("coder-fim", "qwen2.5-coder-1.5b"))
    ]
    + [
        {
            "model_name": "embeddings",
            "litellm_params": {"model": "openai/bge-small", "api_base": f"http://embeddings.litellm.{DOM}:8000/v1"},
            "model_info": {"mode": "embedding"},
        }
    ],
    "general_settings": {"master_key": "os.environ/PROXY_MASTER_KEY", "store_model_in_db": True},
}


@dataclass
class Env:
    services: SimServices
    hosts: dict[str, int]
    keys: dict[str, str] = field(default_factory=dict)
    running: list[RunningBackend] = field(default_factory=list)


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[Env]:
    hosts: dict[str, int] = {}
    e = Env(SimServices(resolve_url=service_resolver(hosts), time_scale=0.01, spend_write_delay_s=10), hosts)
    try:
        fim = await start_standin(
            ContainerRun(
                "serving", "coder-fim-0", "coder-fim", "vllm/vllm-openai:v0.32.0",
                ["--served-model-name", "qwen2.5-coder-1.5b", "--api-key", UPSTREAM], {},
            ),
            e.services,
        )  # fmt: skip
        assert fim is not None
        e.running.append(fim)
        hosts[f"coder-fim.serving.{DOM}"] = fim.port
        gw = await start_standin(
            ContainerRun(
                "litellm", "litellm-0", "litellm", "ghcr.io/berriai/litellm:main-v1.108.7",
                ["--config", "/etc/litellm/proxy_config.yaml"],
                {"PROXY_MASTER_KEY": MASTER, "UPSTREAM_API_KEY": UPSTREAM},
                {"/etc/litellm/proxy_config.yaml": yaml.safe_dump(PROXY_CONFIG)},
                4000,
            ),
            e.services,
        )  # fmt: skip
        assert gw is not None
        e.running.append(gw)
        hosts[f"litellm.litellm.{DOM}"] = gw.port
        async with httpx.AsyncClient() as c:
            for alias, models in (
                ("open-webui", ["coder-chat", "coder-fim", "embeddings"]),
                ("tabby", ["coder-fim", "embeddings"]),
            ):
                r = await c.post(
                    f"http://127.0.0.1:{gw.port}/key/generate",
                    headers={"Authorization": f"Bearer {MASTER}"},
                    json={"key_alias": alias, "models": models, "max_budget": 5.0, "budget_duration": "30d"},
                )
                e.keys[alias] = r.json()["key"]
        yield e
    finally:
        for b in e.running:
            await b.stop()


def _webui_run(key: str, **extra: str) -> ContainerRun:
    env = {"OPENAI_API_BASE_URL": f"{GATEWAY}/v1", "OPENAI_API_KEY": key, "WEBUI_SECRET_KEY": SECRET, **extra}
    return ContainerRun("experience", "open-webui-0", "open-webui", "ghcr.io/open-webui/open-webui:v0.6.18", [], env,
                        container_port=8080)  # fmt: skip


def _tabby_config(key: str, endpoint: str = f"{GATEWAY}/v1") -> str:
    return (
        "[model.completion.http]\n"
        'kind = "vllm/completion"\n'
        'model_name = "coder-fim"\n'
        f'api_endpoint = "{endpoint}"\n'
        f'api_key = "{key}"\n'
        'prompt_template = "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"\n'
    )


def _tabby_run(config: str) -> ContainerRun:
    return ContainerRun(
        "experience", "tabby-0", "tabby", "tabbyml/tabby:0.31.2", ["serve", "--port", "8080"],
        {"TABBY_ROOT": "/data"}, {"/data/config.toml": config}, 8080,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- Open WebUI


async def test_openwebui_health_and_models_through_the_key(env: Env) -> None:
    ui = await start_standin(_webui_run(env.keys["open-webui"], ENABLE_PERSISTENT_CONFIG="False"), env.services)
    assert ui is not None
    try:
        url = f"http://127.0.0.1:{ui.port}"
        async with httpx.AsyncClient() as c:
            r = await c.get(f"{url}/health")
            assert r.status_code == 200 and r.json() == {"status": True}
            assert (await c.get(f"{url}/api/models")).status_code == 401
            bad = sign_session("another-secret")
            assert (await c.get(f"{url}/api/models", headers={"Authorization": f"Bearer {bad}"})).status_code == 401
            tok = sign_session(SECRET)
            r = await c.get(f"{url}/api/models", headers={"Authorization": f"Bearer {tok}"})
            assert r.status_code == 200
            assert [m["id"] for m in r.json()["data"]] == ["coder-chat", "coder-fim", "embeddings"]
        assert env.services.counters["open-webui:/health"] >= 1
    finally:
        await ui.stop()


async def ui_model_ids(services: SimServices, run: ContainerRun, headers: dict[str, str]) -> list[str]:
    """Start Open WebUI as ``run`` says, ask its own /api/models, stop it."""
    ui = await start_standin(run, services)
    assert ui is not None
    try:
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{ui.port}/api/models", headers=headers)
        return [m["id"] for m in r.json()["data"]]
    finally:
        await ui.stop()


async def test_openwebui_persistent_config_wins_over_env(env: Env) -> None:
    services = SimServices(resolve_url=env.services.resolve_url, time_scale=0.01)
    tok = sign_session(SECRET)
    h = {"Authorization": f"Bearer {tok}"}

    def model_ids(run: ContainerRun) -> Awaitable[list[str]]:
        return ui_model_ids(services, run, h)

    assert await model_ids(_webui_run(env.keys["tabby"])) == ["coder-fim", "embeddings"]  # first boot stores it
    # the Secret changed, but the database still holds the first key (ENABLE_PERSISTENT_CONFIG defaults to True)
    assert await model_ids(_webui_run(env.keys["open-webui"])) == ["coder-fim", "embeddings"]
    # ENABLE_PERSISTENT_CONFIG=False: the environment wins
    assert await model_ids(_webui_run(env.keys["open-webui"], ENABLE_PERSISTENT_CONFIG="False")) == [
        "coder-chat",
        "coder-fim",
        "embeddings",
    ]


@pytest.mark.parametrize(("value", "env_wins"), [("false", True), ("0", True), ("", True), ("TRUE", False)])
async def test_openwebui_persistence_is_off_for_any_value_but_true(env: Env, value: str, env_wins: bool) -> None:
    """Open WebUI's config.py: ``ENABLE_PERSISTENT_CONFIG`` is on only when absent or "true" in any case."""
    services = SimServices(resolve_url=env.services.resolve_url, time_scale=0.01)
    h = {"Authorization": f"Bearer {sign_session(SECRET)}"}

    def model_ids(run: ContainerRun) -> Awaitable[list[str]]:
        return ui_model_ids(services, run, h)

    assert await model_ids(_webui_run(env.keys["tabby"])) == ["coder-fim", "embeddings"]  # first boot stores it
    later = await model_ids(_webui_run(env.keys["open-webui"], ENABLE_PERSISTENT_CONFIG=value))
    assert later == (["coder-chat", "coder-fim", "embeddings"] if env_wins else ["coder-fim", "embeddings"])


async def test_openwebui_hangs_on_unreachable_upstream(env: Env) -> None:
    run = _webui_run("sk-x", ENABLE_PERSISTENT_CONFIG="False", AIOHTTP_CLIENT_TIMEOUT_MODEL_LIST="30")
    run.env["OPENAI_API_BASE_URL"] = f"http://gone.litellm.{DOM}:4000/v1"
    ui = await start_standin(run, env.services)
    assert ui is not None
    try:
        async with httpx.AsyncClient() as c:
            t0 = time.monotonic()
            r = await c.get(
                f"http://127.0.0.1:{ui.port}/api/models", headers={"Authorization": f"Bearer {sign_session(SECRET)}"}
            )
            assert time.monotonic() - t0 >= 0.29  # 30 s * time_scale 0.01
            assert r.status_code == 200 and r.json()["data"] == []
            assert (await c.get(f"http://127.0.0.1:{ui.port}/health")).json() == {"status": True}
    finally:
        await ui.stop()


# ---------------------------------------------------------------------------------------------- Tabby


async def test_tabby_gates_every_path_and_is_tcp_ready(env: Env) -> None:
    tb = await start_standin(_tabby_run(_tabby_config(env.keys["tabby"])), env.services)
    assert tb is not None
    try:
        # readiness: a TCP connect succeeds
        loop = asyncio.get_running_loop()
        with socket.socket() as s:
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", tb.port))
        url = f"http://127.0.0.1:{tb.port}"
        async with httpx.AsyncClient() as c:
            for method, path in (("GET", "/v1/health"), ("GET", "/"), ("POST", "/v1/completions"), ("GET", "/graphql")):
                r = await c.request(method, f"{url}{path}", json={} if method == "POST" else None)
                assert r.status_code == 401, path
                r = await c.request(method, f"{url}{path}", headers={"Authorization": "Bearer auth_wrong"})
                assert r.status_code == 401, path
            token = env.services.app_data["tabby:experience"]["auth_token"]
            r = await c.get(f"{url}/v1/health", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200 and r.json()["device"] == "cpu"
    finally:
        await tb.stop()


async def test_tabby_completion_goes_through_the_gateway_key(env: Env) -> None:
    before = env.services.counters.get("litellm:/v1/completions", 0)
    tb = await start_standin(_tabby_run(_tabby_config(env.keys["tabby"])), env.services)
    assert tb is not None
    token = env.services.app_data["tabby:experience"]["auth_token"]
    try:
        async with httpx.AsyncClient() as c:
            r = await c.post(
                f"http://127.0.0.1:{tb.port}/v1/completions",
                headers={"Authorization": f"Bearer {token}"},
                json={"language": "python", "segments": {"prefix": "def add(a, b):\n    return ", "suffix": "\n"}},
            )
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == "a + b"
        assert env.services.counters["litellm:/v1/completions"] == before + 1
        assert env.services.counters["coder-fim:/v1/completions"] >= 1
    finally:
        await tb.stop()
    # a restarted Tabby keeps its token (it lives in Tabby's database)
    tb2 = await start_standin(_tabby_run(_tabby_config("sk-revoked-key-000000000000")), env.services)
    assert tb2 is not None
    try:
        assert env.services.app_data["tabby:experience"]["auth_token"] == token
        async with httpx.AsyncClient() as c:
            r = await c.post(
                f"http://127.0.0.1:{tb2.port}/v1/completions",
                headers={"Authorization": f"Bearer {token}"},
                json={"language": "python", "segments": {"prefix": "def add(a, b):\n    return ", "suffix": "\n"}},
            )
        assert r.status_code == 200 and r.json()["choices"] == []  # the gateway refused the key: no completion
    finally:
        await tb2.stop()


async def test_tabby_invalid_config_fails_to_start(env: Env) -> None:
    with pytest.raises(TabbyConfigError):
        await start_standin(_tabby_run("[model.completion.http\nkind = "), env.services)
