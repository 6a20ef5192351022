"""Stand-in for the vLLM OpenAI-compatible server (image ``vllm/vllm-openai``), as vLLM 0.32.0 answers.

Held to the exchanges recorded from real vLLM 0.32.0 (``devtools/simstack/recordings/vllm-0.32.0.jsonl``, replayed by
``tests/conformance/test_vllm_conformance.py``): open ``/health`` (empty body), ``/version`` and ``/metrics``
(every recorded ``vllm:*`` family), bearer auth on ``/v1/*`` only, every answer naming the first served
name, vLLM's error bodies (400 "Bad Request" pydantic lists, 404 ``NotFoundError``, int ``code``), its
vLLM-only null fields, stream chunks as recorded. Recorded prompts get the recorded texts token for token
(``recorded_answers``); unrecorded ones run to ``max_tokens`` like the recorded answers do. Whatever no
recording shows is marked ``GUESS``.

Configuration, as the real server reads it: ``--model`` (or the positional model after ``serve``),
``--served-model-name`` (one or more), ``--api-key`` or env ``VLLM_API_KEY``, ``--enable-auto-tool-choice``
with ``--tool-call-parser``, ``--task embed`` (also ``--runner pooling`` / ``--convert embed``),
``--max-model-len``, ``--gpu-memory-utilization`` (vLLM's default 0.9): the share of the GPU a server asks
for when it starts (``startup_memory_error``: vLLM's own check and message; the simulated kubelet calls it
with the node's GPU memory and what the other servers on that GPU hold).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import re
import secrets
import struct
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from aiohttp import web

from simstack.recordings import VLLM, Exchange, quotable
from simstack.standins import FACTORIES, ContainerRun, RunningBackend, SimServices
from simstack.standins._server import (
    Handler,
    bearer_token,
    counting_middleware,
    expand_k8s_vars,
    json_response,
    serve,
)

IMAGE = "vllm/vllm-openai"
VERSION = "0.32.0"
EMBED_DIM = 384
DEFAULT_MAX_MODEL_LEN = 32768
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's CacheConfig.gpu_memory_utilization default
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
EOS_TOKENS = ("<|endoftext|>", "<|fim_pad|>", "<|im_end|>")

# --------------------------------------------------------------------------------------------------
# Tokens: Qwen2's pre-tokenizer split (letters with one leading non-letter, single digits, punctuation
# runs with their newlines, whitespace runs that leave the last space to the next word), control tokens
# whole. For ordinary text each piece is one Qwen token: the recorded streams split exactly so
# (chat-reverse-stream, tools-required-stream). The pieces concatenate back to the text.

_L = r"[^\W\d_]"  # a letter
_TOKEN_RE = re.compile(
    r"<\|[a-z_]+\|>"
    r"|'(?:[sStTmMdD]|[rR][eE]|[vV][eE]|[lL][lL])"
    rf"|(?:[^\r\n\w]|_)?{_L}+"
    r"|\d"
    r"| ?(?:[^\s\w]|_)+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


def tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    return len(tokenize(text))


def _hex16() -> str:
    """vLLM 0.32's random id tail: 16 hex digits (chatcmpl-…, cmpl-…, chatcmpl-tool-…, modelperm-…)."""
    return secrets.token_hex(8)


# --------------------------------------------------------------------------------------------------
# Configuration from args/env.


@dataclass
class VllmConfig:
    model: str
    served_names: list[str]
    api_key: str | None
    auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    embed: bool = False
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION

    @property
    def name(self) -> str:
        return self.served_names[0]


def parse_args(args: list[str], env: dict[str, str]) -> VllmConfig:
    argv = [expand_k8s_vars(a, env) for a in args]
    # "--flag=value" -> "--flag", "value"
    tokens: list[str] = []
    for a in argv:
        if a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            tokens += [k, v]
        else:
            tokens.append(a)
    model: str | None = None
    served: list[str] = []
    api_key: str | None = None
    cfg: dict[str, Any] = {
        "auto": False,
        "parser": None,
        "embed": False,
        "max_len": DEFAULT_MAX_MODEL_LEN,
        "gpu_util": DEFAULT_GPU_MEMORY_UTILIZATION,
    }
    i = 0
    positional: list[str] = []
    while i < len(tokens):
        t = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if t == "--model" and nxt is not None:
            model = nxt
            i += 2
        elif t == "--served-model-name":
            i += 1
            while i < len(tokens) and not tokens[i].startswith("--"):
                served.append(tokens[i])
                i += 1
        elif t == "--api-key" and nxt is not None:
            api_key = nxt
            i += 2
        elif t == "--enable-auto-tool-choice":
            cfg["auto"] = True
            i += 1
        elif t == "--tool-call-parser" and nxt is not None:
            cfg["parser"] = nxt
            i += 2
        elif t in ("--task", "--convert") and nxt is not None:
            cfg["embed"] = cfg["embed"] or nxt in ("embed", "embedding")
            i += 2
        elif t == "--runner" and nxt is not None:
            cfg["embed"] = cfg["embed"] or nxt == "pooling"
            i += 2
        elif t == "--max-model-len" and nxt is not None:
            with contextlib.suppress(ValueError):
                cfg["max_len"] = int(nxt.lower().replace("k", "000"))
            i += 2
        elif t == "--gpu-memory-utilization" and nxt is not None:
            with contextlib.suppress(ValueError):
                cfg["gpu_util"] = float(nxt)
            i += 2
        elif t.startswith("--"):
            # unknown flag: swallow its value if it has one
            i += 2 if nxt is not None and not nxt.startswith("--") else 1
        else:
            positional.append(t)
            i += 1
    if model is None:
        pos = [p for p in positional if p != "serve"]
        model = pos[0] if pos else None
    if api_key is None:
        api_key = env.get("VLLM_API_KEY") or None
    if model is None:
        model = served[0] if served else "Qwen/Qwen3-0.6B"
    if not served:
        served = [model]
    return VllmConfig(
        model=model,
        served_names=served,
        api_key=api_key,
        auto_tool_choice=cfg["auto"],
        tool_call_parser=cfg["parser"],
        embed=cfg["embed"],
        max_model_len=cfg["max_len"],
        gpu_memory_utilization=cfg["gpu_util"],
    )


# --------------------------------------------------------------------------------------------------
# Start-up: the GPU memory check.

GIB_BYTES = 1 << 30  # vllm/utils/mem_constants.py GiB_bytes
# The check runs in the worker's init_device, before the weights load. In the recorded start
# (recordings/vllm-0.32.0-startup.txt) the worker's first line comes 31.3 s into a 39.3 s start: 0.8 of it.
MEMORY_CHECK_AT = 0.8


def format_gib(b: int) -> float:
    """vllm/utils/mem_utils.py ``format_gib``."""
    return round(b / GIB_BYTES, 2)


def requested_memory(total_memory: int, gpu_memory_utilization: float) -> int:
    """The bytes a server holds on its GPU: ``math.ceil(total * gpu_memory_utilization)`` (vLLM's
    ``request_memory``)."""
    return math.ceil(total_memory * gpu_memory_utilization)


def startup_memory_error(
    gpu_memory_utilization: float, free_memory: int, total_memory: int, device: str = "cuda:0"
) -> str | None:
    """vLLM's start-up memory check, or None when the share is free.

    Copied from vLLM's own source: ``request_memory(init_snapshot, cache_config)`` in
    ``vllm/v1/worker/utils.py``, which ``Worker.init_device`` (``vllm/v1/worker/gpu_worker.py``) calls on a
    fresh ``MemorySnapshot`` (``torch.cuda.mem_get_info``): it raises ``ValueError`` with this text when the
    free memory is less than ``ceil(total * gpu_memory_utilization)``. ``device`` is the snapshot's
    ``torch.device`` (``cuda:0`` for the one GPU a pod sees); numbers through ``format_gib`` (GiB, 2 places)
    and the utilization as the float vLLM parsed.
    """
    requested = requested_memory(total_memory, gpu_memory_utilization)
    if free_memory >= requested:
        return None
    return (
        f"Free memory on device {device} "
        f"({format_gib(free_memory)}/"
        f"{format_gib(total_memory)} GiB) on startup "
        f"is less than desired GPU memory utilization "
        f"({gpu_memory_utilization}, "
        f"{format_gib(requested)} GiB). Decrease GPU memory "
        f"utilization or reduce GPU memory used by other processes."
    )


def startup_failure_log(error: str, when: float | None = None) -> str:
    """The tail of a vLLM 0.32.0 log whose engine failed the memory check; the process then exits 1.

    The ``ValueError: ...`` text is vLLM's own (``startup_memory_error``). GUESS: the lines around it, from
    vLLM's source rather than a recorded failure: ``EngineCoreProc.run_engine_core`` logs "EngineCore failed to
    start." with the traceback (prefixed ``(EngineCore pid=N)`` as in the recorded start) and re-raises, and
    the API server's ``wait_for_engine_startup`` raises ``RuntimeError: Engine core initialization failed. See
    root cause above. Failed core proc(s): {}``; an uncaught exception exits the interpreter with code 1. The
    pids, the source line numbers and the traceback frames in between are not reproduced.
    """
    stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(when))
    api, core = "(APIServer pid=1)", "(EngineCore pid=72)"
    return (
        f"{api} INFO {stamp} [api_utils.py:347]  \u2584\u2584 \u2584\u2588 \u2588     \u2588     "
        f"\u2588 \u2580\u2584\u2580 \u2588  version 0.32.0\n"
        f"{core} ERROR {stamp} [core.py:842] EngineCore failed to start.\n"
        f"{core} ERROR {stamp} [core.py:842] Traceback (most recent call last):\n"
        f"{core} ERROR {stamp} [core.py:842] ValueError: {error}\n"
        f"{core} ValueError: {error}\n"
        f"{api} RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {{}}\n"
    )


# --------------------------------------------------------------------------------------------------
# The "model": deterministic code answers.


def _def_args(arglist: str) -> list[str]:
    out = []
    for part in arglist.split(","):
        name = part.split(":", 1)[0].split("=", 1)[0].strip().lstrip("*")
        if name and name not in ("self", "cls") and name.isidentifier():
            out.append(name)
    return out


def _body_expr(fname: str, args: list[str]) -> str:
    n = fname.lower()
    a = args[0] if args else "x"
    b = args[1] if len(args) > 1 else "y"
    table: list[tuple[tuple[str, ...], str]] = [
        (("subtract", "sub", "minus", "diff"), f"{a} - {b}"),
        (("multiply", "mul", "times", "product"), f"{a} * {b}"),
        (("divide", "div", "quotient"), f"{a} / {b}"),
        (("power", "pow"), f"{a} ** {b}"),
        (("modulo", "mod", "remainder"), f"{a} % {b}"),
        (("maximum", "max", "larger", "bigger"), f"max({a}, {b})" if len(args) > 1 else f"max({a})"),
        (("minimum", "min", "smaller"), f"min({a}, {b})" if len(args) > 1 else f"min({a})"),
        (("is_even", "even"), f"{a} % 2 == 0"),
        (("is_odd", "odd"), f"{a} % 2 == 1"),
        (("square",), f"{a} * {a}"),
        (("cube",), f"{a} ** 3"),
        (("reverse",), f"{a}[::-1]"),
        (("factorial", "fact"), f"1 if {a} <= 1 else {a} * {fname}({a} - 1)"),
        (("fibonacci", "fib"), f"{a} if {a} < 2 else {fname}({a} - 1) + {fname}({a} - 2)"),
        (("greet", "hello"), f'f"Hello, {{{a}}}!"'),
        (("length", "len", "count", "size"), f"len({a})"),
        (("upper",), f"{a}.upper()"),
        (("lower",), f"{a}.lower()"),
        (("add", "sum", "plus", "total"), " + ".join(args) if len(args) > 1 else f"sum({a})"),
    ]
    for keys, expr in table:
        if any(k == n or n.startswith(k + "_") or n.endswith("_" + k) or n.startswith(k) for k in keys):
            return expr
    if not args:
        return "None"
    return " + ".join(args) if len(args) > 1 else a


_DEF_RE = re.compile(r"def\s+(\w+)\s*\(([^)]*)\)")
_SIBLINGS = [
    ("add", "a + b"),
    ("subtract", "a - b"),
    ("multiply", "a * b"),
    ("divide", "a / b"),
    ("power", "a ** b"),
    ("modulo", "a % b"),
    ("maximum", "max(a, b)"),
    ("minimum", "min(a, b)"),
]


def fim_middle(prefix: str, suffix: str) -> str:
    """The middle a code model writes first, given the prefix and suffix."""
    last_line = prefix.rsplit("\n", 1)[-1]
    defs = _DEF_RE.findall(prefix)
    if re.fullmatch(r"\s*return\s*", last_line):
        if defs:
            fname, arglist = defs[-1]
            return _body_expr(fname, _def_args(arglist))
        return "None"
    if re.search(r"def\s+\w+\s*\([^)]*\)\s*(->\s*[^:]+)?:\s*$", prefix) and defs:
        fname, arglist = defs[-1]
        def_line = prefix.rstrip().rsplit("\n", 1)[-1]
        body_indent = def_line[: len(def_line) - len(def_line.lstrip())] + "    "
        expr = f"return {_body_expr(fname, _def_args(arglist))}"
        if re.search(r"\n[ \t]+$", prefix):
            return expr
        if prefix.endswith("\n"):
            return body_indent + expr
        return "\n" + body_indent + expr
    if re.fullmatch(r"\s*", last_line) and not prefix.strip():
        return "def main():\n    pass"
    return "pass"


def run_on(prefix: str, middle: str) -> Iterator[str]:
    """What a base model keeps writing after the middle: more functions, never stopping by itself."""
    seen = {name for name, _ in _DEF_RE.findall(prefix + middle)}
    for name, expr in _SIBLINGS:
        if name not in seen:
            yield f"\n\ndef {name}(a, b):\n    return {expr}"
    i = 2
    while True:
        yield f"\n\ndef add_{i}(a, b):\n    return a + b + {i}"
        i += 1


def parse_fim(prompt: str) -> tuple[str, str] | None:
    m = re.search(r"<\|fim_prefix\|>(.*?)<\|fim_suffix\|>(.*?)<\|fim_middle\|>", prompt, re.S)
    if m is None:
        return None
    return m.group(1), m.group(2)


def completion_stream(prompt: str) -> Iterator[str]:
    """Endless text continuation of a raw prompt (FIM or plain)."""
    fim = parse_fim(prompt)
    if fim is not None:
        prefix, suffix = fim
    else:
        prefix, suffix = prompt, ""
    middle = fim_middle(prefix, suffix)
    yield middle
    yield from run_on(prefix, middle)


_CANNED: list[tuple[tuple[str, ...], str]] = [
    (("reverse", "string"), "```python\ndef reverse_string(s):\n    return s[::-1]\n```"),
    (
        ("fizzbuzz",),
        '```python\nfor i in range(1, 101):\n    print("FizzBuzz" if i % 15 == 0 else "Fizz" if i % 3 == 0 '
        'else "Buzz" if i % 5 == 0 else i)\n```',
    ),
    (("fibonacci",), "```python\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n```"),
    (("sort", "list"), "```python\nsorted_list = sorted(items)\n```"),
    (("add", "two"), "```python\ndef add(a, b):\n    return a + b\n```"),
    (("hello", "world"), '```python\nprint("Hello, world!")\n```'),
    (("read", "file"), '```python\nwith open("file.txt") as f:\n    data = f.read()\n```'),
    (
        ("prime",),
        "```python\ndef is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))\n```",
    ),
]


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _run_on_chat() -> Iterator[str]:
    """GUESS: what an instruct model keeps writing after its answer when it does not stop (the recordings
    show answers cut by max_tokens, never what comes after): more explanation, then example after example."""
    yield (
        "\n\nThis works because the function does one small thing and returns its result, so it is easy to test"
        " and to reuse. You can call it from anywhere in your code."
    )
    i = 1
    while True:
        yield f"\n\n### Example {i}\n\n```python\nresult = solution({i})\nprint(result)\n```\n\n"
        yield f"This prints the result for {i}."
        i += 1


def chat_answer(messages: list[dict[str, Any]]) -> Iterator[str]:
    """The text an unrecorded chat prompt gets: it never ends by itself (``finish_reason`` "length"), as the
    recorded answers (chat-hi, chat-reverse) run to max_tokens. GUESS: the words, beyond the recorded ones."""
    all_text = " ".join(_text_of(m.get("content")) for m in messages)
    user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    if any(t in all_text for t in FIM_TOKENS):
        # GUESS: the chat template escapes the control tokens: the model sees odd markup, not a FIM task.
        yield (
            "It looks like your message contains special markers such as fim_prefix, fim_suffix and "
            "fim_middle. I'm not sure what you would like me to do with them. Could you describe the "
            "code you want me to write?"
        )
        yield from _run_on_chat()
        return
    low = user.lower()
    words = set(re.findall(r"[a-z]+", low))
    for keys, code in _CANNED:
        if all(k in words or k in low for k in keys):
            # GUESS: prose first, then the code, as the recorded chat-reverse answer does ("code only" is
            # not obeyed).
            yield f"In Python, you can do this in a few lines. Here's a simple code snippet:\n\n{code}"
            yield from _run_on_chat()
            return
    if words & {"hi", "hello", "hey"} or not words:
        # Recorded (chat-hi, no temperature): "Hello! How can I assist you today". GUESS: what follows.
        yield "Hello! How can I assist you today? If you have a question about code, just ask."
        yield from _run_on_chat()
        return
    if low.strip(" .!") in ("ok", "say ok", "reply ok") or "say ok" in low or "reply with ok" in low:
        yield "OK"  # GUESS: obeyed, then runs on like every unrecorded answer
        yield from _run_on_chat()
        return
    topic = "_".join(sorted(words, key=lambda w: (-len(w), w))[:2]) or "task"
    yield f"Here is a simple starting point:\n\n```python\ndef {topic}():\n    pass\n```"
    yield from _run_on_chat()


def tokens_of(pieces: Iterator[str]) -> Iterator[str]:
    for piece in pieces:
        yield from tokenize(piece)


# --------------------------------------------------------------------------------------------------
# Recorded answers: prompts the recording holds are answered with the recorded texts, token for token.


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


# --------------------------------------------------------------------------------------------------
# Tool calls.


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


_STOPWORDS = {
    "a",
    "an",
    "the",
    "of",
    "for",
    "to",
    "in",
    "on",
    "at",
    "me",
    "my",
    "is",
    "it",
    "and",
    "or",
    "from",
    "with",
}


def pick_tool(tools: list[dict[str, Any]], user: str) -> dict[str, Any]:
    """The offered tool that best matches the user's words (names, description, parameter names)."""
    uw = _words(user) - _STOPWORDS

    def score(t: dict[str, Any]) -> int:
        fn = t.get("function", {})
        props = (fn.get("parameters") or {}).get("properties") or {}
        text = " ".join([fn.get("name", ""), fn.get("description", ""), *props]).replace("_", " ")
        tw = _words(text) - _STOPWORDS
        bonus = 0
        if re.search(r"[\w/-]+\.\w{1,5}\b", user) and tw & {"file", "path", "filename"}:
            bonus += 2
        if re.search(r"\b(?:in|for|at)\s+[A-Z]", user) and tw & {"city", "location", "place"}:
            bonus += 2
        return len(uw & tw) + bonus

    best = max(range(len(tools)), key=lambda i: (score(tools[i]), -i))
    return tools[best]


_STOP_CAPS = {
    "What",
    "Whats",
    "What's",
    "How",
    "The",
    "Please",
    "Can",
    "Could",
    "Tell",
    "Get",
    "Is",
    "I",
    "Use",
    "Call",
}


def _guess_string(name: str, schema: dict[str, Any], user: str) -> str:
    n = name.lower()
    quoted = re.findall(r"[\"'`]([^\"'`]+)[\"'`]", user)
    if any(k in n for k in ("city", "location", "place", "town", "country", "region")):
        m = re.search(r"\b(?:in|for|at|of|near)\s+([A-Z][\w-]*(?:\s+[A-Z][\w-]*)*)", user)
        if m:
            return m.group(1)
        caps = [w for w in re.findall(r"\b[A-Z][a-zA-Z-]+", user) if w not in _STOP_CAPS]
        return caps[0] if caps else "Paris"
    if "unit" in n:
        return "fahrenheit" if "fahrenheit" in user.lower() else "celsius"
    if any(k in n for k in ("path", "file")):
        m = re.search(r"[\w./-]+\.\w+", user)
        return m.group(0) if m else "main.py"
    if any(k in n for k in ("url", "link")):
        m = re.search(r"https?://\S+", user)
        return m.group(0) if m else "https://example.com"
    if quoted:
        return quoted[0]
    if any(
        k in n for k in ("query", "question", "text", "prompt", "message", "code", "command", "expression", "input")
    ):
        return user.strip() or "example"
    caps = [w for w in re.findall(r"\b[A-Z][a-zA-Z-]+", user) if w not in _STOP_CAPS]
    return caps[0] if caps else "example"


def schema_value(name: str, schema: dict[str, Any], user: str, depth: int = 0) -> Any:
    if not isinstance(schema, dict):
        return "example"
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        for v in schema["enum"]:
            if isinstance(v, str) and v.lower() in user.lower():
                return v
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            opts = [s for s in schema[key] if isinstance(s, dict) and s.get("type") != "null"]
            return schema_value(name, opts[0] if opts else {}, user, depth)
    typ = schema.get("type", "string")
    if isinstance(typ, list):
        typ = next((t for t in typ if t != "null"), "string")
    if typ == "string":
        return _guess_string(name, schema, user)
    if typ in ("integer", "number"):
        m = re.search(r"-?\d+(?:\.\d+)?", user)
        val: float = float(m.group(0)) if m else 1.0
        if "minimum" in schema:
            val = max(val, float(schema["minimum"]))
        if "maximum" in schema:
            val = min(val, float(schema["maximum"]))
        return int(val) if typ == "integer" else val
    if typ == "boolean":
        return True
    if typ == "array":
        items = schema.get("items", {"type": "string"})
        count = max(1, int(schema.get("minItems", 1)))
        return [schema_value(name, items, user, depth + 1) for _ in range(count)]
    if typ == "object":
        if depth > 4:
            return {}
        props = schema.get("properties") or {}
        required = schema.get("required") or list(props)
        return {k: schema_value(k, props.get(k, {}), user, depth + 1) for k in required}
    if typ == "null":
        return None
    return "example"


def tool_arguments(tool: dict[str, Any], user: str) -> dict[str, Any]:
    params = tool.get("function", {}).get("parameters") or {"type": "object", "properties": {}}
    props = params.get("properties") or {}
    required = params.get("required")
    keys = list(required) if required is not None else list(props)
    return {k: schema_value(k, props.get(k, {}), user) for k in keys}


def tool_call(tool: dict[str, Any], user: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-tool-{_hex16()}",
        "type": "function",
        "function": {
            "name": tool["function"]["name"],
            "arguments": json.dumps(tool_arguments(tool, user), ensure_ascii=False),
        },
    }


# --------------------------------------------------------------------------------------------------
# Server.


class VllmError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def response(self) -> web.Response:
        # error.code is the HTTP status as an int (every recorded error: err-*).
        return json_response(
            {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}},
            status=self.status,
        )


def _input_repr(value: Any) -> str:
    """vLLM's rendering of a pydantic error's ``input`` (err-malformed-json, err-missing-messages)."""
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"  # GUESS: lists are summarised like dicts
    return repr(value)


def validation_error(errors: list[dict[str, Any]]) -> VllmError:
    """A request-validation failure: 400 "Bad Request", the pydantic error list as the message, the first
    location as ``param`` (err-malformed-json, err-missing-messages)."""
    n = len(errors)
    message = f"{n} validation error{'s' if n != 1 else ''}:\n" + "\n".join(f"  {e!r}" for e in errors)
    return VllmError(400, message, "Bad Request", str(errors[0]["loc"]))


@dataclass
class Generation:
    text: str
    completion_tokens: int
    finish_reason: str  # stop | length
    stop_reason: str | None = None
    deltas: list[str] = field(default_factory=list)  # text each generated token released (one chunk each)


def generate(tokens: Iterator[str], max_tokens: int, stop: list[str], include_stop: bool = False) -> Generation:
    """Take tokens until ``max_tokens``, cut at the first stop string, as vLLM does.

    ``tokens`` ending means the model wrote EOS: that token is counted too (tools-auto: 16 text tokens,
    completion_tokens 17; tool-loop-answer likewise) and finishes "stop" with ``stop_reason`` None. With stop
    strings, up to len(longest stop)-1 characters are held back from each chunk (fim-stop-stream: three
    empty chunks, then "a + b" with the finish)."""
    hold = max((len(s) for s in stop), default=1) - 1 if stop and not include_stop else 0
    longest = max((len(s) for s in stop), default=0)
    text = ""
    emitted = 0
    deltas: list[str] = []
    n = 0
    for tok in tokens:
        n += 1
        before = len(text)
        text += tok
        for s in stop:
            idx = text.find(s, max(0, before - longest + 1)) if s else -1
            if idx != -1:
                final = text[: idx + len(s) if include_stop else idx]
                deltas.append(final[emitted:])
                return Generation(final, n, "stop", s, deltas)
        if n >= max_tokens:
            deltas.append(text[emitted:])
            return Generation(text, n, "length", None, deltas)
        visible = max(emitted, len(text) - hold)
        deltas.append(text[emitted:visible])
        emitted = visible
    deltas.append(text[emitted:])  # the EOS token's chunk: whatever was held back, and the finish
    return Generation(text, n + 1, "stop", None, deltas)


def _stop_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for s in value if isinstance(s, str)]
    raise VllmError(400, "stop must be a string or a list of strings")  # GUESS: message


# Qwen2.5's chat template (what the prompt token count is taken of). GUESS: counted with the stand-in's
# tokenizer, so prompt_tokens are near, not equal to, the recorded ones (chat-hi: 30).
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_HERMES_TOOLS = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function "
    "call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def chat_prompt_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    system = QWEN_SYSTEM
    rest = messages
    if messages and messages[0].get("role") == "system":
        system, rest = _text_of(messages[0].get("content")), messages[1:]
    if tools:
        system += _HERMES_TOOLS.format(tools="\n".join(json.dumps(t) for t in tools))
    parts = [f"<|im_start|>system\n{system}<|im_end|>\n"]
    for m in rest:
        role = m.get("role")
        content = _text_of(m.get("content"))
        if role == "tool":
            parts.append(f"<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n")
            continue
        for c in m.get("tool_calls") or []:
            fn = c.get("function") or {} if isinstance(c, dict) else {}
            content += (
                f'\n<tool_call>\n{{"name": "{fn.get("name")}", "arguments": {fn.get("arguments")}}}\n</tool_call>'
            )
        parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


# --------------------------------------------------------------------------------------------------
# /metrics: the stand-in's own model of vLLM 0.32.0's exposition (prometheus_client's text format, as vLLM
# writes it): each vllm:* family with its type, HELP, label dimensions and buckets, written down here from
# vLLM's metric definitions; the values are this stand-in's. Conformance holds the rendered families, types
# and label sets to the recorded exposition (exchange "metrics", held out: nothing here reads it).

_SAMPLE_RE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_HISTOGRAMS_TIMED = (
    "e2e_request_latency_seconds",
    "request_inference_time_seconds",
    "request_decode_time_seconds",
)
# (name without "vllm:", type, label dimensions beside engine and model_name, HELP)
_METRIC_FAMILIES: tuple[tuple[str, str, tuple[tuple[str, tuple[str, ...]], ...], str], ...] = (
    (
        "estimated_flops_per_gpu_total",
        "counter",
        (),
        "Estimated number of floating point operations per GPU (for Model Flops Utilization calculations).",
    ),
    (
        "estimated_read_bytes_per_gpu_total",
        "counter",
        (),
        "Estimated number of bytes read from memory per GPU (for Model Flops Utilization calculations).",
    ),
    (
        "estimated_write_bytes_per_gpu_total",
        "counter",
        (),
        "Estimated number of bytes written to memory per GPU (for Model Flops Utilization calculations).",
    ),
    ("num_requests_running", "gauge", (), "Number of requests in model execution batches."),
    ("num_requests_waiting", "gauge", (), "Number of requests waiting to be processed."),
    (
        "num_requests_waiting_by_reason",
        "gauge",
        (("reason", ("capacity", "deferred")),),
        "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",  # noqa: E501
    ),
    (
        "engine_sleep_state",
        "gauge",
        (("sleep_state", ("awake", "weights_offloaded", "discard_all")),),
        "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",  # noqa: E501
    ),
    ("kv_cache_usage_perc", "gauge", (), "KV-cache usage. 1 means 100 percent usage."),
    ("prefix_cache_queries_total", "counter", (), "Prefix cache queries, in terms of number of queried tokens."),
    ("prefix_cache_hits_total", "counter", (), "Prefix cache hits, in terms of number of cached tokens."),
    (
        "external_prefix_cache_queries_total",
        "counter",
        (),
        "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.",  # noqa: E501
    ),
    (
        "external_prefix_cache_hits_total",
        "counter",
        (),
        "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.",  # noqa: E501
    ),
    ("mm_cache_queries_total", "counter", (), "Multi-modal cache queries, in terms of number of queried items."),
    ("mm_cache_hits_total", "counter", (), "Multi-modal cache hits, in terms of number of cached items."),
    ("num_preemptions_total", "counter", (), "Cumulative number of preemption from the engine."),
    ("prompt_tokens_total", "counter", (), "Number of prefill tokens processed."),
    (
        "prompt_tokens_by_source_total",
        "counter",
        (("source", ("local_compute", "local_cache_hit", "external_kv_transfer")),),
        "Number of prompt tokens by source.",
    ),
    ("prompt_tokens_cached_total", "counter", (), "Number of cached prompt tokens (local + external)."),
    (
        "prompt_tokens_cached_by_source_total",
        "counter",
        (("source", ("device", "host", "p2p", "disk", "external_unspecified")),),
        "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + vllm:external_prefix_cache_hits.",  # noqa: E501
    ),
    ("generation_tokens_total", "counter", (), "Number of generation tokens processed."),
    (
        "request_success_total",
        "counter",
        (("finished_reason", ("stop", "length", "abort", "error", "repetition")),),
        "Count of successfully processed requests.",
    ),
    (
        "admission_rejections_total",
        "counter",
        (("reason", ("max_num_queued_reqs", "max_num_queued_tokens")),),
        "Number of admission attempts rejected by a queue limit, by reason.",
    ),
    ("request_prompt_tokens", "histogram", (), "Number of prefill tokens processed."),
    ("request_generation_tokens", "histogram", (), "Number of generation tokens processed."),
    ("iteration_tokens_total", "histogram", (), "Histogram of number of tokens per engine_step."),
    (
        "request_max_num_generation_tokens",
        "histogram",
        (),
        "Histogram of maximum number of requested generation tokens.",
    ),
    ("request_params_n", "histogram", (), "Histogram of the n request parameter."),
    ("request_params_max_tokens", "histogram", (), "Histogram of the max_tokens request parameter."),
    ("time_to_first_token_seconds", "histogram", (), "Histogram of time to first token in seconds."),
    ("inter_token_latency_seconds", "histogram", (), "Histogram of inter-token latency in seconds."),
    (
        "request_time_per_output_token_seconds",
        "histogram",
        (),
        "Histogram of time_per_output_token_seconds per request.",
    ),
    ("e2e_request_latency_seconds", "histogram", (), "Histogram of e2e request latency in seconds."),
    ("request_queue_time_seconds", "histogram", (), "Histogram of time spent in WAITING phase for request."),
    ("request_inference_time_seconds", "histogram", (), "Histogram of time spent in RUNNING phase for request."),
    ("request_prefill_time_seconds", "histogram", (), "Histogram of time spent in PREFILL phase for request."),
    ("request_decode_time_seconds", "histogram", (), "Histogram of time spent in DECODE phase for request."),
    ("request_num_preemptions", "histogram", (), "Histogram of the number of times a request was preempted."),
    (
        "request_prefill_kv_computed_tokens",
        "histogram",
        (),
        "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
    ),
    ("cache_config_info", "gauge", (), "Information of the LLMEngine CacheConfig"),
    (
        "tool_call_parser_invocations_total",
        "counter",
        (
            ("mode", ("streaming", "non_streaming")),
            ("outcome", ("tool_call", "no_tool_call")),
            ("request_type", ("chat_completions", "responses", "other")),
        ),
        "Total number of ToolParser invocations. Non-streaming increments once per choice; streaming increments once per delta.",  # noqa: E501
    ),
)

_NO_ENGINE_LABEL = frozenset({"admission_rejections_total", "tool_call_parser_invocations_total"})
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)  # vLLM's 1-2-5 buckets up to max_model_len/2
_REQUEST_SECONDS = (0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680)
_TOKEN_SECONDS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
_BUCKETS: dict[str, tuple[float, ...]] = {
    "request_prompt_tokens": _TOKEN_BUCKETS,
    "request_generation_tokens": _TOKEN_BUCKETS,
    "iteration_tokens_total": (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
    "request_max_num_generation_tokens": _TOKEN_BUCKETS,
    "request_params_n": (1, 2, 5, 10, 20),
    "request_params_max_tokens": _TOKEN_BUCKETS,
    "time_to_first_token_seconds": (
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640, 2560
    ),
    "inter_token_latency_seconds": _TOKEN_SECONDS,
    "request_time_per_output_token_seconds": _TOKEN_SECONDS,
    "e2e_request_latency_seconds": _REQUEST_SECONDS,
    "request_queue_time_seconds": _REQUEST_SECONDS,
    "request_inference_time_seconds": _REQUEST_SECONDS,
    "request_prefill_time_seconds": _REQUEST_SECONDS,
    "request_decode_time_seconds": _REQUEST_SECONDS,
    "request_num_preemptions": (1, 2, 3, 4, 5, 10, 20),
    "request_prefill_kv_computed_tokens": _TOKEN_BUCKETS,
}  # fmt: skip
# GUESS: the cache configuration of the recorded CPU build (values of a GPU build differ; nothing reads them)
_CACHE_CONFIG_INFO = {
    "_block_size_resolved": "True", "block_size": "128", "cache_dtype": "auto", "cache_hit_alignment_tokens": "None",
    "effective_attention_block_size": "128", "enable_mamba_shared_prefix_checkpoint": "False",
    "enable_prefix_caching": "True", "gpu_memory_utilization": "0.92", "hash_block_size": "None",
    "is_attention_free": "False", "kv_cache_dtype_skip_layers": "[]", "kv_cache_layout": "None",
    "kv_cache_max_concurrency": "42.65625", "kv_cache_memory_bytes": "2147483648", "kv_cache_size_tokens": "174720",
    "kv_offloading_backend": "native", "kv_offloading_size": "None", "kv_sharing_fast_prefill": "False",
    "mamba_block_size": "None", "mamba_cache_dtype": "auto", "mamba_cache_mode": "none",
    "mamba_page_size_padded": "None", "mamba_ssm_cache_dtype": "auto", "num_cpu_blocks": "None",
    "num_gpu_blocks": "1365", "num_gpu_blocks_override": "None", "prefix_cache_retention_interval": "0",
    "prefix_caching_hash_algo": "sha256", "prefix_match_unit": "None", "replayssm_buffer_len": "16",
    "skip_page_size_padded": "None", "sliding_window": "None", "swa_bounded_replay": "True",
    "use_kda_recoverssm": "False", "use_replayssm": "False", "user_specified_block_size": "False",
}  # fmt: skip


def _label_sets(dims: tuple[tuple[str, tuple[str, ...]], ...]) -> list[dict[str, str]]:
    sets: list[dict[str, str]] = [{}]
    for key, vals in dims:
        sets = [d | {key: v} for d in sets for v in vals]
    return sets


def _label_text(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


@dataclass
class Metrics:
    running: int = 0
    waiting: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    started: float = field(default_factory=time.time)
    success: dict[str, int] = field(
        default_factory=lambda: {"stop": 0, "length": 0, "abort": 0, "error": 0, "repetition": 0}
    )
    hist: dict[str, list[float]] = field(default_factory=dict)
    tool_parser: dict[tuple[str, str], int] = field(default_factory=dict)  # (mode, outcome) -> invocations

    def observe(self, name: str, value: float) -> None:
        self.hist.setdefault(name, []).append(float(value))

    def _value(self, kind: str, name: str, labels: dict[str, str]) -> float:
        short = name.removeprefix("vllm:")
        if short.endswith("_created"):
            return self.started
        if kind == "histogram":
            for suffix in ("_bucket", "_count", "_sum"):
                if short.endswith(suffix):
                    obs = self.hist.get(short.removesuffix(suffix), [])
                    if suffix == "_count":
                        return float(len(obs))
                    if suffix == "_sum":
                        return float(sum(obs))
                    le = labels.get("le", "+Inf")
                    return float(len(obs) if le == "+Inf" else sum(1 for v in obs if v <= float(le)))
        if short == "num_requests_running":
            return float(self.running)
        if short == "num_requests_waiting":
            return float(self.waiting)
        if short == "num_requests_waiting_by_reason":
            return float(self.waiting if labels.get("reason") == "capacity" else 0)
        if short == "kv_cache_usage_perc":
            return 0.01 * self.running  # GUESS: 1 % of the KV cache per running request
        if short in ("prompt_tokens_total", "prefix_cache_queries_total"):
            return float(self.prompt_tokens)
        if short == "prompt_tokens_by_source_total":
            return float(self.prompt_tokens if labels.get("source") == "local_compute" else 0)
        if short == "generation_tokens_total":
            return float(self.generation_tokens)
        if short == "request_success_total":
            return float(self.success.get(labels.get("finished_reason", ""), 0))
        if short == "tool_call_parser_invocations_total":
            if labels.get("request_type") != "chat_completions":
                return 0.0
            return float(self.tool_parser.get((labels.get("mode", ""), labels.get("outcome", "")), 0))
        if short == "engine_sleep_state":
            return 1.0 if labels.get("sleep_state") == "awake" else 0.0  # the stand-in never sleeps
        if short == "cache_config_info":
            return 1.0  # an info gauge
        # GUESS: the other counters (prefix-cache hits, preemptions, FLOPs estimates ...) stay 0.
        return 0.0

    def render(self, model: str) -> str:
        """The exposition as prometheus_client writes vLLM's metrics: every counter and histogram followed
        by its ``_created`` gauge family."""
        lines: list[str] = []
        for short, kind, dims, help_text in _METRIC_FAMILIES:
            base = {} if short in _NO_ENGINE_LABEL else {"engine": "0"}
            # vLLM declares finished_reason before model_name; every other dimension comes after it
            sets = [
                base | {k: v for k, v in d.items() if k == "finished_reason"} | {"model_name": model} | d
                for d in _label_sets(dims)
            ]
            if short == "cache_config_info":
                sets = [dict(sorted((_CACHE_CONFIG_INFO | {"engine": "0"}).items()))]
            name = f"vllm:{short}"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for lab in sets:
                if kind == "histogram":
                    for le_text in (*(repr(float(b)) for b in _BUCKETS[short]), "+Inf"):
                        value = self._value(kind, f"{name}_bucket", lab | {"le": le_text})
                        lines.append(f"{name}_bucket{_label_text(lab | {'le': le_text})} {value!r}")
                    for suffix in ("_count", "_sum"):
                        lines.append(f"{name}{suffix}{_label_text(lab)} {self._value(kind, name + suffix, lab)!r}")
                else:
                    lines.append(f"{name}{_label_text(lab)} {self._value(kind, name, lab)!r}")
            if kind in ("counter", "histogram"):
                created = f"{name.removesuffix('_total') if kind == 'counter' else name}_created"
                lines += [f"# HELP {created} {help_text}", f"# TYPE {created} gauge"]
                lines += [f"{created}{_label_text(lab)} {self.started!r}" for lab in sets]
        return "\n".join(lines) + "\n"


class VllmServer:
    def __init__(self, cfg: VllmConfig, run: ContainerRun, services: SimServices) -> None:
        self.cfg = cfg
        self.run = run
        self.services = services
        self.metrics = Metrics()
        self.created = int(time.time())
        # GUESS: a constant per configuration (the recording shows one value, vllm-0.32.0-c3c853d5).
        digest = hashlib.sha256(json.dumps([cfg.model, cfg.served_names, cfg.max_model_len]).encode()).hexdigest()
        self.fingerprint = f"vllm-{VERSION}-{digest[:8]}"

    # ---- app
    def app(self) -> web.Application:
        names = [self.run.app or "vllm"]
        if "vllm" not in names:
            names.append("vllm")
        app = web.Application(
            middlewares=[counting_middleware(self.services.counters, names), self._auth],
            client_max_size=64 * 1024 * 1024,
        )
        app.router.add_get("/health", self.health)
        app.router.add_get("/ping", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics_route)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Only /v1/* needs the key (health-noauth, version, metrics are open); 401 body is a bare string.
        if self.cfg.api_key and request.path.startswith("/v1") and request.method != "OPTIONS":
            token = bearer_token(request)
            if token is None or not secrets.compare_digest(token, self.cfg.api_key):
                return json_response({"error": "Unauthorized"}, status=401)
        try:
            return await handler(request)
        except VllmError as e:
            return e.response()

    # ---- open routes
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)  # empty body, no content-type (health-noauth)

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": VERSION})

    async def metrics_route(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(self.cfg.name).encode(),
            headers={"Content-Type": "text/plain; version=1.0.0; charset=utf-8"},
        )

    # ---- /v1
    async def models(self, request: web.Request) -> web.Response:
        now = int(time.time())  # GUESS: the recording's "created" equals the clock at the request
        data = [
            {
                "id": name,
                "object": "model",
                "created": now,
                "owned_by": "vllm",
                "root": self.cfg.model,
                "parent": None,
                "max_model_len": self.cfg.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{_hex16()}",
                        "object": "model_permission",
                        "created": now,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for name in self.cfg.served_names
        ]
        return json_response({"object": "list", "data": data})

    async def _body(self, request: web.Request, required: tuple[str, ...] = ()) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            # GUESS: an empty body is a missing body
            raise validation_error([{"type": "missing", "loc": "body", "msg": "Field required", "input": None}])
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            pos = e.pos if isinstance(e, json.JSONDecodeError) else e.start
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "Invalid UTF-8"
            raise validation_error(
                [
                    {
                        "type": "json_invalid",
                        "loc": f"body.{pos}",
                        "msg": "JSON decode error",
                        "input": _input_repr({}),
                        "ctx": {"error": msg},
                    }
                ]
            ) from e
        if not isinstance(body, dict):
            # GUESS: pydantic's model_type error
            raise validation_error(
                [
                    {
                        "type": "model_attributes_type",
                        "loc": "body",
                        "msg": "Input should be a valid dictionary or object to extract fields from",
                        "input": _input_repr(body),
                    }
                ]
            )
        missing = [k for k in required if k not in body]
        if missing:
            raise validation_error(
                [
                    {"type": "missing", "loc": f"body.{k}", "msg": "Field required", "input": _input_repr(body)}
                    for k in missing
                ]
            )
        return body

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model not in self.cfg.served_names:
            raise VllmError(
                404,
                f"The model `{model}` does not exist. Valid aliases: {', '.join(self.cfg.served_names)}.",
                "NotFoundError",
                "model",
            )

    def _max_tokens(self, body: dict[str, Any], prompt_tokens: int, default: int | None) -> int:
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        value = body.get(key)
        if value is None:
            value = default if default is not None else self.cfg.max_model_len - prompt_tokens
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise VllmError(400, f"max_tokens must be at least 1, got {value}.", param=key)  # GUESS: message
        if value > self.cfg.max_model_len:  # err-max-tokens-100000, err-completions-max-tokens-100000
            raise VllmError(
                400,
                f"max_tokens={value} cannot be greater than max_model_len={self.cfg.max_model_len}. Please request "
                f"fewer output tokens. (parameter=max_tokens, value={value})",
                param="max_tokens",
            )
        if prompt_tokens + value > self.cfg.max_model_len:
            # GUESS: the message of the prompt-plus-completion check (not recorded)
            raise VllmError(
                400,
                f"This model's maximum context length is {self.cfg.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + value} tokens ({prompt_tokens} in the messages, {value} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="max_tokens",
            )
        return value

    async def _decode_pause(self) -> None:
        """Between streamed tokens: the configured decode time (SimServices.vllm_decode_s), else a yield."""
        await asyncio.sleep(max(0.0, self.services.vllm_decode_s) * self.services.time_scale)

    def _account(
        self, prompt_tokens: int, gen: Generation | None, completion_tokens: int, finish: str, t0: float, body: Any
    ) -> None:
        """Count one finished request in /metrics."""
        m = self.metrics
        m.prompt_tokens += prompt_tokens
        m.generation_tokens += completion_tokens
        key = finish if finish in m.success else "stop"
        m.success[key] = m.success.get(key, 0) + 1
        elapsed = time.monotonic() - t0
        m.observe("request_prompt_tokens", prompt_tokens)
        m.observe("request_prefill_kv_computed_tokens", prompt_tokens)
        m.observe("request_generation_tokens", completion_tokens)
        m.observe("request_max_num_generation_tokens", completion_tokens)
        m.observe("request_params_n", int(body.get("n") or 1) if isinstance(body, dict) else 1)
        max_tokens = body.get("max_tokens") if isinstance(body, dict) else None
        if isinstance(max_tokens, int):
            m.observe("request_params_max_tokens", max_tokens)
        m.observe("request_num_preemptions", 0)
        m.observe("request_queue_time_seconds", 0.0)
        m.observe("time_to_first_token_seconds", elapsed)
        m.observe("request_prefill_time_seconds", elapsed)
        for name in _HISTOGRAMS_TIMED:
            m.observe(name, elapsed)
        if completion_tokens > 1:
            m.observe("request_time_per_output_token_seconds", 0.0)
            for _ in range(min(completion_tokens - 1, 10000)):
                m.observe("inter_token_latency_seconds", 0.0)

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        }

    def _tool_answer(
        self, body: dict[str, Any], messages: list[dict[str, Any]], tools: list[dict[str, Any]], tool_choice: Any
    ) -> tuple[list[dict[str, Any]], int, str, str | None]:
        """A tool call forced by ``tool_choice`` (required or named): (calls, completion tokens, finish, content)."""
        user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        if isinstance(tool_choice, dict):
            fname = (tool_choice.get("function") or {}).get("name")
            tool = next((t for t in tools if t.get("function", {}).get("name") == fname), None)
            if tool is None:
                raise VllmError(400, f"Tool '{fname}' has not been passed in `tools`.")  # GUESS: message
            call = tool_call(tool, user)
            # GUESS: a named tool call finishes "stop" with content "" (no recording)
            return [call], count_tokens(call["function"]["arguments"]) + 1, "stop", ""
        rec = recorded_answers().get(("chat", _norm_messages(messages), "required"))
        if rec is not None and rec.call is not None and rec.call_tokens is not None:
            name, arguments = rec.call  # tools-required, tool-loop-required
            call = {
                "id": f"chatcmpl-tool-{_hex16()}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            return [call], rec.call_tokens, "tool_calls", ""
        call = tool_call(pick_tool(tools, user), user)
        # GUESS: guided decoding writes [{"name": ..., "parameters": {...}}] and EOS; recorded calls are 25
        # tokens for {"city": "Paris"}, this count gives 17 for it.
        guided = json.dumps(
            [{"name": call["function"]["name"], "parameters": json.loads(call["function"]["arguments"])}]
        )
        return [call], count_tokens(guided) + 1, "tool_calls", ""

    def _text_tokens(self, body: dict[str, Any], messages: list[dict[str, Any]], mode: str) -> Iterator[str]:
        """The model's tokens for a prompt answered in text (EOS = the iterator ends)."""
        rec = recorded_answers().get(("chat", _norm_messages(messages), mode))
        if rec is not None and rec.call is None:
            return continue_recorded(rec, after_recorded("chat", "", "".join(rec.tokens)))
        tools = body.get("tools") or []
        user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        last_user_idx = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        after_user = messages[last_user_idx + 1 :]
        if any(m.get("role") == "tool" for m in after_user):
            return tokens_of(_after_tool_result(user, after_user))
        if mode == "auto" and tools:
            call = tool_call(pick_tool(tools, user), user)
            # Qwen2.5-Coder writes the call as bare JSON, no <tool_call> tags: the parser finds nothing and
            # it is the content, finish "stop" (tools-auto).
            plain = json.dumps(
                {"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])},
                ensure_ascii=False,
            )
            return iter(tokenize(plain))
        return tokens_of(chat_answer(messages))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        if self.cfg.embed:
            raise VllmError(400, "The model does not support Chat Completions API")  # GUESS: message
        body = await self._body(request, required=("messages",))
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            # GUESS: pydantic's list error for messages
            raise validation_error(
                [
                    {
                        "type": "list_type",
                        "loc": "body.messages",
                        "msg": "Input should be a valid list",
                        "input": _input_repr(messages),
                    }
                ]
            )
        self._check_model(body)
        model = self.cfg.name  # every answer names the FIRST served name (all recorded answers)
        tools = body.get("tools") or []
        prompt_tokens = count_tokens(chat_prompt_text(messages, tools))
        max_tokens = self._max_tokens(body, prompt_tokens, None)
        stop = _stop_list(body.get("stop"))
        n = int(body.get("n") or 1)

        tool_choice = body.get("tool_choice")
        if tools and tool_choice is None:
            tool_choice = "auto"
        if tool_choice is None:
            tool_choice = "none"
        if tool_choice == "auto" and tools and not (self.cfg.auto_tool_choice and self.cfg.tool_call_parser):
            raise VllmError(
                400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
            )  # GUESS: message (from vLLM's source, not recorded)
        if tool_choice not in ("none", "auto", "required") and not isinstance(tool_choice, dict):
            raise VllmError(400, f"Invalid value for tool_choice: {tool_choice!r}")  # GUESS: message
        if tool_choice == "required" and not tools:
            raise VllmError(400, "When using `tool_choice`, `tools` must be set.")  # GUESS: message

        last_user_idx = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        has_tool_result = any(m.get("role") == "tool" for m in messages[last_user_idx + 1 :])
        calls: list[dict[str, Any]] = []
        gen: Generation | None = None
        content: str | None
        if tools and (tool_choice == "required" or isinstance(tool_choice, dict)):
            calls, completion_tokens, finish, content = self._tool_answer(body, messages, tools, tool_choice)
            stop_reason: str | None = None
        elif tool_choice == "auto" and tools and not has_tool_result and not self.services.vllm_auto_tool_habit:
            # Hook: a model that uses the hermes tags gets a proper call. GUESS: content None, finish tool_calls.
            user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
            calls = [tool_call(pick_tool(tools, user), user)]
            completion_tokens, finish, content, stop_reason = (
                count_tokens(calls[0]["function"]["arguments"]) + 5,
                "tool_calls",
                None,
                None,
            )
        else:
            mode = "auto" if tools and tool_choice == "auto" else "none"
            gen = generate(
                self._text_tokens(body, messages, mode), max_tokens, stop, bool(body.get("include_stop_str_in_output"))
            )
            content, finish, stop_reason, completion_tokens = (
                gen.text,
                gen.finish_reason,
                gen.stop_reason,
                gen.completion_tokens,
            )

        rid = f"chatcmpl-{_hex16()}"
        created = int(time.time())
        if tools and self.cfg.tool_call_parser and tool_choice == "auto":
            mode_key = "streaming" if body.get("stream") else "non_streaming"
            outcome = "tool_call" if calls else "no_tool_call"
            steps = (len(gen.deltas) if gen else 2 + len(calls)) if body.get("stream") else n
            self.metrics.tool_parser[(mode_key, outcome)] = self.metrics.tool_parser.get((mode_key, outcome), 0) + steps
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream_chat(
                request, rid, created, model, n, gen, calls, finish, prompt_tokens, completion_tokens, include_usage,
                t0, body,
            )  # fmt: skip
        self._account(prompt_tokens, gen, completion_tokens * n, finish, t0, body)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
        }
        if calls:
            message["tool_calls"] = calls  # absent, not [], when there are none (chat-hi)
        message["reasoning"] = None
        return json_response(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": i,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": stop_reason,
                        "token_ids": None,
                        "routed_experts": None,
                    }
                    for i in range(n)
                ],
                "service_tier": None,
                "system_fingerprint": self.fingerprint,
                "usage": self._usage(prompt_tokens, completion_tokens * n),
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "prompt_text": None,
                "kv_transfer_params": None,
                "ec_transfer_params": None,
                "metrics": None,
            }
        )

    async def _sse(self, request: web.Request, events: AsyncIterator[dict[str, Any]]) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        self.metrics.running += 1
        try:
            async for ev in events:
                await resp.write(f"data: {json.dumps(ev, ensure_ascii=False, separators=(',', ':'))}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        finally:
            self.metrics.running -= 1
        await resp.write_eof()
        return resp

    async def _stream_chat(
        self,
        request: web.Request,
        rid: str,
        created: int,
        model: str,
        n: int,
        gen: Generation | None,
        calls: list[dict[str, Any]],
        finish: str,
        prompt_tokens: int,
        completion_tokens: int,
        include_usage: bool,
        t0: float,
        body: dict[str, Any],
    ) -> web.StreamResponse:
        """Chunks as chat-reverse-stream(-usage) and tools-required-stream show them."""

        def chunk(choice: dict[str, Any], **top: Any) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [choice], **top}  # fmt: skip

        def step(i: int, delta: dict[str, Any], last: bool, stop_reason: str | None = None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
            if last:
                choice["finish_reason"] = finish
                choice["stop_reason"] = stop_reason
            choice["token_ids"] = None
            # system_fingerprint rides on the stream's last chunk: the usage chunk if there is one.
            fp = {"system_fingerprint": self.fingerprint} if last and i == n - 1 and not include_usage else {}
            return chunk(choice, **fp)

        async def events() -> AsyncIterator[dict[str, Any]]:
            try:
                for i in range(n):
                    first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}  # fmt: skip
                    yield chunk(first, prompt_token_ids=None, prompt_text=None)
                for i in range(n):
                    if calls:
                        for j, c in enumerate(calls):
                            head = {
                                "id": c["id"],
                                "type": "function",
                                "index": j,
                                "function": {"name": c["function"]["name"]},
                            }
                            yield step(i, {"content": None, "tool_calls": [head]}, False)
                            for piece in tokenize(c["function"]["arguments"]):
                                yield step(
                                    i,
                                    {"content": None, "tool_calls": [{"index": j, "function": {"arguments": piece}}]},
                                    False,
                                )
                                await asyncio.sleep(0)
                        yield step(i, {}, True)
                    else:
                        assert gen is not None
                        for k, delta in enumerate(gen.deltas):
                            last = k == len(gen.deltas) - 1
                            yield step(i, {"content": delta}, last, gen.stop_reason if last else None)
                            await self._decode_pause()
                if include_usage:
                    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens * n,
                             "completion_tokens": completion_tokens * n}  # fmt: skip
                    yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": usage, "system_fingerprint": self.fingerprint}  # fmt: skip
                self._account(prompt_tokens, gen, completion_tokens * n, finish, t0, body)
            except (ConnectionResetError, asyncio.CancelledError):
                self.metrics.success["abort"] += 1
                raise

        return await self._sse(request, events())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        if self.cfg.embed:
            raise VllmError(400, "The model does not support Completions API")  # GUESS: message
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            prompts = [" ".join(f"t{p}" for p in prompt)]
        else:
            # GUESS: message
            raise VllmError(400, "Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
        self._check_model(body)
        model = self.cfg.name  # the FIRST served name, whichever was asked for (fim-nostop)
        n = int(body.get("n") or 1)
        stop = _stop_list(body.get("stop"))
        include_stop = bool(body.get("include_stop_str_in_output"))
        prompt_tokens_each = [count_tokens(p) for p in prompts]
        max_tokens = self._max_tokens(body, max(prompt_tokens_each), 16)
        gens = [generate(self._completion_tokens(p), max_tokens, stop, include_stop) for p in prompts]
        prompt_tokens = sum(prompt_tokens_each)
        completion_tokens = sum(g.completion_tokens for g in gens) * n
        rid = f"cmpl-{_hex16()}"
        created = int(time.time())
        echo = bool(body.get("echo"))
        choices = []
        for pi, g in enumerate(gens):
            for k in range(n):
                choices.append((pi * n + k, prompts[pi] if echo else "", g))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            def chunk(idx: int, text: str, g: Generation, last: bool, final: bool) -> dict[str, Any]:
                choice = {"index": idx, "text": text, "logprobs": None,
                          "finish_reason": g.finish_reason if last else None,
                          "stop_reason": g.stop_reason if last else None,
                          "prompt_token_ids": None, "token_ids": None}  # fmt: skip
                fp = {"system_fingerprint": self.fingerprint} if final and not include_usage else {}
                return {"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [choice], **fp}  # fmt: skip

            async def events() -> AsyncIterator[dict[str, Any]]:
                for c, (idx, echoed, g) in enumerate(choices):
                    for j, delta in enumerate(g.deltas):
                        last = j == len(g.deltas) - 1
                        yield chunk(idx, (echoed if j == 0 else "") + delta, g, last, last and c == len(choices) - 1)
                        await self._decode_pause()
                if include_usage:
                    # GUESS: the completions usage chunk is shaped like the recorded chat one
                    yield {
                        "id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                                  "completion_tokens": completion_tokens},
                        "system_fingerprint": self.fingerprint,
                    }  # fmt: skip
                for g in gens:
                    self._account(0, g, g.completion_tokens * n, g.finish_reason, t0, body)
                self.metrics.prompt_tokens += prompt_tokens

            return await self._sse(request, events())
        for g in gens:
            self._account(0, g, g.completion_tokens * n, g.finish_reason, t0, body)
        self.metrics.prompt_tokens += prompt_tokens
        return json_response(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": idx,
                        "text": echoed + g.text,
                        "logprobs": None,
                        "finish_reason": g.finish_reason,
                        "stop_reason": g.stop_reason,
                        "token_ids": None,
                        "prompt_logprobs": None,
                        "prompt_token_ids": None,
                        "routed_experts": None,
                    }
                    for idx, echoed, g in choices
                ],
                "service_tier": None,
                "system_fingerprint": self.fingerprint,
                "usage": self._usage(prompt_tokens, completion_tokens),
                "kv_transfer_params": None,
                "ec_transfer_params": None,
                "metrics": None,
            }
        )

    @staticmethod
    def _completion_tokens(prompt: str) -> Iterator[str]:
        """A raw prompt's tokens: the recorded answer (fim-nostop) and its continuation, else the FIM/code
        model's own; a base model never stops by itself (finish "length")."""
        rec = recorded_answers().get(("completions", prompt, "none"))
        if rec is not None:
            return continue_recorded(rec, after_recorded("completions", prompt, "".join(rec.tokens)))
        return tokens_of(completion_stream(prompt))

    async def embeddings(self, request: web.Request) -> web.Response:
        if not self.cfg.embed:
            raise VllmError(400, "The model does not support Embeddings API")
        body = await self._body(request)
        inp = body.get("input")
        if isinstance(inp, str):
            texts = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(x, str) for x in inp):
            texts = list(inp)
        elif isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
            texts = [" ".join(map(str, inp))]
        elif isinstance(inp, list) and inp and all(isinstance(x, list) for x in inp):
            texts = [" ".join(map(str, x)) for x in inp]
        else:
            raise VllmError(400, "input: Field required (a string or a list of strings)")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise VllmError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}")
        data = []
        for i, t in enumerate(texts):
            vec = embed_vector(t)
            emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if fmt == "base64" else vec
            data.append({"index": i, "object": "embedding", "embedding": emb})
        prompt_tokens = sum(count_tokens(t) + 2 for t in texts)
        self.metrics.prompt_tokens += prompt_tokens
        self.metrics.success["stop"] += len(texts)
        return json_response(
            {
                "id": f"embd-{_hex16()}",  # GUESS: embeddings are not recorded
                "object": "list",
                "created": int(time.time()),
                "model": body.get("model") or self.cfg.name,
                "data": data,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0},
            }
        )


def embed_vector(text: str, dim: int = EMBED_DIM) -> list[float]:
    """Deterministic unit vector from a hash of the text."""
    raw = hashlib.shake_256(text.encode()).digest(dim * 2)
    vals = [(int.from_bytes(raw[2 * i : 2 * i + 2], "little") / 32767.5) - 1.0 for i in range(dim)]
    norm = sum(v * v for v in vals) ** 0.5 or 1.0
    return [v / norm for v in vals]


async def start_vllm(run: ContainerRun, services: SimServices) -> RunningBackend:
    cfg = parse_args(run.args, run.env)
    server = VllmServer(cfg, run, services)
    return await serve(server.app())


FACTORIES[IMAGE] = start_vllm
