"""Wake on demand in the gateway: what ``coder-stack wake-setup`` renders and applies.

The LiteLLM callback (``coder_stack/litellm/wake_hook.py``, shipped as text) and its settings go into a ConfigMap
``coder-stack-wake`` in the gateway namespace; a Role and RoleBinding let the LiteLLM pod's ServiceAccount
``get`` Deployments in the serving namespace; the LiteLLM Deployment mounts the two files beside its proxy config
file and the proxy config names the callback (``litellm_settings.callbacks``). Then the gateway restarts.

Applying is safe to repeat and to interrupt, in this order: (1) the ConfigMap and the RBAC; (2) the mount (a
rollout by itself: the pods get the files, no callback yet); (3) the callback line in the proxy config; (4) the
restart, as the pod-template annotation ``coder-stack.io/wake-setup`` = a digest of the module, its settings and
the proxy config. A run stopped anywhere leaves a gateway that starts (the callback is never named before its
file is mounted), and the next run finishes it: the digest differs until the restart happened. Writes carry the
``resourceVersion`` they were computed from, so two runs at once do not overwrite each other: the loser reads
again and finds nothing left to do.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import importlib.resources
import json
import posixpath
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import BaseModel, Field

from coder_stack.errors import ConfigError, PermanentError, SpecError
from coder_stack.kubernetes.client import API_TIMEOUT, api_errors
from coder_stack.spec import StackSpec
from coder_stack.usecases.wake import DEFAULT_COLD_START_S  # the estimate until a cold start is measured

CONFIGMAP = "coder-stack-wake"
MODULE_FILE = "coder_stack_wake.py"
SETTINGS_FILE = "coder_stack_wake.json"
CALLBACK = "coder_stack_wake.wake_on_demand"
RBAC_NAME = "coder-stack-wake"
VOLUME = "coder-stack-wake"
STAMP = "coder-stack.io/wake-setup"
PREFECT_AUTH_ENV = "PREFECT_API_AUTH_STRING"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
LABELS = {"app.kubernetes.io/managed-by": "coder-stack", "app.kubernetes.io/part-of": "coder-stack"}
CONFLICT_RETRIES = 8


class WakeSetupRefused(PermanentError):
    """wake-setup cannot change the gateway safely; the message says what to add by hand."""


class WakeSetupReport(BaseModel):
    lines: list[str] = Field(default_factory=list)
    changed: bool = False


# ------------------------------------------------------------------------------------------------ rendering


def hook_source() -> str:
    """The callback module's text, as the package ships it."""
    return importlib.resources.files("coder_stack.litellm").joinpath("wake_hook.py").read_text(encoding="utf-8")


def prefect_api_url(spec: StackSpec, given: str | None) -> str:
    """The Prefect API as the gateway pod reaches it: ``--prefect-api-url``, else ``spec.wake.prefect_api_url``."""
    url = given or (str(spec.wake.prefect_api_url) if spec.wake.prefect_api_url else None)
    if not url:
        raise SpecError(
            "wake-setup needs the Prefect API URL as the LiteLLM pod reaches it: pass --prefect-api-url "
            "(e.g. http://prefect-server.prefect.svc.cluster.local:4200/api) or set wake.prefect_api_url in the stack "
            "spec"
        )
    if not re.match(r"^https?://[^/\s]+", url):
        raise SpecError(
            f"--prefect-api-url {url!r} is not an http(s) URL; pass e.g. http://prefect-server.prefect.svc:4200/api"
        )
    if "@" in url.split("//", 1)[1].split("/", 1)[0]:
        raise SpecError(
            "the Prefect API URL must not carry credentials; give the LiteLLM pod the env var "
            f"{PREFECT_AUTH_ENV} from a Secret instead"
        )
    return url.rstrip("/")


def wake_settings(spec: StackSpec, prefect_url: str) -> dict[str, Any]:
    """``coder_stack_wake.json`` (the contract's section 2). No secret in it: the Prefect auth is an env var name."""
    w = spec.wake
    return {
        "version": 1,
        "enabled": w.enabled,
        "namespace": spec.serving_namespace,
        "models": {
            m.alias: {
                "deployment": m.name,
                "role": m.role,
                "fallback": w.fallbacks.get(m.alias),
                "cold_start_s": DEFAULT_COLD_START_S,
            }
            for m in spec.models
        },
        "prefect_api_url": prefect_url,
        "prefect_auth_env": PREFECT_AUTH_ENV,
        "chat_as_message": w.chat_as_message,
        "hold_s": w.hold_s,
        "burst_s": w.burst_s,
        "cache_s": w.cache_s,
        "kubernetes": {"url": None, "token_file": f"{SA_DIR}/token", "ca_file": f"{SA_DIR}/ca.crt"},
    }


def wake_configmap(spec: StackSpec, prefect_url: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIGMAP, "namespace": spec.gateway_namespace, "labels": dict(LABELS)},
        "data": {
            MODULE_FILE: hook_source(),
            SETTINGS_FILE: json.dumps(wake_settings(spec, prefect_url), indent=2) + "\n",
        },
    }


def wake_rbac(spec: StackSpec, service_account: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Role (``get`` Deployments in the serving namespace, nothing else) and its RoleBinding to the LiteLLM pod's
    ServiceAccount."""
    meta = {"name": RBAC_NAME, "namespace": spec.serving_namespace, "labels": dict(LABELS)}
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": dict(meta),
        "rules": [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": dict(meta),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": RBAC_NAME},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": spec.gateway_namespace}],
    }
    return role, binding


# ------------------------------------------------------------------------------------------- the gateway's config


@dataclass(frozen=True)
class ConfigLocation:
    """Where the LiteLLM container reads its proxy config: the path, and the ConfigMap volume holding it."""

    container: str
    path: str
    volume: str
    configmap: str
    key: str
    mount_path: str
    sub_path: bool

    @property
    def directory(self) -> str:
        return posixpath.dirname(self.path)


def _config_arg(container: dict[str, Any]) -> str | None:
    args = [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    for e in container.get("env") or []:
        if e.get("name") == "CONFIG_FILE_PATH" and isinstance(e.get("value"), str):
            return str(e["value"])
    return None


def manual_steps(spec: StackSpec) -> str:
    """What to add by hand when wake-setup cannot: the mount, and the line in the proxy config."""
    return (
        f"mount ConfigMap {spec.gateway_namespace}/{CONFIGMAP} (keys {MODULE_FILE} and {SETTINGS_FILE}) into the "
        "LiteLLM container in the directory of its proxy config file, and add to that config "
        f'`litellm_settings: {{callbacks: ["{CALLBACK}"]}}`; `coder-stack wake-setup` without --apply prints both'
    )


def locate_config(deployment: dict[str, Any], spec: StackSpec) -> ConfigLocation:
    """The proxy config of the LiteLLM Deployment: ``--config`` (or env ``CONFIG_FILE_PATH``) pointing into a
    mounted ConfigMap. Anything else is refused with what to add by hand."""
    name = f"{spec.gateway_namespace}/{deployment.get('metadata', {}).get('name')}"
    pod = deployment.get("spec", {}).get("template", {}).get("spec", {})
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    found: list[ConfigLocation] = []
    for c in pod.get("containers") or []:
        path = _config_arg(c)
        if path is None:
            continue
        path = posixpath.normpath(path)
        for vm in c.get("volumeMounts") or []:
            mount = posixpath.normpath(str(vm.get("mountPath", "")))
            vol = volumes.get(vm.get("name")) or {}
            cm = vol.get("configMap") or _projected_configmap(vol)
            if vm.get("subPath"):
                if mount != path or cm is None:
                    continue
                key = _key_for(cm, str(vm["subPath"]))
                if key:
                    found.append(ConfigLocation(c["name"], path, vm["name"], cm["name"], key, mount, True))
            elif path.startswith(mount.rstrip("/") + "/") and cm is not None:
                key = _key_for(cm, posixpath.relpath(path, mount))
                if key:
                    found.append(ConfigLocation(c["name"], path, vm["name"], cm["name"], key, mount, False))
    if len(found) != 1:
        why = (
            "its LiteLLM container reads no --config (or CONFIG_FILE_PATH) from a mounted ConfigMap"
            if not found
            else "more than one container reads a proxy config"
        )
        raise WakeSetupRefused(
            f"wake-setup cannot find the proxy config of Deployment {name}: {why}. By hand: {manual_steps(spec)}"
        )
    return found[0]


def _projected_configmap(vol: dict[str, Any]) -> dict[str, Any] | None:
    """The first ConfigMap source of a projected volume (the form wake-setup leaves a directory mount in)."""
    for src in (vol.get("projected") or {}).get("sources") or []:
        if "configMap" in src and src["configMap"].get("name") != CONFIGMAP:
            return dict(src["configMap"])
    return None


def _key_for(cm: dict[str, Any], rel: str) -> str | None:
    items = cm.get("items")
    if not items:
        return rel if "/" not in rel else None
    return next((str(it["key"]) for it in items if it.get("path") == rel), None)


def with_mount(deployment: dict[str, Any], loc: ConfigLocation) -> dict[str, Any] | None:
    """The Deployment with the two files mounted beside the proxy config; None when they already are.

    A config mounted by ``subPath`` gets two more ``subPath`` mounts of ``coder-stack-wake``. A config in a mounted
    directory: that ConfigMap volume becomes a projected volume of the same ConfigMap (its items, its mode) plus
    ``coder-stack-wake`` (a second mount inside a ConfigMap directory is not safe: the directory is read-only)."""
    dep = copy.deepcopy(deployment)
    pod = dep["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == loc.container)
    mounts = container.setdefault("volumeMounts", [])
    targets = {posixpath.join(loc.directory, MODULE_FILE), posixpath.join(loc.directory, SETTINGS_FILE)}
    if loc.sub_path:
        have = {posixpath.normpath(m["mountPath"]) for m in mounts if m.get("name") == VOLUME}
        if targets <= have:
            return None
        if not any(v.get("name") == VOLUME for v in pod.get("volumes") or []):
            pod.setdefault("volumes", []).append({"name": VOLUME, "configMap": {"name": CONFIGMAP}})
        for f in (MODULE_FILE, SETTINGS_FILE):
            target = posixpath.join(loc.directory, f)
            if target not in have:
                mounts.append({"name": VOLUME, "mountPath": target, "subPath": f, "readOnly": True})
        return dep
    vol = next(v for v in pod["volumes"] if v["name"] == loc.volume)
    rel = posixpath.relpath(loc.directory, loc.mount_path)
    ours = {
        "configMap": {
            "name": CONFIGMAP,
            "items": [
                {"key": f, "path": f if rel == "." else posixpath.join(rel, f)} for f in (MODULE_FILE, SETTINGS_FILE)
            ],
        }
    }
    if "projected" in vol:
        if any((s.get("configMap") or {}).get("name") == CONFIGMAP for s in vol["projected"].get("sources") or []):
            return None
        vol["projected"].setdefault("sources", []).append(ours)
        return dep
    original = dict(vol.pop("configMap"))
    projected: dict[str, Any] = {"sources": [{"configMap": original}, ours]}
    if "defaultMode" in original:
        projected["defaultMode"] = original.pop("defaultMode")
    vol["projected"] = projected
    return dep


def with_callback(text: str) -> str | None:
    """The proxy config with ``coder_stack_wake.wake_on_demand`` in ``litellm_settings.callbacks``; None when it is
    there already. Edited as text (comments and layout kept) and accepted only when it parses to exactly the old
    config plus the callback; otherwise refused with what to add by hand."""
    try:
        cfg = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise WakeSetupRefused(f"the proxy config is not valid YAML ({e}); fix it first") from e
    if not isinstance(cfg, dict):
        raise WakeSetupRefused("the proxy config is not a YAML mapping; fix it first")
    settings = cfg.get("litellm_settings")
    if settings is not None and not isinstance(settings, dict):
        raise WakeSetupRefused("litellm_settings in the proxy config is not a mapping; fix it first")
    cbs = (settings or {}).get("callbacks")
    current = [cbs] if isinstance(cbs, str) else list(cbs or [])
    if CALLBACK in current:
        return None
    want = dict(cfg)
    want["litellm_settings"] = dict(settings or {}) | {"callbacks": [*current, CALLBACK]}
    for candidate in _edits(text, current):
        try:
            if yaml.safe_load(candidate) == want:
                return candidate
        except yaml.YAMLError:
            continue
    raise WakeSetupRefused(
        f'wake-setup cannot add the callback to this proxy config safely; add "{CALLBACK}" to its '
        "litellm_settings.callbacks by hand"
    )


def _edits(text: str, current: list[Any]) -> list[str]:
    body = text if text.endswith("\n") or not text else text + "\n"
    lines = body.splitlines(keepends=True)
    wanted = json.dumps([*current, CALLBACK])
    out = [body + f"litellm_settings:\n  callbacks: {wanted}\n"]
    head = next((i for i, ln in enumerate(lines) if re.match(r"^litellm_settings:\s*(#.*)?$", ln)), None)
    if head is None:
        return out
    block_end = next(
        (
            j
            for j in range(head + 1, len(lines))
            if lines[j].strip() and not lines[j][0].isspace() and not lines[j].startswith("#")
        ),
        len(lines),
    )
    inner = [j for j in range(head + 1, block_end) if lines[j].strip() and not lines[j].lstrip().startswith("#")]
    indent = re.match(r"^(\s*)", lines[inner[0]]).group(1) if inner else "  "  # type: ignore[union-attr]
    cb = next((j for j in inner if re.match(rf"^{indent}callbacks:", lines[j])), None)
    if cb is None:
        out.append("".join([*lines[: head + 1], f"{indent}callbacks: {wanted}\n", *lines[head + 1 :]]))
        return out
    # callbacks on one line (a flow list or a string), or a block list below it
    out.append("".join([*lines[:cb], f"{indent}callbacks: {wanted}\n", *lines[cb + 1 :]]))
    items = [j for j in range(cb + 1, block_end) if re.match(r"^\s*-\s", lines[j])]
    if items:
        last = items[-1]
        item_indent = re.match(r"^(\s*)-", lines[last]).group(1)  # type: ignore[union-attr]
        out.append("".join([*lines[: last + 1], f'{item_indent}- "{CALLBACK}"\n', *lines[last + 1 :]]))
    return out


# ---------------------------------------------------------------------------------------------------- render


def render(spec: StackSpec, prefect_url: str, service_account: str = "default") -> str:
    """Everything wake-setup would apply, as YAML with a short explanation (no secret in it)."""
    role, binding = wake_rbac(spec, service_account)
    gw = spec.gateway_namespace
    mount_example = {
        "volumes": [{"name": VOLUME, "configMap": {"name": CONFIGMAP}}],
        "volumeMounts (LiteLLM container)": [
            {"name": VOLUME, "mountPath": f"<directory of the proxy config>/{f}", "subPath": f, "readOnly": True}
            for f in (MODULE_FILE, SETTINGS_FILE)
        ],
    }
    head = f"""# Wake on demand in the LiteLLM gateway ({gw}/{spec.gateway_service}).
# 1. ConfigMap {gw}/{CONFIGMAP}: the callback module ({MODULE_FILE}) and its settings ({SETTINGS_FILE}).
# 2. Role + RoleBinding {spec.serving_namespace}/{RBAC_NAME}: the LiteLLM pod's ServiceAccount
#    ({gw}/{service_account} here; the Deployment's serviceAccountName) may get Deployments in {spec.serving_namespace}.
# 3. The LiteLLM Deployment mounts both files beside its proxy config file, e.g. (a config mounted as a whole
#    directory: add {CONFIGMAP} as a second source of a projected volume instead; `--apply` does that):
{_comment(yaml.safe_dump(mount_example, sort_keys=False))}
# 4. The proxy config names the callback (in a Helm chart's values: proxy_config.litellm_settings.callbacks,
#    together with the mount of step 3: LiteLLM does not start when the callback names a file it cannot find):
#      litellm_settings:
#        callbacks: ["{CALLBACK}"]
# 5. Restart the gateway (kubectl -n {gw} rollout restart deploy/{spec.gateway_service}).
# If the Prefect server needs auth, give the LiteLLM container env {PREFECT_AUTH_ENV} from a Secret.
# The callback answers before LiteLLM's router, so router fallbacks would never be tried for a model that is down:
# name them in the stack's wake.fallbacks (`--apply` carries the proxy config's fallbacks over by itself).
# `coder-stack wake-setup --apply` does all of it (idempotent; it refuses when it cannot find the config).
"""
    docs = [wake_configmap(spec, prefect_url), role, binding]
    return head + "---\n" + "---\n".join(yaml.dump(d, Dumper=_BlockDumper, sort_keys=False) for d in docs)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the module, the settings) as literal blocks, as a person writes a ConfigMap."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def _comment(text: str) -> str:
    return "\n".join("#    " + ln for ln in text.rstrip("\n").splitlines())


# ------------------------------------------------------------------------------------------------------ apply


def _plain(api: ApiClient, obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = api.sanitize_for_serialization(obj)
    return out


async def _retrying(step: Callable[[], Awaitable[str | None]]) -> str | None:
    """Run a read-compute-write step again when its write lost a race (409): the other run's result is read."""
    for _ in range(CONFLICT_RETRIES):
        try:
            return await step()
        except ApiException as e:
            if e.status != 409:
                raise
    raise ConfigError("wake-setup: the objects kept changing under it (another run?); run it again")


async def _ensure(
    api: ApiClient, kind: str, namespace: str, body: dict[str, Any], same: Callable[[dict[str, Any]], bool]
) -> str | None:
    """Create or update one object; what changed (None: nothing)."""
    name = body["metadata"]["name"]
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    ops: dict[str, tuple[Any, Any, Any]] = {
        "configmaps": (
            core.read_namespaced_config_map,
            core.create_namespaced_config_map,
            core.replace_namespaced_config_map,
        ),
        "roles": (rbac.read_namespaced_role, rbac.create_namespaced_role, rbac.replace_namespaced_role),
        "rolebindings": (
            rbac.read_namespaced_role_binding,
            rbac.create_namespaced_role_binding,
            rbac.replace_namespaced_role_binding,
        ),
    }
    read, create, replace = ops[kind]

    async def step() -> str | None:
        try:
            with api_errors("get", kind, namespace, name):
                cur = _plain(api, await read(name, namespace, _request_timeout=API_TIMEOUT))
        except ApiException:
            raise
        except Exception as e:
            if getattr(e, "status", None) != 404:
                raise
            try:
                with api_errors("create", kind, namespace, name):
                    await create(namespace, body, _request_timeout=API_TIMEOUT)
            except Exception as ce:
                if getattr(ce, "status", None) == 409:  # created by another run meanwhile: compare with it
                    raise ApiException(status=409) from ce
                raise
            return f"created {kind}/{name} in {namespace}"
        if same(cur):
            return None
        new = copy.deepcopy(body)
        new["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
        try:
            with api_errors("update", kind, namespace, name):
                await replace(name, namespace, new, _request_timeout=API_TIMEOUT)
        except Exception as ue:
            if getattr(ue, "status", None) == 409:
                raise ApiException(status=409) from ue
            raise
        return f"updated {kind}/{name} in {namespace}"

    return await _retrying(step)


async def _read_deployment(api: ApiClient, spec: StackSpec) -> dict[str, Any]:
    apps = client.AppsV1Api(api)
    ns, name = spec.gateway_namespace, spec.gateway_service
    with api_errors("get", "deployments", ns, name):
        return _plain(api, await apps.read_namespaced_deployment(name, ns, _request_timeout=API_TIMEOUT))


async def _replace_deployment(api: ApiClient, spec: StackSpec, dep: dict[str, Any]) -> None:
    apps = client.AppsV1Api(api)
    ns, name = spec.gateway_namespace, spec.gateway_service
    try:
        with api_errors("update", "deployments", ns, name):
            await apps.replace_namespaced_deployment(name, ns, cast(Any, dep), _request_timeout=API_TIMEOUT)
    except Exception as e:
        if getattr(e, "status", None) == 409:
            raise ApiException(status=409) from e
        raise


def digest(module: str, settings: str, config: str) -> str:
    h = hashlib.sha256()
    for part in (module, settings, config):
        h.update(hashlib.sha256(part.encode()).digest())
    return h.hexdigest()[:16]


def proxy_fallbacks(config_text: str) -> dict[str, str]:
    """The fallbacks the proxy config gives LiteLLM's router (``router_settings.fallbacks`` or
    ``litellm_settings.fallbacks``: a list of ``{alias: [fallback, ...]}``), first fallback per alias. The callback
    answers a request for a model that is down before the router runs, so LiteLLM would never try them: wake-setup
    carries them into the callback's settings instead, and a fallback the user configured keeps working."""
    try:
        cfg = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        return {}
    out: dict[str, str] = {}
    for section in ("router_settings", "litellm_settings"):
        entries = (cfg.get(section) or {}).get("fallbacks") if isinstance(cfg.get(section), dict) else None
        for entry in entries if isinstance(entries, list) else []:
            for alias, targets in entry.items() if isinstance(entry, dict) else []:
                first = next(
                    (t for t in (targets if isinstance(targets, list) else [targets]) if isinstance(t, str)), None
                )
                if isinstance(alias, str) and first and first != alias:
                    out.setdefault(alias, first)
    return out


def with_proxy_fallbacks(spec: StackSpec, config_text: str) -> tuple[StackSpec, list[str]]:
    """``spec`` with the proxy config's fallbacks added where ``spec.wake.fallbacks`` names none (the spec wins),
    and a report line per fallback carried over."""
    aliases = {m.alias for m in spec.models}
    found = {a: f for a, f in proxy_fallbacks(config_text).items() if a in aliases and a not in spec.wake.fallbacks}
    if not found:
        return spec, []
    wake = spec.wake.model_copy(update={"fallbacks": {**found, **spec.wake.fallbacks}})
    lines = [
        f"kept LiteLLM's fallback {a} -> {f} (from the proxy config): while {a} is down the callback sends its "
        f"requests to {f}"
        for a, f in sorted(found.items())
    ]
    return spec.model_copy(update={"wake": wake}), lines


async def apply(
    api: ApiClient,
    spec: StackSpec,
    prefect_url: str,
    *,
    timeout_s: float = 600.0,
    poll_s: float = 1.0,
    before_restart: Callable[[], Awaitable[None]] | None = None,
) -> WakeSetupReport:
    """Create or update everything (the module docstring gives the order); restart the gateway when the callback,
    its settings or the proxy config changed since the last restart, and wait until it is Ready."""
    report = WakeSetupReport()
    gw, name = spec.gateway_namespace, spec.gateway_service
    dep = await _read_deployment(api, spec)
    loc = locate_config(dep, spec)  # refuse before changing anything
    sa = dep["spec"]["template"]["spec"].get("serviceAccountName") or "default"
    core = client.CoreV1Api(api)
    with api_errors("get", "configmaps", gw, loc.configmap):
        first = _plain(api, await core.read_namespaced_config_map(loc.configmap, gw, _request_timeout=API_TIMEOUT))
    spec, kept = with_proxy_fallbacks(spec, (first.get("data") or {}).get(loc.key) or "")
    cm = wake_configmap(spec, prefect_url)
    role, binding = wake_rbac(spec, sa)

    for kind, ns, body, same in (
        ("configmaps", gw, cm, lambda cur: (cur.get("data") or {}) == cm["data"]),
        ("roles", spec.serving_namespace, role, lambda cur: cur.get("rules") == role["rules"]),
        (
            "rolebindings",
            spec.serving_namespace,
            binding,
            lambda cur: cur.get("roleRef") == binding["roleRef"] and cur.get("subjects") == binding["subjects"],
        ),
    ):
        changed = await _ensure(api, kind, ns, body, same)
        if changed:
            report.lines.append(changed)

    async def mount_step() -> str | None:
        cur = await _read_deployment(api, spec)
        new = with_mount(cur, locate_config(cur, spec))
        if new is None:
            return None
        await _replace_deployment(api, spec, new)
        return f"mounted {MODULE_FILE} and {SETTINGS_FILE} beside {loc.path} in deploy/{name}"

    changed = await _retrying(mount_step)
    if changed:
        report.lines.append(changed)

    async def config_step() -> str | None:
        with api_errors("get", "configmaps", gw, loc.configmap):
            cur = _plain(api, await core.read_namespaced_config_map(loc.configmap, gw, _request_timeout=API_TIMEOUT))
        text = (cur.get("data") or {}).get(loc.key)
        if text is None:
            raise WakeSetupRefused(
                f"ConfigMap {gw}/{loc.configmap} has no key {loc.key!r} (the proxy config {loc.path}). By hand: "
                f"{manual_steps(spec)}"
            )
        edited = with_callback(text)
        if edited is None:
            return None
        cur["data"][loc.key] = edited
        try:
            with api_errors("update", "configmaps", gw, loc.configmap):
                await core.replace_namespaced_config_map(
                    loc.configmap, gw, cast(Any, cur), _request_timeout=API_TIMEOUT
                )
        except Exception as e:
            if getattr(e, "status", None) == 409:
                raise ApiException(status=409) from e
            raise
        return f'added "{CALLBACK}" to litellm_settings.callbacks in ConfigMap {gw}/{loc.configmap} ({loc.key})'

    changed = await _retrying(config_step)
    if changed:
        report.lines.append(changed)
        if loc.configmap != CONFIGMAP:
            report.lines.append(
                f"note: if ConfigMap {gw}/{loc.configmap} and deploy/{name} come from a Helm chart, an upgrade of it "
                "drops both the mount and the callback line: run `coder-stack wake-setup --apply` again after each "
                "upgrade, or put both in the chart's values (never the line alone: LiteLLM does not start when the "
                "callback's file is missing)"
            )

    with api_errors("get", "configmaps", gw, loc.configmap):
        cfg = _plain(api, await core.read_namespaced_config_map(loc.configmap, gw, _request_timeout=API_TIMEOUT))
    stamp = digest(cm["data"][MODULE_FILE], cm["data"][SETTINGS_FILE], (cfg.get("data") or {}).get(loc.key, ""))
    dep = await _read_deployment(api, spec)
    if ((dep["spec"]["template"].get("metadata") or {}).get("annotations") or {}).get(STAMP) != stamp:
        if before_restart is not None:
            await before_restart()
        apps = client.AppsV1Api(api)
        patch = {"spec": {"template": {"metadata": {"annotations": {STAMP: stamp}}}}}
        with api_errors("patch", "deployments", gw, name):
            await apps.patch_namespaced_deployment(name, gw, patch, _request_timeout=API_TIMEOUT)
        report.lines.append(f"restarted deploy/{name} in {gw} (rollout)")
    report.changed = bool(report.lines)
    report.lines = kept + report.lines  # said on every run; not a change by itself
    await wait_rolled_out(api, spec, timeout_s, poll_s)
    report.lines.append(
        f"deploy/{name} in {gw} is Ready with the callback"
        if report.changed
        else "nothing to change: wake-setup was already applied"
    )
    return report


async def wait_rolled_out(api: ApiClient, spec: StackSpec, timeout_s: float, poll_s: float) -> None:
    """Until the Deployment's rollout is complete: every replica updated, Ready and available (as ``kubectl
    rollout status`` judges it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        dep = await _read_deployment(api, spec)
        want = int(dep["spec"].get("replicas", 1))
        st = dep.get("status") or {}
        if (
            int(st.get("observedGeneration", 0)) >= int(dep["metadata"].get("generation", 0))
            and int(st.get("updatedReplicas", 0)) == want
            and int(st.get("readyReplicas", 0)) >= want
            and int(st.get("replicas", 0)) == want
        ):
            return
        if time.monotonic() > deadline:
            raise ConfigError(
                f"deploy/{spec.gateway_service} in {spec.gateway_namespace} did not finish rolling out within "
                f"{timeout_s:.0f} s (updated {st.get('updatedReplicas', 0)}, ready {st.get('readyReplicas', 0)} of "
                f"{want}); check its pods (kubectl -n {spec.gateway_namespace} get pods), then run wake-setup again"
            )
        await asyncio.sleep(poll_s)


__all__ = [
    "CALLBACK",
    "CONFIGMAP",
    "MODULE_FILE",
    "SETTINGS_FILE",
    "ConfigLocation",
    "WakeSetupRefused",
    "WakeSetupReport",
    "apply",
    "hook_source",
    "locate_config",
    "prefect_api_url",
    "render",
    "wake_configmap",
    "wake_rbac",
    "wake_settings",
    "with_callback",
    "with_mount",
]
