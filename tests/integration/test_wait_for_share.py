"""A model's share of a time-sliced GPU is waited for, never raced (coder_stack/usecases/gpu.py), on the sim's
time-sliced L4: vLLM (and its stand-in) refuses to start when its share of the GPU's memory is not free, and a
pod scaled away still holds its share until it has terminated.

- a model scaled to 0 whose pod still terminates: the wait ends only once that pod is gone, and the model
  started then comes up without a refused start;
- a model that still has replicas and whose share leaves no room: the wait gives up after its bound with an
  error naming what holds the GPU and the numbers (nothing was scaled);
- free_gpu keeps every model it is given and scales the others to 0, pods gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from coder_stack_dev.bench.workday.scenario import team_spec
from kubernetes_asyncio import client
from simstack.stack import SimStack
from simstack.timings import Timings

from coder_stack.errors import WaitTimeout
from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.usecases.gpu import check_share, free_gpu, wait_for_share
from tests.conftest import pods_of, ready_pod, record, scale, wait_for
from tests.kits.apiserver import record_requests

S = "serving"
CHAT, FIM, AGENT = "coder-chat", "coder-fim", "coder-agent"


def restarts(sim: SimStack, model: str) -> int:
    def _read(store: object) -> int:
        return max(
            (int(cs.get("restartCount") or 0) for p in pods_of(store, S, model)  # type: ignore[arg-type]
             for cs in (p.get("status") or {}).get("containerStatuses") or []),
            default=0,
        )  # fmt: skip

    result: int = sim.call(_read, sim.store)
    return result


async def test_a_terminating_pod_is_waited_out_before_the_next_share_is_taken(
    make_sim: Callable[..., SimStack],
) -> None:
    spec = team_spec()
    # a pod's termination takes ~2 s here (1000 simulated seconds at the tests' scale, within its grace period):
    # long enough to be seen
    sim = make_sim(spec=spec, timings=Timings(termination_s=1000.0))
    async with open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api:
        await client.AppsV1Api(api).patch_namespaced_deployment(
            AGENT, S, {"spec": {"template": {"spec": {"terminationGracePeriodSeconds": 1000}}}}
        )
    scale(sim, S, AGENT, 1)
    agent_pod = (await asyncio.to_thread(ready_pod, sim, S, AGENT, 60))["metadata"]["name"]
    pods = record(sim, "pods")
    scale(sim, S, AGENT, 0)
    async with open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api:
        before = await check_share(api, spec, spec.model(CHAT))
        assert not before.free and before.terminating == [AGENT], before  # the agent's pod holds 0.9 of the card
        check = await wait_for_share(api, spec, spec.model(CHAT), timeout_s=60)
        returned = time.monotonic()
    assert check.free and check.on_gpu == [], check
    gone = [t for t, etype, obj in pods if etype == "DELETED" and obj["metadata"]["name"] == agent_pod]
    assert gone and gone[0] <= returned, "the wait ended before the agent's pod was gone"

    scale(sim, S, CHAT, 1)
    await asyncio.to_thread(ready_pod, sim, S, CHAT, 60)
    assert restarts(sim, CHAT) == 0  # its share was free: vLLM's start-up check passed the first time


async def test_a_share_held_by_a_serving_model_is_refused_after_the_bound_with_the_numbers(
    make_sim: Callable[..., SimStack],
) -> None:
    spec = team_spec()
    sim = make_sim(spec=spec)
    scale(sim, S, AGENT, 1)
    await asyncio.to_thread(ready_pod, sim, S, AGENT, 60)
    before = list(sim.timeline)
    async with open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api:
        with pytest.raises(WaitTimeout) as err:
            await wait_for_share(api, spec, spec.model(CHAT), timeout_s=0.5, poll_s=0.1)
    msg = str(err.value)
    assert err.value.phase == "gpu-share"
    assert msg.startswith("coder-chat's share of the GPU was not free after"), msg
    assert f"{AGENT} (1 replica(s), 1 pod(s))" in msg, msg
    assert "coder-agent 0.9 x 24 GB = 21.6 GB and coder-chat 0.55 x 24 GB = 13.2 GB: 34.8 GB of 24 GB" in msg, msg
    assert "was not started" in msg and "coder-stack swap" in msg, msg
    assert list(sim.timeline) == before  # nothing was scaled


async def test_free_gpu_keeps_every_model_it_is_given(
    make_sim: Callable[..., SimStack], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = team_spec({CHAT: 0.3, FIM: 0.3, AGENT: 0.45})
    sim = make_sim(spec=spec)
    for m in (CHAT, FIM):
        scale(sim, S, m, 1)
    for m in (CHAT, FIM):
        await asyncio.to_thread(ready_pod, sim, S, m, 60)
    scale(sim, S, AGENT, 1)  # a third server: no replica left on the card, Pending
    wait_for(sim, lambda s: pods_of(s, S, AGENT), what="a coder-agent pod")
    async with open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api:
        blocked = await check_share(api, spec, spec.model(AGENT))
        sent = record_requests(monkeypatch)
        freed = await free_gpu(api, spec, [spec.model(CHAT), spec.model(AGENT)])
    # FIM scaled to 0 from the replicas the Deployment list said, not read again first
    assert [r for r in sent if ("deployments" in r[1] and r[0] != "GET") or r[1].endswith("/scale")] == [
        ("PATCH", f"/namespaces/{S}/deployments/{FIM}/scale")
    ], sent
    assert blocked.already_up and blocked.free  # it has its replica already: nothing to wait for
    assert [h.name for h in freed.scaled_down] == [FIM]
    # waited for FIM's pods to be gone (it may already be gone when the watch lists, so pods_seen is 0 or 1)
    assert len(freed.gone) == 1 and FIM in freed.gone[0].selector, freed.gone
    assert sim.call(lambda: pods_of(sim.store, S, FIM)) == []
    assert {n: r for _, _, n, r in sim.timeline if n in (CHAT, AGENT)} == {CHAT: 1, AGENT: 1}  # never scaled down
