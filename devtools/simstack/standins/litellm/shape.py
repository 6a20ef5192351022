"""How the stand-in spells its answers: molded onto the declared field model, and times as LiteLLM prints them."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

from simstack.standins import litellm_fields as F

# ------------------------------------------------------------------ field model
# The answers of real LiteLLM 1.108.7 carry many fields the stand-in has no behaviour behind (team, org,
# rotation ... all null/empty for these keys). devtools/simstack/standins/litellm_fields.py declares the field set of
# each answer and the value of every field no logic here decides; an answer is the stand-in's own values molded
# into that declaration. Nothing is read from the recordings: conformance holds the result to them.


def mold(value: Any, fields: Any, path: str = "$") -> Any:
    """``value`` with exactly the declared ``fields`` (a field model of litellm_fields), each declared field
    missing from ``value`` at its declared value, with the declared number types.

    A field declared ``REQUIRED`` that ``value`` leaves out (or holds as ``REQUIRED``) is a stand-in bug: the
    logic did not compute it, and the answer is refused rather than filled."""
    if value is F.REQUIRED:
        raise AssertionError(f"LiteLLM stand-in: {path} is declared REQUIRED and nothing computed it")
    if isinstance(fields, dict) and isinstance(value, dict):
        out = {}
        for k, t in fields.items():
            if k in value:
                out[k] = mold(value[k], t, f"{path}.{k}")
            elif t is F.REQUIRED or F.uncomputed(t):
                raise AssertionError(f"LiteLLM stand-in: {path}.{k} is declared REQUIRED and nothing computed it")
            else:
                out[k] = copy.deepcopy(t)
        return out
    if isinstance(fields, bool) or isinstance(value, bool):
        return value
    if isinstance(fields, float) and isinstance(value, int):
        return float(value)
    if isinstance(fields, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if F.uncomputed(value):
        raise AssertionError(f"LiteLLM stand-in: {F.uncomputed(value, path)} declared REQUIRED, not computed")
    return value


def jsonb(v: Any) -> Any:
    """Postgres jsonb round trip (recorded: spend-logs-v2-dated): 0.0 comes back as 0."""
    if isinstance(v, dict):
        return {k: jsonb(x) for k, x in v.items()}
    if isinstance(v, list):
        return [jsonb(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


# ------------------------------------------------------------------ times
def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def z(t: str | None) -> str | None:
    """``...+00:00`` -> ``...Z`` (how /key/generate, /key/list and /spend/logs spell times)."""
    if t is None:
        return None
    d = dt.datetime.fromisoformat(t)
    return d.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def plus(t: str | None) -> str | None:
    """``...+00:00`` with microseconds (how /key/info spells times)."""
    if t is None:
        return None
    d = dt.datetime.fromisoformat(t)
    return d.strftime("%Y-%m-%dT%H:%M:%S.%f") + "+00:00"


def ms(t: dt.datetime) -> dt.datetime:
    """Postgres keeps milliseconds (recorded: key-generate-expiring answers .362256Z, key-info-expired .362000)."""
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t else None
