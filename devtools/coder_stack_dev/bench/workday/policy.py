"""The policies a day is run under: by hand, the schedules, the crash clean-up, idle reclaim."""

from __future__ import annotations

from dataclasses import dataclass

from coder_stack.spec import StackSpec
from coder_stack_dev.bench.workday.schedules import MINUTE, Schedules, at, hm


@dataclass(frozen=True)
class Policy:
    name: str
    label: str
    up_s: float  # coder-chat brought up (by hand, or the morning bring-up)
    down_s: float  # everything to 0 (by hand, or the evening teardown)
    flows: bool  # the day runs on the flows (GPU slot, reclaim) rather than by hand
    crash_cleanup_s: float | None = None  # None: no clean-up of a killed run
    idle_after_s: float | None = None  # None: no idle reclaim
    killed: bool = True  # False: the validate run finishes normally at kill_at (the leak's baseline)


def policies(
    s: Schedules, crash_cleanup_s: float = 120.0, idle_after_min: tuple[int, ...] = (15, 30, 60)
) -> list[Policy]:
    rows = [
        Policy("by_hand", "runbook by hand (up 09:00, down 18:00)", at("09:00"), at("18:00"), False),
        Policy("schedules", f"schedules (up {hm(s.bring_up_s)}, down {hm(s.teardown_s)})", s.bring_up_s,
               s.teardown_s, True),
        Policy("schedules_cleanup", "schedules + crash clean-up", s.bring_up_s, s.teardown_s, True, crash_cleanup_s),
    ]  # fmt: skip
    rows += [
        Policy(f"reclaim_{m}", f"schedules + clean-up + reclaim {m} min", s.bring_up_s, s.teardown_s, True,
               crash_cleanup_s, m * MINUTE)
        for m in idle_after_min
    ]  # fmt: skip
    # what reclaim alone does with the killed run (the spec's default idle_after_s), for comparison
    default = StackSpec().idle_after_s
    rows.append(Policy(f"reclaim_{default / MINUTE:.0f}_no_cleanup",
                       f"schedules + reclaim {default / MINUTE:.0f} min, no clean-up", s.bring_up_s, s.teardown_s,
                       True, None, default))  # fmt: skip
    return rows
