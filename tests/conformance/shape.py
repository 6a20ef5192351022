"""Shape comparison of JSON answers, shared by the conformance suites (owned by the vLLM suite).

``shape(value)`` is the set of JSON paths of a value with the JSON type at each: ``$.choices[*].delta.content``
-> ``str``. List elements share one ``[*]`` path (their shapes are merged); an empty list is ``list:empty``
so that ``"choices": []`` and a filled ``choices`` differ. A field that is present in one answer and absent
from the other shows up as a path on one side only.

``values(value, paths)`` is the ordered list of values at each of ``paths`` (``[*]`` walks every element),
for the fields whose value, not only type, must match.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list" if value else "list:empty"
    if isinstance(value, dict):
        return "dict"
    return type(value).__name__


def shape(value: Any, path: str = "$") -> dict[str, set[str]]:
    """Every JSON path of ``value`` -> the set of JSON types seen there."""
    out: dict[str, set[str]] = {}

    def walk(v: Any, p: str) -> None:
        out.setdefault(p, set()).add(json_type(v))
        if isinstance(v, dict):
            for k, sub in v.items():
                walk(sub, f"{p}.{k}")
        elif isinstance(v, list):
            for sub in v:
                walk(sub, f"{p}[*]")

    walk(value, path)
    return out


def _ignored(path: str, ignore: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, pat) for pat in ignore)


def shape_diff(expected: Any, actual: Any, ignore: Iterable[str] = (), where: str = "") -> list[str]:
    """Human-readable differences between the shapes of two values (empty when they agree)."""
    return diff_shapes(shape(expected), shape(actual), where, ignore)


def diff_shapes(
    exp: dict[str, set[str]], act: dict[str, set[str]], where: str = "", ignore: Iterable[str] = ()
) -> list[str]:
    """Differences between two shapes (as made by :func:`shape`)."""
    ignore = list(ignore)
    out = []
    for p in sorted(set(exp) | set(act)):
        if _ignored(p, ignore):
            continue
        e, a = exp.get(p), act.get(p)
        if e is None:
            out.append(f"{where}{p}: present ({'|'.join(sorted(a or ()))}) but absent in the recording")
        elif a is None:
            out.append(f"{where}{p}: missing (recording has {'|'.join(sorted(e))})")
        elif e != a:
            out.append(f"{where}{p}: type {'|'.join(sorted(a))}, recording has {'|'.join(sorted(e))}")
    return out


def values(value: Any, path: str) -> list[Any]:
    """The values at ``path`` (``$.a[*].b`` style), in document order; [] if the path is absent."""
    parts = re.findall(r"\.([^.\[]+)|(\[\*\])", path[1:] if path.startswith("$") else path)
    current = [value]
    for key, star in parts:
        nxt: list[Any] = []
        for v in current:
            if star:
                if isinstance(v, list):
                    nxt.extend(v)
            elif isinstance(v, dict) and key in v:
                nxt.append(v[key])
        current = nxt
    return current


def value_diff(expected: Any, actual: Any, paths: Iterable[str], where: str = "") -> list[str]:
    out = []
    for p in paths:
        e, a = values(expected, p), values(actual, p)
        if e != a:
            out.append(f"{where}{p}: {a!r}, recording has {e!r}")
    return out


_HEX_TAIL = re.compile(r"[0-9a-f]{6,}$")


def id_pattern(value: Any) -> Any:
    """An id with its random hex tail replaced by its length: ``chatcmpl-<hex16>``."""
    if not isinstance(value, str):
        return value
    return _HEX_TAIL.sub(lambda m: f"<hex{len(m.group())}>", value)


__all__ = ["diff_shapes", "id_pattern", "json_type", "shape", "shape_diff", "value_diff", "values"]
