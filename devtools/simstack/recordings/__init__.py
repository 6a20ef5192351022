"""Exchanges recorded from the real programs the stand-ins imitate: LiteLLM proxy 1.108.7 and vLLM 0.32.0.

Data, not code: each ``*.jsonl`` line is one HTTP exchange (see README.md here for the format and the
placeholders that stand in for secrets). The conformance tests replay every exchange against the
stand-ins.

The corpus is split (README.md, "Quoted and held out"): the stand-ins may quote only the exchanges of
``QUOTED`` (through :func:`quotable` and :func:`quoted`, which refuse the others); every other exchange is
held out, and the stand-ins must match it by their own logic. The held-out part is what conformance
reports.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

LITELLM = "litellm-1.108.7.jsonl"
VLLM = "vllm-0.32.0.jsonl"
VLLM_STARTUP = "vllm-0.32.0-startup.txt"


@dataclass(frozen=True)
class Exchange:
    """One recorded request and the real program's answer."""

    id: str
    what: str
    request: dict[str, Any]
    response: dict[str, Any]
    elapsed_ms: float | None = None
    chunk_ms: tuple[float, ...] | None = None

    @property
    def method(self) -> str:
        return str(self.request["method"])

    @property
    def path(self) -> str:
        return str(self.request["path"])

    @property
    def auth(self) -> str:
        return str(self.request.get("auth", "<none>"))

    @property
    def status(self) -> int:
        return int(self.response["status"])

    @property
    def body(self) -> Any:
        return self.response.get("body")

    @property
    def is_stream(self) -> bool:
        return self.chunk_ms is not None


def text(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


@cache
def exchanges(name: str) -> tuple[Exchange, ...]:
    """Every exchange of one recording file, in recorded order."""
    out = []
    for line in text(name).splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        chunks = d.get("chunk_ms")
        out.append(
            Exchange(
                id=d["id"],
                what=d.get("what", ""),
                request=d["request"],
                response=d["response"],
                elapsed_ms=d.get("elapsed_ms"),
                chunk_ms=tuple(chunks) if chunks is not None else None,
            )
        )
    return tuple(out)


def exchange(name: str, exchange_id: str) -> Exchange:
    for ex in exchanges(name):
        if ex.id == exchange_id:
            return ex
    raise KeyError(f"no exchange {exchange_id!r} in {name}")


# The exchanges a stand-in may quote (a recorded text, a field template). No held-out request may carry the
# prompt of a quoted one (tests/conformance checks it), so a stand-in cannot find a held-out answer by its
# prompt either.
QUOTED: dict[str, frozenset[str]] = {
    # the runbook prompt, the FIM prompt (also the 100000-token error on it) and the agent smoke's tool loop:
    # the texts the flows and smokes rely on
    VLLM: frozenset(
        {
            "chat-reverse",
            "chat-reverse-stream",
            "chat-reverse-stream-usage",
            "fim-nostop",
            "fim-stop",
            "fim-stop-stream",
            "err-completions-max-tokens-100000",
            "tool-loop-required",
            "tool-loop-answer",
        }
    ),
    # none: the LiteLLM stand-in's answers come from its own field model (simstack/standins/litellm_fields.py)
    LITELLM: frozenset(),
}


def is_held_out(name: str, exchange_id: str) -> bool:
    return exchange_id not in QUOTED[name]


def quotable(name: str) -> tuple[Exchange, ...]:
    """The exchanges of one file a stand-in may quote, in recorded order."""
    return tuple(ex for ex in exchanges(name) if not is_held_out(name, ex.id))


def quoted(name: str, exchange_id: str) -> Exchange:
    """One quotable exchange; a held-out one is refused (a stand-in must match it by its own logic)."""
    if is_held_out(name, exchange_id):
        raise KeyError(f"exchange {exchange_id!r} of {name} is held out: a stand-in may not quote it")
    return exchange(name, exchange_id)


def iter_all() -> Iterator[tuple[str, Exchange]]:
    for name in (VLLM, LITELLM):
        for ex in exchanges(name):
            yield name, ex


__all__ = [
    "LITELLM",
    "QUOTED",
    "VLLM",
    "VLLM_STARTUP",
    "Exchange",
    "exchange",
    "exchanges",
    "is_held_out",
    "iter_all",
    "quotable",
    "quoted",
    "text",
]
