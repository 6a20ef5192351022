"""The stack spec: runbook defaults, YAML loading, and refusals that name the field."""

from pathlib import Path

import pytest

from coder_stack.errors import SpecError
from coder_stack.spec import StackSpec, load_spec, spec_yaml


def test_defaults_are_the_runbook_reference_deployment() -> None:
    spec = StackSpec()
    assert (spec.serving_namespace, spec.gateway_namespace, spec.experience_namespace) == (
        "serving",
        "litellm",
        "experience",
    )
    assert {m.name: m.served_model_name for m in spec.models} == {
        "coder-chat": "qwen2.5-coder-7b-instruct",
        "coder-fim": "qwen2.5-coder-1.5b",
        "coder-agent": "qwen2.5-coder-14b-instruct",
    }
    assert spec.model("coder-chat").selector == "app.kubernetes.io/name=coder-chat"
    assert spec.gpus == 1
    assert spec.master_key.model_dump() == {
        "namespace": "litellm",
        "name": "litellm-secrets",
        "key": "PROXY_MASTER_KEY",
    }
    assert spec.upstream_key.key == "UPSTREAM_API_KEY"
    assert (spec.vllm_key.namespace, spec.vllm_key.name, spec.vllm_key.key) == ("serving", "vllm-api-key", "api-key")
    assert [f.name for f in spec.frontends] == ["open-webui", "tabby"]
    assert spec.key("open-webui").models == ["coder-chat", "coder-fim", "embeddings"]
    assert spec.key("tabby").models == ["coder-fim", "embeddings"]


def test_phase_budgets_sum_to_the_runbook_timeouts() -> None:
    spec = StackSpec()
    assert spec.model("coder-chat").budgets.total == 1200
    assert spec.model("coder-fim").budgets.total == 600
    assert spec.timeouts.deletion_s == 120


def test_every_field_is_described() -> None:
    def walk(model: type) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            ann = field.annotation
            for sub in (*getattr(ann, "__args__", ()), ann):
                if isinstance(sub, type) and hasattr(sub, "model_fields") and sub is not model:
                    missing += walk(sub)
        return missing

    assert walk(StackSpec) == []


def test_yaml_roundtrip_and_partial_file(tmp_path: Path) -> None:
    f = tmp_path / "stack.yaml"
    f.write_text(spec_yaml(StackSpec()))
    assert load_spec(f) == StackSpec()
    f.write_text("gpus: 2\n")
    assert load_spec(f).gpus == 2
    assert load_spec(None) == StackSpec()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpus: 0\n", "gpus: Input should be greater than or equal to 1"),
        ("gpuz: 1\n", "gpuz: Extra inputs are not permitted"),
        ("virtual_keys:\n- alias: x\n  models: [coder-chat]\n  max_budget: -1\n", "virtual_keys.0.max_budget"),
        ("default_model: coder-huge\n", "default_model 'coder-huge' is not one of the models"),
        ("access:\n  overrides:\n    gateway: not a url\n", "access.overrides.gateway"),
        ("access:\n  mode: tunnel\n", "'in-cluster' or 'port-forward'"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("gpus: [\n", "not valid YAML"),
    ],
)
def test_bad_stack_file_is_refused_with_the_field_path(tmp_path: Path, text: str, expected: str) -> None:
    f = tmp_path / "stack.yaml"
    f.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(f)
    assert expected in str(info.value)


def test_missing_stack_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="Pass an existing YAML file to --stack"):
        load_spec(tmp_path / "nope.yaml")


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(SpecError, match="coder-chat, coder-fim, coder-agent"):
        StackSpec().model("coder-32b")
