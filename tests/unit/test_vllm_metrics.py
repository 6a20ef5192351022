"""Reading idleness from vLLM's /metrics: the recorded vLLM 0.32.0 exposition parsed, the served model's
activity read from it, what is missing refused, and the idle verdict against a kept reading."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from simstack.recordings import VLLM, exchange

from coder_stack.errors import MetricsUnreadable
from coder_stack.spec import Timeouts
from coder_stack.vllm.metrics import Activity, Reading, activity_of, judge, parse_exposition, read_activity

RECORDED = exchange(VLLM, "metrics").body
SERVED = "qwen2.5-coder-7b-instruct"
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def with_value(text: str, name: str, value: float) -> str:
    """The exposition with every sample of ``name`` set to ``value``."""
    return re.sub(rf"^({re.escape(name)}\{{[^}}]*\}}) \S+$", rf"\g<1> {value}", text, flags=re.M)


def without(text: str, name: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith(name + "{"))


def test_the_recorded_exposition_parses_with_its_labels() -> None:
    samples = parse_exposition(RECORDED).samples
    running = [s for s in samples if s.name == "vllm:num_requests_running"]
    assert [s.labels for s in running] == [{"engine": "0", "model_name": SERVED}]
    success = {s.labels["finished_reason"]: s.value for s in samples if s.name == "vllm:request_success_total"}
    assert success == {"stop": 7.0, "length": 7.0, "abort": 0.0, "error": 0.0, "repetition": 0.0}
    created = [s for s in samples if s.name == "vllm:request_success_created"]
    assert len(created) == 5 and all(s.value > 1.7e9 for s in created)


def test_the_recorded_activity_of_the_served_model() -> None:
    a = activity_of(parse_exposition(RECORDED), SERVED)
    assert (a.running, a.waiting, a.requests, a.tokens) == (0, 0, 14, 1354 + 453)
    assert a.engine_started == pytest.approx(1.7961143203683248e9)


def test_running_and_waiting_are_read() -> None:
    text = with_value(with_value(RECORDED, "vllm:num_requests_running", 2.0), "vllm:num_requests_waiting", 3.0)
    a = activity_of(parse_exposition(text), SERVED)
    assert (a.running, a.waiting) == (2, 3)


@pytest.mark.parametrize(
    "name", ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:request_success_total"]
)
def test_a_missing_gauge_or_counter_is_unreadable(name: str) -> None:
    with pytest.raises(MetricsUnreadable, match=re.escape(name)):
        activity_of(parse_exposition(without(RECORDED, name)), SERVED)


def test_another_served_name_is_unreadable_and_names_what_it_saw() -> None:
    with pytest.raises(MetricsUnreadable, match=re.escape(SERVED)):
        activity_of(parse_exposition(RECORDED), "qwen2.5-coder-1.5b")


# One line a newer vLLM, a sidecar or a proxy writes differently: an OpenMetrics exemplar after a bucket, a
# label value with an unescaped quote, a value that is not a number. Each is skipped; the rest is read.
BROKEN = [
    f'vllm:request_prompt_tokens_bucket{{engine="0",le="1.0",model_name="{SERVED}"}} 0.0 # {{trace_id="ab"}} 1.0',
    'vllm:cache_config_info{block_size="16",note="say "hi""} 1.0',
    f'vllm:gpu_cache_usage_perc{{model_name="{SERVED}"}} n/a',
]


def inserted(text: str, line: str, after: str = "vllm:num_requests_waiting{") -> str:
    """``text`` with ``line`` put right after the first line starting with ``after``."""
    lines = text.splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith(after)) + 1
    return "\n".join([*lines[:at], line, *lines[at:]])


@pytest.mark.parametrize("broken", BROKEN)
def test_one_unparseable_line_is_skipped_and_the_counters_are_still_read(broken: str) -> None:
    exposition = parse_exposition(inserted(RECORDED, broken))
    assert [u.text for u in exposition.unparsed] == [broken]
    assert len(exposition.samples) == len(parse_exposition(RECORDED).samples)
    a = activity_of(exposition, SERVED)
    assert (a.running, a.waiting, a.requests, a.tokens) == (0, 0, 14, 1354 + 453)
    assert a.unparsed_lines == 1


def test_an_unparseable_line_of_a_judged_counter_is_unreadable_not_skipped() -> None:
    # a request_success_total sample lost to a parse error would read as the counter going back: refuse it
    line = f'vllm:request_success_total{{engine="0",finished_reason="stop",model_name="{SERVED}"}} 7.0.0'
    text = inserted(without(RECORDED, "vllm:request_success_total"), line)
    with pytest.raises(MetricsUnreadable, match=r"vllm:request_success_total\) is no numeric value"):
        activity_of(parse_exposition(text), SERVED)


async def test_read_activity_skips_and_logs_the_unparseable_line(caplog: pytest.LogCaptureFixture) -> None:
    body = inserted(RECORDED, BROKEN[0])
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))
    async with httpx.AsyncClient(transport=transport) as http:
        with caplog.at_level(logging.WARNING, logger="coder_stack.vllm.metrics"):
            a = await read_activity(http, "http://coder-chat:8000", SERVED, Timeouts())
    assert (a.requests, a.unparsed_lines) == (14, 1)
    assert [r.getMessage() for r in caplog.records if "skipped line" in r.getMessage()] == [
        f"GET http://coder-chat:8000/metrics: skipped line {BROKEN_AT} (not a Prometheus sample): {BROKEN[0]!r}"
    ]


BROKEN_AT = next(i for i, x in enumerate(RECORDED.splitlines(), 1) if x.startswith("vllm:num_requests_waiting{")) + 1


@pytest.mark.parametrize("text", ["<html>502 Bad Gateway</html>", 'vllm:x{model_name="a" 1.0', "vllm:x{} nan-ish"])
def test_what_is_not_an_exposition_is_unreadable(text: str) -> None:
    with pytest.raises(MetricsUnreadable):
        parse_exposition(text)


# ------------------------------------------------------------------ the verdict
IDLE = Activity(running=0, waiting=0, requests=14, tokens=1807, engine_started=1.0e9)


def kept(minutes_ago: float, a: Activity = IDLE) -> Reading:
    return Reading(requests=a.requests, tokens=a.tokens, engine_started=a.engine_started,
                   since=NOW - timedelta(minutes=minutes_ago))  # fmt: skip


def verdict(a: Activity, previous: Reading | None, ready_min_ago: float = 120, after: float = 1800, grace: float = 600):
    return judge(a, previous, NOW, NOW - timedelta(minutes=ready_min_ago), after, grace)


def test_idle_when_counters_stood_still_for_idle_after() -> None:
    v = verdict(IDLE, kept(31))
    assert v.idle and v.idle_s == pytest.approx(31 * 60) and v.reading == kept(31)


def test_not_yet_idle_keeps_the_old_reading() -> None:
    v = verdict(IDLE, kept(29))
    assert not v.idle and v.reading == kept(29) and "of the 30.0 min" in v.reason


def test_the_first_reading_is_never_idle_and_starts_now() -> None:
    v = verdict(IDLE, None)
    assert not v.idle and v.reading is not None and v.reading.since == NOW and "first reading" in v.reason


def test_served_requests_start_a_new_reading() -> None:
    moved = IDLE.model_copy(update={"requests": 15})
    v = verdict(moved, kept(90))
    assert not v.idle and v.reading is not None and v.reading.since == NOW and v.reading.requests == 15


def test_a_restarted_engine_starts_a_new_reading() -> None:
    v = verdict(IDLE.model_copy(update={"engine_started": 2.0e9}), kept(90))
    assert not v.idle and v.reading is not None and v.reading.since == NOW


@pytest.mark.parametrize("field", ["running", "waiting"])
def test_never_idle_while_a_request_runs_or_waits(field: str) -> None:
    v = verdict(IDLE.model_copy(update={field: 1}), kept(90))
    assert not v.idle and "busy" in v.reason and v.reading is not None and v.reading.since == NOW


def test_never_idle_while_younger_than_the_grace() -> None:
    v = verdict(IDLE, kept(90), ready_min_ago=5, after=60, grace=600)
    assert not v.idle and "too young" in v.reason


def test_idle_counts_from_the_pod_ready_time_when_it_is_later() -> None:
    v = verdict(IDLE, kept(90), ready_min_ago=20)
    assert not v.idle and v.idle_s == pytest.approx(20 * 60)


def test_idle_after_zero_never_reclaims() -> None:
    v = verdict(IDLE, kept(10_000), after=0)
    assert not v.idle and "off" in v.reason


def test_the_reading_round_trips_through_its_annotation() -> None:
    r = kept(3)
    assert Reading.from_annotation(r.to_annotation()) == r
    assert Reading.from_annotation("not json") is None
    assert Reading.from_annotation('{"requests": 1, "since": "2026-01-01T00:00:00"}') is None  # no timezone
