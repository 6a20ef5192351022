"""Kubernetes client plumbing shared by every cluster function: connecting, error translation, Secrets.

Functions take a ``kubernetes_asyncio`` ``ApiClient`` as their first argument. ``ClusterTarget`` is the
serialisable description of *which* cluster (kubeconfig path + context) that Prefect tasks receive; they
open the client themselves with :func:`open_api`.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiohttp
import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from coder_stack.errors import (
    ClusterError,
    ClusterRequestError,
    ClusterUnavailable,
    ConfigError,
    Forbidden,
    NotFound,
)

# Every API call gets an explicit timeout: kubernetes-asyncio reads a pair as (connect, read) seconds.
# Watches set their own.
API_TIMEOUT = (5, 30)


class ClusterTarget(BaseModel):
    """Which cluster to talk to. Serialisable, holds no credentials itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kubeconfig: str | None = Field(
        None, max_length=4096, description="Path to a kubeconfig; default: in-cluster, then $KUBECONFIG."
    )
    context: str | None = Field(None, max_length=253, description="Kubeconfig context; default: current.")


def _kubeconfig_path(target: ClusterTarget) -> str | None:
    if target.kubeconfig:
        return os.path.expanduser(target.kubeconfig)
    env = os.environ.get("KUBECONFIG")
    if env:
        return env.split(os.pathsep)[0]
    default = Path("~/.kube/config").expanduser()
    return str(default) if default.exists() else None


async def load_configuration(target: ClusterTarget) -> client.Configuration:
    """Build a client configuration; bad kubeconfigs and unknown contexts fail with what to do."""
    cfg = client.Configuration()
    path = _kubeconfig_path(target)
    if path is None:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not target.context:
            config.load_incluster_config(client_configuration=cfg)
            return cfg
        raise ConfigError(
            "no kubeconfig found: pass --kubeconfig PATH (or set KUBECONFIG); "
            "inside a cluster the pod's ServiceAccount is used"
        )
    if not Path(path).is_file():
        raise ConfigError(f"kubeconfig {path} does not exist; pass --kubeconfig with an existing file")
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"kubeconfig {path} cannot be read as YAML ({type(e).__name__}); check the file") from e
    if not isinstance(doc, dict) or not doc.get("contexts"):
        raise ConfigError(f"kubeconfig {path} has no contexts; is it a kubeconfig file?")
    contexts = [str(c.get("name")) for c in doc.get("contexts") or [] if isinstance(c, dict)]
    if target.context and target.context not in contexts:
        raise ConfigError(f"context {target.context!r} is not in {path}; its contexts are: {', '.join(contexts)}")
    try:
        await config.load_kube_config(config_file=path, context=target.context, client_configuration=cfg)
    except (ConfigException, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"kubeconfig {path} could not be loaded: {type(e).__name__}; check its clusters/users") from e
    return cfg


@asynccontextmanager
async def open_api(target: ClusterTarget) -> AsyncIterator[ApiClient]:
    cfg = await load_configuration(target)
    async with ApiClient(configuration=cfg) as api:
        yield api


# ------------------------------------------------------------------------------------- errors
def _status_message(e: ApiException) -> str:
    try:
        body = json.loads(e.body) if e.body else {}
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except (ValueError, TypeError):
        pass
    return str(e.reason or "")


@contextmanager
def api_errors(verb: str, resource: str, namespace: str | None = None, name: str | None = None) -> Iterator[None]:
    """Translate client errors into the project's errors, naming what was attempted."""
    where = f" in namespace {namespace!r}" if namespace else ""
    what = f"{resource}/{name}" if name else resource
    try:
        yield
    except ApiException as e:
        msg = _status_message(e)
        if e.status == 403:
            raise Forbidden(
                f"the cluster refused to {verb} {resource}{where}: {msg}. "
                f"Grant verb {verb!r} on resource {resource!r}{where} to the flows' ServiceAccount "
                "(see deployments/rbac.yaml)"
            ) from e
        if e.status == 401:
            raise ConfigError(f"the cluster rejected our credentials ({msg}); refresh the kubeconfig's token") from e
        if e.status == 404:
            raise NotFound(f"{what}{where} does not exist ({msg}); check the stack spec's names") from e
        if e.status in (429, 500, 502, 503, 504) or e.status == 0:
            raise ClusterUnavailable(f"the API server answered {e.status} to {verb} {what}{where}: {msg}") from e
        raise ClusterRequestError(f"{verb} {what}{where} failed with {e.status}: {msg}") from e
    except (aiohttp.ClientConnectionError, TimeoutError) as e:
        raise ClusterUnavailable(
            f"the API server could not be reached to {verb} {what}{where} ({type(e).__name__}); "
            "check that the cluster is up and the kubeconfig's server address"
        ) from e
    except aiohttp.ClientError as e:
        raise ClusterUnavailable(f"{verb} {what}{where}: connection problem ({type(e).__name__})") from e


# ------------------------------------------------------------------------------------- secrets
def _decode(data: Mapping[str, str] | None) -> dict[str, SecretStr]:
    out: dict[str, SecretStr] = {}
    for k, v in (data or {}).items():
        out[k] = SecretStr(base64.b64decode(v).decode())
    return out


async def read_secret(api: ApiClient, namespace: str, name: str) -> dict[str, SecretStr] | None:
    """All keys of a Secret, or None if it does not exist. Values stay wrapped."""
    core = client.CoreV1Api(api)
    try:
        with api_errors("get", "secrets", namespace, name):
            sec = await core.read_namespaced_secret(name, namespace, _request_timeout=API_TIMEOUT)
    except NotFound:
        return None
    return _decode(sec.data)


async def read_secret_key(api: ApiClient, namespace: str, name: str, key: str) -> SecretStr | None:
    """One key of a Secret, or None if the Secret or the key is absent."""
    data = await read_secret(api, namespace, name)
    if data is None:
        return None
    return data.get(key)


async def require_secret_key(api: ApiClient, namespace: str, name: str, key: str) -> SecretStr:
    value = await read_secret_key(api, namespace, name, key)
    if value is None or not value.get_secret_value():
        raise NotFound(
            f"secret {namespace}/{name} has no key {key!r}; create it (see the runbook's prerequisites) "
            "or fix the stack spec's secret reference"
        )
    return value


async def write_secret_keys(
    api: ApiClient,
    namespace: str,
    name: str,
    values: Mapping[str, SecretStr],
    *,
    only_if_absent: frozenset[str] = frozenset(),
) -> list[str]:
    """Write keys into a Secret, creating it if needed and keeping its other keys.

    Keys in ``only_if_absent`` are written only when the Secret does not have them yet (e.g.
    WEBUI_SECRET_KEY, which signs user sessions). Returns the names of the keys that changed.
    """
    core = client.CoreV1Api(api)
    existing = await read_secret(api, namespace, name)
    changed = []
    for k, v in values.items():
        if (
            existing is not None
            and k in existing
            and (k in only_if_absent or existing[k].get_secret_value() == v.get_secret_value())
        ):
            continue
        changed.append(k)
    if not changed:
        return []
    data = {k: base64.b64encode(values[k].get_secret_value().encode()).decode() for k in changed}
    if existing is None:
        body = client.V1Secret(metadata=client.V1ObjectMeta(name=name, namespace=namespace), type="Opaque", data=data)
        try:
            with api_errors("create", "secrets", namespace, name):
                await core.create_namespaced_secret(namespace, body, _request_timeout=API_TIMEOUT)
            return changed
        except ClusterRequestError:
            pass  # created concurrently: fall through to a patch
    with api_errors("patch", "secrets", namespace, name):
        await core.patch_namespaced_secret(name, namespace, {"data": data}, _request_timeout=API_TIMEOUT)
    return changed


async def delete_secret_keys(api: ApiClient, namespace: str, name: str, keys: list[str]) -> None:
    """Remove keys from a Secret (JSON patch), leaving the rest."""
    existing = await read_secret(api, namespace, name)
    if not existing:
        return
    ops = [{"op": "remove", "path": f"/data/{k.replace('~', '~0').replace('/', '~1')}"} for k in keys if k in existing]
    if not ops:
        return
    core = client.CoreV1Api(api)
    with api_errors("patch", "secrets", namespace, name):
        await core.patch_namespaced_secret(name, namespace, ops, _request_timeout=API_TIMEOUT)


__all__ = [
    "API_TIMEOUT",
    "ClusterError",
    "ClusterTarget",
    "api_errors",
    "delete_secret_keys",
    "load_configuration",
    "open_api",
    "read_secret",
    "read_secret_key",
    "require_secret_key",
    "restart_deployment",
    "write_secret_keys",
]


async def restart_deployment(api: ApiClient, namespace: str, name: str) -> None:
    """`kubectl rollout restart`: stamp the pod template so the controller replaces the pods."""
    from datetime import UTC, datetime

    apps = client.AppsV1Api(api)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": stamp}}}}}
    with api_errors("patch", "deployments", namespace, name):
        await apps.patch_namespaced_deployment(name, namespace, body, _request_timeout=API_TIMEOUT)
