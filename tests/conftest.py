"""Shared fixtures: a started simulated cluster per test, fake stand-ins, store helpers.

``sim`` / ``sim_autoscaled``: a started ``SimStack`` (time_scale 0.002: coder-chat's ~10 min cold start
takes ~1 s) with a static one-GPU pool, or an autoscaled one (0 GPU nodes at start, max 1).
``make_sim(**kwargs)``: build more stacks (spec, faults, gpu_pool, time_scale ...), all stopped after the test.
``fake_standins``: tiny aiohttp servers registered in ``simstack.standins.FACTORIES`` for every image
(answer ``/health`` and ``/v1/models``); ``fake_standins.runs`` holds every ``ContainerRun`` started.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from simstack import standins
from simstack.pods import pod_is_ready as is_ready
from simstack.stack import SimStack
from simstack.store import Store

SIM_SCALE = 0.002


@pytest.fixture
def make_sim() -> Iterator[Callable[..., SimStack]]:
    stacks: list[SimStack] = []

    def _make(**kwargs: Any) -> SimStack:
        kwargs.setdefault("time_scale", SIM_SCALE)
        kwargs.setdefault("gpu_pool", "static")
        s = SimStack(**kwargs).start()
        stacks.append(s)
        return s

    yield _make
    for s in stacks:
        s.stop()


@pytest.fixture
def sim(make_sim: Callable[..., SimStack]) -> SimStack:
    """A started SimStack: static GPU pool (one L4 node from the start), time_scale 0.002."""
    return make_sim(gpu_pool="static")


@pytest.fixture
def sim_autoscaled(make_sim: Callable[..., SimStack]) -> SimStack:
    """A started SimStack whose GPU pool starts empty and scales up on demand (max spec.gpus nodes)."""
    return make_sim(gpu_pool="autoscaled")


# ------------------------------------------------------------------ fake stand-ins
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


@pytest.fixture
def fake_standins(monkeypatch: pytest.MonkeyPatch) -> FakeStandins:
    fakes = FakeStandins()
    for repo in ("vllm/vllm-openai", "ghcr.io/berriai/litellm", "ghcr.io/open-webui/open-webui", "tabbyml/tabby"):
        monkeypatch.setitem(standins.FACTORIES, repo, fakes.factory)
    return fakes


# ------------------------------------------------------------------ helpers (run on the sim's loop)
def wait_for(sim: SimStack, fn: Callable[[Store], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Wait (event driven) until ``fn(store)`` returns something truthy; returns it."""

    async def _wait() -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = fn(sim.store)
            if value:
                return value
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what or fn}")
            await sim.store.wait_change(timeout=min(left, 0.5))

    return sim.run(_wait())


def on_loop(sim: SimStack, fn: Callable[[Store], Any]) -> Any:
    return sim.call(fn, sim.store)


def scale(sim: SimStack, namespace: str, name: str, replicas: int) -> None:
    def _scale(store: Store) -> None:
        d = store.get("deployments", namespace, name)
        d["spec"]["replicas"] = replicas
        store.update("deployments", d)

    on_loop(sim, _scale)


def pods_of(store: Store, namespace: str, app: str) -> list[dict[str, Any]]:
    return store.list("pods", namespace, label_selector=f"app.kubernetes.io/name={app}")


def ready_pod(sim: SimStack, namespace: str, app: str, timeout: float = 10.0) -> dict[str, Any]:
    return wait_for(
        sim,
        lambda s: next((p for p in pods_of(s, namespace, app) if is_ready(p)), None),
        timeout,
        f"a Ready {app} pod",
    )


def events_of(store: Store, namespace: str, name: str) -> list[dict[str, Any]]:
    evs = [e for e in store.list("events", namespace) if e["involvedObject"]["name"] == name]
    return sorted(evs, key=lambda e: int(e["metadata"]["resourceVersion"]))


def record(sim: SimStack, plural: str) -> list[tuple[float, str, dict[str, Any]]]:
    """Every watch event of a resource from now on: (monotonic time, type, object)."""
    import time

    seen: list[tuple[float, str, dict[str, Any]]] = []

    def _listen(ev: Any) -> None:
        if ev.plural == plural:
            seen.append((time.monotonic(), ev.type, ev.obj))

    def _add(store: Store) -> None:
        store.listeners.append(_listen)

    on_loop(sim, _add)
    return seen


# ------------------------------------------------------------------ clients on a started stack
@dataclass
class SimClients:
    """A started SimStack with a cluster client, a gateway client and the gateway's master key."""

    sim: SimStack
    api: Any  # kubernetes_asyncio ApiClient
    gw: Any  # httpx.AsyncClient on the gateway
    master: Any  # SecretStr


@asynccontextmanager
async def sim_clients(sim: SimStack, spec: Any = None) -> AsyncIterator[SimClients]:
    from pydantic import SecretStr

    from coder_stack.http import make_client
    from coder_stack.kubernetes.client import ClusterTarget, open_api
    from coder_stack.spec import StackSpec

    timeouts = (spec or StackSpec()).timeouts
    async with (
        open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api,
        make_client(timeouts, base_url=sim.gateway_url) as gw,
    ):
        yield SimClients(sim, api, gw, SecretStr(sim.secrets["master_key"]))
