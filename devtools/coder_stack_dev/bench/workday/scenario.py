"""The workday scenario as the benchmark runs it: every policy's day replayed (and, on request, on the
simulated cluster), each beside the same day with the validate run finishing normally, priced."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from simstack.timings import Timings

from coder_stack.orchestration.gpu import LEASE_SECONDS
from coder_stack_dev.bench.workday.day import replay
from coder_stack_dev.bench.workday.policy import WAKE_LATENCY_S, Policy, policies, wake_policies
from coder_stack_dev.bench.workday.result import WORKDAYS_PER_MONTH
from coder_stack_dev.bench.workday.schedules import MINUTE, hm, read_schedules
from coder_stack_dev.bench.workday.simday import sim_day
from coder_stack_dev.bench.workday.trace import Trace, workday_trace

# ASSUMPTION: the on-demand hourly price of the sim's GPU node type (g2-standard-4: 1 NVIDIA L4, 4 vCPU,
# 16 GB) in us-central1, from Google Cloud's "VM instance pricing" page (accelerator-optimized G2) as of
# 2026; no discounts, no CPU nodes, disks or control plane. Override with --workday-price.
NODE_PRICE_PER_HOUR = 0.7068
NODE_PRICE_SOURCE = "GCP g2-standard-4 (1 x L4) on-demand, us-central1, Compute Engine VM instance pricing"


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
