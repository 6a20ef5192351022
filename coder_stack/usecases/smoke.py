"""Smokes: "this model works, through this key, and it is metered".

Each smoke returns a :class:`SmokeResult` (what was checked, timings, a short redacted excerpt, token usage)
or raises :class:`SmokeFailed` naming the hop that broke — ``pod``, ``service``, ``gateway``, ``key``,
``key-scope``, ``budget``, ``model``, ``frontend`` — and what the response was.

FIM goes to raw ``/v1/completions`` with the Qwen FIM tokens, never to ``/v1/chat/completions`` (the chat
template mangles the control tokens): :func:`chat_once` refuses a FIM model outright.
"""

from __future__ import annotations

import inspect
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal, Protocol, cast

import httpx
import jsonschema
import openai
import openai.resources  # openai loads it on first use: ~1.7 s here, after the model is up (bench)
from kubernetes_asyncio.client import ApiClient
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionFunctionToolParam
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr

from coder_stack.errors import SmokeFailed, SpecError, redact
from coder_stack.http import error_detail, make_client, openai_client
from coder_stack.kubernetes.client import read_secret
from coder_stack.spec import ClientKeySpec, ModelSpec, StackSpec, Timeouts
from coder_stack.usecases.keys import (
    FIM_PROMPT_TEMPLATE,
    TABBY_CONFIG_KEY,
    parse_tabby_config,
    tabby_fim_alias,
)
from coder_stack.usecases.openwebui import (
    PERSISTENT_CONFIG_PROBE_CMD,
    PERSISTENT_CONFIG_VAR,
    env_wins_for,
    parse_persistent_config_probe,
)

Hop = Literal["pod", "service", "gateway", "key", "key-scope", "budget", "model", "frontend"]
KEY_HOPS: frozenset[str] = frozenset({"key", "key-scope", "budget"})
"""Hops where the client's key, not the model, is what failed."""

FIM_PREFIX = "def add(a, b):\n    return "
FIM_SUFFIX = "\n"
FIM_EXPECTED = "a + b"
FIM_STOP = ["<|endoftext|>", "<|fim_pad|>", "\n\n"]
FIM_MAX_TOKENS = 16
CHAT_PROMPT = "reverse a string in python, code only"
CHAT_MAX_TOKENS = 40
EXCERPT_CHARS = 120


def fim_prompt(prefix: str = FIM_PREFIX, suffix: str = FIM_SUFFIX, template: str = FIM_PROMPT_TEMPLATE) -> str:
    return template.replace("{prefix}", prefix).replace("{suffix}", suffix)


# --------------------------------------------------------------------------------------------- results


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def clip(limit: int) -> BeforeValidator:
    """Cut a text to ``limit`` characters (ending with an ellipsis) before validation: real answers have any
    length, and a report must never fail because a model said more than expected."""

    def cut(value: Any) -> Any:
        if isinstance(value, str) and len(value) > limit:
            return value[: limit - 1] + "…"
        return value

    return BeforeValidator(cut)


class Check(_Report):
    name: str = Field(max_length=120, description="What was checked.")
    seconds: float = Field(ge=0, description="How long it took.")
    detail: Annotated[str, clip(400)] = Field("", max_length=400, description="What was seen (redacted, short).")


class CallUsage(_Report):
    model: str = Field(max_length=200, description="Model id called (served name or gateway alias).")
    endpoint: Literal["chat", "completions", "embeddings"] = Field(description="Which OpenAI endpoint.")
    prompt_tokens: int = Field(0, ge=0, description="usage.prompt_tokens as reported.")
    completion_tokens: int = Field(0, ge=0, description="usage.completion_tokens as reported.")
    streamed: bool = Field(False, description="The call was streamed (as Tabby calls FIM).")
    key_alias: str | None = Field(None, max_length=253, description="Virtual key the call was made with (alias).")
    request_id: str | None = Field(
        None, max_length=200, description="The answer's id: the gateway's spend log names the call by it."
    )


class SmokeResult(_Report):
    kind: Literal["direct", "gateway", "agent", "frontends"] = Field(description="Which smoke.")
    target: str = Field(max_length=200, description="Model or front-end smoked.")
    key_alias: str | None = Field(None, max_length=253, description="Virtual key used (alias only).")
    checks: list[Check] = Field(default_factory=list, max_length=50, description="Checks that passed, in order.")
    ttft_s: float | None = Field(None, ge=0, description="Time to first token of the streamed completion.")
    total_s: float = Field(0.0, ge=0, description="Wall time of the whole smoke.")
    excerpt: Annotated[str, clip(EXCERPT_CHARS)] = Field(
        "", max_length=EXCERPT_CHARS, description="Start of the model's answer (redacted)."
    )
    usage: list[CallUsage] = Field(default_factory=list, max_length=50, description="Tokens per metered call.")
    diagnostics: list[str] = Field(default_factory=list, max_length=20, description="Non-fatal observations.")


def _excerpt(text: str | None, *secrets: str) -> str:
    """The start of an answer, redacted, at most EXCERPT_CHARS long (redaction first, so no secret is cut
    into a piece the patterns no longer recognise)."""
    clean = redact((text or "").strip(), *secrets, limit=len(text or "") + 1)
    return clean if len(clean) <= EXCERPT_CHARS else clean[: EXCERPT_CHARS - 1] + "…"


class _Timer:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def lap(self) -> float:
        now = time.monotonic()
        dt, self.t0 = now - self.t0, now
        return round(dt, 4)


# --------------------------------------------------------------------------------------------- errors


@contextmanager
def _hops(
    what: str, *, via: Literal["direct", "gateway"], unreachable: Hop, secrets: tuple[str, ...] = ()
) -> Iterator[None]:
    """Translate openai/httpx errors into SmokeFailed with the hop that broke."""
    try:
        yield
    except SmokeFailed:
        raise
    except openai.APIStatusError as e:
        try:
            raw: Any = e.response.content
        except httpx.ResponseNotRead:
            raw = e.body
        etype, msg = error_detail(raw)
        status = e.status_code
        seen = f"{status} {etype}: {msg}".strip() if etype else f"{status}: {msg}"
        seen = redact(seen, *secrets)
        hop: Hop
        if via == "direct":
            if status == 401:
                hop, hint = "key", "vLLM rejected the key: the pod's --api-key differs from serving/vllm-api-key"
            elif status == 404:
                hop, hint = "model", "the model name is not served: check --served-model-name against the spec"
            elif status >= 500:
                hop, hint = "pod", "the vLLM engine failed: read the pod's log"
            else:
                hop, hint = "model", "vLLM refused the request"
        else:
            if status == 401:
                hop, hint = "key", "the gateway does not accept this virtual key (deleted or never minted?)"
            elif status == 403:
                hop, hint = "key-scope", "the key is not scoped to this model: run the keys flow to fix its scope"
            elif status == 422 or etype == "budget_exceeded":
                hop, hint = "budget", "the key's max_budget is spent: raise it in the spec or wait for the reset"
            elif status == 404:
                hop, hint = "key-scope", "the gateway does not know this model alias"
            elif status >= 500:
                hop, hint = "model", "the gateway could not get an answer from the model server behind it"
            else:
                hop, hint = "gateway", "the gateway refused the request"
        raise SmokeFailed(f"{what}: {hint} (answered {seen})", hop=hop) from None
    except (openai.APIConnectionError, httpx.TransportError) as e:
        where = "the gateway" if via == "gateway" else "the model server"
        cause = type(e.__cause__ or e).__name__
        raise SmokeFailed(
            f"{what}: {where} is unreachable ({cause}); check that its pod is Ready and the endpoint is right",
            hop=unreachable,
        ) from None


def _usage(
    model: str,
    endpoint: Literal["chat", "completions", "embeddings"],
    usage: Any,
    *,
    streamed: bool = False,
    request_id: str | None = None,
    key_alias: str | None = None,
) -> CallUsage:
    return CallUsage(
        model=model,
        endpoint=endpoint,
        prompt_tokens=max(0, int(getattr(usage, "prompt_tokens", 0) or 0)),
        completion_tokens=max(0, int(getattr(usage, "completion_tokens", 0) or 0)),
        streamed=streamed,
        request_id=request_id[:200] if request_id else None,
        key_alias=key_alias,
    )


# --------------------------------------------------------------------------------------------- primitives


def refuse_fim_through_chat(model: ModelSpec) -> None:
    """The guard: a FIM model is never sent to /v1/chat/completions."""
    if model.role == "fim":
        raise SpecError(
            f"refusing to send {model.name} (a FIM model) through /v1/chat/completions: the chat template "
            "mangles the FIM control tokens. Use /v1/completions with the raw <|fim_prefix|> prompt."
        )


async def chat_once(oai: AsyncOpenAI, model: ModelSpec, model_id: str, prompt: str = CHAT_PROMPT) -> tuple[str, Any]:
    refuse_fim_through_chat(model)
    resp = await oai.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=CHAT_MAX_TOKENS,
        temperature=0,
    )
    return (resp.choices[0].message.content or "") if resp.choices else "", resp.usage


async def fim_once(oai: AsyncOpenAI, model_id: str, prompt: str | None = None) -> tuple[str, Any]:
    resp = await oai.completions.create(
        model=model_id,
        prompt=prompt or fim_prompt(),
        max_tokens=FIM_MAX_TOKENS,
        temperature=0,
        stop=FIM_STOP,
    )
    return (resp.choices[0].text or "") if resp.choices else "", resp.usage


async def fim_streamed(oai: AsyncOpenAI, model_id: str, prompt: str | None = None) -> tuple[str, Any, str | None]:
    """One FIM completion streamed, as Tabby asks for it: (text, usage or None, the answer's id). With stop
    strings the server may hold text back until the last chunk; usage may be absent or all zero."""
    stream: AsyncIterator[Any] = await oai.completions.create(
        model=model_id,
        prompt=prompt or fim_prompt(),
        max_tokens=FIM_MAX_TOKENS,
        temperature=0,
        stop=FIM_STOP,
        stream=True,
    )
    parts: list[str] = []
    usage = None
    request_id: str | None = None
    async for chunk in stream:
        request_id = request_id or getattr(chunk, "id", None)
        parts.append((chunk.choices[0].text or "") if chunk.choices else "")
        usage = getattr(chunk, "usage", None) or usage
    return "".join(parts), usage, request_id


def judge_fim(text: str, *, hop: Hop, where: str) -> None:
    """The start of the middle must be ``a + b``; the model keeps writing code after it if not stopped."""
    if "<|fim" in text or "<|im_" in text:
        raise SmokeFailed(
            f"{where}: the completion contains FIM/chat control tokens ({_excerpt(text)!r}): the prompt was "
            "mangled (sent through a chat template?)",
            hop=hop,
        )
    if not re.sub(r"\s+", " ", text).lstrip().startswith(FIM_EXPECTED) and not text.lstrip().startswith("a+b"):
        raise SmokeFailed(
            f"{where}: expected the middle to start with {FIM_EXPECTED!r}, got {_excerpt(text)!r}", hop=hop
        )


async def _stream_first_token(oai: AsyncOpenAI, model: ModelSpec) -> tuple[float | None, str, Any]:
    """Stream one tiny completion; returns (time to first token, text, usage-or-None)."""
    t0 = time.monotonic()
    ttft: float | None = None
    parts: list[str] = []
    usage = None
    if model.role == "fim":
        fstream: AsyncIterator[Any] = await oai.completions.create(
            model=model.served_model_name,
            prompt=fim_prompt(),
            max_tokens=FIM_MAX_TOKENS,
            temperature=0,
            stop=FIM_STOP,
            stream=True,
        )
        async for chunk in fstream:
            text = chunk.choices[0].text if chunk.choices else ""
            if text and ttft is None:
                ttft = time.monotonic() - t0
            parts.append(text or "")
            usage = getattr(chunk, "usage", None) or usage
    else:
        refuse_fim_through_chat(model)
        cstream: AsyncIterator[Any] = await oai.chat.completions.create(
            model=model.served_model_name,
            messages=[{"role": "user", "content": CHAT_PROMPT}],
            max_tokens=CHAT_MAX_TOKENS,
            temperature=0,
            stream=True,
        )
        async for chunk in cstream:
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta and ttft is None:
                ttft = time.monotonic() - t0
            parts.append(delta or "")
            usage = getattr(chunk, "usage", None) or usage
    return (round(ttft, 4) if ttft is not None else None), "".join(parts), usage


# --------------------------------------------------------------------------------------------- smokes


async def smoke_direct(
    http: httpx.AsyncClient, base_url: str, vllm_key: SecretStr, model: ModelSpec, timeouts: Timeouts | None = None
) -> SmokeResult:
    """The pod itself: /health, the served name in /v1/models, one streamed completion (time to first token)."""
    timeouts = timeouts or Timeouts()
    base = base_url.rstrip("/")
    secrets = (vllm_key.get_secret_value(),)
    total, lap = _Timer(), _Timer()
    checks: list[Check] = []

    with _hops(f"{model.name}: GET /health", via="direct", unreachable="pod", secrets=secrets):
        health = await http.get(f"{base}/health", timeout=timeouts.connect_s + 10)
    if health.status_code != 200:
        _, msg = error_detail(health.content)
        raise SmokeFailed(
            f"{model.name}: GET /health answered {health.status_code} {msg}: the vLLM engine is not healthy", hop="pod"
        )
    checks.append(Check(name="GET /health", seconds=lap.lap(), detail="200"))

    oai = openai_client(http, base, vllm_key, timeouts)
    with _hops(f"{model.name}: GET /v1/models", via="direct", unreachable="pod", secrets=secrets):
        ids = [m.id async for m in oai.models.list()]
    if model.served_model_name not in ids:
        raise SmokeFailed(
            f"{model.name}: /v1/models lists {ids}, not {model.served_model_name!r}: the pod's --served-model-name "
            "and spec.models[].served_model_name disagree",
            hop="model",
        )
    checks.append(Check(name="served name in /v1/models", seconds=lap.lap(), detail=model.served_model_name))

    endpoint: Literal["chat", "completions"] = "completions" if model.role == "fim" else "chat"
    with _hops(f"{model.name}: streamed {endpoint}", via="direct", unreachable="pod", secrets=secrets):
        ttft, text, usage = await _stream_first_token(oai, model)
    if not text.strip():
        raise SmokeFailed(f"{model.name}: the streamed {endpoint} call returned no text", hop="model")
    if model.role == "fim":
        judge_fim(text, hop="model", where=f"{model.name}: FIM via /v1/completions")
    if ttft is None:
        raise SmokeFailed(f"{model.name}: no token arrived in the stream", hop="model")
    checks.append(Check(name=f"streamed /v1/{endpoint.replace('chat', 'chat/completions')}", seconds=lap.lap()))
    return SmokeResult(
        kind="direct",
        target=model.served_model_name,
        checks=checks,
        ttft_s=ttft,
        total_s=total.lap(),
        excerpt=_excerpt(text, *secrets),
        usage=[_usage(model.served_model_name, endpoint, usage)] if usage else [],
    )


async def _check_scope(
    oai: AsyncOpenAI, key_spec: ClientKeySpec, *, what: str, hop: Hop, secrets: tuple[str, ...]
) -> list[str]:
    with _hops(f"{what}: GET /v1/models", via="gateway", unreachable="gateway", secrets=secrets):
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
    total, lap = _Timer(), _Timer()
    what = f"{model.alias} via key {key_spec.alias!r}"
    oai = openai_client(http, base, client_key, spec.timeouts)
    checks: list[Check] = []
    usage: list[CallUsage] = []

    ids = await _check_scope(oai, key_spec, what=what, hop="key-scope", secrets=secrets)
    checks.append(Check(name="/v1/models = key scope", seconds=lap.lap(), detail=", ".join(ids)))

    if model.role == "fim":
        with _hops(f"{what}: FIM via /v1/completions", via="gateway", unreachable="gateway", secrets=secrets):
            text, u = await fim_once(oai, model.alias)
        judge_fim(text, hop="model", where=f"{what}: FIM via /v1/completions")
        usage.append(_usage(model.alias, "completions", u))
        checks.append(Check(name="FIM via /v1/completions", seconds=lap.lap(), detail=_excerpt(text, *secrets)))
    else:
        with _hops(f"{what}: /v1/chat/completions", via="gateway", unreachable="gateway", secrets=secrets):
            text, u = await chat_once(oai, model, model.alias)
        if not text.strip():
            raise SmokeFailed(f"{what}: /v1/chat/completions returned an empty answer", hop="model")
        usage.append(_usage(model.alias, "chat", u))
        checks.append(Check(name="chat via /v1/chat/completions", seconds=lap.lap(), detail=_excerpt(text, *secrets)))

    if spec.embeddings_alias in key_spec.models:
        with _hops(
            f"{spec.embeddings_alias} via key {key_spec.alias!r}", via="gateway", unreachable="gateway", secrets=secrets
        ):
            emb = await oai.embeddings.create(model=spec.embeddings_alias, input="def add(a, b): return a + b")
        if not emb.data or not emb.data[0].embedding:
            raise SmokeFailed(f"{spec.embeddings_alias} via key {key_spec.alias!r}: empty embedding", hop="model")
        usage.append(_usage(spec.embeddings_alias, "embeddings", emb.usage))
        checks.append(Check(name="embeddings", seconds=lap.lap(), detail=f"dim {len(emb.data[0].embedding)}"))

    return SmokeResult(
        kind="gateway",
        target=model.alias,
        key_alias=key_spec.alias,
        checks=checks,
        total_s=total.lap(),
        excerpt=_excerpt(text, *secrets),
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
    total, lap = _Timer(), _Timer()
    what = f"{model.alias} tool loop"
    checks: list[Check] = []
    usage: list[CallUsage] = []
    messages: list[Any] = [{"role": "user", "content": AGENT_PROMPT}]
    schema = WEATHER_TOOL["function"]["parameters"]

    with _hops(f"{what}: tool_choice=required", via="gateway", unreachable="gateway", secrets=secrets):
        first = await oai.chat.completions.create(
            model=model.alias,
            messages=messages,
            tools=_TOOLS,
            tool_choice="required",
            max_tokens=128,
            temperature=0,
        )
    usage.append(_usage(model.alias, "chat", first.usage))
    msg = first.choices[0].message if first.choices else None
    calls = list(msg.tool_calls or []) if msg else []
    if not calls:
        raise SmokeFailed(
            f"{what}: tool_choice=required returned no tool_calls (finish_reason="
            f"{first.choices[0].finish_reason if first.choices else None!r}, content="
            f"{_excerpt(msg.content if msg else '', *secrets)!r}); the server needs --enable-auto-tool-choice "
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
            f"{what}: tool arguments {_excerpt(fn.arguments, *secrets)!r} do not match the schema ({reason})",
            hop="model",
        ) from None
    checks.append(
        Check(
            name="tool_choice=required -> valid get_weather call",
            seconds=lap.lap(),
            detail=_excerpt(fn.arguments, *secrets),
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
    with _hops(f"{what}: answer from the tool result", via="gateway", unreachable="gateway", secrets=secrets):
        final = await oai.chat.completions.create(model=model.alias, messages=messages, max_tokens=96, temperature=0)
    usage.append(_usage(model.alias, "chat", final.usage))
    answer = (final.choices[0].message.content or "") if final.choices else ""
    markers = [str(result["temperature_c"]), str(result["condition"])]
    if not any(m in answer.lower() for m in markers):
        raise SmokeFailed(
            f"{what}: the final answer does not use the tool result (expected {markers!r} in it), got "
            f"{_excerpt(answer, *secrets)!r}",
            hop="model",
        )
    checks.append(Check(name="role:tool result used in the answer", seconds=lap.lap(), detail=_excerpt(answer)))

    diagnostics = []
    with _hops(f"{what}: tool_choice=auto", via="gateway", unreachable="gateway", secrets=secrets):
        auto = await oai.chat.completions.create(
            model=model.alias,
            messages=[{"role": "user", "content": AGENT_PROMPT}],
            tools=_TOOLS,
            tool_choice="auto",
            max_tokens=128,
            temperature=0,
        )
    usage.append(_usage(model.alias, "chat", auto.usage))
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
        excerpt=_excerpt(answer, *secrets),
        usage=usage,
        diagnostics=diagnostics,
    )


class ExecResultLike(Protocol):
    @property
    def exit_code(self) -> int: ...
    @property
    def stdout(self) -> str: ...
    @property
    def stderr(self) -> str: ...


ExecFn = Callable[[ApiClient, str, str, list[str], float], "Awaitable[ExecResultLike] | ExecResultLike"]

OPENWEBUI_MODELS_CMD = [
    "sh",
    "-c",
    'curl -s -H "Authorization: Bearer $OPENAI_API_KEY" $OPENAI_API_BASE_URL/models',
]


async def smoke_frontends(
    api: ApiClient,
    spec: StackSpec,
    exec_fn: ExecFn,
    gateway_base_url: str,
    *,
    http: httpx.AsyncClient | None = None,
    openwebui: bool = True,
    tabby: bool = True,
) -> SmokeResult:
    """Open WebUI lists exactly its key's scope, asked from inside its pod with its own environment; the key
    Tabby is configured with completes a FIM prompt through the gateway (the coder-fim model must be up)."""
    total, lap = _Timer(), _Timer()
    checks: list[Check] = []
    usage: list[CallUsage] = []
    excerpt = ""
    own_http = http is None
    client = http or make_client(spec.timeouts)
    try:
        if openwebui:
            ks = spec.key_delivered_to("openwebui-secrets")
            if ks is None:
                raise SpecError(
                    "no key in spec.virtual_keys is delivered to openwebui-secrets; nothing to check Open WebUI with"
                )
            fe = spec.frontend("open-webui")
            if fe is None:
                raise SpecError(
                    "spec.frontends has no Open WebUI front-end (a Deployment named or labelled 'open-webui'); "
                    "nothing to smoke"
                )
            ns, who = spec.experience_namespace, fe.name
            res = exec_fn(api, ns, fe.selector, OPENWEBUI_MODELS_CMD, spec.timeouts.request_s)
            if inspect.isawaitable(res):
                res = await res
            out = redact(res.stdout or "")
            if res.exit_code != 0:
                raise SmokeFailed(
                    f"{who}: curl to $OPENAI_API_BASE_URL/models exited {res.exit_code} "
                    f"({redact(res.stderr or '', limit=200)!r}); can the pod reach the gateway?",
                    hop="frontend",
                )
            try:
                body = json.loads(res.stdout)
            except ValueError:
                raise SmokeFailed(f"{who}: /models answered non-JSON {out[:200]!r}", hop="frontend") from None
            if not isinstance(body, dict) or "data" not in body:
                etype, msg = error_detail(body)
                raise SmokeFailed(
                    f"{who}: the gateway refused Open WebUI's key ({etype}: {msg}); run the keys flow",
                    hop="frontend",
                )
            ids = [str(m.get("id")) for m in body.get("data") or [] if isinstance(m, dict)]
            scope_mismatch(ids, ks.models, what=f"{who} (its own OPENAI_API_KEY)", hop="frontend")
            checks.append(
                Check(name=f"{who} pod: /models = key scope", seconds=lap.lap(), detail=", ".join(sorted(ids)))
            )
            # The curl above uses the pod's $OPENAI_API_KEY. Open WebUI itself uses it only if its environment
            # wins over the connection it stored at first launch (docs: PersistentConfig variables such as
            # OPENAI_API_KEY(S) are read from the environment at the first launch only, unless
            # ENABLE_PERSISTENT_CONFIG is False). Ask the same pod's environment.
            probe = exec_fn(api, ns, fe.selector, PERSISTENT_CONFIG_PROBE_CMD, spec.timeouts.request_s)
            if inspect.isawaitable(probe):
                probe = await probe
            try:
                if probe.exit_code != 0:
                    raise ValueError(f"exited {probe.exit_code}")
                value = parse_persistent_config_probe(probe.stdout or "")
            except ValueError as e:
                raise SmokeFailed(
                    f"{who}: could not read {PERSISTENT_CONFIG_VAR} in the pod ({e}); the check of the key Open "
                    "WebUI itself uses needs a shell in its container",
                    hop="frontend",
                ) from None
            if not env_wins_for(value):
                seen = "is not set (default True)" if value is None else "is 'true'"
                raise SmokeFailed(
                    f"{who}: {PERSISTENT_CONFIG_VAR} {seen} in the pod, so Open WebUI uses the OpenAI connection "
                    "stored in its database at its first launch, not $OPENAI_API_KEY, so this check cannot prove "
                    f"the key Open WebUI calls the gateway with (a re-minted or rotated key never reaches it). Set "
                    f"{PERSISTENT_CONFIG_VAR}=False on deploy/{who} (or in the Secret {spec.openwebui_secret} if it "
                    "loads it via envFrom) and restart it",
                    hop="frontend",
                )
            checks.append(
                Check(
                    name=f"{who} pod: {PERSISTENT_CONFIG_VAR} lets the environment win",
                    seconds=lap.lap(),
                    detail="the app uses $OPENAI_API_KEY",
                )
            )
        if tabby:
            ks = spec.key_delivered_to("tabby-config")
            if ks is None:
                raise SpecError("no key in spec.virtual_keys is delivered to tabby-config; nothing to check Tabby with")
            data = await read_secret(api, spec.experience_namespace, spec.tabby_config_secret)
            raw = (data or {}).get(TABBY_CONFIG_KEY)
            cfg = parse_tabby_config(raw) if raw is not None else None
            where = f"{spec.experience_namespace}/{spec.tabby_config_secret}"
            if cfg is None:
                raise SmokeFailed(
                    f"tabby: {where} has no config.toml with [model.completion.http] api_key; run the keys flow",
                    hop="frontend",
                )
            expected_endpoint = spec.gateway_incluster_url + "/v1"
            problems = []
            if cfg.kind != "vllm/completion":
                problems.append(f"kind {cfg.kind!r} (want 'vllm/completion')")
            if cfg.api_endpoint.rstrip("/") != expected_endpoint:
                problems.append(f"api_endpoint {cfg.api_endpoint!r} (want {expected_endpoint!r})")
            if cfg.prompt_template != FIM_PROMPT_TEMPLATE:
                problems.append(f"prompt_template {cfg.prompt_template!r} (want the Qwen FIM tokens)")
            if cfg.model_name != tabby_fim_alias(spec, ks):
                problems.append(f"model_name {cfg.model_name!r}")
            if problems:
                raise SmokeFailed(f"tabby: {where} config.toml is wrong: {'; '.join(problems)}", hop="frontend")
            secrets = (cfg.api_key.get_secret_value(),)
            oai = openai_client(client, gateway_base_url, cfg.api_key, spec.timeouts)
            with _hops("tabby's key: FIM via the gateway", via="gateway", unreachable="gateway", secrets=secrets):
                # Streamed, as Tabby's vllm/completion backend calls: the gateway may meter this differently
                text, u, request_id = await fim_streamed(oai, cfg.model_name, fim_prompt(template=cfg.prompt_template))
            judge_fim(text, hop="model", where="tabby's key: FIM via the gateway")
            usage.append(
                _usage(cfg.model_name, "completions", u, streamed=True, request_id=request_id, key_alias=ks.alias)
            )
            excerpt = _excerpt(text, *secrets)
            checks.append(
                Check(name="tabby config key: streamed FIM through the gateway", seconds=lap.lap(), detail=excerpt)
            )
    finally:
        if own_http:
            await client.aclose()
    return SmokeResult(
        kind="frontends",
        target=", ".join(
            f.name for f in spec.frontends if (f.app == "open-webui" and openwebui) or (f.app == "tabby" and tabby)
        ),
        checks=checks,
        total_s=total.lap(),
        excerpt=excerpt,
        usage=usage,
    )


__all__ = [
    "FIM_EXPECTED",
    "FIM_STOP",
    "KEY_HOPS",
    "OPENWEBUI_MODELS_CMD",
    "WEATHER_TOOL",
    "CallUsage",
    "Check",
    "ExecFn",
    "SmokeResult",
    "chat_once",
    "fim_once",
    "fim_prompt",
    "fim_streamed",
    "judge_fim",
    "refuse_fim_through_chat",
    "run_weather_tool",
    "scope_mismatch",
    "smoke_agent",
    "smoke_direct",
    "smoke_frontends",
    "smoke_gateway",
]
