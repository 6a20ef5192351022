"""Model registration and aliases: the deployments of the config file and of ``/model/new`` (rows in the
database), how ``/model/info``, ``/model/delete`` and ``/v1/models`` show them, and which deployment of an
alias serves a call."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import secrets
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from simstack.standins import litellm_fields as F
from simstack.standins.litellm.config import resolve_env
from simstack.standins.litellm.errors import ProxyError
from simstack.standins.litellm.shape import iso, now, z

if TYPE_CHECKING:
    from simstack.standins.litellm.state import ProxyState


@dataclass
class Deployment:
    model_id: str
    model_name: str
    litellm_params: dict[str, Any]  # resolved (api_key in clear)
    model_info: dict[str, Any]
    db_model: bool

    @property
    def served_name(self) -> str:
        model = str(self.litellm_params.get("model") or "")
        return model.split("/", 1)[1] if "/" in model else model

    @property
    def provider(self) -> str:
        model = str(self.litellm_params.get("model") or "")
        return model.split("/", 1)[0] if "/" in model else "openai"

    def price(self, which: str) -> float:
        v = self.litellm_params.get(which, self.model_info.get(which))
        try:
            return float(v) if v is not None else 0.0
        except (TypeError, ValueError):
            return 0.0

    def public(self) -> dict[str, Any]:
        """A /model/info entry on the declared one of its alias (litellm_fields.MODEL_INFO): prices sit both in
        ``litellm_params`` and in ``model_info``; ``api_key`` never shows."""
        if self.model_name in F.MODEL_INFO:
            tpl = F.MODEL_INFO[self.model_name]
        else:  # GUESS: other aliases look like the declared ones of their kind
            tpl = F.MODEL_INFO["coder-agent" if self.db_model else "coder-chat"]
        params = {k: v for k, v in self.litellm_params.items() if k not in ("api_key", "aws_secret_access_key")}
        params |= {k: v for k, v in tpl["litellm_params"].items() if isinstance(v, bool)}
        prices = {k: self.price(k) for k in ("input_cost_per_token", "output_cost_per_token")}
        info = copy.deepcopy(tpl["model_info"]) | dict(self.model_info) | prices
        info |= {
            "id": self.model_id,
            "db_model": self.db_model,
            "key": str(self.litellm_params.get("model") or ""),
            "litellm_provider": self.provider,
            "mode": self.model_info.get("mode"),
            "pricing_overrides": [k for k in prices if k in self.litellm_params],
        }
        if self.provider == "text-completion-openai":
            info["supported_openai_params"] = F.MODEL_INFO["coder-fim"]["model_info"]["supported_openai_params"]
        for k in ("max_tokens", "max_input_tokens", "max_output_tokens"):
            info[k] = self.model_info.get(k)
        if self.db_model:
            info["blocked"] = False
        else:
            info.pop("blocked", None)
        entry = {"model_name": self.model_name, "litellm_params": params, "model_info": info}
        if missing := F.uncomputed(entry):
            raise AssertionError(f"LiteLLM stand-in: /model/info {missing} declared REQUIRED, not computed")
        return entry


def config_deployment(entry: dict[str, Any], env: dict[str, str]) -> Deployment:
    params = resolve_env(entry.get("litellm_params") or {}, env)
    info = dict(entry.get("model_info") or {})
    mid = (
        info.get("id")
        or hashlib.sha256(
            json.dumps([entry.get("model_name"), entry.get("litellm_params")], sort_keys=True, default=str).encode()
        ).hexdigest()
    )
    return Deployment(str(mid), str(entry.get("model_name")), params, info, db_model=False)


def deployments(st: ProxyState) -> list[Deployment]:
    out = list(st.config_deployments)
    for row in st.db["models"]:
        out.append(
            Deployment(
                row["model_id"],
                row["model_name"],
                resolve_env(row["litellm_params"], st.env),
                dict(row.get("model_info") or {}),
                db_model=True,
            )
        )
    return out


def model_names(st: ProxyState) -> list[str]:
    return list(dict.fromkeys(d.model_name for d in deployments(st)))


def pick(st: ProxyState, model: str) -> Deployment | None:
    deps = [d for d in deployments(st) if d.model_name == model]
    if not deps:
        return None
    return deps[next(st.rr) % len(deps)]


def listing(st: ProxyState, scope: list[str] | None) -> dict[str, Any]:
    """/v1/models for a caller whose model scope is ``scope`` (None: every model)."""
    # recorded (models-v1-ghost): a key's scope verbatim, aliases that do not exist included
    names = scope if scope is not None else model_names(st)
    infos = {d.model_name: d.model_info for d in deployments(st)}
    data = []
    for name in dict.fromkeys(names):
        entry: dict[str, Any] = {"id": name, "object": "model", "created": 1677610602, "owned_by": "openai"}
        info = infos.get(name) or {}
        if info.get("mode") == "embedding":
            entry["mode"] = "embedding"
        else:
            for k in ("max_input_tokens", "max_output_tokens"):
                if info.get(k) is not None:
                    entry[k] = info[k]
        data.append(entry)
    return {"data": data, "object": "list"}


def _encrypt_looking(value: str, salt: str) -> str:
    nonce = secrets.token_bytes(24)
    stream = b""
    counter = 0
    while len(stream) < len(value.encode()) + 16:
        stream += hashlib.sha256(salt.encode() + nonce + counter.to_bytes(4, "big")).digest()
        counter += 1
    data = value.encode()
    body = bytes(a ^ b for a, b in zip(data, stream, strict=False))
    mac = hashlib.sha256(nonce + body).digest()[:16]
    return base64.urlsafe_b64encode(nonce + mac + body).decode()


def new(st: ProxyState, body: dict[str, Any]) -> dict[str, Any]:
    """/model/new: a row in the database; the answer shows the params encrypted."""
    if not st.store_model_in_db:
        # GUESS: no recording without store_model_in_db
        raise ProxyError(
            500,
            "Set `'STORE_MODEL_IN_DB='True'` in your env to enable this feature.",
            "internal_server_error",
        )
    name = body.get("model_name")
    params = body.get("litellm_params")
    if not isinstance(name, str) or not name or not isinstance(params, dict) or not params.get("model"):
        raise ProxyError(  # GUESS
            400, "model_name and litellm_params.model are required", "bad_request_error", "litellm_params"
        )
    info = dict(body.get("model_info") or {})
    mid = str(info.get("id") or uuid.uuid4())  # recorded (model-new-again): the same body twice, two rows
    info["id"] = mid
    t = iso(now())
    row = {
        "model_id": mid,
        "model_name": name,
        "litellm_params": dict(params),
        "model_info": info,
        "created_at": t,
        "updated_at": t,
        "created_by": "default_user_id",
        "updated_by": "default_user_id",
    }
    st.db["models"].append(row)
    enc = {
        k: (_encrypt_looking(v, st.salt) if k in ("model", "api_base", "api_key") and isinstance(v, str) else v)
        for k, v in dict(params).items()
    }
    flags = dict(F.MODEL_NEW_FLAGS)
    return row | {
        "litellm_params": enc | flags,
        # recorded: db_model false in this answer, true in /model/info
        "model_info": info | {"db_model": False, "member_auto_router": False},
        "blocked": False,
        "created_at": z(t),
        "updated_at": z(t),
    }


def info(st: ProxyState, scope: list[str] | None, mid: str | None) -> tuple[dict[str, Any], int]:
    """/model/info (of one deployment id when ``mid``): the answer and its status."""
    deps = deployments(st)
    if scope is not None:
        deps = [d for d in deps if d.model_name in scope]  # GUESS: a scoped key sees its models only
    if mid:
        deps = [d for d in deps if d.model_id == mid]
        if not deps:
            # recorded (model-info-unknown-id): FastAPI's detail, not LiteLLM's error object
            return {"detail": {"error": f"Model id = {mid} not found on litellm proxy"}}, 400
    return {"data": [d.public() for d in deps]}, 200


def delete(st: ProxyState, body: dict[str, Any]) -> dict[str, Any]:
    mid = body.get("id")
    rows = st.db["models"]
    idx = next((i for i, r in enumerate(rows) if r["model_id"] == mid), None)
    if idx is None:
        # recorded (model-delete-unknown): type auth_error, param "None"
        raise ProxyError(400, f"{{'error': 'Model with id={mid} not found in db'}}", "auth_error")
    rows.pop(idx)
    return {"message": f"Model: {mid} deleted successfully"}
