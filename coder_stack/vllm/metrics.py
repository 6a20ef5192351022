"""A model server's activity from its Prometheus ``/metrics``, and whether it has been idle long enough.

vLLM exposes counters, not a "last request" time. So a reading (the request and token counters, with the
time they were first seen at those values) is kept between runs, and a model is idle when nothing runs or
waits *and* its counters have not moved since a reading at least ``idle_after_s`` old. Idleness is read,
never guessed: what cannot be read raises :class:`~coder_stack.errors.MetricsUnreadable`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from datetime import datetime

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coder_stack.errors import MetricsUnreadable
from coder_stack.spec import Timeouts

log = logging.getLogger(__name__)

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
REQUESTS = "vllm:request_success_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
REQUESTS_CREATED = "vllm:request_success_created"

_SAMPLE_RE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)(?:\s+-?\d+)?$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Sample(_Frozen):
    name: str = Field(description="Metric name, e.g. vllm:num_requests_running.")
    labels: dict[str, str] = Field(default_factory=dict, description="Label set.")
    value: float = Field(description="Sample value.")


class Unparsed(_Frozen):
    """A line of the exposition that is not a Prometheus sample: skipped, not fatal."""

    line: int = Field(description="1-based line number.")
    name: str = Field(description="The metric name it starts with, if any ('' when none).")
    text: str = Field(description="The line, cut to 120 characters (an exposition carries no secret).")
    why: str = Field(description="What is wrong with it.")


class Exposition(_Frozen):
    """The samples of a Prometheus text exposition, and the lines that did not parse (skipped)."""

    samples: list[Sample] = Field(default_factory=list, description="Every sample that parsed.")
    unparsed: list[Unparsed] = Field(default_factory=list, description="Lines skipped: not a sample.")


_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*")


def _parse_line(line: str) -> Sample | str:
    """A sample, or why the line is not one."""
    m = _SAMPLE_RE.match(line)
    if m is None:
        return "not a Prometheus sample"
    labels: dict[str, str] = {}
    body = m.group("labels") or ""
    pos = 0
    while pos < len(body):
        lm = _LABEL_RE.match(body, pos)
        if lm is None:
            return "malformed labels"
        labels[lm.group(1)] = lm.group(2).replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        pos = lm.end()
    try:
        value = float(m.group("value"))
    except ValueError:
        return "no numeric value"
    return Sample(name=m.group("name"), labels=labels, value=value)


def parse_exposition(text: str) -> Exposition:
    """Every sample of a Prometheus text exposition (comments skipped). A line that is not a sample is
    skipped and noted in ``unparsed`` (one odd line from a newer vLLM or a proxy must not hide the counters
    that do parse); text with no sample at all is not an exposition and raises."""
    samples: list[Sample] = []
    unparsed: list[Unparsed] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parsed = _parse_line(line)
        if isinstance(parsed, Sample):
            samples.append(parsed)
        else:
            name = _NAME_RE.match(line)
            unparsed.append(Unparsed(line=n, name=name.group(0) if name else "", text=line[:120], why=parsed))
    if not samples:
        first = f": line {unparsed[0].line} is {unparsed[0].why}: {unparsed[0].text!r}" if unparsed else ""
        raise MetricsUnreadable(f"/metrics holds no Prometheus sample{first}")
    return Exposition(samples=samples, unparsed=unparsed)


class Activity(_Frozen):
    """What a model server was doing at one reading."""

    running: int = Field(ge=0, description="vllm:num_requests_running.")
    waiting: int = Field(ge=0, description="vllm:num_requests_waiting.")
    requests: int = Field(ge=0, description="Finished requests: vllm:request_success_total over every reason.")
    tokens: int = Field(ge=0, description="vllm:prompt_tokens_total + vllm:generation_tokens_total.")
    engine_started: float | None = Field(
        None, description="Earliest vllm:request_success_created (Unix s): changes when the engine restarts."
    )
    unparsed_lines: int = Field(0, ge=0, description="Lines of /metrics that did not parse and were skipped.")


_JUDGED = (RUNNING, WAITING, REQUESTS, PROMPT_TOKENS, GENERATION_TOKENS)


def activity_of(exposition: Exposition, served_model_name: str) -> Activity:
    """The served model's activity; raises when a gauge or counter it is judged by is missing, or when a
    line that did not parse is one of them (a sum over a skipped sample would read as a counter going back)."""
    for bad in exposition.unparsed:
        if bad.name in _JUDGED:
            raise MetricsUnreadable(
                f"/metrics line {bad.line} ({bad.name}) is {bad.why}: {bad.text!r}; idleness cannot be read"
            )
    samples = exposition.samples
    mine = [s for s in samples if s.labels.get("model_name") == served_model_name]
    if not mine:
        names = sorted({s.labels["model_name"] for s in samples if "model_name" in s.labels})
        raise MetricsUnreadable(
            f"/metrics has no sample for model_name={served_model_name!r} (it shows {names or 'no model'}); "
            "check spec.models[].served_model_name"
        )

    def total(name: str) -> float:
        values = [s.value for s in mine if s.name == name]
        if not values:
            raise MetricsUnreadable(f"/metrics lacks {name} for {served_model_name!r}: idleness cannot be read")
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise MetricsUnreadable(f"/metrics has a negative or non-finite {name}: {values}")
        return sum(values)

    created = [s.value for s in mine if s.name == REQUESTS_CREATED and math.isfinite(s.value)]
    return Activity(
        running=round(total(RUNNING)),
        waiting=round(total(WAITING)),
        requests=round(total(REQUESTS)),
        tokens=round(total(PROMPT_TOKENS) + total(GENERATION_TOKENS)),
        engine_started=min(created) if created else None,
        unparsed_lines=len(exposition.unparsed),
    )


async def read_activity(http: httpx.AsyncClient, base_url: str, served_model_name: str, timeouts: Timeouts) -> Activity:
    """GET /metrics (open on vLLM, no key) and read the served model's activity."""
    url = f"{base_url.rstrip('/')}/metrics"
    try:
        resp = await http.get(url, timeout=timeouts.connect_s + 10)
    except httpx.HTTPError as e:
        raise MetricsUnreadable(f"GET /metrics failed: {type(e).__name__}: {e}") from e
    if resp.status_code != 200:
        raise MetricsUnreadable(f"GET /metrics answered {resp.status_code}")
    exposition = parse_exposition(resp.text)
    for bad in exposition.unparsed:
        log.warning("GET %s: skipped line %d (%s): %r", url, bad.line, bad.why, bad.text)
    return activity_of(exposition, served_model_name)


# ---------------------------------------------------------------------------------------- the reading kept
class Reading(_Frozen):
    """Counters and since when they have stood still: kept on the model's Deployment between runs."""

    requests: int = Field(ge=0, description="Finished requests at the reading.")
    tokens: int = Field(0, ge=0, description="Prompt + generation tokens at the reading.")
    engine_started: float | None = Field(None, description="Engine start the counters belong to.")
    since: datetime = Field(description="When the counters were first seen at these values (timezone-aware).")

    def to_annotation(self) -> str:
        return json.dumps(
            {
                "requests": self.requests,
                "tokens": self.tokens,
                "engine_started": self.engine_started,
                "since": self.since.isoformat(),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_annotation(cls, value: str | None) -> Reading | None:
        """The kept reading, or None when there is none or it cannot be read (a new one is taken)."""
        if not value:
            return None
        try:
            r = cls.model_validate(json.loads(value))
        except (ValueError, ValidationError):
            return None
        return r if r.since.tzinfo is not None else None

    def same_counters(self, a: Activity) -> bool:
        return (self.requests, self.tokens, self.engine_started) == (a.requests, a.tokens, a.engine_started)


class Verdict(_Frozen):
    """Whether a model may be reclaimed now, why, and the reading to keep."""

    idle: bool = Field(description="Reclaim it: idle for at least idle_after_s and older than the grace.")
    reason: str = Field(description="Why, in one line.")
    idle_s: float = Field(0.0, ge=0, description="Seconds the counters have stood still (0 when they moved).")
    reading: Reading | None = Field(None, description="The reading to keep (None: keep nothing new).")


def judge(
    activity: Activity,
    previous: Reading | None,
    now: datetime,
    ready_since: datetime | None,
    idle_after_s: float,
    grace_s: float,
) -> Verdict:
    """Idle = nothing running or waiting, counters unchanged since a reading >= ``idle_after_s`` old, and
    the pod Ready for >= ``grace_s``. Moving counters (or a restarted engine) start a new reading now."""
    if activity.running or activity.waiting:
        reading = Reading(requests=activity.requests, tokens=activity.tokens,
                          engine_started=activity.engine_started, since=now)  # fmt: skip
        return Verdict(
            idle=False,
            reason=f"busy: {activity.running} request(s) running, {activity.waiting} waiting",
            reading=reading,
        )
    if previous is None or not previous.same_counters(activity):
        reading = Reading(requests=activity.requests, tokens=activity.tokens,
                          engine_started=activity.engine_started, since=now)  # fmt: skip
        why = "first reading of its counters" if previous is None else "served requests since the last reading"
        return Verdict(idle=False, reason=f"active: {why} ({activity.requests} request(s) so far)", reading=reading)
    since = previous.since if ready_since is None else max(previous.since, ready_since)
    idle_s = max(0.0, (now - since).total_seconds())
    if idle_after_s <= 0:
        return Verdict(idle=False, reason="idle reclaim is off (idle_after_s: 0)", idle_s=idle_s, reading=previous)
    if idle_s < idle_after_s:
        return Verdict(
            idle=False,
            reason=f"idle {_minutes(idle_s)} of the {_minutes(idle_after_s)} before it is reclaimed",
            idle_s=idle_s,
            reading=previous,
        )
    if ready_since is None:
        return Verdict(idle=False, reason="its pod's Ready time is unknown: age not read", idle_s=idle_s)
    age_s = (now - ready_since).total_seconds()
    if age_s < grace_s:
        return Verdict(
            idle=False,
            reason=f"too young: Ready for {_minutes(age_s)}, under the {_minutes(grace_s)} grace",
            idle_s=idle_s,
            reading=previous,
        )
    return Verdict(idle=True, reason=f"idle {_minutes(idle_s)} (no request running, waiting or served)",
                   idle_s=idle_s, reading=previous)  # fmt: skip


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


__all__ = [
    "Activity",
    "Exposition",
    "Reading",
    "Sample",
    "Unparsed",
    "Verdict",
    "activity_of",
    "judge",
    "parse_exposition",
    "read_activity",
]
