"""The LiteLLM gateway's data plane through a client's virtual key: its scope, chat or FIM on the model's
alias, embeddings, and a real tool loop for the agent model. Calls are metered to the key."""

from __future__ import annotations

import json
from typing import Any, cast

import httpx
import jsonschema
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionFunctionToolParam
from pydantic import SecretStr

from coder_stack.errors import SmokeFailed, SpecError
from coder_stack.probe import (
    CallUsage,
    Check,
    Hop,
    SmokeResult,
    Timer,
    chat_once,
    excerpt,
    fim_once,
    hops,
    judge_fim,
    refuse_fim_through_chat,
    usage_of,
)
from coder_stack.spec import ClientKeySpec, ModelSpec, StackSpec, Timeouts
from coder_stack.transport import openai_client


async def _check_scope(
    oai: AsyncOpenAI, key_spec: ClientKeySpec, *, what: str, hop: Hop, secrets: tuple[str, ...]
) -> list[str]:
    with hops(f"{what}: GET /v1/models", via="gateway", unreachable="gateway", secrets=secrets):
        ids = [m.id async for m in oai.models.list()]
    return scope_mismatch(ids, key_spec.models, what=what, hop=hop)


def scope_mismatch(ids: list[str], expected: list[str], *, what: str, hop: Hop) -> list[str]:
    missing = sorted(set(expected) - set(ids))
    extra = sorted(set(ids) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"extra {extra}")
        raise SmokeFailed(
            f"{what}: /v1/models should list exactly {sorted(expected)}; {' and '.join(parts)}. "
            "Run the keys flow to correct the key's scope",
            hop=hop,
        )
    return sorted(ids)


async def smoke_gateway(
    http: httpx.AsyncClient,
    base_url: str,
    client_key: SecretStr,
    key_spec: ClientKeySpec,
    model: ModelSpec,
    spec: StackSpec,
) -> SmokeResult:
    """Through a virtual key: the key's exact scope in /v1/models, then chat (chat/agent) or raw FIM
    (fim) on the model's alias, then embeddings if the key has them. Calls are metered to this key."""
    if model.alias not in key_spec.models:
        raise SpecError(f"key {key_spec.alias!r} is not scoped to {model.alias!r}; smoke it with a key that is")
    base = base_url.rstrip("/")
    secrets = (client_key.get_secret_value(),)
    total, lap = Timer(), Timer()
    what = f"{model.alias} via key {key_spec.alias!r}"
    oai = openai_client(http, base, client_key, spec.timeouts)
    checks: list[Check] = []
    usage: list[CallUsage] = []

    ids = await _check_scope(oai, key_spec, what=what, hop="key-scope", secrets=secrets)
    checks.append(Check(name="/v1/models = key scope", seconds=lap.lap(), detail=", ".join(ids)))

    if model.role == "fim":
        with hops(f"{what}: FIM via /v1/completions", via="gateway", unreachable="gateway", secrets=secrets):
            text, u = await fim_once(oai, model.alias)
        judge_fim(text, hop="model", where=f"{what}: FIM via /v1/completions")
        usage.append(usage_of(model.alias, "completions", u))
        checks.append(Check(name="FIM via /v1/completions", seconds=lap.lap(), detail=excerpt(text, *secrets)))
    else:
        with hops(f"{what}: /v1/chat/completions", via="gateway", unreachable="gateway", secrets=secrets):
            text, u = await chat_once(oai, model, model.alias)
        if not text.strip():
            raise SmokeFailed(f"{what}: /v1/chat/completions returned an empty answer", hop="model")
        usage.append(usage_of(model.alias, "chat", u))
        checks.append(Check(name="chat via /v1/chat/completions", seconds=lap.lap(), detail=excerpt(text, *secrets)))

    if spec.embeddings_alias in key_spec.models:
        with hops(
            f"{spec.embeddings_alias} via key {key_spec.alias!r}", via="gateway", unreachable="gateway", secrets=secrets
        ):
            emb = await oai.embeddings.create(model=spec.embeddings_alias, input="def add(a, b): return a + b")
        if not emb.data or not emb.data[0].embedding:
            raise SmokeFailed(f"{spec.embeddings_alias} via key {key_spec.alias!r}: empty embedding", hop="model")
        usage.append(usage_of(spec.embeddings_alias, "embeddings", emb.usage))
        checks.append(Check(name="embeddings", seconds=lap.lap(), detail=f"dim {len(emb.data[0].embedding)}"))

    return SmokeResult(
        kind="gateway",
        target=model.alias,
        key_alias=key_spec.alias,
        checks=checks,
        total_s=total.lap(),
        excerpt=excerpt(text, *secrets),
        usage=usage,
    )


WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Paris"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
_TOOLS = [cast(ChatCompletionFunctionToolParam, WEATHER_TOOL)]
AGENT_PROMPT = "What is the weather in Paris right now? Use the get_weather tool, then answer in one sentence."


def run_weather_tool(city: str) -> dict[str, Any]:
    """The local tool. Its answer carries a marker the final reply must reuse."""
    return {"city": city, "condition": "sunny", "temperature_c": 17}


def _classify_auto(message: Any) -> str:
    if getattr(message, "tool_calls", None):
        return "tool_calls"
    content = (getattr(message, "content", None) or "").strip()
    if '"name"' in content and "get_weather" in content:
        return "plain-json"
    return "text"


async def smoke_agent(
    http: httpx.AsyncClient,
    base_url: str,
    agent_key: SecretStr,
    model: ModelSpec,
    timeouts: Timeouts | None = None,
    *,
    key_alias: str | None = None,
) -> SmokeResult:
    """A real tool loop through the gateway: ``tool_choice: required`` -> schema-valid arguments -> run the
    tool locally -> ``role: tool`` result -> a final answer that uses it. Plus one ``auto`` call, reported
    as a diagnostic (Qwen2.5-Coder often writes the call as plain JSON instead of ``tool_calls``)."""
    refuse_fim_through_chat(model)
    timeouts = timeouts or Timeouts()
    secrets = (agent_key.get_secret_value(),)
    oai = openai_client(http, base_url, agent_key, timeouts)
    total, lap = Timer(), Timer()
    what = f"{model.alias} tool loop"
    checks: list[Check] = []
    usage: list[CallUsage] = []
    messages: list[Any] = [{"role": "user", "content": AGENT_PROMPT}]
    schema = WEATHER_TOOL["function"]["parameters"]

    with hops(f"{what}: tool_choice=required", via="gateway", unreachable="gateway", secrets=secrets):
        first = await oai.chat.completions.create(
            model=model.alias,
            messages=messages,
            tools=_TOOLS,
            tool_choice="required",
            max_tokens=128,
            temperature=0,
        )
    usage.append(usage_of(model.alias, "chat", first.usage))
    msg = first.choices[0].message if first.choices else None
    calls = list(msg.tool_calls or []) if msg else []
    if not calls:
        raise SmokeFailed(
            f"{what}: tool_choice=required returned no tool_calls (finish_reason="
            f"{first.choices[0].finish_reason if first.choices else None!r}, content="
            f"{excerpt(msg.content if msg else '', *secrets)!r}); the server needs --enable-auto-tool-choice "
            "--tool-call-parser hermes",
            hop="model",
        )
    call = calls[0]
    fn = getattr(call, "function", None)
    if fn is None or fn.name != "get_weather":
        raise SmokeFailed(f"{what}: the tool call names {getattr(fn, 'name', None)!r}, not 'get_weather'", hop="model")
    try:
        args = json.loads(fn.arguments or "")
        jsonschema.validate(args, schema)
    except (ValueError, jsonschema.ValidationError) as e:
        reason = e.message if isinstance(e, jsonschema.ValidationError) else "not JSON"
        raise SmokeFailed(
            f"{what}: tool arguments {excerpt(fn.arguments, *secrets)!r} do not match the schema ({reason})",
            hop="model",
        ) from None
    checks.append(
        Check(
            name="tool_choice=required -> valid get_weather call",
            seconds=lap.lap(),
            detail=excerpt(fn.arguments, *secrets),
        )
    )

    result = run_weather_tool(args["city"])
    messages.append(
        {
            "role": "assistant",
            "content": msg.content if msg and msg.content else None,
            "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": fn.name, "arguments": fn.arguments}}
            ],
        }
    )
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    with hops(f"{what}: answer from the tool result", via="gateway", unreachable="gateway", secrets=secrets):
        final = await oai.chat.completions.create(model=model.alias, messages=messages, max_tokens=96, temperature=0)
    usage.append(usage_of(model.alias, "chat", final.usage))
    answer = (final.choices[0].message.content or "") if final.choices else ""
    markers = [str(result["temperature_c"]), str(result["condition"])]
    if not any(m in answer.lower() for m in markers):
        raise SmokeFailed(
            f"{what}: the final answer does not use the tool result (expected {markers!r} in it), got "
            f"{excerpt(answer, *secrets)!r}",
            hop="model",
        )
    checks.append(Check(name="role:tool result used in the answer", seconds=lap.lap(), detail=excerpt(answer)))

    diagnostics = []
    with hops(f"{what}: tool_choice=auto", via="gateway", unreachable="gateway", secrets=secrets):
        auto = await oai.chat.completions.create(
            model=model.alias,
            messages=[{"role": "user", "content": AGENT_PROMPT}],
            tools=_TOOLS,
            tool_choice="auto",
            max_tokens=128,
            temperature=0,
        )
    usage.append(usage_of(model.alias, "chat", auto.usage))
    kind = _classify_auto(auto.choices[0].message if auto.choices else None)
    diagnostics.append(
        {
            "tool_calls": "tool_choice=auto produced proper tool_calls",
            "plain-json": "tool_choice=auto answered with the call as plain JSON text and empty tool_calls "
            "(the Qwen2.5-Coder habit); clients must use tool_choice=required or a Qwen tool chat template",
            "text": "tool_choice=auto answered in prose without calling the tool",
        }[kind]
    )
    checks.append(Check(name="tool_choice=auto (diagnostic)", seconds=lap.lap(), detail=kind))
    return SmokeResult(
        kind="agent",
        target=model.alias,
        key_alias=key_alias,
        checks=checks,
        total_s=total.lap(),
        excerpt=excerpt(answer, *secrets),
        usage=usage,
        diagnostics=diagnostics,
    )


__all__ = ["WEATHER_TOOL", "run_weather_tool", "scope_mismatch", "smoke_agent", "smoke_gateway"]
