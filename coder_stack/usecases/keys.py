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

from coder_stack.errors import DeliveryRefused, GatewayRequestError, NotFound, SpecError
from coder_stack.kubernetes.client import delete_secret_keys, read_secret, write_secret_keys
from coder_stack.kubernetes.workloads import restart_deployment
from coder_stack.litellm.admin import (
    KeyRecord,
    MintedKey,
    delete_keys,
    generate_key,
    key_info,
    key_info_by_token,
    list_keys_by_alias,
    update_key,
)
from coder_stack.probe import FIM_PROMPT_TEMPLATE
from coder_stack.spec import (
    OPENWEBUI_KEY,
    OPENWEBUI_SESSION_KEY,
    TABBY_CONFIG_KEY,
    ClientKeySpec,
    KeyHome,
    StackSpec,
)
from coder_stack.usecases.openwebui import persistent_config_status, set_env_wins_in_secret

KeyAction = Literal["kept", "updated", "minted", "reminted", "rotated", "unusable"]


class KeyReport(BaseModel):
    """What :func:`ensure_key` did. Holds no key value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alias: str = Field(max_length=253, description="key_alias in the gateway.")
    action: KeyAction = Field(
        description="What this run did; 'unusable': the key cannot be used and was left as it is (see notes)."
    )
    token_id: str | None = Field(None, max_length=200, description="LiteLLM's hashed key id (never the key).")
    delivered_to: str = Field(max_length=300, description="namespace/secret:data-key where the key lives.")
    consumer: str | None = Field(None, max_length=300, description="namespace/deployment that reads the key.")
    consumer_restarted: bool = Field(False, description="True if the consumer was restarted to pick up a change.")
    problem: str | None = Field(
        None, max_length=60, description="What was wrong with the key found at home (deleted, expired, ...)."
    )
    notes: list[str] = Field(default_factory=list, max_length=20, description="Plain-words details for an operator.")

    @property
    def usable(self) -> bool:
        return self.action != "unusable"


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
        f"api_endpoint = {_toml_str(spec.gateway_incluster_url + '/v1')}\n"
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
    home = spec.key_home(key_spec)
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


async def _consumer_follows(
    api: ApiClient, spec: StackSpec, key_spec: ClientKeySpec, home: KeyHome, notes: list[str], *, refuse: bool
) -> list[str]:
    """Make a new key reach the app, not only its Secret: Open WebUI reads ``OPENAI_API_KEY`` from its
    environment only while ``ENABLE_PERSISTENT_CONFIG`` lets it (else it keeps the key stored at its first
    launch). Sets the variable in the Secret when the Deployment loads that Secret whole; otherwise refuses
    (``refuse``: before anything changed) or says so in the notes. Returns the Secret keys it changed."""
    if key_spec.deliver_to != "openwebui-secrets" or home.consumer is None:
        return []
    try:
        status = await persistent_config_status(api, spec, home.consumer)
    except NotFound:
        return []  # no Deployment to follow; _restart_consumer says so
    if status.env_wins:
        return []
    if status.can_set_in_secret:
        changed = await set_env_wins_in_secret(api, spec, home.consumer, status)
        if changed:
            notes.append(
                f"set ENABLE_PERSISTENT_CONFIG=False in {home.namespace}/{home.secret} (loaded by "
                f"{status.deployment}) so that Open WebUI reads the new key from its environment"
            )
        return changed
    if refuse:
        raise DeliveryRefused(
            f"not rotating {key_spec.alias!r}: Open WebUI would go on calling with the key stored at its first "
            f"launch and fail once the old key is deleted. {status.reason}. Nothing was changed"
        )
    notes.append(f"Open WebUI may go on using the key stored at its first launch, not this one: {status.reason}")
    return []


def _drift(rec: KeyRecord, key_spec: ClientKeySpec) -> list[str]:
    out = []
    if sorted(rec.models) != sorted(key_spec.models):
        out.append(f"models {sorted(rec.models)} -> {sorted(key_spec.models)}")
    if rec.max_budget is None or not math.isclose(rec.max_budget, key_spec.max_budget, rel_tol=1e-9):
        out.append(f"max_budget {rec.max_budget} -> {key_spec.max_budget}")
    if rec.budget_duration is not None and rec.budget_duration != key_spec.budget_duration:
        out.append(f"budget_duration {rec.budget_duration} -> {key_spec.budget_duration}")
    return out


async def _mint(gw_client: httpx.AsyncClient, master: SecretStr, key_spec: ClientKeySpec) -> MintedKey:
    """A new key under ``key_spec``'s alias, scope and budget."""
    return await generate_key(
        gw_client,
        master,
        alias=key_spec.alias,
        models=list(key_spec.models),
        max_budget=key_spec.max_budget,
        budget_duration=key_spec.budget_duration,
    )


REPAIRABLE = frozenset({"deleted", "expired"})
"""Problems a new key fixes without undoing anyone's decision: the old key cannot work again anyway. A
blocked key (an admin's decision), a spent budget (the budget's purpose) and a status we do not know are
reported, never replaced behind the operator's back."""


def _unusable_advice(problem: str, rec: KeyRecord, key_spec: ClientKeySpec) -> str:
    if problem == "blocked":
        return "an admin blocked it: unblock it (POST /key/unblock) or delete it (POST /key/delete), then run keys"
    if problem == "over budget":
        reset = f" at {rec.budget_reset_at}" if rec.budget_reset_at else ""
        return (
            f"its budget is spent (${rec.spend:.6f} of ${rec.max_budget}); it resets{reset}; to go on now raise "
            f"max_budget for {key_spec.alias!r} in the stack spec (the keys flow updates it in place)"
        )
    return (
        f"the gateway reports status {problem!r}, which coder-stack does not know how to repair safely: "
        "delete the key (POST /key/delete) and run keys to mint a new one"
    )


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

    Idempotent by alias. A usable key at home is kept (scope/budget drift fixed in place with /key/update,
    same key, no restart). A key the gateway reports deleted or expired is replaced: re-minted,
    re-delivered, consumer restarted. A blocked, spent or otherwise unusable key is reported (action
    ``unusable``) and left as it is. An alias whose value we no longer hold is replaced (old key deleted,
    new one minted). ``rotate`` replaces a usable key: see :func:`_rotate`. A rotation an earlier run left
    half done is finished or undone first (:func:`recover_rotation`).

    Keys are addressed by value or by the hash from /key/list, never by /key/info's display ``key_name``.
    """
    alias = key_spec.alias
    home = spec.key_home(key_spec)
    consumer = f"{home.consumer_namespace}/{home.consumer}" if home.consumer else None
    notes = await recover_rotation(api, gw_client, master, spec, key_spec)
    at_home = await _read_home(api, home)
    info = await key_info(gw_client, master, at_home) if at_home is not None else None
    if info is not None and info.alias != alias:
        notes.append(f"the key in {home.where} belongs to alias {info.alias!r}, not {alias!r}; replacing it")
        info = None
    records = await list_keys_by_alias(gw_client, master, alias)

    def report(action: KeyAction, token: str | None, restarted: bool = False, problem: str | None = None) -> KeyReport:
        return KeyReport(
            alias=alias,
            action=action,
            token_id=token,
            delivered_to=home.where,
            consumer=consumer,
            consumer_restarted=restarted,
            problem=problem,
            notes=notes,
        )

    problem = info.problem() if info is not None else None
    if info is not None and at_home is not None and problem not in REPAIRABLE:
        # Our key, alive. Aliases are unique among live keys, so the live record of this alias is ours.
        token = records[0].token if records else None
        drift = _drift(info, key_spec)
        if drift:
            await update_key(
                gw_client,
                master,
                at_home,
                models=list(key_spec.models),
                max_budget=key_spec.max_budget,
                budget_duration=key_spec.budget_duration,
            )
            notes.append("corrected in place (same key, consumer not restarted): " + "; ".join(drift))
            if problem is not None:
                after = await key_info(gw_client, master, at_home)
                problem = after.problem() if after is not None else "deleted"
                info = after or info
        if problem is not None:
            notes.append(
                f"the key in {home.where} is {problem}; left as it is: {_unusable_advice(problem, info, key_spec)}"
            )
            return report("unusable", token, problem=problem)
        if rotate:
            return await _rotate(api, gw_client, master, spec, key_spec, home, token, notes)
        changed = await _deliver(api, spec, key_spec, home, at_home)
        restarted = await _restart_consumer(api, home, changed, notes)
        return report("updated" if drift else "kept", token, restarted)

    # No usable key of ours at home: mint one.
    if problem is not None and at_home is not None:
        notes.append(f"the key in {home.where} is {problem} in the gateway; minting a new one and delivering it")
        if problem == "expired":
            await delete_keys(gw_client, master, [at_home])  # it still holds the alias, and is the only one that can
            records = []
    elif at_home is not None and not notes:
        notes.append(f"the key in {home.where} is not known to the gateway; minting a new one")
    stale = [r.token for r in records if r.token]
    if stale:
        await delete_keys(gw_client, master, stale)
        notes.append(
            f"alias {alias!r} existed in the gateway but its value is not in {home.where}: "
            f"deleted the old key ({len(stale)}) and minted a new one"
        )
    if rotate:
        notes.append("nothing to rotate: there was no usable key; minted one")
    minted = await _mint(gw_client, master, key_spec)
    changed = await _consumer_follows(api, spec, key_spec, home, notes, refuse=False)
    changed += await _deliver(api, spec, key_spec, home, minted.key)
    restarted = await _restart_consumer(api, home, changed, notes)
    action: KeyAction = "reminted" if (at_home is not None or stale) else "minted"
    return report(action, minted.record.token, restarted, problem)


# ------------------------------------------------------------------------------------------ rotation
# LiteLLM aliases are unique among live keys and /key/regenerate is Enterprise-only (500 in the open
# build), so a rotation renames the old key out of the way, mints the new one under the alias, delivers
# it, restarts the consumer and deletes the old key. Before the first step, a marker naming the old key's
# hash and its temporary alias is written to the keystore Secret; whatever interrupts the rotation (an
# error, a cancellation, a killed process), the same run or the next one reads the marker and finishes
# or undoes it, so that exactly one usable key holds the alias and it is the one at home.


def _marker_key(alias: str) -> str:
    return f"rotating.{alias}"


async def _read_marker(api: ApiClient, spec: StackSpec, alias: str) -> tuple[str, str] | None:
    data = await read_secret(api, spec.gateway_namespace, spec.keystore_secret)
    raw = (data or {}).get(_marker_key(alias))
    if raw is None:
        return None
    try:
        marker = json.loads(raw.get_secret_value())
        return str(marker["old_token"]), str(marker["retired_alias"])
    except (ValueError, KeyError, TypeError):
        return None


async def _write_marker(api: ApiClient, spec: StackSpec, alias: str, old_token: str, retired: str) -> None:
    value = json.dumps({"old_token": old_token, "retired_alias": retired})
    await write_secret_keys(api, spec.gateway_namespace, spec.keystore_secret, {_marker_key(alias): SecretStr(value)})


async def _clear_marker(api: ApiClient, spec: StackSpec, alias: str) -> None:
    await delete_secret_keys(api, spec.gateway_namespace, spec.keystore_secret, [_marker_key(alias)])


async def recover_rotation(
    api: ApiClient, gw_client: httpx.AsyncClient, master: SecretStr, spec: StackSpec, key_spec: ClientKeySpec
) -> list[str]:
    """Finish or undo a rotation of ``key_spec`` that was interrupted; returns notes (empty if none was).

    - the new key reached home: delete the old (renamed) key, restart the consumer;
    - it did not: delete any key minted under the alias (its value is lost), give the old key its alias
      back. Either way exactly one usable key holds the alias, and it is the one at home.
    """
    alias = key_spec.alias
    marker = await _read_marker(api, spec, alias)
    if marker is None:
        return []
    old_token, retired = marker
    home = spec.key_home(key_spec)
    old = await key_info_by_token(gw_client, master, old_token)
    old_live = old is not None and old.status != "deleted"
    at_home = await _read_home(api, home)
    home_info = await key_info(gw_client, master, at_home) if at_home is not None else None
    home_is_new = (
        home_info is not None
        and home_info.status != "deleted"
        and home_info.alias == alias
        and not (old_live and old is not None and old.alias == alias)
    )
    notes: list[str]
    if home_is_new:
        if old_live:
            await delete_keys(gw_client, master, [old_token])
        await _restart_consumer(api, home, ["the rotated key"], [])
        notes = [f"finished an interrupted rotation: the new key is in {home.where}; the old key is deleted"]
    else:
        if old_live and old is not None and old.alias == retired:
            orphans = [r.token for r in await list_keys_by_alias(gw_client, master, alias) if r.token]
            await delete_keys(gw_client, master, orphans)
            await update_key(gw_client, master, old_token, alias=alias)
        notes = [f"undid an interrupted rotation: the old key, still in {home.where}, holds {alias!r} again"]
    await _clear_marker(api, spec, alias)
    return notes


async def _rotate(
    api: ApiClient,
    gw_client: httpx.AsyncClient,
    master: SecretStr,
    spec: StackSpec,
    key_spec: ClientKeySpec,
    home: KeyHome,
    old_token: str | None,
    notes: list[str],
) -> KeyReport:
    """Mint new, swap in, delete old — with no moment where the home holds an invalid key (see above).

    The one window left: consumer pods still on the old key while the restart rolls out get 401 once the
    old key is deleted.
    """
    alias = key_spec.alias
    if old_token is None:
        raise GatewayRequestError(
            f"cannot rotate {alias!r}: /key/list gave no hashed id for the key, so it could not be renamed and "
            "deleted safely; nothing was changed"
        )
    follow = await _consumer_follows(api, spec, key_spec, home, notes, refuse=True)
    retired = f"{alias}-retired-{secrets.token_hex(3)}"
    await _write_marker(api, spec, alias, old_token, retired)
    try:
        await update_key(gw_client, master, old_token, alias=retired)
        minted = await _mint(gw_client, master, key_spec)
        changed = follow + await _deliver(api, spec, key_spec, home, minted.key)
        restarted = await _restart_consumer(api, home, changed, notes)
        await delete_keys(gw_client, master, [old_token])
        await _clear_marker(api, spec, alias)
    except BaseException as e:
        try:
            await recover_rotation(api, gw_client, master, spec, key_spec)
        except Exception as again:  # the gateway or the cluster is still failing: the next run recovers
            raise GatewayRequestError(
                f"rotating {alias!r} was interrupted ({type(e).__name__}: {e}) and could not be tidied up yet "
                f"({type(again).__name__}); run keys again: it finishes or undoes the rotation"
            ) from e
        raise
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
    "KeyAction",
    "KeyReport",
    "TabbyConfig",
    "ensure_key",
    "parse_tabby_config",
    "read_client_key",
    "recover_rotation",
    "render_tabby_config",
    "tabby_fim_alias",
]
