"""Replays every exchange recorded from real vLLM 0.32.0 against the vLLM stand-in.

One test per exchange (``devtools/simstack/recordings/vllm-0.32.0.jsonl``). Each checks what the project's clients
read: the status, the content-type class, the SHAPE of the answer (every JSON path and its type, fields
present and absent — :mod:`tests.conformance.shape`), the values that must be equal (``model``, error
``type``/``code``/``param``/``message``, ``finish_reason``, ``stop_reason``, ...), ids by pattern, and for
streams the sequence of chunk shapes, ``[DONE]`` last and, at temperature 0, the exact text pieces (which
shows text held back under stop strings). Only values may differ, never shapes; those allowed to differ
are listed in ``TYPE_ONLY`` with the reason.

The corpus is split (``devtools/simstack/recordings`` ``QUOTED``, README "Quoted and held out"): the stand-in may
quote the model's texts of the quoted exchanges, so their text checks only show the quoting works. The
held-out exchanges (test ids ``held-out/...``, what this suite reports) are answered by the stand-in's own
logic: their texts are not compared (the stand-in cannot write the model's words), but everything its
logic determines is (shape, types, values in ``EQUAL``, finish_reason against max_tokens, usage arithmetic,
tool-call arguments against the tool's schema), and ``/metrics`` is the stand-in's own model of the
exposition.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import httpx
import pytest
from simstack.recordings import QUOTED, VLLM, Exchange, exchanges, is_held_out

from tests.conformance.conftest import VLLM_SERVED, VllmUnderTest
from tests.conformance.shape import diff_shapes, id_pattern, shape, shape_diff, value_diff, values

EXCHANGES = exchanges(VLLM)

# Fields whose values must be equal to the recording (after placeholder mapping).
EQUAL = [
    "$.object",
    "$.model",
    "$.version",
    "$.error",
    "$.error.message",
    "$.error.type",
    "$.error.code",
    "$.error.param",
    "$.data[*].id",
    "$.data[*].object",
    "$.data[*].owned_by",
    "$.data[*].root",
    "$.data[*].parent",
    "$.data[*].max_model_len",
    "$.data[*].permission[*].object",
    "$.data[*].permission[*].allow_sampling",
    "$.data[*].permission[*].organization",
    "$.choices[*].index",
    "$.choices[*].finish_reason",
    "$.choices[*].stop_reason",
    "$.choices[*].message.role",
    "$.choices[*].message.tool_calls[*].type",
    "$.choices[*].message.tool_calls[*].function.name",
    "$.choices[*].delta.role",
    "$.choices[*].delta.tool_calls[*].index",
    "$.choices[*].delta.tool_calls[*].type",
    "$.choices[*].delta.tool_calls[*].function.name",
]
# Equal at temperature 0 only: the model's texts (the stand-in quotes the recording) and their token count.
EQUAL_AT_T0 = [
    "$.choices[*].message.content",
    "$.choices[*].message.tool_calls[*].function.arguments",
    "$.choices[*].text",
    "$.choices[*].delta.content",
    "$.choices[*].delta.tool_calls[*].function.arguments",
    "$.usage.completion_tokens",
]
# Random per answer: compared by pattern (prefix and length of the hex tail), e.g. chatcmpl-<hex16>.
IDS = [
    "$.id",
    "$.system_fingerprint",
    "$.choices[*].message.tool_calls[*].id",
    "$.choices[*].delta.tool_calls[*].id",
    "$.data[*].permission[*].id",
]
# Values compared by type only (the shape comparison still covers them), with the reason:
TYPE_ONLY = {
    "$.created": "a clock value",
    "$.data[*].created": "a clock value",
    "$.data[*].permission[*].created": "a clock value",
    "$.usage.prompt_tokens": "Qwen's tokenizer and chat template are not reproduced token for token",
    "$.usage.total_tokens": "follows prompt_tokens; checked as prompt_tokens + completion_tokens instead",
}


def _placeholders(value: Any, model_dir: str) -> Any:
    """The recording with its placeholders replaced by the stand-in's values."""
    if isinstance(value, str):
        return value.replace("<model-dir>", model_dir)
    if isinstance(value, list):
        return [_placeholders(v, model_dir) for v in value]
    if isinstance(value, dict):
        return {k: _placeholders(v, model_dir) for k, v in value.items()}
    return value


def _auth(placeholder: str, key: str) -> dict[str, str]:
    if placeholder == "<vllm-key>":
        return {"Authorization": f"Bearer {key}"}
    if placeholder == "<wrong-key>":
        return {"Authorization": f"Bearer sk-{secrets.token_hex(16)}"}
    assert placeholder == "<none>", f"no mapping for auth placeholder {placeholder!r}"
    return {}


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _at_t0(ex: Exchange) -> bool:
    body = ex.request.get("body")
    return isinstance(body, dict) and body.get("temperature") == 0


def _compare_json(expected: Any, actual: Any, t0: bool, where: str = "") -> list[str]:
    problems = shape_diff(expected, actual, where=where)
    problems += value_diff(expected, actual, EQUAL + (EQUAL_AT_T0 if t0 else []), where=where)
    for p in IDS:
        e = [id_pattern(v) for v in values(expected, p)]
        a = [id_pattern(v) for v in values(actual, p)]
        if e != a:
            problems.append(f"{where}{p}: ids {a!r}, recording has {e!r}")
    usage = actual.get("usage") if isinstance(actual, dict) else None
    counts = isinstance(usage, dict) and all(
        isinstance(usage.get(k), int) for k in ("prompt_tokens", "completion_tokens")
    )
    if counts and usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:  # type: ignore[index]
        problems.append(f"{where}$.usage: total_tokens is not prompt_tokens + completion_tokens: {usage}")
    return problems


def _seq_shapes(chunks: list[Any]) -> list[dict[str, set[str]]]:
    """The chunk shapes in order, runs of equal shapes collapsed: the stream's structure, not its length."""
    out: list[dict[str, set[str]]] = []
    for ch in chunks:
        s = shape(ch)
        if not out or out[-1] != s:
            out.append(s)
    return out


def _pieces(chunks: list[Any]) -> list[Any]:
    return [
        values(ch, "$.choices[*].delta.content")
        + values(ch, "$.choices[*].text")
        + values(ch, "$.choices[*].delta.tool_calls[*].function.arguments")
        for ch in chunks
    ]


def _compare_stream(expected: list[str], actual: list[str], t0: bool) -> list[str]:
    problems = []
    if not actual or actual[-1] != "[DONE]":
        problems.append(f"stream does not end with [DONE] (last payload {actual[-1:]!r})")
    if expected[-1] != "[DONE]":
        problems.append("the recording's stream does not end with [DONE]")
    exp = [json.loads(p) for p in expected if p != "[DONE]"]
    act = [json.loads(p) for p in actual if p != "[DONE]"]
    es, as_ = _seq_shapes(exp), _seq_shapes(act)
    if len(es) != len(as_):
        problems.append(f"stream structure: {len(as_)} runs of chunk shapes, recording has {len(es)}")
    for i, (e, a) in enumerate(zip(es, as_, strict=False)):
        problems += diff_shapes(e, a, f"chunk-run {i}: ")
    # every chunk carries the recorded model and object; ids, finish and usage chunks as recorded
    for i, ch in enumerate(act):
        problems += value_diff(exp[0], ch, ["$.model", "$.object"], where=f"chunk {i}: ")
    problems += [f"chunk ids: {p}" for p in _id_seq(exp, act)]
    finishes_e = [(j, f) for j, ch in enumerate(exp) for f in values(ch, "$.choices[*].finish_reason") if f]
    finishes_a = [(j, f) for j, ch in enumerate(act) for f in values(ch, "$.choices[*].finish_reason") if f]
    if [f for _, f in finishes_e] != [f for _, f in finishes_a]:
        problems.append(f"finish_reasons {finishes_a}, recording has {finishes_e}")
    for name, path in (("stop_reason", "$.choices[*].stop_reason"), ("usage", "$.usage")):
        e_vals = [v for ch in exp for v in values(ch, path) if v is not None]
        a_vals = [v for ch in act for v in values(ch, path) if v is not None]
        if name == "stop_reason" and e_vals != a_vals:
            problems.append(f"stop_reasons {a_vals!r}, recording has {e_vals!r}")
        if name == "usage" and len(e_vals) != len(a_vals):
            problems.append(f"{len(a_vals)} chunks carry usage, recording has {len(e_vals)}")
    if t0:
        if _pieces(exp) != _pieces(act):
            problems.append(f"text pieces {_pieces(act)!r}, recording has {_pieces(exp)!r}")
        e_u = [v for ch in exp for v in values(ch, "$.usage.completion_tokens")]
        a_u = [v for ch in act for v in values(ch, "$.usage.completion_tokens")]
        if e_u != a_u:
            problems.append(f"usage.completion_tokens {a_u}, recording has {e_u}")
    return problems


def _id_seq(exp: list[Any], act: list[Any]) -> list[str]:
    """Every chunk of a stream carries the same id, of the recorded pattern."""
    out = []
    e_ids = {id_pattern(ch.get("id")) for ch in exp}
    a_ids = {id_pattern(ch.get("id")) for ch in act}
    if e_ids != a_ids:
        out.append(f"id patterns {sorted(map(str, a_ids))}, recording has {sorted(map(str, e_ids))}")
    if len({ch.get("id") for ch in act}) != 1:
        out.append("the chunks of one stream carry different ids")
    for p in ("$.system_fingerprint",):
        e = [(j, id_pattern(v)) for j, ch in enumerate(exp) for v in values(ch, p)]
        a = [(j - len(act), id_pattern(v)) for j, ch in enumerate(act) for v in values(ch, p)]
        e = [(j - len(exp), v) for j, v in e]
        if e != a:
            out.append(f"{p} at chunks (from the end) {a}, recording has {e}")
    return out


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _metric_structure(text: str, model: str) -> tuple[set[tuple[str, str]], set[tuple[str, tuple[Any, ...]]]]:
    """(family, type) pairs and (sample, labels) pairs of the vllm:* metrics; label values compared too
    except cache_config_info's (configuration values) and the first served name (shown as <model>)."""
    families: set[tuple[str, str]] = set()
    samples: set[tuple[str, tuple[Any, ...]]] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE vllm:"):
            _, _, name, typ = line.split(" ", 3)
            families.add((name, typ))
            continue
        m = _SAMPLE.match(line)
        if not m or not m.group("name").startswith("vllm:"):
            continue
        float(m.group("value"))  # every sample value parses as a number
        labels = dict(_LABEL.findall(m.group("labels") or ""))
        if labels.get("model_name") == model:
            labels["model_name"] = "<model>"
        if m.group("name") == "vllm:cache_config_info":
            labels = dict.fromkeys(labels, "*")
        samples.add((m.group("name"), tuple(sorted(labels.items()))))
    return families, samples


def _compare_metrics(expected: str, actual: str) -> list[str]:
    ef, es = _metric_structure(expected, VLLM_SERVED[0])
    af, as_ = _metric_structure(actual, VLLM_SERVED[0])
    problems = [f"metric family missing: {f}" for f in sorted(ef - af)]
    problems += [f"metric family not in the recording: {f}" for f in sorted(af - ef)]
    problems += [f"sample missing: {s}" for s in sorted(es - as_)][:20]
    problems += [f"sample not in the recording: {s}" for s in sorted(as_ - es)][:20]
    return problems


async def _replay(ex: Exchange, target: VllmUnderTest) -> httpx.Response:
    body = ex.request.get("body")
    headers = _auth(ex.auth, target.key)
    kwargs: dict[str, Any] = {"headers": headers, "params": ex.request.get("query") or None}
    if isinstance(body, str):  # recorded raw because it was not valid JSON
        kwargs["content"] = body.encode()
        headers["Content-Type"] = "application/json"
    elif body is not None:
        kwargs["json"] = body
    async with httpx.AsyncClient(base_url=target.url, timeout=30) as c:
        return await c.request(ex.method, ex.path, **kwargs)


def _sse_payloads(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def _own_logic(ex: Exchange, actual: Any) -> list[str]:
    """What the stand-in's own logic determines on a held-out answer whose text it cannot know: completion
    tokens within max_tokens, "length" exactly when max_tokens is reached, text present where the model
    wrote some, tool-call arguments a JSON object fitting the tool's parameters."""
    raw = ex.request.get("body")
    body: dict[str, Any] = raw if isinstance(raw, dict) else {}
    max_tokens = body.get("max_tokens")
    tools = {t["function"]["name"]: t["function"].get("parameters") or {} for t in body.get("tools") or []}
    problems: list[str] = []
    chunks = actual if isinstance(actual, list) else [actual]
    finishes = [f for ch in chunks for f in values(ch, "$.choices[*].finish_reason") if f]
    used = [u for ch in chunks for u in values(ch, "$.usage.completion_tokens") if isinstance(u, int)]
    if isinstance(max_tokens, int) and used:
        if used[-1] > max_tokens:
            problems.append(f"completion_tokens {used[-1]} > max_tokens {max_tokens}")
        if ("length" in finishes) != (used[-1] == max_tokens):
            problems.append(f"finish_reasons {finishes} with completion_tokens {used[-1]} of max_tokens {max_tokens}")
    exp_chunks = ex.body if isinstance(ex.body, list) else [ex.body]
    exp_chunks = [json.loads(c) if isinstance(c, str) and c != "[DONE]" else c for c in exp_chunks]
    for path in ("$.choices[*].message.content", "$.choices[*].text", "$.choices[*].delta.content"):
        wrote = "".join(v for c in exp_chunks if c != "[DONE]" for v in values(c, path) if isinstance(v, str))
        got = "".join(v for c in chunks for v in values(c, path) if isinstance(v, str))
        if bool(wrote) != bool(got):
            problems.append(f"{path}: {'no text' if not got else repr(got[:80])}, the model wrote {wrote[:80]!r}")
    for ch in chunks:
        for call in values(ch, "$.choices[*].message.tool_calls[*].function"):
            try:
                args = json.loads(call.get("arguments") or "")
            except ValueError:
                problems.append(f"tool-call arguments are not JSON: {call.get('arguments')!r}")
                continue
            schema = tools.get(call.get("name"), {})
            props, required = set(schema.get("properties") or {}), set(schema.get("required") or ())
            if not isinstance(args, dict) or not required <= set(args) or (props and not set(args) <= props):
                problems.append(f"tool-call arguments {args!r} do not fit {call.get('name')}'s parameters")
    return problems


def _test_id(ex: Exchange) -> str:
    return f"{'held-out' if is_held_out(VLLM, ex.id) else 'quoted'}/{ex.id}"


@pytest.mark.parametrize("ex", EXCHANGES, ids=[_test_id(ex) for ex in EXCHANGES])
async def test_exchange_conforms(ex: Exchange, vllm_standin: VllmUnderTest) -> None:
    resp = await _replay(ex, vllm_standin)
    recorded = _placeholders(ex.response, vllm_standin.model_dir)
    problems: list[str] = []
    if resp.status_code != ex.status:
        problems.append(f"status {resp.status_code}, recording has {ex.status}")
    exp_ct = _media_type(recorded.get("headers", {}).get("content-type"))
    act_ct = _media_type(resp.headers.get("content-type"))
    if exp_ct != act_ct:
        problems.append(f"content-type {act_ct or '(none)'!r}, recording has {exp_ct or '(none)'!r}")
    body = recorded.get("body")
    held = is_held_out(VLLM, ex.id)
    quote_texts = _at_t0(ex) and not held  # a held-out text is the model's: the stand-in cannot know it
    if ex.is_stream:
        payloads = _sse_payloads(resp.text)
        problems += _compare_stream(body, payloads, quote_texts)
        if held:
            problems += _own_logic(ex, [json.loads(p) for p in payloads if p != "[DONE]"])
    elif body is None:
        if resp.content != b"":
            problems.append(f"body {resp.content[:200]!r}, recording has an empty body")
    elif isinstance(body, str):
        problems += _compare_metrics(body, resp.text)
    else:
        try:
            actual = resp.json()
        except ValueError:
            problems.append(f"body is not JSON: {resp.text[:300]!r}")
        else:
            problems += _compare_json(body, actual, quote_texts)
            if held and ex.status == 200:
                problems += _own_logic(ex, actual)
    assert not problems, f"{ex.id}: {ex.what}\n  " + "\n  ".join(problems)


def test_every_exchange_is_replayed() -> None:
    assert len(EXCHANGES) == 27
    assert len({ex.id for ex in EXCHANGES}) == len(EXCHANGES)
    # the type-only allow-list names only values, never a path missing from the recordings' shapes
    recorded_paths = set().union(*(shape(ex.body) for ex in EXCHANGES if isinstance(ex.body, dict)))
    assert set(TYPE_ONLY) <= recorded_paths


def _prompt(ex: Exchange) -> str | None:
    body = ex.request.get("body")
    if not isinstance(body, dict) or not (body.get("messages") or body.get("prompt")):
        return None
    return json.dumps(body.get("messages") or body.get("prompt"), sort_keys=True)


def test_the_split_holds_out_what_the_stand_in_cannot_find() -> None:
    """The held-out part is most of the corpus, the metrics and every error among it; no held-out
    request carries a quoted prompt (the stand-in looks answers up by prompt); the stand-in refuses to
    quote a held-out exchange."""
    from simstack.recordings import quoted

    held = [ex for ex in EXCHANGES if is_held_out(VLLM, ex.id)]
    assert QUOTED[VLLM] <= {ex.id for ex in EXCHANGES}
    assert len(held) == 18 and "metrics" in {ex.id for ex in held}
    quoted_prompts = {_prompt(ex) for ex in EXCHANGES if not is_held_out(VLLM, ex.id)} - {None}
    assert not [ex.id for ex in held if _prompt(ex) in quoted_prompts]
    with pytest.raises(KeyError, match="held out"):
        quoted(VLLM, "metrics")
