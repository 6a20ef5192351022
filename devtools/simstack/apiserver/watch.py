"""Watch streams (``?watch=true``): the initial events (``sendInitialEvents``), then the store's events
since a resourceVersion as chunked JSON lines, BOOKMARKs (progress, ``allowWatchBookmarks``), 410 Expired
for a compacted resourceVersion, Tables for ``kubectl get -w``, and the watch drops of :mod:`faults`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from aiohttp import web

from simstack.apiserver.errors import bad_request, parse_bool, status_obj
from simstack.apiserver.faults import ApiFaults, WatchDrop
from simstack.apiserver.tables import to_table, wants_table
from simstack.apiserver.target import Target
from simstack.store import GoneError, Obj, Store


class Watches:
    """The watch handler; it tracks its streams' tasks so that shutdown can end them."""

    def __init__(self, store: Store, faults: ApiFaults, bookmark_interval: float) -> None:
        self.store = store
        self.faults = faults
        self.bookmark_interval = bookmark_interval
        self._tasks: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        """Cancel the running watch streams (server shutdown), waiting up to 2 s for them."""
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)

    async def watch(self, request: web.Request, t: Target) -> web.StreamResponse:
        q = request.query
        rv_param = q.get("resourceVersion", "")
        try:
            timeout = float(q.get("timeoutSeconds") or 1800)
        except ValueError:
            raise bad_request("invalid timeoutSeconds") from None
        bookmarks = parse_bool(q.get("allowWatchBookmarks"), "allowWatchBookmarks")
        send_initial = parse_bool(q.get("sendInitialEvents"), "sendInitialEvents")
        lsel, fsel = q.get("labelSelector"), q.get("fieldSelector")
        if rv_param not in ("", "0"):
            try:
                since = int(rv_param)
            except ValueError:
                raise bad_request(f"invalid resource version: {rv_param}") from None
        else:
            since = self.store.resource_version
        initial: list[Obj] = []
        if rv_param in ("", "0") or send_initial:
            initial = self.store.list(t.rt.plural, t.namespace, lsel, fsel)
            since = self.store.resource_version
        drop = self.faults.take_watch_drop(request.path)

        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json", "Cache-Control": "no-cache"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        me = asyncio.current_task()
        if me is not None:
            self._tasks.add(me)

        table = wants_table(request)
        include = q.get("includeObject", "Metadata")

        async def send(etype: str, obj: Obj) -> None:
            if table and etype in ("ADDED", "MODIFIED", "DELETED"):
                obj = to_table(t.rt.plural, [obj], obj["metadata"].get("resourceVersion", ""), include)
            await resp.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

        queue: asyncio.Queue[tuple[str, Obj] | None] = asyncio.Queue()
        progress = [since]
        store = self.store

        async def produce() -> None:
            try:
                async for ev in store.watch(
                    t.rt.plural, t.namespace, since, lsel, fsel, on_progress=lambda rv: progress.__setitem__(0, rv)
                ):
                    queue.put_nowait((ev.type, ev.obj))
            except GoneError as e:
                queue.put_nowait(("ERROR", status_obj(410, "Expired", str(e))))
                queue.put_nowait(None)

        producer: asyncio.Task[None] | None = None
        sent = 0
        deadline = time.monotonic() + timeout
        try:
            if since < store.compacted_rv:
                await send(
                    "ERROR", status_obj(410, "Expired", f"too old resource version: {since} ({store.compacted_rv})")
                )
                return resp
            for obj in initial:
                await send("ADDED", obj)
                sent += 1
                if drop and sent >= drop.after_events:
                    return self._drop(request, resp, drop)
            if send_initial and bookmarks:
                await send(
                    "BOOKMARK",
                    {
                        "kind": t.rt.kind,
                        "apiVersion": t.rt.api_version,
                        "metadata": {
                            "resourceVersion": str(since),
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    },
                )
            if drop and sent >= drop.after_events:
                return self._drop(request, resp, drop)
            producer = asyncio.create_task(produce())
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                wait = deadline - now
                if bookmarks:
                    wait = min(wait, max(0.0, next_bookmark - now))
                try:
                    # Queued events are taken without a timed wait. Once a bookmark is overdue ``wait`` is 0,
                    # and on Python 3.11 ``wait_for(queue.get(), 0)`` cancels the get before it runs: with an
                    # event queued (the bookmark waits for an empty queue) the stream then spun here, sending
                    # nothing, until timeoutSeconds.
                    if queue.empty():
                        item = await asyncio.wait_for(queue.get(), timeout=wait)
                    else:
                        item = queue.get_nowait()
                except TimeoutError:
                    if bookmarks and time.monotonic() >= next_bookmark and queue.empty():
                        await send(
                            "BOOKMARK",
                            {
                                "kind": t.rt.kind,
                                "apiVersion": t.rt.api_version,
                                "metadata": {"resourceVersion": str(progress[0])},
                            },
                        )
                        next_bookmark = time.monotonic() + self.bookmark_interval
                    continue
                if item is None:
                    break
                await send(*item)
                sent += 1
                if drop and sent >= drop.after_events:
                    return self._drop(request, resp, drop)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            if producer is not None:
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await producer
            if me is not None:
                self._tasks.discard(me)
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await resp.write_eof()
        return resp

    def _drop(self, request: web.Request, resp: web.StreamResponse, drop: WatchDrop) -> web.StreamResponse:
        if drop.abort and request.transport is not None:
            request.transport.abort()
        else:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().create_task(resp.write_eof())
        return resp
