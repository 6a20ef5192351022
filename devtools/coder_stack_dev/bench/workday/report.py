"""The workday's table, printed by the benchmark from its results (``workday``, ``workday_sim_check``)."""

from __future__ import annotations

from typing import Any


def table(res: dict[str, Any]) -> str:
    rows = (res.get("workday") or []) + (res.get("workday_wake") or [])
    if not rows:
        return ""
    a = res["workday_assumptions"]
    sims = any("sim" in r for r in rows)
    by_model = ", ".join(f"{m} {n}" for m, n in (a.get("requests_by_model") or {}).items())
    out = [
        f"workday: {a['trace']}; {a['requests']} requests ({by_model}); node price ${a['node_price_per_hour']:.4f}/h "
        f"({a['node_price_source']}); month = {a['workdays_per_month']} workdays; crash clean-up bound "
        f"{a['crash_cleanup_s']:.0f} s; wake latency {a.get('wake_latency_s', 0):.0f} s",
        "no model: minutes from the first request that found its model not serving to Ready or the replay's end "
        "(summed over the outages); failed: "
        "requests answered with an error (no wake); delayed: requests that waited out a wake (p50/max wait, min)",
        f"without wake: {a.get('no_wake_note', '')}",
        "",
        f"{'policy':<46} {'node h':>7} {'no model':>8} {'outages':>7} {'failed':>6} {'delayed':>7} {'p50/max':>11} "
        f"{'$/day':>7} {'$/month':>8}"
        + (f" {'sim node h':>10} {'sim wait':>8}" if sims else "")
        + "  killed run's coder-agent after the kill",
    ]
    for r in rows:
        k = r["killed"]
        if "agent_min_after_kill" in k or k.get("slot_free_at") != "no killed run":
            left = f"{k.get('agent_min_after_kill', float('nan')):.0f} min, to {k.get('agent_until', '?')} "
            left += f"({k.get('agent_stopped_by', '')}); slot free {k['slot_free_at']}"
        else:
            left = "(no killed run)"
        waits = f"{r['delay_p50_min']:.1f}/{r['delay_max_min']:.1f}" if r.get("delayed_requests") else "-"
        sim = r.get("sim")
        sim_cols = (
            (f" {sim['node_hours']:>10.2f} {sim['wait_min']:>8.1f}" if sim else f" {'-':>10} {'-':>8}") if sims else ""
        )
        out.append(
            f"{r['label']:<46} {r['node_hours']:>7.2f} {r['wait_min']:>8.1f} {len(r['cold_starts']):>7} "
            f"{r.get('failed_requests', 0):>6} {r.get('delayed_requests', 0):>7} {waits:>11} "
            f"{r['cost_per_day']:>7.2f} {r['cost_per_month']:>8.2f}" + sim_cols + f"  {left}"
        )
    team = res.get("workday_team") or []
    if team:
        models = list(team[0]["failed_by_model"])
        out += [
            "",
            f"chat and completion all day ({a.get('team_trace', '')}); per model: failed, delayed, wait p50/max min",
            f"{'policy':<46} {'node h':>7} "
            + " ".join(f"{m + ' f/d':>14} {'p50/max':>11}" for m in models)
            + f" {'$/day':>7} {'$/month':>8}",
        ]
        for r in team:
            cols = []
            for m in models:
                pm = r["delay_by_model_p50_max_min"].get(m)
                cols.append(
                    f"{r['failed_by_model'][m]:>6}/{r['delayed_by_model'][m]:<7} "
                    + f"{(f'{pm[0]:.1f}/{pm[1]:.1f}' if pm else '-'):>11}"
                )
            out.append(
                f"{r['label']:<46} {r['node_hours']:>7.2f} "
                + " ".join(cols)
                + f" {r['cost_per_day']:>7.2f} {r['cost_per_month']:>8.2f}  {r['gpu']}"
            )
    chk = res.get("workday_sim_check")
    if chk:
        out += ["", f"sim check (SimStack, time scale {chk['time_scale']}): measured vs replay, simulated s"]
        for key, v in chk["measured_s"].items():
            out.append(f"  {key:<34} {v:>7.1f} vs {chk['modelled_s'][key]:>7.1f}  (x{chk['ratio'][key]:.3f})")
    return "\n".join(out)
