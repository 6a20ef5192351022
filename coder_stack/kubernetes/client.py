"""Kubernetes client plumbing shared by every cluster function: connecting, error translation, Secrets, ConfigMaps.

Functions take a ``kubernetes_asyncio`` ``ApiClient`` as their first argument. ``ClusterTarget`` is the
serialisable description of *which* cluster (kubeconfig path + context) that Prefect tasks receive; they
open the client themselves with :func:`open_api`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException
from kubernetes_asyncio.config.kube_config import KubeConfigLoader
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from coder_stack.errors import (
    ClusterError,
    ClusterRequestError,
    ClusterUnavailable,
    ConfigError,
    Forbidden,
    NotFound,
)
from coder_stack.transport import install_log_redaction

# kubernetes_asyncio logs every response body at DEBUG (Secrets included): the redacting filter is on its
# REST client's logger wherever this module is used, not only where coder_stack.transport happens to be imported.
install_log_redaction()

# Every API call gets an explicit timeout: kubernetes-asyncio reads a pair as (connect, read) seconds.
# Watches set their own.
API_TIMEOUT = (5, 30)


class ClusterTarget(BaseModel):
    """Which cluster to talk to. Serialisable, holds no credentials itself: a kubeconfig path, or the name of
    a prefect-kubernetes ``KubernetesCredentials`` block that holds the kubeconfig (read when a client opens)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kubeconfig: str | None = Field(
        None, max_length=4096, description="Path to a kubeconfig; default: in-cluster, then $KUBECONFIG."
    )
    context: str | None = Field(None, max_length=253, description="Kubeconfig context; default: current.")
    credentials_block: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="Name of a KubernetesCredentials block (prefect-kubernetes) holding the kubeconfig; "
        "instead of a kubeconfig path.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ClusterTarget:
        if self.kubeconfig and self.credentials_block:
            raise ValueError("give a kubeconfig path or a KubernetesCredentials block name, not both")
        return self


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
    if target.credentials_block:
        return await _configuration_from_block(target.credentials_block, target.context)
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
        doc = yaml.load(Path(path).read_text(), Loader=yaml.CSafeLoader)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"kubeconfig {path} cannot be read as YAML ({type(e).__name__}); check the file") from e
    _check_contexts(doc, target.context, f"kubeconfig {path}", "is it a kubeconfig file?")
    try:
        loader = await config.load_kube_config(config_file=path, context=target.context, client_configuration=cfg)
    except (ConfigException, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"kubeconfig {path} could not be loaded: {type(e).__name__}; check its clusters/users") from e
    cfg.refresh_api_key_hook = _refresh_credentials(loader)
    return cfg


def _check_contexts(doc: object, context: str | None, source: str, hint: str) -> None:
    if not isinstance(doc, dict) or not doc.get("contexts"):
        raise ConfigError(f"{source} has no contexts; {hint}")
    contexts = [str(c.get("name")) for c in doc.get("contexts") or [] if isinstance(c, dict)]
    if context and context not in contexts:
        raise ConfigError(f"context {context!r} is not in {source}; its contexts are: {', '.join(contexts)}")


async def _configuration_from_block(name: str, context: str | None) -> client.Configuration:
    """A configuration from the kubeconfig a prefect-kubernetes ``KubernetesCredentials`` block holds, loaded
    as a kubeconfig file is (same loader, same refresh hook for exec plugins and gcp tokens).

    The block's contents are credentials: no message below quotes them (pydantic's errors would, so they
    are not chained). A block without a cluster config means "the pod's ServiceAccount" (in-cluster).
    """
    from prefect_kubernetes.credentials import KubernetesCredentials

    source = f"KubernetesCredentials block {name!r}"
    try:
        creds = await KubernetesCredentials.aload(name)
    except ValueError as e:  # Prefect: "Unable to find block document named ..."
        if isinstance(e, ValidationError):
            raise ConfigError(f"{source} does not hold a valid cluster config; recreate it") from None
        raise ConfigError(
            f"{source} does not exist; create it with `coder-stack setup --kubeconfig PATH --credentials-block "
            f"{name}` (or in the Prefect UI: Blocks > Kubernetes Credentials)"
        ) from None
    except RuntimeError:  # Prefect: "Unable to load ... due to failed validation"
        raise ConfigError(f"{source} does not hold a valid cluster config; recreate it") from None
    except (httpx.HTTPError, OSError) as e:  # the Prefect API unreachable, or answering with an error
        raise ConfigError(f"the Prefect API could not be reached to read {source} ({type(e).__name__})") from None
    if creds.cluster_config is None:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not context:
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            return cfg
        raise ConfigError(f"{source} has no cluster config and this is not a pod in a cluster; add a kubeconfig")
    doc = creds.cluster_config.config
    context = context or creds.cluster_config.context_name
    _check_contexts(doc, context, source, "create it from a kubeconfig file")
    cfg = client.Configuration()
    try:
        loader = await config.load_kube_config_from_dict(config_dict=doc, context=context, client_configuration=cfg)
    except (ConfigException, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{source} could not be loaded: {type(e).__name__}; check its clusters/users") from None
    cfg.refresh_api_key_hook = _refresh_credentials(loader)
    return cfg


def _refresh_credentials(loader: KubeConfigLoader) -> Callable[[client.Configuration], Awaitable[None]] | None:
    """A ``refresh_api_key_hook`` for credentials that expire (exec plugins such as gke-gcloud-auth-plugin
    or aws eks get-token, and the gcp provider), so a client held for a whole flow run keeps working.

    kubernetes-asyncio calls the hook before every request; the loader re-runs the plugin only when its
    token is within the library's skew of expiring (``load_from_exec_plugin`` returns at once otherwise).
    """
    user = loader._user  # the loader keeps the context's user; it has no public accessor
    if user is None or ("exec" not in user and loader.provider != "gcp"):
        return None

    async def refresh(cfg: client.Configuration) -> None:
        if loader.provider == "gcp":
            await loader.load_gcp_token()
        else:
            await loader.load_from_exec_plugin()
        token = getattr(loader, "token", None)
        if token:
            cfg.api_key["BearerToken"] = token

    return refresh


@dataclass
class _Shared:
    loop: asyncio.AbstractEventLoop
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    api: ApiClient | None = None  # built by the first open_api(): a bad kubeconfig fails there, in a task


# Clients shared by every open_api() inside a cluster_session() block, keyed by target. A ContextVar, so
# each flow run (and each asyncio task it starts) sees only the sessions its own code opened.
_SESSIONS: ContextVar[Mapping[ClusterTarget, _Shared] | None] = ContextVar("coder_stack_cluster_sessions", default=None)


@asynccontextmanager
async def cluster_session(target: ClusterTarget) -> AsyncIterator[None]:
    """Share one API client for ``target`` among every :func:`open_api` in this block (a flow run's body).

    Without it each task opens its own client: the kubeconfig parsed again and a new SSL context built
    (~35 ms of CPU each) for every task. The client is built by the first :func:`open_api` (so a bad
    kubeconfig fails in that task, as without a session) and closed at the end of the block. Credentials
    that expire are refreshed before each request.
    """
    current = _SESSIONS.get() or {}
    if target in current:
        yield
        return
    shared = _Shared(asyncio.get_running_loop())
    token = _SESSIONS.set({**current, target: shared})
    try:
        yield
    finally:
        _SESSIONS.reset(token)
        if shared.api is not None:
            await shared.api.close()


async def _new_client(target: ClusterTarget) -> ApiClient:
    cfg = await load_configuration(target)
    return ApiClient(configuration=cfg)


@asynccontextmanager
async def open_api(target: ClusterTarget) -> AsyncIterator[ApiClient]:
    """The API client for ``target``: the enclosing :func:`cluster_session`'s if there is one (on this
    event loop), otherwise a client of its own, closed on exit."""
    shared = (_SESSIONS.get() or {}).get(target)
    if shared is not None and shared.loop is asyncio.get_running_loop():
        async with shared.lock:
            if shared.api is None:
                shared.api = await _new_client(target)
        yield shared.api
        return
    async with await _new_client(target) as api:
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
                "(see deployments/rbac.yaml)",
                status=e.status,
                resource=what,
            ) from e
        if e.status == 401:
            raise ConfigError(
                f"the cluster rejected our credentials ({msg}); refresh the kubeconfig's token",
                status=e.status,
                resource=what,
            ) from e
        if e.status == 404:
            raise NotFound(
                f"{what}{where} does not exist ({msg}); check the stack spec's names", status=e.status, resource=what
            ) from e
        if e.status in (429, 500, 502, 503, 504) or e.status == 0:
            raise ClusterUnavailable(
                f"the API server answered {e.status} to {verb} {what}{where}: {msg}", status=e.status, resource=what
            ) from e
        raise ClusterRequestError(
            f"{verb} {what}{where} failed with {e.status}: {msg}", status=e.status, resource=what
        ) from e
    except (aiohttp.ClientConnectionError, TimeoutError) as e:
        raise ClusterUnavailable(
            f"the API server could not be reached to {verb} {what}{where} ({type(e).__name__}); "
            "check that the cluster is up and the kubeconfig's server address"
        ) from e
    except aiohttp.ClientError as e:
        raise ClusterUnavailable(f"{verb} {what}{where}: connection problem ({type(e).__name__})") from e


@contextmanager
def ws_errors(verb: str, resource: str, namespace: str, name: str) -> Iterator[None]:
    """api_errors for WebSocket upgrades: a refused handshake carries the HTTP status."""
    with api_errors(verb, resource, namespace, name):
        try:
            yield
        except aiohttp.WSServerHandshakeError as e:
            raise ApiException(status=e.status, reason=e.message) from e


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


async def read_config_map(api: ApiClient, namespace: str, name: str) -> dict[str, str] | None:
    """A ConfigMap's data, or None if it does not exist."""
    core = client.CoreV1Api(api)
    try:
        with api_errors("get", "configmaps", namespace, name):
            cm = await core.read_namespaced_config_map(name, namespace, _request_timeout=API_TIMEOUT)
    except NotFound:
        return None
    return dict(cm.data or {})


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
        except ClusterRequestError as e:
            if e.status != 409:  # only AlreadyExists means "created concurrently"; anything else is an error
                raise
            # created concurrently: fall through to a patch
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
    "read_config_map",
    "read_secret",
    "read_secret_key",
    "require_secret_key",
    "write_secret_keys",
    "ws_errors",
]
