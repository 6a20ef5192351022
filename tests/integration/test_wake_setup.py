"""`coder-stack wake-setup --apply` on the simulated stack: after it, the LiteLLM stand-in has loaded the callback
from the files mounted beside its proxy config, and the callback reaches the API server with the pod's
ServiceAccount, allowed by the RBAC wake-setup created. Rerun, interrupted, and two runs at once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import yaml
from simstack.apiserver.rbac import RBACAuthorizer
from simstack.stack import SimStack
from typer.testing import CliRunner

from coder_stack.app.cli import app
from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.spec import StackSpec
from coder_stack.usecases import wake_setup as ws

ADMIN = "tok-wake-admin"
URL = "http://prefect-server.prefect.svc.cluster.local:4200/api"

# A probe in place of the product's module (tests/integration/test_wake_on_demand.py runs the product's): it reads
# its settings beside itself and, for a probe request, GETs the model's Deployment and the namespace's Secrets with
# the pod's token and CA (ENV and ROOT seams) and answers with what it saw — so the RBAC wake-setup grants is proven
# both ways (the Deployment allowed, nothing else).
TINY_HOOK = """
import json
import os
from pathlib import Path

import httpx

ENV = os.environ
ROOT = "/"


class WakeOnDemand:
    async def async_pre_call_hook(self, user_api_key_dict, cache, data, call_type):
        if data.get("user") != "wake-probe":
            return None
        settings = json.loads(Path(__file__).with_name("coder_stack_wake.json").read_text())
        sa = Path(ROOT) / "var/run/secrets/kubernetes.io/serviceaccount"
        base = f"https://{ENV['KUBERNETES_SERVICE_HOST']}:{ENV['KUBERNETES_SERVICE_PORT']}"
        alias = data["model"]
        dep = settings["models"][alias]["deployment"]
        async with httpx.AsyncClient(verify=str(sa / "ca.crt")) as c:
            r = await c.get(f"{base}/apis/apps/v1/namespaces/{settings['namespace']}/deployments/{dep}",
                            headers={"Authorization": f"Bearer {(sa / 'token').read_text()}"})
            s = await c.get(f"{base}/api/v1/namespaces/{settings['namespace']}/secrets",
                            headers={"Authorization": f"Bearer {(sa / 'token').read_text()}"})
        data["mock_response"] = json.dumps({"deployment": r.status_code, "secrets": s.status_code,
                                            "prefect": settings["prefect_api_url"]})
        return data


wake_on_demand = WakeOnDemand()
"""


@pytest.fixture
def cluster(make_sim: Callable[..., SimStack], monkeypatch: pytest.MonkeyPatch) -> SimStack:
    monkeypatch.setattr(ws, "hook_source", lambda: TINY_HOOK)
    return make_sim(
        api_token=ADMIN, authorizer=lambda store: RBACAuthorizer(store, {}, superusers={ADMIN}), pod_api=True
    )


def _target(sim: SimStack) -> ClusterTarget:
    return ClusterTarget(kubeconfig=str(sim.kubeconfig_path), context="coder-sim")


async def _apply(sim: SimStack, **kw: Any) -> ws.WakeSetupReport:
    async with open_api(_target(sim)) as api:
        return await ws.apply(api, StackSpec(), URL, timeout_s=60, poll_s=0.05, **kw)


def _gateway_callbacks(sim: SimStack) -> list[Any]:
    """The callbacks of every running LiteLLM stand-in (one list per Ready pod)."""
    spec = sim.spec
    out = []
    for pod in sim.store.list("pods", spec.gateway_namespace):
        if pod["metadata"].get("deletionTimestamp"):
            continue
        backend = sim.cluster.kubelet.running.get(pod["metadata"]["uid"])  # type: ignore[union-attr]
        if backend is not None and hasattr(backend, "proxy"):
            out.append(backend.proxy.state.callbacks.instances)
    return out


def _config_text(sim: SimStack) -> str:
    cm = sim.store.find("configmaps", sim.spec.gateway_namespace, "litellm-config")
    assert cm is not None
    return str(cm["data"]["proxy_config.yaml"])


def _assert_loaded(sim: SimStack) -> None:
    loaded = _gateway_callbacks(sim)
    assert loaded and all(len(cbs) == 1 for cbs in loaded), loaded
    for cbs in loaded:
        module_file = type(cbs[0]).async_pre_call_hook.__globals__["__file__"]
        assert module_file.endswith("/etc/litellm/coder_stack_wake.py")  # beside the proxy config, as mounted
    cfg = yaml.safe_load(_config_text(sim))
    assert cfg["litellm_settings"]["callbacks"] == ["coder_stack_wake.wake_on_demand"]
    dep = sim.store.find("deployments", sim.spec.gateway_namespace, sim.spec.gateway_service)
    assert dep is not None
    sources = dep["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"]
    assert [s["configMap"]["name"] for s in sources] == ["litellm-config", "coder-stack-wake"]


def _probe(sim: SimStack) -> dict[str, Any]:
    r = httpx.post(
        f"{sim.gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {sim.secrets['master_key']}"},
        json={"model": "coder-chat", "user": "wake-probe", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return json.loads(r.json()["choices"][0]["message"]["content"])  # type: ignore[no-any-return]


def test_apply_loads_the_callback_from_the_mounted_files_and_a_rerun_changes_nothing(cluster: SimStack) -> None:
    assert _gateway_callbacks(cluster) == [[]]  # before: the gateway runs without callbacks
    report = asyncio.run(_apply(cluster))
    assert report.changed
    assert any("created configmaps/coder-stack-wake" in ln for ln in report.lines)
    assert any("restarted deploy/litellm" in ln for ln in report.lines)
    _assert_loaded(cluster)
    seen = _probe(cluster)
    # the pod's ServiceAccount may get the model's Deployment (wake-setup's Role), nothing else
    assert seen == {"deployment": 200, "secrets": 403, "prefect": URL}
    dep = cluster.store.find("deployments", "litellm", "litellm")
    assert dep is not None
    generation = dep["metadata"]["generation"]

    # the second run, as a person types it
    args = ["wake-setup", "--apply", "--kubeconfig", str(cluster.kubeconfig_path), "--context", "coder-sim"]
    again = CliRunner().invoke(app, [*args, "--prefect-api-url", URL])
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == "nothing to change: wake-setup was already applied"
    dep = cluster.store.find("deployments", "litellm", "litellm")
    assert dep is not None and dep["metadata"]["generation"] == generation  # no second rollout


class Killed(BaseException):
    """The process dies here: nothing after this point runs, nothing is cleaned up."""


@pytest.mark.parametrize("how", ["killed", "cancelled"])
def test_interrupted_before_the_restart_a_rerun_finishes_it(cluster: SimStack, how: str) -> None:
    async def interrupted() -> None:
        entered = asyncio.Event()

        async def stop_here() -> None:
            entered.set()
            if how == "killed":
                raise Killed
            await asyncio.Event().wait()  # until cancelled

        task = asyncio.create_task(_apply(cluster, before_restart=stop_here))
        await entered.wait()
        if how == "cancelled":
            task.cancel()
        with pytest.raises((Killed, asyncio.CancelledError)):
            await task

    asyncio.run(interrupted())
    # the ConfigMap and the callback line are written, the restart did not happen
    assert "coder_stack_wake.wake_on_demand" in _config_text(cluster)
    dep = cluster.store.find("deployments", "litellm", "litellm")
    assert dep is not None
    assert ws.STAMP not in (dep["spec"]["template"]["metadata"].get("annotations") or {})

    report = asyncio.run(_apply(cluster))
    assert report.changed and any("restarted deploy/litellm" in ln for ln in report.lines)
    assert not any("created" in ln or "added" in ln for ln in report.lines)  # only the restart was left
    _assert_loaded(cluster)


def test_two_runs_at_once(cluster: SimStack) -> None:
    async def both() -> list[ws.WakeSetupReport]:
        return list(await asyncio.gather(_apply(cluster), _apply(cluster)))

    reports = asyncio.run(both())
    assert all(r.lines[-1].startswith("deploy/litellm") or r.lines[-1].startswith("nothing") for r in reports)
    assert _config_text(cluster).count("coder_stack_wake.wake_on_demand") == 1
    assert len(cluster.store.list("roles", "serving")) == 1
    _assert_loaded(cluster)
