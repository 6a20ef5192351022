"""The policies a day is run under: by hand, the schedules, the crash clean-up, idle reclaim, wake on demand."""

from __future__ import annotations

from dataclasses import dataclass

from coder_stack.spec import StackSpec
from coder_stack_dev.bench.workday.schedules import MINUTE, Schedules, at, hm

# What a wake adds to the cold start: the hook's event -> the deployment trigger -> a process worker picks the
# flow run up -> the flow scales the model. Prefect 3 measured here: trigger to Running 6-9 s with a process
# worker polling every 10 s (PREFECT_WORKER_QUERY_SECONDS); taken as one poll interval, 10 s. The flow's own
# API calls are 0, as every flow's in the replay. Override with --wake-latency-s.
WAKE_LATENCY_S = 10.0
NO_SCHEDULE = float("inf")  # a policy's up_s / down_s that never comes


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
    # without wake, a request for a model that is not serving fails; this long after the first failure a person
    # brings it back (by hand: kubectl; with the flows: coder-stack up). 0: at once (a lower bound on the
    # outage); None: nobody does, the model is down until a schedule brings it up
    react_s: float | None = 0.0
    wake: bool = False  # wake on demand: the request waits out the wake and the cold start instead of failing
    wake_latency_s: float = WAKE_LATENCY_S  # event -> trigger -> worker -> flow start
    # the models the morning bring-up brings (today: coder-chat; with a time-sliced GPU: every default model)
    morning: tuple[str, ...] = ("coder-chat",)
    # time-sliced (issue 20): models whose gpu_memory_utilization shares fit one GPU together (the spec's
    # shares_fit) run on it at once, started one after another; False: exclusive, one model per GPU (today)
    shared: bool = False


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


def wake_policies(
    s: Schedules, crash_cleanup_s: float = 120.0, idle_after_min: tuple[int, ...] = (15, 30, 60),
    wake_latency_s: float = WAKE_LATENCY_S,
) -> list[Policy]:  # fmt: skip
    """Wake on demand (issue 19): the reclaim rows of :func:`policies`, and a request for a model that is down
    wakes it instead of failing; last, the spec's default idle_after_s without the morning bring-up and the
    evening teardown (with wake nothing needs them)."""
    rows = [
        Policy(f"wake_{m}", f"schedules + clean-up + reclaim {m} min + wake", s.bring_up_s, s.teardown_s, True,
               crash_cleanup_s, m * MINUTE, wake=True, wake_latency_s=wake_latency_s)
        for m in idle_after_min
    ]  # fmt: skip
    default = StackSpec().idle_after_s
    rows.append(Policy(f"wake_{default / MINUTE:.0f}_no_schedules",
                       f"clean-up + reclaim {default / MINUTE:.0f} min + wake, no schedules", NO_SCHEDULE, NO_SCHEDULE,
                       True, crash_cleanup_s, default, wake=True, wake_latency_s=wake_latency_s))  # fmt: skip
    return rows


TEAM_MODELS = ("coder-chat", "coder-fim")


def team_policies(s: Schedules, crash_cleanup_s: float = 120.0, wake_latency_s: float = WAKE_LATENCY_S) -> list[Policy]:
    """A team using chat and completion all day (issue 20), both rows with the schedules, the clean-up, reclaim
    at the spec's default idle_after_s and wake: exclusive (today's rules: the morning bring-up brings
    coder-chat; a wake never evicts a model in use, so the other model waits until reclaim takes it away) and
    shared (chat and FIM time-sliced on one GPU: the bring-up brings both, a wake starts beside the other)."""
    default = StackSpec().idle_after_s
    m = f"{default / MINUTE:.0f}"
    return [
        Policy("team_exclusive", f"chat+FIM, exclusive GPU, reclaim {m} min + wake", s.bring_up_s, s.teardown_s,
               True, crash_cleanup_s, default, wake=True, wake_latency_s=wake_latency_s),
        Policy("team_shared", f"chat+FIM, time-sliced GPU, reclaim {m} min + wake", s.bring_up_s, s.teardown_s,
               True, crash_cleanup_s, default, wake=True, wake_latency_s=wake_latency_s, morning=TEAM_MODELS,
               shared=True),
    ]  # fmt: skip
