"""The workday scenario's replay (devtools/coder_stack_dev/bench/workday/): what each policy bills and makes
users wait; the package's modules import one way; the dev tools find their checkout once.

Every expectation below is derived from the inputs (the trace, prefect.yaml's schedules, the sim's Timings, the
lease) rather than copied from a run.
"""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import coder_stack_dev.bench.workday as workday_pkg
import pytest
from coder_stack_dev import CHECKOUT, find_checkout
from coder_stack_dev.bench.workday import (
    AGENT,
    CHAT,
    HOUR,
    MINUTE,
    PREFECT_YAML,
    Policy,
    Result,
    Schedules,
    Trace,
    at,
    hm,
    policies,
    read_schedules,
    replay,
    short_trace,
    table,
    workday,
    workday_trace,
)
from simstack.timings import Timings, model_timings

from coder_stack.orchestration.gpu_limit import LEASE_SECONDS
from coder_stack.spec import StackSpec

T = Timings()
SCHED = read_schedules()
CHAT_START = model_timings(StackSpec().model(CHAT)).server_start_s
COLD_NEW_NODE = T.node_provision_s + T.gpu_image_pull_s + T.weights_cached_s + CHAT_START
DRAIN = T.termination_s + T.scale_down_unneeded_s


def rows(trace: Trace) -> dict[str, Result]:
    return {p.name: replay(p, trace, SCHED) for p in policies(SCHED)}


def test_schedules_come_from_prefect_yaml() -> None:
    assert Schedules(bring_up_s=at("07:00"), teardown_s=at("19:00"), reclaim_every_s=5 * MINUTE) == SCHED


@pytest.mark.parametrize("trace", [workday_trace(), short_trace()], ids=["workday", "short"])
def test_shorter_idle_after_bills_fewer_node_hours(trace: Trace) -> None:
    r = rows(trace)
    assert r["reclaim_15"].node_seconds < r["reclaim_60"].node_seconds < r["schedules_cleanup"].node_seconds
    assert r["schedules_cleanup"].node_seconds <= r["schedules"].node_seconds
    # ... and it is paid for in cold starts
    assert r["reclaim_15"].wait_s >= r["reclaim_60"].wait_s > r["schedules"].wait_s


def test_by_hand_bills_from_nine_to_six_plus_the_drain() -> None:
    r = rows(workday_trace())["by_hand"]
    assert r.node_seconds == pytest.approx(at("18:00") + DRAIN - at("09:00"))
    assert [n["billed_from"] for n in r.nodes] == ["09:00"]
    # the 09:00 request waits for the whole cold start of a new node
    assert r.cold_starts[0]["request"] == "09:00"
    assert r.cold_starts[0]["wait_min"] == pytest.approx(COLD_NEW_NODE / MINUTE, abs=0.01)


def test_schedules_bill_from_the_bring_up_to_the_teardown_plus_the_drain() -> None:
    r = rows(workday_trace())["schedules"]
    assert r.node_seconds == pytest.approx(SCHED.teardown_s + DRAIN - SCHED.bring_up_s)
    assert all(c["request"] != "09:00" for c in r.cold_starts)  # up since the morning


@pytest.mark.parametrize("cleanup_s", [60.0, 120.0])
def test_the_killed_runs_leak_with_and_without_crash_cleanup(cleanup_s: float) -> None:
    """Reclaim on, nobody uses the GPU for a while after the kill: without the clean-up the killed run's
    coder-agent serves until reclaim finds it idle (not before its slot's lease expired: a held slot makes
    reclaim change nothing); with it, until kill + crash_cleanup_s. The node bills the difference."""
    trace = short_trace()
    idle = 15 * MINUTE
    base = Policy("r", "r", SCHED.bring_up_s, SCHED.teardown_s, True, None, idle)
    without = replay(base, trace, SCHED)
    with_ = replay(replace(base, crash_cleanup_s=cleanup_s), trace, SCHED)
    stop_without = at(without.killed["agent_until"])
    assert without.killed["agent_stopped_by"] == "reclaim_idle_models"
    assert with_.killed["agent_stopped_by"] == "crash clean-up"
    assert at(with_.killed["agent_until"]) == trace.kill_at + cleanup_s  # on a minute here
    # reclaim: on a tick, after the lease, after idle_after of unchanged counters
    assert stop_without % SCHED.reclaim_every_s < 1
    assert stop_without >= trace.kill_at + LEASE_SECONDS + idle
    assert without.killed["slot_free_at"] == hm(trace.kill_at + LEASE_SECONDS)
    leak = stop_without - (trace.kill_at + cleanup_s)
    assert without.node_seconds - with_.node_seconds == pytest.approx(leak, abs=1)
    assert leak > 0


def test_without_reclaim_or_cleanup_the_killed_run_serves_until_someone_needs_the_gpu() -> None:
    """Schedules only: coder-agent keeps the GPU until the next user's `coder-stack up` swaps it out, which
    first waits for the killed run's slot lease."""
    trace = workday_trace()
    r = rows(trace)["schedules"]
    back = min(q for q in trace.requests if q > trace.kill_at)
    assert r.killed["agent_stopped_by"] == "coder-stack up frees the GPU" and at(r.killed["agent_until"]) == back
    assert r.killed["slot_free_at"] == hm(trace.kill_at + LEASE_SECONDS)
    # a request before the lease expired would have waited for it
    early = replace(trace, requests=tuple(sorted({*trace.requests, trace.kill_at + 60})))
    e = replay(policies(SCHED)[1], early, SCHED)
    first = next(c for c in e.cold_starts if c["request"] == hm(trace.kill_at + 60))
    warm = T.termination_s + T.weights_cached_s + CHAT_START
    assert first["wait_min"] * MINUTE == pytest.approx(LEASE_SECONDS - 60 + warm, abs=1)


def test_cold_start_wait_when_reclaim_took_the_model_away() -> None:
    trace = workday_trace()
    r = rows(trace)["reclaim_15"]
    reclaimed = [at(x["at"]) for x in r.reclaims if x["model"] == CHAT]
    assert reclaimed, r.events
    waited = [c for c in r.cold_starts if any(t < at(c["request"]) for t in reclaimed)]
    assert waited and all(c["wait_min"] > 0 for c in waited)
    # each wait is a cold start on a new node or a warm start on the node still draining
    warm = T.weights_cached_s + CHAT_START
    for c in r.cold_starts:
        assert c["wait_min"] * MINUTE == pytest.approx(COLD_NEW_NODE, abs=1) or c["wait_min"] * MINUTE == pytest.approx(
            warm, abs=1
        ), c


def test_reclaim_never_takes_a_model_younger_than_the_grace_or_while_the_slot_is_held() -> None:
    spec = StackSpec()
    trace = workday_trace()
    for idle_min in (15, 30, 60):
        r = replay(policies(SCHED, idle_after_min=(idle_min,))[3], trace, SCHED)
        ready = {}
        for t, what in r.events:
            if what.endswith(" Ready") and not what.startswith("GPU node"):
                ready[what.split()[0]] = t
            if what.startswith("reclaim: "):
                model = what.split()[1]
                assert t - ready[model] >= spec.idle_grace_s, (idle_min, hm(t), what)
                assert not (trace.killed_start <= t < trace.kill_at + 120), (idle_min, hm(t))


def test_no_reclaim_means_no_reclaim_and_the_table_prints_every_policy() -> None:
    res = workday(short_trace())
    by = {r["policy"]: r for r in res["workday"]}
    assert not by["schedules"]["reclaims"] and not by["by_hand"]["reclaims"]
    assert by["reclaim_30_no_cleanup"]["killed"]["agent_stopped_by"] == "reclaim_idle_models"
    for r in res["workday"]:
        assert r["cost_per_month"] == pytest.approx(r["node_hours"] * 0.7068 * 21, abs=0.05)
        assert r["killed"]["agent_serving_at_kill"] is True
    out = table(res)
    for r in res["workday"]:
        assert r["label"] in out and f"{r['node_hours']:.2f}" in out
    assert "ASSUMPTION" in out and "crash clean-up bound 120 s" in out


def test_a_normal_end_restores_chat_and_frees_the_slot() -> None:
    trace = workday_trace()
    p = replace(policies(SCHED)[1], killed=False)
    r = replay(p, trace, SCHED)
    assert "agent_until" in r.killed and r.killed["agent_stopped_by"] == "validate finishes"
    assert r.killed["slot_free_at"] > hm(trace.kill_at) and r.node_seconds == pytest.approx(
        SCHED.teardown_s + DRAIN - SCHED.bring_up_s
    )
    assert not r.cold_starts  # chat back before the users: nobody waits
    assert HOUR > 0 and AGENT in {w.split()[0] for _, w in r.events}


# the workday package's modules, each importing only those before it (the docstring of its __init__ says so)
LAYERS = ("schedules", "trace", "policy", "result", "day", "simday", "check", "scenario", "report")


def test_the_workday_modules_import_one_way() -> None:
    folder = Path(workday_pkg.__file__).parent
    assert {p.stem for p in folder.glob("*.py")} == {"__init__", *LAYERS}  # a new module gets a place here
    for i, name in enumerate(LAYERS):
        tree = ast.parse((folder / f"{name}.py").read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        used = {m.split(".")[3] for m in names if m.startswith("coder_stack_dev.bench.workday.")}
        assert used <= set(LAYERS[:i]), (name, sorted(used - set(LAYERS[:i])))
    # no module is shadowed by a function of the same name that the package exports
    assert not set(LAYERS) & set(workday_pkg.__all__)


def test_the_dev_tools_find_prefect_yaml_in_their_checkout(tmp_path: Path) -> None:
    assert PREFECT_YAML == CHECKOUT / "prefect.yaml" and PREFECT_YAML.is_file()
    assert (CHECKOUT / "devtools" / "coder_stack_dev" / "__init__.py").is_file()
    installed = tmp_path / "site-packages" / "coder_stack_dev" / "__init__.py"  # not in place in a checkout
    with pytest.raises(RuntimeError, match=r"has no prefect.yaml.*pip install -e ./devtools"):
        find_checkout(installed)
    (tmp_path / "prefect.yaml").write_text("deployments: []\n")
    assert find_checkout(installed) == tmp_path
