"""Swap, reclaim, wake and teardown per model on a time-sliced L4 (24 GB, 2 replicas; coder-chat 0.55 of it,
coder-fim 0.35, coder-agent 0.9), on the simulated stack against the shared Prefect API.

Models that fit together stay serving together: a teardown of one leaves the other serving (and the front-ends
up), a reclaim of an idle coder-fim leaves a busy coder-chat serving, a swap to coder-fim keeps coder-chat while
a swap to coder-agent stops both, and a wake of coder-fim beside a busy coder-chat brings it up without touching
chat. The state the runs share (the Deployments, the GPU's shares, the wake claims) is exercised by two actors at
once, a cancellation in the middle and a killed process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.states import Failed
from simstack.stack import SimStack
from simstack.store import Store

from coder_stack.flows.cleanup import clean_up_crashed_run
from coder_stack.flows.errors import WakeGaveUp
from coder_stack.flows.params import Connection
from coder_stack.flows.reclaim import ReclaimOptions, reclaim_idle_models
from coder_stack.flows.swap import SwapOptions, swap_model
from coder_stack.flows.teardown import TeardownOptions, teardown
from coder_stack.flows.wake import wake_model
from coder_stack.orchestration import gpu
from coder_stack.orchestration.gpu_limit import ensure_gpu_limit
from coder_stack.report import RunReport
from coder_stack.spec import GpuSharing, ModelSpec, StackSpec, spec_yaml
from coder_stack.usecases.wake import WAKE
from tests.conftest import is_ready, pods_of, scale, wait_for
from tests.flows.test_wake import deploy_annotations, wake_state
from tests.kits.flowkit import EXPERIENCE, SERVING, SLOW_SCALE, conn, replicas, sigkill, start_flow_process
from tests.kits.prefect_busy import Busy503

pytestmark = pytest.mark.usefixtures("shared_gpu")

CHAT, FIM, AGENT = "coder-chat", "coder-fim", "coder-agent"
SHARES = {CHAT: 0.55, FIM: 0.35, AGENT: 0.9}
IDLE_AFTER_S = 1.0


def shared_spec(**fields: Any) -> StackSpec:
    """The reference stack on a time-sliced L4 (24 GB, 2 replicas) with the team's shares."""
    base = StackSpec()
    models = [ModelSpec(**{**m.model_dump(), "gpu_memory_utilization": SHARES[m.name]}) for m in base.models]
    fields.setdefault("idle_after_s", IDLE_AFTER_S)
    fields.setdefault("idle_grace_s", 0.0)
    return StackSpec.model_validate(
        {
            **base.model_dump(),
            **fields,
            "models": [m.model_dump() for m in models],
            "gpu_sharing": GpuSharing(mode="time-sliced", gpu_memory_gb=24.0, replicas=2).model_dump(),
        }
    )


async def shared_sim(make_sim: Callable[..., SimStack], tmp_path: Path, **kw: Any) -> tuple[SimStack, Connection]:
    """A sim with the time-sliced GPU, the connection to it with the spec's file, and tag:gpu sized for shares."""
    spec = shared_spec(**kw.pop("fields", {}))
    assert spec.fit_together([CHAT, FIM]) and not spec.fit_together([CHAT, AGENT])
    sim = make_sim(spec=spec, **kw)
    path = tmp_path / "stack.yaml"
    path.write_text(spec_yaml(spec))
    await ensure_gpu_limit(spec.gpu_limit_slots)  # the gpu_limit fixture puts it back to 1 after the test
    return sim, conn(sim, stack_file=str(path))


def ready(*names: str) -> Callable[[Store], bool]:
    return lambda s: all(any(is_ready(p) for p in pods_of(s, SERVING, n)) for n in names)


def up(sim: SimStack, *names: str) -> None:
    """The models serving, one after another (as the flows start them on a shared GPU)."""
    for n in names:
        scale(sim, SERVING, n, 1)
        wait_for(sim, ready(n), 30, f"{n} Ready")


def history(sim: SimStack, name: str, mark: int = 0) -> list[int]:
    """The replica counts ``name`` was scaled to since ``mark``."""
    return [v for _, ns, n, v in sim.timeline[mark:] if ns == SERVING and n == name]


async def wait_store(sim: SimStack, fn: Callable[[Store], Any], timeout: float, what: str) -> Any:
    return await asyncio.to_thread(wait_for, sim, fn, timeout, what)


@contextlib.asynccontextmanager
async def in_use(sim: SimStack, name: str) -> AsyncIterator[None]:
    """A streamed request to ``name``'s pod (chat for coder-chat, a completion for the others) held open while the
    block runs: the model is in use (its running-requests gauge says 1) throughout."""
    sim.services.vllm_decode_s = 0.3 / sim.time_scale  # 300 ms per token, real time: ~60 s for 200 tokens
    m = StackSpec().model(name)
    base = sim.backends.resolve_url(StackSpec().service_url(name, SERVING, 8000))
    assert base
    body: dict[str, Any]
    if name == CHAT:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "A long story about GPUs."}]}
    else:
        path, body = "/v1/completions", {"prompt": "def fibonacci(n):"}
    body |= {"model": m.served_model_name, "stream": True, "max_tokens": 200}
    headers = {"Authorization": f"Bearer {sim.secrets['vllm_key']}"}
    async with httpx.AsyncClient(timeout=30) as http, http.stream("POST", base + path, json=body, headers=headers) as r:
        assert r.status_code == 200
        first = asyncio.Event()

        async def read() -> None:
            async for _ in r.aiter_lines():
                first.set()

        reader = asyncio.create_task(read())
        try:
            await asyncio.wait_for(first.wait(), 10)  # the first chunk is out: the request is running
            yield
            assert not reader.done(), f"the request to {name} ended before the block did"
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


class Occupied:
    """The ``occupy`` of every GPU session the flows in ``modules`` open (the sessions themselves run as usual)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *modules: Any) -> None:
        from coder_stack.orchestration.gpu import gpu_session

        self.asked: list[int] = []

        def spy(timeout_s: float, *args: Any, occupy: int = 1, **kw: Any) -> Any:
            self.asked.append(occupy)
            return gpu_session(timeout_s, *args, occupy=occupy, **kw)

        for mod in modules:
            monkeypatch.setattr(mod, "gpu_session", spy)


# ------------------------------------------------------------------ teardown of one model
async def test_a_teardown_of_one_model_leaves_the_other_serving_and_the_front_ends_up(
    make_sim: Callable[..., SimStack], tmp_path: Path
) -> None:
    sim, c = await shared_sim(make_sim, tmp_path)
    up(sim, CHAT, FIM)
    for f in ("open-webui", "tabby"):
        scale(sim, EXPERIENCE, f, 1)
    mark = len(sim.timeline)

    report: RunReport = await teardown(options=TeardownOptions(models=[FIM]), connection=c)
    assert report.outcome == f"passed: {FIM} at 0; {CHAT} serving", report.to_markdown()
    assert f"kept serving: {CHAT}; the front-ends stay up for them" in report.notes
    assert history(sim, FIM, mark) == [0] and history(sim, CHAT, mark) == []
    assert not sim.call(lambda s: pods_of(s, SERVING, FIM), sim.store)  # verified gone
    r = replicas(sim)
    assert r[CHAT] == 1 and r["open-webui"] == 1 and r["tabby"] == 1, r

    # the last serving model named: nothing serves afterwards, so the front-ends go too
    report = await teardown(options=TeardownOptions(models=[CHAT]), connection=c)
    assert report.outcome == f"passed: {CHAT} at 0; no model serving", report.to_markdown()
    assert "no other model serves: the front-ends go to 0 as well" in report.notes
    assert all(v == 0 for v in replicas(sim).values()), replicas(sim)


async def test_a_teardown_naming_an_unknown_model_is_refused_before_anything_changes(
    make_sim: Callable[..., SimStack], tmp_path: Path
) -> None:
    from coder_stack.errors import SpecError

    sim, c = await shared_sim(make_sim, tmp_path)
    up(sim, CHAT)
    mark = len(sim.timeline)
    with pytest.raises(SpecError, match=r"unknown model 'coder-nope'.*coder-chat"):
        await teardown(options=TeardownOptions(models=[FIM, "coder-nope"]), connection=c)
    assert sim.timeline[mark:] == [] and replicas(sim)[CHAT] == 1


# ------------------------------------------------------------------ reclaim per model
async def test_a_reclaim_takes_an_idle_fim_and_leaves_a_busy_chat_serving(
    make_sim: Callable[..., SimStack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import coder_stack.flows.reclaim as reclaim_flow

    occupied = Occupied(monkeypatch, reclaim_flow)
    sim, c = await shared_sim(make_sim, tmp_path)
    up(sim, CHAT, FIM)
    first: RunReport = await reclaim_idle_models(options=ReclaimOptions(), connection=c)  # the first readings
    assert first.outcome == "passed: nothing idle", first.to_markdown()
    mark = len(sim.timeline)
    async with in_use(sim, CHAT):  # someone is using coder-chat
        await asyncio.sleep(IDLE_AFTER_S)  # both counters stand still: only chat's running request says busy
        report: RunReport = await reclaim_idle_models(options=ReclaimOptions(), connection=c)
        assert history(sim, CHAT, mark) == []  # chat untouched while its request runs
    assert report.outcome == f"passed: reclaimed {FIM}", report.to_markdown()
    lines = {i.model: i for i in report.idle}
    assert lines[FIM].action == "reclaimed" and lines[CHAT].action == "left serving", report.to_markdown()
    assert "busy: 1 request(s) running" in lines[CHAT].reason
    assert history(sim, FIM, mark) == [0] and replicas(sim)[CHAT] == 1
    await wait_store(sim, lambda s: not pods_of(s, SERVING, FIM), 30, "coder-fim's pod gone")
    assert occupied.asked == [55, 35, 55, 35], occupied.asked  # per run: each model under its own share


async def test_a_reclaim_takes_an_idle_chat_and_leaves_a_busy_fim_serving(
    make_sim: Callable[..., SimStack], tmp_path: Path
) -> None:
    sim, c = await shared_sim(make_sim, tmp_path)
    up(sim, CHAT, FIM)
    await reclaim_idle_models(options=ReclaimOptions(), connection=c)
    await asyncio.sleep(IDLE_AFTER_S)
    mark = len(sim.timeline)
    async with in_use(sim, FIM):
        report: RunReport = await reclaim_idle_models(options=ReclaimOptions(), connection=c)
    assert report.outcome == f"passed: reclaimed {CHAT}", report.to_markdown()
    assert history(sim, CHAT, mark) == [0] and history(sim, FIM, mark) == [] and replicas(sim)[FIM] == 1


async def test_a_reclaim_whose_share_requests_the_server_keeps_refusing_leaves_both_serving_and_says_why_once(
    make_sim: Callable[..., SimStack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim, c = await shared_sim(make_sim, tmp_path)
    up(sim, CHAT, FIM)
    await reclaim_idle_models(options=ReclaimOptions(), connection=c)
    await asyncio.sleep(IDLE_AFTER_S)  # both idle by their counters
    mark = len(sim.timeline)
    monkeypatch.setattr(gpu, "BUSY_BOUND_SECONDS", 0.3)  # 5 s in production
    Busy503(math.inf).install(monkeypatch)  # the server answers every slot request 503 (busy)
    report: RunReport = await reclaim_idle_models(options=ReclaimOptions(), connection=c)
    assert report.outcome == "skipped: GPU limit not taken", report.to_markdown()
    lines = {i.model: i for i in report.idle}
    for name in (CHAT, FIM):
        assert lines[name].action == "left serving", report.to_markdown()
        assert lines[name].reason == "busy: GPU limit not taken (its share)", report.to_markdown()
        (note,) = [n for n in report.notes if n.startswith(f"{name}: its share")]
        assert note.count("answered 503") == 1, note
    assert history(sim, CHAT, mark) == [] and history(sim, FIM, mark) == []


# ------------------------------------------------------------------ swap keeps what fits
async def test_a_swap_to_fim_keeps_a_serving_chat_and_a_swap_to_the_agent_stops_both(
    make_sim: Callable[..., SimStack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import coder_stack.flows.swap as swap_flow

    occupied = Occupied(monkeypatch, swap_flow)
    sim, c = await shared_sim(make_sim, tmp_path)
    up(sim, CHAT)
    mark = len(sim.timeline)
    report: RunReport = await swap_model(options=SwapOptions(target=FIM, smoke_gateway=False), connection=c)
    assert report.outcome == "passed", report.to_markdown()
    assert f"kept serving beside {FIM}: {CHAT}" in report.notes and "stopped (scaled to 0, pods gone): nothing" in (
        report.notes
    ), report.notes
    assert history(sim, CHAT, mark) == [] and history(sim, FIM, mark) == [1]
    assert sim.call(ready(CHAT, FIM), sim.store)  # both serving on the one GPU

    mark = len(sim.timeline)
    report = await swap_model(options=SwapOptions(target=AGENT, smoke_gateway=False), connection=c)
    assert report.outcome == "passed", report.to_markdown()
    assert f"kept serving beside {AGENT}: nothing" in report.notes, report.notes
    assert f"stopped (scaled to 0, pods gone): {CHAT}, {FIM}" in report.notes, report.notes
    order = [(n, v) for _, ns, n, v in sim.timeline[mark:] if ns == SERVING]
    assert sorted(order[:2]) == [(CHAT, 0), (FIM, 0)] and order[2:] == [(AGENT, 1)], order  # both gone, then up
    r = replicas(sim)
    assert (r[CHAT], r[FIM], r[AGENT]) == (0, 0, 1), r
    assert occupied.asked == [90, 90], occupied.asked  # fim with the chat it keeps; the agent alone


async def test_two_teardowns_of_the_two_serving_models_at_once_leave_nothing_up(
    make_sim: Callable[..., SimStack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both read the other model serving before either scales (held there by a barrier), so each keeps the
    front-ends at first; of the two, at least one reads the other's scale-down after its own, so the front-ends
    do not stay up with no model behind them."""
    import coder_stack.flows.teardown as td

    both_read = asyncio.Barrier(2)
    real_release = td.release

    async def release_after_both_read(target: Any, spec: Any, models: Any, frontends: Any) -> Any:
        if models:
            await asyncio.wait_for(both_read.wait(), 60)
        return await real_release(target, spec, models, frontends)

    monkeypatch.setattr(td, "release", release_after_both_read)
    sim, c = await shared_sim(make_sim, tmp_path)
    up(sim, CHAT, FIM)
    for f in ("open-webui", "tabby"):
        scale(sim, EXPERIENCE, f, 1)
    reports = await asyncio.gather(
        teardown(options=TeardownOptions(models=[CHAT]), connection=c),
        teardown(options=TeardownOptions(models=[FIM]), connection=c),
    )
    assert all(r.outcome.startswith("passed") for r in reports), [r.to_markdown() for r in reports]
    assert all(v == 0 for v in replicas(sim).values()), (replicas(sim), [r.notes for r in reports])
    notes = [n for r in reports for n in r.notes]
    assert sum("kept serving:" in n for n in notes) == 2, notes  # each saw the other serving: the race was run


# ------------------------------------------------------------------ wake beside what serves
async def test_a_wake_of_fim_beside_a_busy_chat_brings_it_up_without_touching_chat(
    make_sim: Callable[..., SimStack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import coder_stack.flows.wake as wake_flow

    occupied = Occupied(monkeypatch, wake_flow)
    sim, c = await shared_sim(make_sim, tmp_path)
    up(sim, CHAT)
    mark = len(sim.timeline)
    async with in_use(sim, CHAT):  # someone is using coder-chat: a wake in exclusive mode would wait for it
        report: RunReport = await asyncio.wait_for(wake_model(FIM, connection=c), 120)
        assert report.outcome == f"passed: {FIM} serving", report.to_markdown()
    assert f"{FIM} fits beside {CHAT}: nothing reclaimed" in report.notes, report.notes
    assert history(sim, CHAT)[-1:] == [1] and history(sim, CHAT, mark) == [] and history(sim, FIM, mark) == [1]
    assert sim.call(ready(CHAT, FIM), sim.store)
    assert [s.check for s in report.section(FIM).smokes] == ["direct (pod, vLLM key)", "gateway (client key)"]
    assert WAKE not in deploy_annotations(sim, FIM)
    assert occupied.asked == [35], occupied.asked  # fim's share only


async def test_a_wake_of_the_agent_beside_a_busy_chat_waits_and_never_evicts_it(
    make_sim: Callable[..., SimStack], tmp_path: Path
) -> None:
    """The agent needs 0.9 of the card: it does not fit beside coder-chat, so today's rule holds."""
    sim, c = await shared_sim(make_sim, tmp_path, fields={"wake": {"wait_for_gpu_s": 0}})
    up(sim, CHAT)
    mark = len(sim.timeline)
    async with in_use(sim, CHAT):
        with pytest.raises(WakeGaveUp, match="coder-chat stayed in use; nothing was evicted"):
            await wake_model(AGENT, connection=c)
    assert sim.timeline[mark:] == [] and WAKE not in deploy_annotations(sim, AGENT)


class Starts:
    """Every model scale-up and model Ready in the flows' steps, in the order they happened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import coder_stack.flows.gpu_steps as steps

        self.events: list[tuple[str, str]] = []
        scale_task, wait_ready = steps.scale_task, steps.wait_model_ready_task
        models = {m.name for m in StackSpec().models}

        async def scaled(target: Any, spec: Any, obj: Any, n: int, **kw: Any) -> Any:
            if obj.name in models and n > 0:
                self.events.append(("scale", obj.name))
            return await scale_task(target, spec, obj, n, **kw)

        async def readied(target: Any, spec: Any, model: Any) -> Any:
            got = await wait_ready(target, spec, model)
            self.events.append(("ready", model.name))
            return got

        monkeypatch.setattr(steps, "scale_task", scaled)
        monkeypatch.setattr(steps, "wait_model_ready_task", readied)

    def never_overlap(self) -> None:
        """Each model's start ran from its scale-up to its Ready before the next began."""
        ev = self.events
        assert len(ev) % 2 == 0 and all(
            ev[i][0] == "scale" and ev[i + 1] == ("ready", ev[i][1]) for i in range(0, len(ev), 2)
        ), ev


async def test_two_wakes_of_chat_and_fim_at_once_both_come_up_and_their_starts_never_overlap(
    make_sim: Callable[..., SimStack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim, c = await shared_sim(make_sim, tmp_path, time_scale=SLOW_SCALE)
    starts = Starts(monkeypatch)
    mark = len(sim.timeline)
    reports = await asyncio.wait_for(asyncio.gather(wake_model(CHAT, connection=c), wake_model(FIM, connection=c)), 180)
    assert [r.outcome for r in reports] == [f"passed: {CHAT} serving", f"passed: {FIM} serving"], [
        r.to_markdown() for r in reports
    ]
    assert sorted(n for _, n in starts.events) == [CHAT, CHAT, FIM, FIM], starts.events
    starts.never_overlap()
    assert history(sim, CHAT, mark) == [1] and history(sim, FIM, mark) == [1]  # neither stopped the other
    assert sim.call(ready(CHAT, FIM), sim.store)


async def test_a_wake_of_fim_cancelled_in_its_cold_start_scales_only_fim_back_and_leaves_no_claim(
    make_sim: Callable[..., SimStack], tmp_path: Path
) -> None:
    sim, c = await shared_sim(make_sim, tmp_path, time_scale=SLOW_SCALE)
    up(sim, CHAT)
    mark = len(sim.timeline)

    async def wake() -> Any:
        return await wake_model(FIM, connection=c, return_state=True)

    task = asyncio.create_task(wake())
    await wait_store(sim, lambda s: pods_of(s, SERVING, FIM) and wake_state(s, FIM), 60, "fim cold start, claimed")
    assert not any(is_ready(p) for p in sim.call(lambda s: pods_of(s, SERVING, FIM), sim.store))
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 60)
    assert history(sim, FIM, mark) == [1, 0] and history(sim, CHAT, mark) == [] and replicas(sim)[CHAT] == 1
    assert WAKE not in deploy_annotations(sim, FIM)
    await wait_store(sim, lambda s: not pods_of(s, SERVING, FIM), 30, "coder-fim's pod gone")
    assert sim.call(ready(CHAT), sim.store)


KILLABLE_WAKE = """
import asyncio, sys
from coder_stack.flows.cleanup import clean_up_crashed_run
from coder_stack.flows.errors import WakeGaveUp
from coder_stack.flows.params import Connection
from coder_stack.flows.wake import wake_model
from coder_stack.flows.wake import wake_model

asyncio.run(wake_model("coder-fim", connection=Connection(kubeconfig=sys.argv[1], stack_file=sys.argv[2])))
"""


async def test_a_killed_wake_of_fim_beside_chat_is_cleaned_up_without_touching_chat(
    make_sim: Callable[..., SimStack], prefect_api: str, tmp_path: Path
) -> None:
    sim, c = await shared_sim(make_sim, tmp_path, time_scale=SLOW_SCALE)
    up(sim, CHAT)
    mark = len(sim.timeline)
    assert c.stack_file
    proc, log = start_flow_process(KILLABLE_WAKE.replace("sys.argv[2]", repr(c.stack_file)), sim, prefect_api, tmp_path)
    try:
        await wait_store(sim, lambda s: pods_of(s, SERVING, FIM) and wake_state(s, FIM), 90, "the fim wake's start")
    finally:
        sigkill(proc)
    dead = json.loads(deploy_annotations(sim, FIM)[WAKE])["run"]
    assert replicas(sim)[FIM] == 1, log.read_text()
    async with get_client() as client:  # Failed, not Crashed: the shared server's trigger starts no second clean-up
        await client.set_flow_run_state(UUID(dead), Failed(message="killed by the test"), force=True)
    cleanup: RunReport = await clean_up_crashed_run(dead, connection=c, settle_s=1.0)
    assert cleanup.outcome.startswith(f"passed: {FIM} scaled to 0"), cleanup.to_markdown()
    assert WAKE not in deploy_annotations(sim, FIM) and replicas(sim)[FIM] == 0
    assert history(sim, CHAT, mark) == [] and replicas(sim)[CHAT] == 1  # chat was not the dead run's


# ------------------------------------------------------------------ swap cancelled in the middle
async def test_a_swap_to_fim_cancelled_in_its_cold_start_scales_only_fim_back(
    make_sim: Callable[..., SimStack], tmp_path: Path
) -> None:
    sim, c = await shared_sim(make_sim, tmp_path, time_scale=SLOW_SCALE)
    up(sim, CHAT)
    mark = len(sim.timeline)

    async def swap() -> Any:
        return await swap_model(options=SwapOptions(target=FIM, smoke_gateway=False), connection=c, return_state=True)

    task = asyncio.create_task(swap())
    await wait_store(sim, lambda s: pods_of(s, SERVING, FIM), 60, "fim cold start")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 60)
    assert history(sim, FIM, mark) == [1, 0] and history(sim, CHAT, mark) == [] and replicas(sim)[CHAT] == 1
    await wait_store(sim, lambda s: not pods_of(s, SERVING, FIM), 30, "coder-fim's pod gone")


# ------------------------------------------------------------------ the command
async def test_down_model_is_explained_by_its_help_refuses_an_unknown_name_and_tears_down_only_that_model(
    make_sim: Callable[..., SimStack], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from coder_stack.app.cli import app

    def cli(*args: str) -> Any:
        return CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})

    shown = " ".join((await asyncio.to_thread(cli, "down", "--help")).output.split())
    assert "--model" in shown and "repeatable" in shown and "The other models keep serving" in shown, shown
    sim, c = await shared_sim(make_sim, tmp_path)
    up(sim, CHAT, FIM)
    args = ["--kubeconfig", str(sim.kubeconfig_path), "--stack", str(c.stack_file)]
    mark = len(sim.timeline)
    res = await asyncio.to_thread(cli, "down", "--model", FIM, "--model", "coder-nope", *args)
    assert res.exit_code == 1 and "unknown model 'coder-nope'" in " ".join(res.output.split()), res.output
    assert sim.timeline[mark:] == []
    res = await asyncio.to_thread(cli, "down", "--model", FIM, *args)
    assert res.exit_code == 0, (res.output, res.exception)
    assert history(sim, FIM, mark) == [0] and history(sim, CHAT, mark) == [] and replicas(sim)[CHAT] == 1


async def test_two_swaps_to_chat_and_to_fim_at_once_leave_both_serving_and_their_starts_never_overlap(
    make_sim: Callable[..., SimStack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst interleaving, forced: the swap to coder-fim reads what serves under its session before the swap
    to coder-chat starts chat, and frees the GPU only once chat is scaled up (its start under way). Chat fits
    beside fim, so it is spared."""
    import coder_stack.flows.swap as swap_flow

    sim, c = await shared_sim(make_sim, tmp_path, time_scale=SLOW_SCALE)
    starts = Starts(monkeypatch)
    real_free_gpu, real_serving, real_start = swap_flow.free_gpu, swap_flow._serving, swap_flow.start_models
    reads = {CHAT: 0, FIM: 0}
    fim_read = asyncio.Event()

    async def serving(run: Any) -> list[str]:
        got = await real_serving(run)
        name = FIM if run.report.flow.endswith(f"({FIM})") else CHAT
        reads[name] += 1
        if name == FIM and reads[FIM] == 2:  # its read under the session
            fim_read.set()
        return got

    async def start_after_fims_read(run: Any, models: Any, *args: Any, **kw: Any) -> Any:
        if models[0].name == CHAT:
            await asyncio.wait_for(fim_read.wait(), 60)
        return await real_start(run, models, *args, **kw)

    def chat_scaled_up(store: Store) -> bool:
        return int(store.get("deployments", SERVING, CHAT)["spec"]["replicas"]) == 1

    async def free_gpu_once_chat_starts(run: Any, keep: Any) -> Any:
        if keep[0].name == FIM:
            await wait_store(sim, chat_scaled_up, 60, "the swap to coder-chat scaling it up")
        return await real_free_gpu(run, keep)

    monkeypatch.setattr(swap_flow, "free_gpu", free_gpu_once_chat_starts)
    monkeypatch.setattr(swap_flow, "_serving", serving)
    monkeypatch.setattr(swap_flow, "start_models", start_after_fims_read)
    mark = len(sim.timeline)
    reports = await asyncio.wait_for(
        asyncio.gather(
            swap_model(options=SwapOptions(target=CHAT, smoke_gateway=False), connection=c),
            swap_model(options=SwapOptions(target=FIM, smoke_gateway=False), connection=c),
        ),
        180,
    )
    assert [r.outcome for r in reports] == ["passed", "passed"], [r.to_markdown() for r in reports]
    assert sorted(n for _, n in starts.events) == [CHAT, CHAT, FIM, FIM], starts.events
    starts.never_overlap()
    assert history(sim, CHAT, mark) == [1] and history(sim, FIM, mark) == [1]  # neither stopped the other
    assert sim.call(ready(CHAT, FIM), sim.store)


KILLABLE_SWAP = """
import asyncio, sys
from coder_stack.flows.params import Connection
from coder_stack.flows.swap import SwapOptions, swap_model

asyncio.run(swap_model(options=SwapOptions(target="coder-fim", smoke_gateway=False),
                       connection=Connection(kubeconfig=sys.argv[1], stack_file=STACK)))
"""


async def test_a_killed_swap_to_fim_beside_chat_is_cleaned_up_without_touching_chat(
    make_sim: Callable[..., SimStack], prefect_api: str, tmp_path: Path
) -> None:
    from coder_stack.usecases.stamps import HELD_BY

    sim, c = await shared_sim(make_sim, tmp_path, time_scale=SLOW_SCALE)
    up(sim, CHAT)
    mark = len(sim.timeline)
    proc, log = start_flow_process(KILLABLE_SWAP.replace("STACK", repr(c.stack_file)), sim, prefect_api, tmp_path)
    try:
        await wait_store(sim, lambda s: pods_of(s, SERVING, FIM), 90, "the swap's fim cold start")
    finally:
        sigkill(proc)
    dead = deploy_annotations(sim, FIM).get(HELD_BY)
    assert dead and replicas(sim)[FIM] == 1, log.read_text()
    async with get_client() as client:
        await client.set_flow_run_state(UUID(dead), Failed(message="killed by the test"), force=True)
    cleanup: RunReport = await clean_up_crashed_run(dead, connection=c, settle_s=1.0)
    assert cleanup.outcome.startswith(f"passed: {FIM} scaled to 0"), cleanup.to_markdown()
    assert replicas(sim)[FIM] == 0 and history(sim, CHAT, mark) == [] and replicas(sim)[CHAT] == 1
