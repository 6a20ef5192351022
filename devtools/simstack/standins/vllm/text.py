"""The "model": the stand-in's tokenizer (``tokenize``, ``count_tokens``), the text it writes for a raw prompt
(fill-in-the-middle and code continuation: ``completion_stream``) and for an unrecorded chat prompt
(``chat_answer``), and ``generate``: tokens taken up to ``max_tokens`` and cut at the first stop string."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from simstack.standins.vllm.errors import VllmError

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")

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
