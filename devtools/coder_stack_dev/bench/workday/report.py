"""The workday's table, printed by the benchmark from its results (``workday``, ``workday_sim_check``)."""

from __future__ import annotations

from typing import Any


def table(res: dict[str, Any]) -> str:
    rows = res.get("workday") or []
    if not rows:
        return ""
    a = res["workday_assumptions"]
    sims = all("sim" in r for r in rows)
    out = [
        f"workday: {a['trace']}, {a['requests']} requests to coder-chat; node price ${a['node_price_per_hour']:.4f}/h "
        f"({a['node_price_source']}); month = {a['workdays_per_month']} workdays; crash clean-up bound "
        f"{a['crash_cleanup_s']:.0f} s",
        "",
        f"{'policy':<42} {'node h':>7} {'wait min':>8} {'cold':>4} {'$/day':>7} {'$/month':>8}"
        + (f" {'sim node h':>10} {'sim wait':>8}" if sims else "")
        + "  killed run's coder-agent after the kill",
    ]
    for r in rows:
        k = r["killed"]
        left = f"{k.get('agent_min_after_kill', float('nan')):.0f} min, to {k.get('agent_until', '?')} "
        left += f"({k.get('agent_stopped_by', '')}); slot free {k['slot_free_at']}"
        out.append(
            f"{r['label']:<42} {r['node_hours']:>7.2f} {r['wait_min']:>8.1f} {len(r['cold_starts']):>4} "
            f"{r['cost_per_day']:>7.2f} {r['cost_per_month']:>8.2f}"
            + (f" {r['sim']['node_hours']:>10.2f} {r['sim']['wait_min']:>8.1f}" if sims else "")
            + f"  {left}"
        )
    chk = res.get("workday_sim_check")
    if chk:
        out += ["", f"sim check (SimStack, time scale {chk['time_scale']}): measured vs replay, simulated s"]
        for key, v in chk["measured_s"].items():
            out.append(f"  {key:<34} {v:>7.1f} vs {chk['modelled_s'][key]:>7.1f}  (x{chk['ratio'][key]:.3f})")
    return "\n".join(out)
