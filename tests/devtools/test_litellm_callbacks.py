"""The LiteLLM stand-in loads ``litellm_settings.callbacks`` from the pod's mounted files and calls them as the
real 1.108.7 proxy does (devtools/simstack/standins/litellm/callbacks.py), with small callbacks of the test's own.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from simstack.standins import ContainerRun, PodAccess, SimServices, start_standin
from simstack.standins.litellm.callbacks import CallbackLoadError

from tests.kits.gateway import service_resolver

MASTER = "sk-master-cb-0123456789"
UPSTREAM = "upstream-cb-key"
DOM = "svc.cluster.local"
CONF_DIR = "/etc/litellm"
CONF = f"{CONF_DIR}/proxy_config.yaml"

# A callback as a user writes one: a module-level instance whose class defines the hooks. What it does is
# chosen by the request's "user" field; every call is recorded in CALLS for the test to read.
PROBE = textwrap.dedent(
    """
    import json
    import os
    from pathlib import Path

    from fastapi import HTTPException
    from litellm.proxy._types import ProxyException

    ENV = os.environ
    ROOT = "/"
    CALLS = []
    FAILURES = []
    TASKS = []
    SETTINGS = json.loads(Path(__file__).with_name("probe_settings.json").read_text())


    class Probe:
        async def async_pre_call_hook(self, user_api_key_dict, cache, data, call_type):
            CALLS.append({"call_type": call_type, "model": data.get("model"), "keys": sorted(data),
                          "token": user_api_key_dict.token, "user_role": user_api_key_dict.user_role,
                          "end_user_id": user_api_key_dict.end_user_id, "cache": type(cache).__name__})
            what = data.get("user") or ""
            if what == "http503":
                raise HTTPException(status_code=503, detail={"error": "coder-chat is starting"},
                                    headers={"Retry-After": "420"})
            if what == "proxy503":  # LiteLLM's own exception class, from the image's litellm
                raise ProxyException("coder-fim waits for the GPU", "internal_server_error", None, 503,
                                     headers={"Retry-After": "600"})
            if what == "string":
                return "refused by hook"
            if what == "valueerror":
                raise ValueError("boom from hook")
            if what == "mock":
                data["mock_response"] = "the model is starting"
                return data
            if what == "reroute":
                data["model"] = SETTINGS["fallback"]
                return data
            if what == "spawn":  # a background task, as a cache refresh is; the module keeps a handle
                import asyncio
                TASKS.append(asyncio.get_running_loop().create_task(asyncio.sleep(3600)))
                return None
            if what == "seams":
                sa = Path(ROOT) / "var/run/secrets/kubernetes.io/serviceaccount"
                data["mock_response"] = json.dumps({
                    "host": ENV.get("KUBERNETES_SERVICE_HOST"), "port": ENV.get("KUBERNETES_SERVICE_PORT"),
                    "token": (sa / "token").read_text(), "ca": (sa / "ca.crt").read_text(),
                    "auth": ENV.get("PREFECT_API_AUTH_STRING"),
                })
                return data
            return None

        async def async_post_call_failure_hook(self, request_data, original_exception, user_api_key_dict,
                                               traceback_str=None):
            FAILURES.append({"type": type(original_exception).__name__, "model": request_data.get("model"),
                             "message": str(original_exception)})
            if request_data.get("user") == "transform":
                return HTTPException(status_code=503, detail={"error": "replaced by the failure hook"})
            if request_data.get("user") == "fails":
                raise RuntimeError("the failure hook itself fails")
            return None


    probe = Probe()
    """
)
SETTINGS = {"fallback": "coder-fim"}
DATACLASS_MODULE = (
    "from __future__ import annotations\nfrom dataclasses import dataclass\n\n\n@dataclass\nclass A:\n"
    "    x: int = 1\n\n\ninst = A()\n"
)


def _config(callbacks: Any = ("probe.probe",)) -> dict[str, Any]:
    def model(alias: str, served: str) -> dict[str, Any]:
        params = {"model": f"openai/{served}", "api_base": f"http://{alias}.serving.{DOM}:8000/v1"}
        return {"model_name": alias, "litellm_params": params | {"api_key": "os.environ/UPSTREAM_API_KEY"}}

    return {
        "model_list": [model("coder-chat", "qwen-chat"), model("coder-fim", "qwen-fim"), model("coder-down", "gone")],
        "general_settings": {"master_key": "os.environ/PROXY_MASTER_KEY", "store_model_in_db": True},
        "litellm_settings": {
            "drop_params": True,
            "callbacks": list(callbacks) if isinstance(callbacks, tuple) else callbacks,
        },
    }


def _run(config: dict[str, Any], files: dict[str, str], pod: str = "litellm-0") -> ContainerRun:
    return ContainerRun(
        namespace="litellm",
        pod_name=pod,
        app="litellm",
        image="ghcr.io/berriai/litellm:main-v1.108.7",
        args=["--config", CONF, "--port", "4000"],
        env={"PROXY_MASTER_KEY": MASTER, "UPSTREAM_API_KEY": UPSTREAM, "PREFECT_API_AUTH_STRING": "admin:pw"},
        files={CONF: yaml.safe_dump(config)} | {f"{CONF_DIR}/{k}": v for k, v in files.items()},
        container_port=4000,
        service_account="litellm",
    )


def _probe_files() -> dict[str, str]:
    return {"probe.py": PROBE, "probe_settings.json": json.dumps(SETTINGS)}


@asynccontextmanager
async def _stack(tmp_path: Path, config: dict[str, Any] | None = None) -> AsyncIterator[tuple[str, Any, list[str]]]:
    """vLLM stand-ins for coder-chat and coder-fim (coder-down has no server), the gateway with the probe."""
    hosts: dict[str, int] = {}
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nsim\n-----END CERTIFICATE-----\n")
    issued: list[str] = []

    def issue(ns: str, sa: str) -> str:
        issued.append(f"{ns}/{sa}")
        return f"token-for-{ns}-{sa}"

    services = SimServices(resolve_url=service_resolver(hosts), time_scale=0.01)
    services.pod_access = PodAccess("127.0.0.1", 6443, ca, issue)
    backends = []
    try:
        for alias, served in (("coder-chat", "qwen-chat"), ("coder-fim", "qwen-fim")):
            run = ContainerRun(
                "serving", f"{alias}-0", alias, "vllm/vllm-openai:v0.32.0", ["--served-model-name", served], {}
            )
            b = await start_standin(run, services)
            assert b is not None
            backends.append(b)
            hosts[f"{alias}.serving.{DOM}"] = b.port
        gw = await start_standin(_run(config or _config(), _probe_files()), services)
        assert gw is not None
        backends.append(gw)
        yield f"http://127.0.0.1:{gw.port}", gw, issued
    finally:
        for b in backends:
            await b.stop()


def _calls(gw: Any) -> list[dict[str, Any]]:
    return gw.proxy.state.callbacks.instances[0].async_pre_call_hook.__globals__["CALLS"]  # type: ignore[no-any-return]


def _failures(gw: Any) -> list[dict[str, Any]]:
    return gw.proxy.state.callbacks.instances[0].async_pre_call_hook.__globals__["FAILURES"]  # type: ignore[no-any-return]


def _m() -> dict[str, str]:
    return {"Authorization": f"Bearer {MASTER}"}


def _chat(model: str, user: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "user": user, "messages": [{"role": "user", "content": "hi"}], **kw}


async def test_hook_called_per_route_with_litellm_call_types_after_auth(tmp_path: Path) -> None:
    async with _stack(tmp_path) as (url, gw, _), httpx.AsyncClient(base_url=url) as c:
        assert "probe" not in sys.modules  # loaded as a module object of its own
        r = await c.post("/v1/chat/completions", json=_chat("coder-chat", "none"))
        assert r.status_code == 401  # authentication first: the hook never sees an unauthenticated call
        assert _calls(gw) == []
        # ... but the failure hook does, as LiteLLM's auth exception handler runs it
        assert [(f["type"], f["model"]) for f in _failures(gw)] == [("ProxyCallError", "coder-chat")]
        r = await c.post("/v1/chat/completions", headers=_m(), json=_chat("coder-chat", "none"))
        assert r.status_code == 200, r.text
        r = await c.post("/v1/completions", headers=_m(), json={"model": "coder-fim", "prompt": "def", "user": "x"})
        assert r.status_code == 200, r.text
        r = await c.post("/v1/embeddings", headers=_m(), json={"model": "coder-chat", "input": "x", "user": "y"})
        # before the router: an alias the gateway lacks still reaches the hook, then the router refuses it
        r2 = await c.post("/v1/chat/completions", headers=_m(), json=_chat("ghost", "none"))
        assert r2.status_code == 400 and "Invalid model name" in r2.json()["error"]["message"]
        calls = _calls(gw)
        assert [x["call_type"] for x in calls] == ["acompletion", "atext_completion", "aembedding", "acompletion"]
        assert calls[-1]["model"] == "ghost"
        first = calls[0]
        assert first["token"] == "litellm_proxy_master_key" and first["user_role"] == "proxy_admin"
        assert first["end_user_id"] == "none" and first["cache"] == "DualCache"
        assert {"litellm_call_id", "metadata", "proxy_server_request", "messages", "model"} <= set(first["keys"])
        # the unknown alias's refusal reached the failure hook
        assert _failures(gw)[-1]["model"] == "ghost"


async def test_hook_raises_http_exception_503_as_the_real_proxy_answers(tmp_path: Path) -> None:
    async with _stack(tmp_path) as (url, gw, _), httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/chat/completions", headers=_m(), json=_chat("coder-chat", "http503"))
        assert r.status_code == 503
        assert r.headers["retry-after"] == "420"
        assert r.headers["x-litellm-response-cost"] == "0" and r.headers["x-litellm-key-spend"] == "0.0"
        assert r.headers["x-litellm-call-id"]
        assert r.json() == {
            "error": {
                "message": "coder-chat is starting",
                "type": "internal_server_error",
                "param": None,
                "code": "503",
                "provider_specific_fields": {"error": "coder-chat is starting"},
            }
        }
        # /completions (Tabby's route) shows it differently on 1.108.7: no Retry-After, the detail as Python prints it
        r = await c.post("/v1/completions", headers=_m(), json={"model": "coder-fim", "prompt": "d", "user": "http503"})
        assert r.status_code == 503 and "retry-after" not in r.headers
        assert r.json() == {
            "error": {"message": "503: {'error': 'coder-chat is starting'}", "type": "None", "param": "None",
                      "code": "503"}
        }  # fmt: skip
        assert [f["type"] for f in _failures(gw)] == ["HTTPException", "HTTPException"]
        assert gw.proxy.state.services.counters.get("litellm:upstream:coder-chat") is None  # never routed


async def test_a_hooks_proxy_exception_is_answered_as_recorded_on_both_routes(tmp_path: Path) -> None:
    """Recorded (hook-down-chat-503, hook-fim-waiting-for-gpu-503): a ProxyException keeps its Retry-After on
    /completions too, where an HTTPException loses it — so a hook that raises LiteLLM's class (the product's wake
    hook does) gives Tabby a Retry-After. The class comes from the image's litellm: the stand-in lends it only
    while the module loads."""
    async with _stack(tmp_path) as (url, _gw, _), httpx.AsyncClient(base_url=url) as c:
        assert "litellm" not in sys.modules
        want = {"message": "coder-fim waits for the GPU", "type": "internal_server_error", "param": None, "code": "503"}
        r = await c.post(
            "/v1/completions", headers=_m(), json={"model": "coder-fim", "prompt": "d", "user": "proxy503"}
        )
        assert r.status_code == 503 and r.headers["retry-after"] == "600", r.headers
        assert r.json() == {"error": want}
        assert "x-litellm-response-cost" not in r.headers
        r = await c.post("/v1/chat/completions", headers=_m(), json=_chat("coder-chat", "proxy503"))
        assert r.status_code == 503 and r.headers["retry-after"] == "600"
        assert r.json() == {"error": want}
        assert r.headers["x-litellm-response-cost"] == "0" and r.headers["x-litellm-key-spend"] == "0.0"


async def test_hook_string_and_other_exception(tmp_path: Path) -> None:
    async with _stack(tmp_path) as (url, _gw, _), httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/chat/completions", headers=_m(), json=_chat("coder-chat", "string"))
        assert r.status_code == 400
        assert r.json()["error"] == {
            "message": "refused by hook",
            "type": "invalid_request_error",
            "param": None,
            "code": "400",
            "provider_specific_fields": {"error": "refused by hook"},
        }
        r = await c.post("/v1/chat/completions", headers=_m(), json=_chat("coder-chat", "valueerror"))
        assert r.status_code == 500
        assert r.json()["error"] == {"message": "boom from hook", "type": "internal_server_error", "param": None,
                                     "code": "500"}  # fmt: skip


async def test_hook_reroutes_and_mocks(tmp_path: Path) -> None:
    async with _stack(tmp_path) as (url, gw, _), httpx.AsyncClient(base_url=url) as c:
        counters = gw.proxy.state.services.counters
        r = await c.post("/v1/chat/completions", headers=_m(), json=_chat("coder-chat", "reroute"))
        assert r.status_code == 200, r.text
        # the answer names the alias asked for; the one that served is in the model-group header
        assert r.json()["model"] == "coder-chat" and r.headers["x-litellm-model-group"] == "coder-fim"
        assert counters.get("litellm:upstream:coder-fim") == 1 and counters.get("litellm:upstream:coder-chat") is None

        r = await c.post("/v1/chat/completions", headers=_m(), json=_chat("coder-chat", "mock"))
        assert r.status_code == 200
        body = r.json()
        assert body["choices"] == [
            {"finish_reason": "stop", "index": 0, "message": {"content": "the model is starting", "role": "assistant"}}
        ]
        assert body["usage"] == {"completion_tokens": 20, "prompt_tokens": 10, "total_tokens": 30}
        assert body["object"] == "chat.completion" and body["model"] == "coder-chat"
        assert counters.get("litellm:upstream:coder-chat") == 1  # answered by the gateway, not the model

        async with c.stream(
            "POST", "/v1/chat/completions", headers=_m(), json=_chat("coder-chat", "mock", stream=True)
        ) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            lines = [ln async for ln in s.aiter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
        assert text == "the model is starting" and len(chunks) > 2
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}


async def test_failure_hook_on_unreachable_upstream(tmp_path: Path) -> None:
    async with _stack(tmp_path) as (url, gw, _), httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/chat/completions", headers=_m(), json=_chat("coder-down", "none"))
        assert r.status_code == 500
        fail = _failures(gw)[-1]
        assert fail["type"] == "InternalServerError" and fail["model"] == "coder-down"
        assert "Connection error" in fail["message"]
        # an HTTPException the failure hook returns replaces the error; one it raises changes nothing
        r = await c.post("/v1/chat/completions", headers=_m(), json=_chat("coder-down", "transform"))
        assert r.status_code == 503 and r.json()["error"]["message"] == "replaced by the failure hook"
        r = await c.post("/v1/chat/completions", headers=_m(), json=_chat("coder-down", "fails"))
        assert r.status_code == 500 and "Connection error" in r.json()["error"]["message"]


async def test_module_gets_the_pods_seams(tmp_path: Path) -> None:
    """ENV: the container's environment plus the kubernetes Service's variables; ROOT: the pod's files, with the
    ServiceAccount token (issued for the pod's ServiceAccount) and the CA at the in-cluster paths."""
    async with _stack(tmp_path) as (url, _gw, issued), httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/chat/completions", headers=_m(), json=_chat("coder-chat", "seams"))
        assert r.status_code == 200, r.text
        seen = json.loads(r.json()["choices"][0]["message"]["content"])
        assert seen["host"] == "127.0.0.1" and seen["port"] == "6443"
        assert seen["token"] == "token-for-litellm-litellm" and issued == ["litellm/litellm"]
        assert "BEGIN CERTIFICATE" in seen["ca"]
        assert seen["auth"] == "admin:pw"


async def test_two_gateways_load_their_own_module(tmp_path: Path) -> None:
    services = SimServices(resolve_url=service_resolver({}), time_scale=0.01)
    a = await start_standin(_run(_config(), _probe_files(), "litellm-a"), services)
    b = await start_standin(
        _run(_config(), _probe_files() | {"probe_settings.json": json.dumps({"fallback": "x"})}, "litellm-b"), services
    )
    assert a is not None and b is not None
    try:
        assert _calls(a) is not _calls(b)
        sa = a.proxy.state.callbacks.instances[0].async_pre_call_hook.__globals__["SETTINGS"]  # type: ignore[attr-defined]
        sb = b.proxy.state.callbacks.instances[0].async_pre_call_hook.__globals__["SETTINGS"]  # type: ignore[attr-defined]
        assert sa == SETTINGS and sb == {"fallback": "x"}
    finally:
        await a.stop()
        await b.stop()


async def test_the_callbacks_tasks_end_with_the_pod() -> None:
    """The module runs on the simulator's loop: what it started ends when the stand-in stops, as with its process."""
    services = SimServices(resolve_url=service_resolver({}), time_scale=0.01)
    gw = await start_standin(_run(_config(), _probe_files()), services)
    assert gw is not None
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
            r = await c.post("/v1/chat/completions", headers=_m(), json=_chat("ghost", "spawn"))
            assert r.status_code == 400  # the router refuses the alias; the hook ran first
        tasks = gw.proxy.state.callbacks.instances[0].async_pre_call_hook.__globals__["TASKS"]  # type: ignore[attr-defined]
        assert len(tasks) == 1 and not tasks[0].done()
    finally:
        await gw.stop()
    await asyncio.wait(tasks, timeout=5)
    assert tasks[0].cancelled()


@pytest.mark.parametrize(
    ("callbacks", "files", "message"),
    [
        (["missing.probe"], {}, "Could not import probe from missing"),
        (["broken.probe"], {"broken.py": "import not_a_module_anywhere\n"}, "Could not import probe from broken"),
        (["probe.Probe"], None, "resolved to the class"),
        (["probe.nothing"], None, "Could not import nothing from probe"),
        # not in sys.modules, as LiteLLM loads it: a dataclass under postponed annotations fails at import
        # (checked with LiteLLM 1.108.7's Python and its loader's calls)
        (["dc.inst"], {"dc.py": DATACLASS_MODULE}, "AttributeError"),
    ],
)
async def test_callback_that_cannot_load_stops_the_proxy(
    callbacks: list[str], files: dict[str, str] | None, message: str
) -> None:
    services = SimServices(resolve_url=service_resolver({}), time_scale=0.01)
    with pytest.raises(CallbackLoadError, match=message):
        await start_standin(_run(_config(tuple(callbacks)), _probe_files() if files is None else files), services)


async def test_callbacks_as_a_single_string(tmp_path: Path) -> None:
    async with _stack(tmp_path, _config("probe.probe")) as (url, gw, _), httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/chat/completions", headers=_m(), json=_chat("coder-chat", "string"))
        assert r.status_code == 400 and len(_calls(gw)) == 1
