"""Conformance of the LiteLLM stand-in with real LiteLLM 1.108.7: every recorded exchange replayed, in order.

``devtools/simstack/recordings/litellm-1.108.7.jsonl`` is one stateful session with a real proxy (keys minted, used,
updated, deleted; spend polled; a model registered at run time). This module starts the LiteLLM stand-in
configured like that proxy (same aliases, upstream URLs, prices, ``store_model_in_db``, a 1 s batch write)
in front of vLLM stand-ins, replays every exchange once, in recorded order (module scope), and then holds
each answer to its recording, one test id per exchange:

- the status;
- the body's SHAPE: every JSON path (fields present AND absent) with its JSON type (stream payloads one by
  one, so the chunk count and each chunk's shape count too);
- the VALUES at every path, after the recording's placeholders are replaced by the live values of this
  replay (keys, hashes, display names, model ids), except the paths allow-listed below, each with its
  reason (timestamps, generated ids, durations ...);
- the ``x-litellm-*`` header names (present and absent), their values where they are not per-call, that
  ``x-litellm-key-spend`` is the call's own cost, and that no ``retry-after`` is sent.

Answers that carry usage are held to cost = usage x price: ``x-litellm-response-cost`` (and its input and
output parts) is prompt_tokens x input price + completion_tokens x output price of the alias called (the
recording obeys the same rule: ``test_the_recording_prices_usage``), since the token counts themselves are
the vLLM side's business and are compared by type only.

The LiteLLM side of the corpus is held out whole (``devtools/simstack/recordings`` ``QUOTED``, README "Quoted and held
out"): the stand-in reads no recording; its answers are its own logic's values in its own declared field model
(``devtools/simstack/standins/litellm_fields.py``), so the missing/extra-field and value checks of every exchange (test
ids ``held-out/...``) can fail, those the field model was first written from included.

Polling exchanges (``*-poll-NN``) are replayed as "ask until the answer has the recorded shape and values",
bounded by a few seconds, since the timing of the batched spend write differs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from simstack.recordings import LITELLM, QUOTED, VLLM, Exchange, exchanges, is_held_out
from simstack.standins import ContainerRun, RunningBackend, SimServices, start_standin

from tests.conformance.shape import shape_diff
from tests.kits.gateway import litellm_run

EXCHANGES = exchanges(LITELLM)
MASTER = "sk-conformance-master-" + secrets.token_hex(8)
UPSTREAM = "upstream-conformance-" + secrets.token_hex(8)
# The recorded proxy reached vLLM at 127.0.0.1:18213 (one vLLM, three served names) and the embeddings
# server at 127.0.0.1:18214; the resolver below sends those addresses to the stand-ins.
VLLM_HOSTPORT, EMBED_HOSTPORT = "127.0.0.1:18213", "127.0.0.1:18214"
VLLM_BASE, EMBED_BASE = f"http://{VLLM_HOSTPORT}/v1", f"http://{EMBED_HOSTPORT}/v1"
EMBED_SERVED = "qwen-mean-pool-embeddings"
# The recorded proxy's model list, read back from its /model/info (exchange model-info-all).
CONFIG: dict[str, Any] = {
    "model_list": [
        {
            "model_name": "coder-chat",
            "litellm_params": {
                "model": "openai/qwen2.5-coder-7b-instruct",
                "api_base": VLLM_BASE,
                "api_key": "os.environ/UPSTREAM_API_KEY",
                "input_cost_per_token": 5e-7,
                "output_cost_per_token": 1.5e-6,
            },
            "model_info": {"max_tokens": 4096, "max_input_tokens": 4096, "max_output_tokens": 4096},
        },
        {
            "model_name": "coder-fim",
            "litellm_params": {
                "model": "text-completion-openai/qwen2.5-coder-1.5b",
                "api_base": VLLM_BASE,
                "api_key": "os.environ/UPSTREAM_API_KEY",
                "input_cost_per_token": 1e-7,
                "output_cost_per_token": 2e-7,
            },
            "model_info": {"max_tokens": 4096, "max_input_tokens": 4096, "max_output_tokens": 4096},
        },
        {
            "model_name": "embeddings",
            "litellm_params": {
                "model": f"openai/{EMBED_SERVED}",
                "api_base": EMBED_BASE,
                "api_key": "os.environ/UPSTREAM_API_KEY",
                "input_cost_per_token": 2e-8,
                "output_cost_per_token": 0.0,
            },
            "model_info": {"mode": "embedding"},
        },
    ],
    "general_settings": {"master_key": "os.environ/PROXY_MASTER_KEY", "store_model_in_db": True},
}
# key-info-expired was asked 3 s after minting a 2 s key: replayed as a poll, until the key has expired here too
POLL_RE = re.compile(r"-poll-\d+$|^key-info-expired$")
# "/key/info spend of the X key after its calls": the recorder asked seconds after the calls, when the
# batched write (1 s) had landed; the replay is faster, so it waits one write interval and a half first.
SETTLE_RE = re.compile(r"^spend-key-info-")
SETTLE_S = 1.5
POLL_BOUND_S = 6.0

# ------------------------------------------------------------------ what is compared by type only
# Paths (regex over the dotted path, list items as [i]) whose VALUES may differ; their types still count.
VALUE_ALLOW: list[tuple[str, str]] = [
    (r"(^|\.)(created_at|updated_at|settings_updated_at|last_active|deleted_at)$", "wall-clock timestamps"),
    (r"(^|\.)(startTime|endTime|completionStartTime)$", "wall-clock timestamps"),
    (r"(^|\.)expires$", "wall-clock timestamps (minting time + duration)"),
    (r"(^|\.)created$", "epoch seconds of the answer"),
    (r"(^|\.)budget_reset_at$", "depends on today's date; checked by the midnight rule instead"),
    (r"^(\[\d+\]\.)?id$|^info\.id$", "generated ids (chatcmpl-/cmpl- ids of vLLM, the deleted row's uuid)"),
    (r"(^|\.)(request_id|litellm_call_id|session_id)$", "per-call ids"),
    (r"(^|\.)(request_duration_ms|litellm_overhead_time_ms)$", "durations"),
    (r"^litellm_params\.(model|api_base|api_key)$", "encrypted blobs with a random nonce (checked not clear)"),
    (r"(^|\.)embedding(\[\*\])?$", "the embeddings server's numbers (vLLM side)"),
    (r"(^|\.)(user_agent|request_tags)$", "the replaying client's User-Agent"),
    (r"\.tool_calls\[\d+\]\.id$", "vLLM's random chatcmpl-tool- ids (checked by pattern)"),
    (r"^metadata\.error_information\.traceback$", "traceback text"),
    (r"(^|\.)system_fingerprint$", "vLLM's build fingerprint, passed through (the vLLM side's business)"),
]
# Message texts that vary at the model (no temperature: "hi" prompts) are the vLLM side's business.
TEXT_PATHS = re.compile(r"(\.message\.content|\.delta\.content|\.text)$")
VARYING_TEXT_IDS = {
    "chat-del-value-before-delete",
    "chat-hi",
    "budget-call-1",
    "budget-immediate-call-1",
    "chat-blockme-before-block",
    "chat-unblocked-key",
}
# Prompts whose answer the vLLM stand-in may quote (devtools/simstack/recordings QUOTED); for the others (held out
# on the vLLM side) the model's texts and completion token counts are the vLLM stand-in's own.
_QUOTED_VLLM_PROMPTS = {
    json.dumps(ex.request["body"].get("messages") or ex.request["body"].get("prompt"), sort_keys=True)
    for ex in exchanges(VLLM)
    if not is_held_out(VLLM, ex.id) and isinstance(ex.request.get("body"), dict)
}
# Prices per token (input, output) of each alias, as configured (CONFIG below) and registered (model-new).
PRICES = {
    "coder-chat": (5e-7, 1.5e-6),
    "coder-fim": (1e-7, 2e-7),
    "embeddings": (2e-8, 0.0),
    "coder-agent": (5e-7, 1.5e-6),
}


def _upstream_text_quoted(ex: Exchange) -> bool:
    body = ex.request.get("body")
    if not isinstance(body, dict):
        return True
    prompt = body.get("messages") or body.get("prompt")
    return prompt is None or json.dumps(prompt, sort_keys=True) in _QUOTED_VLLM_PROMPTS


# x-litellm-* headers whose values are per call.
HEADER_VALUE_ALLOW = {
    "x-litellm-call-id",
    "x-litellm-response-duration-ms",
    "x-litellm-overhead-duration-ms",
    "x-litellm-callback-duration-ms",
}
# The vLLM stand-in counts prompt tokens its own way (the vLLM side's business): token counts and the costs
# made from them are compared by type, and by value only where the recording has 0 (unmetered streams).
COUNT_PATHS = re.compile(
    r"(^|\.)(prompt_tokens|total_tokens|spend|total_spend|cost|input_cost|total_cost|original_cost|output_cost)$"
)
COST_HEADERS = {
    "x-litellm-response-cost",
    "x-litellm-response-cost-original",
    "x-litellm-response-cost-input",
    "x-litellm-response-cost-output",
    "x-litellm-key-spend",
}
HEX64 = re.compile(r"^[0-9a-f]{64}$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# ------------------------------------------------------------------ shape and value comparison
def jtype(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "list"
    return "object"


def flatten(v: Any, path: str = "") -> dict[str, Any]:
    """path -> value for every node; items of a list of objects by index, of a list of scalars as [*]."""
    out: dict[str, Any] = {path: v}
    if isinstance(v, dict):
        for k, x in v.items():
            out.update(flatten(x, f"{path}.{k}" if path else str(k)))
    elif isinstance(v, list):
        if all(not isinstance(x, dict | list) for x in v):
            out[f"{path}[*]"] = v
        else:
            for i, x in enumerate(v):
                out.update(flatten(x, f"{path}[{i}]"))
    return out


def _allowed(path: str) -> bool:
    return any(re.search(p, path) for p, _ in VALUE_ALLOW)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-15)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _norm_message(s: str) -> str:
    # The cost in a budget message is the spend this replay made (token counts at the upstream).
    s = re.sub(r"Current cost: [0-9.e+-]+", "Current cost: <n>", s)
    # An expired key's refusal names its expiry and the time of the call (wall clock)
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\+00:00", "<time>", s)


def compare(expected: Any, actual: Any, ex_id: str, where: str = "body", own_text: bool = False) -> list[str]:
    """``own_text``: the model's texts and completion counts are the vLLM stand-in's own (compared by type)."""
    e, a = flatten(expected), flatten(actual)
    out = []
    for p in sorted(set(e) - set(a)):
        out.append(f"{where}: missing {p or '<root>'} ({jtype(e[p])})")
    for p in sorted(set(a) - set(e)):
        out.append(f"{where}: extra {p or '<root>'} ({jtype(a[p])})")
    for p in sorted(set(e) & set(a)):
        ev, av = e[p], a[p]
        if jtype(ev) != jtype(av):
            out.append(f"{where}: {p or '<root>'} is {jtype(av)}, recorded {jtype(ev)}")
            continue
        if isinstance(ev, dict) or (isinstance(ev, list) and not p.endswith("[*]")):
            continue  # containers: their members are compared one by one ([*]: a list of scalars as a whole)
        if _allowed(p) or (TEXT_PATHS.search(p) and (ex_id in VARYING_TEXT_IDS or own_text)):
            continue
        if own_text and re.search(r"(^|\.)(completion_tokens|arguments)$", p):
            continue
        if COUNT_PATHS.search(p) and isinstance(ev, int | float) and ev != 0:
            continue
        if isinstance(ev, str) and isinstance(av, str) and p.endswith("message"):
            ev, av = _norm_message(ev), _norm_message(av)
        if not _same_value(ev, av):
            out.append(f"{where}: {p or '<root>'} = {av!r:.200}, recorded {ev!r:.200}")
    return out


# ------------------------------------------------------------------ the replay
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


@dataclass
class Live:
    """Live values the recording's placeholders stand for."""

    subs: dict[str, str] = field(default_factory=dict)
    model_ids: dict[str, str] = field(default_factory=dict)  # recorded /model/new id -> live id

    def sub(self, v: Any) -> Any:
        if isinstance(v, str):
            for ph in sorted(self.subs, key=len, reverse=True):
                if ph in v:
                    v = v.replace(ph, self.subs[ph])
            for rec, live in self.model_ids.items():
                v = v.replace(rec, live)
            return v
        if isinstance(v, list):
            return [self.sub(x) for x in v]
        if isinstance(v, dict):
            return {self.sub(k): self.sub(x) for k, x in v.items()}
        return v


def _resolver(hosts: dict[str, int]) -> Any:
    def resolve(url: str) -> str | None:
        parts = urlsplit(url)
        hostport = parts.netloc
        if hostport not in hosts:
            return url
        return urlunsplit((parts.scheme, f"127.0.0.1:{hosts[hostport]}", parts.path, parts.query, parts.fragment))

    return resolve


def _parse_sse(text: str) -> list[Any]:
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            try:
                out.append(json.loads(payload))
            except json.JSONDecodeError:
                out.append(payload)
    return out


def _recorded_body(ex: Exchange) -> Any:
    if ex.is_stream:
        out: list[Any] = []
        for p in ex.body:
            try:
                out.append(json.loads(p))
            except json.JSONDecodeError:
                out.append(p)
        return out
    return ex.body


async def _send(c: httpx.AsyncClient, url: str, ex: Exchange, live: Live) -> Answer:
    req = ex.request
    headers = {}
    if ex.auth != "<none>":
        headers["Authorization"] = f"Bearer {live.sub(ex.auth)}"
    params = live.sub(req.get("query") or {})
    body = live.sub(req.get("body"))
    kwargs: dict[str, Any] = {"headers": headers, "params": params}
    if body is not None and req["method"] != "GET":
        kwargs["json"] = body
    r = await c.request(req["method"], url + live.sub(req["path"]), **kwargs)
    ctype = r.headers.get("content-type", "")
    if ctype.startswith("text/event-stream"):
        parsed: Any = _parse_sse(r.text)
    else:
        try:
            parsed = r.json()
        except json.JSONDecodeError:
            parsed = r.text
    return Answer(r.status_code, {k.lower(): v for k, v in r.headers.items()}, parsed)


def _capture(ex: Exchange, ans: Answer, live: Live) -> None:
    """Placeholders whose live value this answer mints."""
    if ex.path == "/key/generate" and ans.status == 200 and ex.status == 200:
        alias = ex.request["body"]["key_alias"]
        key, token = ans.body.get("key"), ans.body.get("token") or ans.body.get("token_id")
        if isinstance(key, str):
            live.subs[f"<vkey:{alias}>"] = key
            live.subs[f"<last4:{alias}>"] = key[-4:]
        if isinstance(token, str):
            live.subs[f"<hash:{alias}>"] = token
            live.subs[f"<hash-last4:{alias}>"] = token[-4:]
    if ex.path == "/model/new" and ans.status == 200 and isinstance(ans.body, dict):
        live.model_ids[str(ex.body["model_id"])] = str(ans.body.get("model_id"))
    if ex.id == "model-info-all" and ans.status == 200:
        # config deployments' ids (64 hex) in the recording -> the stand-in's, by model name
        rec = {d["model_name"]: d["model_info"]["id"] for d in ex.body["data"]}
        for d in ans.body.get("data", []):
            rid = rec.get(d.get("model_name"))
            if rid is not None and HEX64.match(rid):
                live.model_ids[rid] = d["model_info"]["id"]


@dataclass
class Replay:
    answers: dict[str, Answer]
    live: Live
    errors: dict[str, str]


@pytest.fixture(scope="module")
async def replay() -> AsyncIterator[Replay]:
    hosts: dict[str, int] = {}
    services = SimServices(resolve_url=_resolver(hosts), time_scale=1.0, spend_write_delay_s=1.0)
    backends: list[RunningBackend] = []
    gw: RunningBackend | None = None
    live = Live(
        subs={
            "<master>": MASTER,
            "<vllm-key>": UPSTREAM,
            "<wrong-key>": "sk-" + secrets.token_urlsafe(16),
            "<never-minted>": "sk-" + secrets.token_urlsafe(16),
            # spend-logs-v2-dated asked for "today (UTC)" of the recording: today's date here
            "2026-12-01 00:00:00": f"{dt.datetime.now(dt.UTC).date()} 00:00:00",
            "2026-12-01 23:59:59": f"{dt.datetime.now(dt.UTC).date()} 23:59:59",
        }
    )
    answers: dict[str, Answer] = {}
    errors: dict[str, str] = {}
    try:
        vllm_args = [
            "--served-model-name", "qwen2.5-coder-7b-instruct", "qwen2.5-coder-1.5b", "qwen2.5-coder-14b-instruct",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--api-key", UPSTREAM,
        ]  # fmt: skip
        embed_args = ["--served-model-name", EMBED_SERVED, "--task", "embed", "--api-key", UPSTREAM]
        for hostport, args in ((VLLM_HOSTPORT, vllm_args), (EMBED_HOSTPORT, embed_args)):
            run = ContainerRun("serving", f"vllm-{len(backends)}", "vllm", "vllm/vllm-openai:v0.32.0", args, {})
            b = await start_standin(run, services)
            assert b is not None
            backends.append(b)
            hosts[hostport] = b.port
        gw = await start_standin(litellm_run(CONFIG, MASTER, UPSTREAM), services)
        assert gw is not None
        url = f"http://127.0.0.1:{gw.port}"
        async with httpx.AsyncClient(timeout=60) as c:
            # the config deployments' ids (recorded 64-hex ids -> the stand-in's), needed by the polls
            r = await c.get(f"{url}/model/info", headers={"Authorization": f"Bearer {MASTER}"})
            _capture(next(x for x in EXCHANGES if x.id == "model-info-all"), Answer(200, {}, r.json()), live)
            for ex in EXCHANGES:
                try:
                    if SETTLE_RE.search(ex.id):
                        await asyncio.sleep(SETTLE_S)
                    ans = await _send(c, url, ex, live)
                    if POLL_RE.search(ex.id):
                        deadline = time.monotonic() + POLL_BOUND_S
                        while check(ex, ans, live) and time.monotonic() < deadline:
                            await asyncio.sleep(0.1)
                            ans = await _send(c, url, ex, live)
                    answers[ex.id] = ans
                    _capture(ex, ans, live)
                except Exception as e:  # one exchange's failure must not hide the others
                    errors[ex.id] = f"{type(e).__name__}: {e}"
        yield Replay(answers, live, errors)
    finally:
        if gw is not None:
            await gw.stop()
        for b in backends:
            await b.stop()


def _midnight_after(t: dt.datetime) -> dt.datetime:
    day = dt.datetime(t.year, t.month, t.day, tzinfo=t.tzinfo)
    return day if t == day else day + dt.timedelta(days=1)


def _special_checks(ex: Exchange, ans: Answer) -> list[str]:
    out: list[str] = []
    body = ans.body if isinstance(ans.body, dict) else {}
    # budget_reset_at (exchanges 16 of the notes): created + budget_duration, rounded up to midnight
    for holder in (body, body.get("info") or {}):
        if isinstance(holder, dict) and holder.get("budget_duration") == "30d" and holder.get("budget_reset_at"):
            created = dt.datetime.fromisoformat(str(holder["created_at"]).replace("Z", "+00:00"))
            want = _midnight_after(created + dt.timedelta(days=30))
            got = dt.datetime.fromisoformat(str(holder["budget_reset_at"]).replace("Z", "+00:00"))
            if got != want:
                out.append(f"budget_reset_at {got.isoformat()} != {want.isoformat()} (midnight after created+30d)")
    # timestamp spelling: ...Z from /key/generate and /key/list, ...+00:00 from /key/info
    rec_flat, act_flat = flatten(ex.body), flatten(ans.body)
    for p, v in rec_flat.items():
        if isinstance(v, str) and re.match(r"^\d{4}-\d\d-\d\dT", v) and isinstance(act_flat.get(p), str):
            for suffix in ("Z", "+00:00"):
                if v.endswith(suffix) and not str(act_flat[p]).endswith(suffix):
                    out.append(f"body: {p} = {act_flat[p]!r} should end with {suffix!r} like {v!r}")
    # /model/new echoes encrypted params, never the clear values
    if ex.path == "/model/new" and ans.status == 200:
        params = body.get("litellm_params") or {}
        req = ex.request["body"]["litellm_params"]
        for k in ("model", "api_base", "api_key"):
            if params.get(k) in (req.get(k), UPSTREAM):
                out.append(f"/model/new litellm_params.{k} echoed in clear")
    if UPSTREAM in json.dumps(ans.body) and ex.path != "/model/new":
        out.append("the upstream key appears in the answer")
    # tool call ids pass vLLM's through
    for p, v in act_flat.items():
        if re.search(r"\.tool_calls\[\d+\]\.id$", p) and not str(v).startswith("chatcmpl-tool-"):
            out.append(f"body: {p} = {v!r} is not a vLLM chatcmpl-tool- id")
    return out


def _header_checks(ex: Exchange, ans: Answer, live: Live) -> list[str]:
    out: list[str] = []
    rec = {k.lower(): v for k, v in (ex.response.get("headers") or {}).items()}
    got = ans.headers
    rec_x = {k for k in rec if k.startswith("x-litellm-")}
    got_x = {k for k in got if k.startswith("x-litellm-")}
    out += [f"headers: missing {h}" for h in sorted(rec_x - got_x)]
    out += [f"headers: extra {h}" for h in sorted(got_x - rec_x)]
    if "retry-after" in got:
        out.append("headers: retry-after sent")
    rec_ct = rec.get("content-type", "").split(";")[0]
    got_ct = got.get("content-type", "").split(";")[0]
    if rec_ct != got_ct:
        out.append(f"headers: content-type {got_ct!r}, recorded {rec_ct!r}")
    for h in sorted(rec_x & got_x):
        want, have = live.sub(rec[h]), got[h]
        if h in HEADER_VALUE_ALLOW or (h in COST_HEADERS and float(want) != 0):
            continue
        if h == "x-litellm-model-id":
            if not (HEX64.match(have) or UUID.match(have)) or (UUID.match(want) and want != have):
                out.append(f"headers: {h} = {have!r}, recorded {want!r}")
            continue
        if h == "x-litellm-model-api-base":
            continue  # the stand-in's upstream address is the recorded one (mapped by the resolver)
        try:
            same = math.isclose(float(want), float(have), rel_tol=1e-9, abs_tol=1e-15)
        except ValueError:
            same = want == have
        if not same:
            out.append(f"headers: {h} = {have!r}, recorded {want!r}")
    spend, cost = got.get("x-litellm-key-spend"), got.get("x-litellm-response-cost")
    if spend is not None and cost is not None and not math.isclose(float(spend), float(cost), abs_tol=1e-15):
        out.append("headers: x-litellm-key-spend is not this call's own cost")
    return out


def _cost_checks(ex: Exchange, headers: dict[str, str], body: Any) -> list[str]:
    """cost = usage x price: the response-cost headers against the answer's own token counts."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if isinstance(body, list):  # a stream: the usage chunk, if any
        usage = next((c["usage"] for c in body if isinstance(c, dict) and c.get("usage")), None)
    alias = (ex.request.get("body") or {}).get("model") if isinstance(ex.request.get("body"), dict) else None
    if not isinstance(usage, dict) or alias not in PRICES or "x-litellm-response-cost" not in headers:
        return []
    price_in, price_out = PRICES[alias]
    want_in = (usage.get("prompt_tokens") or 0) * price_in
    want_out = (usage.get("completion_tokens") or 0) * price_out
    out = []
    for h, want in (
        ("x-litellm-response-cost", want_in + want_out),
        ("x-litellm-response-cost-input", want_in),
        ("x-litellm-response-cost-output", want_out),
    ):
        if h in headers and not math.isclose(float(headers[h]), want, rel_tol=1e-9, abs_tol=1e-15):
            out.append(f"headers: {h} = {headers[h]}, usage {usage} x price of {alias} {PRICES[alias]} is {want!r}")
    return out


def check(ex: Exchange, ans: Answer, live: Live) -> list[str]:
    """Every way the answer differs from the recording (empty: it conforms)."""
    out: list[str] = []
    if ans.status != ex.status:
        out.append(f"status {ans.status}, recorded {ex.status}")
    expected = live.sub(_recorded_body(ex))
    # the shared shape helper (list items merged, int/float told apart) ...
    out += shape_diff(expected, ans.body, where="shape: ")
    # ... and item by item, with the values
    out += compare(expected, ans.body, ex.id, own_text=not _upstream_text_quoted(ex))
    out += _header_checks(ex, ans, live)
    out += _cost_checks(ex, ans.headers, ans.body)
    out += _special_checks(ex, ans)
    return out


def _ids() -> Iterator[str]:
    for ex in EXCHANGES:
        yield f"{'held-out' if is_held_out(LITELLM, ex.id) else 'quoted'}/{ex.id}"


@pytest.mark.parametrize("ex", EXCHANGES, ids=list(_ids()))
def test_exchange(replay: Replay, ex: Exchange) -> None:
    assert ex.id not in replay.errors, replay.errors.get(ex.id)
    problems = check(ex, replay.answers[ex.id], replay.live)
    assert not problems, f"{ex.id}: {ex.what}\n  " + "\n  ".join(problems[:60])


def test_every_exchange_replayed(replay: Replay) -> None:
    assert len(EXCHANGES) == 135
    assert set(replay.answers) | set(replay.errors) == {ex.id for ex in EXCHANGES}


def test_the_litellm_side_is_held_out_whole() -> None:
    """The LiteLLM stand-in may quote nothing: every exchange is held out (the blocked/expired-key ones among
    them), and a quote of any is refused."""
    from simstack.recordings import quoted

    assert QUOTED[LITELLM] == frozenset()
    held = [ex.id for ex in EXCHANGES if is_held_out(LITELLM, ex.id)]
    assert len(held) == len(EXCHANGES) == 135
    for ex_id in ("key-info-by-value", "key-generate-open-webui", "spend-logs-poll-04", "model-info-all"):
        with pytest.raises(KeyError, match="held out"):
            quoted(LITELLM, ex_id)


def test_the_recording_prices_usage() -> None:
    """The cost rule the replay holds the stand-in to is the real proxy's: every recorded answer with
    usage and a response cost obeys it (non-zero costs among them)."""
    checked = [ex.id for ex in EXCHANGES if "x-litellm-response-cost" in (ex.response.get("headers") or {})]
    nonzero = [i for i in checked if float(dict(exchange_headers(i))["x-litellm-response-cost"]) > 0]
    assert len(nonzero) >= 10
    for ex in EXCHANGES:
        assert not _cost_checks(ex, ex.response.get("headers") or {}, _recorded_body(ex)), ex.id


def exchange_headers(ex_id: str) -> dict[str, str]:
    return dict(next(ex for ex in EXCHANGES if ex.id == ex_id).response.get("headers") or {})
