"""scale, status, exec and preflight against the simulated API server (objects written by the test)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from coder_stack.errors import ClusterUnavailable, CoderStackError, NotFound, PodNotReady, PreflightError
from coder_stack.kubernetes.exec import exec_in_deployment
from coder_stack.kubernetes.pods import pod_summary
from coder_stack.kubernetes.preflight import models_on_gpu, node_size_for, parse_memory_gb, preflight
from coder_stack.kubernetes.workloads import (
    annotate_deployment,
    deployment_status,
    scale,
    scale_if_annotated,
    unannotate_if,
)
from coder_stack.spec import ModelSpec, StackSpec
from coder_stack.tasks._common import only_retriable
from coder_stack.tasks.cluster import preflight_task, scale_task
from coder_stack.usecases.stamps import HELD_BY
from tests.kits.apiserver import NS, PodScript, ServerThread, deployment, node, record_requests, reference_cluster

SPEC = StackSpec()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = reference_cluster(tmp_path_factory.mktemp("kube-ops"), SPEC)
    yield srv
    srv.stop()


# ------------------------------------------------------------------------------------------- scale
async def test_scale_is_idempotent_and_reports_what_it_found(server: ServerThread) -> None:
    async with server.api() as api:
        first = await scale(api, NS, "coder-fim", 1)
        second = await scale(api, NS, "coder-fim", 1)
        back = await scale(api, NS, "coder-fim", 0)
    assert (first.found, first.requested, first.changed) == (0, 1, True)
    assert (second.found, second.requested, second.changed) == (1, 1, False)
    assert (back.found, back.changed) == (1, True)
    dep = await server.acall(server.store.get, "deployments", NS, "coder-fim")
    assert dep["spec"]["replicas"] == 0


async def test_conditional_scale_and_unstamp_change_nothing_once_another_run_has_stamped_the_model(
    server: ServerThread,
) -> None:
    """The API server applies a JSON patch whose ``test`` op fails as nothing at all (422): a stamp another run wrote
    since it was read, or a removed one, leaves replicas and stamp as they are; the stamp it read lets both through."""
    key = "coder-stack.io/held-by"

    async def state() -> tuple[int, str | None, str]:
        dep = await server.acall(server.store.get, "deployments", NS, "coder-agent")
        ann = dep["metadata"].get("annotations") or {}
        return int(dep["spec"]["replicas"]), ann.get(key), dep["metadata"]["resourceVersion"]

    async with server.api() as api:
        await annotate_deployment(api, NS, "coder-agent", {key: "run-b"})
        await scale(api, NS, "coder-agent", 1)
        before = await state()
        assert not await scale_if_annotated(api, NS, "coder-agent", 0, key, "run-a")  # run-b stamped it since
        assert not await unannotate_if(api, NS, "coder-agent", key, "run-a")
        assert await state() == before  # not even the resourceVersion moved
        assert await scale_if_annotated(api, NS, "coder-agent", 0, key, "run-b")
        assert (await state())[:2] == (0, "run-b")
        assert await unannotate_if(api, NS, "coder-agent", key, "run-b")
        assert (await state())[:2] == (0, None)
        gone = await state()
        assert not await scale_if_annotated(api, NS, "coder-agent", 1, key, "run-b")  # no stamp at all: 422 too
        assert not await unannotate_if(api, NS, "coder-agent", key, "run-b")
        assert await state() == gone
        with pytest.raises(NotFound):
            await scale_if_annotated(api, NS, "coder-nope", 0, key, "run-b")


async def test_scale_of_missing_deployment_names_it_and_its_namespace(server: ServerThread) -> None:
    async with server.api() as api:
        with pytest.raises(NotFound) as info:
            await scale(api, NS, "coder-nope", 1)
    assert "coder-nope" in str(info.value) and "'serving'" in str(info.value)
    assert isinstance(info.value.__cause__, ApiException)


async def test_library_errors_do_not_leak_and_5xx_is_retriable(server: ServerThread) -> None:
    server.faults.fail("GET", r"/deployments/coder-chat/scale$", 503, times=1)
    async with server.api() as api:
        with pytest.raises(CoderStackError) as info:
            await scale(api, NS, "coder-chat", 0)
    assert isinstance(info.value, ClusterUnavailable) and info.value.retriable
    assert not isinstance(info.value, ApiException)


async def test_a_stamped_scale_takes_the_replicas_found_from_the_stamps_answer_one_round_trip_fewer(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = record_requests(monkeypatch)
    fim = SPEC.model("coder-fim")
    up = await scale_task.fn(server.target, SPEC, fim, 1, held_by="run-1")
    again = await scale_task.fn(server.target, SPEC, fim, 1, held_by="run-1")
    down = await scale_task.fn(server.target, SPEC, fim, 0)
    assert (up.found, up.changed, again.found, again.changed, down.found, down.changed) == (0, True, 1, False, 1, True)
    dep = await server.acall(server.store.get, "deployments", NS, "coder-fim")
    assert dep["spec"]["replicas"] == 0 and dep["metadata"]["annotations"][HELD_BY] == "run-1"
    deploy, scale_url = f"/namespaces/{NS}/deployments/coder-fim", f"/namespaces/{NS}/deployments/coder-fim/scale"
    assert sent == [
        ("PATCH", deploy), ("PATCH", scale_url),  # stamped (its answer says 0 replicas), then scaled: no read
        ("PATCH", deploy),  # stamped again: 1 replica already, nothing more
        ("GET", scale_url), ("PATCH", scale_url),  # no stamp: read, then scaled
    ], sent  # fmt: skip


async def test_a_stamps_answer_without_the_replicas_leaves_the_count_to_a_read(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coder_stack.tasks import cluster

    async def answer_without_replicas(*args: Any, **kwargs: Any) -> client.V1Deployment:
        spec = client.V1DeploymentSpec(selector=client.V1LabelSelector(), template=client.V1PodTemplateSpec())
        return client.V1Deployment(spec=spec)  # spec.replicas left out

    async with server.api() as api:
        await scale(api, NS, "coder-agent", 1)
    monkeypatch.setattr(cluster, "annotate_deployment", answer_without_replicas)
    sent = record_requests(monkeypatch)
    try:
        result = await scale_task.fn(server.target, SPEC, SPEC.model("coder-agent"), 1, held_by="run-1")
    finally:
        async with server.api() as api:
            await scale(api, NS, "coder-agent", 0)
    assert (result.found, result.changed) == (1, False)  # read, not taken as 0 (which would have scaled it again)
    assert sent[0] == ("GET", f"/namespaces/{NS}/deployments/coder-agent/scale"), sent


async def test_scale_task_fn_returns_the_report(server: ServerThread) -> None:
    result = await scale_task.fn(server.target, SPEC, SPEC.model("coder-agent"), 0)
    assert result.changed is False and result.name == "coder-agent"


# ------------------------------------------------------------------------------------------- status
async def test_pod_summary_shows_status_as_kubectl_does(server: ServerThread) -> None:
    app = "summary-app"
    steps = {
        "Pending": [],
        "Init:0/1": ["bind"],
        "PodInitializing": ["bind", "main_waiting"],
        "Running": ["bind", "main_running", "ready"],
        "CrashLoopBackOff": ["bind", "main_running", "crashloop"],
        "Init:ErrImagePull": ["bind", "image_pull_error"],
        "Terminating": ["bind", "main_running", "mark_deleting"],
    }
    expected = {}
    for want, actions in steps.items():
        pod = PodScript(server.store, app=app)
        await server.write(pod.create)
        for a in actions:
            if a == "main_waiting":
                await server.write(_main_waiting, pod)
            else:
                await server.write(getattr(pod, a))
        expected[pod.name] = want
    async with server.api() as api:
        pods = await pod_summary(api, NS, f"app.kubernetes.io/name={app}")
    got = {p.name: p.status for p in pods}
    assert got == expected
    running = next(p for p in pods if p.status == "Running")
    assert running.ready == "1/1" and running.is_ready and running.node == "gpu-pool-1"
    crash = next(p for p in pods if p.status == "CrashLoopBackOff")
    assert crash.restarts == 1 and not crash.is_ready


def _main_waiting(pod: PodScript) -> None:
    """Init done, main container not started yet."""
    pod.main_running()
    p = pod.store.get("pods", pod.ns, pod.name)
    p["status"]["initContainerStatuses"] = [
        {
            "name": "stage-weights",
            "image": "x",
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
        }
    ]
    p["status"]["phase"] = "Pending"
    p["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "PodInitializing"}}
    pod.store.update("pods", p, status_only=True)


async def test_deployment_status_reports_replicas_and_readiness(server: ServerThread) -> None:
    async with server.api() as api:
        st = await deployment_status(api, "experience", "tabby")
    assert st.replicas == 0 and st.ready is True and st.pods == []
    async with server.api() as api:
        with pytest.raises(NotFound):
            await deployment_status(api, NS, "missing")


# ------------------------------------------------------------------------------------------- exec
async def test_exec_returns_exit_code_stdout_stderr_from_a_ready_pod(server: ServerThread) -> None:
    app = "exec-app"
    pod = PodScript(server.store, app=app)
    for step in (pod.create, pod.bind, pod.main_running, pod.ready):
        await server.write(step)
    cmd = ["sh", "-c", 'echo "key=${VLLM_API_KEY}"; echo oops >&2; exit 3']
    async with server.api() as api:
        res = await exec_in_deployment(api, NS, f"app.kubernetes.io/name={app}", cmd, 10)
        ok = await exec_in_deployment(api, NS, f"app.kubernetes.io/name={app}", ["true"], 10)
    assert res.exit_code == 3 and res.stdout == "key=from-test\n" and res.stderr == "oops\n"
    assert res.pod == pod.name
    assert ok.exit_code == 0


async def test_exec_without_ready_pod_is_retriable_pod_not_ready(server: ServerThread) -> None:
    async with server.api() as api:
        with pytest.raises(PodNotReady) as info:
            await exec_in_deployment(api, NS, "app.kubernetes.io/name=nobody", ["true"], 5)
    assert info.value.retriable


# ------------------------------------------------------------------------------------------- preflight
def _big_model_spec(memory_gb: float = 16.0) -> StackSpec:
    big = ModelSpec(
        name="coder-agent",
        role="agent",
        served_model_name="qwen2.5-coder-32b-instruct",
        alias="coder-agent",
        weights_gb=18,
    )
    models = [m for m in SPEC.models if m.name != "coder-agent"] + [big]
    return StackSpec(models=models, gpu_node_memory_gb=memory_gb)


async def test_preflight_refuses_a_32b_model_on_a_16gb_node_naming_a_node_that_fits(server: ServerThread) -> None:
    async with server.api() as api:
        with pytest.raises(PreflightError) as info:
            await preflight(api, _big_model_spec())
    msg = str(info.value)
    assert "coder-agent" in msg and "18 GB" in msg and "16 GB" in msg and "g2-standard-8 (32 GB)" in msg


async def test_preflight_uses_gpu_node_memory_when_a_gpu_node_exists(server: ServerThread) -> None:
    await server.acall(server.store.create, "nodes", node("gpu-pool-big", "32Gi", gpus=1))
    try:
        async with server.api() as api:
            report = await preflight(api, _big_model_spec(memory_gb=16))
        assert report.memory_source == "nodes" and report.gpu_node_memory_gb == 32
        assert report.gpu_nodes == ["gpu-pool-big"]
        assert all(m.fits for m in report.models)
    finally:
        await server.acall(server.store.delete, "nodes", None, "gpu-pool-big")


async def test_preflight_reports_active_models_and_passes_for_the_reference_stack(server: ServerThread) -> None:
    async with server.api() as api:
        await scale(api, NS, "coder-chat", 1)
        try:
            report = await preflight(api, SPEC)
        finally:
            await scale(api, NS, "coder-chat", 0)
    assert [m.name for m in report.active_models] == ["coder-chat"]
    assert report.memory_source == "spec" and report.gpu_node_memory_gb == 16
    assert any("no GPU node" in n for n in report.notes)
    assert {m.name for m in report.models} == {"coder-chat", "coder-fim", "coder-agent"}


async def test_preflight_names_every_missing_deployment(server: ServerThread) -> None:
    await server.acall(server.store.delete, "deployments", "experience", "tabby")
    try:
        async with server.api() as api:
            with pytest.raises(NotFound) as info:
                await preflight(api, SPEC)
        assert "deployment experience/tabby" in str(info.value)
    finally:
        await server.acall(server.store.create, "deployments", deployment("tabby", "experience", 0, gpu=False))


async def test_preflight_task_fn(server: ServerThread) -> None:
    report = await preflight_task.fn(server.target, SPEC, ["coder-fim"])
    assert [m.name for m in report.models] == ["coder-fim"]


async def test_models_on_gpu_are_those_with_replicas_or_a_pod_left_but_not_the_kept_one(server: ServerThread) -> None:
    # coder-chat asked for (no pod yet), coder-agent at 0 but its pod still terminating, coder-fim kept
    leftover = PodScript(server.store, app="coder-agent")
    fim_pod = PodScript(server.store, app="coder-fim")
    await server.acall(leftover.create)
    await server.acall(leftover.mark_deleting)
    await server.acall(fim_pod.create)
    try:
        async with server.api() as api:
            await scale(api, NS, "coder-chat", 1)
            await scale(api, NS, "coder-fim", 1)
            held = await models_on_gpu(api, SPEC, keep="coder-fim")
            everyone = await models_on_gpu(api, SPEC)
        assert [(h.name, h.replicas, h.pods) for h in held] == [
            ("coder-chat", 1, []),
            ("coder-agent", 0, [leftover.name]),
        ]
        assert {h.name for h in everyone} == {"coder-chat", "coder-fim", "coder-agent"}
        assert next(h for h in everyone if h.name == "coder-fim").pods == [fim_pod.name]
    finally:
        await server.acall(leftover.delete)
        await server.acall(fim_pod.delete)
        async with server.api() as api:
            await scale(api, NS, "coder-chat", 0)
            await scale(api, NS, "coder-fim", 0)
            assert await models_on_gpu(api, SPEC) == []


async def test_models_on_gpu_refuses_when_a_model_deployment_vanished(server: ServerThread) -> None:
    await server.acall(server.store.delete, "deployments", NS, "coder-agent")
    try:
        async with server.api() as api:
            with pytest.raises(NotFound, match=r"serving/coder-agent vanished during the run.*nothing was scaled"):
                await models_on_gpu(api, SPEC)
    finally:
        await server.acall(server.store.create, "deployments", deployment("coder-agent", replicas=0))


def test_memory_and_node_size_helpers() -> None:
    assert parse_memory_gb("16Gi") == 16
    assert parse_memory_gb("16777216Ki") == 16
    assert round(parse_memory_gb("32G"), 2) == 29.8
    assert node_size_for(20) == "g2-standard-8 (32 GB)"
    assert node_size_for(16) == "g2-standard-4 (16 GB)"
    assert node_size_for(100) == "g2-standard-32 (128 GB)"
    assert "more than 128" in node_size_for(200)


class _State:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def result(self) -> None:
        raise self.exc


def test_retry_condition_retries_only_retriable_errors() -> None:
    assert only_retriable(None, None, _State(ClusterUnavailable("x"))) is True
    assert only_retriable(None, None, _State(PodNotReady("x"))) is True
    assert only_retriable(None, None, _State(PreflightError("x"))) is False
    assert only_retriable(None, None, _State(ValueError("x"))) is False
