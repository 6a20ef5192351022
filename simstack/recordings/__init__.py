"""Exchanges recorded from the real programs the stand-ins imitate: LiteLLM proxy 1.108.7 and vLLM 0.32.0.

Data, not code: each ``*.jsonl`` line is one HTTP exchange (see README.md here for the format and the
placeholders that stand in for secrets). The conformance tests replay every exchange against the
stand-ins; the stand-ins may quote recorded answers (e.g. the model's texts) so that their behaviour has
a recording behind it.
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


def iter_all() -> Iterator[tuple[str, Exchange]]:
    for name in (VLLM, LITELLM):
        for ex in exchanges(name):
            yield name, ex


__all__ = ["LITELLM", "VLLM", "VLLM_STARTUP", "Exchange", "exchange", "exchanges", "iter_all", "text"]
