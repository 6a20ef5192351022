"""Fake stand-ins: tiny aiohttp servers for every image, answering ``/health`` and ``/v1/models``, that record
each ``ContainerRun`` started (``runs``) and stopped (``stopped``); ``fail_apps`` refuse to start. The
``fake_standins`` fixture (tests/devtools/conftest.py) registers ``FakeStandins.factory`` in
``simstack.standins.FACTORIES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from simstack import standins


class _FakeBackend:
    def __init__(self, runner: web.AppRunner, port: int, fakes: FakeStandins, run: standins.ContainerRun) -> None:
        self._runner = runner
        self.port = port
        self._fakes = fakes
        self._run = run

    async def stop(self) -> None:
        self._fakes.stopped.append(self._run.pod_name)
        await self._runner.cleanup()


@dataclass
class FakeStandins:
    runs: list[standins.ContainerRun] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    fail_apps: set[str] = field(default_factory=set)

    async def factory(self, run: standins.ContainerRun, services: standins.SimServices) -> _FakeBackend:
        if run.app in self.fail_apps:
            raise RuntimeError(f"fake stand-in for {run.app} refuses to start")
        self.runs.append(run)

        async def health(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok", "app": run.app, "pod": run.pod_name})

        async def models(request: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": run.app, "object": "model"}]})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return _FakeBackend(runner, port, self, run)

    def run_for(self, app: str) -> standins.ContainerRun:
        return next(r for r in reversed(self.runs) if r.app == app)
