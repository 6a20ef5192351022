"""Who is calling: the master key or a virtual key (refused when unknown, blocked or expired), the admin-only
routes, and the models a key may call."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from simstack.standins.litellm.errors import ProxyError
from simstack.standins.litellm.keys import abbreviate, expired, hash_token
from simstack.standins.litellm.shape import now

if TYPE_CHECKING:
    from simstack.standins.litellm.state import ProxyState


@dataclass
class Caller:
    is_master: bool
    token: str | None = None  # hashed token of a virtual key

    @property
    def label(self) -> str:
        return "master" if self.is_master else (self.token or "")[:8]


def authenticate(st: ProxyState, request: web.Request) -> Caller:
    raw = request.headers.get("Authorization") or request.headers.get("x-litellm-api-key") or ""
    key = raw[7:].strip() if raw[:7].lower() == "bearer " else raw.strip()
    if not key:
        raise ProxyError(401, "Authentication Error, No api key passed in.", "auth_error")
    if st.master_key and secrets.compare_digest(key, st.master_key):
        return Caller(is_master=True)
    if not key.startswith("sk-"):
        raise ProxyError(
            401,
            f"Authentication Error, LiteLLM Virtual Key expected. Received={abbreviate(key)}, "
            "expected to start with 'sk-'.",
            "auth_error",
        )
    token = hash_token(key)
    rec = st.db["keys"].get(token)
    if rec is None:
        raise ProxyError(401, "Authentication Error, Invalid API key provided.", "token_not_found_in_db", "key")
    # GUESS: which check comes first for a key both blocked and expired (each was recorded alone)
    if rec.get("blocked"):  # recorded (chat-blocked-key)
        raise ProxyError(
            401, "Authentication Error, Key is blocked. Update via `/key/unblock` if you're an admin.", "auth_error"
        )
    if expired(rec):  # recorded (chat-expired-key): 401, both times as Python prints them, param the hash's
        t = now()
        raise ProxyError(
            401,
            f"Authentication Error - Expired Key. Key Expiry time {dt.datetime.fromisoformat(rec['expires'])} "
            f"and current time {t}",
            "expired_key",
            abbreviate(token),
        )
    return Caller(is_master=False, token=token)


def require_admin(st: ProxyState, request: web.Request) -> Caller:
    # GUESS: a virtual key on an admin route was not recorded (except /key/info, which any key may read:
    # key-info-other-key-as-vkey); the 401 auth_error text is from memory of LiteLLM's route checks.
    caller = authenticate(st, request)
    if not caller.is_master:
        raise ProxyError(
            401,
            "Authentication Error, Only proxy admin can be used to generate, delete, update info for new "
            f"keys/users/teams. Route={request.path}. Your role=None. Your user_id=None",
            "auth_error",
        )
    return caller


def key_models(st: ProxyState, caller: Caller) -> list[str] | None:
    """The key's model scope; None means every model."""
    if caller.is_master or caller.token is None:
        return None
    models = list(st.db["keys"][caller.token].get("models") or [])
    if not models or "all-proxy-models" in models or "*" in models:
        return None
    return models
