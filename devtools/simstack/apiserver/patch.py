"""PATCH bodies as the real API server applies them: JSON merge patch (RFC 7386), strategic merge patch
(lists merged by their patch merge key, ``$patch: delete``) and JSON patch (RFC 6902), chosen by the
request's content type in :func:`apply_patch`.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from simstack.apiserver.errors import ApiError, bad_request
from simstack.store import Obj

_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "conditions": "type",
    "imagePullSecrets": "name",
    "containerStatuses": "name",
    "initContainerStatuses": "name",
    "hostAliases": "ip",
    "ownerReferences": "uid",
    "topologySpreadConstraints": "topologyKey",
}


def json_merge_patch(orig: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(orig) if isinstance(orig, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = json_merge_patch(out.get(k), v)
    return out


def _list_merge_key(fieldname: str, orig: list[Any], patch: list[Any]) -> str | None:
    if fieldname == "ports":
        items = [i for i in orig + patch if isinstance(i, dict)]
        return "containerPort" if any("containerPort" in i for i in items) else "port"
    return _MERGE_KEYS.get(fieldname)


def strategic_merge_patch(orig: Any, patch: Any) -> Any:
    """Strategic merge patch for the built-in types used here (merge keys by field name)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    out = copy.deepcopy(orig) if isinstance(orig, dict) else {}
    for k, v in patch.items():
        if k.startswith("$deleteFromPrimitiveList/"):
            fname = k.split("/", 1)[1]
            if isinstance(out.get(fname), list):
                out[fname] = [x for x in out[fname] if x not in v]
            continue
        if k.startswith("$"):
            continue  # $setElementOrder/..., $retainKeys, $patch: ordering hints only
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict):
            if v.get("$patch") == "delete":
                out.pop(k, None)
            else:
                out[k] = strategic_merge_patch(out.get(k), v)
        elif isinstance(v, list):
            cur: list[Any] = out[k] if isinstance(out.get(k), list) else []
            key = _list_merge_key(k, cur, v)
            if key and all(isinstance(i, dict) for i in v):
                out[k] = _merge_list(cur, v, key)
            else:
                out[k] = [copy.deepcopy(i) for i in v if not (isinstance(i, dict) and "$patch" in i)]
        else:
            out[k] = v
    return out


def _merge_list(cur: list[Any], patch: list[dict[str, Any]], key: str) -> list[Any]:
    if any(i.get("$patch") == "replace" for i in patch):
        return [copy.deepcopy(i) for i in patch if "$patch" not in i]
    result = [copy.deepcopy(i) for i in cur]
    for item in patch:
        kv = item.get(key)
        idx = next((n for n, x in enumerate(result) if isinstance(x, dict) and x.get(key) == kv), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                result.pop(idx)
        elif idx is None:
            result.append(strategic_merge_patch({}, item))
        else:
            result[idx] = strategic_merge_patch(result[idx], item)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for p in parts:
        if isinstance(doc, list):
            doc = doc[int(p)]
        elif isinstance(doc, dict):
            doc = doc[p]
        else:
            raise KeyError(p)
    return doc


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind = op.get("op")
        parts = _pointer(op.get("path", ""))
        try:
            if kind == "test":
                if _walk(doc, parts) != op.get("value"):
                    raise ApiError(
                        422,
                        "Invalid",
                        f"the server rejected our request: test failed at {op.get('path')}",
                    )
                continue
            if kind in ("move", "copy"):
                src = _pointer(op.get("from", ""))
                value = copy.deepcopy(_walk(doc, src))
                if kind == "move":
                    doc = _remove(doc, src)
                doc = _add(doc, parts, value)
            elif kind == "add":
                doc = _add(doc, parts, copy.deepcopy(op.get("value")))
            elif kind == "remove":
                doc = _remove(doc, parts)
            elif kind == "replace":
                _walk(doc, parts)  # must exist
                doc = _remove(doc, parts)
                doc = _add(doc, parts, copy.deepcopy(op.get("value")))
            else:
                raise bad_request(f"Unexpected kind: {kind}")
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(
                422,
                "Invalid",
                f"the server rejected our request: {kind} operation does not apply: "
                f'doc is missing path: "{op.get("path")}"',
            ) from None
    return doc


def _add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            i = int(last)
            if i > len(parent):
                raise IndexError(i)
            parent.insert(i, value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise KeyError(last)
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    if not parts:
        return None
    parent = _walk(doc, parts[:-1])
    if isinstance(parent, list):
        parent.pop(int(parts[-1]))
    else:
        del parent[parts[-1]]
    return doc


def apply_patch(obj: Obj, content_type: str, body: bytes) -> Obj:
    ctype = content_type.split(";")[0].strip().lower()
    try:
        patch = json.loads(body or b"null")
    except ValueError as e:
        raise bad_request(f"error decoding patch: {e}") from None
    if ctype == "application/json-patch+json":
        if not isinstance(patch, list):
            raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
        out = json_patch(obj, patch)
    elif ctype == "application/merge-patch+json":
        out = json_merge_patch(obj, patch)
    elif ctype == "application/strategic-merge-patch+json":
        out = strategic_merge_patch(obj, patch)
    else:
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media types include: "
            f"application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json"
            f" (got {ctype})",
        )
    if not isinstance(out, dict):
        raise bad_request("patch did not produce an object")
    return out
