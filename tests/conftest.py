"""Shared fixtures: a started simulated cluster per test, fake stand-ins, store helpers.

``sim``: a started ``SimStack`` (time_scale 0.002: coder-chat's ~10 min cold start takes ~1 s) with a
static one-GPU pool. ``make_sim(**kwargs)``: build more stacks (spec, faults, gpu_pool, time_scale ...), all
stopped after the test. The integration, devtools and flow tiers use both; the helpers below read and drive a
started stack.
Tier-only fixtures live in the tiers' conftest.py (tests/devtools/: ``sim_autoscaled``, ``fake_standins``;
tests/flows/: ``prefect_api``, ``gpu_limit``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from simstack.pods import pod_is_ready as is_ready
from simstack.stack import SimStack
from simstack.store import Store

SIM_SCALE = 0.002
TESTS = Path(__file__).resolve().parent

# pytest-xdist's workers start with COLUMNS=80 and LINES=24 in their environment. The CLI's Rich consoles read
# COLUMNS once, when app.cli is imported, so that would fix every table at 80 columns whatever a test passes to
# CliRunner(env=...). Tests run as `pytest` alone does: no terminal size in the environment.
for _var in ("COLUMNS", "LINES"):
    os.environ.pop(_var, None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The flow tier runs last: its session Prefect harness (tests/flows/conftest.py) starts with the first flow
    test and stops when the session ends, so no unit, integration, devtools, conformance or contract test runs
    beside it. Under pytest-xdist (``./dev.sh test``) each worker has its own session and harness, and files are
    handed out in this order, so a worker that has started the harness is given only flow files after it."""
    items.sort(key=lambda item: item.path.resolve().is_relative_to(TESTS / "flows"))  # stable: order kept within


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

    from coder_stack.kubernetes.client import ClusterTarget, open_api
    from coder_stack.spec import StackSpec
    from coder_stack.transport import make_client

    timeouts = (spec or StackSpec()).timeouts
    async with (
        open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api,
        make_client(timeouts, base_url=sim.gateway_url) as gw,
    ):
        yield SimClients(sim, api, gw, SecretStr(sim.secrets["master_key"]))
