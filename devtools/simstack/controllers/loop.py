"""The reconcile loop every controller runs: woken by kicks (store changes, timers), coalescing them,
never polling; a failed reconcile is logged and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger("simstack.controllers")


class Loop:
    """A reconcile loop: runs ``fn`` whenever kicked (coalescing kicks), never polls."""

    def __init__(self, name: str, fn: Callable[[], None]) -> None:
        self.name = name
        self._fn = fn
        self._event = asyncio.Event()
        self._timers: list[asyncio.TimerHandle] = []
        self.task: asyncio.Task[None] | None = None

    def kick(self) -> None:
        self._event.set()

    def kick_later(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._timers = [t for t in self._timers if not t.cancelled() and t.when() > loop.time()]
        self._timers.append(loop.call_later(max(delay, 0.0), self.kick))

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while True:
            await self._event.wait()
            self._event.clear()
            try:
                self._fn()
            except Exception:
                log.exception("%s reconcile failed", self.name)
            await asyncio.sleep(0)

    async def stop(self) -> None:
        for t in self._timers:
            t.cancel()
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
