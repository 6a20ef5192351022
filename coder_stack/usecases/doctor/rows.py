"""The doctor's result model: one :class:`DoctorRow` per check, a :class:`DoctorReport` of them, and the
collector the checks write through (:class:`Rows`), which redacts every text before it becomes a row.

No key value, header or master key ever goes into a row: :class:`Rows` hides the secret values it is given
and anything shaped like a key (:func:`coder_stack.errors.redact`); :func:`why` and :func:`answer` turn an
exception or an HTTP answer into a short phrase without headers.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any, Literal

import httpx
import openai
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import CoderStackError, redact
from coder_stack.transport import error_detail

Status = Literal["ok", "warn", "fail", "skipped"]


class DoctorRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(max_length=120, description="What was checked.")
    status: Status = Field(description="ok, warn, fail or skipped.")
    seen: str = Field("", max_length=1200, description="What was seen (redacted).")
    todo: str = Field("", max_length=600, description="What to do about it ('' when nothing).")


class DoctorReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: list[DoctorRow] = Field(default_factory=list, description="Every check, in order.")

    def count(self, status: Status) -> int:
        return sum(1 for r in self.rows if r.status == status)

    @property
    def ok(self) -> bool:
        """Nothing failed (warnings and skips do not fail the doctor)."""
        return self.count("fail") == 0

    def summary(self) -> str:
        parts = [f"{self.count(s)} {s}" for s in ("ok", "warn", "fail", "skipped")]
        verdict = "nothing failed" if self.ok else "something failed: read the rows marked fail"
        return f"doctor: {', '.join(parts)} — {verdict}"

    def to_json(self) -> str:
        return json.dumps(
            {"ok": self.ok, "summary": self.summary(), "rows": [r.model_dump() for r in self.rows]}, indent=2
        )


def selected(rows: Collection[DoctorRow], prefix: str) -> list[DoctorRow]:
    return [r for r in rows if r.name.startswith(prefix)]


class Rows:
    """Collects rows; every text is redacted (known secret values and anything shaped like a key)."""

    def __init__(self, *secret_values: str) -> None:
        self.rows: list[DoctorRow] = []
        self._secrets = [s for s in secret_values if s]

    def hide(self, *values: str) -> None:
        self._secrets.extend(v for v in values if v)

    def add(self, name: str, status: Status, seen: str = "", todo: str = "") -> DoctorRow:
        row = DoctorRow(
            name=redact(name, *self._secrets, limit=120),
            status=status,
            seen=redact(seen, *self._secrets, limit=1100),
            todo=redact(todo, *self._secrets, limit=550),
        )
        self.rows.append(row)
        return row


def why(e: BaseException) -> str:
    """An exception as a short, redacted phrase (our own errors carry what to do; others only their type)."""
    if isinstance(e, CoderStackError):
        return e.message
    if isinstance(e, openai.APIStatusError):
        try:
            raw: Any = e.response.content
        except httpx.ResponseNotRead:
            raw = e.body
        etype, msg = error_detail(raw)
        return f"answered {e.status_code} {etype}: {msg}".strip()
    if isinstance(e, openai.APIConnectionError | httpx.TransportError):
        return f"unreachable ({type(e.__cause__ or e).__name__})"
    return f"{type(e).__name__}"


def answer(resp: httpx.Response) -> str:
    """An HTTP answer as ``<status> <error type>: <message>`` (the body's error only, never a header)."""
    etype, msg = error_detail(resp.content)
    return f"{resp.status_code} {etype}: {msg}".strip().rstrip(":")


__all__ = ["DoctorReport", "DoctorRow", "Rows", "Status", "answer", "selected", "why"]
