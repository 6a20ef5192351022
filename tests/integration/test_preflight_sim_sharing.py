"""The time-sliced preflight against the simulator's own time-sliced GPU node (``SimStack(spec=<time-sliced>)``,
static pool, so the node exists from the start): the labels and capacity the simulator sets from the spec are
read as a real cluster's would be. Chat and FIM that fit pass with the node's numbers in the report; a combination
over the card is refused with the numbers, and nothing is scaled or started."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from simstack.stack import SimStack

from coder_stack.errors import PreflightError
from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.kubernetes.preflight import preflight
from coder_stack.spec import GpuSharing, StackSpec
from tests.conftest import on_loop

SHARES = {"coder-chat": 0.45, "coder-fim": 0.35, "coder-agent": 0.9}
GPU_POOL = "gpu-pool"


def sliced_spec(replicas: int = 2, gpu_memory_gb: float = 24.0) -> StackSpec:
    base = StackSpec()
    models = [m.model_copy(update={"gpu_memory_utilization": SHARES[m.name]}) for m in base.models]
    return StackSpec(
        models=models,
        gpu_sharing=GpuSharing(mode="time-sliced", replicas=replicas, gpu_memory_gb=gpu_memory_gb),
    )


def the_gpu_node(sim: SimStack) -> dict[str, Any]:
    nodes = on_loop(
        sim,
        lambda s: [
            n for n in s.list("nodes") if n["metadata"]["labels"].get("cloud.google.com/gke-nodepool") == GPU_POOL
        ],
    )
    assert len(nodes) == 1, nodes
    return nodes[0]


def model_state(sim: SimStack, spec: StackSpec) -> dict[str, tuple[int, int]]:
    """Each model's (spec.replicas, number of its pods)."""

    def read(store: Any) -> dict[str, tuple[int, int]]:
        out = {}
        for m in spec.models:
            d = store.get("deployments", spec.serving_namespace, m.name)
            pods = store.list("pods", spec.serving_namespace, label_selector=f"app.kubernetes.io/name={m.name}")
            out[m.name] = (int(d["spec"].get("replicas") or 0), len(pods))
        return out

    return on_loop(sim, read)


async def test_chat_and_fim_that_fit_pass_with_the_simulated_nodes_numbers(make_sim: Callable[..., SimStack]) -> None:
    # replicas 3 and 22.5 GB in the spec: the node advertises exactly that, and the report must say the node's
    spec = sliced_spec(replicas=3, gpu_memory_gb=22.5)
    sim = make_sim(spec=spec, gpu_pool="static")
    node = the_gpu_node(sim)
    labels = node["metadata"]["labels"]
    async with open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api:
        report = await preflight(api, spec, ["coder-chat", "coder-fim"])

    assert report.sharing is not None
    assert [n.name for n in report.sharing.nodes] == [node["metadata"]["name"]]
    seen = report.sharing.nodes[0]
    assert seen.time_sliced
    assert seen.gpus == int(node["status"]["capacity"]["nvidia.com/gpu"]) == 3
    assert seen.replicas == int(labels["cloud.google.com/gke-max-shared-clients-per-gpu"]) == 3
    assert seen.gpu_memory_gb == round(int(labels["nvidia.com/gpu.memory"]) / 1024, 2) == 22.5
    assert report.sharing.gpu_memory_source == "nodes"
    assert report.sharing.gpu_memory_gb == 22.5
    (verdict,) = report.sharing.together
    assert verdict.fits
    assert [m.name for m in verdict.models] == ["coder-chat", "coder-fim"]
    assert verdict.replicas == 3
    assert [m.share_gb for m in verdict.models] == pytest.approx([0.45 * 22.5, 0.35 * 22.5], abs=0.01)
    assert verdict.total_gb == pytest.approx((0.45 + 0.35) * 22.5, abs=0.02)
    # the node matches the spec: no note about a difference, none about time-slicing missing
    assert not [n for n in report.notes if "time-slic" in n or "label says" in n], report.notes
    assert model_state(sim, spec) == {m: (0, 0) for m in SHARES}


async def test_a_combination_over_the_card_is_refused_with_the_numbers_before_anything_scales(
    make_sim: Callable[..., SimStack],
) -> None:
    spec = sliced_spec()
    sim = make_sim(spec=spec, gpu_pool="static")
    the_gpu_node(sim)
    before = model_state(sim, spec)
    async with open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api:
        with pytest.raises(PreflightError) as err:
            await preflight(api, spec, ["coder-chat", "coder-agent"])
    text = str(err.value)
    assert "coder-chat and coder-agent cannot share one GPU" in text
    assert "nothing was changed" in text
    total = round((0.45 + 0.9) * 24.0, 2)
    assert f"{total:g} GB of 24 GB" in text, text
    assert "the nodes' nvidia.com/gpu.memory label" in text
    assert model_state(sim, spec) == before == {m: (0, 0) for m in SHARES}
