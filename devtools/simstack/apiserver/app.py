"""The API server's application: the router that every request goes through (request log, injected
faults, discovery, authentication and authorisation, then the handler of the target resource or
subresource), the server object that owns the handlers and the hooks, and the entry points.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import warnings
from collections import deque
from typing import Any

import yaml
from aiohttp import web

from simstack.apiserver.crud import Resources
from simstack.apiserver.discovery import discovery_response
from simstack.apiserver.errors import (
    ApiError,
    bad_request,
    error_details,
    not_found_resource,
    parse_bool,
    status_response,
)
from simstack.apiserver.exec import Exec
from simstack.apiserver.faults import ApiFaults
from simstack.apiserver.logs import LogFile, pod_log
from simstack.apiserver.portforward import PortForward
from simstack.apiserver.rbac import Authorizer
from simstack.apiserver.scale import Scale
from simstack.apiserver.tables import to_table, wants_table
from simstack.apiserver.target import Target, parse_target
from simstack.apiserver.watch import Watches
from simstack.backends import Backends
from simstack.store import Store


class ApiServer:
    def __init__(
        self,
        store: Store,
        backends: Backends,
        authorizer: Authorizer | None = None,
        bookmark_interval: float = 1.0,
        log_file: LogFile | None = None,
    ) -> None:
        self.store = store
        self.backends = backends
        self.authorizer = authorizer
        self.bookmark_interval = bookmark_interval
        self.log_file = log_file
        self.faults = ApiFaults()
        self.requests: deque[tuple[str, str]] = deque(maxlen=2000)
        # with an authorizer: who asked for what, and the verdict (user, verb, resource, namespace, name, allowed)
        self.audit: deque[tuple[str, str, str, str | None, str | None, bool]] = deque(maxlen=20000)
        self.tls_url: str | None = None  # the TLS listener's URL, when started with one
        self._sockets: set[web.WebSocketResponse] = set()
        self.resources = Resources(store)
        self.scale = Scale(self.resources)
        self.watches = Watches(store, self.faults, bookmark_interval)
        self.exec = Exec(self.resources, self._sockets)
        self.portforward = PortForward(self.resources, backends, self._sockets)

    # ------------------------------------------------------------------ app
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        with warnings.catch_warnings():  # plain string keys: the documented hook names
            warnings.simplefilter("ignore")
            app["apiserver"] = self
            app["store"] = self.store
            app["backends"] = self.backends
            app["faults"] = self.faults
            app["requests"] = self.requests
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, app: web.Application) -> None:
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close()
        await self.watches.close()

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        try:
            fault = self.faults.take_failure(request.method, request.path)
            if fault is not None:
                raise fault
            return await self._dispatch(request)
        except ApiError as e:
            return status_response(e)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        parts = [p for p in path.split("/") if p]
        discovered = discovery_response(request, path, parts)
        if discovered is not None:
            return discovered
        target = parse_target(parts)
        if target is None:
            raise not_found_resource()
        return await self._resource(request, target)

    # ------------------------------------------------------------------ authz
    # ------------------------------------------------------------------ authz
    async def _authorize(self, request: web.Request, t: Target, verb: str) -> None:
        if self.authorizer is None:
            return
        auth = request.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        authenticate = getattr(self.authorizer, "authenticate", None)
        user = "system:anonymous"
        if authenticate is not None:
            who = authenticate(token)
            if who is None:
                raise ApiError(401, "Unauthorized", "Unauthorized")
            user = who
        resource = f"{t.rt.plural}/{t.sub}" if t.sub else t.rt.plural
        verdict = self.authorizer(token, verb, resource, t.namespace, t.name)
        if asyncio.iscoroutine(verdict):
            verdict = await verdict
        self.audit.append((user, verb, resource, t.namespace, t.name, verdict is True))
        if verdict is True:
            return
        scope = f'in the namespace "{t.namespace}"' if t.namespace else "at the cluster scope"
        reason = (
            verdict
            if isinstance(verdict, str)
            else f'User "{user}" cannot {verb} resource "{resource}" in API group "{t.rt.group}" {scope}'
        )
        who = f'{self.store.qualified(t.rt.plural)} "{t.name}"' if t.name else self.store.qualified(t.rt.plural)
        raise ApiError(403, "Forbidden", f"{who} is forbidden: {reason}", error_details(t.rt, t.name))

    # ------------------------------------------------------------------ resources
    async def _resource(self, request: web.Request, t: Target) -> web.StreamResponse:
        q = request.query
        m = request.method
        if t.sub in ("exec", "attach"):
            await self._authorize(request, t, "create")
            if t.sub == "attach":
                raise bad_request("attach is not supported by the simulated cluster")
            return await self.exec.exec(request, t)
        if t.sub == "portforward":
            await self._authorize(request, t, "create")
            return await self.portforward.portforward(request, t)
        if t.sub == "log":
            await self._authorize(request, t, "get")
            return await pod_log(request, t, self.store, self.log_file)
        if m == "GET" and t.name is None:
            watch = parse_bool(q.get("watch"), "watch")
            await self._authorize(request, t, "watch" if watch else "list")
            if watch:
                return await self.watches.watch(request, t)
            return self.resources.list_objects(request, t)
        if m == "GET":
            await self._authorize(request, t, "get")
            if t.sub == "scale":
                return web.json_response(self.scale.get(t))
            obj = self.resources.read(t)
            if wants_table(request):
                return web.json_response(
                    to_table(t.rt.plural, [obj], obj["metadata"]["resourceVersion"], q.get("includeObject", "Metadata"))
                )
            return web.json_response(obj)
        if m == "POST" and t.name is None:
            await self._authorize(request, t, "create")
            return await self.resources.create(request, t)
        if m == "PUT" and t.name is not None:
            await self._authorize(request, t, "update")
            if t.sub == "scale":
                return await self.scale.replace(request, t)
            return await self.resources.replace(request, t)
        if m == "PATCH" and t.name is not None:
            await self._authorize(request, t, "patch")
            if t.sub == "scale":
                return await self.scale.patch(request, t)
            return await self.resources.patch(request, t)
        if m == "DELETE" and t.name is not None and t.sub is None:
            await self._authorize(request, t, "delete")
            return await self.resources.delete(request, t)
        if m == "DELETE" and t.name is None:
            await self._authorize(request, t, "deletecollection")
            return await self.resources.delete_collection(request, t)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")


async def start_apiserver(
    store: Store,
    backends: Backends,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    authorizer: Authorizer | None = None,
    bookmark_interval: float = 1.0,
    log_file: LogFile | None = None,
    tls: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, str]:
    """Start the API server on the running loop. Returns the runner (``await runner.cleanup()`` stops
    it; ``runner.app["faults"]`` etc.) and the base URL ``http://127.0.0.1:PORT``. With ``tls`` the same
    server also listens with that context on another port (``ApiServer.tls_url``: ``https://127.0.0.1:PORT``),
    where in-cluster clients reach it."""
    server = ApiServer(store, backends, authorizer=authorizer, bookmark_interval=bookmark_interval, log_file=log_file)
    runner = web.AppRunner(server.make_app(), handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    if tls is not None:
        tls_site = web.TCPSite(runner, host, 0, ssl_context=tls)
        await tls_site.start()
        server.tls_url = f"https://{host}:{_port_of(tls_site, 0)}"
    return runner, f"http://{host}:{_port_of(site, port)}"


def _port_of(site: web.TCPSite, default: int) -> int:
    sockets = getattr(site._server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else default


def kubeconfig_yaml(url: str, context: str = "coder-sim", token: str | None = None, namespace: str = "default") -> str:
    user: dict[str, Any] = {"token": token} if token else {}
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": url}}],
        "users": [{"name": context, "user": user}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": context, "namespace": namespace}}],
        "current-context": context,
        "preferences": {},
    }
    return yaml.safe_dump(cfg, sort_keys=False)
