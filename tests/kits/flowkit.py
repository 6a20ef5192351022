"""Helpers of the flow tier (tests/flows/): readers of the simulated cluster a flow ran on, flow processes of
their own, and a real ``prefect server start`` subprocess for the tests that need a server they can restart or
a Prefect home they can scan.

The Prefect API every flow test shares (``prefect_api``, one test harness per session) and the per-test
``tag:gpu`` limit (``gpu_limit``) are fixtures in tests/flows/conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from coder_stack_dev.processes import sigkill as sigkill  # the tests kill their flow processes with it
from coder_stack_dev.processes import stop_group
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.objects import State
from prefect.client.schemas.sorting import FlowRunSort
from simstack.stack import SimStack
from simstack.store import Store

from coder_stack.flows.params import Connection
from coder_stack.orchestration.liveness import CRASH_AUTOMATION
from coder_stack.spec import StackSpec
from tests.conftest import pods_of, wait_for

PROJECT = Path(__file__).resolve().parents[2]
SPEC = StackSpec()
SERVING = SPEC.serving_namespace
EXPERIENCE = SPEC.experience_namespace
MODELS = [m.name for m in SPEC.models]
FRONTENDS = [f.name for f in SPEC.frontends]
PREFECT_BIN = Path(sys.executable).with_name("prefect")
# Cold starts long enough to signal a run in the middle of one (~6 s for coder-chat on an autoscaled pool).
SLOW_SCALE = 0.01


# ------------------------------------------------------------------ Prefect
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
        if self.proc is not None:
            stop_group(self.proc)

    def restart(self) -> None:
        self.stop()
        self.start()


def flow_process_env(prefect_api: str, tmp_path: Path) -> dict[str, str]:
    """Environment of a flow or worker process: the given Prefect API, a throw-away Prefect home."""
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


def _gpu_pod(obj: dict[str, Any]) -> bool:
    for c in (obj.get("spec") or {}).get("containers") or []:
        if str(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", "0")) not in ("0", ""):
            return True
    return False


def gpu_overlaps(sim: SimStack) -> list[tuple[int, dict[str, list[str]]]]:
    """Moments (resourceVersions) at which pods of more than one GPU model held a GPU at once, per model.

    Pods, not replica counts: a GPU model's pod holds its GPU from its creation until it is DELETED, including
    while it terminates (a scale-up while the old pod still terminates is an overlap; on an autoscaled pool it
    gets a second GPU node). Read from the store's history of every event since the sim started; a history
    that was compacted cannot be checked and fails the check rather than pass it."""

    def _read(store: Store) -> tuple[int, list[Any]]:
        return store.compacted_rv, list(store._history)

    compacted, history = sim.call(_read, sim.store)
    first = history[0].rv if history else None
    assert first is not None and compacted < first, f"the sim's history was compacted (rv {compacted}): cannot check"
    models = {m.name: m for m in sim.spec.models}
    live: dict[str, set[str]] = {name: set() for name in models}
    bad = []
    for ev in history:
        if ev.plural != "pods" or not _gpu_pod(ev.obj):
            continue
        meta = ev.obj["metadata"]
        if meta.get("namespace") != sim.spec.serving_namespace:
            continue
        app = (meta.get("labels") or {}).get("app.kubernetes.io/name", "")
        owner = app if app in live else meta["name"]
        pods = live.setdefault(owner, set())
        if ev.type == "DELETED":
            pods.discard(meta["name"])
            continue
        pods.add(meta["name"])
        holding = {m: sorted(p) for m, p in live.items() if p}
        if len(holding) > 1:
            bad.append((ev.rv, holding))
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


def pod_names(store: Store, namespace: str, apps: list[str]) -> list[str]:
    return [p["metadata"]["name"] for a in apps for p in pods_of(store, namespace, a)]


def assert_all_down(sim: SimStack, pods_timeout: float = 0.0) -> None:
    """Every GPU model and front-end at 0 replicas, and (within ``pods_timeout``) no GPU model pod left."""
    assert replicas(sim) == dict.fromkeys(MODELS + FRONTENDS, 0)
    if pods_timeout:
        wait_for(sim, lambda s: not pod_names(s, SERVING, MODELS), pods_timeout, "GPU model pods gone")
    left = sim.call(pod_names, sim.store, SERVING, MODELS)
    assert left == [], f"GPU model pods left: {left}"


async def latest_run_of(flow_name: str) -> tuple[UUID, State[Any]]:
    """The id and state of the flow's most recent run."""
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=1,
        )
    assert runs and runs[0].state is not None
    return runs[0].id, runs[0].state


async def drop_crash_automation() -> None:
    """Remove the crash automation a test's `coder-stack setup` installed. Left on the flow tier's shared server, it
    answered a later test's Crashed mark with a clean-up run of its own (on ``coder-stack-process``, run by any worker
    online there), which once made `status` name that run instead of the test's."""
    async with get_client() as client:
        for a in await client.read_automations_by_name(CRASH_AUTOMATION):
            await client.delete_automation(a.id)
