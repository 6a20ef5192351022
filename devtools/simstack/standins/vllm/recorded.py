"""Recorded answers: prompts the recording (``devtools/simstack/recordings``, vLLM 0.32.0) holds are answered with
the recorded texts, token for token (``recorded_answers``), and what the model writes after them: past a cut
by ``max_tokens`` (``after_recorded``) and after a tool result (``_after_tool_result``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from simstack.recordings import VLLM, Exchange, quotable
from simstack.standins.vllm.text import _run_on_chat, _text_of, completion_stream, tokenize, tokens_of


def _norm_messages(messages: Any) -> str:
    """A recorded chat prompt's key: roles, texts and tool calls (names, arguments), not the call ids."""
    out = []
    for m in messages if isinstance(messages, list) else []:
        if not isinstance(m, dict):
            return ""
        calls = [
            (c.get("function", {}).get("name"), c.get("function", {}).get("arguments"))
            for c in m.get("tool_calls") or []
            if isinstance(c, dict)
        ]
        out.append([m.get("role"), _text_of(m.get("content")), calls])
    return json.dumps(out)


def _tool_mode(body: dict[str, Any]) -> str:
    choice = body.get("tool_choice")
    if not body.get("tools"):
        return "none"
    if isinstance(choice, dict):
        return "named:" + str((choice.get("function") or {}).get("name"))
    return str(choice or "auto")


@dataclass
class Recorded:
    """What the real model wrote for one prompt: its tokens and whether it ended there by itself."""

    tokens: list[str]
    ends: bool  # finish_reason "stop" without a stop string: EOS came right after these tokens
    call: tuple[str, str] | None = None  # tool_choice "required": (name, arguments)
    call_tokens: int | None = None


def _recorded_tokens(ex: Exchange) -> list[str]:
    if ex.is_stream:
        toks: list[str] = []
        for payload in ex.body:
            if payload == "[DONE]":
                continue
            for c in json.loads(payload).get("choices") or []:
                t = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                if t:
                    toks.append(t)
        return toks
    ch = ex.body["choices"][0]
    return tokenize(ch.get("text") if "text" in ch else ch["message"].get("content") or "")


@cache
def recorded_answers() -> dict[tuple[str, str, str], Recorded]:
    """(endpoint, prompt key, tool mode) -> the recorded answer, from devtools/simstack/recordings (vLLM 0.32.0)."""
    out: dict[tuple[str, str, str], Recorded] = {}
    for ex in quotable(VLLM):  # held-out exchanges are matched by the stand-in's own logic
        body = ex.request.get("body")
        if ex.status != 200 or not isinstance(body, dict) or body.get("stop"):
            continue  # answers cut by a stop string are what generate() makes of the uncut ones
        if ex.path == "/v1/completions" and isinstance(body.get("prompt"), str):
            key = ("completions", body["prompt"], "none")
        elif ex.path == "/v1/chat/completions":
            key = ("chat", _norm_messages(body.get("messages")), _tool_mode(body))
        else:
            continue
        if ex.is_stream:
            finish = [
                c.get("finish_reason")
                for p in ex.body
                if p != "[DONE]"
                for c in json.loads(p).get("choices") or []
                if c.get("finish_reason")
            ]
            ends = finish == ["stop"]
        else:
            ch = ex.body["choices"][0]
            ends = ch.get("finish_reason") == "stop" and ch.get("stop_reason") is None
        rec = Recorded(_recorded_tokens(ex), ends)
        if not ex.is_stream and ex.body["choices"][0].get("message", {}).get("tool_calls"):
            fn = ex.body["choices"][0]["message"]["tool_calls"][0]["function"]
            rec = Recorded([], True, (fn["name"], fn["arguments"]), ex.body["usage"]["completion_tokens"])
        elif ex.is_stream and key in out:
            continue  # the non-streamed twin is as good; a streamed tool call has no text
        prev = out.get(key)
        if prev is None or (len(rec.tokens) > len(prev.tokens) and not prev.call):
            out[key] = rec
    return out


def continue_recorded(rec: Recorded, after: Iterator[str]) -> Iterator[str]:
    """The recorded tokens, then, if the model did not stop there, ``after``'s tokens."""
    yield from rec.tokens
    if not rec.ends:
        yield from tokens_of(after)


_REVERSE_RUN_ON = (
    'input_string = "Hello, World!"\nreversed_string = reverse_string(input_string)\n'
    "print(reversed_string)  # Output: !dlroW ,olleH\n```"
)


def after_recorded(kind: str, prompt: str, recorded_text: str) -> Iterator[str]:
    """GUESS: the text after a recorded answer that max_tokens cut (the recording does not show it)."""
    if kind == "completions":
        # The FIM model's own continuation (completion_stream starts with the recorded text).
        text = ""
        gen = completion_stream(prompt)
        for piece in gen:
            text += piece
            if len(text) >= len(recorded_text):
                break
        yield text[len(recorded_text) :]
        yield from gen
        return
    lines = recorded_text.splitlines(keepends=True)
    if len(lines) > 1 and len(set(lines)) == 1:
        while True:  # the model was repeating one line (tools-followup): it goes on repeating it
            yield lines[0]
    if recorded_text.endswith("# Example usage\n"):
        yield _REVERSE_RUN_ON
    yield from _run_on_chat()


def _after_tool_result(user: str, after_user: list[dict[str, Any]]) -> Iterator[str]:
    """GUESS, generalised from tools-followup and tool-loop-answer: told to answer ("... then answer in one
    sentence") the model answers in one sentence from the tool result and stops; otherwise it repeats the
    call as bare JSON, line after line, until max_tokens."""
    result = next((_text_of(m.get("content")) for m in reversed(after_user) if m.get("role") == "tool"), "")
    if re.search(r"\banswer\b", user, re.IGNORECASE):
        try:
            data = json.loads(result)
        except ValueError:
            data = None
        if isinstance(data, dict) and {"city", "condition"} <= set(data):
            t = data.get("temperature_c")
            tail = f" with a temperature of {t} degrees Celsius." if t is not None else "."
            yield f"The weather in {data['city']} is {data['condition']}{tail}"
        else:
            yield f"The result is: {result.strip()}."
        return
    call = next(
        (
            c
            for m in after_user
            if m.get("role") == "assistant"
            for c in m.get("tool_calls") or []
            if isinstance(c, dict)
        ),
        None,
    )
    if call is not None:
        fn = call.get("function") or {}
        try:
            args: Any = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = fn.get("arguments")
        line = json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False) + "\n"
    else:
        line = result.strip() + "\n"
    while True:
        yield line
