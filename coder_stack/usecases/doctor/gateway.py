"""The gateway's checks: it is ready and which LiteLLM it is; every alias the stack uses is in ``/model/info``,
has prices and routes to the spec's Service; a throwaway key's whole lifecycle; whether a streamed FIM
completion (as Tabby sends it) is metered.

Read-only, except for throwaway virtual keys (alias ``coder-stack-doctor-<hex>``, tiny budget) that are
always deleted again, even after a failed check. Takes an httpx client on the gateway and the master key
(testable against any gateway, no cluster needed).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx
import openai
from pydantic import SecretStr

from coder_stack.errors import CoderStackError, redact
from coder_stack.litellm import admin as gateway
from coder_stack.probe import fim_streamed
from coder_stack.spec import ModelSpec, StackSpec
from coder_stack.transport import bearer, openai_client, scrub_url

from .rows import DoctorRow, Rows, Status, answer, why

KNOWN_LITELLM = "1.108.7"
"""The LiteLLM release the project's recordings (and so its expectations) come from."""
DOCTOR_ALIAS_PREFIX = "coder-stack-doctor-"
THROWAWAY_BUDGET = 0.01
THROWAWAY_BUDGET_UPDATED = 0.02
NOT_METERED = (
    "not metered: streamed FIM is logged at $0 — budgets do not limit Tabby; cap it with rpm/tpm limits on its "
    "key or use a LiteLLM that meters streamed completions"
)


class _VersionSeen:
    """Remembers ``x-litellm-version`` from successful answers of the gateway (LiteLLM sets it on model
    answers, not on admin ones), through an httpx response hook on the doctor's client."""

    def __init__(self, gw: httpx.AsyncClient) -> None:
        self.gw = gw
        self.version: str | None = None
        self.host = gw.base_url.host

    async def __call__(self, response: httpx.Response) -> None:
        if self.version is None and response.is_success and response.request.url.host == self.host:
            v = response.headers.get("x-litellm-version")
            if v:
                self.version = redact(v.strip(), limit=40)

    def __enter__(self) -> _VersionSeen:
        self.gw.event_hooks["response"].append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        hooks = self.gw.event_hooks["response"]
        if self in hooks:
            hooks.remove(self)


def stack_aliases(spec: StackSpec) -> list[str]:
    """Every gateway alias the stack uses: those the gateway must serve already, then those the flows
    register at run time."""
    runtime = [m.alias for m in spec.models if m.register_at_runtime]
    return gateway.expected_aliases(spec) + [a for a in runtime if a not in gateway.expected_aliases(spec)]


def _chat_model(spec: StackSpec) -> ModelSpec:
    default = spec.model(spec.default_model)
    if default.role == "chat":
        return default
    return next((m for m in spec.models if m.role == "chat"), next(m for m in spec.models if m.role != "fim"))


def _fim_model(spec: StackSpec) -> ModelSpec | None:
    return next((m for m in spec.models if m.role == "fim"), None)


def _serving_note(serving: Mapping[str, int] | None, model: ModelSpec) -> str | None:
    """None when ``model`` is serving, else why it counts as not serving."""
    if serving is None:
        return f"whether {model.name} is serving is unknown (no cluster was asked)"
    if serving.get(model.name, 0) <= 0:
        return f"{model.name} is not serving (replicas 0)"
    return None


# --------------------------------------------------------------------------------------------- gateway


async def _check_models(gw: httpx.AsyncClient, master: SecretStr, spec: StackSpec, rows: Rows) -> None:
    aliases = stack_aliases(spec)
    deployments: dict[str, list[dict[str, Any]]] = {}
    try:
        entries = await gateway.model_deployments(gw, master)  # one read of /model/info for every check here
        for a in aliases:
            deployments[a] = [e for e in entries if e.get("model_name") == a]
        prices = gateway.prices_of(entries)
    except CoderStackError as e:
        rows.add("aliases in /model/info", "fail", why(e), "fix the gateway (or the master key) and run doctor again")
        return
    runtime = {m.alias for m in spec.models if m.register_at_runtime}
    missing = [a for a in aliases if not deployments[a]]
    hard = [a for a in missing if a not in runtime]
    soft = [a for a in missing if a in runtime]
    present = [a for a in aliases if deployments[a]]
    seen = f"present: {', '.join(present) or 'none'}"
    if missing:
        seen += f"; missing: {', '.join(missing)}"
    dupes = [f"{a} ({len(deployments[a])})" for a in present if len(deployments[a]) > 1]
    if dupes:
        seen += f"; several deployments: {', '.join(dupes)}"
    if hard:
        rows.add(
            "aliases in /model/info",
            "fail",
            seen + f". Calls to {', '.join(hard)} will fail with 400 'Invalid model name' although a key's "
            "/v1/models lists them (it echoes its scope)",
            "add them to the gateway's model_list (proxy_config) or correct the aliases in the stack spec",
        )
    elif soft or dupes:
        rows.add(
            "aliases in /model/info",
            "warn",
            seen + (f". {', '.join(soft)} is registered at run time (/model/new) by the agent stage" if soft else ""),
            "; ".join(
                (
                    [f"run the agent stage (validate --agent) before using a key scoped to {', '.join(soft)}"]
                    if soft
                    else []
                )
                + (["delete the extra deployments (/model/delete) unless load-balancing is intended"] if dupes else [])
            ),
        )
    else:
        rows.add("aliases in /model/info", "ok", seen)

    for a in present:
        pin, pout = prices.get(a, (0.0, 0.0))
        if pin <= 0 and pout <= 0:
            rows.add(
                f"prices: {a}",
                "warn",
                "no prices configured: spend reads $0 for this alias and budgets never run out",
                "set input_cost_per_token / output_cost_per_token in its litellm_params",
            )
        else:
            rows.add(f"prices: {a}", "ok", f"input ${pin:g}/token, output ${pout:g}/token")

    by_alias = {m.alias: m for m in spec.models}
    for a in present:
        m = by_alias.get(a)
        if m is None:
            continue  # the embeddings server is not a spec model: no Service URL to compare with
        want = spec.model_incluster_url(m).rstrip("/")
        bases = [str((d.get("litellm_params") or {}).get("api_base") or "").rstrip("/") for d in deployments[a]]
        shown = [b for b in bases if b]
        if not shown:
            rows.add(f"upstream: {a}", "skipped", "the gateway does not show api_base for this alias")
            continue
        wrong = sorted({scrub_url(b) for b in shown if b != want})
        if wrong:
            rows.add(
                f"upstream: {a}",
                "warn",
                f"routes to {', '.join(wrong)}; the spec's in-cluster Service is {want}",
                "if the gateway runs in the cluster, point its api_base at the Service (or fix the spec's "
                "namespace, name, port or cluster_domain)",
            )
        else:
            rows.add(f"upstream: {a}", "ok", f"routes to {want}")


class _Stop(Exception):
    """An ordered check failed: the steps after it are skipped."""


async def _chat_status(gw: httpx.AsyncClient, key: SecretStr, alias: str) -> httpx.Response:
    return await gw.post(
        "/v1/chat/completions",
        json={"model": alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        headers=bearer(key),
    )


async def _delete_throwaway(
    gw: httpx.AsyncClient, master: SecretStr, minted: gateway.MintedKey | None, alias: str, rows: Rows, name: str
) -> None:
    """Delete a throwaway key (always, even after a failed check); a row only if that fails."""
    if minted is None:
        return
    try:
        await gateway.delete_keys(gw, master, [minted.key])
    except (CoderStackError, httpx.HTTPError) as e:
        rows.add(
            name,
            "fail",
            f"could not delete the throwaway key {alias!r}: {why(e)}",
            f"delete it: POST /key/delete with key_aliases [{alias}]",
        )


async def _check_key_lifecycle(
    gw: httpx.AsyncClient, master: SecretStr, spec: StackSpec, rows: Rows, serving: Mapping[str, int] | None
) -> None:
    chat = _chat_model(spec)
    alias = f"{DOCTOR_ALIAS_PREFIX}{secrets.token_hex(4)}"
    steps = [
        "key: mint",
        "key: /key/info by hash",
        "key: /key/list full object",
        "key: call with the key",
        "key: /key/update by value",
        "key: /key/delete by hash",
        "key: /key/info after delete",
        "key: call with the deleted key",
    ]
    done: set[str] = set()
    minted: gateway.MintedKey | None = None

    def add(name: str, status: Status, seen: str = "", todo: str = "") -> None:
        done.add(name)
        rows.add(name, status, seen, todo)
        if status == "fail":
            raise _Stop

    async def attempt(name: str, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await call()
        except (CoderStackError, httpx.HTTPError) as e:
            add(name, "fail", why(e), "fix the gateway's key handling (database connected?) and run doctor again")

    try:
        minted = await attempt(
            steps[0],
            lambda: gateway.generate_key(
                gw, master, alias=alias, models=[chat.alias], max_budget=THROWAWAY_BUDGET, budget_duration="1d"
            ),
        )
        assert minted is not None
        key = minted.key
        rows.hide(key.get_secret_value())
        add(steps[0], "ok", f"minted throwaway key {alias!r} scoped to [{chat.alias}], budget ${THROWAWAY_BUDGET:g}")

        info = await attempt(steps[1], lambda: gateway.key_info(gw, master, key))
        if info is None:
            add(steps[1], "fail", "404: the gateway does not know the key it just minted", "check its database")
        elif info.status != "active" or info.alias != alias or info.models != [chat.alias]:
            add(
                steps[1],
                "fail",
                f"status {info.status!r}, alias {info.alias!r}, models {info.models}: not the key just minted",
                "check the gateway's database",
            )
        else:
            add(
                steps[1],
                "ok",
                "200 for the key's hash (no key value in any URL), status active, alias and scope as minted",
            )

        recs = await attempt(steps[2], lambda: gateway.list_keys_by_alias(gw, master, alias))
        token = recs[0].token if len(recs) == 1 else None
        if token is None:
            add(
                steps[2],
                "fail",
                f"/key/list?key_alias=...&return_full_object=true gave {len(recs)} object(s)"
                + (" without a token" if len(recs) == 1 else ""),
                "the flows find keys by alias this way: upgrade or fix the gateway",
            )
        elif minted.record.token and minted.record.token != token:
            add(steps[2], "fail", "the listed token differs from the one /key/generate returned", "check the gateway")
        else:
            add(steps[2], "ok", f"one object, token {token[:12]}...")
        assert token is not None

        note = _serving_note(serving, chat)
        if note:
            done.add(steps[3])
            rows.add(steps[3], "skipped", note)
        else:
            resp = await attempt(steps[3], lambda: _chat_status(gw, key, chat.alias))
            if resp.is_success:
                add(steps[3], "ok", f"{chat.alias} answered 200 through the throwaway key")
            else:
                add(
                    steps[3],
                    "fail",
                    f"{chat.alias} answered {answer(resp)}",
                    f"read the gateway's log and the {chat.name} pod's",
                )

        await attempt(steps[4], lambda: gateway.update_key(gw, master, key, max_budget=THROWAWAY_BUDGET_UPDATED))
        after = await attempt(steps[4], lambda: gateway.key_info(gw, master, key))
        if after is None or after.max_budget is None or abs(after.max_budget - THROWAWAY_BUDGET_UPDATED) > 1e-12:
            add(
                steps[4],
                "fail",
                f"max_budget is {after.max_budget if after else 'unknown'} after the update, not "
                f"{THROWAWAY_BUDGET_UPDATED:g}",
                "the keys flow corrects budgets this way: check the gateway",
            )
        else:
            add(steps[4], "ok", f"max_budget {THROWAWAY_BUDGET:g} -> {THROWAWAY_BUDGET_UPDATED:g}")

        await attempt(steps[5], lambda: gateway.delete_keys(gw, master, [token]))
        add(steps[5], "ok", f"deleted {token[:12]}...")

        gone = await attempt(steps[6], lambda: gateway.key_info(gw, master, key))
        if gone is None:
            add(
                steps[6],
                "warn",
                f"404 instead of 200 with status 'deleted' (what LiteLLM {KNOWN_LITELLM} answers)",
                "the flows treat both as gone; note the gateway's version",
            )
        elif gone.status == "deleted":
            add(steps[6], "ok", "200, status deleted")
        else:
            add(
                steps[6],
                "fail",
                f"status {gone.status!r} after the delete: the key still exists",
                "check the gateway's database; delete it by hand if it stays",
            )

        dead = await attempt(steps[7], lambda: _chat_status(gw, key, chat.alias))
        if dead.status_code == 401:
            add(steps[7], "ok", f"refused: {answer(dead)}")
        elif dead.is_success:
            add(
                steps[7],
                "fail",
                "a deleted key still works (200)",
                "the gateway caches keys: restart it; rotated keys would keep working",
            )
        else:
            add(steps[7], "warn", f"answered {answer(dead)} (expected 401 token_not_found_in_db)")
    except _Stop:
        pass
    finally:
        for name in steps:
            if name not in done:
                rows.add(name, "skipped", "an earlier step failed")
        await _delete_throwaway(gw, master, minted, alias, rows, "key: clean-up")


async def _check_fim_metering(
    gw: httpx.AsyncClient, master: SecretStr, spec: StackSpec, rows: Rows, serving: Mapping[str, int] | None
) -> None:
    name = "streamed FIM metering"
    fim = _fim_model(spec)
    if fim is None:
        rows.add(name, "skipped", "the stack has no FIM model")
        return
    note = _serving_note(serving, fim)
    if note:
        rows.add(name, "skipped", note + "; the check streams one completion through it")
        return
    alias = f"{DOCTOR_ALIAS_PREFIX}fim-{secrets.token_hex(4)}"
    minted: gateway.MintedKey | None = None
    try:
        minted = await gateway.generate_key(
            gw, master, alias=alias, models=[fim.alias], max_budget=THROWAWAY_BUDGET, budget_duration="1d"
        )
        rows.hide(minted.key.get_secret_value())
        token = minted.record.token
        if not token:
            recs = await gateway.list_keys_by_alias(gw, master, alias)
            token = recs[0].token if recs else None
        try:
            oai = openai_client(gw, str(gw.base_url), minted.key, spec.timeouts)
            _text, _usage, ident = await fim_streamed(oai, fim.alias)
        except (openai.OpenAIError, httpx.HTTPError) as e:
            rows.add(name, "fail", f"streamed /v1/completions to {fim.alias}: {why(e)}", "read the gateway's log")
            return
        if not token or not ident:
            rows.add(name, "warn", "cannot match the stream to a spend-log entry (no key hash or no completion id)")
            return
        found = await gateway.wait_for_spend_log_entries(
            gw, master, token, [ident], wait_s=spec.timeouts.spend_visible_s
        )
        entry = found.get(ident)
        if entry is None:
            rows.add(
                name,
                "warn",
                f"no /spend/logs entry with the stream's request_id {ident} within {spec.timeouts.spend_visible_s:g}s",
                "LiteLLM writes spend in batches (PROXY_BATCH_WRITE_AT): raise spec.timeouts.spend_visible_s",
            )
            return
        spend = float(entry.get("spend") or 0.0)
        tokens = int(entry.get("total_tokens") or 0)
        if spend <= 0 and tokens <= 0:
            rows.add(name, "warn", NOT_METERED, "set rpm_limit / tpm_limit on the tabby key")
        elif spend <= 0:
            rows.add(name, "warn", f"logged {tokens} tokens at $0: no prices configured for {fim.alias}")
        else:
            rows.add(name, "ok", f"metered: ${spend:g} for {tokens} tokens")
    except CoderStackError as e:
        rows.add(name, "fail", why(e), "fix the gateway and run doctor again")
    finally:
        await _delete_throwaway(gw, master, minted, alias, rows, "streamed FIM: clean-up")


async def gateway_checks(
    gw: httpx.AsyncClient,
    master: SecretStr,
    spec: StackSpec,
    *,
    serving: Mapping[str, int] | None = None,
) -> list[DoctorRow]:
    """The gateway's rows. ``gw`` is a client on the gateway (base URL without ``/v1``); ``serving`` gives
    replicas per model name (None: unknown, so the checks that need a model answering are skipped)."""
    rows = Rows(master.get_secret_value())
    try:
        await gateway.gateway_ready(gw)
    except CoderStackError as e:
        rows.add("gateway ready", "fail", why(e), "check the litellm pod, its database and the endpoint")
        for n in ("gateway version", "aliases in /model/info", "key lifecycle", "streamed FIM metering"):
            rows.add(n, "skipped", "the gateway is not ready")
        return rows.rows
    rows.add("gateway ready", "ok", f"/health/readiness 200 at {scrub_url(gw.base_url)}")
    version_at = len(rows.rows)
    with _VersionSeen(gw) as seen:
        await _check_models(gw, master, spec, rows)
        await _check_key_lifecycle(gw, master, spec, rows, serving)
        await _check_fim_metering(gw, master, spec, rows, serving)
    if seen.version is None:
        row = DoctorRow(
            name="gateway version",
            status="warn",
            seen="unknown: no successful model answer carried x-litellm-version in this run (LiteLLM sets it on "
            "model answers only; were no models serving?)",
            todo="run doctor again with a model serving, or read the image tag of the litellm Deployment",
        )
    elif seen.version != KNOWN_LITELLM:
        row = DoctorRow(
            name="gateway version",
            status="warn",
            seen=f"LiteLLM {seen.version}; coder-stack's expectations are recorded from {KNOWN_LITELLM}",
            todo="run the contract tests (docs/CONTRACT.md) against this gateway",
        )
    else:
        row = DoctorRow(name="gateway version", status="ok", seen=f"LiteLLM {seen.version} (x-litellm-version)")
    out = rows.rows
    out.insert(version_at, row)
    return out


__all__ = [
    "DOCTOR_ALIAS_PREFIX",
    "KNOWN_LITELLM",
    "NOT_METERED",
    "gateway_checks",
    "stack_aliases",
]
