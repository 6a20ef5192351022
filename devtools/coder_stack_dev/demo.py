"""`coder-stack demo`: the whole runbook against the simulated stack, through a real local Prefect server.

Starts `prefect server start` (127.0.0.1, its database under --home), the simulated cluster in this
process, creates the `tag:gpu` limit, runs validate_coder_stack with the agent stage, prints the report
and where to see the run in the Prefect UI. Everything it started stops when it ends (unless --keep-ui).
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
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markdown import Markdown

LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"

console = Console()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(home: Path, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=LEASE_STORAGE,
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
    )
    prefect = Path(sys.executable).with_name("prefect")
    log = (home / "prefect-server.log").open("wb")
    return subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode}; see its log")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the Prefect server did not answer {url}/health within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class _Signals:
    """SIGINT, SIGTERM and SIGHUP end the demo the same way: the first one raises KeyboardInterrupt where the
    demo is (so every ``finally`` runs and the Prefect server and the sim are stopped), later ones are ignored
    while it cleans up. Python's default SIGTERM ends the process at once, leaving the Prefect server (in its
    own session) running. In a ``critical`` section (starting the server: the process exists before ``Popen``
    returns) a signal is held and raised when the section ends."""

    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self._critical = False
        self._pending = False
        self._old: dict[int, Any] = {}
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> _Signals:
        for sig in self.HANDLED:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            return  # already stopping: let the clean-up finish
        self.received = signum
        if self._critical:
            self._pending = True
            return
        if self._task is not None and self._loop is not None:
            # Inside the event loop a KeyboardInterrupt can land in a weakref callback or a __del__, where Python
            # prints it and goes on: the loop's main task is cancelled instead, and the caller raises after it.
            self._loop.call_soon_threadsafe(self._task.cancel)
            return
        raise KeyboardInterrupt

    async def run(self, main: Coroutine[Any, Any, Any]) -> Any:
        """Run ``main`` as the task a signal cancels."""
        self._task, self._loop = asyncio.current_task(), asyncio.get_running_loop()
        try:
            return await main
        finally:
            self._task = self._loop = None

    def raise_if_received(self) -> None:
        if self.received is not None:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        return 128 + self.received if self.received is not None else 130


def run_demo(home: Path, time_scale: float = 0.005, keep_ui: bool = False) -> int:
    """The demo; whatever signal among SIGINT, SIGTERM and SIGHUP ends it, the Prefect server and the
    simulated cluster it started are stopped before it returns (exit code 128 + the signal)."""
    with _Signals() as signals:
        try:
            return _run_demo(home, time_scale, keep_ui, signals)
        except Exception:
            # The interrupt can surface as another error where it lands (pydantic wraps it in a serialization
            # error): with a signal received, the demo was stopped all the same, its finally blocks have run.
            if signals.received is None:
                raise
            name = signal.Signals(signals.received).name
            console.print(f"[bold]demo stopped by {name}[/]: the Prefect server and the simulated cluster are stopped")
            return signals.exit_code
        except KeyboardInterrupt:
            name = signal.Signals(signals.received).name if signals.received else "an interrupt"
            console.print(f"[bold]demo stopped by {name}[/]: the Prefect server and the simulated cluster are stopped")
            return signals.exit_code


def _run_demo(home: Path, time_scale: float, keep_ui: bool, signals: _Signals) -> int:
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from simstack.stack import SimStack

    t0 = time.monotonic()
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    console.print(f"[bold]1/4[/] starting a local Prefect server on 127.0.0.1:{port} (database in {home / 'prefect'})")
    server: subprocess.Popen[bytes] | None = None
    try:
        with signals.critical():
            server = _start_server(home, port)
        _wait_healthy(api, server)
        console.print(
            f"[bold]2/4[/] starting the simulated cluster (time scale {time_scale}: 10 min -> {600 * time_scale:.0f} s)"
        )
        with (
            temporary_settings(
                updates={PREFECT_API_URL: api, PREFECT_HOME: home / "prefect", PREFECT_SERVER_ANALYTICS_ENABLED: False}
            ),
            SimStack(time_scale=time_scale, gpu_pool="autoscaled").start() as sim,
        ):
            kubeconfig = home / "sim.kubeconfig"
            sim.write_kubeconfig(kubeconfig)
            signals.raise_if_received()  # a KeyboardInterrupt that landed where Python only prints it
            try:
                state: Any = asyncio.run(signals.run(_run_validate(kubeconfig)))
            except asyncio.CancelledError:
                signals.raise_if_received()
                raise
            finally:
                _drain_prefect_workers()  # also when interrupted: the server must still be up for it
            signals.raise_if_received()  # the flow may have ended Cancelled rather than raise
            ok = state.is_completed()
            flow_run_id = state.state_details.flow_run_id
            report = state.result(raise_on_failure=False) if ok else None
        if report is not None:
            console.print(Markdown(report.to_markdown()))
        else:
            console.print(f"[bold red]the validate run ended {state.name}[/]: {state.message}")
        ui = f"http://127.0.0.1:{port}/runs/flow-run/{flow_run_id}"
        console.print(f"[bold]demo finished in {time.monotonic() - t0:.1f} s[/] ({'passed' if ok else 'FAILED'})")
        if keep_ui:
            # Ctrl-C (or SIGTERM) is the way to end this wait, not an error: from the moment it is announced
            with contextlib.suppress(KeyboardInterrupt):
                console.print(f"The run in the Prefect UI: {ui}  (Ctrl-C to stop the server)")
                server.wait()
        else:
            console.print(
                f"To browse this run in the Prefect UI: `coder-stack demo --keep-ui`, or "
                f"`PREFECT_HOME={home / 'prefect'} .venv/bin/prefect server start` and open "
                f"http://127.0.0.1:4200/runs/flow-run/{flow_run_id}"
            )
        return 0 if ok else 1
    finally:
        if server is not None:
            _stop(server)


def _drain_prefect_workers() -> None:
    """Send the run's remaining logs and events while the server is still up (else the exit hangs)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)


async def _run_validate(kubeconfig: Path) -> Any:
    from coder_stack.flows.params import Connection
    from coder_stack.flows.validate import Stage, ValidateOptions, validate_coder_stack
    from coder_stack.orchestration.gpu_limit import ensure_gpu_limit

    console.print(f"[bold]3/4[/] {await ensure_gpu_limit(1)}")
    console.print("[bold]4/4[/] running validate_coder_stack: chat, fim, agent")
    return await validate_coder_stack(
        options=ValidateOptions(stages=[Stage.CHAT, Stage.FIM, Stage.AGENT]),
        connection=Connection(kubeconfig=str(kubeconfig)),
        return_state=True,
    )
