"""The guard every flow's body runs in: SIGTERM as a clean cancellation, the failure recorded, the report
published whatever happens."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal
from prefect.states import Cancelled

from coder_stack.errors import CoderStackError, UnexpectedError
from coder_stack.flows.process import freeze_startup_heap
from coder_stack.flows.record import final_state, publish
from coder_stack.flows.run import logger
from coder_stack.kubernetes.client import ClusterTarget
from coder_stack.report import RunReport
from coder_stack.spec import StackSpec
from coder_stack.tasks.cluster import progress_written


class SigtermGuard:
    """Turn SIGTERM into a cancellation of the running flow, delivered inside the event loop.

    Prefect's own handler raises ``TerminationSignal`` wherever the main thread happens to be; when that
    is inside an asyncio I/O callback, asyncio swallows it, the flow's ``finally`` never runs and the GPU
    keeps billing until the worker kills the process. Cancelling the flow's task from the loop instead
    always unwinds through the ``finally`` (scale-downs first); :meth:`reraise` then hands Prefect the
    ``TerminationSignal`` it expects, so a cancel from the UI still ends the run Cancelled. The first
    SIGTERM cancels; later ones are ignored so they cannot interrupt the clean-up. Main thread only.
    """

    def __init__(self) -> None:
        self.fired = False
        self._restore: Callable[[], None] = lambda: None
        task = asyncio.current_task()
        if threading.current_thread() is not threading.main_thread() or task is None:
            return
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm() -> None:
            if not self.fired:
                self.fired = True
                logger().warning("SIGTERM: cancelling the run; scaling down what it started.")
                task.cancel()

        try:
            loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        except (NotImplementedError, RuntimeError, ValueError):
            return

        def restore() -> None:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGTERM)
                signal.signal(signal.SIGTERM, previous)

        self._restore = restore

    def restore(self) -> None:
        self._restore()

    async def reraise(self, exc: BaseException) -> None:
        """After the clean-up: mark the run Cancelled (it was asked to stop, and stopped cleanly) and hand
        Prefect the ``TerminationSignal`` it expects from a SIGTERM."""
        if not (self.fired and isinstance(exc, asyncio.CancelledError)):
            return
        ctx = FlowRunContext.get()
        if ctx is not None and ctx.flow_run is not None:
            with contextlib.suppress(Exception):
                async with get_client() as client:
                    cancelled: State[Any] = Cancelled(message="SIGTERM: stopped after scaling down what it started")
                    state = (await client.set_flow_run_state(ctx.flow_run.id, cancelled, force=True)).state
                # The engine's own copy of the run must see the final state too: when the worker's cancel
                # intent has not reached the engine yet (a race seen under load), the engine turns the
                # TerminationSignal into a forced Crashed unless its run is already final.
                if state is not None:
                    ctx.flow_run.state = state
        raise TerminationSignal(signal.SIGTERM) from exc


@asynccontextmanager
async def guarded(
    report: RunReport, artifact_key: str, flow_name: str, final_state_of: tuple[ClusterTarget, StackSpec] | None
) -> AsyncIterator[None]:
    """Every flow's body runs inside this: SIGTERM becomes a clean cancellation (:class:`SigtermGuard`), a
    failure is recorded in the report and logged, and the report is published whatever happens (with
    the cluster's replicas as they are at the end when ``final_state_of`` is given). The process's start-up
    heap is frozen first (once per process; a worker-run flow never passes through the CLI that does it)."""
    freeze_startup_heap()
    sigterm = SigtermGuard()
    try:
        yield
    except BaseException as e:
        step = report.current_step
        report.finish(f"failed: {type(e).__name__}")
        if isinstance(e, CoderStackError):
            e.step = e.step or step
        logger().error("%s failed at %r: %s", flow_name, step, e)
        await sigterm.reraise(e)
        if isinstance(e, Exception) and not isinstance(e, CoderStackError):
            # Whatever fails, the user gets one line naming the step (the report is still published below)
            wrapped = UnexpectedError(e, step=step)
            wrapped.report = report
            raise wrapped from e
        if isinstance(e, CoderStackError):
            e.report = report
        raise
    finally:
        sigterm.restore()
        await progress_written()  # a cold start's final progress write, issued in the background, lands first
        if final_state_of is not None:
            report.final_state = await final_state(*final_state_of)
        await publish(report, artifact_key)
