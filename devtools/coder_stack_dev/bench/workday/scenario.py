"""The workday scenario as the benchmark runs it: every policy's day replayed (and, on request, on the
simulated cluster), each beside the same day with the validate run finishing normally, priced."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from simstack.timings import Timings

from coder_stack.orchestration.gpu_limit import LEASE_SECONDS
from coder_stack.spec import STARTER_SHARES, GpuSharing, StackSpec
from coder_stack_dev.bench.workday.day import replay
from coder_stack_dev.bench.workday.policy import (
    TEAM_MODELS,
    WAKE_LATENCY_S,
    Policy,
    policies,
    team_policies,
    wake_policies,
)
from coder_stack_dev.bench.workday.result import WORKDAYS_PER_MONTH
from coder_stack_dev.bench.workday.schedules import MINUTE, hm, read_schedules
from coder_stack_dev.bench.workday.simday import sim_day
from coder_stack_dev.bench.workday.trace import Trace, team_trace, workday_trace

# ASSUMPTION: the on-demand hourly price of the sim's GPU node type (g2-standard-4: 1 NVIDIA L4, 4 vCPU,
# 16 GB) in us-central1, from Google Cloud's "VM instance pricing" page (accelerator-optimized G2) as of
# 2026; no discounts, no CPU nodes, disks or control plane. Override with --workday-price.
NODE_PRICE_PER_HOUR = 0.7068
NODE_PRICE_SOURCE = "GCP g2-standard-4 (1 x L4) on-demand, us-central1, Compute Engine VM instance pricing"

# ASSUMPTION: the team day's time-sliced L4 (24 GB, 2 replicas) and each model's share of it
# (--gpu-memory-utilization): coder-chat 0.55 (13.2 GB for 5.5 GB of weights), coder-fim 0.35 (8.4 GB for
# 3.1 GB), 21.6 of 24 GB; StackSpec.shares_fit checks it (the spec's 0.9 each would not fit)
TEAM_SHARES = {
    "coder-chat": STARTER_SHARES["chat"],
    "coder-fim": STARTER_SHARES["fim"],
}  # what `spec --time-sliced` prints


def team_spec(shares: dict[str, float] | None = None) -> StackSpec:
    """The default spec on a time-sliced GPU with ``shares`` (default :data:`TEAM_SHARES`) as the models'
    gpu_memory_utilization."""
    base = StackSpec()
    shares = TEAM_SHARES if shares is None else shares
    models = [m.model_copy(update={"gpu_memory_utilization": shares.get(m.name, m.gpu_memory_utilization)})
              for m in base.models]  # fmt: skip
    return base.model_copy(update={"models": models, "gpu_sharing": GpuSharing(mode="time-sliced")})


def team_workday(
    trace: Trace | None = None, *, crash_cleanup_s: float = 120.0, price: float = NODE_PRICE_PER_HOUR,
    timings: Timings | None = None, wake_latency_s: float = WAKE_LATENCY_S, spec: StackSpec | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """The team's day (chat and completion, :func:`team_trace`) under :func:`team_policies`: exclusive and
    shared, on ``spec`` (default :func:`team_spec`). Replay only: the flows that would share the GPU are not
    built yet (issue 20), so there is no sim column. A shared row whose models do not fit (shares_fit) raises
    :class:`SharingRefused`."""
    trace = trace or team_trace()
    spec = spec or team_spec()
    sched = read_schedules()
    rows = []
    for p in team_policies(sched, crash_cleanup_s, wake_latency_s):
        d = replay(p, trace, sched, timings=timings, spec=spec).as_dict(price)
        d["gpu"] = (
            f"time-sliced: {spec.shares_fit(list(TEAM_MODELS)).summary()}" if p.shared else "exclusive: one model"
        )
        rows.append(d)
    return rows


def workday(
    trace: Trace | None = None,
    *,
    crash_cleanup_s: float = 120.0,
    price: float = NODE_PRICE_PER_HOUR,
    timings: Timings | None = None,
    sim_scale: float | None = None,
    log: Callable[[str], None] | None = None,
    wake_latency_s: float = WAKE_LATENCY_S,
    trace_source: str | None = None,
    react_s: float | None = 0.0,
    team: Trace | None = None,
    team_source: str | None = None,
) -> dict[str, Any]:
    """Every policy's day on the trace, and each one's day with the validate run finishing normally; with
    ``sim_scale``, each policy's day also on the simulated cluster (:class:`SimDay`; 0.004: ~3 min each)."""
    trace = trace or workday_trace()
    sched = read_schedules()

    def run(p: Policy) -> dict[str, Any]:
        res = replay(p, trace, sched, timings=timings)
        base = replay(replace(p, killed=False), trace, sched, timings=timings)
        d = res.as_dict(price)
        d["killed"]["extra_node_min_vs_normal_end"] = round((res.node_seconds - base.node_seconds) / MINUTE, 1)
        d["killed"]["extra_cost_per_day_vs_normal_end"] = round((res.node_hours - base.node_hours) * price, 2)
        if sim_scale is not None:
            t0 = time.monotonic()
            on_sim = sim_day(p, trace, sim_scale, sched).as_dict(price)
            on_sim["wall_s"] = round(time.monotonic() - t0, 1)
            d["sim"] = on_sim
            if log is not None:
                log(
                    f"  {p.name}: replay {d['node_hours']:.2f} node-h, wait {d['wait_min']:.1f} min; on the sim "
                    f"{on_sim['node_hours']:.2f} node-h, wait {on_sim['wait_min']:.1f} min ({on_sim['wall_s']:.0f} s)"
                )
        return d

    rows = [run(replace(p, react_s=react_s)) for p in policies(sched, crash_cleanup_s)]
    wake_rows = [run(p) for p in wake_policies(sched, crash_cleanup_s, wake_latency_s=wake_latency_s)]
    return {
        "workday": rows,
        "workday_wake": wake_rows,  # the wake policy's rows (issue 19), printed in the same table
        # a team using chat and completion all day, exclusive and shared (issue 20): its own trace, replay only
        "workday_team": team_workday(
            team, crash_cleanup_s=crash_cleanup_s, price=price, timings=timings, wake_latency_s=wake_latency_s
        ),
        "workday_assumptions": {
            "node_price_per_hour": price,
            "node_price_source": f"ASSUMPTION: {NODE_PRICE_SOURCE}",
            "workdays_per_month": WORKDAYS_PER_MONTH,
            "crash_cleanup_s": crash_cleanup_s,
            "crash_cleanup_note": "the clean-up's bound (kill -> models at 0, slot freed), not a measurement",
            "lease_s": LEASE_SECONDS,
            "schedules": {
                k: hm(v) if k != "reclaim_every_s" else f"every {v / MINUTE:.0f} min" for k, v in asdict(sched).items()
            },
            "timings": asdict(timings or Timings()),
            "requests": trace.n_requests,
            "requests_by_model": trace.by_model(),
            "sim_days_time_scale": sim_scale,
            "trace": f"{trace_source or 'built-in day'}: {hm(trace.first)}-{hm(trace.last)}, "
            + (f"killed run {hm(trace.killed_start)}-{hm(trace.kill_at)}" if trace.killed_run else "no killed run"),
            "wake_latency_s": wake_latency_s,
            "team_trace": f"{team_source or 'built-in team day'}: "
            + ", ".join(f"{m} {n}" for m, n in (team or team_trace()).by_model().items())
            + " requests; a model of the day: the flows that would share the GPU are not built yet (issue 20)",
            "wake_latency_note": "event -> trigger -> worker -> flow start: Prefect's process worker polls every "
            "10 s, trigger to Running measured 6-9 s; taken as one poll interval unless given",
            "react_s": react_s,
            "no_wake_note": "a request to a model not serving fails; "
            + (
                "nobody brings the model back: it is down until a schedule brings it up"
                if react_s is None
                else f"a person brings it back {react_s:.0f} s after the first failure"
                + (" (no reaction time: a lower bound on the outage)" if not react_s else "")
            ),
        },
    }
