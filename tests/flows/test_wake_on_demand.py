"""Wake on demand end to end, with no human action: a request through the simulated gateway for a reclaimed model,
the product's callback (installed by `coder-stack wake-setup --apply`) sending its event to this Prefect server,
prefect.yaml's ``wake-model`` trigger (deployed with `prefect deploy`), a process worker, the ``wake_model`` run —
and the model Ready. Then a FIM request while coder-chat is in use: coder-fim waits for the GPU, coder-chat is
never evicted, and the person asking is told so."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from simstack.stack import SimStack
from simstack.store import Store

from coder_stack.app.setup import DeploymentConnections, deploy_all, ensure_work_pools
from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.spec import StackSpec, spec_yaml
from coder_stack.usecases import wake_setup
from coder_stack.usecases.wake import WAKE
from tests.kits.flowkit import PREFECT_BIN, PROJECT, SERVING, flow_process_env, stop_group

pytestmark = pytest.mark.usefixtures("gpu_limit")

POOL = "coder-stack-process"
CHAT, FIM = "coder-chat", "coder-fim"


def _state(sim: SimStack, name: str) -> tuple[int, int, dict[str, Any] | None]:
    """(spec.replicas, ready replicas, the wake annotation) of a model's Deployment."""

    def read(store: Store) -> tuple[int, int, dict[str, Any] | None]:
        dep = store.get("deployments", SERVING, name)
        raw = (dep["metadata"].get("annotations") or {}).get(WAKE)
        ready = int((dep.get("status") or {}).get("readyReplicas") or 0)
        return int(dep["spec"]["replicas"]), ready, json.loads(raw) if raw else None

    out: tuple[int, int, dict[str, Any] | None] = sim.call(read, sim.store)
    return out


async def _until(what: str, timeout_s: float, check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        got = await got if asyncio.iscoroutine(got) else got
        if got:
            return got
        await asyncio.sleep(0.2)  # polling the cluster and the server, not a synchronisation
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


async def test_a_request_for_a_reclaimed_model_wakes_it_and_a_fim_request_never_evicts_chat_in_use(
    make_sim: Callable[..., SimStack], prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    sim = make_sim(pod_api=True)
    # The FIM wake gives up after 30 s (it would wait hours): long enough, on a loaded machine, for its first look at
    # the GPU to end with time left, so that it writes waiting-for-gpu (5 s ran out before that once, in CI).
    spec = StackSpec(wake={"wait_for_gpu_s": 30.0})
    stack_file = tmp_path / "stack.yaml"
    stack_file.write_text(spec_yaml(spec))
    conns = DeploymentConnections(
        process={"kubeconfig": str(sim.kubeconfig_path), "stack_file": str(stack_file)}, in_cluster={}, says="sim"
    )
    await ensure_work_pools({POOL: "process"})
    await asyncio.to_thread(deploy_all, PROJECT, 180, ["wake-model"], {"PREFECT_API_URL": prefect_api}, conns)
    async with get_client() as client:
        dep = await client.read_deployment_by_name("wake_model/wake-model")
    async with open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path), context="coder-sim")) as api:
        await wake_setup.apply(api, spec, prefect_api, timeout_s=60, poll_s=0.05)
    env = flow_process_env(prefect_api, tmp_path) | {"PREFECT_WORKER_QUERY_SECONDS": "1"}
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [str(PREFECT_BIN), "worker", "start", "--pool", POOL, "--install-policy", "never"],
            cwd=PROJECT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    headers = {"Authorization": f"Bearer {sim.secrets['master_key']}"}
    try:
        async with (
            httpx.AsyncClient(base_url=sim.gateway_url, headers=headers, timeout=60) as gw,
            get_client() as client,
        ):

            async def runs(model: str) -> list[Any]:
                found = await client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
                )
                return [r for r in found if r.parameters.get("model") == model]

            async def chat() -> tuple[httpx.Response, float]:
                t0 = time.monotonic()
                r = await gw.post(
                    "/v1/chat/completions", json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}
                )
                return r, time.monotonic() - t0

            # a burst of 50 for the reclaimed coder-chat: readable 503s at once, one wake
            assert _state(sim, CHAT)[:2] == (0, 0)
            burst = await asyncio.gather(*(chat() for _ in range(50)))
            assert all(r.status_code == 503 for r, _ in burst), [r.text for r, _ in burst if r.status_code != 503]
            assert all(r.json()["error"]["message"].startswith(f"{CHAT} is starting") for r, _ in burst)
            assert sorted(s for _, s in burst)[25] < 1.0
            await _until(f"{CHAT} Ready", 120, lambda: _state(sim, CHAT)[1] >= 1)
            [woke] = await runs(CHAT)  # the trigger made exactly one wake of the burst
            done = await _until("the wake run ends", 60, lambda: _final(client, woke.id))
            assert done.state.is_completed(), (done.state, log.read_text()[-3000:])
            r, _ = await chat()
            assert r.status_code == 200, r.text  # served: nobody ran anything
            assert _state(sim, CHAT)[2] is None  # the claim is gone once the wake ended

            # coder-fim asked for while coder-chat is in use (just woken: younger than idle_grace_s)
            fim = {"model": FIM, "prompt": "def add(a, b):", "max_tokens": 8}
            r = await gw.post("/v1/completions", json=fim)
            assert r.status_code == 503 and "retry-after" in r.headers, r.text
            try:
                await _until(
                    f"{FIM} waiting for the GPU",
                    60,
                    lambda: (_state(sim, FIM)[2] or {}).get("state") == "waiting-for-gpu",
                )
            except AssertionError as e:
                seen = [(x.state_name, x.state.message if x.state else None) for x in await runs(FIM)]
                raise AssertionError(f"{e}; FIM runs {seen}; {_state(sim, FIM)}; {log.read_text()[-3000:]}") from None
            assert _state(sim, FIM)[2]["busy"] == [CHAT]  # type: ignore[index]
            await asyncio.sleep(1.1)  # past the callback's 1 s "down" cache, so it reads the claim
            r = await gw.post("/v1/completions", json=fim)
            assert r.status_code == 503
            assert r.json()["error"]["message"].startswith(f"{FIM} waits for the GPU: {CHAT} is in use"), r.text
            [fim_run] = await runs(FIM)
            ended = await _until("the FIM wake gives up", 90, lambda: _final(client, fim_run.id))
            assert ended.state.is_failed() and "wait_for_gpu_s" in (ended.state.message or ""), ended.state
            assert _state(sim, CHAT)[:2] == (1, 1)  # never evicted
            assert _state(sim, FIM) == (0, 0, None)  # nothing left up, no claim left
            chat_scales = [v for _, ns, n, v in sim.timeline if ns == SERVING and n == CHAT]
            assert chat_scales == [0, 1], chat_scales  # created at 0, woken once, never scaled down
    finally:
        stop_group(worker)
        async with get_client() as client:
            for a in await client.read_automations():
                if a.name.startswith("wake-model"):
                    await client.delete_automation(a.id)
            await client.delete_deployment(dep.id)


async def _final(client: Any, run_id: Any) -> Any:
    run = await client.read_flow_run(run_id)
    return run if run.state is not None and run.state.is_final() else None
