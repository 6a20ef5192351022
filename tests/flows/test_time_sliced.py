"""Chat and completion at once on a time-sliced L4 (issue 20's done-when), on the simulated stack.

The sim's GPU node is time-sliced (24 GB, 2 replicas) and its vLLM stand-in refuses to start, with vLLM's own
ValueError and a crash loop, when its share of the GPU's memory is not free beside the servers already on it.
What users rely on:
- one morning bring-up leaves coder-chat and coder-fim both serving, smoked through their keys (Open WebUI chat,
  Tabby's streamed FIM), their pods started one after another (the second only once the first is Ready), and no
  vLLM server ever refused to start;
- validate with the agent stage and take_over validates chat and FIM together, waits until both are gone before
  the agent (which needs the whole card) starts, and restores both, one after another;
- two bring-ups at once start each model once, one after another;
- shares that do not fit one GPU are refused before anything scales, with the numbers;
- a cancellation between the two starts leaves both at 0; a process killed there is cleaned up by the crash
  clean-up (its model and its slot), then the teardown.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from coder_stack_dev.bench.workday.scenario import team_spec
from prefect.client.orchestration import get_client
from prefect.states import Crashed
from simstack.pods import pod_is_ready
from simstack.stack import SimStack

import coder_stack.flows.gpu_steps as gpu_steps
from coder_stack.errors import PodFailed, PreflightError
from coder_stack.flows.bring_up import bring_up
from coder_stack.flows.cleanup import clean_up_crashed_run
from coder_stack.flows.teardown import teardown
from coder_stack.flows.validate import ValidateOptions, validate_coder_stack
from coder_stack.orchestration.gpu_limit import GPU_LIMIT, ensure_gpu_limit
from coder_stack.report import RunReport
from coder_stack.spec import StackSpec
from tests.kits.flowkit import (
    SERVING,
    assert_all_down,
    conn,
    latest_run_of,
    replicas,
    scaled_up,
    sigkill,
    start_flow_process,
    until,
)

# Every test starts with tag:gpu sized in hundredths of the GPU (``spec.gpu_limit_slots``, as `coder-stack setup`
# sizes it for a time-sliced stack) and tag:gpu-start created (tests/flows/conftest.py: shared_gpu).
pytestmark = pytest.mark.usefixtures("shared_gpu")

CHAT, FIM, AGENT = "coder-chat", "coder-fim", "coder-agent"
MODELS = (CHAT, FIM, AGENT)


def write_spec(spec: StackSpec, tmp_path: Path) -> str:
    path = tmp_path / "stack.yaml"
    path.write_text(spec.model_dump_json())  # JSON is YAML
    return str(path)


@dataclass
class PodLife:
    """One GPU model pod, from the store's history: the resourceVersions of its creation, first Ready, deletion."""

    model: str
    name: str
    created: int
    ready: int | None = None
    deleted: int | None = None
    restarts: int = 0
    waiting: str = ""


def pod_lives(sim: SimStack) -> list[PodLife]:
    """Every GPU model pod since the sim started, in creation order (a compacted history fails the check)."""

    def _read(store: Any) -> tuple[int, list[Any]]:
        return store.compacted_rv, list(store._history)

    compacted, history = sim.call(_read, sim.store)
    assert history and compacted < history[0].rv, "the sim's history was compacted: cannot check"
    lives: dict[str, PodLife] = {}
    for ev in history:
        meta = ev.obj.get("metadata", {})
        if ev.plural != "pods" or meta.get("namespace") != SERVING:
            continue
        model = (meta.get("labels") or {}).get("app.kubernetes.io/name", "")
        if model not in MODELS:
            continue
        life = lives.setdefault(meta["name"], PodLife(model, meta["name"], ev.rv))
        if ev.type == "DELETED":
            life.deleted = ev.rv
        if life.ready is None and pod_is_ready(ev.obj):
            life.ready = ev.rv
        for cs in (ev.obj.get("status") or {}).get("containerStatuses") or []:
            life.restarts = max(life.restarts, int(cs.get("restartCount") or 0))
            reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason", "")
            life.waiting = life.waiting or (reason if reason == "CrashLoopBackOff" else "")
    return sorted(lives.values(), key=lambda p: p.created)


def assert_no_start_refused(lives: list[PodLife]) -> None:
    """No vLLM server crashed at start (the stand-in refuses a share that is not free with a crash loop)."""
    bad = [p for p in lives if p.restarts or p.waiting]
    assert not bad, bad


def gateway_calls(sim: SimStack, alias: str, model: str, stream: bool | None = None) -> list[dict[str, Any]]:
    """The gateway's spend-log rows of ``alias``'s calls to ``model`` (written by its batched spend write)."""

    def _read() -> list[dict[str, Any]]:
        rows = sim.services.litellm_db.get("spend_logs", [])
        return [
            dict(r)
            for r in rows
            if r.get("alias") == alias and r.get("model_group") == model and (stream is None or r["stream"] is stream)
        ]

    result: list[dict[str, Any]] = sim.call(_read)
    return result


def smokes(report: RunReport, model: str) -> list[str]:
    sec = next(s for s in report.models if s.model == model)
    assert sec.smokes and all(s.ok for s in sec.smokes), (model, sec.smokes)
    return [s.check for s in sec.smokes]


# ------------------------------------------------------------------ the morning, then validate with take_over
async def test_one_bring_up_serves_chat_and_fim_started_one_after_another_and_validate_restores_both(
    make_sim: Callable[..., SimStack], tmp_path: Path
) -> None:
    spec = team_spec()  # chat 0.55 + fim 0.35 of a 24 GB L4 with 2 replicas; the agent 0.9
    await ensure_gpu_limit(spec.gpu_limit_slots)
    sim = make_sim(spec=spec)
    connection = conn(sim, stack_file=write_spec(spec, tmp_path))

    report = await bring_up(connection=connection)

    assert report.outcome == "passed: serving", report
    now = replicas(sim)
    assert (now[CHAT], now[FIM], now[AGENT]) == (1, 1, 0), now
    assert f"serving together on the time-sliced GPU: {CHAT}, {FIM}" in report.notes
    # smoked through their keys: Open WebUI's for chat, Tabby's streamed FIM for fim
    assert smokes(report, CHAT) == ["direct (pod, vLLM key)", "gateway (client key)", "front-ends"]
    assert smokes(report, FIM) == ["direct (pod, vLLM key)", "gateway (client key)", "front-ends"]
    # the gateway smokes went through each model's own front-end key: Open WebUI's for chat, Tabby's for FIM
    calls = await until(lambda: gateway_calls(sim, "tabby", FIM, stream=False), 30, "Tabby's key's FIM smoke logged")
    assert calls and gateway_calls(sim, "open-webui", CHAT, stream=False)
    assert not gateway_calls(sim, "open-webui", FIM), "coder-fim was smoked through Open WebUI's key"
    fe = {s.model: next(c.detail for c in s.smokes if c.check == "front-ends") for s in report.models}
    assert "open-webui pod: /models = key scope" in fe[CHAT] and "tabby" not in fe[CHAT], fe[CHAT]
    assert "tabby config key: streamed FIM through the gateway" in fe[FIM] and "open-webui" not in fe[FIM], fe[FIM]
    lives = pod_lives(sim)
    chat, fim = lives  # one pod each, both alive and Ready
    assert (chat.model, fim.model) == (CHAT, FIM), lives
    assert chat.ready is not None and fim.ready is not None and chat.deleted is fim.deleted is None, lives
    assert fim.created > chat.ready, f"{FIM}'s pod was created before {CHAT}'s was Ready: {lives}"
    assert_no_start_refused(lives)

    v = await validate_coder_stack(
        options=ValidateOptions(stages=["chat", "fim", "agent"], take_over=True), connection=connection
    )

    assert v.outcome == "passed", v
    assert [s.model for s in v.models] == [CHAT, FIM, AGENT]
    for m in (CHAT, FIM, AGENT):
        smokes(v, m)
    chat, fim, *after = pod_lives(sim)
    assert (chat.model, fim.model) == (CHAT, FIM)
    by_model: dict[str, list[PodLife]] = {}
    for p in after:
        by_model.setdefault(p.model, []).append(p)
    (agent,) = by_model[AGENT]
    # taken over: the morning's pods were gone before validate's own started
    assert chat.deleted and fim.deleted and min(p.created for p in after) > max(chat.deleted, fim.deleted)
    # validate's chat+fim group: one after another, then both gone before the agent started
    v_chat, r_chat = by_model[CHAT]
    v_fim, r_fim = by_model[FIM]
    assert v_chat.ready and v_fim.created > v_chat.ready, after
    assert v_chat.deleted and v_fim.deleted and agent.created > max(v_chat.deleted, v_fim.deleted), after
    # restored: both, one after another, once the agent was gone
    assert agent.deleted and r_chat.created > agent.deleted, after
    assert r_chat.ready and r_fim.created > r_chat.ready and r_fim.ready and not (r_chat.deleted or r_fim.deleted)
    now = replicas(sim)
    assert (now[CHAT], now[FIM], now[AGENT]) == (1, 1, 0), now
    assert f"restored {CHAT}, {FIM} as it was before this run" in v.notes, v.notes
    assert_no_start_refused(pod_lives(sim))


# ------------------------------------------------------------------ two runs at once
def most_shares_at_once(sim: SimStack, spec: StackSpec) -> float:
    """The most of the card the GPU model pods alive at one moment would hold (from creation until deleted)."""
    alive: set[tuple[str, str]] = set()
    most = 0.0
    for p in sorted(
        [(life.created, 1, life) for life in pod_lives(sim)]
        + [(life.deleted, 0, life) for life in pod_lives(sim) if life.deleted],
        key=lambda x: (x[0], x[1]),
    ):
        _, born, life = p
        (alive.add if born else alive.discard)((life.model, life.name))
        most = max(most, sum(spec.model(m).gpu_memory_utilization for m, _ in alive))
    return round(most, 4)


async def test_two_bring_ups_at_once_start_each_model_once_one_after_another(
    make_sim: Callable[..., SimStack], tmp_path: Path
) -> None:
    """Two morning runs at once (a retry racing the schedule): whichever holds the start turn, each model is
    started once, the second only after the first is Ready, and no server is refused its share."""
    spec = team_spec()
    await ensure_gpu_limit(spec.gpu_limit_slots)
    sim = make_sim(spec=spec)
    connection = conn(sim, stack_file=write_spec(spec, tmp_path))
    a, b = await asyncio.gather(bring_up(connection=connection), bring_up(connection=connection))
    assert a.outcome == b.outcome == "passed: serving", (a, b)
    now = replicas(sim)
    assert (now[CHAT], now[FIM], now[AGENT]) == (1, 1, 0), now
    lives = pod_lives(sim)
    chat, fim = lives  # one pod each: neither run started a model twice nor scaled the other's down
    assert (chat.model, fim.model) == (CHAT, FIM) and chat.ready and fim.created > chat.ready, lives
    assert most_shares_at_once(sim, spec) <= 1.0, lives
    assert_no_start_refused(lives)
    for r in (a, b):  # each run smoked both through their keys
        assert smokes(r, CHAT)[-1] == smokes(r, FIM)[-1] == "front-ends"


# ------------------------------------------------------------------ shares that do not fit
async def test_shares_that_do_not_fit_one_gpu_are_refused_before_any_scale_up_with_the_numbers(
    make_sim: Callable[..., SimStack], tmp_path: Path
) -> None:
    spec = team_spec({CHAT: 0.9, FIM: 0.9})
    await ensure_gpu_limit(spec.gpu_limit_slots)
    sim = make_sim(spec=spec)
    before = list(sim.timeline)
    state = await bring_up(connection=conn(sim, stack_file=write_spec(spec, tmp_path)), return_state=True)
    assert state.is_failed(), state
    with pytest.raises(PreflightError) as err:
        await state.aresult()
    msg = str(err.value)
    assert "coder-chat 0.9 x 24 GB = 21.6 GB" in msg and "coder-fim 0.9 x 24 GB = 21.6 GB" in msg, msg
    assert "43.2 GB of 24 GB" in msg, msg
    assert list(sim.timeline) == before  # the replica history of every model and front-end: unchanged
    assert all(n == 0 for n in replicas(sim).values())


# ------------------------------------------------------------------ the second model fails
async def test_a_second_model_that_cannot_start_fails_the_bring_up_and_both_go_back_to_zero(
    make_sim: Callable[..., SimStack], tmp_path: Path
) -> None:
    spec = team_spec()
    await ensure_gpu_limit(spec.gpu_limit_slots)
    sim = make_sim(spec=spec, faults={FIM: "crashloop"})
    state = await bring_up(connection=conn(sim, stack_file=write_spec(spec, tmp_path)), return_state=True)
    assert state.is_failed(), state
    with pytest.raises(PodFailed, match="coder-fim"):
        await state.aresult()
    assert scaled_up(sim, CHAT) and scaled_up(sim, FIM)  # chat came up first, then fim was tried
    assert_all_down(sim, pods_timeout=30)  # everything it started: both models and the front-ends


# ------------------------------------------------------------------ cancelled, or killed, between the two starts
async def test_a_cancellation_between_the_two_starts_leaves_both_at_zero(
    make_sim: Callable[..., SimStack], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = team_spec()
    await ensure_gpu_limit(spec.gpu_limit_slots)
    sim = make_sim(spec=spec)
    # The second start is held at its share check, right after the first model is Ready: the cancellation lands
    # there, between the two starts.
    real_wait = gpu_steps.wait_for_share
    at_second: asyncio.Event = asyncio.Event()
    waits: list[str] = []

    async def held_wait(run: Any, model: Any) -> None:
        waits.append(model.name)
        if model.name == FIM:
            at_second.set()
            await asyncio.Event().wait()
        await real_wait(run, model)

    monkeypatch.setattr(gpu_steps, "wait_for_share", held_wait)
    run = asyncio.create_task(bring_up(connection=conn(sim, stack_file=write_spec(spec, tmp_path))))
    await asyncio.wait_for(at_second.wait(), 120)
    assert replicas(sim)[CHAT] == 1 and replicas(sim)[FIM] == 0 and waits == [CHAT, FIM]
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    # the clean-up scaled both (and the front-ends) to 0 and waited for the pods before the cancellation went on
    assert_all_down(sim)
    assert not scaled_up(sim, FIM)
    _, state = await latest_run_of("bring_up")
    assert state.is_final() and not state.is_completed(), state


KILLED_BETWEEN = """
import asyncio, sys
import coder_stack.flows.gpu_steps as gpu_steps
from coder_stack.flows.bring_up import bring_up
from coder_stack.flows.cleanup import clean_up_crashed_run
from coder_stack.flows.params import Connection

real = gpu_steps.wait_for_share

async def held(run, model):
    if model.name == "coder-fim":
        print("between the two starts", flush=True)
        await asyncio.Event().wait()
    await real(run, model)

gpu_steps.wait_for_share = held
asyncio.run(bring_up(connection=Connection(kubeconfig=sys.argv[1], stack_file=sys.argv[2])))
"""


async def test_a_process_killed_between_the_two_starts_is_cleaned_up_by_the_crash_cleanup_and_the_teardown(
    make_sim: Callable[..., SimStack], prefect_api: str, tmp_path: Path
) -> None:
    spec = team_spec()
    await ensure_gpu_limit(spec.gpu_limit_slots)
    sim = make_sim(spec=spec)
    stack_file = write_spec(spec, tmp_path)
    proc, log = start_flow_process(KILLED_BETWEEN.replace("sys.argv[2]", repr(stack_file)), sim, prefect_api, tmp_path)
    try:
        await until(lambda: "between the two starts" in log.read_text() or proc.poll() is not None, 120, "chat Ready")
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        sigkill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert replicas(sim)[CHAT] == 1 and not scaled_up(sim, FIM)  # nothing ran on the way out

    # The crash automation marks the silent run Crashed; its clean-up scales to 0 what the run holds (coder-chat,
    # stamped by it) and frees the 90 hundredths of the GPU its session held.
    killed_id, _ = await latest_run_of("bring_up")
    async with get_client() as client:
        await client.set_flow_run_state(killed_id, Crashed(message="killed by the test"), force=True)
    cleaned = await clean_up_crashed_run(crashed_run=str(killed_id), settle_s=1.0)
    assert cleaned.outcome.startswith("passed: coder-chat scaled to 0; GPU slot freed"), cleaned
    now = replicas(sim)
    assert (now[CHAT], now[FIM], now[AGENT]) == (0, 0, 0), now
    async with get_client() as client:
        assert (await client.read_global_concurrency_limit_by_name(GPU_LIMIT)).active_slots == 0

    # the evening teardown after it: the front-ends the run started to 0 as well, nothing left
    report = await teardown(connection=conn(sim, stack_file=stack_file))
    assert report.outcome == "passed: everything at 0", report
    assert_all_down(sim, pods_timeout=30)
