"""The workday made honest (issue 19): a trace from a file (``--trace``), a request for a model that is down
fails without wake and waits out the wake and the cold start with it, the wake never evicts a model in use.

The traces below are made by hand; each expected figure is worked out from the trace, the policy, the sim's
Timings and prefect.yaml's reclaim cadence, not copied from a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from coder_stack_dev.bench.run import main
from coder_stack_dev.bench.workday import (
    CHAT,
    MINUTE,
    WAKE_LATENCY_S,
    WORKDAY_TRACE_FILE,
    Policy,
    Result,
    Trace,
    TraceError,
    at,
    hm,
    parse_trace,
    read_schedules,
    read_trace,
    replay,
    short_trace,
    sim_day,
    table,
    trace_lines,
    workday,
    workday_trace,
)
from simstack.timings import Timings, model_timings

from coder_stack.spec import StackSpec

SPEC = StackSpec()
MODELS = [m.name for m in SPEC.models]
FIM = "coder-fim"
T = Timings()
SCHED = read_schedules()
CHAT_START = model_timings(SPEC.model(CHAT)).server_start_s
FIM_START = model_timings(SPEC.model(FIM)).server_start_s
COLD_NEW_NODE = T.node_provision_s + T.gpu_image_pull_s + T.weights_cached_s + CHAT_START
END = at("19:30")
NEVER = at("23:00")  # a schedule that never comes within the day (the replay stops at END)


def day(*requests: tuple[str | float, str]) -> Trace:
    """A day of requests (clock or seconds since midnight, model) and no validate run."""
    secs = [(at(t) if isinstance(t, str) else t, m) for t, m in requests]
    chat = tuple(sorted(t for t, m in secs if m == CHAT))
    others = tuple(sorted((t, m) for t, m in secs if m != CHAT))
    return Trace(chat, END, END, 120.0, END, others, killed_run=False)


def policy(wake: bool, *, up: float = NEVER, react_s: float | None = 0.0, idle_after_s: float | None = None) -> Policy:
    return Policy("p", "p", up, NEVER + 10 * MINUTE, True, 120.0, idle_after_s, react_s=react_s, wake=wake)


def event_time(r: Result, what: str) -> float:
    return next(t for t, w in r.events if w == what)


# ---- the trace file


def test_the_shipped_trace_file_is_the_built_in_day() -> None:
    assert read_trace(WORKDAY_TRACE_FILE, MODELS) == workday_trace()
    # and what trace_lines writes reads back to the same trace
    assert parse_trace(trace_lines(short_trace()), MODELS) == short_trace()


def test_a_trace_file_with_two_models_and_no_validate_run(tmp_path: Path) -> None:
    f = tmp_path / "day.csv"
    f.write_text(
        "# two people\ntime,model,kind\n09:00,coder-chat,request\n\n09:00:30,coder-fim,request\n"
        "09:10 , coder-chat , request\n"
    )
    t = read_trace(f, MODELS)
    assert t.requests == (at("09:00"), at("09:10")) and t.other_requests == ((at("09:00") + 30, FIM),)
    assert not t.killed_run and t.end == END and t.n_requests == 3
    assert t.by_model() == {CHAT: 2, FIM: 1}


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("9h00,coder-chat,request", "not HH:MM"),
        ("09:00,coder-chat", "expected 3 comma-separated fields"),
        ("09:00,gpt-4,request", "unknown model 'gpt-4'"),
        ("09:00,coder-chat,reqest", "unknown kind 'reqest'"),
        ("25:00,coder-chat,request", "not a clock time"),
    ],
)
def test_a_bad_line_is_named_with_what_is_wrong(tmp_path: Path, bad: str, says: str) -> None:
    f = tmp_path / "t.csv"
    f.write_text(f"time,model,kind\n09:00,coder-chat,request\n{bad}\n09:20,coder-chat,request\n")
    with pytest.raises(TraceError) as e:
        read_trace(f, MODELS)
    assert f"{f} line 3 ({bad!r})" in str(e.value) and says in str(e.value)


def test_a_validate_run_needs_its_kill_and_the_end_comes_last() -> None:
    with pytest.raises(TraceError, match="validate-kill is missing"):
        parse_trace(["09:40,coder-agent,validate-start"], MODELS)
    with pytest.raises(TraceError, match=r"line 2: validate-kill must come after validate-start \(line 1\)"):
        parse_trace(["09:40,coder-agent,validate-start", "09:30,coder-agent,validate-kill"], MODELS)
    with pytest.raises(TraceError, match=r"line 2: end 10:00 is before the last event \(11:00\)"):
        parse_trace(["11:00,coder-chat,request", "10:00,,end"], MODELS)


def test_bench_refuses_a_bad_trace_before_running_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "t.csv"
    f.write_text("09:00,coder-chat,request\n09:04,coder-chat\n")
    with pytest.raises(SystemExit) as e:
        main(["--only", "workday", "--trace", str(f), "--json", str(tmp_path / "out.json")])
    assert e.value.code == 2 and f"--trace: {f} line 2" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


# ---- a request for a model that is down, without and with wake


def test_a_request_while_down_fails_without_wake_and_waits_cold_start_plus_wake_latency_with_it() -> None:
    trace = day(("12:00", CHAT), ("12:05", CHAT))
    without = replay(policy(False), trace, SCHED)
    # both fail: the first one's bring-back (at once) is Ready at 12:00 + a new node's cold start, after 12:05
    assert COLD_NEW_NODE > 5 * MINUTE
    assert (without.failed_requests, without.delayed_requests) == (2, 0)
    [out] = without.cold_starts
    assert out["requests_failed"] == 2 and out["ready"] == hm(at("12:00") + COLD_NEW_NODE)

    with_ = replay(policy(True), trace, SCHED)
    assert (with_.failed_requests, with_.delayed_requests) == (0, 2)
    assert with_.delays_s == pytest.approx([COLD_NEW_NODE + WAKE_LATENCY_S, COLD_NEW_NODE + WAKE_LATENCY_S - 300])
    assert [w["model"] for w in with_.wakes] == [CHAT]
    assert with_.cold_starts[0]["requests_delayed"] == 2


def test_a_burst_makes_one_wake() -> None:
    burst: list[tuple[str | float, str]] = [(at("12:00") + i, CHAT) for i in range(50)]  # 50 requests in 50 s
    r = replay(policy(True), day(*burst), SCHED)
    assert len(r.wakes) == 1 and r.delayed_requests == 50 and r.failed_requests == 0
    assert max(r.delays_s) == pytest.approx(COLD_NEW_NODE + WAKE_LATENCY_S)
    assert min(r.delays_s) == pytest.approx(COLD_NEW_NODE + WAKE_LATENCY_S - 49)
    assert sum(1 for _, w in r.events if w == "coder-chat scaled to 1") == 1
    # without wake the same burst fails whole, and one bring-back serves the requests after it
    n = replay(policy(False), day(*burst), SCHED)
    assert n.failed_requests == 50 and len(n.cold_starts) == 1


def test_a_wake_cut_short_is_asked_again_by_the_people_still_waiting() -> None:
    """The evening teardown scales everything to 0 while a wake's coder-chat is still provisioning its node:
    that wake ends, the request still waiting makes the hook ask again, and the second wake uses the node
    the first one started (so the wait is still one new node's cold start + one wake latency)."""
    p = Policy("p", "p", NEVER, at("19:00"), True, 120.0, None, wake=True)
    r = replay(p, day(("18:58", CHAT)), SCHED)
    assert at("18:58") + WAKE_LATENCY_S + T.node_provision_s > at("19:00") + WAKE_LATENCY_S  # node not Ready yet
    assert [w["requested"] for w in r.wakes] == ["18:58", "19:00"]
    assert (r.failed_requests, r.delayed_requests) == (0, 1)
    assert r.delays_s == pytest.approx([WAKE_LATENCY_S + COLD_NEW_NODE])
    assert len(r.nodes) == 1


def test_a_wake_for_b_waits_until_a_in_use_is_reclaimed_and_never_evicts_it() -> None:
    """coder-chat up from the 09:00 schedule and in use; coder-fim requested at 09:25: its wake waits for the
    GPU while chat is used (09:30 still served), until reclaim finds chat idle idle_after_s; then fim starts
    warm on the same node."""
    idle = 15 * MINUTE
    trace = day(("09:15", CHAT), ("09:20", CHAT), ("09:25", FIM), ("09:30", CHAT))
    r = replay(policy(True, up=at("09:00"), idle_after_s=idle), trace, SCHED)
    assert r.failed_requests == 0 and r.delayed_requests == 1  # only the fim request waited
    [rec] = [x for x in r.reclaims if x["model"] == CHAT]
    t_rec = at(rec["at"])
    # chat went to 0 once, by reclaim; not before it was idle for idle_after after its last request
    assert [w for _, w in r.events if w.startswith("coder-chat scaled to 0")] == [
        "coder-chat scaled to 0 (reclaim_idle_models)"
    ]
    assert idle <= t_rec - at("09:30") <= idle + SCHED.reclaim_every_s
    waits = event_time(r, "wake coder-fim waits for the GPU: coder-chat in use")
    assert waits == pytest.approx(at("09:25") + WAKE_LATENCY_S)
    fim_ready = event_time(r, "coder-fim Ready")
    assert fim_ready == pytest.approx(t_rec + T.termination_s + T.weights_cached_s + FIM_START, abs=0.01)
    assert r.delays_s == pytest.approx([fim_ready - at("09:25")])
    assert r.wakes[0]["gpu_wait_min"] == pytest.approx((t_rec - waits) / MINUTE, abs=0.01)


def test_without_wake_the_failures_end_when_the_schedule_brings_the_model_up() -> None:
    trace = day(("06:00", CHAT), ("06:30", CHAT), ("07:05", CHAT), ("07:30", CHAT))
    ready = SCHED.bring_up_s + COLD_NEW_NODE  # the 07:00 bring-up on a new node
    assert SCHED.bring_up_s == at("07:00") and at("07:05") < ready < at("07:30")
    nobody = replay(policy(False, up=SCHED.bring_up_s, react_s=None), trace, SCHED)
    assert nobody.failed_requests == 3  # 06:00, 06:30 and 07:05 (cold-starting); 07:30 served
    [out] = nobody.cold_starts
    assert (out["request"], out["ready"], out["requests_failed"]) == ("06:00", hm(ready), 3)
    # a person who brings it back at the first failure: one failure, Ready 06:00 + a cold start
    person = replay(policy(False, up=SCHED.bring_up_s, react_s=0.0), trace, SCHED)
    assert person.failed_requests == 1 and person.cold_starts[0]["ready"] == hm(at("06:00") + COLD_NEW_NODE)
    # a person who reacts 40 min later: brought up at 06:40, so the 06:30 request fails too
    late = replay(policy(False, up=SCHED.bring_up_s, react_s=40 * MINUTE), trace, SCHED)
    assert at("06:40") + COLD_NEW_NODE < at("07:05")
    assert late.cold_starts[0]["ready"] == hm(at("06:40") + COLD_NEW_NODE) and late.failed_requests == 2


def test_the_table_prints_the_wake_rows_beside_the_policies() -> None:
    res = workday(short_trace())
    names = [r["policy"] for r in res["workday_wake"]]
    assert names == ["wake_15", "wake_30", "wake_60", "wake_30_no_schedules"]
    assert all(r["delayed_requests"] == 0 for r in res["workday"])  # no wake: nothing waits
    assert any(r["failed_requests"] > 0 for r in res["workday"])
    for r in res["workday_wake"]:
        assert r["failed_requests"] == 0 and r["delayed_requests"] > 0 and len(r["wakes"]) >= 1
        assert r["delay_p50_min"] <= r["delay_max_min"]
    out = table(res)
    for r in res["workday"] + res["workday_wake"]:
        assert r["label"] in out
    w = res["workday_wake"][0]
    assert f"{w['delay_p50_min']:.1f}/{w['delay_max_min']:.1f}" in out and "wake latency 10 s" in out


@pytest.mark.timeout(180)
def test_a_wake_day_on_the_sim_agrees_with_the_replay() -> None:
    """coder-fim requested while coder-chat serves and a validate run takes the GPU: the wake waits for the GPU,
    then coder-fim comes up; later coder-chat is woken on a new node. The real cluster-autoscaler, kubelet and
    read_idleness against the replay of the same day (time scale 0.002, as the workday's other sim day)."""
    every = [at("09:10") + k * 4 * MINUTE for k in range(6)] + [at("11:00") + k * 4 * MINUTE for k in range(4)]
    trace = Trace(tuple(every), at("09:35"), at("09:50"), 120.0, at("12:30"), ((at("09:20"), FIM),))
    p = Policy("w", "w", at("09:00"), at("12:00"), True, 120.0, 15 * MINUTE, wake=True)
    model, sim = replay(p, trace, SCHED), sim_day(p, trace, 0.002, SCHED)
    late = 3 * MINUTE  # the sim's controllers and the driver's API calls take wall time, counted as simulated
    # delayed: fim's 09:20, and chat's 11:00, 11:04, 11:08 (chat Ready at 11:00 + the wake + a new node's start)
    assert at("11:08") < at("11:00") + WAKE_LATENCY_S + COLD_NEW_NODE < at("11:12")
    assert (sim.failed_requests, sim.delayed_requests) == (model.failed_requests, model.delayed_requests) == (0, 4)
    assert [w["model"] for w in sim.wakes] == [w["model"] for w in model.wakes] == [FIM, CHAT]
    assert len(sim.cold_starts) == len(model.cold_starts) == 2
    for a, b in zip(sim.cold_starts, model.cold_starts, strict=True):
        assert a["model"] == b["model"] and abs(a["wait_min"] - b["wait_min"]) * MINUTE <= late, (a, b)
    for a_s, b_s in zip(sorted(sim.delays_s), sorted(model.delays_s), strict=True):
        assert abs(a_s - b_s) <= late
    assert len(sim.nodes) == len(model.nodes) == 2, (sim.nodes, sim.events)


def test_react_s_never_leaves_the_reclaimed_model_down_until_the_next_schedule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nobody reacts: reclaim takes the morning's coder-chat before the first user, and no schedule comes again
    that day: every request of the short day fails; the wake rows do not depend on it."""
    res = workday(short_trace(), react_s=None)
    by = {r["policy"]: r for r in res["workday"] + res["workday_wake"]}
    assert by["reclaim_15"]["failed_requests"] == short_trace().n_requests
    assert by["reclaim_15"]["cold_starts"][0]["ready"] is None
    assert by["wake_15"]["failed_requests"] == 0
    assert "nobody brings the model back" in table(res)
    with pytest.raises(SystemExit):
        main(["--only", "workday", "--react-s", "soon", "--json", str(tmp_path / "o.json")])
    assert "--react-s: give 0 or more seconds, or 'never'" in capsys.readouterr().err


# ---- --only hook


def test_bench_only_hook_reports_what_hook_overhead_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The wiring only (the measurement itself starts two real proxies: BENCHMARKS.md)."""
    import coder_stack_dev.bench.hook as hook

    calls: list[int] = []

    async def hook_overhead(reps: int, log: Any) -> dict[str, float]:
        calls.append(reps)
        return {"p50_ms_without": 1.25, "p50_ms_with": 1.5, "p99_ms_without": 3.0, "p99_ms_with": 3.5}

    monkeypatch.setattr(hook, "hook_overhead", hook_overhead)
    monkeypatch.setattr(hook, "litellm_program", lambda: tmp_path / "litellm")
    out = tmp_path / "b.json"
    assert main(["--tiny", "--only", "hook", "--json", str(out)]) == 0
    assert calls == [50]
    res = json.loads(out.read_text())
    assert res["hook_overhead"]["p99_ms_with"] == 3.5 and "workday" not in res
    assert "hook: p50_ms_with" in capsys.readouterr().out


def test_bench_with_hook_but_no_litellm_proxy_says_so_before_running_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CODER_STACK_LITELLM", str(tmp_path / "no-such-litellm"))
    with pytest.raises(SystemExit) as e:
        main(["--only", "detect,hook", "--json", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no-such-litellm is missing: ./dev.sh test builds .venv-litellm" in err, err
    assert "--only detect" in err
    assert not (tmp_path / "o.json").exists()
