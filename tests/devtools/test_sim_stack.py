"""SimStack end to end: real clients (kubectl, kubernetes-asyncio, httpx) against the simulated cluster."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes_asyncio import client, config, watch
from simstack.cluster_objects import b64
from simstack.stack import SimStack, run_sim

from tests.conftest import SIM_SCALE, on_loop, pods_of, ready_pod, scale, wait_for

S = "serving"
KUBECTL = shutil.which("kubectl")


def kubectl(sim: SimStack, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    assert KUBECTL
    return subprocess.run(
        [KUBECTL, "--kubeconfig", str(sim.kubeconfig_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")
def test_kubectl_get_scale_and_rollout_status(sim: SimStack) -> None:
    out = kubectl(sim, "get", "deploy", "-n", S)
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines()[1:]]
    assert sorted(names) == ["coder-agent", "coder-chat", "coder-fim"]
    out = kubectl(sim, "-n", S, "scale", "deploy/coder-fim", "--replicas=1")
    assert out.returncode == 0, out.stderr
    assert "scaled" in out.stdout
    out = kubectl(sim, "-n", S, "rollout", "status", "deploy/coder-fim", "--timeout=20s")
    assert out.returncode == 0, out.stderr + out.stdout
    assert 'deployment "coder-fim" successfully rolled out' in out.stdout
    # rollout status really waited: the pod is Ready and the deployment reports it
    d = on_loop(sim, lambda s: s.get("deployments", S, "coder-fim"))
    assert d["status"]["readyReplicas"] == 1 and d["status"]["observedGeneration"] == d["metadata"]["generation"]
    out = kubectl(sim, "-n", S, "get", "pods", "-l", "app.kubernetes.io/name=coder-fim")
    assert "1/1" in out.stdout and "Running" in out.stdout, out.stdout
    out = kubectl(sim, "-n", S, "scale", "deploy/coder-fim", "--replicas=0")
    assert out.returncode == 0, out.stderr
    out = kubectl(
        sim, "-n", S, "wait", "--for=delete", "pod", "-l", "app.kubernetes.io/name=coder-fim", "--timeout=20s"
    )
    assert out.returncode == 0, out.stderr
    assert not on_loop(sim, lambda s: pods_of(s, S, "coder-fim"))


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")
def test_kubectl_runbook_frontend_secret_then_rollout_restart(sim: SimStack) -> None:
    ns = ["-n", "experience"]
    assert kubectl(sim, *ns, "scale", "deploy/open-webui", "--replicas=1").returncode == 0
    wait_for(  # the Secret is missing: CreateContainerConfigError, never Ready
        sim,
        lambda s: any(
            (p["status"].get("containerStatuses") or [{}])[0].get("state", {}).get("waiting", {}).get("reason")
            == "CreateContainerConfigError"
            for p in pods_of(s, "experience", "open-webui")
        ),
        5,
    )
    out = kubectl(sim, *ns, "get", "pods")
    assert "CreateContainerConfigError" in out.stdout, out.stdout
    # (kubectl create secret / apply are the API server's business; the Secret is created on the store here)
    on_loop(
        sim,
        lambda s: s.create(
            "secrets",
            {
                "metadata": {"name": "openwebui-secrets"},
                "data": {"OPENAI_API_KEY": b64("sk-1"), "WEBUI_SECRET_KEY": b64("a")},
            },
            namespace="experience",
        ),
    )
    out = kubectl(sim, *ns, "rollout", "status", "deploy/open-webui", "--timeout=20s")
    assert out.returncode == 0 and "successfully rolled out" in out.stdout, out.stderr
    old = {p["metadata"]["name"] for p in on_loop(sim, lambda s: pods_of(s, "experience", "open-webui"))}
    assert kubectl(sim, *ns, "rollout", "restart", "deploy/open-webui").returncode == 0
    out = kubectl(sim, *ns, "rollout", "status", "deploy/open-webui", "--timeout=20s")
    assert out.returncode == 0 and "successfully rolled out" in out.stdout, out.stderr
    pods = on_loop(sim, lambda s: pods_of(s, "experience", "open-webui"))
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == 1 and live[0]["metadata"]["name"] not in old


async def test_kubernetes_asyncio_scale_watch_ready_and_events(sim_autoscaled: SimStack) -> None:
    sim = sim_autoscaled
    api_client = await config.new_client_from_config(config_file=str(sim.kubeconfig_path))
    async with api_client:
        apps = client.AppsV1Api(api_client)
        core = client.CoreV1Api(api_client)
        await apps.patch_namespaced_deployment_scale("coder-chat", S, {"spec": {"replicas": 1}})
        ready = None
        w = watch.Watch()
        async with w.stream(
            core.list_namespaced_pod, S, label_selector="app.kubernetes.io/name=coder-chat", timeout_seconds=20
        ) as stream:
            async for ev in stream:
                pod = ev["object"]
                if isinstance(pod, dict):
                    continue  # BOOKMARK
                conds = {c.type: c.status for c in pod.status.conditions or []}
                if conds.get("Ready") == "True":
                    ready = pod
                    w.stop()
        assert ready is not None
        assert ready.spec.node_name.startswith("gpu-pool-")
        assert ready.status.container_statuses[0].ready is True
        evs = await core.list_namespaced_event(S, field_selector=f"involvedObject.name={ready.metadata.name}")
        reasons = [e.reason for e in evs.items]
        for r in ("FailedScheduling", "TriggeredScaleUp", "Scheduled", "Pulling", "Pulled", "Created", "Started"):
            assert r in reasons
        for _ in range(100):
            d = await apps.read_namespaced_deployment("coder-chat", S)
            if d.status.ready_replicas == 1 and d.status.observed_generation >= d.metadata.generation:
                break
            await asyncio.sleep(0.02)
        assert d.status.ready_replicas == 1
        nodes = await core.list_node()
        assert len(nodes.items) == 2


def test_gateway_url_reaches_the_model_through_litellm(sim: SimStack) -> None:
    master = sim.secrets["master_key"]
    r = httpx.get(sim.gateway_url + "/health/readiness", timeout=5)
    assert r.status_code == 200
    scale(sim, S, "coder-chat", 1)
    ready_pod(sim, S, "coder-chat")
    r = httpx.post(
        sim.gateway_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {master}"},
        json={"model": "coder-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "coder-chat"  # LiteLLM answers with the alias (recorded: chat-reverse)
    assert r.headers["x-litellm-model-api-base"].startswith("http://coder-chat.serving.svc")  # routed to the pod
    # no Ready gateway pod: the local URL answers like an ingress without endpoints, then recovers
    scale(sim, "litellm", "litellm", 0)
    wait_for(sim, lambda s: not pods_of(s, "litellm", "litellm"), 5, "gateway pods gone")
    assert httpx.get(sim.gateway_url + "/health/readiness", timeout=5).status_code == 503
    scale(sim, "litellm", "litellm", 1)
    ready_pod(sim, "litellm", "litellm")
    assert httpx.get(sim.gateway_url + "/health/readiness", timeout=5).status_code == 200


def test_stop_tears_everything_down(make_sim: Any) -> None:
    sim = make_sim()
    api, gw, thread = sim.api_url, sim.gateway_url, sim._thread
    kc = sim.kubeconfig_path
    assert kc.exists() and api in kc.read_text()
    assert httpx.get(f"{api}/version", timeout=5).status_code == 200
    sim.stop()
    assert thread is not None and not thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{api}/version", timeout=2)
    with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)):
        httpx.get(gw + "/health", timeout=2)
    assert not kc.exists()
    sim.stop()  # idempotent


def test_run_from_other_threads_and_call(sim: SimStack) -> None:
    async def count() -> int:
        await asyncio.sleep(0)
        return len(sim.store.list("deployments"))

    results: list[int] = []
    t = threading.Thread(target=lambda: results.append(sim.run(count())))
    t.start()
    t.join(5)
    assert results == [7]
    assert sim.call(lambda: len(sim.store.list("nodes"))) == 2
    assert sim.services.time_scale == SIM_SCALE


def test_run_sim_prints_ready_and_exits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kc = tmp_path / "sub" / "kubeconfig"
    run_sim(kc, time_scale=SIM_SCALE, faults={"coder-fim": "crashloop"}, gpu_pool="autoscaled", exit_after=0.2)
    out = capsys.readouterr().out
    assert out.startswith(f"ready: kubeconfig at {kc}")
    assert f"kubectl --kubeconfig {kc} get deploy -n serving" in out
    text = kc.read_text()
    assert "server: http://127.0.0.1:" in text and "current-context: coder-sim" in text
    assert "sk-" not in out
