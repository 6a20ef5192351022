"""The vLLM backend's answers as LiteLLM passes them on: the JSON answer of chat (tool calls included),
completions (FIM) and embeddings, the relayed streams, and the ``x-litellm-*`` headers."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from simstack.standins.litellm import spend
from simstack.standins.litellm.shape import now
from simstack.standins.vllm import count_tokens

if TYPE_CHECKING:
    from simstack.standins.litellm.auth import Caller
    from simstack.standins.litellm.models import Deployment
    from simstack.standins.litellm.state import ProxyState

VERSION = "1.108.7"


def reshape(payload: dict[str, Any], alias: str, route: str, text_model: bool) -> dict[str, Any]:
    """vLLM's answer as LiteLLM passes it on (recorded: chat-reverse, fim-stop, fim-via-chat, embeddings)."""
    usage = payload.get("usage") or {}
    u3 = {k: usage.get(k) for k in ("completion_tokens", "prompt_tokens", "total_tokens")}
    if route == "/embeddings":
        return {
            "model": alias,
            "data": payload.get("data") or [],
            "object": "list",
            "usage": u3 | {"completion_tokens": 0, "completion_tokens_details": None, "prompt_tokens_details": None},
        }
    if route == "/completions":
        out = dict(payload) | {"model": alias}
        out["usage"] = u3 | {"completion_tokens_details": None, "prompt_tokens_details": None}
        for k in ("system_fingerprint", "service_tier", "kv_transfer_params", "ec_transfer_params", "metrics"):
            out.setdefault(k, None)
        choices = []
        for ch in payload.get("choices") or []:
            c = {k: ch.get(k) for k in ("stop_reason", "token_ids", "prompt_logprobs", "prompt_token_ids")}
            c |= {"routed_experts": ch.get("routed_experts"), "finish_reason": ch.get("finish_reason")}
            c |= {"index": ch.get("index", 0), "text": ch.get("text"), "logprobs": ch.get("logprobs")}
            choices.append(c)
        out["choices"] = choices
        return out
    if text_model:  # a text completion answered on the chat route (fim-via-chat)
        return {
            "id": payload.get("id"),
            "created": payload.get("created"),
            "model": alias,
            "object": "chat.completion",
            "choices": [
                {
                    "finish_reason": ch.get("finish_reason"),
                    "index": ch.get("index", 0),
                    "message": {"content": ch.get("text"), "role": "assistant"},
                }
                for ch in payload.get("choices") or []
            ],
            "usage": u3,
        }
    choices = []
    for ch in payload.get("choices") or []:
        m = ch.get("message") or {}
        msg: dict[str, Any] = {"content": m.get("content"), "role": m.get("role", "assistant")}
        if m.get("tool_calls"):
            msg["tool_calls"] = [
                {
                    "function": {"arguments": tc["function"].get("arguments"), "name": tc["function"].get("name")},
                    "id": tc.get("id"),  # recorded (agent-tools-required): vLLM's chatcmpl-tool- id
                    "type": "function",
                }
                for tc in m["tool_calls"]
            ]
        msg |= {"provider_specific_fields": {"reasoning": m.get("reasoning")}, "refusal": m.get("refusal")}
        choices.append(
            {
                "finish_reason": ch.get("finish_reason"),
                "index": ch.get("index", 0),
                "message": msg,
                "provider_specific_fields": {
                    "token_ids": ch.get("token_ids"),
                    "routed_experts": ch.get("routed_experts"),
                    "stop_reason": ch.get("stop_reason"),
                },
                "logprobs": ch.get("logprobs"),
            }
        )
    return {
        "id": payload.get("id"),
        "created": payload.get("created"),
        "model": alias,
        "object": "chat.completion",
        "system_fingerprint": payload.get("system_fingerprint"),
        "choices": choices,
        "usage": u3,
    }


def headers(
    st: ProxyState,
    caller: Caller,
    dep: Deployment,
    usage: dict[str, Any] | None,
    started: dt.datetime,
    route: str,
    stream: bool = False,
) -> dict[str, str]:
    """Recorded x-litellm-* headers: cost parts of this call; key-spend is this call's own cost."""
    cin, cout = spend.cost_of(dep, usage) if not stream else (0.0, 0.0)
    text_model = dep.provider == "text-completion-openai"
    ms = str((now() - started).total_seconds() * 1000)
    h = {
        "x-litellm-call-id": str(uuid.uuid4()),
        "x-litellm-model-id": dep.model_id,
        "x-litellm-model-name": str(dep.litellm_params.get("model") or ""),
    }
    fim_stream = stream and text_model
    if not fim_stream:
        # recorded (hook-fallback): an openai/ model without api_base shows OpenAI's; GUESS: "" for other providers
        default = "https://api.openai.com" if dep.provider == "openai" else ""
        h["x-litellm-model-api-base"] = str(dep.litellm_params.get("api_base") or default)
    h["x-litellm-version"] = VERSION
    if not stream:
        h["x-litellm-response-cost"] = str(cin + cout)
    if not fim_stream:
        h |= {
            "x-litellm-response-cost-original": str(cin + cout),
            "x-litellm-response-cost-discount-amount": "0.0",
            "x-litellm-response-cost-margin-amount": "0.0",
            "x-litellm-response-cost-margin-percent": "0.0",
            "x-litellm-response-cost-input": str(cin),
            "x-litellm-response-cost-output": str(cout),
            "x-litellm-response-cost-tool-usage": "0.0",
        }
    rec = st.db["keys"].get(caller.token or "") or {}
    if rec.get("max_budget") is not None:
        h["x-litellm-key-max-budget"] = str(float(rec["max_budget"]))
    h["x-litellm-key-spend"] = str(cin + cout)
    h["x-litellm-response-duration-ms"] = ms
    if not text_model:
        h["x-litellm-overhead-duration-ms"] = "1.0"
    if not fim_stream:
        h["x-litellm-callback-duration-ms"] = "0.0"
    h |= {
        "x-litellm-model-group": dep.model_name,
        "x-litellm-attempted-retries": "0",
        "x-litellm-attempted-fallbacks": "0",
    }
    return h


async def relay_stream(
    st: ProxyState,
    request: web.Request,
    resp: aiohttp.ClientResponse,
    caller: Caller,
    dep: Deployment,
    body: dict[str, Any],
    route: str,
    started: dt.datetime,
    ua: str,
    asked: str | None = None,
) -> web.StreamResponse:
    """Reshaped like LiteLLM (recorded: chat-reverse-stream(-usage), fim-stop-stream, agent-tools-required-stream).

    GUESS: more than one choice (n > 1) in a stream; every recorded stream has one."""
    out = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream; charset=utf-8"}
        | headers(st, caller, dep, None, started, route, stream=True),
    )
    await out.prepare(request)
    # the alias the client asked for (a callback may have rerouted it); GUESS for streams: observed unstreamed only
    alias = asked or dep.model_name
    text_route = route == "/completions" or dep.provider == "text-completion-openai"

    async def send(obj: dict[str, Any]) -> None:
        await out.write(f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode())

    usage: dict[str, Any] | None = None
    text_parts: list[str] = []
    finish: str | None = None
    finish_had_content = False
    head: dict[str, Any] = {}
    fingerprint: str | None = None
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            s = line.decode(errors="replace").strip()
            if not s.startswith("data:") or s == "data: [DONE]":
                continue
            try:
                ev = json.loads(s[5:].strip())
            except json.JSONDecodeError:
                continue
            head = head or {"id": ev.get("id"), "created": ev.get("created")}
            fingerprint = ev.get("system_fingerprint") or fingerprint
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices") or []:
                if ch.get("finish_reason"):
                    finish = ch["finish_reason"]
                if text_route:
                    text_parts.append(ch.get("text") or "")
                    continue
                delta = ch.get("delta") or {}
                content = delta.get("content")
                if content:
                    text_parts.append(content)
                if "role" in delta:
                    d = {"role": delta["role"], "content": content or ""}
                elif delta.get("tool_calls"):
                    d = {"tool_calls": []}
                    for tc in delta["tool_calls"]:
                        fn = tc.get("function") or {}
                        t: dict[str, Any] = {}
                        if tc.get("id"):
                            t["id"] = tc["id"]
                        t["function"] = {"arguments": fn.get("arguments") or ""}
                        if fn.get("name"):
                            t["function"]["name"] = fn["name"]
                        t |= {"type": "function", "index": tc.get("index", 0)}
                        d["tool_calls"].append(t)
                elif content:
                    d = {"content": content}
                    finish_had_content = finish_had_content or bool(ch.get("finish_reason"))
                else:
                    continue
                base = {"id": ev.get("id"), "object": "chat.completion.chunk", "created": ev.get("created")}
                await send(base | {"model": alias, "choices": [{"index": ch.get("index", 0), "delta": d}]})
    base = {"id": head.get("id"), "created": head.get("created"), "model": alias}
    if text_route:
        # recorded (fim-stop-stream): vLLM's empty chunks dropped, the text in one chunk, then the finish;
        # every chunk with zero usage, and the call is not metered (spend 0, tokens 0)
        zero = {"completion_tokens": 0, "prompt_tokens": 0, "total_tokens": 0}
        tbase = {"id": head.get("id"), "object": "text_completion", "created": head.get("created"), "model": alias}
        await send(tbase | {"choices": [{"index": 0, "text": "".join(text_parts)}], "usage": zero})
        await send(tbase | {"choices": [{"finish_reason": finish or "stop", "index": 0}], "usage": zero})
        spend.record(
            st, caller, dep, zero, route, stream=True, started=started, request_id=head.get("id"), user_agent=ua
        )
    else:
        if finish_had_content or finish != "tool_calls":
            await send(
                base
                | {"object": "chat.completion.chunk", "system_fingerprint": fingerprint}
                | {"choices": [{"finish_reason": finish, "index": 0, "delta": {}}]}
            )
        else:
            await send(
                {"id": head.get("id"), "object": "chat.completion.chunk", "created": head.get("created")}
                | {"model": alias, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
            )
        if usage is None:  # LiteLLM counts the tokens itself when the backend sent no usage
            prompt = " ".join(str(m.get("content") or "") for m in body.get("messages") or [] if isinstance(m, dict))
            n = count_tokens("".join(text_parts))
            usage = {"prompt_tokens": count_tokens(prompt), "completion_tokens": n}
            usage["total_tokens"] = usage["prompt_tokens"] + n
        cost = spend.record(
            st, caller, dep, usage, route, stream=True, started=started, request_id=head.get("id"), user_agent=ua
        )
        if (body.get("stream_options") or {}).get("include_usage"):
            ct = int(usage.get("completion_tokens") or 0)
            u = {k: usage.get(k) for k in ("completion_tokens", "prompt_tokens", "total_tokens")}
            u |= {"completion_tokens_details": {"reasoning_tokens": 0, "text_tokens": ct}, "cost": cost}
            await send(
                base
                | {"object": "chat.completion.chunk", "system_fingerprint": fingerprint}
                | {"choices": [{"index": 0, "delta": {}}], "usage": u}
            )
    await out.write(b"data: [DONE]\n\n")
    await out.write_eof()
    return out
