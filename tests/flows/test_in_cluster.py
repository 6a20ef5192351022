"""Running the flows where the cluster is: the stack spec and the cluster access kept in Prefect blocks, and
`coder-stack setup` creating them and the Kubernetes work pool.

What users rely on: a ``CoderStackSpec`` block round-trips the spec and, edited into something invalid, fails
with the same field-path lines as a bad stack file, before anything changes; a ``KubernetesCredentials``
block (prefect-kubernetes) reaches the cluster as a kubeconfig file does, exec-plugin tokens included, and
its contents never show in a parameter, result, log line or error; setup run twice creates the blocks and
the pool once and then changes nothing, and keeps a pool value someone changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import BlockDocumentUpdate, WorkPoolUpdate
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.exceptions import ObjectNotFound
from prefect_kubernetes.credentials import KubernetesClusterConfig, KubernetesCredentials
from simstack.stack import SimStack

from coder_stack.app.setup import K8S_POOL, k8s_base_job_template, run_setup
from coder_stack.errors import ConfigError, SpecError
from coder_stack.flows.keys import manage_keys
from coder_stack.flows.params import Connection
from coder_stack.flows.teardown import teardown
from coder_stack.kubernetes.client import ClusterTarget, load_configuration, open_api
from coder_stack.kubernetes.workloads import deployment_status
from coder_stack.orchestration.stack_block import BLOCK_TYPE_SLUG, load_stack_block, save_stack_block
from coder_stack.spec import StackSpec, load_spec
from tests.kits.flowkit import drop_crash_automation, replicas
from tests.kits.kubeconfigs import exec_kubeconfig

IMAGE = "ghcr.io/acme/coder-stack:0.1.0"


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


async def corrupt_stack_block(name: str, edit: Callable[[dict], None]) -> None:
    """Edit the stored block as the API would store any JSON (the UI's form checks less than the model)."""
    async with get_client() as client:
        doc = await client.read_block_document_by_name(name, block_type_slug=BLOCK_TYPE_SLUG)
        data = json.loads(json.dumps(doc.data))
        edit(data["spec"])
        await client.update_block_document(doc.id, BlockDocumentUpdate(data=data))


async def save_credentials(name: str, kubeconfig: Path) -> None:
    creds = KubernetesCredentials(cluster_config=KubernetesClusterConfig.from_file(kubeconfig, "coder-sim"))
    await creds.asave(name, overwrite=True)


# ------------------------------------------------------------------ the stack spec block
async def test_a_stack_block_round_trips_the_spec(prefect_api: str) -> None:
    name = unique("stack")
    spec = StackSpec.model_validate(
        {"idle_after_s": 900, "access": {"mode": "in-cluster", "overrides": {"gateway": "http://gw.example:4000"}}}
    )
    assert await save_stack_block(name, spec) == "created"
    assert await save_stack_block(name, spec) == "unchanged"
    assert await load_stack_block(name) == spec
    assert (await Connection(stack_block=name).resolve())[0] == spec
    assert await save_stack_block(name, StackSpec()) == "updated"
    assert await load_stack_block(name) == StackSpec()


async def test_a_bad_stack_block_names_the_field_as_a_bad_file_does(
    prefect_api: str, sim: SimStack, tmp_path: Path
) -> None:
    name = unique("stack")
    await save_stack_block(name, StackSpec())

    def bad(spec: dict) -> None:
        spec["models"][1]["weights_gb"] = -1
        spec["gpu_count"] = 2  # not a field

    await corrupt_stack_block(name, bad)
    with pytest.raises(SpecError) as from_block:
        await load_stack_block(name)
    bad_file = tmp_path / "stack.yaml"
    bad_file.write_text(
        json.dumps({**StackSpec().model_dump(mode="json"), "gpu_count": 2}).replace(
            '"weights_gb": 3.1', '"weights_gb": -1'
        )
    )
    with pytest.raises(SpecError) as from_file:
        load_spec(bad_file)
    lines = [ln for ln in str(from_block.value).splitlines() if ln.startswith("  - ")]
    assert lines == [ln for ln in str(from_file.value).splitlines() if ln.startswith("  - ")]
    assert lines == [
        "  - models.1.weights_gb: Input should be greater than 0",
        "  - gpu_count: Extra inputs are not permitted",
    ]
    assert str(from_block.value).startswith(f"stack block {name!r} (coder-stack-spec): 2 problem(s):")

    # A flow given that block refuses before touching the cluster, naming the field.
    before, mark = replicas(sim), len(sim.timeline)
    with pytest.raises(SpecError, match=r"models\.1\.weights_gb"):
        await teardown(connection=Connection(kubeconfig=str(sim.kubeconfig_path), stack_block=name))
    with pytest.raises(SpecError, match="does not exist; create it with `coder-stack setup --stack FILE"):
        await teardown(connection=Connection(kubeconfig=str(sim.kubeconfig_path), stack_block=unique("missing")))
    assert sim.timeline[mark:] == []
    assert replicas(sim) == before


def test_a_connection_takes_one_source_of_each() -> None:
    with pytest.raises(ValueError, match="stack_file or stack_block"):
        Connection(stack_file="stack.yaml", stack_block="coder-stack")
    with pytest.raises(ValueError, match="kubeconfig or credentials_block"):
        Connection(kubeconfig="/k", credentials_block="cluster")
    schema = json.dumps(Connection.model_json_schema())
    assert "stack_block" in schema and "credentials_block" in schema  # shown in a deployment's parameters


# ------------------------------------------------------------------ the cluster from a KubernetesCredentials block
async def test_a_flow_reaches_the_cluster_through_a_credentials_block_and_never_shows_its_token(
    prefect_api: str, make_sim: Callable[..., SimStack]
) -> None:
    token = "tok-" + secrets.token_hex(16)
    sim = make_sim(api_token=token)
    assert token in sim.kubeconfig_path.read_text()
    creds, stack = unique("cluster"), unique("stack")
    await save_credentials(creds, sim.kubeconfig_path)
    await save_stack_block(stack, StackSpec())

    connection = Connection(credentials_block=creds, stack_block=stack)
    state: Any = await manage_keys(connection=connection, return_state=True)
    report = await state.result()
    assert report.outcome == "passed", report
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    async with get_client() as client:
        run = await client.read_flow_run(run_id)
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    assert run.parameters["connection"]["credentials_block"] == creds
    seen = json.dumps(run.parameters) + report.model_dump_json() + "\n".join(log.message for log in logs)
    assert token not in seen

    # An unknown context fails with the block's contexts, not its contents; a missing block says how to make one.
    with pytest.raises(ConfigError) as err:
        await load_configuration(ClusterTarget(credentials_block=creds, context="prod"))
    assert "context 'prod' is not in KubernetesCredentials block" in str(err.value) and token not in str(err.value)
    with pytest.raises(ConfigError, match="does not exist; create it with `coder-stack setup --kubeconfig PATH"):
        await load_configuration(ClusterTarget(credentials_block=unique("missing")))


@pytest.mark.parametrize(
    ("expires_in", "tokens", "runs"),
    [
        (timedelta(minutes=1), ["Bearer token-2", "Bearer token-3"], 3),  # expiring: the plugin runs again
        (timedelta(hours=1), ["Bearer token-1", "Bearer token-1"], 1),  # still fresh: reused
    ],
)
async def test_an_exec_plugin_in_a_credentials_block_is_refreshed_as_from_a_file(
    prefect_api: str,
    tmp_path: Path,
    make_sim: Callable[..., SimStack],
    expires_in: timedelta,
    tokens: list[str],
    runs: int,
) -> None:
    sim = make_sim()
    path, counter = exec_kubeconfig(tmp_path, sim, expires_in)
    name = unique("exec")
    await save_credentials(name, path)
    cfg = await load_configuration(ClusterTarget(credentials_block=name))
    assert counter.read_text() == "1"
    assert [await cfg.get_api_key_with_prefix("BearerToken") for _ in range(2)] == tokens
    assert counter.read_text() == str(runs)
    target = ClusterTarget(credentials_block=name)
    async with open_api(target) as api:  # and the client it builds reaches the cluster
        assert (await deployment_status(api, "serving", "coder-chat")).replicas == 0


# ------------------------------------------------------------------ coder-stack setup, twice
async def test_setup_twice_creates_the_blocks_and_the_pool_then_changes_nothing(
    prefect_api: str, make_sim: Callable[..., SimStack], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CODER_STACK_IMAGE", raising=False)
    sim = make_sim()
    async with get_client() as client:
        with contextlib.suppress(ObjectNotFound):
            await client.delete_work_pool(K8S_POOL)
    stack, creds = unique("stack"), unique("cluster")
    spec = StackSpec.model_validate({"access": {"mode": "in-cluster"}})
    kw = {
        "gpus": 1,
        "deploy": False,
        "spec": spec,
        "stack_block": stack,
        "image": IMAGE,
        "credentials_block": creds,
        "kubeconfig": sim.kubeconfig_path,
        "context": "coder-sim",
    }
    first = await run_setup(**kw)  # type: ignore[arg-type]
    second = await run_setup(**kw)  # type: ignore[arg-type]
    assert [b.split(") ")[1].split()[0] for b in first.blocks] == ["created", "created"], first.blocks
    assert [b.split(") ")[1].split()[0] for b in second.blocks] == ["unchanged", "unchanged"], second.blocks
    assert f"created {K8S_POOL} (kubernetes), image {IMAGE}" in first.pools
    assert f"{K8S_POOL} (kubernetes) already exists; template up to date" in second.pools
    async with get_client() as client:
        pool = await client.read_work_pool(K8S_POOL)
    assert pool.base_job_template == k8s_base_job_template(IMAGE)
    assert (await Connection(stack_block=stack, credentials_block=creds).resolve())[0] == spec
    async with open_api(ClusterTarget(credentials_block=creds)) as api:
        assert (await deployment_status(api, "serving", "coder-chat")).replicas == 0

    # Someone points the Jobs at another namespace in the UI: a rerun keeps it and says so.
    edited = json.loads(json.dumps(pool.base_job_template))
    edited["variables"]["properties"]["namespace"]["default"] = "flows"
    async with get_client() as client:
        await client.update_work_pool(K8S_POOL, WorkPoolUpdate(base_job_template=edited))
        third = await run_setup(**kw)  # type: ignore[arg-type]
        kept = await client.read_work_pool(K8S_POOL)
    assert kept.base_job_template["variables"]["properties"]["namespace"]["default"] == "flows"
    assert any("kept namespace='flows'" in p for p in third.pools), third.pools

    # Without a stack file the block is kept as it is, not reset to the defaults; both block types are registered.
    fourth = await run_setup(**{**kw, "spec": None, "credentials_block": None})  # type: ignore[arg-type]
    async with get_client() as client:
        for slug in (BLOCK_TYPE_SLUG, "kubernetes-credentials"):
            assert (await client.read_block_type_by_slug(slug)).slug == slug
    assert "kept as it is (no --stack given)" in fourth.blocks[0]
    assert await load_stack_block(stack) == spec
    # The stock pool the other setup tests expect, and no crash automation left on the shared server
    async with get_client() as client:
        await client.delete_work_pool(K8S_POOL)
    await drop_crash_automation()


def test_the_commands_take_the_blocks_too(prefect_api: str, make_sim: Callable[..., SimStack]) -> None:
    """`--stack-block` / `--credentials-block` on the commands that talk to a cluster (here `down --dry-run`)."""
    from typer.testing import CliRunner

    from coder_stack.app.cli import app

    sim = make_sim()
    creds, stack = unique("cluster"), unique("stack")
    asyncio.run(save_credentials(creds, sim.kubeconfig_path))
    asyncio.run(save_stack_block(stack, StackSpec()))
    res = CliRunner().invoke(app, ["down", "--dry-run", "--stack-block", stack, "--credentials-block", creds])
    assert res.exit_code == 0, res.output
    assert "dry run" in res.output
    missing = unique("missing")
    res = CliRunner().invoke(app, ["down", "--dry-run", "--stack-block", missing, "--credentials-block", creds])
    assert res.exit_code == 1
    assert f"stack block '{missing}' (coder-stack-spec) does not exist" in " ".join(res.output.split())


async def test_an_unreachable_prefect_api_is_one_clear_error_for_either_block() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with pytest.raises(ConfigError, match=r"Prefect API could not be reached to read stack block 'x'"):
            await load_stack_block("x")
        with pytest.raises(ConfigError, match=r"Prefect API could not be reached to read KubernetesCredentials block"):
            await load_configuration(ClusterTarget(credentials_block="x"))


def test_setup_refuses_a_kubeconfig_it_cannot_store_without_quoting_it(tmp_path: Path) -> None:
    from coder_stack.app.setup import ensure_credentials_block

    token = "tok-" + secrets.token_hex(16)
    no_contexts = tmp_path / "kubeconfig"
    no_contexts.write_text(f"apiVersion: v1\nkind: Config\nusers: [{{name: u, user: {{token: {token}}}}}]\n")
    for path, context in ((no_contexts, None), (tmp_path / "missing", None)):
        with pytest.raises(ConfigError, match="cannot make a KubernetesCredentials block from kubeconfig") as err:
            asyncio.run(ensure_credentials_block("x", path, context))
        assert token not in str(err.value) and err.value.__cause__ is None
