"""The workday's trace: users' requests to coder-chat and the validate run killed while it held the GPU."""

from __future__ import annotations

from dataclasses import dataclass

from coder_stack_dev.bench.workday.schedules import MINUTE, at


@dataclass(frozen=True)
class Trace:
    """One workday: users' requests to coder-chat, and one validate run killed while it held the GPU."""

    requests: tuple[float, ...]  # seconds since midnight, each one request to coder-chat
    killed_start: float  # the validate run (take_over) starts: frees coder-chat, brings coder-agent up
    kill_at: float  # ... and is killed here, coder-agent serving, the GPU slot held
    killed_calls_every_s: float  # its agent stage calls coder-agent this often from Ready until the kill
    end: float  # the replay stops (after the last node could have drained)

    @property
    def first(self) -> float:
        return min(self.requests)


def _every(start: str, end: str, step_min: float) -> list[float]:
    t, stop, out = at(start), at(end), []
    while t <= stop:
        out.append(t)
        t += step_min * MINUTE
    return out


def workday_trace() -> Trace:
    """09:00-09:36 every 4 min; a meeting (the validate runs 09:40, killed 10:00); 10:40-10:56; a 24-min gap;
    11:20-11:56; lunch 12:00-13:30; 13:30-14:58; a 47-min gap; 15:45-17:29. 75 requests."""
    reqs = (
        _every("09:00", "09:36", 4)
        + _every("10:40", "10:56", 4)
        + _every("11:20", "11:56", 4)
        + _every("13:30", "14:58", 4)
        + _every("15:45", "17:29", 4)
    )
    return Trace(tuple(reqs), at("09:40"), at("10:00"), 120.0, at("19:30"))


def short_trace() -> Trace:
    """The tests' trace: 09:00-09:20 every 4 min, the killed run 09:30-09:50, 10:30-10:42, 11:40-12:00."""
    reqs = _every("09:00", "09:20", 4) + _every("10:30", "10:42", 4) + _every("11:40", "12:00", 4)
    return Trace(tuple(reqs), at("09:30"), at("09:50"), 120.0, at("19:30"))
