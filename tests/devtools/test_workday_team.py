"""The workday's chat-and-completion rows (issue 20): a team using coder-chat and coder-fim all day, on an
exclusive GPU (one model at a time; a wake never evicts a model in use) and on a time-sliced one (both up
together when ``StackSpec.shares_fit`` says they fit). A model of the day: the flows are not built yet.

The days below are made by hand; each expected figure is worked out from the trace, the policy, the sim's
Timings and prefect.yaml's reclaim cadence, not copied from a run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from coder_stack_dev.bench.run import main
from coder_stack_dev.bench.workday import (
    CHAT,
    MINUTE,
    TEAM_MODELS,
    TEAM_TRACE_FILE,
    WAKE_LATENCY_S,
    Day,
    Policy,
    Result,
    SharingRefused,
    Trace,
    at,
    read_schedules,
    read_trace,
    replay,
    short_trace,
    table,
    team_policies,
    team_spec,
    team_trace,
    team_workday,
    workday,
)
from simstack.timings import Timings, model_timings

from coder_stack.spec import GpuSharing, StackSpec

FIM = "coder-fim"
SHARED = team_spec()  # the default models, time-sliced, chat 0.55 and fim 0.35 of a 24 GB GPU
T = Timings()
SCHED = read_schedules()
CHAT_START = model_timings(SHARED.model(CHAT)).server_start_s
FIM_START = model_timings(SHARED.model(FIM)).server_start_s
COLD_NEW_NODE = T.node_provision_s + T.gpu_image_pull_s + T.weights_cached_s + CHAT_START
END = at("19:30")
NEVER = at("23:00")
IDLE = 15 * MINUTE


def day(*requests: tuple[str, str]) -> Trace:
    secs = [(at(t), m) for t, m in requests]
    chat = tuple(sorted(t for t, m in secs if m == CHAT))
    others = tuple(sorted((t, m) for t, m in secs if m != CHAT))
    return Trace(chat, END, END, 120.0, END, others, killed_run=False)


def policy(shared: bool, up: float = at("09:00")) -> Policy:
    """Reclaim after 15 idle min, wake, a bring-up at ``up``: of coder-chat (exclusive) or of both (shared)."""
    morning = TEAM_MODELS if shared else (CHAT,)
    return Policy("p", "p", up, NEVER, True, 120.0, IDLE, wake=True, morning=morning, shared=shared)


def event_time(r: Result, what: str) -> float:
    return next(t for t, w in r.events if w == what)


def test_the_shipped_team_trace_is_the_built_in_team_day() -> None:
    t = read_trace(TEAM_TRACE_FILE, [m.name for m in StackSpec().models])
    assert t == team_trace() and not t.killed_run
    # 09:00-12:00 and 13:00-17:30: a burst of 4 every 4 min from 09:01 (45 bursts) and 13:01 (68 bursts)
    assert t.by_model() == {CHAT: t.by_model()[CHAT], FIM: 4 * (45 + 68)}
    assert (at("09:01"), FIM) in t.other_requests and (at("09:01") + 45, FIM) in t.other_requests
    # chat at 09:00, then every 10, 15, 20, 15 min: 09:10, 09:25, 09:45, 10:00
    assert [c for c in t.requests if c < at("10:01")] == [at(x) for x in ("09:00", "09:10", "09:25", "09:45", "10:00")]


def test_shared_a_fim_request_while_chat_is_up_is_served_at_once() -> None:
    """Shared: the 09:00 bring-up brings coder-chat, then coder-fim (one start at a time) on the new node; a
    FIM request at 09:20 is served there and then, and chat is never taken away for it."""
    trace = day(("09:15", CHAT), ("09:20", FIM), ("09:22", CHAT))
    r = replay(policy(True), trace, SCHED, spec=SHARED)
    chat_ready = event_time(r, "coder-chat Ready")
    fim_ready = event_time(r, "coder-fim Ready")
    assert chat_ready == pytest.approx(at("09:00") + COLD_NEW_NODE)
    # FIM starts after chat is Ready (vLLM measures free memory at start): warm node, image cached
    assert fim_ready == pytest.approx(chat_ready + T.weights_cached_s + FIM_START)
    assert fim_ready < at("09:15")
    assert (r.failed_requests, r.delayed_requests) == (0, 0)
    assert r.failed_by_model == {CHAT: 0, FIM: 0} and r.delayed_by_model == {CHAT: 0, FIM: 0}
    assert r.wakes == [] and len(r.nodes) == 1
    # both reclaimed only by reclaim, each after its own idleness
    assert sorted(w for _, w in r.events if w.startswith("coder-") and " scaled to 0" in w) == [
        "coder-chat scaled to 0 (reclaim_idle_models)",
        "coder-fim scaled to 0 (reclaim_idle_models)",
    ]
    assert event_time(r, "coder-chat scaled to 0 (reclaim_idle_models)") >= at("09:22") + IDLE


def test_exclusive_the_same_fim_request_waits_for_chats_reclaim_and_fims_start() -> None:
    """Exclusive: the bring-up brings coder-chat only; the 09:20 FIM request wakes coder-fim, whose wake waits
    (never evicting chat, used at 09:22) until reclaim takes chat after 15 idle min; then FIM starts warm."""
    trace = day(("09:15", CHAT), ("09:20", FIM), ("09:22", CHAT))
    r = replay(policy(False), trace, SCHED, spec=SHARED)
    t_rec = event_time(r, "coder-chat scaled to 0 (reclaim_idle_models)")
    assert IDLE <= t_rec - at("09:22") <= IDLE + SCHED.reclaim_every_s
    assert event_time(r, "wake coder-fim waits for the GPU: coder-chat in use") == pytest.approx(
        at("09:20") + WAKE_LATENCY_S
    )
    fim_ready = event_time(r, "coder-fim Ready")
    assert fim_ready == pytest.approx(t_rec + T.termination_s + T.weights_cached_s + FIM_START, abs=0.01)
    assert r.failed_by_model == {CHAT: 0, FIM: 0} and r.delayed_by_model == {CHAT: 0, FIM: 1}
    assert r.delays_by_model[FIM] == pytest.approx([fim_ready - at("09:20")])


def test_shared_a_fim_wake_beside_chat_in_use_starts_at_once_on_the_same_node() -> None:
    """Shared, only coder-chat up (the exclusive bring-up's day): the FIM request wakes coder-fim, which starts
    beside chat without waiting for the GPU: wake latency + weights + FIM's start."""
    trace = day(("09:15", CHAT), ("09:20", FIM), ("09:22", CHAT))
    r = replay(replace(policy(True), morning=(CHAT,)), trace, SCHED, spec=SHARED)
    assert not any(w.startswith("wake coder-fim waits for the GPU") for _, w in r.events)
    fim_ready = event_time(r, "coder-fim Ready")
    assert fim_ready == pytest.approx(at("09:20") + WAKE_LATENCY_S + T.weights_cached_s + FIM_START)
    assert r.delays_by_model[FIM] == pytest.approx([fim_ready - at("09:20")])
    assert event_time(r, "coder-chat scaled to 0 (reclaim_idle_models)") >= at("09:22") + IDLE
    assert len(r.nodes) == 1


def test_shared_two_wakes_at_once_start_one_after_the_other() -> None:
    """Shared, nothing up: chat at 12:00 and FIM at 12:00:30 wake both; FIM's server starts only once chat's
    is Ready (one start at a time on a shared GPU), on the node chat's wake provisioned."""
    trace = Trace((at("12:00"),), END, END, 120.0, END, ((at("12:00") + 30, FIM),), killed_run=False)
    r = replay(policy(True, up=NEVER), trace, SCHED, spec=SHARED)
    chat_ready = event_time(r, "coder-chat Ready")
    assert chat_ready == pytest.approx(at("12:00") + WAKE_LATENCY_S + COLD_NEW_NODE)
    assert event_time(r, "coder-fim Ready") == pytest.approx(chat_ready + T.weights_cached_s + FIM_START)
    assert r.delayed_by_model == {CHAT: 1, FIM: 1} and len(r.nodes) == 1


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        # the spec's default shares, 0.9 each: 43.2 GB of a 24 GB GPU
        (
            StackSpec(gpu_sharing=GpuSharing(mode="time-sliced")),
            "the shares add up to 43.2 GB, more than the GPU's 24 GB",
        ),
        (team_spec({CHAT: 0.2, FIM: 0.35}), "coder-chat's share of 4.8 GB cannot hold 5.5 GB of weights"),
        (StackSpec(), "gpu_sharing.mode is exclusive: set it to time-sliced"),
    ],
)
def test_shared_is_refused_when_the_models_do_not_fit_one_gpu(spec: StackSpec, says: str) -> None:
    assert not spec.shares_fit(list(TEAM_MODELS)).fits
    with pytest.raises(SharingRefused) as e:
        replay(policy(True), day(("09:15", CHAT)), SCHED, spec=spec)
    assert says in str(e.value) and "coder-chat" in str(e.value) and "exclusive policy" in str(e.value)
    with pytest.raises(SharingRefused):
        team_workday(day(("09:15", CHAT)), spec=spec)
    # the exclusive policy runs on the same spec
    assert replay(policy(False), day(("09:15", CHAT)), SCHED, spec=spec).failed_requests == 0


def test_the_team_rows_are_in_the_workday_table() -> None:
    res = workday(short_trace())
    rows = res["workday_team"]
    assert [r["policy"] for r in rows] == [p.name for p in team_policies(SCHED)] == ["team_exclusive", "team_shared"]
    excl, shared = rows
    total = team_trace().by_model()
    for r in rows:
        assert r["failed_requests"] == 0  # wake: nothing fails, it waits
        assert sum(r["delayed_by_model"].values()) == r["delayed_requests"] <= sum(total.values())
        assert r["cost_per_day"] == pytest.approx(
            r["node_hours"] * res["workday_assumptions"]["node_price_per_hour"], abs=0.01
        )
    # exclusive: chat comes first each stretch and is used every 10-20 min, so FIM waits out every stretch
    assert excl["delayed_by_model"][FIM] == total[FIM]
    assert shared["delayed_by_model"][FIM] < total[FIM] / 10
    assert shared["delay_by_model_p50_max_min"][FIM][1] < excl["delay_by_model_p50_max_min"][FIM][0]
    out = table(res)
    assert excl["label"] in out and shared["label"] in out and "chat and completion all day" in out
    assert "not built yet" in out and "13.2 GB" in out


def test_shared_a_server_scaled_while_another_starts_waits_for_it_on_the_node() -> None:
    """The scheduler's own rule, without the GPU slot's ordering: coder-chat scaled to 1 at 12:00 (by hand),
    coder-fim at 12:05 while chat's server is still starting on the new node; FIM's pod binds only once chat's
    server is Ready, since vLLM measures the free memory when it starts and a share being loaded is not free."""
    d = Day(policy(True, up=NEVER), day(), SCHED, spec=SHARED)
    d.at(at("12:00"), lambda: d.scale(CHAT, 1))
    d.at(at("12:05"), lambda: d.scale(FIM, 1))
    r = d.run()
    chat_ready = event_time(r, "coder-chat Ready")
    assert (
        event_time(r, "GPU node gpu-1 Ready") < at("12:05") < chat_ready == pytest.approx(at("12:00") + COLD_NEW_NODE)
    )
    assert event_time(r, "coder-fim Ready") == pytest.approx(chat_ready + T.weights_cached_s + FIM_START)
    assert len(r.nodes) == 1


def test_bench_refuses_a_bad_team_trace_before_running_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "team.csv"
    f.write_text("09:00,coder-fim,request\n09:01,coder-tab,request\n")
    with pytest.raises(SystemExit) as e:
        main(["--only", "workday", "--team-trace", str(f), "--json", str(tmp_path / "out.json")])
    assert e.value.code == 2 and f"--team-trace: {f} line 2" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
