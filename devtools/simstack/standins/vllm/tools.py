"""Tool calls: the offered tool that fits the user's words (``pick_tool``) and its arguments, made from the
tool's JSON schema and the user's words (``schema_value``, ``tool_arguments``, ``tool_call``)."""

from __future__ import annotations

import json
import re
from typing import Any

from simstack.standins.vllm.text import _hex16


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
