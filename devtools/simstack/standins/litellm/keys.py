"""The virtual-key store: mint, info, list, update, delete, block/unblock and expiry of keys, found by value
(``sk-...``) or by hash. A key's row lives in ``litellm_db["keys"]`` under its hash; a deleted one moves to
``litellm_db["deleted_keys"]``."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
import uuid
from typing import TYPE_CHECKING, Any

from simstack.standins import litellm_fields as F
from simstack.standins.litellm.errors import ProxyError
from simstack.standins.litellm.shape import iso, mold, ms, now, plus, z

if TYPE_CHECKING:
    from collections.abc import Mapping

    from simstack.standins.litellm.state import ProxyState

NOT_PREMIUM = (
    "You must be a LiteLLM Enterprise user to use this feature. If you have a license please set `LITELLM_LICENSE` "
    "in your env. Get a 7 day trial key here: https://www.litellm.ai/enterprise#trial. \nPricing: "
    "https://www.litellm.ai/#pricing"
)
_DURATION_RE = re.compile(r"^(\d+)(s|m|h|d|w|mo)$")
_TIMES = ("created_at", "updated_at", "settings_updated_at", "last_active", "budget_reset_at", "expires")


def hash_token(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def abbreviate(key: str) -> str:
    return f"sk-...{key[-4:]}"


def token_of(value: str) -> str:
    """A key's hash from its value or its hash."""
    return hash_token(value) if value.startswith("sk-") else value


def parse_duration(value: str) -> dt.timedelta:
    m = _DURATION_RE.match(value.strip())
    if not m:
        raise ValueError(f"Invalid duration {value!r}: use e.g. 30s, 30m, 30h, 30d, 1w, 1mo")
    n, unit = int(m.group(1)), m.group(2)
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "mo": 2592000}[unit]
    return dt.timedelta(seconds=n * seconds)


def budget_reset_at(start: dt.datetime, duration: str) -> dt.datetime:
    """Recorded (key-info-by-value): created 2026-12-01 08:40 with 30d -> 2027-01-01T00:00:00, i.e. the
    midnight after created + duration. GUESS: the same midnight rounding for s/m/h durations."""
    t = start + parse_duration(duration)
    day = dt.datetime(t.year, t.month, t.day, tzinfo=dt.UTC)
    return day if t == day else day + dt.timedelta(days=1)


def expired(rec: dict[str, Any]) -> bool:
    expires = rec.get("expires")
    return bool(expires) and dt.datetime.fromisoformat(str(expires)) <= now()


def find(st: ProxyState, value: str, deleted: bool = False) -> dict[str, Any] | None:
    """By value (``sk-...``) or by hash. The display ``key_name`` (``sk-...abcd``) is no identifier: it
    hashes to nothing (recorded: key-info-by-key-name, key-update-by-key-name, key-delete-by-key-name)."""
    token = hash_token(value) if value.startswith("sk-") else value
    rec = st.db["keys"].get(token)
    if rec is None and deleted:
        rec = st.db["deleted_keys"].get(token)
    return rec


def _alias_taken(st: ProxyState, alias: str, except_token: str | None = None) -> bool:
    return any(r.get("key_alias") == alias and t != except_token for t, r in st.db["keys"].items())


def _validate_fields(body: dict[str, Any]) -> None:
    # GUESS: the validation messages (no recording sends a malformed key body).
    models = body.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        raise ProxyError(400, "models must be a list of model names", "bad_request_error", "models")
    mb = body.get("max_budget")
    if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int | float)):
        raise ProxyError(400, "max_budget must be a number", "bad_request_error", "max_budget")
    for f in ("budget_duration", "duration"):
        if body.get(f) is not None:
            try:
                parse_duration(str(body[f]))
            except ValueError as e:
                raise ProxyError(400, str(e), "bad_request_error", f) from e


def _key_view(rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in rec.items() if not k.startswith("_")}
    out["total_spend"] = out.get("spend", 0.0)
    return out


def _info_view(rec: dict[str, Any]) -> dict[str, Any]:
    """/key/info's ``info``: never the hashed ``token`` (recorded: key-info-by-value/-by-hash/-self)."""
    v = _key_view(rec)
    v.pop("token", None)
    for f in _TIMES:
        v[f] = plus(v.get(f))
    deleted = rec.get("_deleted")
    if deleted:
        v |= deleted | {"deleted_at": plus(deleted["deleted_at"]), "status": "deleted"}
        return mold(v, F.KEY_INFO_DELETED)
    # recorded (key-info-blocked, key-info-expired): a blocked key is "revoked", an expired one "expired"
    # GUESS: "revoked" wins over "expired" for a key both blocked and expired
    status = "revoked" if rec.get("blocked") else "expired" if expired(rec) else "active"
    return mold(v | {"status": status}, F.KEY_INFO)


def generate(st: ProxyState, body: dict[str, Any]) -> dict[str, Any]:
    """/key/generate."""
    _validate_fields(body)
    alias = body.get("key_alias")
    if alias is not None and _alias_taken(st, alias):
        raise ProxyError(
            400,
            f"Key with alias '{alias}' already exists. Unique key aliases across all keys are required.",
            "bad_request_error",
            "key_alias",
        )
    key = body.get("key") or "sk-" + secrets.token_urlsafe(16)
    if not isinstance(key, str) or not key.startswith("sk-"):
        # GUESS: the message for a custom key without the sk- prefix
        raise ProxyError(400, "Invalid key format. LiteLLM Virtual Key must start with 'sk-'.", "bad_request_error")
    token = hash_token(key)
    if token in st.db["keys"]:
        raise ProxyError(400, "Unique key required: this key already exists.", "bad_request_error", "key")  # GUESS
    t = now()
    budget_duration = body.get("budget_duration")
    expires = t + parse_duration(body["duration"]) if body.get("duration") else None
    rec = {
        "token": token,
        "key_name": abbreviate(key),
        "key_alias": alias,
        "spend": 0.0,
        "max_budget": float(body["max_budget"]) if body.get("max_budget") is not None else None,
        "budget_duration": budget_duration,
        "budget_reset_at": iso(budget_reset_at(t, budget_duration)) if budget_duration else None,
        "expires": iso(ms(expires)) if expires else None,
        "models": list(body.get("models") or []),
        "aliases": body.get("aliases") or {},
        "config": body.get("config") or {},
        "user_id": body.get("user_id"),
        "team_id": body.get("team_id"),
        "permissions": body.get("permissions") or {},
        "max_parallel_requests": body.get("max_parallel_requests"),
        "metadata": body.get("metadata") or {},
        "tpm_limit": body.get("tpm_limit"),
        "rpm_limit": body.get("rpm_limit"),
        "blocked": None,
        "model_spend": {},
        "model_max_budget": body.get("model_max_budget") or {},
        "soft_budget_cooldown": False,
        "created_at": iso(t),
        "updated_at": iso(t),
        "settings_updated_at": None,
        "last_active": None,
        "created_by": "default_user_id",
        "updated_by": "default_user_id",
    }
    st.db["keys"][token] = rec
    # recorded (key-generate-*): no status, no budget_reset_at; times as ...Z; token and token_id
    view = _key_view(rec)
    view |= {f: z(view.get(f)) for f in ("created_at", "updated_at", "expires")}
    # recorded (key-generate-expiring): `duration` comes back null even when it was sent
    out = view | {"key": key, "token_id": token, "duration": None, "litellm_budget_table": None}
    out["expires"] = z(iso(expires))  # the answer has the value before the database rounded it
    return mold(out, F.KEY_GENERATE)


def info(st: ProxyState, caller_token: str | None, value: str | None) -> dict[str, Any]:
    """/key/info of ``value`` (by value or hash, deleted keys included), or of the caller's own key."""
    if value is None:
        if caller_token is None:
            # GUESS: the master key's self lookup
            raise ProxyError(404, "Key not found in database", "not_found_error", "key")
        rec = st.db["keys"].get(caller_token)
        value = caller_token  # recorded (key-info-self): the top-level key is the hash
    else:
        rec = find(st, value, deleted=True)
    if rec is None:
        raise ProxyError(404, "Key not found in database", "not_found_error", "key")
    return {"key": value, "info": _info_view(rec)}


def listing(st: ProxyState, q: Mapping[str, str]) -> dict[str, Any]:
    """/key/list with its filters and pages."""
    recs = list(st.db["keys"].values())  # deleted keys are not listed (recorded: key-list-deleted-alias)
    for field_ in ("key_alias", "user_id", "team_id"):
        if q.get(field_) is not None:
            recs = [r for r in recs if r.get(field_) == q[field_]]
    if q.get("key_hash"):
        recs = [r for r in recs if r["token"] == q["key_hash"]]
    full = q.get("return_full_object", "false").lower() == "true"
    try:
        page = max(1, int(q.get("page", "1")))
        size = max(1, min(100, int(q.get("size", "10"))))
    except ValueError as e:
        raise ProxyError(422, f"Invalid pagination: {e}", "bad_request_error") from e  # GUESS
    total = len(recs)
    chunk = recs[(page - 1) * size : page * size]
    keys: list[Any] = []
    for r in chunk:
        if not full:
            keys.append(r["token"])
            continue
        v = _key_view(r)
        v |= {f: z(v.get(f)) for f in _TIMES}
        keys.append(mold(v, F.KEY_LIST_FULL))
    # recorded (key-list-deleted-alias): total_pages 0 when nothing matches
    return {"keys": keys, "total_count": total, "current_page": page, "total_pages": -(-total // size)}


def update(st: ProxyState, body: dict[str, Any]) -> dict[str, Any]:
    """/key/update by value or hash."""
    value = body.get("key")
    if not isinstance(value, str):
        raise ProxyError(400, "key is required", "bad_request_error", "key")  # GUESS
    rec = find(st, value)
    if rec is None:
        raise ProxyError(404, "Key not found.", "not_found_error", "key")
    _validate_fields(body)
    alias = body.get("key_alias")
    if alias is not None and _alias_taken(st, alias, except_token=rec["token"]):
        raise ProxyError(
            400,
            f"Key with alias '{alias}' already exists. Unique key aliases across all keys are required.",
            "bad_request_error",
            "key_alias",
        )
    for f in ("models", "key_alias", "metadata", "tpm_limit", "rpm_limit", "max_parallel_requests", "user_id"):
        if f in body:
            rec[f] = body[f]
    if "max_budget" in body:
        rec["max_budget"] = float(body["max_budget"]) if body["max_budget"] is not None else None
    if "budget_duration" in body:
        rec["budget_duration"] = body["budget_duration"]
        rec["budget_reset_at"] = (
            iso(budget_reset_at(now(), body["budget_duration"])) if body["budget_duration"] else None
        )
    if body.get("duration"):
        rec["expires"] = iso(now() + parse_duration(body["duration"]))
    if "spend" in body:
        rec["spend"] = float(body["spend"])
    rec["updated_at"] = rec["settings_updated_at"] = iso(now())
    # recorded (key-update-by-value/-by-hash): key as sent, token, the info fields without status
    view = _info_view(rec)
    view.pop("status", None)
    return mold({"key": value, "token": rec["token"]} | view, F.KEY_UPDATE)


def delete(st: ProxyState, body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """/key/delete by values, hashes or aliases: the answer, and the hashes of the keys deleted (whose
    unwritten spend the caller drops)."""
    keys = body.get("keys") or []
    aliases = body.get("key_aliases") or []
    if not isinstance(keys, list) or not isinstance(aliases, list) or not (keys or aliases):
        # GUESS: the message for an empty delete
        raise ProxyError(400, "Pass `keys` (or `key_aliases`) as a non-empty list", "bad_request_error", "keys")
    found: list[str] = []
    for v in keys:
        rec = find(st, str(v))
        if rec is not None:
            found.append(rec["token"])
    for a in aliases:
        found += [t for t, r in st.db["keys"].items() if r.get("key_alias") == a]
    if not found:
        # recorded (key-delete-by-value-again, key-delete-never-minted, key-delete-by-key-name)
        raise ProxyError(404, "{'error': 'No keys found'}", "internal_server_error", None)
    # GUESS: a mixture of found and unknown keys deletes the found ones and answers 200
    t = iso(now())
    for tok in dict.fromkeys(found):
        rec = st.db["keys"].pop(tok)
        rec["_deleted"] = {
            "id": str(uuid.uuid4()),
            "org_id": None,
            "deleted_at": t,
            "deleted_by": "default_user_id",
            "deleted_by_api_key": "litellm_proxy_master_key",
            "litellm_changed_by": None,
        }
        st.db["deleted_keys"][tok] = rec
    # recorded: deleted_keys is exactly what was sent (values, hashes or the aliases)
    return {"deleted_keys": [*keys, *aliases]}, found


def set_blocked(st: ProxyState, body: dict[str, Any], blocked: bool) -> dict[str, Any]:
    """/key/block and /key/unblock by value or hash (recorded: key-block, key-unblock): 200 with the whole
    key row, times as ...Z. GUESS: the 404 for a key that is not there (not recorded)."""
    value = body.get("key")
    rec = find(st, value) if isinstance(value, str) else None
    if rec is None:
        raise ProxyError(404, "Key not found.", "not_found_error", "key")
    rec["blocked"] = blocked
    rec["updated_at"] = rec["settings_updated_at"] = iso(now())
    view = _key_view(rec)
    view |= {f: z(view.get(f)) for f in _TIMES}
    return mold(view, F.KEY_BLOCK if blocked else F.KEY_UNBLOCK)


def regenerate_refused() -> ProxyError:
    """/key/regenerate is an Enterprise feature."""
    return ProxyError(
        500, f"Regenerating Virtual Keys is an Enterprise feature, {NOT_PREMIUM}", "internal_server_error", None
    )
