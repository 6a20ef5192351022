"""Budgeted, model-scoped virtual keys: minted once, kept in their home Secret, corrected in place.

Where each key lives (docs/DESIGN.md, "Secrets"):

| deliver_to | home | consumer restarted when the key changes |
|---|---|---|
| openwebui-secrets | experience/openwebui-secrets OPENAI_API_KEY (+ WEBUI_SECRET_KEY if absent) | deploy/open-webui |
| tabby-config | experience/tabby-config config.toml ``[model.completion.http] api_key`` | deploy/tabby |
| keystore | litellm/coder-stack-keys ``<alias>`` | none |

A key value goes from the gateway's answer straight into its home; it is never returned by a task,
logged, or put in an exception. :func:`read_client_key` reads it back (wrapped) for smokes.
"""

from __future__ import annotations

import json
import math
import secrets
import tomllib
from dataclasses import dataclass
from typing import Literal

import httpx
from kubernetes_asyncio.client import ApiClient
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from coder_stack.errors import GatewayRequestError, NotFound, SpecError
from coder_stack.gateway import KeyRecord, delete_keys, generate_key, key_info, list_keys_by_alias, update_key
from coder_stack.k8s import read_secret, restart_deployment, write_secret_keys
from coder_stack.spec import ClientKeySpec, StackSpec

FIM_PROMPT_TEMPLATE = "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
OPENWEBUI_KEY = "OPENAI_API_KEY"
OPENWEBUI_SESSION_KEY = "WEBUI_SECRET_KEY"  # signs user sessions: generated once, never replaced
TABBY_CONFIG_KEY = "config.toml"


class KeyReport(BaseModel):
    """What :func:`ensure_key` did. Holds no key value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alias: str = Field(max_length=253, description="key_alias in the gateway.")
    action: Literal["kept", "updated", "minted", "reminted", "rotated"] = Field(description="What this run did.")
    token_id: str = Field(max_length=200, description="LiteLLM's hashed key id (never the key).")
    delivered_to: str = Field(max_length=300, description="namespace/secret:data-key where the key lives.")
    consumer: str | None = Field(None, max_length=300, description="namespace/deployment that reads the key.")
    consumer_restarted: bool = Field(False, description="True if the consumer was restarted to pick up a change.")
    notes: list[str] = Field(default_factory=list, max_length=20, description="Plain-words details for an operator.")


@dataclass(frozen=True)
class KeyHome:
    namespace: str
    secret: str
    data_key: str
    consumer: str | None  # Deployment in consumer_namespace restarted when the key changes
    consumer_namespace: str

    @property
    def where(self) -> str:
        return f"{self.namespace}/{self.secret}:{self.data_key}"


def key_home(spec: StackSpec, key_spec: ClientKeySpec) -> KeyHome:
    ns = spec.experience_namespace
    frontends = {f.name for f in spec.frontends}
    if key_spec.deliver_to == "openwebui-secrets":
        consumer = "open-webui" if "open-webui" in frontends else None
        return KeyHome(ns, spec.openwebui_secret, OPENWEBUI_KEY, consumer, ns)
    if key_spec.deliver_to == "tabby-config":
        consumer = "tabby" if "tabby" in frontends else None
        return KeyHome(ns, spec.tabby_config_secret, TABBY_CONFIG_KEY, consumer, ns)
    return KeyHome(spec.gateway_namespace, spec.keystore_secret, key_spec.alias, None, ns)


def gateway_incluster_url(spec: StackSpec) -> str:
    """The gateway as pods see it, without /v1."""
    return (
        f"http://{spec.gateway_service}.{spec.gateway_namespace}.svc.{spec.access.cluster_domain}:{spec.gateway_port}"
    )


def _toml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings


def tabby_fim_alias(spec: StackSpec, key_spec: ClientKeySpec) -> str:
    for alias in key_spec.models:
        for m in spec.models:
            if m.alias == alias and m.role == "fim":
                return alias
    raise SpecError(
        f"key {key_spec.alias!r} is delivered to Tabby but its models {key_spec.models} include no FIM model; "
        "add the FIM model's alias (e.g. coder-fim) to the key"
    )


def render_tabby_config(spec: StackSpec, key_spec: ClientKeySpec, key: SecretStr) -> SecretStr:
    """Tabby's config.toml: a ``vllm/completion`` backend on the gateway's in-cluster URL.

    Tabby's docs: ``api_endpoint`` should follow ``http://host:port/v1`` (Tabby appends ``/completions``).
    """
    text = (
        "# Written by coder-stack: Tabby completes code through the LiteLLM gateway with its own virtual key.\n"
        "[model.completion.http]\n"
        'kind = "vllm/completion"\n'
        f"model_name = {_toml_str(tabby_fim_alias(spec, key_spec))}\n"
        f"api_endpoint = {_toml_str(gateway_incluster_url(spec) + '/v1')}\n"
        f"api_key = {_toml_str(key.get_secret_value())}\n"
        f"prompt_template = {_toml_str(FIM_PROMPT_TEMPLATE)}\n"
    )
    return SecretStr(text)


@dataclass(frozen=True)
class TabbyConfig:
    model_name: str
    api_endpoint: str
    kind: str
    prompt_template: str
    api_key: SecretStr


def parse_tabby_config(text: SecretStr) -> TabbyConfig | None:
    """The completion backend of a Tabby config.toml, or None if it has none / is not TOML."""
    try:
        doc = tomllib.loads(text.get_secret_value())
    except tomllib.TOMLDecodeError:
        return None
    http = doc.get("model", {}).get("completion", {}).get("http")
    if not isinstance(http, dict) or not http.get("api_key"):
        return None
    return TabbyConfig(
        model_name=str(http.get("model_name", "")),
        api_endpoint=str(http.get("api_endpoint", "")),
        kind=str(http.get("kind", "")),
        prompt_template=str(http.get("prompt_template", "")),
        api_key=SecretStr(str(http["api_key"])),
    )


async def _read_home(api: ApiClient, home: KeyHome) -> SecretStr | None:
    data = await read_secret(api, home.namespace, home.secret)
    if not data or home.data_key not in data:
        return None
    value = data[home.data_key]
    if home.data_key == TABBY_CONFIG_KEY:
        cfg = parse_tabby_config(value)
        return cfg.api_key if cfg else None
    return value if value.get_secret_value() else None


async def read_client_key(api: ApiClient, spec: StackSpec, alias: str) -> SecretStr:
    """A client's key, read back from its home (for smokes). Raises NotFound if it is not there."""
    key_spec = spec.key(alias)
    home = key_home(spec, key_spec)
    value = await _read_home(api, home)
    if value is None:
        raise NotFound(
            f"no key for {alias!r} in {home.where}; mint it first (the keys flow / ensure_key) and check the Secret"
        )
    return value


async def _deliver(
    api: ApiClient, spec: StackSpec, key_spec: ClientKeySpec, home: KeyHome, key: SecretStr
) -> list[str]:
    """Write the key into its home; returns the data keys that changed."""
    if key_spec.deliver_to == "openwebui-secrets":
        return await write_secret_keys(
            api,
            home.namespace,
            home.secret,
            {OPENWEBUI_KEY: key, OPENWEBUI_SESSION_KEY: SecretStr(secrets.token_hex(32))},
            only_if_absent=frozenset({OPENWEBUI_SESSION_KEY}),
        )
    if key_spec.deliver_to == "tabby-config":
        return await write_secret_keys(
            api, home.namespace, home.secret, {TABBY_CONFIG_KEY: render_tabby_config(spec, key_spec, key)}
        )
    return await write_secret_keys(api, home.namespace, home.secret, {home.data_key: key})


async def _restart_consumer(api: ApiClient, home: KeyHome, changed: list[str], notes: list[str]) -> bool:
    if not changed or home.consumer is None:
        return False
    try:
        await restart_deployment(api, home.consumer_namespace, home.consumer)
    except NotFound:
        notes.append(f"deployment {home.consumer_namespace}/{home.consumer} does not exist; nothing to restart")
        return False
    notes.append(f"restarted {home.consumer_namespace}/{home.consumer} to pick up the new {', '.join(changed)}")
    return True


def _drift(rec: KeyRecord, key_spec: ClientKeySpec) -> list[str]:
    out = []
    if sorted(rec.models) != sorted(key_spec.models):
        out.append(f"models {sorted(rec.models)} -> {sorted(key_spec.models)}")
    if rec.max_budget is None or not math.isclose(rec.max_budget, key_spec.max_budget, rel_tol=1e-9):
        out.append(f"max_budget {rec.max_budget} -> {key_spec.max_budget}")
    if rec.budget_duration is not None and rec.budget_duration != key_spec.budget_duration:
        out.append(f"budget_duration {rec.budget_duration} -> {key_spec.budget_duration}")
    return out


async def ensure_key(
    api: ApiClient,
    gw_client: httpx.AsyncClient,
    master: SecretStr,
    spec: StackSpec,
    key_spec: ClientKeySpec,
    *,
    rotate: bool = False,
) -> KeyReport:
    """Make sure ``key_spec``'s key exists in the gateway with the right scope and budget, and in its home.

    Idempotent by alias: a valid key at home is kept (scope/budget drift fixed in place with /key/update,
    same key, no restart); a key deleted in the gateway is re-minted and re-delivered; an alias whose value
    we no longer hold is replaced (old key deleted, new one minted). ``rotate`` replaces a valid key:
    see :func:`_rotate`.
    """
    alias = key_spec.alias
    home = key_home(spec, key_spec)
    consumer = f"{home.consumer_namespace}/{home.consumer}" if home.consumer else None
    notes: list[str] = []
    at_home = await _read_home(api, home)
    info = await key_info(gw_client, master, at_home) if at_home is not None else None
    if info is not None and info.alias != alias:
        notes.append(f"the key in {home.where} belongs to alias {info.alias!r}, not {alias!r}; replacing it")
        info = None
    records = await list_keys_by_alias(gw_client, master, alias)

    if info is not None and at_home is not None:
        token = info.token or (records[0].token if records else "")
        if rotate:
            return await _rotate(api, gw_client, master, spec, key_spec, home, info, token, notes)
        drift = _drift(info, key_spec)
        if drift:
            await update_key(
                gw_client,
                master,
                token,
                models=list(key_spec.models),
                max_budget=key_spec.max_budget,
                budget_duration=key_spec.budget_duration,
            )
            notes.append("corrected in place (same key, consumer not restarted): " + "; ".join(drift))
        changed = await _deliver(api, spec, key_spec, home, at_home)
        restarted = await _restart_consumer(api, home, changed, notes)
        return KeyReport(
            alias=alias,
            action="updated" if drift else "kept",
            token_id=token,
            delivered_to=home.where,
            consumer=consumer,
            consumer_restarted=restarted,
            notes=notes,
        )

    # No valid key of ours at home.
    if at_home is not None and not notes:
        notes.append(f"the key in {home.where} is no longer known to the gateway (deleted?); minting a new one")
    stale = [r.token for r in records if r.token]
    if stale:
        await delete_keys(gw_client, master, stale)
        notes.append(
            f"alias {alias!r} existed in the gateway but its value is not in {home.where}: "
            f"deleted the old key ({len(stale)}) and minted a new one"
        )
    if rotate:
        notes.append("nothing to rotate: there was no valid key; minted one")
    minted = await generate_key(
        gw_client,
        master,
        alias=alias,
        models=list(key_spec.models),
        max_budget=key_spec.max_budget,
        budget_duration=key_spec.budget_duration,
    )
    changed = await _deliver(api, spec, key_spec, home, minted.key)
    restarted = await _restart_consumer(api, home, changed, notes)
    return KeyReport(
        alias=alias,
        action="reminted" if (at_home is not None or stale) else "minted",
        token_id=minted.record.token,
        delivered_to=home.where,
        consumer=consumer,
        consumer_restarted=restarted,
        notes=notes,
    )


async def _rotate(
    api: ApiClient,
    gw_client: httpx.AsyncClient,
    master: SecretStr,
    spec: StackSpec,
    key_spec: ClientKeySpec,
    home: KeyHome,
    old: KeyRecord,
    old_token: str,
    notes: list[str],
) -> KeyReport:
    """Mint new, swap in, delete old — with no moment where the home holds an invalid key.

    LiteLLM aliases are unique and /key/regenerate is Enterprise-only, so: rename the old key to
    ``<alias>-retired-<hex>`` (it stays valid), mint the new key under the real alias, deliver it, restart
    the consumer, then delete the old key. The one window left: consumer pods still on the old key while
    the restart rolls out get 401 once the old key is deleted.
    """
    alias = key_spec.alias
    retired = f"{alias}-retired-{secrets.token_hex(3)}"
    await update_key(gw_client, master, old_token, alias=retired)
    try:
        minted = await generate_key(
            gw_client,
            master,
            alias=alias,
            models=list(key_spec.models),
            max_budget=key_spec.max_budget,
            budget_duration=key_spec.budget_duration,
        )
    except GatewayRequestError:
        await update_key(gw_client, master, old_token, alias=alias)  # put the old key back as it was
        raise
    changed = await _deliver(api, spec, key_spec, home, minted.key)
    restarted = await _restart_consumer(api, home, changed, notes)
    await delete_keys(gw_client, master, [old_token])
    notes.append(
        f"rotated: new key minted and delivered to {home.where}, old key {old_token[:12]}... deleted after the "
        "swap; consumer pods still rolling over may see 401 until replaced"
    )
    return KeyReport(
        alias=alias,
        action="rotated",
        token_id=minted.record.token,
        delivered_to=home.where,
        consumer=f"{home.consumer_namespace}/{home.consumer}" if home.consumer else None,
        consumer_restarted=restarted,
        notes=notes,
    )


__all__ = [
    "FIM_PROMPT_TEMPLATE",
    "KeyHome",
    "KeyReport",
    "TabbyConfig",
    "ensure_key",
    "gateway_incluster_url",
    "key_home",
    "parse_tabby_config",
    "read_client_key",
    "render_tabby_config",
    "tabby_fim_alias",
]
