"""`coder-stack doctor`: quick checks of the gateway and the model servers before the morning run meets them.

Read-only, except for throwaway virtual keys (alias ``coder-stack-doctor-<hex>``, tiny budget) that are
always deleted again. No Prefect flow, no Prefect server.

Two layers:

- :func:`gateway_checks`, :func:`model_server_checks` and :func:`run_doctor` take an httpx client, the
  master key and the spec (testable against any gateway, no cluster needed);
- :func:`doctor_cluster` wires them to a cluster: reads the Secrets, the Deployments' replicas and opens
  the endpoints (port-forward, in-cluster or URL overrides) as the flows do.

Each check is a :class:`DoctorRow`: name, ``ok`` / ``warn`` / ``fail`` / ``skipped``, what was seen, what to
do. No key value, header or master key ever goes into a row, a log line or an exception.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, Collection, Mapping
from contextlib import AsyncExitStack
from typing import Any, Literal

import httpx
import openai
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from coder_stack.errors import CoderStackError, redact
from coder_stack.litellm import admin as gateway
from coder_stack.probe import fim_streamed
from coder_stack.spec import ModelSpec, StackSpec
from coder_stack.transport import bearer, error_detail, openai_client, scrub_url

Status = Literal["ok", "warn", "fail", "skipped"]

KNOWN_LITELLM = "1.108.7"
"""The LiteLLM release the project's recordings (and so its expectations) come from."""
DOCTOR_ALIAS_PREFIX = "coder-stack-doctor-"
THROWAWAY_BUDGET = 0.01
THROWAWAY_BUDGET_UPDATED = 0.02
NOT_METERED = (
    "not metered: streamed FIM is logged at $0 — budgets do not limit Tabby; cap it with rpm/tpm limits on its "
    "key or use a LiteLLM that meters streamed completions"
)


class DoctorRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(max_length=120, description="What was checked.")
    status: Status = Field(description="ok, warn, fail or skipped.")
    seen: str = Field("", max_length=1200, description="What was seen (redacted).")
    todo: str = Field("", max_length=600, description="What to do about it ('' when nothing).")


class DoctorReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: list[DoctorRow] = Field(default_factory=list, description="Every check, in order.")

    def count(self, status: Status) -> int:
        return sum(1 for r in self.rows if r.status == status)

    @property
    def ok(self) -> bool:
        """Nothing failed (warnings and skips do not fail the doctor)."""
        return self.count("fail") == 0

    def summary(self) -> str:
        parts = [f"{self.count(s)} {s}" for s in ("ok", "warn", "fail", "skipped")]
        verdict = "nothing failed" if self.ok else "something failed: read the rows marked fail"
        return f"doctor: {', '.join(parts)} — {verdict}"

    def to_json(self) -> str:
        return json.dumps(
            {"ok": self.ok, "summary": self.summary(), "rows": [r.model_dump() for r in self.rows]}, indent=2
        )


class _Rows:
    """Collects rows; every text is redacted (known secret values and anything shaped like a key)."""

    def __init__(self, *secret_values: str) -> None:
        self.rows: list[DoctorRow] = []
        self._secrets = [s for s in secret_values if s]

    def hide(self, *values: str) -> None:
        self._secrets.extend(v for v in values if v)

    def add(self, name: str, status: Status, seen: str = "", todo: str = "") -> DoctorRow:
        row = DoctorRow(
            name=redact(name, *self._secrets, limit=120),
            status=status,
            seen=redact(seen, *self._secrets, limit=1100),
            todo=redact(todo, *self._secrets, limit=550),
        )
        self.rows.append(row)
        return row


def _why(e: BaseException) -> str:
    """An exception as a short, redacted phrase (our own errors carry what to do; others only their type)."""
    if isinstance(e, CoderStackError):
        return e.message
    if isinstance(e, openai.APIStatusError):
        try:
            raw: Any = e.response.content
        except httpx.ResponseNotRead:
            raw = e.body
        etype, msg = error_detail(raw)
        return f"answered {e.status_code} {etype}: {msg}".strip()
    if isinstance(e, openai.APIConnectionError | httpx.TransportError):
        return f"unreachable ({type(e.__cause__ or e).__name__})"
    return f"{type(e).__name__}"


def _answer(resp: httpx.Response) -> str:
    etype, msg = error_detail(resp.content)
    return f"{resp.status_code} {etype}: {msg}".strip().rstrip(":")


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


async def _check_models(gw: httpx.AsyncClient, master: SecretStr, spec: StackSpec, rows: _Rows) -> None:
    aliases = stack_aliases(spec)
    deployments: dict[str, list[dict[str, Any]]] = {}
    try:
        entries = await gateway.model_deployments(gw, master)  # one read of /model/info for every check here
        for a in aliases:
            deployments[a] = [e for e in entries if e.get("model_name") == a]
        prices = gateway.prices_of(entries)
    except CoderStackError as e:
        rows.add("aliases in /model/info", "fail", _why(e), "fix the gateway (or the master key) and run doctor again")
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
    gw: httpx.AsyncClient, master: SecretStr, minted: gateway.MintedKey | None, alias: str, rows: _Rows, name: str
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
            f"could not delete the throwaway key {alias!r}: {_why(e)}",
            f"delete it: POST /key/delete with key_aliases [{alias}]",
        )


async def _check_key_lifecycle(
    gw: httpx.AsyncClient, master: SecretStr, spec: StackSpec, rows: _Rows, serving: Mapping[str, int] | None
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
            add(name, "fail", _why(e), "fix the gateway's key handling (database connected?) and run doctor again")

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
                    f"{chat.alias} answered {_answer(resp)}",
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
            add(steps[7], "ok", f"refused: {_answer(dead)}")
        elif dead.is_success:
            add(
                steps[7],
                "fail",
                "a deleted key still works (200)",
                "the gateway caches keys: restart it; rotated keys would keep working",
            )
        else:
            add(steps[7], "warn", f"answered {_answer(dead)} (expected 401 token_not_found_in_db)")
    except _Stop:
        pass
    finally:
        for name in steps:
            if name not in done:
                rows.add(name, "skipped", "an earlier step failed")
        await _delete_throwaway(gw, master, minted, alias, rows, "key: clean-up")


async def _check_fim_metering(
    gw: httpx.AsyncClient, master: SecretStr, spec: StackSpec, rows: _Rows, serving: Mapping[str, int] | None
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
            rows.add(name, "fail", f"streamed /v1/completions to {fim.alias}: {_why(e)}", "read the gateway's log")
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
        rows.add(name, "fail", _why(e), "fix the gateway and run doctor again")
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
    rows = _Rows(master.get_secret_value())
    try:
        await gateway.gateway_ready(gw)
    except CoderStackError as e:
        rows.add("gateway ready", "fail", _why(e), "check the litellm pod, its database and the endpoint")
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


# --------------------------------------------------------------------------------------------- model servers


async def model_server_checks(
    http: httpx.AsyncClient,
    spec: StackSpec,
    vllm_key: SecretStr | None,
    replicas: Mapping[str, int],
    urls: Mapping[str, str],
    *,
    key_problem: str = "",
) -> list[DoctorRow]:
    """Per model: ``/health``, ``/version``, its served name in ``/v1/models`` (with the vLLM key), when its
    Deployment has replicas > 0 (``replicas`` per model name, ``urls`` its base URL without ``/v1``)."""
    rows = _Rows(vllm_key.get_secret_value() if vllm_key else "")
    for m in spec.models:
        n = replicas.get(m.name, 0)
        if n <= 0:
            rows.add(f"model {m.name}", "skipped", "not serving (replicas 0)")
            continue
        base = urls.get(m.name)
        if not base:
            rows.add(f"model {m.name}", "fail", f"replicas {n} but no endpoint to reach it", "check its Service")
            continue
        base = base.rstrip("/")
        try:
            r = await http.get(f"{base}/health")
            if r.status_code == 200:
                rows.add(f"model {m.name}: /health", "ok", "200")
            else:
                rows.add(f"model {m.name}: /health", "fail", _answer(r), f"read the {m.name} pod's log")
            r = await http.get(f"{base}/version")
            version = ""
            if r.status_code == 200:
                try:
                    version = str((r.json() or {}).get("version") or "")
                except (ValueError, AttributeError):
                    version = ""
            if version:
                rows.add(f"model {m.name}: /version", "ok", f"vLLM {redact(version, limit=40)}")
            else:
                rows.add(f"model {m.name}: /version", "warn", f"no version in the answer ({_answer(r)})")
        except httpx.HTTPError as e:
            rows.add(
                f"model {m.name}: /health",
                "fail",
                f"{scrub_url(base)} {_why(e)}",
                f"replicas {n}: is a pod Ready? (kubectl -n {spec.serving_namespace} get pods)",
            )
            continue
        if vllm_key is None:
            rows.add(
                f"model {m.name}: served name",
                "fail",
                key_problem or "no vLLM key to ask /v1/models with",
                f"create the Secret {spec.vllm_key.namespace}/{spec.vllm_key.name} key {spec.vllm_key.key}",
            )
            continue
        try:
            r = await http.get(f"{base}/v1/models", headers=bearer(vllm_key))
        except httpx.HTTPError as e:
            rows.add(f"model {m.name}: served name", "fail", _why(e), f"read the {m.name} pod's log")
            continue
        if r.status_code == 401:
            rows.add(
                f"model {m.name}: served name",
                "fail",
                f"/v1/models refused the vLLM key ({_answer(r)})",
                f"the pod's --api-key differs from {spec.vllm_key.namespace}/{spec.vllm_key.name}: restart it",
            )
            continue
        try:
            ids = [str(d.get("id")) for d in r.json().get("data") or [] if isinstance(d, dict)]
        except (ValueError, AttributeError):
            ids = []
        if r.status_code == 200 and m.served_model_name in ids:
            rows.add(f"model {m.name}: served name", "ok", f"/v1/models lists {m.served_model_name}")
        else:
            rows.add(
                f"model {m.name}: served name",
                "fail",
                f"/v1/models ({r.status_code}) lists {ids}, not {m.served_model_name!r}",
                "make --served-model-name and spec.models[].served_model_name agree",
            )
    return rows.rows


async def run_doctor(
    gw: httpx.AsyncClient,
    master: SecretStr,
    spec: StackSpec,
    *,
    serving: Mapping[str, int] | None = None,
    vllm_key: SecretStr | None = None,
    model_urls: Mapping[str, str] | None = None,
    http: httpx.AsyncClient | None = None,
) -> DoctorReport:
    """Gateway checks, then model-server checks when ``serving`` (replicas per model) is known."""
    rows = await gateway_checks(gw, master, spec, serving=serving)
    if serving is not None:
        rows += await model_server_checks(http or gw, spec, vllm_key, serving, model_urls or {})
    return DoctorReport(rows=rows)


# --------------------------------------------------------------------------------------------- cluster wiring


async def doctor_cluster(target: Any, spec: StackSpec) -> DoctorReport:
    """Read the master and vLLM keys from their Secrets and the models' replicas from their Deployments,
    open the gateway and the serving models' endpoints as the spec says, and run every check."""
    from coder_stack.kubernetes.client import open_api
    from coder_stack.kubernetes.workloads import deployment_status
    from coder_stack.transport import make_client
    from coder_stack.usecases.endpoints import open_endpoint, open_gateway, read_ref

    pre = _Rows()
    async with open_api(target) as api, AsyncExitStack() as stack:
        replicas: dict[str, int] = {}
        for m in spec.models:
            try:
                replicas[m.name] = (await deployment_status(api, spec.serving_namespace, m.name)).replicas
            except CoderStackError as e:
                pre.add(f"model {m.name}", "fail", _why(e), "apply the stack's manifests")
        vllm_key: SecretStr | None = None
        key_problem = ""
        if any(n > 0 for n in replicas.values()):
            try:
                vllm_key = await read_ref(api, spec.vllm_key)
            except CoderStackError as e:
                key_problem = _why(e)
        urls: dict[str, str] = {}
        for m in spec.models:
            if replicas.get(m.name, 0) > 0:
                try:
                    urls[m.name] = await stack.enter_async_context(open_endpoint(api, spec, m.name))
                except CoderStackError as e:
                    pre.add(f"model {m.name}: endpoint", "fail", _why(e), "check its Service and pods")
        try:
            master = await read_ref(api, spec.master_key)
            gw = await stack.enter_async_context(open_gateway(api, spec))
        except CoderStackError as e:
            pre.add("gateway ready", "fail", _why(e), "check the litellm Secret, Service and pod")
            rows: list[DoctorRow] = []
        else:
            rows = await gateway_checks(gw, master, spec, serving=replicas)
        http = await stack.enter_async_context(make_client(spec.timeouts, attempts=2, max_wait_s=2.0))
        rows += await model_server_checks(http, spec, vllm_key, replicas, urls, key_problem=key_problem)
    return DoctorReport(rows=pre.rows + rows)


# --------------------------------------------------------------------------------------------- output

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skipped": "dim"}


def render(report: DoctorReport) -> Any:
    """A rich Table of the rows; every cell is plain Text (messages hold ``[...]`` that markup would eat)."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title="coder-stack doctor")
    for col in ("check", "status", "seen", "what to do"):
        t.add_column(col)
    for r in report.rows:
        t.add_row(Text(r.name), Text(r.status, style=_STYLE[r.status]), Text(r.seen), Text(r.todo))
    return t


def selected(rows: Collection[DoctorRow], prefix: str) -> list[DoctorRow]:
    return [r for r in rows if r.name.startswith(prefix)]


__all__ = [
    "DOCTOR_ALIAS_PREFIX",
    "NOT_METERED",
    "DoctorReport",
    "DoctorRow",
    "doctor_cluster",
    "gateway_checks",
    "model_server_checks",
    "render",
    "run_doctor",
    "selected",
    "stack_aliases",
]
