"""Least privilege: every flow passes with a token bound to deployments/rbac.yaml, a call outside it is a
403 that the flows turn into a message naming the verb and resource, and the Role grants nothing unused.

The simulated API server evaluates the Roles/RoleBindings/ClusterRoles/ClusterRoleBindings of
deployments/rbac.yaml (loaded into its store) for the ServiceAccount token in the flows' kubeconfig. An
authorizer wrapper records every (verb, resource, namespace, name) the flows asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from simstack.apiserver.rbac import RBACAuthorizer
from simstack.stack import SimStack
from simstack.store import RESOURCES, Store
from simstack.timings import Timings

from coder_stack.errors import Forbidden
from coder_stack.flows.bring_up import bring_up
from coder_stack.flows.keys import KeyOptions, manage_keys, report_spend
from coder_stack.flows.reclaim import reclaim_idle_models
from coder_stack.flows.swap import SwapOptions, swap_model
from coder_stack.flows.teardown import teardown
from coder_stack.flows.validate import ValidateOptions, validate_coder_stack
from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.spec import StackSpec
from coder_stack.usecases.openwebui import persistent_config_status
from tests.kits.flowkit import (
    SERVING,
    assert_no_gpu_model_running,
    conn,
    gpu_overlaps,
    replicas,
)
from tests.kits.incluster import load_rbac, rbac_docs

pytestmark = pytest.mark.usefixtures("gpu_limit")

TOKEN = "tok-coder-stack-flows"
ADMIN = "tok-admin"
SA = ("prefect", "coder-stack-flows")
# Granted but never asked for by the simulated cluster, on purpose (each is commented in rbac.yaml):
# WebSocket exec/port-forward is authorised as `get` by API servers before 1.30 and `create` after;
# the sim authorises `create` only.
JUSTIFIED_UNUSED = {
    ("serving", "", "pods/portforward", "get"),
    ("litellm", "", "pods/portforward", "get"),
    ("experience", "", "pods/exec", "get"),
}
PLURAL = {rt.plural for rt in RESOURCES.values()}


@dataclass
class Recorder:
    """Wraps the RBAC authorizer; keeps every decision."""

    inner: RBACAuthorizer
    calls: list[tuple[str, str, str | None, str | None, bool]] = field(default_factory=list)

    def authenticate(self, token: str | None) -> str | None:
        return self.inner.authenticate(token)

    def __call__(self, token: str | None, verb: str, resource: str, namespace: str | None, name: str | None) -> bool:
        ok = self.inner(token, verb, resource, namespace, name)
        if token == TOKEN:
            self.calls.append((verb, resource, namespace, name, ok))
        return ok


def make_rbac_sim(**kwargs: Any) -> SimStack:
    kwargs.setdefault("time_scale", 0.002)
    # CPU pods (front-ends) take ~1 s to start, so waiting for them goes through a watch as on a real cluster.
    kwargs.setdefault("timings", Timings(cpu_start_s=500.0))
    kwargs.setdefault("gpu_pool", "static")
    sim = SimStack(
        api_token=TOKEN,
        authorizer=lambda store: Recorder(RBACAuthorizer(store, {TOKEN: SA}, superusers={ADMIN})),
        **kwargs,
    ).start()
    sim.call(load_rbac, sim.store, rbac_docs())
    return sim


@pytest.fixture
def rbac_sim() -> Iterator[SimStack]:
    sim = make_rbac_sim()
    yield sim
    sim.stop()


def granted(docs: list[dict[str, Any]]) -> list[tuple[str, str, str, str, tuple[str, ...]]]:
    """(namespace or '*', apiGroup, resource, verb, resourceNames) for every grant in the file."""
    out = []
    for d in docs:
        if d["kind"] not in ("Role", "ClusterRole"):
            continue
        ns = d["metadata"].get("namespace", "*")
        for rule in d.get("rules") or []:
            for g in rule.get("apiGroups") or [""]:
                for r in rule["resources"]:
                    for v in rule["verbs"]:
                        out.append((ns, g, r, v, tuple(rule.get("resourceNames") or ())))
    return out


def used(
    calls: list[tuple[str, str, str | None, str | None, bool]], grant: tuple[str, str, str, str, tuple[str, ...]]
) -> bool:
    ns, _group, resource, verb, names = grant
    return any(
        ok and v == verb and r == resource and (ns == "*" or n == ns) and (not names or name in names)
        for v, r, n, name, ok in calls
    )


# ------------------------------------------------------------------ every flow under the Role
async def test_every_flow_passes_under_the_role_and_every_grant_is_used(rbac_sim: SimStack) -> None:
    sim = rbac_sim
    c = conn(sim)
    rec: Recorder = sim.authorizer

    report = await validate_coder_stack(options=ValidateOptions(stages=["chat", "fim", "agent"]), connection=c)
    assert report.outcome == "passed", report.to_markdown()
    up = await bring_up(connection=c)
    assert up.outcome.startswith("passed"), up.to_markdown()
    idle = await reclaim_idle_models(connection=c)  # coder-chat serving, just up: its first reading is kept
    assert idle.outcome == "passed: nothing idle", idle.to_markdown()
    sw = await swap_model(options=SwapOptions(target="coder-fim"), connection=c)
    assert sw.outcome == "passed", sw.to_markdown()
    keys = await manage_keys(options=KeyOptions(rotate=True), connection=c)
    assert keys.outcome == "passed"
    spend = await report_spend(connection=c)
    assert spend.outcome == "passed"
    down = await teardown(connection=c)
    assert down.outcome == "passed: everything at 0", down.to_markdown()
    await assert_no_gpu_model_running(sim)
    assert not gpu_overlaps(sim)

    refused = sorted({(v, r, n, name) for v, r, n, name, ok in rec.calls if not ok})
    assert refused == [], f"the flows were refused under deployments/rbac.yaml: {refused}"
    unused = [g for g in granted(rbac_docs()) if not used(rec.calls, g)]
    unjustified = [g for g in unused if g[:4] not in JUSTIFIED_UNUSED]
    assert unjustified == [], f"rbac.yaml grants what no flow uses: {unjustified}"


# ------------------------------------------------------------------ one rule less
async def test_a_missing_rule_is_a_403_naming_the_verb_and_resource_and_nothing_is_left_running(
    rbac_sim: SimStack,
) -> None:
    sim = rbac_sim

    def drop_scale_patch(store: Store) -> None:
        role = store.get("roles", SERVING, "coder-stack-flows")
        for rule in role["rules"]:
            if rule["resources"] == ["deployments/scale"]:
                rule["verbs"] = [v for v in rule["verbs"] if v != "patch"]
        store.update("roles", role)

    sim.call(drop_scale_patch, sim.store)
    mark = len(sim.timeline)
    with pytest.raises(Forbidden) as info:
        await swap_model(options=SwapOptions(target="coder-chat", smoke_gateway=False), connection=conn(sim))
    msg = str(info.value)
    assert "Grant verb 'patch' on resource 'deployments/scale' in namespace 'serving'" in msg, msg
    assert "deployments/rbac.yaml" in msg
    assert sim.timeline[mark:] == []
    assert replicas(sim)["coder-chat"] == 0
    await assert_no_gpu_model_running(sim)


async def test_a_cluster_without_the_node_grant_still_works_from_the_spec(rbac_sim: SimStack) -> None:
    """Nodes are cluster-scoped: without the ClusterRole, preflight uses spec.gpu_node_memory_gb and says so."""
    sim = rbac_sim

    def drop_nodes(store: Store) -> None:
        role = store.get("clusterroles", None, "coder-stack-flows-nodes")
        role["rules"] = [r for r in role["rules"] if r["resources"] != ["nodes"]]
        store.update("clusterroles", role)

    sim.call(drop_nodes, sim.store)
    report = await swap_model(options=SwapOptions(target="coder-chat", smoke_gateway=False), connection=conn(sim))
    assert report.outcome == "passed"
    assert replicas(sim)["coder-chat"] == 1
    refused = [(v, r) for v, r, _n, _name, ok in sim.authorizer.calls if not ok]
    assert set(refused) == {("list", "nodes")}, refused
    await teardown(connection=conn(sim))
    await assert_no_gpu_model_running(sim)


def test_every_rbac_resource_exists_in_the_api() -> None:
    for _ns, _g, resource, _v, _n in granted(rbac_docs()):
        assert resource.partition("/")[0] in PLURAL, resource


# ------------------------------------------------------------------ what persistent_config_status reads
@pytest.mark.parametrize(
    ("env_from", "plural", "name"),
    [
        ({"configMapRef": {"name": "ui-settings"}}, "configmaps", "ui-settings"),
        ({"secretRef": {"name": "ui-extra"}}, "secrets", "ui-extra"),
    ],
)
async def test_a_secret_or_config_map_open_webui_loads_outside_the_role_is_a_forbidden_naming_the_grant(
    rbac_sim: SimStack, env_from: dict[str, Any], plural: str, name: str
) -> None:
    """The Role grants Open WebUI's own Secret by name only; a Deployment that loads another Secret or a
    ConfigMap (where ENABLE_PERSISTENT_CONFIG may be set) cannot be resolved: the error names the exact rule
    to add (by name, never every Secret) or the other way out, not a bare 403."""
    sim = rbac_sim
    spec = StackSpec()

    def load_more(store: Store) -> None:
        d = store.get("deployments", spec.experience_namespace, "open-webui")
        c = d["spec"]["template"]["spec"]["containers"][0]
        c["env"] = [e for e in c.get("env") or [] if e["name"] != "ENABLE_PERSISTENT_CONFIG"]
        c["envFrom"] = [env_from]
        store.update("deployments", d)

    sim.call(load_more, sim.store)
    async with open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api:
        with pytest.raises(Forbidden) as info:
            await persistent_config_status(api, spec, "open-webui")
    msg = str(info.value)
    assert f"{plural}/{name}" == info.value.resource
    assert f"resources: [{plural}], resourceNames: [{name}], verbs: [get]" in msg, msg
    assert "deploy/open-webui" in msg and "ENABLE_PERSISTENT_CONFIG=False" in msg
    refused = [(v, r, n) for v, r, _ns, n, ok in sim.authorizer.calls if not ok]
    assert refused == [("get", plural, name)]
