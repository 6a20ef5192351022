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

import asyncio
import datetime as dt
import json
import math
import os
import secrets
import socket
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal
from uuid import UUID

import httpx
import tomlkit
import tomlkit.exceptions
from kubernetes_asyncio.client import ApiClient
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from coder_stack.errors import CoderStackError, DeliveryRefused, GatewayRequestError, NotFound, SpecError
from coder_stack.kubernetes.client import delete_secret_keys, read_secret, write_secret_keys
from coder_stack.kubernetes.workloads import restart_deployment
from coder_stack.litellm.admin import (
    KeyRecord,
    MintedKey,
    delete_keys,
    generate_key,
    key_hash,
    key_info,
    key_info_by_token,
    list_keys_by_alias,
    update_key,
)
from coder_stack.orchestration.liveness import read_liveness
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


def _points_at_gateway(spec: StackSpec, endpoint: object) -> bool:
    gateway = spec.gateway_incluster_url.rstrip("/")
    return isinstance(endpoint, str) and (endpoint.rstrip("/") == gateway or endpoint.startswith(gateway + "/"))


def tabby_config_with_key(
    spec: StackSpec, key_spec: ClientKeySpec, existing: SecretStr | None, key: SecretStr
) -> SecretStr:
    """Tabby's config.toml with ``key`` as the ``api_key`` of every ``[model.<kind>.http]`` section that
    points at the gateway, and nothing else changed, byte for byte (tomlkit round-trips comments, order and
    formatting): sections a user added (an embedding model, repository context, ...) survive every keys
    pass. With no file, or one that is not TOML, the file is written from the spec; with no completion
    section at all, the spec's is appended."""
    if existing is None or not existing.get_secret_value().strip():
        return render_tabby_config(spec, key_spec, key)
    try:
        doc = tomlkit.parse(existing.get_secret_value())
    except tomlkit.exceptions.TOMLKitError:
        return render_tabby_config(spec, key_spec, key)
    model = doc.get("model")
    found = False
    if isinstance(model, dict):
        for kind in model.values():
            http = kind.get("http") if isinstance(kind, dict) else None
            if isinstance(http, dict) and _points_at_gateway(spec, http.get("api_endpoint")):
                found = True
                if http.get("api_key") != key.get_secret_value():
                    http["api_key"] = key.get_secret_value()
    text = tomlkit.dumps(doc)
    has_completion = isinstance(model, dict) and isinstance(model.get("completion"), dict)
    if not found and not has_completion:
        ours = render_tabby_config(spec, key_spec, key).get_secret_value()
        text = text.rstrip("\n") + "\n\n" + ours if text.strip() else ours
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
        data = await read_secret(api, home.namespace, home.secret)
        text = tabby_config_with_key(spec, key_spec, (data or {}).get(TABBY_CONFIG_KEY), key)
        return await write_secret_keys(api, home.namespace, home.secret, {TABBY_CONFIG_KEY: text})
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
"""Problems a new key fixes without undoing anyone's decision. A deleted key cannot work again. An expired
key (LiteLLM 1.108.7: /key/info ``status: "expired"``, calls refused 401 ``expired_key``) reached the end of
the life it was given when it was minted or updated (``duration``): that ends the key, not the consumer's
right to call the gateway, and coder-stack mints its keys with no expiry at all, so a new key with the
spec's scope and budget is what the stack asks for (the expired key is deleted: it still holds the alias).
A blocked key (``status: "revoked"``, ``blocked: true``) is an administrator's decision that a new key
would defeat; a spent budget is the budget doing its job; a status we do not know may be either. Those
are reported, with what to do, and never replaced behind the operator's back (``keys --rotate`` replaces
a blocked key on purpose)."""


def _unusable_advice(problem: str, rec: KeyRecord, key_spec: ClientKeySpec, token: str | None) -> str:
    if problem == "blocked":
        ident = f'{{"key": "{token}"}}' if token else "with the key's hash"
        return (
            "an administrator blocked it (POST /key/block); coder-stack never replaces a blocked key on its own. "
            f"If the block is to be lifted, an administrator unblocks it: POST /key/unblock {ident} (master key); "
            f"to replace it on purpose run `coder-stack keys --rotate --alias {key_spec.alias}` (mints a new key, "
            "delivers it and deletes the blocked one). Nothing was changed"
        )
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
    owner: RotationOwner | None = None,
) -> KeyReport:
    """Make sure ``key_spec``'s key exists in the gateway with the right scope and budget, and in its home.

    Idempotent by alias. A usable key at home is kept (scope/budget drift fixed in place with /key/update,
    same key, no restart). A key the gateway reports deleted or expired is replaced: re-minted,
    re-delivered, consumer restarted. A blocked, spent or otherwise unusable key is reported (action
    ``unusable``) and left as it is; ``rotate`` replaces a blocked key on purpose. An alias whose value we no
    longer hold is replaced (old key deleted, new one minted) unless that key is blocked. ``rotate``
    replaces a usable key: see :func:`_rotate`. A rotation in flight is left to its owner (``owner``: who
    this run is, :func:`current_owner` by default); one whose owner is dead is finished or undone first
    (:func:`recover_rotation`); a rotation this owner already did is not done twice (a task retry).

    Keys are addressed by hash, never by /key/info's display ``key_name``; no key value goes in a URL.
    """
    me = owner or current_owner()
    alias = key_spec.alias
    home = spec.key_home(key_spec)
    consumer = f"{home.consumer_namespace}/{home.consumer}" if home.consumer else None
    notes: list[str] = []

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

    outcome = await recover_rotation(api, gw_client, master, spec, key_spec, owner=me)
    notes += outcome.notes
    if outcome.in_flight is not None:
        # Another live run is rotating this key: writing home or deleting anything now would race it.
        at_home = await _read_home(api, home)
        return report("kept", key_hash(at_home) if at_home is not None else None)
    if rotate and outcome.finished_by_me:
        notes.append("this run had already rotated the key (a retry): not rotating it twice")
        at_home = await _read_home(api, home)
        return report("rotated", key_hash(at_home) if at_home is not None else None)
    if rotate:
        done = await _read_done(api, spec, alias)
        if done is not None and done == me.ident and me.flow_run_id is not None:
            notes.append("this run had already rotated the key (a retry): not rotating it twice")
            at_home = await _read_home(api, home)
            return report("rotated", key_hash(at_home) if at_home is not None else None)

    at_home = await _read_home(api, home)
    info = await key_info(gw_client, master, at_home) if at_home is not None else None
    if info is not None and info.alias != alias:
        notes.append(f"the key in {home.where} belongs to alias {info.alias!r}, not {alias!r}; replacing it")
        info = None
    records = await list_keys_by_alias(gw_client, master, alias)

    problem = info.problem() if info is not None else None
    if info is not None and at_home is not None and problem not in REPAIRABLE:
        # Our key, alive (or stopped by a decision we do not undo): LiteLLM's token is the value's SHA-256.
        token = key_hash(at_home)
        if problem == "blocked" and rotate:
            notes.append("the key is blocked; replacing it on purpose (--rotate)")
            return await _rotate(api, gw_client, master, spec, key_spec, home, token, notes, me)
        drift = _drift(info, key_spec) if problem in (None, "over budget") else []
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
                f"the key in {home.where} is {problem}; left as it is: "
                f"{_unusable_advice(problem, info, key_spec, token)}"
            )
            return report("unusable", token, problem=problem)
        if rotate:
            return await _rotate(api, gw_client, master, spec, key_spec, home, token, notes, me)
        changed = await _deliver(api, spec, key_spec, home, at_home)
        restarted = await _restart_consumer(api, home, changed, notes)
        return report("updated" if drift else "kept", token, restarted)

    # No usable key of ours at home. A blocked key still holding the alias is an administrator's decision:
    # minting around it (which deletes it) would defeat the block, unless --rotate asks for exactly that.
    if not rotate:
        for r in records:
            held = await key_info_by_token(gw_client, master, r.token) if r.token else None
            if held is not None and held.problem() == "blocked":
                notes.append(
                    f"the key holding alias {alias!r} in the gateway is blocked and its value is not in "
                    f"{home.where}; left as it is: {_unusable_advice('blocked', held, key_spec, r.token)}"
                )
                return report("unusable", r.token, problem="blocked")
    if problem is not None and at_home is not None:
        notes.append(f"the key in {home.where} is {problem} in the gateway; minting a new one and delivering it")
        if problem == "expired":
            await delete_keys(gw_client, master, [key_hash(at_home)])  # it still holds the alias
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
# hash, its temporary alias and the rotation's OWNER (the flow run, or the process outside a flow run) is
# written to the keystore Secret. Only the owner, or anyone once the owner is dead, may finish or undo a
# rotation: a bring-up beside a `keys --rotate` leaves its marker alone. Whatever interrupts the rotation
# (an error, a lost answer, a cancellation, a killed process), the owner itself or the next run after the
# owner's death reads the marker and finishes or undoes it, so that exactly one usable key holds the alias
# and it is the one at home. A finished rotation leaves `rotated.<alias>` naming its owner, so that a retry
# of the same flow run does not rotate twice.

ROTATION_STALE_S = 900.0
"""A rotation takes seconds; a marker whose owner cannot be checked (a process on another machine) older
than this is taken for abandoned."""


@dataclass(frozen=True)
class RotationOwner:
    """Who rotates: a flow run (``flow-run:<id>``: its retries are the same owner) or, outside a flow run,
    a process (``process:<host>:<pid>:<start>``)."""

    ident: str

    @property
    def flow_run_id(self) -> UUID | None:
        kind, _, rest = self.ident.partition(":")
        if kind != "flow-run":
            return None
        try:
            return UUID(rest)
        except ValueError:
            return None

    @property
    def process(self) -> tuple[str, int, str] | None:
        parts = self.ident.split(":")
        if len(parts) != 4 or parts[0] != "process" or not parts[2].isdigit():
            return None
        return parts[1], int(parts[2]), parts[3]


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), to tell a reused pid; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_owner(pid: int | None = None) -> RotationOwner:
    pid = os.getpid() if pid is None else pid
    return RotationOwner(f"process:{socket.gethostname()}:{pid}:{_process_start(pid) or '0'}")


def current_owner() -> RotationOwner:
    """This flow run (task retries and flow retries keep its id), else this process."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        return RotationOwner(f"flow-run:{ctx.flow_run.id}")
    return process_owner()


async def owner_alive(owner: RotationOwner, since: dt.datetime | None) -> bool:
    """Is the owner of a rotation marker still running? A flow run is alive until Prefect has it in a final
    state or it has sent no heartbeat for two intervals (the crash automation's rule); a process on this
    machine while its pid runs with the same start time; anything we cannot check until the marker is
    ROTATION_STALE_S old."""
    age = (dt.datetime.now(dt.UTC) - since).total_seconds() if since else float("inf")
    run_id = owner.flow_run_id
    if run_id is not None:
        try:
            live = await read_liveness(run_id)
        except (CoderStackError, httpx.HTTPError, OSError, RuntimeError):
            return age < ROTATION_STALE_S  # Prefect unreachable or the run unknown to it: judge by age
        return not (live.final or live.silent)
    proc = owner.process
    if proc is not None and proc[0] == socket.gethostname():
        return _process_start(proc[1]) == proc[2]
    return age < ROTATION_STALE_S


@dataclass(frozen=True)
class Marker:
    old_token: str
    retired: str
    owner: RotationOwner
    since: dt.datetime | None


@dataclass
class Recovery:
    """What :func:`recover_rotation` found: notes; the live owner of a rotation in flight (left to it); or
    that this owner's own interrupted rotation was finished (the new key is home)."""

    notes: list[str]
    in_flight: RotationOwner | None = None
    finished_by_me: bool = False


def _marker_key(alias: str) -> str:
    return f"rotating.{alias}"


def _done_key(alias: str) -> str:
    return f"rotated.{alias}"


async def _read_marker(api: ApiClient, spec: StackSpec, alias: str) -> Marker | None:
    data = await read_secret(api, spec.gateway_namespace, spec.keystore_secret)
    raw = (data or {}).get(_marker_key(alias))
    if raw is None:
        return None
    try:
        m = json.loads(raw.get_secret_value())
        since = dt.datetime.fromisoformat(m["since"]) if m.get("since") else None
        # A marker of an earlier version names no owner: nobody can be asked, so it is taken for abandoned.
        return Marker(str(m["old_token"]), str(m["retired_alias"]), RotationOwner(str(m.get("owner", ""))), since)
    except (ValueError, KeyError, TypeError):
        return None


async def _write_marker(
    api: ApiClient, spec: StackSpec, alias: str, old_token: str, retired: str, owner: RotationOwner
) -> None:
    value = json.dumps(
        {
            "old_token": old_token,
            "retired_alias": retired,
            "owner": owner.ident,
            "since": dt.datetime.now(dt.UTC).isoformat(),
        }
    )
    await write_secret_keys(api, spec.gateway_namespace, spec.keystore_secret, {_marker_key(alias): SecretStr(value)})


async def _clear_marker(api: ApiClient, spec: StackSpec, alias: str) -> None:
    await delete_secret_keys(api, spec.gateway_namespace, spec.keystore_secret, [_marker_key(alias)])


async def _read_done(api: ApiClient, spec: StackSpec, alias: str) -> str | None:
    data = await read_secret(api, spec.gateway_namespace, spec.keystore_secret)
    raw = (data or {}).get(_done_key(alias))
    return raw.get_secret_value() if raw is not None else None


async def _write_done(api: ApiClient, spec: StackSpec, alias: str, owner: RotationOwner) -> None:
    await write_secret_keys(
        api, spec.gateway_namespace, spec.keystore_secret, {_done_key(alias): SecretStr(owner.ident)}
    )


async def recover_rotation(
    api: ApiClient,
    gw_client: httpx.AsyncClient,
    master: SecretStr,
    spec: StackSpec,
    key_spec: ClientKeySpec,
    *,
    owner: RotationOwner | None = None,
) -> Recovery:
    """Finish or undo a rotation of ``key_spec`` that was interrupted, if ``owner`` may: it is the marker's
    owner, or that owner is dead. A rotation whose owner is alive is left to it (``in_flight``).

    - the new key reached home: delete the old (renamed) key, restart the consumer;
    - it did not: delete any key minted under the alias (its value is lost), give the old key its alias
      back. Either way exactly one usable key holds the alias, and it is the one at home.
    """
    me = owner or current_owner()
    alias = key_spec.alias
    marker = await _read_marker(api, spec, alias)
    if marker is None:
        return Recovery([])
    mine = marker.owner == me
    if not mine and marker.owner.ident and await owner_alive(marker.owner, marker.since):
        return Recovery(
            [f"a rotation of {alias!r} by {marker.owner.ident} is in flight; left to it (nothing changed here)"],
            in_flight=marker.owner,
        )
    old_token, retired = marker.old_token, marker.retired
    home = spec.key_home(key_spec)
    old = await key_info_by_token(gw_client, master, old_token)
    old_live = old is not None and old.status != "deleted"
    at_home = await _read_home(api, home)
    home_info = await key_info(gw_client, master, at_home) if at_home is not None else None
    home_is_new = (
        at_home is not None
        and key_hash(at_home) != old_token
        and home_info is not None
        and home_info.status != "deleted"
        and home_info.alias == alias
    )
    whose = "this run's" if mine else "a dead run's"
    dead = "" if mine else f" (its owner {marker.owner.ident or '(not recorded)'} is not running)"
    if home_is_new:
        if old_live:
            await delete_keys(gw_client, master, [old_token])
        await _restart_consumer(api, home, ["the rotated key"], [])
        if mine:
            await _write_done(api, spec, alias, me)
        notes = [f"finished {whose} interrupted rotation{dead}: the new key is in {home.where}; the old key is deleted"]
    else:
        orphans = [r.token for r in await list_keys_by_alias(gw_client, master, alias) if r.token]
        orphans = [t for t in orphans if t != old_token]
        if old_live and old is not None and old.alias == retired:
            await delete_keys(gw_client, master, orphans)  # minted under the alias, value lost: nobody has it
            await update_key(gw_client, master, old_token, alias=alias)
        notes = [f"undid {whose} interrupted rotation{dead}: the old key, still in {home.where}, holds {alias!r} again"]
    await _clear_marker(api, spec, alias)
    return Recovery(notes, finished_by_me=home_is_new and mine)


async def _shielded(make: Callable[[], Awaitable[Recovery]]) -> Recovery:
    """Run the tidy-up to its end even if the caller is cancelled meanwhile; the cancellation is raised
    after it (a half-done tidy-up would leave what the rotation's marker is there to prevent)."""
    task = asyncio.ensure_future(make())
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError()
    return result


async def _rotate(
    api: ApiClient,
    gw_client: httpx.AsyncClient,
    master: SecretStr,
    spec: StackSpec,
    key_spec: ClientKeySpec,
    home: KeyHome,
    old_token: str | None,
    notes: list[str],
    owner: RotationOwner,
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
    await _write_marker(api, spec, alias, old_token, retired, owner)
    try:
        await update_key(gw_client, master, old_token, alias=retired)
        minted = await _mint(gw_client, master, key_spec)
        changed = follow + await _deliver(api, spec, key_spec, home, minted.key)
        restarted = await _restart_consumer(api, home, changed, notes)
        await delete_keys(gw_client, master, [old_token])
        await _write_done(api, spec, alias, owner)
        await _clear_marker(api, spec, alias)
    except BaseException as e:
        try:
            rec = await _shielded(lambda: recover_rotation(api, gw_client, master, spec, key_spec, owner=owner))
        except Exception as again:  # the gateway or the cluster is still failing: the next run recovers
            raise GatewayRequestError(
                f"rotating {alias!r} was interrupted ({type(e).__name__}: {e}) and could not be tidied up yet "
                f"({type(again).__name__}); run keys again: it finishes or undoes the rotation"
            ) from e
        if rec.finished_by_me and isinstance(e, Exception):
            # The gateway did what we asked but its answer was lost: the rotation is complete, say so.
            at_home = await _read_home(api, home)
            notes += [f"an answer of the gateway was lost ({type(e).__name__})", *rec.notes]
            return KeyReport(
                alias=alias,
                action="rotated",
                token_id=key_hash(at_home) if at_home is not None else None,
                delivered_to=home.where,
                consumer=f"{home.consumer_namespace}/{home.consumer}" if home.consumer else None,
                consumer_restarted=True,
                notes=notes,
            )
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
    "RotationOwner",
    "TabbyConfig",
    "current_owner",
    "ensure_key",
    "parse_tabby_config",
    "process_owner",
    "read_client_key",
    "recover_rotation",
    "render_tabby_config",
    "tabby_config_with_key",
    "tabby_fim_alias",
]
