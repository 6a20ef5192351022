"""Every name a stack file can change, changed: the flows still find, scale, key and restart the right things.

Names come from the spec alone (models, aliases, front-ends, keys, Secrets, namespaces); nothing in the product
may assume the reference deployment's names. A rotated Open WebUI key must restart *its* Deployment, whatever it
is called.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes_asyncio import client
from prefect.client.orchestration import get_client
from simstack.stack import SimStack
from simstack.store import Store

from coder_stack.flows.keys import KeyOptions, manage_keys
from coder_stack.flows.teardown import teardown
from coder_stack.flows.validate import ValidateOptions, validate_coder_stack
from coder_stack.kubernetes.client import ClusterTarget, open_api, read_secret
from coder_stack.spec import ClientKeySpec, FrontendSpec, StackSpec
from tests.kits.flowkit import conn, drop_crash_automation

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


async def test_the_scheduled_teardown_deployed_by_setup_scales_the_renamed_models_through_a_process_worker(
    make_sim: Callable[..., SimStack], prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`coder-stack setup --stack FILE --kubeconfig PATH`, then the 19:00 teardown as the process worker runs it:
    its run reads the stack from the block setup wrote and the cluster from that kubeconfig, so it finds the
    models named otherwise (a run of the reference stack fails on NotFound and leaves chat-7b billing)."""
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

    from coder_stack.app.setup import PROCESS_POOL, run_setup
    from coder_stack.orchestration.stack_block import load_stack_block
    from tests.kits.flowkit import PREFECT_BIN, PROJECT, flow_process_env, stop_group

    spec = StackSpec.model_validate(renamed_spec().model_dump())
    sim = make_sim(spec=spec)
    sim.call(_scale, sim.store, "models", "chat-7b", 1)
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    block = f"renamed-{uuid.uuid4().hex[:8]}"
    report = await run_setup(gpus=1, spec=spec, stack_block=block, kubeconfig=sim.kubeconfig_path)
    worker: subprocess.Popen[bytes] | None = None
    try:
        assert report.deployed, report.deploy_output
        assert f"stack in block {block!r}" in report.connection and str(sim.kubeconfig_path) in report.connection
        assert "the stack's Deployments exist in the cluster" in report.cluster, report.cluster
        assert await load_stack_block(block) == spec
        async with get_client() as client:
            deps = await client.read_deployments(
                work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[PROCESS_POOL]))
            )
            want = {"stack_block": block, "kubeconfig": str(sim.kubeconfig_path.resolve())}
            by_name = {d.name: d for d in deps}
            for name in ("morning-bring-up", "evening-teardown", "reclaim-idle-models", "validate-coder-stack"):
                assert by_name[name].parameters == {"connection": want}, (name, by_name[name].parameters)
            in_cluster = await client.read_deployment_by_name("teardown/evening-teardown-in-cluster")
            assert in_cluster.parameters == {"connection": {"stack_block": block}}, in_cluster.parameters
            teardown_dep = await client.read_deployment_by_name("teardown/evening-teardown")
            assert teardown_dep.schedules and teardown_dep.schedules[0].active
            run = await client.create_flow_run_from_deployment(teardown_dep.id)
        with (tmp_path / "worker.log").open("wb") as out:
            worker = subprocess.Popen(
                [str(PREFECT_BIN), "worker", "start", "--pool", PROCESS_POOL, "--install-policy", "never"],
                cwd=PROJECT,
                env=flow_process_env(prefect_api, tmp_path),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        async with get_client() as client:
            deadline = asyncio.get_running_loop().time() + 120
            while not (fr := await client.read_flow_run(run.id)).state or not fr.state.is_final():
                assert asyncio.get_running_loop().time() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
                await asyncio.sleep(0.5)  # polling the run's state, not a synchronisation
        assert fr.state.is_completed(), (fr.state, (tmp_path / "worker.log").read_text()[-3000:])
        replicas = sim.call(
            lambda s: {n: s.get("deployments", ns, n)["spec"]["replicas"] for ns, n in spec.deployments()}, sim.store
        )
        assert set(replicas.values()) == {0}, replicas
    finally:
        if worker is not None:
            stop_group(worker)
        async with get_client() as client:  # later flow tests share this server: no schedules, no automation left
            for d in await client.read_deployments(
                work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[PROCESS_POOL]))
            ):
                await client.delete_deployment(d.id)
        await drop_crash_automation()


def _scale(store: Store, ns: str, name: str, reps: int) -> None:
    d = store.get("deployments", ns, name)
    d["spec"]["replicas"] = reps
    store.update("deployments", d)
