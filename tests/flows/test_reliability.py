"""Flow level: every fault ends with a clear error or a recovery, and no GPU model left running.

Function-level tests of the same faults live beside the code (tests/integration/test_kube_wait.py,
test_rollout_outcomes.py, test_gateway_admin_and_smokes.py, test_keys.py ...); docs/FAULTS.md maps each fault
to its tests. Here the
flows themselves run (on the flow tier's session Prefect harness) against the simulated cluster:

* pod faults: crash loop, image pull, OOM, unschedulable without scale-up, a slow node, a phase over budget;
* Kubernetes API faults: 500 and 429 (retried), 403, a watch dropped mid-wait plus 410 Gone, unreachable;
* gateway faults: down (retried until back), 5xx, budget exhausted, key deleted, model registered twice;
* process faults: SIGKILL mid-session (the teardown cleans up and says what it found), the Prefect server
  restarted while the GPU limit is held (leak without lease storage, none with it);
* load: 20 swaps at once on one GPU.
"""

from __future__ import annotations

import asyncio
import functools
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
import yaml
from aiohttp import web
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterName,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import PrefectHTTPStatusError
from prefect.states import Crashed
from simstack.stack import SimStack
from simstack.store import Store

from coder_stack.errors import (
    ClusterUnavailable,
    Forbidden,
    KeyUnusable,
    PodFailed,
    RetriableError,
    WaitTimeout,
)
from coder_stack.flows.keys import KeyOptions, manage_keys
from coder_stack.flows.params import Connection
from coder_stack.flows.swap import SwapOptions, swap_model
from coder_stack.flows.teardown import teardown
from coder_stack.flows.validate import ValidateOptions, validate_coder_stack
from coder_stack.kubernetes.client import ClusterTarget, open_api, read_secret
from coder_stack.orchestration.gpu_limit import GPU_LIMIT, gpu_limit_status
from coder_stack.orchestration.liveness import LEASE_LABEL, RELEASED, read_liveness, release_lease_of
from coder_stack.spec import StackSpec, spec_yaml
from coder_stack.tasks.gateway import gateway_ready_task
from tests.conftest import is_ready, pods_of
from tests.kits.flowkit import (
    MODELS,
    PROJECT,
    SERVING,
    PrefectServer,
    assert_no_gpu_model_running,
    conn,
    free_port,
    gpu_overlaps,
    gpu_pods,
    latest_run_of,
    replicas,
    scaled_up,
    sigkill,
    start_flow_process,
    until,
)

pytestmark = pytest.mark.usefixtures("gpu_limit")

SLOW_SCALE = 0.01  # coder-chat's cold start ~6 s on an autoscaled pool: long enough to act in the middle
FLOW_TIMEOUT = 60.0  # a flow that hangs (e.g. missed Ready) fails the test instead of waiting out its budgets


def stack_file(tmp_path: Path, spec: StackSpec) -> str:
    p = tmp_path / "stack.yaml"
    p.write_text(spec_yaml(spec))
    return str(p)


async def swap(sim: SimStack, target: str = "coder-chat", *, smoke_gateway: bool = False, **conn_kw: Any) -> Any:
    return await asyncio.wait_for(
        swap_model(options=SwapOptions(target=target, smoke_gateway=smoke_gateway), connection=conn(sim, **conn_kw)),
        FLOW_TIMEOUT,
    )


# ====================================================================== pod faults
@pytest.mark.parametrize(
    ("fault", "reason"),
    [("crashloop", "CrashLoopBackOff"), ("imagepull", "ImagePullBackOff|ErrImagePull"), ("oom", "OOMKilled")],
)
async def test_pod_fault_fails_the_swap_fast_naming_the_cause_and_frees_the_gpu(
    make_sim: Callable[..., SimStack], fault: str, reason: str
) -> None:
    sim = make_sim(faults={"coder-chat": fault})
    # PodFailed, not the WaitTimeout of a phase budget: a pod that can never start fails at once.
    with pytest.raises(PodFailed) as info:
        await swap(sim)
    assert re.search(reason, str(info.value)), str(info.value)
    assert "coder-chat" in str(info.value)
    await assert_no_gpu_model_running(sim)
    # The failed run gave its lease back and says so on its flow run, though the run ended right after its
    # session: status and the clean-up must not take it for holding the GPU.
    run_id, _ = await latest_run_of("swap_model")
    async with get_client() as client:
        labels = (await client.read_flow_run(run_id)).labels
    assert labels.get(LEASE_LABEL) == RELEASED, labels


async def test_unschedulable_without_scale_up_fails_naming_the_scheduler_and_frees_the_gpu(
    make_sim: Callable[..., SimStack],
) -> None:
    sim = make_sim(faults={"coder-chat": "unschedulable"}, gpu_pool="autoscaled")
    with pytest.raises((PodFailed, WaitTimeout)) as info:
        await swap(sim)
    msg = str(info.value)
    assert "scale-up" in msg or "NotTriggerScaleUp" in msg, msg
    await assert_no_gpu_model_running(sim)


async def test_a_slow_gpu_node_within_its_budget_succeeds(make_sim: Callable[..., SimStack]) -> None:
    sim = make_sim(faults={"coder-chat": "slow-node"}, gpu_pool="autoscaled", time_scale=0.004)
    report = await swap(sim)
    assert report.outcome == "passed"
    sec = report.section("coder-chat")
    assert sec.scale_up_seen and sec.phases["node"] > 0.9, sec.phases  # 285 simulated s * 0.004 ~ 1.1 s
    assert replicas(sim)["coder-chat"] == 1
    await teardown(connection=conn(sim))
    await assert_no_gpu_model_running(sim)


async def test_a_phase_over_its_budget_fails_naming_the_phase_and_frees_the_gpu(
    make_sim: Callable[..., SimStack], tmp_path: Path
) -> None:
    base = StackSpec()
    models = [
        m.model_copy(update={"budgets": m.budgets.model_copy(update={"image": 1.0})}) if m.name == "coder-chat" else m
        for m in base.models
    ]
    path = stack_file(tmp_path, base.model_copy(update={"models": models}))
    sim = make_sim(time_scale=SLOW_SCALE)  # image pull 240 simulated s -> 2.4 s, over the 1 s budget
    with pytest.raises(WaitTimeout) as info:
        await swap(sim, stack_file=path)
    msg = str(info.value)
    assert info.value.phase == "image" and "image" in msg and "budget" in msg, msg
    await assert_no_gpu_model_running(sim)


# ====================================================================== Kubernetes API faults
async def test_500_and_429_from_the_api_are_retried_and_the_swap_passes(make_sim: Callable[..., SimStack]) -> None:
    sim = make_sim()
    faults = sim.api_server.faults
    faults.fail("PATCH", r"/namespaces/serving/deployments/coder-chat/scale$", 500)
    faults.fail("GET", r"/namespaces/serving/services/coder-chat$", 429, retry_after=1)
    report = await swap(sim)
    assert report.outcome == "passed"
    fired = [(m, s) for m, _p, s in faults.fired]
    assert ("PATCH", 500) in fired and ("GET", 429) in fired, faults.fired
    assert replicas(sim)["coder-chat"] == 1
    await teardown(connection=conn(sim))


async def test_403_is_permanent_and_names_the_missing_permission(make_sim: Callable[..., SimStack]) -> None:
    sim = make_sim()
    sim.api_server.faults.fail("PATCH", r"/deployments/coder-chat/scale$", 403, times=10)
    mark = len(sim.timeline)
    with pytest.raises(Forbidden) as info:
        await swap(sim)
    msg = str(info.value)
    assert "Grant verb 'patch' on resource 'deployments/scale' in namespace 'serving'" in msg, msg
    assert [s for _m, _p, s in sim.api_server.faults.fired] == [403], "a 403 must not be retried"
    assert sim.timeline[mark:] == []
    sim.api_server.faults.clear()
    await assert_no_gpu_model_running(sim)


async def test_a_dropped_watch_and_a_410_gone_are_resumed_without_missing_ready(
    make_sim: Callable[..., SimStack],
) -> None:
    sim = make_sim(gpu_pool="autoscaled", time_scale=SLOW_SCALE)
    faults = sim.api_server.faults
    # The pod watch of the cold start is cut after 2 events (abort: a reset connection, then a clean end) ...
    faults.drop_watch(r"/namespaces/serving/pods$", after_events=2, abort=True)
    faults.drop_watch(r"/namespaces/serving/pods$", after_events=2)
    # ... and the history is compacted as soon as the GPU node appears: resuming from the last
    # resourceVersion then answers 410 Gone, and the wait must re-list.
    compacted: list[int] = []

    def on_event(ev: Any) -> None:
        if ev.plural == "nodes" and ev.type == "ADDED" and not compacted:
            sim.store.compact()
            compacted.append(sim.store.compacted_rv)

    sim.call(lambda s: s.listeners.append(on_event), sim.store)
    report = await swap(sim)
    assert report.outcome == "passed"
    assert compacted, "the GPU node never appeared"
    watches = [
        p for m, p in sim.api_server.requests if m == "GET" and "/namespaces/serving/pods" in p and "watch=" in p
    ]
    lists = [
        p for m, p in sim.api_server.requests if m == "GET" and "/namespaces/serving/pods?" in p and "watch=" not in p
    ]
    assert len(watches) >= 3, watches  # the first watch and at least two resumptions
    assert len(lists) >= 2, lists  # the 410 forced a re-list
    assert sim.call(lambda s: [is_ready(p) for p in pods_of(s, SERVING, "coder-chat")], sim.store) == [True]
    await teardown(connection=conn(sim))
    await assert_no_gpu_model_running(sim)


async def test_an_unreachable_api_server_is_a_clear_error(tmp_path: Path) -> None:
    kc = tmp_path / "kubeconfig"
    port = free_port()  # nothing listens there
    kc.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    with pytest.raises(ClusterUnavailable) as info:
        await teardown(connection=Connection(kubeconfig=str(kc)))
    msg = str(info.value)
    assert "could not be reached" in msg and "kubeconfig's server address" in msg, msg


# ====================================================================== gateway faults
def _set_replicas(store: Store, namespace: str, name: str, n: int) -> None:
    d = store.get("deployments", namespace, name)
    d["spec"]["replicas"] = n
    store.update("deployments", d)


async def test_gateway_down_is_retried_and_the_run_recovers_when_it_is_back(
    make_sim: Callable[..., SimStack], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_sim()
    spec = StackSpec()
    sim.call(_set_replicas, sim.store, spec.gateway_namespace, spec.gateway_service, 0)
    await until(
        lambda: not sim.call(lambda s: pods_of(s, spec.gateway_namespace, spec.gateway_service), sim.store),
        10,
        "gateway pod gone",
    )
    # Each attempt of the gateway check, as the task's retries run it: the exception it ended with, or None.
    attempts: list[BaseException | None] = []
    first_failed = asyncio.Event()
    check = gateway_ready_task.fn

    @functools.wraps(check)
    async def counted(*args: Any, **kwargs: Any) -> Any:
        try:
            result = await check(*args, **kwargs)
        except BaseException as e:
            attempts.append(e)
            first_failed.set()
            raise
        attempts.append(None)
        return result

    monkeypatch.setattr(gateway_ready_task, "fn", counted)
    run: asyncio.Future[Any] = asyncio.ensure_future(manage_keys(connection=conn(sim), return_state=True))
    await asyncio.wait_for(first_failed.wait(), FLOW_TIMEOUT)  # no Ready gateway pod: the first check fails
    assert isinstance(attempts[0], RetriableError), repr(attempts[0])
    sim.call(_set_replicas, sim.store, spec.gateway_namespace, spec.gateway_service, 1)
    state = await asyncio.wait_for(run, FLOW_TIMEOUT)
    report = await state.result()
    assert report.outcome == "passed"
    assert all(": minted" in a for a in report.key_actions), report.key_actions
    # the check failed until the gateway was back, then passed: the same task, retried (not a second call)
    assert len(attempts) >= 2 and attempts[-1] is None, attempts
    assert all(isinstance(a, RetriableError) for a in attempts[:-1]), attempts
    # and Prefect recorded one gateway-ready task run that ran once per attempt and completed
    flow_run_id = state.state_details.flow_run_id
    deadline = time.monotonic() + 30  # the server records task runs from their events, in batches
    while True:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="gateway-ready")),
            )
        if len(runs) == 1 and runs[0].state_type == StateType.COMPLETED and runs[0].run_count == len(attempts):
            break
        assert time.monotonic() < deadline, [(r.name, r.state_type, r.run_count) for r in runs]
        await asyncio.sleep(0.2)


async def test_gateway_5xx_is_retried_and_the_run_recovers(make_sim: Callable[..., SimStack], tmp_path: Path) -> None:
    """The gateway (behind an ingress URL override) answers 500 to the first key call, then recovers.

    A gateway that keeps answering 5xx ends in a GatewayError naming the call and the status after the
    retries: tests/integration/test_gateway_admin_and_smokes.py and tests/unit/test_http.py.
    """
    sim = make_sim()
    failures = {"left": 1}
    seen: list[int] = []

    async def proxy(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/key/") and failures["left"] > 0:
            failures["left"] -= 1
            seen.append(500)
            return web.json_response({"error": {"message": "Internal Server Error"}}, status=500)
        async with httpx.AsyncClient(base_url=sim.gateway_url, timeout=30) as http:
            r = await http.request(
                request.method,
                request.path_qs,
                content=await request.read(),
                headers={k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")},
            )
        seen.append(r.status_code)
        return web.Response(body=r.content, status=r.status_code, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        doc = StackSpec().model_dump(mode="json")
        doc["access"]["overrides"]["gateway"] = f"http://127.0.0.1:{port}"
        spec = StackSpec.model_validate(doc)
        report = await asyncio.wait_for(
            manage_keys(connection=conn(sim, stack_file=stack_file(tmp_path, spec))), FLOW_TIMEOUT
        )
        assert report.outcome == "passed"
        assert all(": minted" in a for a in report.key_actions), report.key_actions
        assert seen.count(500) == 1 and seen[-1] == 200, seen
    finally:
        await runner.cleanup()


async def test_budget_exhausted_fails_naming_the_key_and_keeps_the_healthy_model_serving(
    make_sim: Callable[..., SimStack],
) -> None:
    """A spent budget is the key's problem: re-minting would bypass it, and scaling the model down would
    throw away a cold start. The swap leaves coder-chat serving and says what to do about the key."""
    sim = make_sim()
    await manage_keys(connection=conn(sim))

    def exhaust() -> None:
        for rec in sim.services.litellm_db["keys"].values():
            if rec.get("key_alias") == "open-webui":
                rec["spend"] = float(rec["max_budget"])

    sim.call(exhaust)
    keys_before = sim.call(lambda: sorted(sim.services.litellm_db["keys"]))
    with pytest.raises(KeyUnusable) as info:
        await swap(sim, smoke_gateway=True)
    msg = str(info.value)
    assert "coder-chat is serving" in msg and "'open-webui' is over budget" in msg and "raise max_budget" in msg
    assert replicas(sim)["coder-chat"] == 1
    assert sim.call(lambda: sorted(sim.services.litellm_db["keys"])) == keys_before  # nothing re-minted
    await teardown(connection=conn(sim))
    await assert_no_gpu_model_running(sim)


async def test_a_key_deleted_behind_our_back_is_reminted_and_redelivered(make_sim: Callable[..., SimStack]) -> None:
    sim = make_sim()
    first = await manage_keys(options=KeyOptions(aliases=["coder-agent"]), connection=conn(sim))
    assert first.key_actions[0].startswith("coder-agent: minted")
    target = ClusterTarget(kubeconfig=str(sim.kubeconfig_path))
    async with open_api(target) as api:
        old = (await read_secret(api, "litellm", "coder-stack-keys") or {})["coder-agent"].get_secret_value()

    def delete_key() -> None:
        db = sim.services.litellm_db["keys"]
        for token in [t for t, r in db.items() if r.get("key_alias") == "coder-agent"]:
            del db[token]

    sim.call(delete_key)
    second = await manage_keys(options=KeyOptions(aliases=["coder-agent"]), connection=conn(sim))
    assert second.key_actions[0].startswith("coder-agent: reminted"), second.key_actions
    async with open_api(target) as api:
        new = (await read_secret(api, "litellm", "coder-stack-keys") or {})["coder-agent"].get_secret_value()
    assert new and new != old
    async with httpx.AsyncClient() as http:  # the redelivered key works
        r = await http.get(f"{sim.gateway_url}/v1/models", headers={"Authorization": f"Bearer {new}"})
    assert r.status_code == 200


async def test_a_model_registered_twice_by_someone_else_gets_no_third(make_sim: Callable[..., SimStack]) -> None:
    sim = make_sim()
    spec = StackSpec()
    agent = spec.model("coder-agent")
    body = {
        "model_name": agent.alias,
        "litellm_params": {
            "model": f"openai/{agent.served_model_name}",
            "api_base": f"http://{agent.name}.{spec.serving_namespace}.svc.cluster.local:{agent.port}/v1",
            "api_key": sim.secrets["upstream_key"],
            "input_cost_per_token": agent.input_cost_per_token,
            "output_cost_per_token": agent.output_cost_per_token,
        },
    }
    master = {"Authorization": f"Bearer {sim.secrets['master_key']}"}
    async with httpx.AsyncClient() as http:
        for _ in range(2):
            (await http.post(f"{sim.gateway_url}/model/new", json=body, headers=master)).raise_for_status()

    def count() -> int:
        return sum(1 for r in sim.services.litellm_db["models"] if r.get("model_name") == agent.alias)

    assert sim.call(count) == 2
    report = await asyncio.wait_for(
        validate_coder_stack(options=ValidateOptions(stages=["agent"]), connection=conn(sim)), FLOW_TIMEOUT
    )
    assert report.outcome == "passed"
    assert any("coder-agent already-registered" in s for s in report.steps), report.steps
    assert sim.call(count) == 2
    await assert_no_gpu_model_running(sim)


# ====================================================================== process faults
SIGKILL_FLOW = """
import asyncio, sys
from coder_stack.flows.params import Connection
from coder_stack.flows.swap import SwapOptions, swap_model

asyncio.run(swap_model(options=SwapOptions(target="coder-chat", smoke_gateway=False),
                       connection=Connection(kubeconfig=sys.argv[1])))
"""


async def newest_run(flow_name: str) -> UUID | None:
    """The id of the flow's newest run on the shared server, if it has one."""
    try:
        return (await latest_run_of(flow_name))[0]
    except AssertionError:
        return None


@pytest.fixture
async def leases_of_killed() -> AsyncIterator[list[UUID]]:
    """Runs a test killed: after it, whatever happened, every lease the server holds for them is given back. A
    failed test must not leave its killed run's live lease (300 s) to expire inside a later test, where its expiry
    takes a slot off the limit under whoever holds it then."""
    killed: list[UUID] = []
    yield killed
    for run_id in killed:
        await release_lease_of(await read_liveness(run_id), GPU_LIMIT)


async def test_sigkill_mid_session_is_cleaned_up_by_the_teardown_which_reports_what_it_found(
    make_sim: Callable[..., SimStack], prefect_api: str, tmp_path: Path, leases_of_killed: list[UUID]
) -> None:
    sim = make_sim(gpu_pool="autoscaled", time_scale=SLOW_SCALE)
    before = await newest_run("swap_model")
    proc, log = start_flow_process(SIGKILL_FLOW, sim, prefect_api, tmp_path)
    try:
        # bounds for a loaded machine: the process imports Prefect and the product before its run starts
        await until(lambda: scaled_up(sim, "coder-chat") or proc.poll() is not None, 120, "coder-chat scaled up")
        assert proc.poll() is None, log.read_text()[-3000:]
        await until(lambda: gpu_pods(sim), 30, "a coder-chat pod")
    finally:
        sigkill(proc)
        killed = await newest_run("swap_model")
        if killed is not None and killed != before:
            leases_of_killed.append(killed)
    assert proc.returncode == -signal.SIGKILL
    # Nothing ran on the way out: the model is still scaled up (that is the point of the backstop).
    await asyncio.sleep(0.5)
    assert replicas(sim)["coder-chat"] == 1
    assert "Clean-up:" not in log.read_text()

    report = await teardown(connection=conn(sim))
    assert report.outcome == "passed: everything at 0"
    found = next(n for n in report.notes if n.startswith("found running:"))
    assert "coder-chat (1 replica(s), 1 pod(s))" in found, report.notes
    gpu_note = next(n for n in report.notes if n.startswith("GPU limit"))
    assert "1/1 slot(s) held" in gpu_note and "swap_model/" in gpu_note, gpu_note  # the killed run, still "Running"
    await assert_no_gpu_model_running(sim)

    # The killed run holds its slot until the lease expires (300 s). Once it is marked Crashed, status names it
    # and its clean-up command, never the zeroing of the limit (its lease lives: zeroing would double-book the GPU);
    # the advised command releases exactly that lease.
    # The killed run is the newest swap_model run, still Running: the shared test server also holds earlier tests'
    # runs, some of them killed and Running for ever (a killed clean-up's own run), which are not this test's.
    killed_id, state = await latest_run_of("swap_model")
    assert state.type == StateType.RUNNING, state
    async with get_client() as client:
        await client.set_flow_run_state(killed_id, Crashed(message="killed by the test"), force=True)
    st = await gpu_limit_status()
    text = st.describe()
    assert not st.leaked and "--active-slots 0" not in text, text
    dead = [h for h in st.runs if h.dead and h.run_id == str(killed_id)]
    assert len(dead) == 1 and f"coder-stack cleanup {dead[0].run_id}" in text, text
    slot = await release_lease_of(await read_liveness(UUID(dead[0].run_id)), GPU_LIMIT)
    assert slot.freed and slot.headline == "GPU slot freed", slot
    async with get_client() as client:
        assert (await client.read_global_concurrency_limit_by_name(GPU_LIMIT)).active_slots == 0


LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
HOLDER = """
import asyncio, sys
from prefect.concurrency.asyncio import concurrency

async def main():
    async with concurrency("tag:gpu", occupy=1, strict=True, timeout_seconds=30, lease_duration=60):
        print("held", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
    print("released", flush=True)

asyncio.run(main())
"""


def _gcl(server: PrefectServer) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/v2/concurrency_limits/{GPU_LIMIT}", timeout=10)
    r.raise_for_status()
    return dict(r.json())


def _hold_across_restart(server: PrefectServer) -> int:
    """A session holds tag:gpu, the server restarts under it, the session ends. Returns active_slots."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        env=server.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        line = holder.stdout.readline()
        assert line.strip() == "held", line + holder.stdout.read()
        assert _gcl(server)["active_slots"] == 1
        time.sleep(1.0)  # past the first lease renewal; the next is 45 s away
        server.restart()
        holder.stdin.write("\n")
        holder.stdin.flush()
        out = holder.communicate(timeout=60)[0]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    print(f"holder: {out.strip()[-500:]}")
    return int(_gcl(server)["active_slots"])


def test_prefect_server_restart_while_the_gpu_limit_is_held(tmp_path: Path, make_sim: Callable[..., SimStack]) -> None:
    """Without lease storage the slot leaks for good and `coder-stack status` says how to free it; with
    PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=...filesystem (the README's setting) nothing leaks."""
    readme = (PROJECT / "README.md").read_text()
    assert "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE" in readme and LEASE_STORAGE in readme

    sim = make_sim()
    server = PrefectServer(tmp_path / "home")
    server.start()
    try:
        httpx.post(f"{server.url}/v2/concurrency_limits/", json={"name": GPU_LIMIT, "limit": 1}, timeout=10)
        # 1. Leases in server memory (the default): the restart forgets the lease, the slot stays held.
        assert _hold_across_restart(server) == 1
        env = server.env()
        status = subprocess.run(
            [str(Path(sys.executable).with_name("coder-stack")), "status", "--kubeconfig", str(sim.kubeconfig_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        text = " ".join((status.stdout + status.stderr).split())
        assert status.returncode == 0, text
        assert "1/1 slot(s) held" in text and "no lease exists" in text, text
        assert f"prefect gcl update {GPU_LIMIT} --active-slots 0" in text, text
        # The documented repair works.
        fix = subprocess.run(
            [str(Path(sys.executable).with_name("prefect")), "gcl", "update", GPU_LIMIT, "--active-slots", "0"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert fix.returncode == 0, fix.stdout + fix.stderr
        assert _gcl(server)["active_slots"] == 0

        # 2. With lease storage on the filesystem the lease survives the restart and is released.
        server.extra_env["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] = LEASE_STORAGE
        server.restart()
        assert _hold_across_restart(server) == 0
    finally:
        server.stop()


# ====================================================================== load
async def test_twenty_swaps_at_once_never_share_the_gpu_and_leave_no_slot(make_sim: Callable[..., SimStack]) -> None:
    sim = make_sim(time_scale=0.0005)
    targets = [MODELS[i % len(MODELS)] for i in range(20)]
    t0 = time.monotonic()
    created_again: list[str] = []

    async def swap(target: str) -> Any:
        # The test's Prefect server runs on SQLite beside the other test worker: once (CI, two workers) one of the
        # twenty flow runs was not even created, its POST /flow_runs/ answered 503 six times over Prefect's
        # client's 62 s of retries. No swap ran for it, so it is created again; a failure anywhere else stands.
        for attempt in range(3):
            try:
                return await swap_model(
                    options=SwapOptions(target=target, smoke_gateway=False), connection=conn(sim), return_state=True
                )
            except PrefectHTTPStatusError as e:
                creating = e.request.method == "POST" and e.request.url.path.endswith("/flow_runs/")
                if not creating or e.response.status_code != 503 or attempt == 2:
                    raise
                created_again.append(target)
        raise AssertionError("unreachable")

    states = await asyncio.gather(*(swap(t) for t in targets))
    if created_again:
        print(f"flow runs created again after the server's 503s: {created_again}")
    wall = time.monotonic() - t0
    print(f"20 concurrent swaps: {wall:.1f} s")
    assert all(s.is_completed() for s in states), [s for s in states if not s.is_completed()]
    tl = sim.timeline
    assert not gpu_overlaps(sim), gpu_overlaps(sim)[:3]
    ups = [n for _, ns, n, r in tl if ns == SERVING and r > 0]
    # every target was served (its swap scaled it up), and no model was scaled up more often than swaps
    # asked for it: a swap that scales up nothing, or a redundant or stray scale-up, fails here
    assert set(ups) == set(targets), ups
    assert all(ups.count(m) <= targets.count(m) for m in set(ups)), ups
    r = replicas(sim)
    assert sum(1 for m in MODELS if r[m] > 0) == 1, r
    st = await gpu_limit_status()
    assert st.active_slots == 0, st
    await teardown(connection=conn(sim))
    await assert_no_gpu_model_running(sim)
