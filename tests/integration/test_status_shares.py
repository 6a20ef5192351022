"""`coder-stack status` shows the GPU's shares in time-sliced mode, on the simulator's own time-sliced node:
with coder-chat and coder-fim both serving on it, what the node advertises, each model's share (its
gpu_memory_utilization x the GPU's memory) and what is left. Exclusive mode shows no shares and reads nothing more.

The Prefect API is pointed at a closed port: status still shows the cluster (its GPU limit line says unknown)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings
from simstack.stack import SimStack
from typer.testing import CliRunner

from coder_stack.app.cli import app
from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.spec import StackSpec
from coder_stack.usecases.shares import read_gpu_shares
from tests.conftest import on_loop, pods_of, ready_pod, scale, wait_for
from tests.integration.test_preflight_sim_sharing import sliced_spec, the_gpu_node

S = "serving"


def status_text(sim: SimStack, spec_file: str) -> str:
    """`coder-stack status --stack <file> --kubeconfig <the sim's>`, its output on one line."""
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES: 0}):
        res = CliRunner().invoke(
            app, ["status", "--stack", spec_file, "--kubeconfig", str(sim.kubeconfig_path)], env={"COLUMNS": "400"}
        )
    assert res.exit_code == 0, (res.output, res.exception)
    return " ".join(res.output.split())


def write_spec(spec: StackSpec, path: str) -> str:
    with open(path, "w") as f:
        f.write(spec.model_dump_json())
    return path


def both_serving(sim: SimStack) -> dict[str, str]:
    """Scale coder-chat and coder-fim to 1 and wait until both are Ready; their pods' names."""
    scale(sim, S, "coder-chat", 1)
    scale(sim, S, "coder-fim", 1)
    return {m: ready_pod(sim, S, m, timeout=60)["metadata"]["name"] for m in ("coder-chat", "coder-fim")}


async def test_status_shows_both_shares_on_the_time_sliced_node_and_what_is_left(
    make_sim: Callable[..., SimStack], tmp_path: object
) -> None:
    spec = sliced_spec()  # chat 0.45, fim 0.35 of a 24 GB L4, 2 replicas
    sim = make_sim(spec=spec, gpu_pool="static")
    node = the_gpu_node(sim)["metadata"]["name"]
    pods = await asyncio.to_thread(both_serving, sim)
    placed = on_loop(sim, lambda s: {p["metadata"]["name"]: p["spec"].get("nodeName") for p in s.list("pods", S)})
    assert placed[pods["coder-chat"]] == placed[pods["coder-fim"]] == node

    async with open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api:
        shares = await read_gpu_shares(api, spec)
    assert shares is not None
    (n,) = shares.nodes
    assert n.node.name == node and n.node.time_sliced and n.gpu_memory_source == "node label"
    assert (n.replicas, n.gpu_memory_gb) == (2, 24.0)
    assert {(p.model, p.pod, p.share_gb, p.holds) for p in n.pods} == {
        ("coder-chat", pods["coder-chat"], 10.8, True),
        ("coder-fim", pods["coder-fim"], 8.4, True),
    }
    assert (n.used_gb, n.left_gb, n.replicas_left) == (19.2, 4.8, 0)

    text = await asyncio.to_thread(status_text, sim, write_spec(spec, f"{tmp_path}/stack.json"))
    assert "GPU shares (time-sliced)" in text
    assert f"{node} │ nvidia.com/gpu=2, time-sliced, 2 replicas per GPU, 24 GB per GPU (node label)" in text, text
    assert f"coder-chat │ 0.45 x 24 GB = 10.8 GB (held) │ {pods['coder-chat']} Running" in text, text
    assert f"coder-fim │ 0.35 x 24 GB = 8.4 GB (held) │ {pods['coder-fim']} Running" in text, text
    assert "left │ 4.8 GB of 24 GB free (19.2 GB held); 0 of 2 replicas free" in text, text
    assert "GPU limit: unknown" in text  # the Prefect API is down: the cluster is still shown

    # a third model server finds no replica left on the node: Pending, shown apart, holding no share
    scale(sim, S, "coder-agent", 1)
    agent = wait_for(
        sim,
        lambda s: next(
            (p for p in pods_of(s, S, "coder-agent") if p.get("status", {}).get("phase") == "Pending"), None
        ),
        what="a Pending coder-agent pod",
    )["metadata"]["name"]
    async with open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api:
        again = await read_gpu_shares(api, spec)
    assert again is not None
    assert [(p.model, p.pod, p.holds) for p in again.unplaced] == [("coder-agent", agent, False)]
    assert (again.nodes[0].used_gb, again.nodes[0].left_gb) == (19.2, 4.8)
    text = await asyncio.to_thread(status_text, sim, write_spec(spec, f"{tmp_path}/stack.json"))
    assert f"coder-agent │ 0.9 of a GPU once placed │ {agent} Pending" in text, text
    assert "left │ 4.8 GB of 24 GB free (19.2 GB held); 0 of 2 replicas free" in text, text


async def test_status_in_exclusive_mode_shows_no_shares(make_sim: Callable[..., SimStack], tmp_path: object) -> None:
    spec = StackSpec()
    sim = make_sim(spec=spec, gpu_pool="static")
    scale(sim, S, "coder-chat", 1)
    pod = await asyncio.to_thread(ready_pod, sim, S, "coder-chat", 60)
    async with open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api:
        assert await read_gpu_shares(api, spec) is None
    text = await asyncio.to_thread(status_text, sim, write_spec(spec, f"{tmp_path}/stack.json"))
    assert f"{pod['metadata']['name']} Running" in text  # the Deployments table is there
    assert "GPU shares" not in text and "replicas per GPU" not in text
