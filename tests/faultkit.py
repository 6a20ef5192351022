"""Helpers shared by the issue-6 modules (test_reliability, test_bad_input, test_rbac, test_secrets_scan).

A Prefect test harness per module (``prefect_api``), the ``tag:gpu`` limit per test (``gpu_limit``, which
also asserts that no test leaves a slot held), readers of the simulated cluster, and a real
``prefect server start`` subprocess for the tests that need a server they can restart or a Prefect home
they can scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from coder_stack.orchestration.gpu import GPU_LIMIT, ensure_gpu_limit
from coder_stack.spec import StackSpec
from flows.common import Connection
from simstack.stack import SimStack
from simstack.store import Store
from tests.conftest import pods_of

PROJECT = Path(__file__).resolve().parent.parent
SPEC = StackSpec()
SERVING = SPEC.serving_namespace
EXPERIENCE = SPEC.experience_namespace
MODELS = [m.name for m in SPEC.models]
FRONTENDS = [f.name for f in SPEC.frontends]
PREFECT_BIN = Path(sys.executable).with_name("prefect")


# ------------------------------------------------------------------ Prefect
@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    """A Prefect test server for the whole module; yields its API URL."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with (
            temporary_settings(updates={PREFECT_SERVER_ANALYTICS_ENABLED: False}),
            prefect_test_harness(server_startup_timeout=60),
        ):
            yield str(PREFECT_API_URL.value())


@pytest.fixture
async def gpu_limit(prefect_api: str) -> AsyncIterator[None]:
    """``tag:gpu`` = 1 slot before the test; after it, no slot may be held."""
    await ensure_gpu_limit(1)
    yield
    await assert_no_slot_held()


async def assert_no_slot_held() -> None:
    try:
        async with get_client() as client:
            gcl = await client.read_global_concurrency_limit_by_name(GPU_LIMIT)
    except ObjectNotFound:
        return
    assert gcl.active_slots == 0, f"{GPU_LIMIT} still has {gcl.active_slots} active slot(s) after the test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrefectServer:
    """``prefect server start`` on 127.0.0.1 in a subprocess with its own PREFECT_HOME; restartable."""

    def __init__(self, home: Path, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.home = home
        self.port = port or free_port()
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_CLI_PROMPT="false",
            PYTHONPATH=str(PROJECT),
        )
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 90.0) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        env = self.env()
        env.pop("PREFECT_API_URL", None)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(PREFECT_BIN),
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--no-services",
                    "--no-ui",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"prefect server not healthy in {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()


def flow_process_env(prefect_api: str, tmp_path: Path) -> dict[str, str]:
    """Environment of a flow or worker process: the module's Prefect server, a throw-away Prefect home."""
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=prefect_api,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(PROJECT),
    )
    return env


def start_flow_process(
    script: str, sim: SimStack, prefect_api: str, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    """Run ``script`` (``python -c``; ``sys.argv[1]`` is the sim's kubeconfig) as a flow process of its own, as
    a worker would; its output goes to ``tmp_path/flow.log``, returned with the process."""
    log = tmp_path / "flow.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(sim.kubeconfig_path)],
            cwd=PROJECT,
            env=flow_process_env(prefect_api, tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


# ------------------------------------------------------------------ the simulated cluster
def conn(sim: SimStack, **kwargs: Any) -> Connection:
    return Connection(kubeconfig=str(sim.kubeconfig_path), **kwargs)


def replicas(sim: SimStack) -> dict[str, int]:
    def _read(store: Store) -> dict[str, int]:
        out = {m: int(store.get("deployments", SERVING, m)["spec"]["replicas"]) for m in MODELS}
        out |= {f: int(store.get("deployments", EXPERIENCE, f)["spec"]["replicas"]) for f in FRONTENDS}
        return out

    result: dict[str, int] = sim.call(_read, sim.store)
    return result


def gpu_pods(sim: SimStack) -> list[str]:
    def _read(store: Store) -> list[str]:
        return [p["metadata"]["name"] for m in MODELS for p in pods_of(store, SERVING, m)]

    result: list[str] = sim.call(_read, sim.store)
    return result


async def assert_no_gpu_model_running(sim: SimStack, timeout: float = 10.0) -> None:
    """Every GPU model at 0 replicas and (within ``timeout``) no GPU model pod left."""
    r = replicas(sim)
    assert all(r[m] == 0 for m in MODELS), f"a GPU model is still scaled up: {r}"
    await until(lambda: not gpu_pods(sim), timeout, "GPU model pods gone")


def gpu_overlaps(timeline: list[tuple[float, str, str, int]]) -> list[tuple[float, dict[str, int]]]:
    """Moments at which more than one GPU model Deployment was above 0 replicas."""
    state = dict.fromkeys(MODELS, 0)
    bad = []
    for t, ns, name, reps in timeline:
        if ns == SERVING and name in state:
            state[name] = reps
            if sum(1 for v in state.values() if v > 0) > 1:
                bad.append((t, dict(state)))
    return bad


async def until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """Wait (polling, 20 ms) until ``cond()`` is truthy."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


def scaled_up(sim: SimStack, name: str, after: int = 0) -> bool:
    return any(n == name and r > 0 for _, _, n, r in sim.timeline[after:])


def minted_keys(sim: SimStack) -> list[str]:
    """Every virtual key the gateway stand-in ever minted (its database holds the values)."""

    def _read() -> list[str]:
        db = sim.services.litellm_db
        return [str(r.get("key")) for r in db.get("keys", {}).values() if r.get("key")]

    result: list[str] = sim.call(_read)
    return result
