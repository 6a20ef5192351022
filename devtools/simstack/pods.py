"""A pod as the kubelet sees it, read the same way by every part of the sim: whether it is Ready
(:func:`pod_is_ready`, for the controllers, the Service backends and kubectl's printer), and its
containers' environment and mounted Secret/ConfigMap files resolved from the store
(:func:`resolve_container_env`: the one resolver, for the kubelet's processes and for exec).
"""

from __future__ import annotations

import base64
import re
from typing import Any

from simstack.store import Obj, Store


def pod_is_ready(pod: Obj) -> bool:
    """The pod's Ready condition is True (what Deployments count and Services route to)."""
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


class MissingConfigError(Exception):
    """A Secret/ConfigMap (or a key of one) that a container needs does not exist."""


def _decode(s: str) -> str:
    return base64.b64decode(s).decode(errors="replace")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion in env values, command and args; $$ escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        name = m.group(1)
        return env.get(name, m.group(0))

    return re.sub(r"\$\$\([^)]*\)|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)", sub, value)


def resolve_container_env(store: Store, namespace: str, container: Obj, pod: Obj | None = None) -> dict[str, str]:
    """A container's environment as the kubelet builds it (envFrom, env, valueFrom). Raises MissingConfigError."""
    env: dict[str, str] = {}
    for ef in container.get("envFrom") or []:
        prefix = ef.get("prefix", "")
        for kind, plural in (("secretRef", "secrets"), ("configMapRef", "configmaps")):
            ref = ef.get(kind)
            if not ref:
                continue
            obj = store.find(plural, namespace, ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise MissingConfigError(f'{plural[:-1].replace("configmap", "configmap")} "{ref["name"]}" not found')
            data = obj.get("data") or {}
            for k, v in data.items():
                env[prefix + k] = _decode(v) if plural == "secrets" else v
    for e in container.get("env") or []:
        name = e["name"]
        if "value" in e:
            env[name] = expand(str(e["value"]), env)
            continue
        vf = e.get("valueFrom") or {}
        if "secretKeyRef" in vf or "configMapKeyRef" in vf:
            plural, kindname, ref = (
                ("secrets", "Secret", vf["secretKeyRef"])
                if "secretKeyRef" in vf
                else ("configmaps", "ConfigMap", vf["configMapKeyRef"])
            )
            obj = store.find(plural, namespace, ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise MissingConfigError(
                    f'{"secret" if plural == "secrets" else "configmap"} "{ref["name"]}" not found'
                )
            data = obj.get("data") or {}
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise MissingConfigError(f"couldn't find key {ref['key']} in {kindname} {namespace}/{ref['name']}")
            env[name] = _decode(data[ref["key"]]) if plural == "secrets" else data[ref["key"]]
        elif "fieldRef" in vf and pod is not None:
            path = vf["fieldRef"].get("fieldPath", "")
            cur: Any = pod
            for part in path.split("."):
                cur = cur.get(part) if isinstance(cur, dict) else None
            env[name] = "" if cur is None else str(cur)
        else:
            env[name] = ""
    return env


def missing_volumes(store: Store, namespace: str, pod_spec: Obj) -> list[tuple[str, str]]:
    """(volume name, message) for every Secret/ConfigMap volume that cannot be mounted."""
    out = []
    for vol in pod_spec.get("volumes") or []:
        if "secret" in vol:
            ref = vol["secret"]
            if not ref.get("optional") and store.find("secrets", namespace, ref["secretName"]) is None:
                out.append((vol["name"], f'secret "{ref["secretName"]}" not found'))
        elif "configMap" in vol:
            ref = vol["configMap"]
            if not ref.get("optional") and store.find("configmaps", namespace, ref["name"]) is None:
                out.append((vol["name"], f'configmap "{ref["name"]}" not found'))
        elif "projected" in vol:
            for src in vol["projected"].get("sources") or []:
                for kind, plural, key in (("secret", "secrets", "name"), ("configMap", "configmaps", "name")):
                    ref = src.get(kind)
                    if ref and not ref.get("optional") and store.find(plural, namespace, ref[key]) is None:
                        out.append((vol["name"], f'{kind.lower()} "{ref[key]}" not found'))
    return out


def mounted_files(store: Store, namespace: str, pod_spec: Obj, container: Obj) -> dict[str, str]:
    """Mounted path -> content for the container's Secret and ConfigMap volumes."""
    vols = {v["name"]: v for v in pod_spec.get("volumes") or []}
    files: dict[str, str] = {}
    for vm in container.get("volumeMounts") or []:
        vol = vols.get(vm["name"]) or {}
        # every source of the volume: (data, items); a projected volume has several (Secrets, ConfigMaps)
        sources: list[tuple[dict[str, str], list[Obj] | None]] = []
        refs = [vol] if "secret" in vol or "configMap" in vol else (vol.get("projected") or {}).get("sources") or []
        for ref in refs:
            if "secret" in ref:
                name = ref["secret"].get("secretName") or ref["secret"].get("name")
                obj = store.find("secrets", namespace, name)
                sources.append(
                    ({k: _decode(v) for k, v in ((obj or {}).get("data") or {}).items()}, ref["secret"].get("items"))
                )
            elif "configMap" in ref:
                obj = store.find("configmaps", namespace, ref["configMap"]["name"])
                sources.append((dict((obj or {}).get("data") or {}), ref["configMap"].get("items")))
        mount = vm["mountPath"].rstrip("/")
        for data, items in sources:
            paths = {it["key"]: it["path"] for it in items} if items else {k: k for k in data}
            if vm.get("subPath"):
                for key, rel in paths.items():
                    if rel == vm["subPath"] and key in data:
                        files[mount] = data[key]
                continue
            for key, rel in paths.items():
                if key in data:
                    files[f"{mount}/{rel}"] = data[key]
    return files
