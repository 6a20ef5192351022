"""The HTTP app: routes, middlewares and thin handlers (authenticate, read the request, call the concern's
module, answer)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from simstack.standins import ContainerRun, RunningBackend, SimServices
from simstack.standins._server import AppServer, Handler, counting_middleware, json_response, serve
from simstack.standins.litellm import keys, models, routing, spend
from simstack.standins.litellm.auth import authenticate, key_models, require_admin
from simstack.standins.litellm.errors import ProxyError, read_body
from simstack.standins.litellm.state import ProxyState

IMAGE = "ghcr.io/berriai/litellm"
DATA_ROUTES = {"/chat/completions": "chat", "/completions": "completions", "/embeddings": "embeddings"}
PUBLIC_ROUTES = {"/health/readiness", "/health/liveliness", "/health/liveness", "/"}


def normalize_route(path: str) -> str:
    p = path.rstrip("/") or "/"
    if p in DATA_ROUTES or p == "/models":
        return "/v1" + p
    if p == "/v1/model/info":
        return "/model/info"
    return p


class LiteLLMProxy:
    def __init__(self, run: ContainerRun, services: SimServices) -> None:
        self.state = ProxyState.from_run(run, services)

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[
                counting_middleware(self.state.services.counters, ["litellm"], normalize_route),
                self._errors,
            ],
            client_max_size=64 * 1024 * 1024,
        )
        r = app.router
        r.add_get("/health/readiness", self.readiness)
        r.add_get("/health/liveliness", self.liveliness)
        r.add_get("/health/liveness", self.liveliness)
        r.add_get("/health", self.health)
        r.add_get("/", self.root)
        for prefix in ("", "/v1"):
            r.add_get(f"{prefix}/models", self.models)
            r.add_post(f"{prefix}/chat/completions", self.data_plane)
            r.add_post(f"{prefix}/completions", self.data_plane)
            r.add_post(f"{prefix}/embeddings", self.data_plane)
        r.add_post("/key/generate", self.key_generate)
        r.add_get("/key/info", self.key_info)
        r.add_get("/key/list", self.key_list)
        r.add_post("/key/update", self.key_update)
        r.add_post("/key/delete", self.key_delete)
        r.add_post("/key/block", self.key_block)
        r.add_post("/key/unblock", self.key_unblock)
        r.add_post("/key/regenerate", self.key_regenerate)
        r.add_post("/key/{key}/regenerate", self.key_regenerate)
        r.add_post("/model/new", self.model_new)
        r.add_get("/model/info", self.model_info)
        r.add_get("/v1/model/info", self.model_info)
        r.add_get("/v2/model/info", self.model_info)
        r.add_post("/model/delete", self.model_delete)
        r.add_get("/spend/logs", self.spend_logs)
        r.add_get("/spend/logs/v2", self.spend_logs_v2)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self.state.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600, connect=5))

    async def _on_cleanup(self, app: web.Application) -> None:
        spend.flush_due(self.state, everything=True)
        if self.state.session is not None:
            await self.state.session.close()
        self.state.callbacks.close()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        spend.flush_due(self.state)
        try:
            return await handler(request)
        except ProxyError as e:
            return e.response()

    # ------------------------------------------------------------------ health
    async def root(self, request: web.Request) -> web.Response:
        # GUESS: "/" was not recorded
        return json_response({"message": "LiteLLM: RUNNING"})

    async def readiness(self, request: web.Request) -> web.Response:
        return json_response({"status": "healthy", "db": "connected"})  # recorded: health-readiness

    async def liveliness(self, request: web.Request) -> web.Response:
        return json_response("I'm alive!")

    async def health(self, request: web.Request) -> web.Response:
        authenticate(self.state, request)
        return json_response(await routing.health(self.state))

    # ------------------------------------------------------------------ data plane
    async def models(self, request: web.Request) -> web.Response:
        caller = authenticate(self.state, request)
        return json_response(models.listing(self.state, key_models(self.state, caller)))

    async def data_plane(self, request: web.Request) -> web.StreamResponse:
        route = normalize_route(request.path).removeprefix("/v1")
        try:
            caller = authenticate(self.state, request)
        except ProxyError as e:
            raise await routing.auth_failure(self.state, request, route, e, None) from None
        return await routing.forward(self.state, request, caller, route)

    # ------------------------------------------------------------------ keys
    async def key_generate(self, request: web.Request) -> web.Response:
        require_admin(self.state, request)
        return json_response(keys.generate(self.state, await read_body(request)))

    async def key_info(self, request: web.Request) -> web.Response:
        # recorded (key-info-other-key-as-vkey): any virtual key may read any key's info
        caller = authenticate(self.state, request)
        return json_response(keys.info(self.state, caller.token, request.query.get("key")))

    async def key_list(self, request: web.Request) -> web.Response:
        require_admin(self.state, request)
        return json_response(keys.listing(self.state, request.query))

    async def key_update(self, request: web.Request) -> web.Response:
        require_admin(self.state, request)
        return json_response(keys.update(self.state, await read_body(request)))

    async def key_delete(self, request: web.Request) -> web.Response:
        require_admin(self.state, request)
        answer, deleted = keys.delete(self.state, await read_body(request))
        spend.forget(self.state, deleted)
        return json_response(answer)

    async def key_block(self, request: web.Request) -> web.Response:
        require_admin(self.state, request)
        return json_response(keys.set_blocked(self.state, await read_body(request), True))

    async def key_unblock(self, request: web.Request) -> web.Response:
        require_admin(self.state, request)
        return json_response(keys.set_blocked(self.state, await read_body(request), False))

    async def key_regenerate(self, request: web.Request) -> web.Response:
        require_admin(self.state, request)
        raise keys.regenerate_refused()

    # ------------------------------------------------------------------ models (admin)
    async def model_new(self, request: web.Request) -> web.Response:
        require_admin(self.state, request)
        return json_response(models.new(self.state, await read_body(request)))

    async def model_info(self, request: web.Request) -> web.Response:
        caller = authenticate(self.state, request)
        mid = request.query.get("litellm_model_id") or request.query.get("model_id")
        answer, status = models.info(self.state, key_models(self.state, caller), mid)
        return json_response(answer, status)

    async def model_delete(self, request: web.Request) -> web.Response:
        require_admin(self.state, request)
        return json_response(models.delete(self.state, await read_body(request)))

    # ------------------------------------------------------------------ spend logs
    async def spend_logs(self, request: web.Request) -> web.Response:
        require_admin(self.state, request)
        return json_response(spend.logs(self.state, request.query.get("api_key")))

    async def spend_logs_v2(self, request: web.Request) -> web.Response:
        require_admin(self.state, request)
        return json_response(spend.logs_v2(self.state, request.query))


class _Running:
    def __init__(self, server: AppServer, proxy: LiteLLMProxy) -> None:
        self._server = server
        self.proxy = proxy
        self.port = server.port

    async def stop(self) -> None:
        await self._server.stop()


async def start_litellm(run: ContainerRun, services: SimServices) -> RunningBackend:
    proxy = LiteLLMProxy(run, services)
    server = await serve(proxy.app())
    return _Running(server, proxy)
