"""kubectl 1.32 against the simulated API server: get (server-side tables), scale, describe, exec
(WebSocket, through a deployment), rollout status. The store is populated by hand (no controllers)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from simstack.apiserver import kubeconfig_yaml
from simstack.store import Store

from tests.kits.seeded_apiserver import SECRET_VALUE, ServerThread, seed

KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
pytestmark = pytest.mark.skipif(not os.path.exists(KUBECTL), reason="kubectl not installed")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Path]]:
    srv = ServerThread()
    srv.call(seed, srv.store)
    home = tmp_path_factory.mktemp("kubectl-home")
    cfg = home / "config"
    cfg.write_text(kubeconfig_yaml(srv.url, namespace="serving"))
    yield srv, cfg
    srv.stop()


def kubectl(cfg: Path, *args: str, timeout: float = 15, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cfg.parent),  # its own discovery cache, nothing from the real home
        "KUBECONFIG": str(cfg),
    }
    proc = subprocess.run(
        [KUBECTL, "--kubeconfig", str(cfg), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check:
        assert proc.returncode == 0, f"kubectl {' '.join(args)}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_get_deployments_and_pods_tables(sim: tuple[ServerThread, Path]) -> None:
    _, cfg = sim
    out = kubectl(cfg, "get", "deploy", "-n", "serving").stdout
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    assert any(line.split()[:4] == ["coder-chat", "0/1", "0", "0"] for line in lines[1:])
    out = kubectl(cfg, "get", "pods", "-A").stdout
    assert out.splitlines()[0].split() == ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert out.splitlines()[1].split()[:5] == ["serving", "coder-chat-5d8f-abcde", "1/1", "Running", "0"]
    out = kubectl(cfg, "get", "nodes").stdout
    assert out.splitlines()[1].split()[:2] == ["default-pool-1", "Ready"]
    out = kubectl(cfg, "get", "secret", "vllm-api-key", "-n", "serving").stdout
    assert out.splitlines()[1].split()[:3] == ["vllm-api-key", "Opaque", "1"]
    proc = kubectl(cfg, "get", "deploy", "nope", "-n", "serving", check=False)
    assert proc.returncode == 1
    assert 'Error from server (NotFound): deployments.apps "nope" not found' in proc.stderr


def test_scale_changes_spec_replicas(sim: tuple[ServerThread, Path]) -> None:
    srv, cfg = sim
    out = kubectl(cfg, "scale", "deploy/coder-fim", "--replicas=1", "-n", "serving").stdout
    assert "deployment.apps/coder-fim scaled" in out
    dep = srv.call(srv.store.get, "deployments", "serving", "coder-fim")
    assert dep["spec"]["replicas"] == 1 and dep["metadata"]["generation"] == 2
    kubectl(cfg, "scale", "deploy/coder-fim", "--replicas=0", "-n", "serving")
    assert srv.call(srv.store.get, "deployments", "serving", "coder-fim")["spec"]["replicas"] == 0


def test_describe_deployment_and_pod(sim: tuple[ServerThread, Path]) -> None:
    _, cfg = sim
    out = kubectl(cfg, "describe", "deploy", "coder-chat", "-n", "serving").stdout
    assert re.search(r"^Selector:\s+app.kubernetes.io/name=coder-chat$", out, re.M)
    assert re.search(r"^NewReplicaSet:\s+coder-chat-5d8f \(0/1 replicas created\)$", out, re.M)
    assert re.search(r"^StrategyType:\s+RollingUpdate$", out, re.M)  # API-server defaulting
    assert "ScalingReplicaSet" in out  # the deployment's events
    out = kubectl(cfg, "describe", "pod", "coder-chat-5d8f-abcde", "-n", "serving").stdout
    assert re.search(r"^Status:\s+Running$", out, re.M)
    assert "<set to the key 'api-key' in secret 'vllm-api-key'>" in out
    assert "Successfully assigned serving/coder-chat-5d8f-abcde to default-pool-1" in out


def test_exec_through_deployment(sim: tuple[ServerThread, Path]) -> None:
    _, cfg = sim
    out = kubectl(cfg, "exec", "deploy/coder-chat", "-n", "serving", "--", "sh", "-c", "echo $FOO").stdout
    assert out == f"{SECRET_VALUE}\n"
    proc = kubectl(cfg, "exec", "coder-chat-5d8f-abcde", "-n", "serving", "--", "sh", "-c", "exit 4", check=False)
    assert proc.returncode == 4
    proc = kubectl(cfg, "exec", "-i", "coder-chat-5d8f-abcde", "-n", "serving", "--", "cat", check=False)
    assert proc.returncode == 0


def _fill_status(store: Store, name: str) -> None:
    """What the deployment controller would write once the rollout is complete."""
    dep = store.get("deployments", "serving", name)
    replicas = dep["spec"]["replicas"]
    dep["status"] = {
        "observedGeneration": dep["metadata"]["generation"],
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": replicas,
        "availableReplicas": replicas,
        "conditions": [
            {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable", "message": "ok"},
            {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable", "message": "ok"},
        ],
    }
    store.update("deployments", dep, status_only=True)


def test_rollout_status_completes_when_status_is_filled(sim: tuple[ServerThread, Path]) -> None:
    srv, cfg = sim
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cfg.parent)}
    proc = subprocess.Popen(
        [KUBECTL, "--kubeconfig", str(cfg), "rollout", "status", "deploy/coder-chat", "-n", "serving"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        time.sleep(1.0)
        assert proc.poll() is None  # still waiting: the status says nothing is rolled out yet
        srv.call(_fill_status, srv.store, "coder-chat")
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert 'deployment "coder-chat" successfully rolled out' in out
