"""What `coder-stack wake-setup` renders: the settings JSON of the wake contract, the ConfigMap and the RBAC, valid
YAML without a secret; where it finds the gateway's proxy config, how it mounts the files and names the callback."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from coder_stack.app.cli import app
from coder_stack.errors import SpecError
from coder_stack.spec import StackSpec
from coder_stack.usecases import wake_setup as ws

URL = "http://prefect-server.prefect.svc.cluster.local:4200/api"


def _spec(**wake: Any) -> StackSpec:
    return StackSpec.model_validate({"wake": wake}) if wake else StackSpec()


def test_settings_are_the_contracts() -> None:
    spec = _spec(fallbacks={"coder-fim": "coder-chat"}, chat_as_message=True, hold_s=15, burst_s=60, cache_s=3)
    settings = ws.wake_settings(spec, URL)
    assert ws.wake_settings(_spec(enabled=False), URL)["enabled"] is False
    assert settings == {
        "version": 1,
        "enabled": True,
        "namespace": "serving",
        "models": {
            "coder-chat": {"deployment": "coder-chat", "role": "chat", "fallback": None, "cold_start_s": 600},
            "coder-fim": {"deployment": "coder-fim", "role": "fim", "fallback": "coder-chat", "cold_start_s": 600},
            "coder-agent": {"deployment": "coder-agent", "role": "agent", "fallback": None, "cold_start_s": 600},
        },
        "prefect_api_url": URL,
        "prefect_auth_env": "PREFECT_API_AUTH_STRING",
        "chat_as_message": True,
        "hold_s": 15,
        "burst_s": 60,
        "cache_s": 3,
        "kubernetes": {
            "url": None,
            "token_file": "/var/run/secrets/kubernetes.io/serviceaccount/token",
            "ca_file": "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        },
    }


def test_render_is_valid_yaml_with_the_module_and_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "admin:s3cret-value")
    monkeypatch.setenv("PROXY_MASTER_KEY", "sk-master-s3cret")
    text = ws.render(_spec(), URL, "litellm")
    assert "s3cret" not in text
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert [(d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs] == [
        ("ConfigMap", "litellm", "coder-stack-wake"),
        ("Role", "serving", "coder-stack-wake"),
        ("RoleBinding", "serving", "coder-stack-wake"),
    ]
    cm, role, binding = docs
    assert cm["data"]["coder_stack_wake.py"] == ws.hook_source()
    assert json.loads(cm["data"]["coder_stack_wake.json"]) == ws.wake_settings(_spec(), URL)
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]}]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "litellm", "namespace": "litellm"}]
    assert 'callbacks: ["coder_stack_wake.wake_on_demand"]' in text


def test_prefect_url_from_the_option_or_the_spec_else_refused() -> None:
    assert ws.prefect_api_url(_spec(prefect_api_url=URL), None) == URL
    assert ws.prefect_api_url(_spec(prefect_api_url=URL), "http://other:4200/api/") == "http://other:4200/api"
    with pytest.raises(SpecError, match="--prefect-api-url"):
        ws.prefect_api_url(_spec(), None)
    with pytest.raises(SpecError, match="must not carry credentials"):
        ws.prefect_api_url(_spec(), "http://admin:pw@prefect:4200/api")


def test_cli_prints_the_yaml_or_says_what_to_pass() -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["wake-setup", "--prefect-api-url", URL])
    assert r.exit_code == 0, r.output
    assert [d["kind"] for d in yaml.safe_load_all(r.stdout) if d] == ["ConfigMap", "Role", "RoleBinding"]
    r = runner.invoke(app, ["wake-setup"])
    assert r.exit_code == 1 and "--prefect-api-url" in r.output


# ---------------------------------------------------------------------------------------------- the proxy config
WANT = {"callbacks": ["coder_stack_wake.wake_on_demand"]}


@pytest.mark.parametrize(
    ("text", "settings"),
    [
        ("model_list: []\n", WANT),
        ("model_list: []\nlitellm_settings:\n  drop_params: true  # keep\n", {"drop_params": True} | WANT),
        ("litellm_settings:\n    callbacks: [\"mine.x\"]\n", {"callbacks": ["mine.x", *WANT["callbacks"]]}),
        ("litellm_settings:\n  callbacks: mine.x\n", {"callbacks": ["mine.x", *WANT["callbacks"]]}),
        ("litellm_settings:\n  callbacks:\n    - mine.x\n  drop_params: true\n",
         {"callbacks": ["mine.x", *WANT["callbacks"]], "drop_params": True}),
    ],
)  # fmt: skip
def test_callback_added_keeping_the_rest(text: str, settings: dict[str, Any]) -> None:
    edited = ws.with_callback(text)
    assert edited is not None
    cfg = yaml.safe_load(edited)
    assert cfg["litellm_settings"] == settings
    assert {k: v for k, v in cfg.items() if k != "litellm_settings"} == {
        k: v for k, v in (yaml.safe_load(text) or {}).items() if k != "litellm_settings"
    }
    if "# keep" in text:
        assert "# keep" in edited  # edited as text: comments stay
    assert ws.with_callback(edited) is None  # a second run changes nothing


def test_callback_refused_when_the_config_cannot_be_edited_safely() -> None:
    with pytest.raises(ws.WakeSetupRefused, match="by hand"):
        ws.with_callback("litellm_settings: {drop_params: true}\n")
    with pytest.raises(ws.WakeSetupRefused, match="not a mapping"):
        ws.with_callback("litellm_settings: [1]\n")


def _deployment(mount: dict[str, Any], volume: dict[str, Any], args: list[str] | None = None) -> dict[str, Any]:
    container = {"name": "litellm", "args": args or ["--config", "/etc/litellm/config.yaml"], "volumeMounts": [mount]}
    return {
        "metadata": {"name": "litellm"},
        "spec": {"template": {"spec": {"containers": [container], "volumes": [volume]}}},
    }


def test_config_in_a_mounted_directory_gets_a_projected_volume() -> None:
    dep = _deployment(
        {"name": "config", "mountPath": "/etc/litellm"},
        {"name": "config", "configMap": {"name": "litellm-config", "defaultMode": 420}},
    )
    loc = ws.locate_config(dep, StackSpec())
    assert (loc.configmap, loc.key, loc.sub_path) == ("litellm-config", "config.yaml", False)
    new = ws.with_mount(dep, loc)
    assert new is not None
    vol = new["spec"]["template"]["spec"]["volumes"][0]
    assert vol == {
        "name": "config",
        "projected": {
            "defaultMode": 420,
            "sources": [
                {"configMap": {"name": "litellm-config"}},
                {
                    "configMap": {
                        "name": "coder-stack-wake",
                        "items": [
                            {"key": "coder_stack_wake.py", "path": "coder_stack_wake.py"},
                            {"key": "coder_stack_wake.json", "path": "coder_stack_wake.json"},
                        ],
                    }
                },
            ],
        },
    }
    again = ws.locate_config(new, StackSpec())
    assert again.configmap == "litellm-config" and ws.with_mount(new, again) is None


def test_config_mounted_by_subpath_gets_two_more_subpath_mounts() -> None:
    dep = _deployment(
        {"name": "cfg", "mountPath": "/app/proxy_config.yaml", "subPath": "config.yaml"},
        {"name": "cfg", "configMap": {"name": "litellm-helm-config"}},
        ["--config=/app/proxy_config.yaml"],
    )
    loc = ws.locate_config(dep, StackSpec())
    assert (loc.key, loc.sub_path, loc.directory) == ("config.yaml", True, "/app")
    new = ws.with_mount(dep, loc)
    assert new is not None
    mounts = new["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert [(m["mountPath"], m.get("subPath")) for m in mounts[1:]] == [
        ("/app/coder_stack_wake.py", "coder_stack_wake.py"),
        ("/app/coder_stack_wake.json", "coder_stack_wake.json"),
    ]
    assert ws.with_mount(new, ws.locate_config(new, StackSpec())) is None


def test_refused_when_the_config_is_not_in_a_mounted_configmap() -> None:
    baked = _deployment({"name": "x", "mountPath": "/data"}, {"name": "x", "emptyDir": {}})
    with pytest.raises(ws.WakeSetupRefused, match="add to that config"):
        ws.locate_config(baked, StackSpec())
    secret = _deployment({"name": "s", "mountPath": "/etc/litellm"}, {"name": "s", "secret": {"secretName": "c"}})
    with pytest.raises(ws.WakeSetupRefused, match="no --config"):
        ws.locate_config(secret, StackSpec())


def test_the_proxy_configs_own_fallbacks_are_carried_into_the_callback_the_spec_winning() -> None:
    """The callback answers before LiteLLM's router, so a fallback configured for the router would never be tried
    for a model that is down: wake-setup carries it into the callback's settings (the spec's own choice wins)."""
    config = (
        "model_list: []\n"
        "router_settings:\n  fallbacks: [{coder-chat: [gpt-4o-mini, other]}, {embeddings: [e2]}]\n"
        "litellm_settings:\n  fallbacks: [{coder-fim: [small-fim]}, {coder-chat: [never-this]}]\n"
    )
    assert ws.proxy_fallbacks(config) == {
        "coder-chat": "gpt-4o-mini",
        "embeddings": "e2",
        "coder-fim": "small-fim",
    }
    spec, lines = ws.with_proxy_fallbacks(_spec(fallbacks={"coder-fim": "coder-chat"}), config)
    settings = ws.wake_settings(spec, URL)["models"]
    assert settings["coder-chat"]["fallback"] == "gpt-4o-mini"
    assert settings["coder-fim"]["fallback"] == "coder-chat"  # the spec's, not the proxy's
    assert lines == [
        "kept LiteLLM's fallback coder-chat -> gpt-4o-mini (from the proxy config): while coder-chat is down the "
        "callback sends its requests to gpt-4o-mini"
    ]
    assert ws.with_proxy_fallbacks(StackSpec(), "model_list: []\n") == (StackSpec(), [])
    assert ws.proxy_fallbacks("{not yaml") == {}
