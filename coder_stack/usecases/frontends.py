"""The front-ends as users meet them: Open WebUI asked from inside its pod with its own environment (and
whether that environment is what the app uses), and the key Tabby is configured with, called the way Tabby
calls (streamed FIM) through the gateway."""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Protocol

import httpx
from kubernetes_asyncio.client import ApiClient

from coder_stack.errors import SmokeFailed, SpecError, redact
from coder_stack.kubernetes.client import read_secret
from coder_stack.litellm.smoke import scope_mismatch
from coder_stack.probe import (
    FIM_PROMPT_TEMPLATE,
    CallUsage,
    Check,
    SmokeResult,
    Timer,
    excerpt,
    fim_prompt,
    fim_streamed,
    hops,
    judge_fim,
    usage_of,
)
from coder_stack.spec import TABBY_CONFIG_KEY, StackSpec
from coder_stack.transport import error_detail, make_client, openai_client
from coder_stack.usecases.keys import parse_tabby_config, tabby_fim_alias
from coder_stack.usecases.openwebui import (
    PERSISTENT_CONFIG_PROBE_CMD,
    PERSISTENT_CONFIG_VAR,
    env_wins_for,
    parse_persistent_config_probe,
)


class ExecResultLike(Protocol):
    @property
    def exit_code(self) -> int: ...
    @property
    def stdout(self) -> str: ...
    @property
    def stderr(self) -> str: ...


ExecFn = Callable[[ApiClient, str, str, list[str], float], "Awaitable[ExecResultLike] | ExecResultLike"]

# Open WebUI's backend/open_webui/config.py builds its OpenAI connections so: the ``;``-separated
# OPENAI_API_BASE_URLS when set and non-empty, else OPENAI_API_BASE_URL (default https://api.openai.com/v1); the
# ``;``-separated OPENAI_API_KEYS when set and non-empty, else OPENAI_API_KEY; entries stripped, keys index-aligned
# with URLs. So OPENAI_API_KEYS wins over OPENAI_API_KEY when both are set. The smoke calls the first connection
# with the key the app reads for it, resolved in the pod the same way (the key never leaves the pod).
_OPENWEBUI_CONNECTION = (
    'if [ -n "${OPENAI_API_BASE_URLS:-}" ]; then u="$OPENAI_API_BASE_URLS"; '
    'else u="${OPENAI_API_BASE_URL:-https://api.openai.com/v1}"; fi; '
    'if [ -n "${OPENAI_API_KEYS:-}" ]; then k="$OPENAI_API_KEYS"; else k="${OPENAI_API_KEY:-}"; fi; '
    'u="${u%%;*}"; k="${k%%;*}"; '
    "u=$(printf %s \"$u\" | sed 's/^[[:space:]]*//;s/[[:space:]]*$//;s#/*$##'); "
    "k=$(printf %s \"$k\" | sed 's/^[[:space:]]*//;s/[[:space:]]*$//'); "
)
OPENWEBUI_MODELS_CMD = [
    "sh",
    "-c",
    _OPENWEBUI_CONNECTION + 'curl -s -H "Authorization: Bearer $k" "$u/models"',
]
# Which variable the app takes its (first) key from: "OPENAI_API_KEYS:same" (its first entry equals
# $OPENAI_API_KEY, the variable coder-stack delivers), "OPENAI_API_KEYS:other", "OPENAI_API_KEY" or "none".
# Compared inside the pod: no key is printed.
OPENWEBUI_KEY_SOURCE_CMD = [
    "sh",
    "-c",
    _OPENWEBUI_CONNECTION + 'if [ -n "${OPENAI_API_KEYS:-}" ]; then '
    'if [ "$k" = "${OPENAI_API_KEY:-}" ]; then printf OPENAI_API_KEYS:same; else printf OPENAI_API_KEYS:other; fi; '
    'elif [ -n "${OPENAI_API_KEY:-}" ]; then printf OPENAI_API_KEY; else printf none; fi',
]


async def smoke_frontends(
    api: ApiClient,
    spec: StackSpec,
    exec_fn: ExecFn,
    gateway_base_url: str,
    *,
    http: httpx.AsyncClient | None = None,
    openwebui: bool = True,
    tabby: bool = True,
) -> SmokeResult:
    """Open WebUI lists exactly its key's scope, asked from inside its pod with its own environment; the key
    Tabby is configured with completes a FIM prompt through the gateway (the coder-fim model must be up)."""
    total, lap = Timer(), Timer()
    checks: list[Check] = []
    usage: list[CallUsage] = []
    answer = ""
    own_http = http is None
    client = http or make_client(spec.timeouts)
    try:
        if openwebui:
            ks = spec.key_delivered_to("openwebui-secrets")
            if ks is None:
                raise SpecError(
                    "no key in spec.virtual_keys is delivered to openwebui-secrets; nothing to check Open WebUI with"
                )
            fe = spec.frontend("open-webui")
            if fe is None:
                raise SpecError(
                    "spec.frontends has no Open WebUI front-end (a Deployment named or labelled 'open-webui'); "
                    "nothing to smoke"
                )
            ns, who = spec.experience_namespace, fe.name
            res = exec_fn(api, ns, fe.selector, OPENWEBUI_MODELS_CMD, spec.timeouts.request_s)
            if inspect.isawaitable(res):
                res = await res
            out = redact(res.stdout or "")
            if res.exit_code != 0:
                raise SmokeFailed(
                    f"{who}: curl to its first OpenAI connection's /models exited {res.exit_code} "
                    f"({redact(res.stderr or '', limit=200)!r}); can the pod reach the gateway?",
                    hop="frontend",
                )
            try:
                body = json.loads(res.stdout)
            except ValueError:
                raise SmokeFailed(f"{who}: /models answered non-JSON {out[:200]!r}", hop="frontend") from None
            if not isinstance(body, dict) or "data" not in body:
                etype, msg = error_detail(body)
                raise SmokeFailed(
                    f"{who}: the gateway refused Open WebUI's key ({etype}: {msg}); run the keys flow",
                    hop="frontend",
                )
            ids = [str(m.get("id")) for m in body.get("data") or [] if isinstance(m, dict)]
            source = exec_fn(api, ns, fe.selector, OPENWEBUI_KEY_SOURCE_CMD, spec.timeouts.request_s)
            if inspect.isawaitable(source):
                source = await source
            var = (source.stdout or "").strip() if source.exit_code == 0 else ""
            if var not in ("OPENAI_API_KEYS:same", "OPENAI_API_KEYS:other", "OPENAI_API_KEY", "none"):
                raise SmokeFailed(
                    f"{who}: could not tell which variable Open WebUI reads its key from (exit {source.exit_code}); "
                    "the check needs a shell in its container",
                    hop="frontend",
                )
            if var == "none":
                raise SmokeFailed(
                    f"{who}: neither OPENAI_API_KEYS nor OPENAI_API_KEY is set in the pod, so Open WebUI calls the "
                    f"gateway with no key; deploy/{who} must load OPENAI_API_KEY from the Secret "
                    f"{spec.openwebui_secret} (run the keys flow to create it)",
                    hop="frontend",
                )
            if var == "OPENAI_API_KEYS:other":
                raise SmokeFailed(
                    f"{who}: OPENAI_API_KEYS is set in the pod and Open WebUI reads it in preference to "
                    "OPENAI_API_KEY (its config.py: OPENAI_API_KEYS wins when both are set), and its first entry is "
                    f"not the key coder-stack delivers as OPENAI_API_KEY in the Secret {spec.openwebui_secret}: a "
                    "re-minted or rotated key never reaches the app. Remove OPENAI_API_KEYS from "
                    f"deploy/{who} (or set it from that Secret's OPENAI_API_KEY) and restart it",
                    hop="frontend",
                )
            reads = "OPENAI_API_KEYS" if var.startswith("OPENAI_API_KEYS") else "OPENAI_API_KEY"
            scope_mismatch(ids, ks.models, what=f"{who} (the key it reads, from {reads})", hop="frontend")
            checks.append(
                Check(
                    name=f"{who} pod: /models = key scope (key from {reads})",
                    seconds=lap.lap(),
                    detail=", ".join(sorted(ids)),
                )
            )
            # The curl above uses the pod's $OPENAI_API_KEY. Open WebUI itself uses it only if its environment
            # wins over the connection it stored at first launch (docs: PersistentConfig variables such as
            # OPENAI_API_KEY(S) are read from the environment at the first launch only, unless
            # ENABLE_PERSISTENT_CONFIG is False). Ask the same pod's environment.
            probe = exec_fn(api, ns, fe.selector, PERSISTENT_CONFIG_PROBE_CMD, spec.timeouts.request_s)
            if inspect.isawaitable(probe):
                probe = await probe
            try:
                if probe.exit_code != 0:
                    raise ValueError(f"exited {probe.exit_code}")
                value = parse_persistent_config_probe(probe.stdout or "")
            except ValueError as e:
                raise SmokeFailed(
                    f"{who}: could not read {PERSISTENT_CONFIG_VAR} in the pod ({e}); the check of the key Open "
                    "WebUI itself uses needs a shell in its container",
                    hop="frontend",
                ) from None
            if not env_wins_for(value):
                seen = "is not set (default True)" if value is None else "is 'true'"
                raise SmokeFailed(
                    f"{who}: {PERSISTENT_CONFIG_VAR} {seen} in the pod, so Open WebUI uses the OpenAI connection "
                    "stored in its database at its first launch, not $OPENAI_API_KEY, so this check cannot prove "
                    f"the key Open WebUI calls the gateway with (a re-minted or rotated key never reaches it). Set "
                    f"{PERSISTENT_CONFIG_VAR}=False on deploy/{who} (or in the Secret {spec.openwebui_secret} if it "
                    "loads it via envFrom) and restart it",
                    hop="frontend",
                )
            checks.append(
                Check(
                    name=f"{who} pod: {PERSISTENT_CONFIG_VAR} lets the environment win",
                    seconds=lap.lap(),
                    detail="the app uses $OPENAI_API_KEY",
                )
            )
        if tabby:
            ks = spec.key_delivered_to("tabby-config")
            if ks is None:
                raise SpecError("no key in spec.virtual_keys is delivered to tabby-config; nothing to check Tabby with")
            data = await read_secret(api, spec.experience_namespace, spec.tabby_config_secret)
            raw = (data or {}).get(TABBY_CONFIG_KEY)
            cfg = parse_tabby_config(raw) if raw is not None else None
            where = f"{spec.experience_namespace}/{spec.tabby_config_secret}"
            if cfg is None:
                raise SmokeFailed(
                    f"tabby: {where} has no config.toml with [model.completion.http] api_key; run the keys flow",
                    hop="frontend",
                )
            expected_endpoint = spec.gateway_incluster_url + "/v1"
            problems = []
            if cfg.kind != "vllm/completion":
                problems.append(f"kind {cfg.kind!r} (want 'vllm/completion')")
            if cfg.api_endpoint.rstrip("/") != expected_endpoint:
                problems.append(f"api_endpoint {cfg.api_endpoint!r} (want {expected_endpoint!r})")
            if cfg.prompt_template != FIM_PROMPT_TEMPLATE:
                problems.append(f"prompt_template {cfg.prompt_template!r} (want the Qwen FIM tokens)")
            if cfg.model_name != tabby_fim_alias(spec, ks):
                problems.append(f"model_name {cfg.model_name!r}")
            if problems:
                raise SmokeFailed(f"tabby: {where} config.toml is wrong: {'; '.join(problems)}", hop="frontend")
            secrets = (cfg.api_key.get_secret_value(),)
            oai = openai_client(client, gateway_base_url, cfg.api_key, spec.timeouts)
            with hops("tabby's key: FIM via the gateway", via="gateway", unreachable="gateway", secrets=secrets):
                # Streamed, as Tabby's vllm/completion backend calls: the gateway may meter this differently
                text, u, request_id = await fim_streamed(oai, cfg.model_name, fim_prompt(template=cfg.prompt_template))
            judge_fim(text, hop="model", where="tabby's key: FIM via the gateway")
            usage.append(
                usage_of(cfg.model_name, "completions", u, streamed=True, request_id=request_id, key_alias=ks.alias)
            )
            answer = excerpt(text, *secrets)
            checks.append(
                Check(name="tabby config key: streamed FIM through the gateway", seconds=lap.lap(), detail=answer)
            )
    finally:
        if own_http:
            await client.aclose()
    return SmokeResult(
        kind="frontends",
        target=", ".join(
            f.name for f in spec.frontends if (f.app == "open-webui" and openwebui) or (f.app == "tabby" and tabby)
        ),
        checks=checks,
        total_s=total.lap(),
        excerpt=answer,
        usage=usage,
    )


__all__ = ["OPENWEBUI_KEY_SOURCE_CMD", "OPENWEBUI_MODELS_CMD", "ExecFn", "smoke_frontends"]
