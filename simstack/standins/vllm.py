"""Stand-in for the vLLM OpenAI-compatible server (image ``vllm/vllm-openai``).

Follows ``shared/reference/vllm.md``: open ``/health`` and ``/metrics``, bearer auth on ``/v1/*``, exact
``/v1/models`` shape, vLLM's 404 body for an unknown model, chat (deterministic small code answers,
streaming, tool calls in the hermes parser's shape, Qwen2.5-Coder's ``auto`` habit), raw completions with
Qwen FIM tokens (the middle, then more code until ``max_tokens`` or a stop sequence), embeddings.

Configuration, as the real server reads it: ``--model`` (or the positional model after ``serve``),
``--served-model-name`` (one or more), ``--api-key`` or env ``VLLM_API_KEY``, ``--enable-auto-tool-choice``
with ``--tool-call-parser``, ``--task embed`` (also ``--runner pooling`` / ``--convert embed``),
``--max-model-len``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import secrets
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from simstack.standins import FACTORIES, ContainerRun, RunningBackend, SimServices
from simstack.standins._server import (
    Handler,
    bearer_token,
    counting_middleware,
    expand_k8s_vars,
    json_response,
    read_json,
    serve,
)

IMAGE = "vllm/vllm-openai"
VERSION = "0.32.0"
EMBED_DIM = 384
DEFAULT_MAX_MODEL_LEN = 32768
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
EOS_TOKENS = ("<|endoftext|>", "<|fim_pad|>", "<|im_end|>")

# --------------------------------------------------------------------------------------------------
# Tokens: a crude BPE-like split whose pieces concatenate back to the text.

_TOKEN_RE = re.compile(r"<\|[a-z_]+\|>| ?[A-Za-z_]+| ?\d{1,3}| ?[^\w\s<]+| ?<|\s*\n|\s+")


def tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    return len(tokenize(text))


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
    cfg: dict[str, Any] = {"auto": False, "parser": None, "embed": False, "max_len": DEFAULT_MAX_MODEL_LEN}
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


def chat_answer(messages: list[dict[str, Any]]) -> str:
    all_text = " ".join(_text_of(m.get("content")) for m in messages)
    user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    if any(t in all_text for t in FIM_TOKENS):
        # The chat template escapes the control tokens: the model sees odd markup, not a FIM task.
        return (
            "It looks like your message contains special markers such as fim_prefix, fim_suffix and "
            "fim_middle. I'm not sure what you would like me to do with them. Could you describe the "
            "code you want me to write?"
        )
    low = user.lower()
    words = set(re.findall(r"[a-z]+", low))
    for keys, answer in _CANNED:
        if all(k in words or k in low for k in keys):
            return answer
    if words & {"hi", "hello", "hey"} or not words:
        return "Hello! How can I help you with your code today?"
    if low.strip(" .!") in ("ok", "say ok", "reply ok") or "say ok" in low or "reply with ok" in low:
        return "OK"
    topic = "_".join(sorted(words, key=lambda w: (-len(w), w))[:2]) or "task"
    return f"Here is a simple starting point:\n\n```python\ndef {topic}():\n    pass\n```"


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
        "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
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
        return json_response(
            {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}},
            status=self.status,
        )


@dataclass
class Generation:
    text: str
    completion_tokens: int
    finish_reason: str  # stop | length
    stop_reason: str | None = None


def generate(pieces: Iterator[str], max_tokens: int, stop: list[str], include_stop: bool = False) -> Generation:
    """Take tokens from ``pieces`` until ``max_tokens``, cut at the first stop string (vLLM semantics)."""
    out: list[str] = []
    text = ""
    for piece in pieces:
        for tok in tokenize(piece):
            out.append(tok)
            text += tok
            for s in stop:
                idx = text.find(s)
                if s and idx != -1:
                    end = idx + len(s) if include_stop else idx
                    return Generation(text[:end], len(out), "stop", s)
            if len(out) >= max_tokens:
                return Generation(text, len(out), "length")
    return Generation(text, len(out), "stop")


def _stop_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for s in value if isinstance(s, str)]
    raise VllmError(400, "stop must be a string or a list of strings")


@dataclass
class Metrics:
    running: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    success: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0, "error": 0})

    def render(self, model: str) -> str:
        lbl = f'engine="0",model_name="{model}"'
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{lbl}}} {float(self.running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{lbl}}} 0.0",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{lbl}}} {0.01 * self.running}",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{lbl}}} {float(self.prompt_tokens)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{lbl}}} {float(self.generation_tokens)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
        ]
        for reason, n in self.success.items():
            lines.append(
                f'vllm:request_success_total{{engine="0",finished_reason="{reason}",model_name="{model}"}} {float(n)}'
            )
        return "\n".join(lines) + "\n"


class VllmServer:
    def __init__(self, cfg: VllmConfig, run: ContainerRun, services: SimServices) -> None:
        self.cfg = cfg
        self.run = run
        self.services = services
        self.metrics = Metrics()
        self.created = int(time.time())

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
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": VERSION})

    async def metrics_route(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(self.cfg.name), content_type="text/plain", charset="utf-8")

    # ---- /v1
    async def models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": self.cfg.model,
                "parent": None,
                "max_model_len": self.cfg.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, name).hex}",
                        "object": "model_permission",
                        "created": self.created,
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

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await read_json(request)
        except ValueError as e:
            raise VllmError(400, f"JSON decode error: {e}") from e
        if not isinstance(body, dict):
            raise VllmError(400, "Input should be a valid dictionary")
        model = body.get("model")
        if model is not None and model not in self.cfg.served_names:
            raise VllmError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return body

    def _max_tokens(self, body: dict[str, Any], prompt_tokens: int, default: int | None) -> int:
        value = body.get("max_completion_tokens", body.get("max_tokens"))
        if value is None:
            value = default if default is not None else self.cfg.max_model_len - prompt_tokens
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise VllmError(400, f"max_tokens must be at least 1, got {value}.")
        if prompt_tokens + value > self.cfg.max_model_len:
            raise VllmError(
                400,
                f"This model's maximum context length is {self.cfg.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + value} tokens ({prompt_tokens} in the messages, {value} in the completion). "
                "Please reduce the length of the messages or completion.",
            )
        return value

    def _account(self, prompt_tokens: int, completion_tokens: int, finish_reason: str) -> None:
        self.metrics.prompt_tokens += prompt_tokens
        self.metrics.generation_tokens += completion_tokens
        key = finish_reason if finish_reason in ("stop", "length") else "stop"
        self.metrics.success[key] = self.metrics.success.get(key, 0) + 1

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
        }

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if self.cfg.embed:
            raise VllmError(400, "The model does not support Chat Completions API")
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise VllmError(400, "messages: Field required (a non-empty list of messages)")
        model = body.get("model") or self.cfg.name
        prompt_tokens = sum(count_tokens(_text_of(m.get("content"))) + 4 for m in messages) + 3
        max_tokens = self._max_tokens(body, prompt_tokens, None)
        stop = _stop_list(body.get("stop"))
        n = int(body.get("n") or 1)

        tools = body.get("tools") or []
        tool_choice = body.get("tool_choice")
        if tools and tool_choice is None:
            tool_choice = "auto"
        if tool_choice is None:
            tool_choice = "none"
        if tool_choice == "auto" and tools and not (self.cfg.auto_tool_choice and self.cfg.tool_call_parser):
            raise VllmError(
                400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
            )
        if tool_choice not in ("none", "auto", "required") and not isinstance(tool_choice, dict):
            raise VllmError(400, f"Invalid value for tool_choice: {tool_choice!r}")
        if tool_choice == "required" and not tools:
            raise VllmError(400, "When using `tool_choice`, `tools` must be set.")

        user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        last_user_idx = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        has_tool_result = any(m.get("role") == "tool" for m in messages[last_user_idx + 1 :])

        content: str | None
        calls: list[dict[str, Any]] = []
        finish: str
        stop_reason: str | None = None
        if isinstance(tool_choice, dict):
            fname = (tool_choice.get("function") or {}).get("name")
            tool = next((t for t in tools if t.get("function", {}).get("name") == fname), None)
            if tool is None:
                raise VllmError(400, f"Tool '{fname}' has not been passed in `tools`.")
            calls = [tool_call(tool, user)]
            content, finish = "", "stop"
            completion_tokens = count_tokens(calls[0]["function"]["arguments"])
        elif tool_choice == "required":
            calls = [tool_call(pick_tool(tools, user), user)]
            content, finish = None, "tool_calls"
            completion_tokens = count_tokens(json.dumps([{"name": calls[0]["function"]["name"]}])) + count_tokens(
                calls[0]["function"]["arguments"]
            )
        elif tool_choice == "auto" and tools and not has_tool_result:
            call = tool_call(pick_tool(tools, user), user)
            plain = json.dumps(
                {"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])},
                ensure_ascii=False,
            )
            if self.services.vllm_auto_tool_habit:
                # Qwen2.5-Coder writes the call as plain JSON, without <tool_call> tags: the parser finds nothing.
                content, finish = plain, "stop"
            else:
                calls = [call]
                content, finish = None, "tool_calls"
            completion_tokens = count_tokens(plain) + (0 if self.services.vllm_auto_tool_habit else 4)
        else:
            if has_tool_result:
                result = next(_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "tool")
                text = f"According to the tool result: {result.strip()}"
            else:
                text = chat_answer(messages)
            gen = generate(iter([text]), max_tokens, stop, bool(body.get("include_stop_str_in_output")))
            content, finish, stop_reason = gen.text, gen.finish_reason, gen.stop_reason
            completion_tokens = gen.completion_tokens

        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        self._account(prompt_tokens, completion_tokens * n, finish)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream_chat(
                request, rid, created, model, n, content, calls, finish, stop_reason,
                prompt_tokens, completion_tokens, include_usage,
            )  # fmt: skip
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "tool_calls": calls,
            "reasoning_content": None,
        }
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
                    }
                    for i in range(n)
                ],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": self._usage(prompt_tokens, completion_tokens * n),
                "prompt_logprobs": None,
                "kv_transfer_params": None,
            }
        )

    async def _sse(self, request: web.Request, events: AsyncIterator[dict[str, Any]]) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        self.metrics.running += 1
        try:
            async for ev in events:
                await resp.write(f"data: {json.dumps(ev)}\n\n".encode())
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
        content: str | None,
        calls: list[dict[str, Any]],
        finish: str,
        stop_reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        include_usage: bool,
    ) -> web.StreamResponse:
        def chunk(i: int, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            if finish_reason is not None:
                choice["stop_reason"] = extra.get("stop_reason")
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
            }

        async def events() -> AsyncIterator[dict[str, Any]]:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            for i in range(n):
                if calls:
                    for j, c in enumerate(calls):
                        yield chunk(
                            i,
                            {"tool_calls": [{"index": j, "id": c["id"], "type": "function",
                                             "function": {"name": c["function"]["name"], "arguments": ""}}]},
                        )  # fmt: skip
                        yield chunk(
                            i, {"tool_calls": [{"index": j, "function": {"arguments": c["function"]["arguments"]}}]}
                        )
                    yield chunk(i, {"content": ""}, finish, stop_reason=stop_reason)
                else:
                    toks = tokenize(content or "")
                    for k, tok in enumerate(toks):
                        last = k == len(toks) - 1
                        yield chunk(i, {"content": tok}, finish if last else None, stop_reason=stop_reason)
                        await asyncio.sleep(0)
                    if not toks:
                        yield chunk(i, {"content": ""}, finish, stop_reason=stop_reason)
            if include_usage:
                yield {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "total_tokens": prompt_tokens + completion_tokens * n,
                        "completion_tokens": completion_tokens * n,
                    },
                }

        return await self._sse(request, events())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if self.cfg.embed:
            raise VllmError(400, "The model does not support Completions API")
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            prompts = [" ".join(f"t{p}" for p in prompt)]
        else:
            raise VllmError(400, "Either prompt or prompt_embeds must be provided and non-empty.")
        model = body.get("model") or self.cfg.name
        n = int(body.get("n") or 1)
        stop = _stop_list(body.get("stop"))
        include_stop = bool(body.get("include_stop_str_in_output"))
        prompt_tokens_each = [count_tokens(p) for p in prompts]
        max_tokens = self._max_tokens(body, max(prompt_tokens_each), 16)
        gens = [generate(completion_stream(p), max_tokens, stop, include_stop) for p in prompts]
        prompt_tokens = sum(prompt_tokens_each)
        completion_tokens = sum(g.completion_tokens for g in gens) * n
        for g in gens:
            self._account(0, g.completion_tokens * n, g.finish_reason)
        self.metrics.prompt_tokens += prompt_tokens
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        echo = bool(body.get("echo"))
        choices = []
        for pi, g in enumerate(gens):
            for k in range(n):
                text = (prompts[pi] + g.text) if echo else g.text
                choices.append((pi * n + k, text, g))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def events() -> AsyncIterator[dict[str, Any]]:
                for idx, text, g in choices:
                    toks = tokenize(text)
                    for j, tok in enumerate(toks):
                        last = j == len(toks) - 1
                        yield {
                            "id": rid, "object": "text_completion", "created": created, "model": model,
                            "choices": [{"index": idx, "text": tok, "logprobs": None,
                                         "finish_reason": g.finish_reason if last else None,
                                         "stop_reason": g.stop_reason if last else None}],
                        }  # fmt: skip
                        await asyncio.sleep(0)
                    if not toks:
                        yield {
                            "id": rid, "object": "text_completion", "created": created, "model": model,
                            "choices": [{"index": idx, "text": "", "logprobs": None,
                                         "finish_reason": g.finish_reason, "stop_reason": g.stop_reason}],
                        }  # fmt: skip
                if include_usage:
                    yield {
                        "id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                                  "completion_tokens": completion_tokens},
                    }  # fmt: skip

            return await self._sse(request, events())
        return json_response(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": idx,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": g.finish_reason,
                        "stop_reason": g.stop_reason,
                        "prompt_logprobs": None,
                    }
                    for idx, text, g in choices
                ],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": self._usage(prompt_tokens, completion_tokens),
                "kv_transfer_params": None,
            }
        )

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
                "id": f"embd-{uuid.uuid4().hex}",
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
