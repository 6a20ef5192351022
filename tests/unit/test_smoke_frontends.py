"""smoke_frontends failures with a fake exec and fake Secrets; the tasks' retry policy and tags."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

import coder_stack.usecases.frontends as smoke_mod
from coder_stack.errors import EndpointUnavailable, SmokeFailed, SpecError
from coder_stack.spec import FrontendSpec, StackSpec
from coder_stack.tasks import gateway as gateway_tasks
from coder_stack.tasks import smoke as smoke_tasks
from coder_stack.tasks._common import only_retriable
from coder_stack.usecases.frontends import OPENWEBUI_KEY_SOURCE_CMD, OPENWEBUI_MODELS_CMD, smoke_frontends
from coder_stack.usecases.keys import render_tabby_config
from coder_stack.usecases.openwebui import PERSISTENT_CONFIG_PROBE_CMD

SPEC = StackSpec()
KEY = "sk-frontend-test-0123456789abcdef"
NO_API: Any = None  # the Open WebUI check only execs (faked); Secrets are faked too


@dataclass
class Res:
    exit_code: int
    stdout: str
    stderr: str = ""


def exec_returning(
    res: Res, seen: list[Any], persistent_config: Res | None = None, key_source: Res | None = None
) -> Any:
    """An exec that answers the curl with ``res``, the ENABLE_PERSISTENT_CONFIG probe with ``persistent_config``
    (default: set to False, so the environment wins) and the key-variable probe with ``key_source`` (default:
    only OPENAI_API_KEY is set)."""
    probe = persistent_config or Res(0, "set:False")
    source = key_source or Res(0, "OPENAI_API_KEY")

    async def fn(api: Any, namespace: str, selector: str, command: list[str], timeout_s: float) -> Res:
        seen.append((namespace, selector, command))
        if command == PERSISTENT_CONFIG_PROBE_CMD:
            return probe
        return source if command == OPENWEBUI_KEY_SOURCE_CMD else res

    return fn


def models_json(*ids: str) -> str:
    return '{"data": [' + ",".join(f'{{"id": "{i}", "object": "model"}}' for i in ids) + '], "object": "list"}'


async def test_openwebui_is_asked_from_inside_its_pod_with_its_own_env() -> None:
    seen: list[Any] = []
    ok = exec_returning(Res(0, models_json("coder-chat", "coder-fim", "embeddings")), seen)
    res = await smoke_frontends(NO_API, SPEC, ok, "http://gw", tabby=False)
    assert seen == [
        ("experience", "app.kubernetes.io/name=open-webui", OPENWEBUI_MODELS_CMD),
        ("experience", "app.kubernetes.io/name=open-webui", OPENWEBUI_KEY_SOURCE_CMD),
        ("experience", "app.kubernetes.io/name=open-webui", PERSISTENT_CONFIG_PROBE_CMD),
    ]
    assert res.checks[0].detail == "coder-chat, coder-fim, embeddings"
    assert res.checks[0].name.endswith("(key from OPENAI_API_KEY)")
    assert "ENABLE_PERSISTENT_CONFIG" in res.checks[1].name


# ------------------------------------------------- which variable Open WebUI reads its key from
# Open WebUI's backend/open_webui/config.py: OPENAI_API_KEYS (";"-separated, index-aligned with
# OPENAI_API_BASE_URLS) when set and non-empty, else OPENAI_API_KEY; likewise OPENAI_API_BASE_URLS over
# OPENAI_API_BASE_URL. The commands are run here by a real sh, with a curl that prints what it was given.
FAKE_CURL = """#!/bin/sh
for a in "$@"; do printf '%s\\n' "$a"; done
"""


def run_in_pod(command: list[str], env: dict[str, str], tmp_path: Path) -> str:
    (tmp_path / "curl").write_text(FAKE_CURL)
    (tmp_path / "curl").chmod(0o755)
    path = f"{tmp_path}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    out = subprocess.run(command, env={"PATH": path, **env}, capture_output=True, text=True, check=True, timeout=30)
    return out.stdout


OLD = "sk-old-in-openai-api-key"
NEW = "sk-new-in-openai-api-keys"


@pytest.mark.parametrize(
    ("env", "header", "url", "source"),
    [
        ({"OPENAI_API_KEY": OLD, "OPENAI_API_BASE_URL": "http://gw/v1"}, OLD, "http://gw/v1", "OPENAI_API_KEY"),
        (  # both set: OPENAI_API_KEYS wins, its first entry (stripped) for the first URL
            {"OPENAI_API_KEY": OLD, "OPENAI_API_KEYS": f" {NEW} ;sk-second", "OPENAI_API_BASE_URL": "http://gw/v1"},
            NEW,
            "http://gw/v1",
            "OPENAI_API_KEYS:other",
        ),
        (  # OPENAI_API_BASE_URLS wins over OPENAI_API_BASE_URL likewise
            {
                "OPENAI_API_KEYS": OLD,
                "OPENAI_API_KEY": OLD,
                "OPENAI_API_BASE_URLS": "http://gw2/v1/;http://x/v1",
                "OPENAI_API_BASE_URL": "http://gw/v1",
            },
            OLD,
            "http://gw2/v1",
            "OPENAI_API_KEYS:same",
        ),
        ({"OPENAI_API_KEYS": "", "OPENAI_API_KEY": OLD}, OLD, "https://api.openai.com/v1", "OPENAI_API_KEY"),
        ({}, "", "https://api.openai.com/v1", "none"),
    ],
)
def test_the_smoke_calls_with_the_key_and_url_the_app_reads(
    env: dict[str, str], header: str, url: str, source: str, tmp_path: Path
) -> None:
    args = run_in_pod(OPENWEBUI_MODELS_CMD, env, tmp_path).splitlines()
    assert args == ["-s", "-H", f"Authorization: Bearer {header}", f"{url}/models"]
    assert run_in_pod(OPENWEBUI_KEY_SOURCE_CMD, env, tmp_path) == source
    assert OLD not in run_in_pod(OPENWEBUI_KEY_SOURCE_CMD, env, tmp_path)  # the probe prints no key


async def test_openwebui_reading_another_key_from_openai_api_keys_fails_naming_the_variable() -> None:
    """The key delivered as OPENAI_API_KEY is not what the app uses when OPENAI_API_KEYS says otherwise: a
    passing /models with that other key would prove nothing about a rotation."""
    ok = exec_returning(
        Res(0, models_json("coder-chat", "coder-fim", "embeddings")), [], key_source=Res(0, "OPENAI_API_KEYS:other")
    )
    with pytest.raises(SmokeFailed) as ei:
        await smoke_frontends(NO_API, SPEC, ok, "http://gw", tabby=False)
    msg = str(ei.value)
    assert ei.value.hop == "frontend"
    assert "OPENAI_API_KEYS is set in the pod" in msg and "wins when both are set" in msg
    assert "Remove OPENAI_API_KEYS from deploy/open-webui" in msg


async def test_openwebui_reading_the_delivered_key_from_openai_api_keys_passes_and_says_so() -> None:
    ok = exec_returning(
        Res(0, models_json("coder-chat", "coder-fim", "embeddings")), [], key_source=Res(0, "OPENAI_API_KEYS:same")
    )
    res = await smoke_frontends(NO_API, SPEC, ok, "http://gw", tabby=False)
    assert res.checks[0].name.endswith("(key from OPENAI_API_KEYS)")


@pytest.mark.parametrize("probe", ["unset", "set:True", "set:TRUE"])
async def test_openwebui_whose_stored_connection_wins_fails_saying_the_check_cannot_prove_its_key(probe: str) -> None:
    """Persistence on (the variable absent, or 'true' in any case): the pod's $OPENAI_API_KEY is not what
    the app uses, so a passing curl proves nothing; the smoke says so and how to fix it."""
    ok = exec_returning(Res(0, models_json("coder-chat", "coder-fim", "embeddings")), [], Res(0, probe))
    with pytest.raises(SmokeFailed) as ei:
        await smoke_frontends(NO_API, SPEC, ok, "http://gw", tabby=False)
    msg = str(ei.value)
    assert ei.value.hop == "frontend"
    assert "stored in its database at its first launch, not $OPENAI_API_KEY" in msg
    assert "cannot prove" in msg and "ENABLE_PERSISTENT_CONFIG=False on deploy/open-webui" in msg
    assert "openwebui-secrets" in msg


@pytest.mark.parametrize("probe", ["set:False", "set:false", "set:0", "set:"])
async def test_openwebui_env_wins_for_any_value_but_true(probe: str) -> None:
    """Open WebUI's config.py: persistence is on only for 'true' (any case); every other value is off."""
    ok = exec_returning(Res(0, models_json("coder-chat", "coder-fim", "embeddings")), [], Res(0, probe))
    res = await smoke_frontends(NO_API, SPEC, ok, "http://gw", tabby=False)
    assert len(res.checks) == 2


async def test_openwebui_probe_that_cannot_run_is_a_frontend_failure() -> None:
    ok = exec_returning(Res(0, models_json("coder-chat", "coder-fim", "embeddings")), [], Res(127, "", "sh: not found"))
    with pytest.raises(SmokeFailed, match="could not read ENABLE_PERSISTENT_CONFIG") as ei:
        await smoke_frontends(NO_API, SPEC, ok, "http://gw", tabby=False)
    assert ei.value.hop == "frontend"


async def test_openwebui_frontend_name_and_selector_come_from_the_spec() -> None:
    spec = SPEC.model_copy(
        update={
            "frontends": [
                FrontendSpec(name="chat-ui", app="open-webui", selector_name="open-webui"),
                FrontendSpec(name="tabby", app="tabby"),
            ]
        }
    )
    seen: list[Any] = []
    ok = exec_returning(Res(0, models_json("coder-chat", "coder-fim", "embeddings")), seen, Res(0, "unset"))
    with pytest.raises(SmokeFailed) as ei:
        await smoke_frontends(NO_API, spec, ok, "http://gw", tabby=False)
    assert {sel for _, sel, _ in seen} == {"app.kubernetes.io/name=open-webui"}
    assert "deploy/chat-ui" in str(ei.value) and str(ei.value).startswith("[frontend] chat-ui:")
    no_webui = SPEC.model_copy(update={"frontends": [FrontendSpec(name="tabby", app="tabby")]})
    with pytest.raises(SpecError, match="no Open WebUI front-end"):
        await smoke_frontends(NO_API, no_webui, ok, "http://gw", tabby=False)


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
    assert only_retriable(None, None, _State(EndpointUnavailable("503")))
    assert not only_retriable(None, None, _State(SmokeFailed("wrong", hop="model")))
    assert not only_retriable(None, None, _State(ValueError("bug")))


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
        assert t.retry_condition_fn is only_retriable, t.name
        assert t.cache_policy is NO_CACHE, t.name
