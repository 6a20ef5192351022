"""The simulated controllers on the store: phases, caches, scheduling, autoscaling, faults, deletion, rollout."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from simstack.cluster_objects import b64, proxy_config, reference_objects
from simstack.controllers.context import ClusterContext
from simstack.controllers.deployment import template_hash
from simstack.stack import SimStack
from simstack.store import Store, controller_uid
from simstack.timings import Timings, model_timings

from coder_stack.spec import ModelSpec, StackSpec
from tests.conftest import (
    events_of,
    is_ready,
    on_loop,
    pods_of,
    ready_pod,
    record,
    scale,
    wait_for,
)
from tests.kits.standins import FakeStandins

S = "serving"
FAST = 0.001  # the fixtures' 0.002 halved, for the tests that walk several cold starts


def phase_of(pod: dict[str, Any]) -> str:
    """docs/DESIGN.md's wait_ready phase names, read from a pod exactly as the table says."""
    st = pod.get("status") or {}
    if not pod["spec"].get("nodeName"):
        return "node"
    if is_ready(pod):
        return "ready"
    init = (st.get("initContainerStatuses") or [{}])[0].get("state") or {}
    if not init or "waiting" in init:  # bound; the kubelet has not reported yet, or is pulling
        return "image"
    if "running" in init:
        return "weights"
    if st.get("phase") == "Running":
        return "start"
    return "other"


def rollout_status(d: dict[str, Any]) -> tuple[bool, str]:
    """kubectl's DeploymentStatusViewer (polymorphichelpers/rollout_status.go)."""
    st = d.get("status") or {}
    if d["metadata"]["generation"] <= st.get("observedGeneration", 0):
        cond = next((c for c in st.get("conditions") or [] if c["type"] == "Progressing"), None)
        if cond and cond["reason"] == "ProgressDeadlineExceeded":
            raise AssertionError("deployment exceeded its progress deadline")
        want = d["spec"].get("replicas", 1)
        if st.get("updatedReplicas", 0) < want:
            return False, "updated"
        if st.get("replicas", 0) > st.get("updatedReplicas", 0):
            return False, "old replicas pending termination"
        if st.get("availableReplicas", 0) < st.get("updatedReplicas", 0):
            return False, "available"
        return True, "successfully rolled out"
    return False, "Waiting for deployment spec update to be observed..."


class Delays(list[tuple[str, str, float]]):
    """Every delay the simulated controllers ask for, in simulated seconds, with the function that asked
    (``_pull``, ``_walk``, ``_scale_up``, ``_scale_down``, ``_write_status``) and the app of the pod it was
    for (its ``pod`` argument, if any): what the model says a step takes, read from the model itself, not
    from a wall clock a busy machine stretches."""

    def of(self, caller: str, app: str | None = None) -> list[float]:
        return [s for c, a, s in self if c == caller and (app is None or a == app)]


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> Delays:
    seen = Delays()
    scaled = ClusterContext.scaled

    def recording(self: ClusterContext, sim_seconds: float) -> float:
        frame = sys._getframe(1)
        if frame.f_code.co_name == "sleep":  # ClusterContext.sleep: the delay is its caller's
            frame = frame.f_back or frame
        pod = frame.f_locals.get("pod")
        labels = (pod.get("metadata") or {}).get("labels") or {} if isinstance(pod, dict) else {}
        app = labels.get("app.kubernetes.io/name", "")
        seen.append((frame.f_code.co_name, app, sim_seconds))
        return scaled(self, sim_seconds)

    monkeypatch.setattr(ClusterContext, "scaled", recording)
    return seen


def gone(sim: SimStack, ns: str, app: str, timeout: float = 5.0) -> None:
    wait_for(sim, lambda s: not pods_of(s, ns, app), timeout, f"{app} pods gone")


# ------------------------------------------------------------------ reference objects
def test_reference_objects_follow_the_design() -> None:
    spec = StackSpec()
    secrets = {"master_key": "sk-master", "upstream_key": "sk-up", "vllm_key": "sk-up"}
    objs = {
        (p, o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
        for p, o in reference_objects(spec, secrets, "http://127.0.0.1:9")
    }
    for m in spec.models:
        d = objs[("deployments", S, m.name)]
        assert d["spec"]["replicas"] == 0
        assert d["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": m.name}
        pod = d["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["image"] == "vllm/vllm-openai:v0.32.0"
        args = c["args"]
        assert args[args.index("--model") + 1] == f"/models/{m.name}"
        assert args[args.index("--served-model-name") + 1] == m.served_model_name
        assert args[args.index("--api-key") + 1] == "$(VLLM_API_KEY)"
        assert ("--enable-auto-tool-choice" in args) == (m.role == "agent")
        if m.role == "agent":
            assert args[args.index("--tool-call-parser") + 1] == "hermes"
        assert c["env"][0] == {
            "name": "VLLM_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "vllm-api-key", "key": "api-key"}},
        }
        assert c["resources"]["limits"] == {"nvidia.com/gpu": "1"}
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
        assert pod["initContainers"][0]["name"] == "stage-weights"
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert objs[("services", S, m.name)]["spec"]["ports"][0]["port"] == 8000
    lite = objs[("deployments", "litellm", "litellm")]
    assert lite["spec"]["replicas"] == 1
    lc = lite["spec"]["template"]["spec"]["containers"][0]
    assert lc["image"].startswith("ghcr.io/berriai/litellm:")
    env = {e["name"]: e for e in lc["env"]}
    assert env["PROXY_MASTER_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "litellm-secrets",
        "key": "PROXY_MASTER_KEY",
    }
    assert env["LITELLM_MASTER_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "PROXY_MASTER_KEY"
    cfg = objs[("configmaps", "litellm", "litellm-config")]["data"]["proxy_config.yaml"]
    assert cfg == proxy_config(spec)
    import yaml

    parsed = yaml.safe_load(cfg)
    by_name = {m["model_name"]: m["litellm_params"] for m in parsed["model_list"]}
    assert set(by_name) == {"coder-chat", "coder-fim", "embeddings"}  # coder-agent: /model/new at runtime
    assert by_name["coder-chat"]["model"] == "openai/qwen2.5-coder-7b-instruct"
    assert by_name["coder-chat"]["api_base"] == "http://coder-chat.serving.svc.cluster.local:8000/v1"
    assert by_name["embeddings"]["api_base"] == "http://embeddings.litellm.svc.cluster.local:8000/v1"
    assert all(
        p["api_key"] == "os.environ/UPSTREAM_API_KEY" and p["input_cost_per_token"] > 0 for p in by_name.values()
    )
    assert parsed["general_settings"]["store_model_in_db"] is True
    emb = objs[("deployments", "litellm", "embeddings")]["spec"]["template"]["spec"]["containers"][0]
    assert emb["args"][emb["args"].index("--task") + 1] == "embed"
    owu = objs[("deployments", "experience", "open-webui")]
    oenv = {e["name"]: e for e in owu["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert oenv["OPENAI_API_BASE_URL"]["value"] == "http://127.0.0.1:9/v1"
    assert oenv["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "openwebui-secrets", "key": "OPENAI_API_KEY"}
    tabby = objs[("deployments", "experience", "tabby")]["spec"]["template"]["spec"]
    assert tabby["volumes"][0]["secret"]["secretName"] == "tabby-config"
    assert tabby["containers"][0]["volumeMounts"][0]["mountPath"] == "/data"
    assert "tcpSocket" in tabby["containers"][0]["readinessProbe"]
    assert objs[("secrets", "litellm", "litellm-secrets")]["data"] == {
        "PROXY_MASTER_KEY": b64("sk-master"),
        "UPSTREAM_API_KEY": b64("sk-up"),
    }
    assert objs[("secrets", S, "vllm-api-key")]["data"] == {"api-key": b64("sk-up")}
    assert ("secrets", "experience", "openwebui-secrets") not in objs
    assert ("secrets", "experience", "tabby-config") not in objs
    assert template_hash(owu["spec"]["template"]) == template_hash(owu["spec"]["template"])


def test_sim_starts_with_nodes_secrets_and_gateway_ready(sim: SimStack) -> None:
    sec = sim.secrets
    assert sec["master_key"].startswith("sk-") and sec["upstream_key"] == sec["vllm_key"]

    def check(store: Store) -> None:
        nodes = {n["metadata"]["name"]: n for n in store.list("nodes")}
        assert set(nodes) == {"default-pool-1", "gpu-pool-1"}
        gpu = nodes["gpu-pool-1"]
        assert gpu["status"]["capacity"]["nvidia.com/gpu"] == "1"
        assert gpu["metadata"]["labels"]["cloud.google.com/gke-accelerator"] == "nvidia-l4"
        assert gpu["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
        for name in ("litellm", "embeddings"):
            assert store.get("deployments", "litellm", name)["status"]["readyReplicas"] == 1
        assert not store.list("pods", S)

    on_loop(sim, check)


# ------------------------------------------------------------------ cold start
def test_cold_start_walks_every_phase_in_order_with_events(
    sim: SimStack, fake_standins: FakeStandins, delays: Delays
) -> None:
    pods = record(sim, "pods")
    deps = record(sim, "deployments")
    registered_at_ready: list[bool] = []

    def _at_ready(ev: Any) -> None:
        if ev.plural == "pods" and is_ready(ev.obj) and not (ev.old and is_ready(ev.old)):
            registered_at_ready.append(sim.backends.lookup(S, ev.obj["metadata"]["name"], 8000) is not None)

    on_loop(sim, lambda s: s.listeners.append(_at_ready))
    scale(sim, S, "coder-chat", 1)
    pod = ready_pod(sim, S, "coder-chat")
    name = pod["metadata"]["name"]
    # image 240 s (one pull: the init and main containers share the image) + weights 150 s + start 40 s
    assert delays.of("_pull", "coder-chat") == [240.0]
    assert delays.of("_walk", "coder-chat") == [150.0, 40.0]
    phases: list[str] = []
    for _, _, p in pods:
        if p["metadata"]["name"] == name and (not phases or phases[-1] != phase_of(p)):
            phases.append(phase_of(p))
    assert phases == ["node", "image", "weights", "start", "ready"]
    reasons = [
        (e["reason"], e["involvedObject"].get("fieldPath")) for e in on_loop(sim, lambda s: events_of(s, S, name))
    ]
    init, main = "spec.initContainers{stage-weights}", "spec.containers{vllm}"
    assert reasons == [
        ("Scheduled", None),
        ("Pulling", init),
        ("Pulled", init),
        ("Created", init),
        ("Started", init),
        ("Pulled", main),
        ("Created", main),
        ("Started", main),
    ]
    evs = on_loop(sim, lambda s: events_of(s, S, name))
    assert evs[0]["source"] == {"component": "default-scheduler"}
    assert evs[1]["source"]["component"] == "kubelet" and evs[1]["source"]["host"] == "gpu-pool-1"
    assert "already present on machine" in evs[5]["message"]
    assert all(e["count"] == 1 and e["firstTimestamp"] and e["involvedObject"]["kind"] == "Pod" for e in evs)
    st = pod["status"]
    assert st["phase"] == "Running" and st["podIP"] and st["hostIP"] and st["startTime"]
    cs = st["containerStatuses"][0]
    assert {"name", "image", "imageID", "ready", "restartCount", "started", "state"} <= set(cs)
    assert cs["ready"] is True and cs["imageID"].startswith("docker.io/vllm/vllm-openai@sha256:")
    assert st["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    assert all(c["lastTransitionTime"] for c in st["conditions"])
    # the stand-in got the resolved environment and expanded args, and was registered before Ready
    run = fake_standins.run_for("coder-chat")
    assert run.env["VLLM_API_KEY"] == sim.secrets["vllm_key"]
    assert run.args[run.args.index("--api-key") + 1] == sim.secrets["vllm_key"]
    assert registered_at_ready == [True]  # in Backends before the Ready condition was written
    # deployment status lags the pod by one reconcile, then satisfies kubectl rollout status
    t_ready = next(t for t, _, p in pods if p["metadata"]["name"] == name and is_ready(p))
    before = [d for t, _, d in deps if d["metadata"]["name"] == "coder-chat" and t <= t_ready]
    assert before and (before[-1].get("status") or {}).get("readyReplicas", 0) == 0
    d = wait_for(
        sim,
        lambda s: (x := s.get("deployments", S, "coder-chat")).get("status", {}).get("readyReplicas") == 1 and x,
        5,
    )
    assert rollout_status(d) == (True, "successfully rolled out")
    after = [x for t, _, x in deps if x["metadata"]["name"] == "coder-chat" and t > t_ready]
    assert after[0]["status"]["readyReplicas"] == 1 and after[0]["status"]["availableReplicas"] == 1
    conds = {c["type"]: c for c in d["status"]["conditions"]}
    assert conds["Available"]["reason"] == "MinimumReplicasAvailable"
    assert conds["Progressing"]["reason"] == "NewReplicaSetAvailable"
    assert d["status"]["observedGeneration"] == d["metadata"]["generation"]
    # never reported rolled out while the pod was not Ready
    for t, _, x in deps:
        if x["metadata"]["name"] == "coder-chat" and t < t_ready and x["spec"]["replicas"] == 1:
            assert not rollout_status(x)[0]


def test_image_cache_per_node_and_weights_cache_per_model(make_sim: Any, delays: Delays) -> None:
    sim = make_sim(time_scale=FAST)
    scale(sim, S, "coder-chat", 1)
    ready_pod(sim, S, "coder-chat")
    assert delays.of("_pull", "coder-chat") == [240.0]  # cold: pull, weights, start
    assert delays.of("_walk", "coder-chat") == [150.0, 40.0]
    scale(sim, S, "coder-chat", 0)
    gone(sim, S, "coder-chat")
    delays.clear()
    scale(sim, S, "coder-fim", 1)
    fim = ready_pod(sim, S, "coder-fim")
    evs = on_loop(sim, lambda s: events_of(s, S, fim["metadata"]["name"]))
    assert "Pulling" not in [e["reason"] for e in evs]  # the image is on the node already
    assert "already present on machine" in next(e for e in evs if e["reason"] == "Pulled")["message"]
    assert delays.of("_pull", "coder-fim") == []
    fim_t = model_timings(StackSpec().model("coder-fim"))  # fim's weights are not cached yet: staged in full
    assert delays.of("_walk", "coder-fim") == [fim_t.weights_s, fim_t.server_start_s]
    scale(sim, S, "coder-fim", 0)
    gone(sim, S, "coder-fim")
    delays.clear()
    scale(sim, S, "coder-chat", 1)
    ready_pod(sim, S, "coder-chat")
    # weights cached on the model-cache PVC (3 s to find them), image cached on the node (no pull)
    assert delays.of("_pull", "coder-chat") == []
    assert delays.of("_walk", "coder-chat") == [Timings().weights_cached_s, 40.0]


# ------------------------------------------------------------------ scheduling
def test_one_gpu_second_model_pending_until_first_is_gone(make_sim: Any) -> None:
    sim = make_sim(time_scale=FAST)
    pods = record(sim, "pods")
    scale(sim, S, "coder-chat", 1)
    chat = ready_pod(sim, S, "coder-chat")
    scale(sim, S, "coder-fim", 1)
    fim = wait_for(
        sim,
        lambda s: next(
            (
                p
                for p in pods_of(s, S, "coder-fim")
                if any(c.get("reason") == "Unschedulable" for c in p["status"].get("conditions") or [])
            ),
            None,
        ),
        5,
    )
    cond = next(c for c in fim["status"]["conditions"] if c["type"] == "PodScheduled")
    assert cond["status"] == "False"
    assert cond["message"].startswith(
        "0/2 nodes are available: 1 Insufficient nvidia.com/gpu, 1 node(s) didn't match Pod's node affinity/selector."
    )
    assert fim["status"]["phase"] == "Pending" and not fim["spec"].get("nodeName")
    ev = next(
        e for e in on_loop(sim, lambda s: events_of(s, S, fim["metadata"]["name"])) if e["reason"] == "FailedScheduling"
    )
    assert ev["type"] == "Warning" and ev["message"] == cond["message"]
    assert ev["source"]["component"] == "default-scheduler"
    scale(sim, S, "coder-chat", 0)
    ready_pod(sim, S, "coder-fim")
    # fim was bound only after chat's pod was DELETED (a deleting pod still holds its GPU)
    chat_deleted = next(
        t for t, typ, p in pods if typ == "DELETED" and p["metadata"]["name"] == chat["metadata"]["name"]
    )
    chat_deleting = next(
        t
        for t, _, p in pods
        if p["metadata"]["name"] == chat["metadata"]["name"] and p["metadata"].get("deletionTimestamp")
    )
    fim_bound = next(
        t for t, _, p in pods if p["metadata"]["name"] == fim["metadata"]["name"] and p["spec"].get("nodeName")
    )
    assert chat_deleting < chat_deleted <= fim_bound


def test_autoscaler_scales_up_then_refuses_when_full_then_removes_idle_node(make_sim: Any, delays: Delays) -> None:
    sim = make_sim(gpu_pool="autoscaled", time_scale=FAST)
    assert on_loop(sim, lambda s: [n["metadata"]["name"] for n in s.list("nodes")]) == ["default-pool-1"]
    scale(sim, S, "coder-chat", 1)
    pod = wait_for(
        sim,
        lambda s: next(
            (
                p
                for p in pods_of(s, S, "coder-chat")
                if any(e["reason"] == "TriggeredScaleUp" for e in events_of(s, S, p["metadata"]["name"]))
            ),
            None,
        ),
        5,
    )
    evs = on_loop(sim, lambda s: events_of(s, S, pod["metadata"]["name"]))
    fs = next(e for e in evs if e["reason"] == "FailedScheduling")
    assert fs["message"].startswith("0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.")
    up = next(e for e in evs if e["reason"] == "TriggeredScaleUp")
    assert up["type"] == "Normal" and up["source"]["component"] == "cluster-autoscaler"
    assert up["message"] == "pod triggered scale-up: [{gpu-pool 0->1 (max: 1)}]"
    node = wait_for(
        sim, lambda s: next((n for n in s.list("nodes") if n["metadata"]["name"].startswith("gpu-pool")), None), 5
    )
    assert delays.of("_scale_up", "coder-chat") == [240.0]  # a GPU node takes 240 s to join
    bound = ready_pod(sim, S, "coder-chat")
    assert bound["spec"]["nodeName"] == node["metadata"]["name"]
    # the pool is at its max (1 GPU): a second model pod does not trigger a scale-up
    scale(sim, S, "coder-fim", 1)
    nt = wait_for(
        sim,
        lambda s: next(
            (
                e
                for p in pods_of(s, S, "coder-fim")
                for e in events_of(s, S, p["metadata"]["name"])
                if e["reason"] == "NotTriggerScaleUp"
            ),
            None,
        ),
        5,
    )
    assert nt["message"] == "pod didn't trigger scale-up: 1 max node group size reached"
    assert nt["source"]["component"] == "cluster-autoscaler"
    scale(sim, S, "coder-fim", 0)
    scale(sim, S, "coder-chat", 0)
    gone(sim, S, "coder-chat")
    wait_for(sim, lambda s: len(s.list("nodes")) == 1, 5, "idle GPU node removed")
    assert set(delays.of("_scale_down")) == {600.0}  # removed once unneeded for --scale-down-unneeded-time
    assert delays.of("_scale_up") == [240.0]  # the second model's pod added no node


# ------------------------------------------------------------------ faults
def _main_status(p: dict[str, Any]) -> dict[str, Any]:
    return ((p.get("status") or {}).get("containerStatuses") or [{}])[0]


def test_fault_crashloop(make_sim: Any) -> None:
    sim = make_sim(faults={"coder-fim": "crashloop"}, time_scale=FAST)
    scale(sim, S, "coder-fim", 1)
    pod = wait_for(
        sim,
        lambda s: next(
            (
                p
                for p in pods_of(s, S, "coder-fim")
                if _main_status(p).get("state", {}).get("waiting", {}).get("reason") == "CrashLoopBackOff"
            ),
            None,
        ),
        5,
    )
    cs = _main_status(pod)
    assert cs["lastState"]["terminated"]["reason"] == "Error" and cs["lastState"]["terminated"]["exitCode"] == 1
    assert cs["restartCount"] == 1 and cs["ready"] is False
    assert pod["status"]["phase"] == "Running"
    ev = next(e for e in on_loop(sim, lambda s: events_of(s, S, pod["metadata"]["name"])) if e["reason"] == "BackOff")
    assert ev["type"] == "Warning" and ev["message"].startswith("Back-off restarting failed container vllm in pod")
    wait_for(sim, lambda s: any(_main_status(p)["restartCount"] >= 2 for p in pods_of(s, S, "coder-fim")), 5)


def test_fault_imagepull_then_cleared_at_runtime(make_sim: Any) -> None:
    sim = make_sim(faults={"coder-chat": "imagepull"}, time_scale=FAST)
    scale(sim, S, "coder-chat", 1)

    def init_reason(s: Store, reason: str) -> dict[str, Any] | None:
        for p in pods_of(s, S, "coder-chat"):
            st = (p["status"].get("initContainerStatuses") or [{}])[0].get("state", {})
            if st.get("waiting", {}).get("reason") == reason:
                return p
        return None

    wait_for(sim, lambda s: init_reason(s, "ErrImagePull"), 5)
    pod = wait_for(sim, lambda s: init_reason(s, "ImagePullBackOff"), 5)
    assert _main_status(pod)["state"]["waiting"]["reason"] == "PodInitializing"
    evs = on_loop(sim, lambda s: events_of(s, S, pod["metadata"]["name"]))
    failed = [e for e in evs if e["reason"] == "Failed"]
    assert failed[0]["type"] == "Warning"
    assert failed[0]["message"].startswith('Failed to pull image "vllm/vllm-openai:v0.32.0": ')
    assert failed[0]["message"].endswith("not found")
    assert {"Error: ErrImagePull", "Error: ImagePullBackOff"} <= {e["message"] for e in failed}
    sim.set_fault("coder-chat", None)
    ready_pod(sim, S, "coder-chat", 10)


def test_fault_oom(make_sim: Any) -> None:
    sim = make_sim(faults={"coder-chat": "oom"}, time_scale=FAST)
    scale(sim, S, "coder-chat", 1)
    pod = wait_for(
        sim,
        lambda s: next(
            (p for p in pods_of(s, S, "coder-chat") if _main_status(p).get("lastState", {}).get("terminated")), None
        ),
        5,
    )
    cs = _main_status(pod)
    assert cs["lastState"]["terminated"]["reason"] == "OOMKilled" and cs["lastState"]["terminated"]["exitCode"] == 137
    assert cs["state"]["waiting"]["reason"] == "CrashLoopBackOff"


def test_auto_oom_when_model_exceeds_node_memory(make_sim: Any) -> None:
    big = ModelSpec(
        name="coder-big",
        role="agent",
        served_model_name="qwen2.5-coder-32b-instruct",
        alias="coder-big",
        weights_gb=18,
        register_at_runtime=True,
    )
    spec = StackSpec(models=[*StackSpec().models, big])
    sim = make_sim(spec=spec, time_scale=0.001)
    scale(sim, S, "coder-big", 1)
    pod = wait_for(
        sim,
        lambda s: next(
            (p for p in pods_of(s, S, "coder-big") if _main_status(p).get("lastState", {}).get("terminated")), None
        ),
        10,
    )
    assert _main_status(pod)["lastState"]["terminated"] == {
        **_main_status(pod)["lastState"]["terminated"],
        "reason": "OOMKilled",
        "exitCode": 137,
    }
    # the 14B agent (9.5 GB + 2 GB overhead) fits the 16 GB node
    scale(sim, S, "coder-big", 0)
    gone(sim, S, "coder-big")
    scale(sim, S, "coder-agent", 1)
    ready_pod(sim, S, "coder-agent", 10)


def test_fault_unschedulable(make_sim: Any) -> None:
    sim = make_sim(faults={"coder-chat": "unschedulable"})
    scale(sim, S, "coder-chat", 1)
    ev = wait_for(
        sim,
        lambda s: next(
            (
                e
                for p in pods_of(s, S, "coder-chat")
                for e in events_of(s, S, p["metadata"]["name"])
                if e["reason"] == "NotTriggerScaleUp"
            ),
            None,
        ),
        5,
    )
    assert ev["message"] == "pod didn't trigger scale-up: 1 node(s) didn't match Pod's node affinity/selector"
    pod = on_loop(sim, lambda s: pods_of(s, S, "coder-chat")[0])
    assert (
        "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."
        in pod["status"]["conditions"][0]["message"]
    )
    assert "FailedScheduling" in [e["reason"] for e in on_loop(sim, lambda s: events_of(s, S, pod["metadata"]["name"]))]


def test_fault_slow_node(make_sim: Any, delays: Delays) -> None:
    sim = make_sim(gpu_pool="autoscaled", faults={"coder-chat": "slow-node"})
    scale(sim, S, "coder-chat", 1)
    wait_for(sim, lambda s: len(s.list("nodes")) == 2, 5, "GPU node")
    assert delays.of("_scale_up", "coder-chat") == [285.0]  # 240 s without the fault


def test_set_fault_rejects_unknown(sim: SimStack) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        sim.set_fault("coder-chat", "meltdown")
    with pytest.raises(ValueError, match="unknown fault"):
        SimStack(faults={"coder-chat": "meltdown"})


# ------------------------------------------------------------------ missing secrets
def _create_secret(sim: SimStack, ns: str, name: str, data: dict[str, str]) -> None:
    on_loop(
        sim,
        lambda s: s.create(
            "secrets",
            {"metadata": {"name": name}, "type": "Opaque", "data": {k: b64(v) for k, v in data.items()}},
            namespace=ns,
        ),
    )


def test_missing_env_secret_is_create_container_config_error_then_recovers(
    sim: SimStack, fake_standins: FakeStandins
) -> None:
    scale(sim, "experience", "open-webui", 1)
    pod = wait_for(
        sim,
        lambda s: next(
            (
                p
                for p in pods_of(s, "experience", "open-webui")
                if _main_status(p).get("state", {}).get("waiting", {}).get("reason") == "CreateContainerConfigError"
            ),
            None,
        ),
        5,
    )
    assert _main_status(pod)["state"]["waiting"]["message"] == 'secret "openwebui-secrets" not found'
    assert pod["status"]["phase"] == "Pending"
    ev = next(
        e
        for e in on_loop(sim, lambda s: events_of(s, "experience", pod["metadata"]["name"]))
        if e["reason"] == "Failed"
    )
    assert ev["type"] == "Warning" and ev["message"] == 'Error: secret "openwebui-secrets" not found'
    _create_secret(sim, "experience", "openwebui-secrets", {"OPENAI_API_KEY": "sk-vkey", "WEBUI_SECRET_KEY": "x" * 64})
    ready_pod(sim, "experience", "open-webui")
    run = fake_standins.run_for("open-webui")
    assert run.env["OPENAI_API_KEY"] == "sk-vkey"
    assert run.env["OPENAI_API_BASE_URL"] == sim.gateway_url + "/v1"
    assert run.container_port == 8080


def test_missing_secret_volume_is_failed_mount_then_recovers(sim: SimStack, fake_standins: FakeStandins) -> None:
    scale(sim, "experience", "tabby", 1)
    pod = wait_for(
        sim,
        lambda s: next(
            (
                p
                for p in pods_of(s, "experience", "tabby")
                for e in events_of(s, "experience", p["metadata"]["name"])
                if e["reason"] == "FailedMount" and p
            ),
            None,
        ),
        5,
    )
    pod = on_loop(sim, lambda s: s.get("pods", "experience", pod["metadata"]["name"]))
    assert _main_status(pod)["state"]["waiting"]["reason"] == "ContainerCreating"
    ev = next(
        e
        for e in on_loop(sim, lambda s: events_of(s, "experience", pod["metadata"]["name"]))
        if e["reason"] == "FailedMount"
    )
    assert ev["type"] == "Warning"
    assert ev["message"] == 'MountVolume.SetUp failed for volume "config" : secret "tabby-config" not found'
    toml = '[model.completion.http]\nkind = "vllm/completion"\napi_key = "sk-tabby"\n'
    _create_secret(sim, "experience", "tabby-config", {"config.toml": toml})
    ready_pod(sim, "experience", "tabby")
    assert fake_standins.run_for("tabby").files == {"/data/config.toml": toml}


def test_standin_that_fails_to_start_crash_loops(sim: SimStack, fake_standins: FakeStandins) -> None:
    fake_standins.fail_apps.add("coder-fim")
    scale(sim, S, "coder-fim", 1)
    wait_for(
        sim,
        lambda s: any(
            _main_status(p).get("state", {}).get("waiting", {}).get("reason") == "CrashLoopBackOff"
            for p in pods_of(s, S, "coder-fim")
        ),
        5,
    )


# ------------------------------------------------------------------ deletion and rollout
def test_graceful_deletion_stops_the_standin_then_removes_the_pod(sim: SimStack, fake_standins: FakeStandins) -> None:
    pods = record(sim, "pods")
    scale(sim, S, "coder-fim", 1)
    pod = ready_pod(sim, S, "coder-fim")
    name = pod["metadata"]["name"]
    assert on_loop(sim, lambda s: sim.backends.lookup(S, name, 8000)) is not None
    scale(sim, S, "coder-fim", 0)
    wait_for(sim, lambda s: s.find("pods", S, name) is None, 5, "pod deleted")
    mine = [(typ, p) for _, typ, p in pods if p["metadata"]["name"] == name]
    deleting = [p for typ, p in mine if typ == "MODIFIED" and p["metadata"].get("deletionTimestamp")]
    assert deleting and deleting[0]["metadata"]["deletionGracePeriodSeconds"] == 30
    assert mine[-1][0] == "DELETED"
    assert name in fake_standins.stopped
    assert on_loop(sim, lambda s: sim.backends.lookup(S, name, 8000)) is None
    evs = on_loop(sim, lambda s: events_of(s, S, name))
    assert "Killing" in [e["reason"] for e in evs]
    d = on_loop(sim, lambda s: s.get("deployments", S, "coder-fim"))
    assert "replicas" not in d["status"] and rollout_status(d)[0]


def test_rollout_restart_replaces_the_pod_new_first(sim: SimStack, fake_standins: FakeStandins) -> None:
    _create_secret(sim, "experience", "openwebui-secrets", {"OPENAI_API_KEY": "sk-a", "WEBUI_SECRET_KEY": "k"})
    scale(sim, "experience", "open-webui", 1)
    old = ready_pod(sim, "experience", "open-webui")
    pods = record(sim, "pods")

    def restart(s: Store) -> None:
        d = s.get("deployments", "experience", "open-webui")
        d["spec"]["template"]["metadata"].setdefault("annotations", {})["kubectl.kubernetes.io/restartedAt"] = "now"
        s.update("deployments", d)

    on_loop(sim, restart)
    wait_for(sim, lambda s: s.find("pods", "experience", old["metadata"]["name"]) is None, 5, "old pod gone")
    new = ready_pod(sim, "experience", "open-webui")
    assert new["metadata"]["name"] != old["metadata"]["name"]
    assert new["metadata"]["labels"]["pod-template-hash"] != old["metadata"]["labels"]["pod-template-hash"]
    new_ready = next(t for t, _, p in pods if p["metadata"]["name"] == new["metadata"]["name"] and is_ready(p))
    old_deleting = next(
        t
        for t, _, p in pods
        if p["metadata"]["name"] == old["metadata"]["name"] and p["metadata"].get("deletionTimestamp")
    )
    assert new_ready < old_deleting  # RollingUpdate maxSurge 25% (1), maxUnavailable 25% (0)
    d = wait_for(
        sim,
        lambda s: rollout_status(x := s.get("deployments", "experience", "open-webui"))[0] and x,
        5,
    )
    assert d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    rss = on_loop(
        sim, lambda s: s.list("replicasets", "experience", label_selector="app.kubernetes.io/name=open-webui")
    )
    assert sorted(rs["spec"]["replicas"] for rs in rss) == [0, 1]


def test_recreate_rollout_of_a_model_deletes_first(make_sim: Any) -> None:
    sim = make_sim(time_scale=FAST)
    scale(sim, S, "coder-fim", 1)
    old = ready_pod(sim, S, "coder-fim")

    def restart(s: Store) -> None:
        d = s.get("deployments", S, "coder-fim")
        d["spec"]["template"]["metadata"].setdefault("annotations", {})["kubectl.kubernetes.io/restartedAt"] = "now"
        s.update("deployments", d)

    on_loop(sim, restart)
    new = wait_for(
        sim,
        lambda s: next(
            (p for p in pods_of(s, S, "coder-fim") if is_ready(p) and p["metadata"]["name"] != old["metadata"]["name"]),
            None,
        ),
        5,
    )
    assert on_loop(sim, lambda s: s.find("pods", S, old["metadata"]["name"])) is None
    assert new["spec"]["nodeName"] == "gpu-pool-1"


def test_timeline_records_replica_changes(sim: SimStack) -> None:
    before = len(sim.timeline)
    assert {(ns, n, r) for _, ns, n, r in sim.timeline} >= {(S, "coder-chat", 0), ("litellm", "litellm", 1)}
    scale(sim, S, "coder-chat", 1)
    scale(sim, S, "coder-chat", 1)  # no change: not recorded
    scale(sim, S, "coder-chat", 0)
    new = sim.timeline[before:]
    assert [(ns, n, r) for _, ns, n, r in new] == [(S, "coder-chat", 1), (S, "coder-chat", 0)]
    assert new[0][0] <= new[1][0]


def test_progress_deadline_exceeded_then_recovers(make_sim: Any, delays: Delays) -> None:
    """progressDeadlineSeconds (600 s) marks a stuck rollout and stops nothing; it completes later."""
    sim = make_sim(faults={"coder-fim": "crashloop"}, time_scale=FAST)
    scale(sim, S, "coder-fim", 1)

    def progressing(s: Store) -> dict[str, Any] | None:
        d = s.get("deployments", S, "coder-fim")
        return next((c for c in d.get("status", {}).get("conditions", []) if c["type"] == "Progressing"), None)

    cond = wait_for(sim, lambda s: (c := progressing(s)) and c["reason"] == "ProgressDeadlineExceeded" and c, 5)
    # judged against the Deployment's progressDeadlineSeconds (600 s by default), in simulated seconds
    assert delays.of("_write_status") and set(delays.of("_write_status")) == {600.0}
    assert cond["status"] == "False" and cond["message"].startswith('ReplicaSet "coder-fim-')
    with pytest.raises(AssertionError, match="progress deadline"):
        rollout_status(on_loop(sim, lambda s: s.get("deployments", S, "coder-fim")))
    sim.set_fault("coder-fim", None)
    ready_pod(sim, S, "coder-fim", 10)
    cond = wait_for(sim, lambda s: (c := progressing(s)) and c["reason"] == "NewReplicaSetAvailable" and c, 5)
    assert cond["status"] == "True"


def test_store_reads_are_private_copies_and_owner_lists_match_a_full_scan() -> None:
    """The controllers read with ``owners=`` (only a deployment's own replica sets and pods are copied)
    and collect garbage from ``ownership()``; both must agree with a full scan, and no read may alias
    the stored object."""
    store = Store()
    rs = store.create("replicasets", {"metadata": {"name": "a-1", "namespace": "serving"}, "spec": {}})
    other = store.create("replicasets", {"metadata": {"name": "b-1", "namespace": "serving"}, "spec": {}})
    for i, owner in enumerate([rs, rs, other]):
        ref = {"kind": "ReplicaSet", "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]}
        store.create(
            "pods",
            {
                "metadata": {"name": f"p{i}", "namespace": "serving", "ownerReferences": [{**ref, "controller": True}]},
                "spec": {"containers": [{"name": "c", "image": "x"}]},
            },
        )
    store.create("pods", {"metadata": {"name": "bare", "namespace": "serving"}, "spec": {"containers": []}})
    uid = rs["metadata"]["uid"]
    owned = store.list("pods", "serving", owners={uid})
    scan = [p for p in store.list("pods", "serving") if controller_uid(p) == uid]
    assert [p["metadata"]["name"] for p in owned] == [p["metadata"]["name"] for p in scan] == ["p0", "p1"]
    assert store.list("pods", "other-namespace", owners={uid}) == []
    assert {(ns, name, owner) for ns, name, _uid, owner, _d in store.ownership("pods")} == {
        ("serving", "p0", uid),
        ("serving", "p1", uid),
        ("serving", "p2", other["metadata"]["uid"]),
        ("serving", "bare", None),
    }
    owned[0]["spec"]["containers"][0]["image"] = "changed"
    owned[0]["metadata"]["ownerReferences"].clear()
    again = store.get("pods", "serving", "p0")
    assert again["spec"]["containers"][0]["image"] == "x" and controller_uid(again) == uid
