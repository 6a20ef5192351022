"""smoke_frontends failures with a fake exec and fake Secrets; the tasks' retry policy and tags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

import coder_stack.smoke as smoke_mod
from coder_stack.errors import EndpointUnavailable, SmokeFailed
from coder_stack.keys import render_tabby_config
from coder_stack.smoke import OPENWEBUI_MODELS_CMD, smoke_frontends
from coder_stack.spec import StackSpec
from tasks import gateway as gateway_tasks
from tasks import smoke as smoke_tasks

SPEC = StackSpec()
KEY = "sk-frontend-test-0123456789abcdef"
NO_API: Any = None  # the Open WebUI check only execs (faked); Secrets are faked too


@dataclass
class Res:
    exit_code: int
    stdout: str
    stderr: str = ""


def exec_returning(res: Res, seen: list[Any]) -> Any:
    async def fn(api: Any, namespace: str, selector: str, command: list[str], timeout_s: float) -> Res:
        seen.append((namespace, selector, command))
        return res

    return fn


def models_json(*ids: str) -> str:
    return '{"data": [' + ",".join(f'{{"id": "{i}", "object": "model"}}' for i in ids) + '], "object": "list"}'


async def test_openwebui_is_asked_from_inside_its_pod_with_its_own_env() -> None:
    seen: list[Any] = []
    ok = exec_returning(Res(0, models_json("coder-chat", "coder-fim", "embeddings")), seen)
    res = await smoke_frontends(NO_API, SPEC, ok, "http://gw", tabby=False)
    assert seen == [("experience", "app.kubernetes.io/name=open-webui", OPENWEBUI_MODELS_CMD)]
    assert "$OPENAI_API_KEY" in OPENWEBUI_MODELS_CMD[2] and "$OPENAI_API_BASE_URL/models" in OPENWEBUI_MODELS_CMD[2]
    assert res.checks[0].detail == "coder-chat, coder-fim, embeddings"


async def test_openwebui_scope_drift_fails_at_the_frontend_hop_naming_the_models() -> None:
    drift = exec_returning(Res(0, models_json("coder-chat", "coder-agent")), [])
    with pytest.raises(SmokeFailed) as ei:
        await smoke_frontends(NO_API, SPEC, drift, "http://gw", tabby=False)
    assert ei.value.hop == "frontend"
    assert "missing ['coder-fim', 'embeddings']" in str(ei.value) and "extra ['coder-agent']" in str(ei.value)


async def test_openwebui_key_refused_by_the_gateway_names_litellms_error_type() -> None:
    body = '{"error": {"message": "Authentication Error, Invalid API key provided.", "type": "token_not_found_in_db"}}'
    with pytest.raises(SmokeFailed) as ei:
        await smoke_frontends(NO_API, SPEC, exec_returning(Res(0, body), []), "http://gw", tabby=False)
    assert ei.value.hop == "frontend" and "token_not_found_in_db" in str(ei.value)


async def test_curl_failure_inside_the_pod_is_a_frontend_failure() -> None:
    with pytest.raises(SmokeFailed, match="exited 7") as ei:
        await smoke_frontends(
            NO_API, SPEC, exec_returning(Res(7, "", "Could not resolve host"), []), "http://gw", tabby=False
        )
    assert ei.value.hop == "frontend"


async def test_a_wrong_tabby_config_is_named_field_by_field(monkeypatch: pytest.MonkeyPatch) -> None:
    good = render_tabby_config(SPEC, SPEC.key("tabby"), SecretStr(KEY)).get_secret_value()
    bad = good.replace("/v1", "").replace('"vllm/completion"', '"openai/completion"')

    async def fake_read_secret(api: Any, ns: str, name: str) -> dict[str, SecretStr]:
        assert (ns, name) == ("experience", "tabby-config")
        return {"config.toml": SecretStr(bad)}

    monkeypatch.setattr(smoke_mod, "read_secret", fake_read_secret)
    with pytest.raises(SmokeFailed) as ei:
        await smoke_frontends(NO_API, SPEC, exec_returning(Res(0, ""), []), "http://gw", openwebui=False)
    msg = str(ei.value)
    assert ei.value.hop == "frontend" and "kind 'openai/completion'" in msg and "api_endpoint" in msg
    assert KEY not in msg


async def test_missing_tabby_config_says_to_run_the_keys_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    async def none(api: Any, ns: str, name: str) -> None:
        return None

    monkeypatch.setattr(smoke_mod, "read_secret", none)
    with pytest.raises(SmokeFailed, match="run the keys flow"):
        await smoke_frontends(NO_API, SPEC, exec_returning(Res(0, ""), []), "http://gw", openwebui=False)


class _State:
    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc

    def result(self) -> None:
        if self.exc is not None:
            raise self.exc


def test_tasks_retry_only_retriable_errors() -> None:
    assert gateway_tasks.only_retriable(None, None, _State(EndpointUnavailable("503")))
    assert not gateway_tasks.only_retriable(None, None, _State(SmokeFailed("wrong", hop="model")))
    assert not gateway_tasks.only_retriable(None, None, _State(ValueError("bug")))


def test_tasks_have_no_gpu_tag_no_cache_and_a_retry_condition() -> None:
    tasks: list[Any] = [
        gateway_tasks.gateway_ready_task,
        gateway_tasks.ensure_keys_task,
        gateway_tasks.register_model_task,
        gateway_tasks.spend_baseline_task,
        gateway_tasks.read_spend_task,
        smoke_tasks.smoke_direct_task,
        smoke_tasks.smoke_gateway_task,
        smoke_tasks.smoke_agent_task,
        smoke_tasks.smoke_frontends_task,
    ]
    for t in tasks:
        assert "gpu" not in t.tags, t.name
        assert t.retry_condition_fn is gateway_tasks.only_retriable, t.name
        assert t.cache_policy is NO_CACHE, t.name
