"""The workday's trace: users' requests to the models and the validate run killed while it held the GPU; the
built-in days, and a day read from a trace file (``--trace FILE``, :func:`read_trace`).

The trace file is CSV, one event a line, ``time,model,kind``; blank lines and lines starting with ``#`` are
skipped, and so is the header ``time,model,kind`` before the first event:

- ``time``: the clock of the day, ``HH:MM`` or ``HH:MM:SS`` (the simulated day starts at 00:00);
- ``kind`` ``request``: one request to ``model`` (an alias of the stack's models: coder-chat, coder-fim, ...);
- ``kind`` ``validate-start`` (``model`` coder-agent): a validate run (take_over, agent stage) starts: it frees
  the GPU of coder-chat, brings coder-agent up and calls it every 2 min; ``validate-kill``: it is killed there
  (SIGKILL) with coder-agent serving and the GPU slot held. Both or neither; at most one of each;
- ``kind`` ``end`` (``model`` empty): the replay stops (after the last node could have drained); without it,
  at 19:30 or 30 min after the last event, whichever is later.

``workday.trace.csv`` beside this module is :func:`workday_trace` written out in this format;
``team.trace.csv`` is :func:`team_trace` (a team using chat and completion all day, issue 20).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from coder_stack_dev.bench.workday.schedules import MINUTE, at, hm

CHAT_ALIAS = "coder-chat"
AGENT_ALIAS = "coder-agent"
KILLED_CALLS_EVERY_S = 120.0
DEFAULT_END = "19:30"
WORKDAY_TRACE_FILE = Path(__file__).with_name("workday.trace.csv")
TEAM_TRACE_FILE = Path(__file__).with_name("team.trace.csv")
FIM_ALIAS = "coder-fim"
# the team's day (team_trace): when people work, how often Tabby's completions come and how often someone chats
TEAM_WORK = (("09:00", "12:00"), ("13:00", "17:30"))
TEAM_FIM_BURST_EVERY_MIN = 4  # a burst of completions every 4 min while people type
TEAM_FIM_BURST = (0, 15, 30, 45)  # ... 4 requests, seconds into the burst (Tabby asks at each pause in typing)
TEAM_CHAT_GAPS_MIN = (10, 15, 20, 15)  # a chat message every 10-20 min, cycling
KINDS = ("request", "validate-start", "validate-kill", "end")


@dataclass(frozen=True)
class Trace:
    """One workday: users' requests, and (optionally) one validate run killed while it held the GPU."""

    requests: tuple[float, ...]  # seconds since midnight, each one request to coder-chat
    killed_start: float  # the validate run (take_over) starts: frees coder-chat, brings coder-agent up
    kill_at: float  # ... and is killed here, coder-agent serving, the GPU slot held
    killed_calls_every_s: float  # its agent stage calls coder-agent this often from Ready until the kill
    end: float  # the replay stops (after the last node could have drained)
    other_requests: tuple[tuple[float, str], ...] = ()  # (time, model): requests to models other than coder-chat
    killed_run: bool = True  # False: no validate run that day (killed_start and kill_at are not used)

    @property
    def all_requests(self) -> list[tuple[float, str]]:
        """Every request, (time, model), in time order."""
        return sorted([(t, CHAT_ALIAS) for t in self.requests] + list(self.other_requests))

    @property
    def n_requests(self) -> int:
        return len(self.requests) + len(self.other_requests)

    @property
    def first(self) -> float:
        return min(t for t, _ in self.all_requests) if self.n_requests else self.end

    @property
    def last(self) -> float:
        return max(t for t, _ in self.all_requests) if self.n_requests else self.end

    def by_model(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, m in self.all_requests:
            out[m] = out.get(m, 0) + 1
        return out


class TraceError(ValueError):
    """A trace file that cannot be read: the message names the file, the line and what to write instead."""


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
    return Trace(tuple(reqs), at("09:40"), at("10:00"), KILLED_CALLS_EVERY_S, at(DEFAULT_END))


def short_trace() -> Trace:
    """The tests' trace: 09:00-09:20 every 4 min, the killed run 09:30-09:50, 10:30-10:42, 11:40-12:00."""
    reqs = _every("09:00", "09:20", 4) + _every("10:30", "10:42", 4) + _every("11:40", "12:00", 4)
    return Trace(tuple(reqs), at("09:30"), at("09:50"), KILLED_CALLS_EVERY_S, at(DEFAULT_END))


def team_trace() -> Trace:
    """A team using chat and completion all day, no validate run: 09:00-12:00 and 13:00-17:30 (lunch 12-13),
    a burst of 4 FIM requests (15 s apart) every 4 min from a minute into each stretch, and a chat request at
    its start and then every 10, 15, 20, 15, ... min. The numbers are a model, not a measurement: Tabby asks
    for a completion at each pause in typing, so while people work the FIM requests come in bursts minutes
    apart; chat is asked now and then."""
    chat: list[float] = []
    fim: list[tuple[float, str]] = []
    for start, stop in TEAM_WORK:
        t, k = at(start), 0
        while t < at(stop):
            chat.append(t)
            t += TEAM_CHAT_GAPS_MIN[k % len(TEAM_CHAT_GAPS_MIN)] * MINUTE
            k += 1
        b = at(start) + MINUTE
        while b < at(stop):
            fim += [(b + s, FIM_ALIAS) for s in TEAM_FIM_BURST]
            b += TEAM_FIM_BURST_EVERY_MIN * MINUTE
    end = at(DEFAULT_END)
    return Trace(tuple(chat), end, end, KILLED_CALLS_EVERY_S, end, tuple(sorted(fim)), killed_run=False)


def _clock(text: str) -> float:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
        raise ValueError(f"time {text!r} is not HH:MM or HH:MM:SS")
    h, m, s = (int(p) for p in [*parts, "0"][:3])
    if h > 23 or m > 59 or s > 59:
        raise ValueError(f"time {text!r} is not a clock time of one day (00:00-23:59:59)")
    return h * 3600.0 + m * 60.0 + s


def parse_trace(lines: Iterable[str], models: Iterable[str], source: str = "trace") -> Trace:
    """A :class:`Trace` from the lines of a trace file (format: this module's docstring); ``models``: the
    aliases a request may name. A bad line raises :class:`TraceError` naming ``source`` and the line."""
    known = list(models)
    chat: list[float] = []
    others: list[tuple[float, str]] = []
    seen: dict[str, tuple[float, int]] = {}
    last = 0.0
    header_seen = False
    for n, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not header_seen and line.replace(" ", "") == "time,model,kind":
            header_seen = True
            continue
        header_seen = True
        where = f"{source} line {n} ({line!r})"
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 3:
            raise TraceError(f"{where}: expected 3 comma-separated fields time,model,kind, got {len(cells)}")
        clock, model, kind = cells
        try:
            t = _clock(clock)
        except ValueError as e:
            raise TraceError(f"{where}: {e}") from None
        if kind not in KINDS:
            raise TraceError(f"{where}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        if kind == "request":
            if model not in known:
                raise TraceError(f"{where}: unknown model {model!r}; a request names one of {', '.join(known)}")
            if model == CHAT_ALIAS:
                chat.append(t)
            else:
                others.append((t, model))
        else:
            if kind in seen:
                raise TraceError(f"{where}: a second {kind!r} line (the first is line {seen[kind][1]}); give one")
            want = "" if kind == "end" else AGENT_ALIAS
            if model not in (want, "") or (kind == "validate-start" and model != AGENT_ALIAS):
                raise TraceError(f"{where}: a {kind!r} line names model {want or '(empty)'!s}, not {model!r}")
            seen[kind] = (t, n)
        last = max(last, t)
    start, kill = seen.get("validate-start"), seen.get("validate-kill")
    if (start is None) != (kill is None):
        missing = "validate-kill" if kill is None else "validate-start"
        raise TraceError(f"{source}: a validate run needs both validate-start and validate-kill; {missing} is missing")
    if start is not None and kill is not None and kill[0] <= start[0]:
        raise TraceError(f"{source} line {kill[1]}: validate-kill must come after validate-start (line {start[1]})")
    if "end" in seen:
        end, end_line = seen["end"]
        if end < last:
            raise TraceError(f"{source} line {end_line}: end {hm(end)} is before the last event ({hm(last)})")
    else:
        end = max(at(DEFAULT_END), last + 30 * MINUTE)
    return Trace(
        tuple(sorted(chat)),
        start[0] if start else end,
        kill[0] if kill else end,
        KILLED_CALLS_EVERY_S,
        end,
        tuple(sorted(others)),
        killed_run=start is not None,
    )


def read_trace(path: Path | str, models: Iterable[str]) -> Trace:
    """:func:`parse_trace` of the file at ``path``."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise TraceError(f"cannot read the trace file {p}: {e.strerror or e}") from None
    return parse_trace(text.splitlines(), models, str(p))


def trace_lines(trace: Trace) -> list[str]:
    """``trace`` in the trace file format (what :func:`parse_trace` reads back to the same trace)."""
    out = ["time,model,kind"]
    events: list[tuple[float, int, str]] = [(t, 1, f"{hm(t)},{m},request") for t, m in trace.all_requests]
    if trace.killed_run:
        events += [(trace.killed_start, 0, f"{hm(trace.killed_start)},{AGENT_ALIAS},validate-start"),
                   (trace.kill_at, 0, f"{hm(trace.kill_at)},{AGENT_ALIAS},validate-kill")]  # fmt: skip
    events.append((trace.end, 2, f"{hm(trace.end)},,end"))
    return out + [line for _, _, line in sorted(events)]
