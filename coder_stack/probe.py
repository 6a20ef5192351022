"""One call to an OpenAI-compatible server (vLLM or the LiteLLM gateway), judged, and what a report keeps of it.

What every smoke shares: the prompts and how an answer is judged (a real model answers the chat prompt with
171 characters and runs FIM on past the hole: judge the *start*), the result models (:class:`SmokeResult`,
:class:`Check`, :class:`CallUsage`, which clip whatever a model says instead of failing on its length), and
:func:`hops`, which turns openai/httpx errors into :class:`SmokeFailed` naming the hop that broke — ``pod``,
``service``, ``gateway``, ``key``, ``key-scope``, ``budget``, ``model``, ``frontend``.

FIM goes to raw ``/v1/completions`` with the Qwen FIM tokens, never to ``/v1/chat/completions`` (the chat
template mangles the control tokens): :func:`chat_once` refuses a FIM model outright.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import httpx
import openai
import openai.resources  # openai loads it on first use: ~1.7 s here, after the model is up (bench)
from openai import AsyncOpenAI
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from coder_stack.errors import SmokeFailed, SpecError, redact
from coder_stack.spec import ModelSpec
from coder_stack.transport import error_detail

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


FIM_PROMPT_TEMPLATE = "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
"""Qwen2.5-Coder's fill-in-the-middle format, sent raw to /v1/completions (no server flag; no chat template)."""


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


def excerpt(text: str | None, *secrets: str) -> str:
    """The start of an answer, redacted, at most EXCERPT_CHARS long (redaction first, so no secret is cut
    into a piece the patterns no longer recognise)."""
    clean = redact((text or "").strip(), *secrets, limit=len(text or "") + 1)
    return clean if len(clean) <= EXCERPT_CHARS else clean[: EXCERPT_CHARS - 1] + "…"


class Timer:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def lap(self) -> float:
        now = time.monotonic()
        dt, self.t0 = now - self.t0, now
        return round(dt, 4)


# --------------------------------------------------------------------------------------------- errors


@contextmanager
def hops(
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


def usage_of(
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


async def _fim_stream(oai: AsyncOpenAI, model_id: str, prompt: str | None = None) -> AsyncIterator[Any]:
    stream: AsyncIterator[Any] = await oai.completions.create(
        model=model_id,
        prompt=prompt or fim_prompt(),
        max_tokens=FIM_MAX_TOKENS,
        temperature=0,
        stop=FIM_STOP,
        stream=True,
    )
    return stream


async def _collect(
    stream: AsyncIterator[Any], text_of: Callable[[Any], str | None], t0: float
) -> tuple[float | None, str, Any, str | None]:
    """Read a stream to its end: (seconds from ``t0`` to the first text, the text, usage or None, the id)."""
    ttft: float | None = None
    parts: list[str] = []
    usage = None
    request_id: str | None = None
    async for chunk in stream:
        request_id = request_id or getattr(chunk, "id", None)
        text = (text_of(chunk) if chunk.choices else None) or ""
        if text and ttft is None:
            ttft = time.monotonic() - t0
        parts.append(text)
        usage = getattr(chunk, "usage", None) or usage
    return ttft, "".join(parts), usage, request_id


async def fim_streamed(oai: AsyncOpenAI, model_id: str, prompt: str | None = None) -> tuple[str, Any, str | None]:
    """One FIM completion streamed, as Tabby asks for it: (text, usage or None, the answer's id). With stop
    strings the server may hold text back until the last chunk; usage may be absent or all zero."""
    t0 = time.monotonic()
    _, text, usage, request_id = await _collect(await _fim_stream(oai, model_id, prompt), _completion_text, t0)
    return text, usage, request_id


def _completion_text(chunk: Any) -> str | None:
    return chunk.choices[0].text


def _chat_delta(chunk: Any) -> str | None:
    return chunk.choices[0].delta.content


def judge_fim(text: str, *, hop: Hop, where: str) -> None:
    """The start of the middle must be ``a + b``; the model keeps writing code after it if not stopped."""
    if "<|fim" in text or "<|im_" in text:
        raise SmokeFailed(
            f"{where}: the completion contains FIM/chat control tokens ({excerpt(text)!r}): the prompt was "
            "mangled (sent through a chat template?)",
            hop=hop,
        )
    if not re.sub(r"\s+", " ", text).lstrip().startswith(FIM_EXPECTED) and not text.lstrip().startswith("a+b"):
        raise SmokeFailed(
            f"{where}: expected the middle to start with {FIM_EXPECTED!r}, got {excerpt(text)!r}", hop=hop
        )


async def stream_first_token(oai: AsyncOpenAI, model: ModelSpec) -> tuple[float | None, str, Any]:
    """Stream one tiny completion; returns (time to first token, text, usage-or-None)."""
    t0 = time.monotonic()
    if model.role == "fim":
        ttft, text, usage, _ = await _collect(await _fim_stream(oai, model.served_model_name), _completion_text, t0)
    else:
        refuse_fim_through_chat(model)
        cstream: AsyncIterator[Any] = await oai.chat.completions.create(
            model=model.served_model_name,
            messages=[{"role": "user", "content": CHAT_PROMPT}],
            max_tokens=CHAT_MAX_TOKENS,
            temperature=0,
            stream=True,
        )
        ttft, text, usage, _ = await _collect(cstream, _chat_delta, t0)
    return (round(ttft, 4) if ttft is not None else None), text, usage


__all__ = [
    "CHAT_MAX_TOKENS",
    "CHAT_PROMPT",
    "EXCERPT_CHARS",
    "FIM_EXPECTED",
    "FIM_MAX_TOKENS",
    "FIM_PROMPT_TEMPLATE",
    "FIM_STOP",
    "KEY_HOPS",
    "CallUsage",
    "Check",
    "Hop",
    "SmokeResult",
    "Timer",
    "chat_once",
    "clip",
    "excerpt",
    "fim_once",
    "fim_prompt",
    "fim_streamed",
    "hops",
    "judge_fim",
    "refuse_fim_through_chat",
    "stream_first_token",
    "usage_of",
]
