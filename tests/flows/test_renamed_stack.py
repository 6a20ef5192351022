"""Every name a stack file can change, changed: the flows still find, scale, key and restart the right things.

Names come from the spec alone (models, aliases, front-ends, keys, Secrets, namespaces); nothing in the product
may assume the reference deployment's names. A rotated Open WebUI key must restart *its* Deployment, whatever it
is called.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from kubernetes_asyncio import client

from coder_stack.kubernetes.client import ClusterTarget, open_api, read_secret
from coder_stack.spec import ClientKeySpec, FrontendSpec, StackSpec
from flows.keys import KeyOptions, manage_keys
from flows.teardown import teardown
from flows.validate import ValidateOptions, validate_coder_stack
from simstack.stack import SimStack
from tests.kits.flowkit import conn

pytestmark = pytest.mark.usefixtures("gpu_limit")

REF = StackSpec()
RENAMED_MODELS = {"coder-chat": "chat-7b", "coder-fim": "fim-1b", "coder-agent": "agent-14b"}
ALIASES = {"coder-chat": "chat", "coder-fim": "fill", "coder-agent": "agent", "embeddings": "embed"}


def renamed_spec() -> StackSpec:
    models = [m.model_copy(update={"name": RENAMED_MODELS[m.name], "alias": ALIASES[m.alias]}) for m in REF.models]
    keys = [
        ClientKeySpec(alias="webui-key", models=["chat", "fill", "embed"], deliver_to="openwebui-secrets"),
        ClientKeySpec(alias="ide-key", models=["fill", "embed"], deliver_to="tabby-config"),
        ClientKeySpec(alias="agent-key", models=["agent"], deliver_to="keystore"),
    ]
    return REF.model_copy(
        update={
            "serving_namespace": "models",
            "experience_namespace": "apps",
            "models": models,
            "default_model": "chat-7b",
            "embeddings_alias": "embed",
            "frontends": [
                FrontendSpec(name="webui", app="open-webui"),
                FrontendSpec(name="ide-completion", app="tabby"),
            ],
            "virtual_keys": keys,
            "openwebui_secret": "webui-env",
            "tabby_config_secret": "ide-config",
            "keystore_secret": "stack-keys",
            "vllm_key": REF.vllm_key.model_copy(update={"namespace": "models"}),
        }
    )


async def test_a_stack_with_every_name_changed_validates_rotates_and_tears_down(
    make_sim: Callable[..., SimStack], tmp_path: object
) -> None:
    from pathlib import Path

    from coder_stack.spec import spec_yaml

    spec = StackSpec.model_validate(renamed_spec().model_dump())  # validated like a stack file
    stack_file = Path(str(tmp_path)) / "stack.yaml"
    stack_file.write_text(spec_yaml(spec))
    sim = make_sim(spec=spec)
    c = conn(sim, stack_file=str(stack_file))

    report = await validate_coder_stack(options=ValidateOptions(stages=["chat", "fim", "agent"]), connection=c)
    assert report.outcome == "passed", report.to_markdown()
    assert [m.model for m in report.models] == ["chat-7b", "fim-1b", "agent-14b"]
    assert all(s.ok for m in report.models for s in m.smokes)
    assert {s.alias for s in report.spend} == {"webui-key", "ide-key", "agent-key"}

    target = ClusterTarget(kubeconfig=str(sim.kubeconfig_path))
    async with open_api(target) as api:
        before = await read_secret(api, "apps", "webui-env")
        stamp = {"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "x"}}}}}
        await client.AppsV1Api(api).patch_namespaced_deployment("webui", "apps", stamp)
    rotated = await manage_keys(options=KeyOptions(aliases=["webui-key"], rotate=True), connection=c)
    assert rotated.key_actions[0].startswith("webui-key: rotated"), rotated.key_actions
    async with open_api(target) as api:
        after = await read_secret(api, "apps", "webui-env")
        dep = await client.AppsV1Api(api).read_namespaced_deployment("webui", "apps")
    assert (
        before and after and after["OPENAI_API_KEY"].get_secret_value() != before["OPENAI_API_KEY"].get_secret_value()
    )
    assert dep.spec.template.metadata.annotations["kubectl.kubernetes.io/restartedAt"] != "x"  # its consumer restarted

    down = await teardown(connection=c)
    assert set(down.final_state.values()) == {0}, down.final_state
    assert set(down.final_state) == {f"{ns}/{n}" for ns, n in spec.deployments()}
