"""Watching resources into a queue, for the waits: list, then watch from that resourceVersion.

A watch stream that ends (``timeoutSeconds``) is resumed from the last resourceVersion, a 410 Gone
re-lists (the consumer replaces its state), BOOKMARK events are skipped, dropped connections are
retried a few times with back-off. Errors reach the consumer through the queue. Library errors are
translated with :func:`coder_stack.kubernetes.client.api_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from kubernetes_asyncio import watch
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from coder_stack.errors import ClusterError, ClusterUnavailable, CoderStackError
from coder_stack.kubernetes.client import API_TIMEOUT, api_errors

# Server-side watch timeout (seconds). A stream that ends is resumed from the last resourceVersion.
WATCH_TIMEOUT_S = 55
# Watch reconnects tolerated in a row on connection errors before giving up.
WATCH_RECONNECTS = 4

_TRANSIENT_STATUS = frozenset({0, 429, 500, 502, 503, 504})


Item = tuple[str, str, str, Any]  # (kind: "list"|"event"|"error", resource, event type, payload)


class _Watch(watch.Watch):
    """``watch.Watch`` that decodes events with the caller's ``ApiClient``.

    The library's ``Watch()`` builds an ``ApiClient`` of its own (a default Configuration and a new SSL
    context, ~30 ms of CPU) only to deserialise events, and closes it with the watch: once per reconnect.
    """

    def __init__(self, api_client: ApiClient) -> None:
        self._raw_return_type = None
        self._stop = False
        self._api_client = api_client
        self.resource_version = None
        self.resp = None

    async def close(self) -> None:  # the API client is the caller's: release only the stream
        if self.resp is not None:
            self.resp.release()
            self.resp = None


async def _list_into(
    queue: asyncio.Queue[Item],
    resource: str,
    list_fn: Callable[..., Awaitable[Any]],
    namespace: str,
    kwargs: dict[str, Any],
) -> str:
    with api_errors("list", resource, namespace):
        result = await list_fn(namespace, _request_timeout=API_TIMEOUT, **kwargs)
    await queue.put(("list", resource, "", list(result.items or [])))
    return str(result.metadata.resource_version or "")


async def watch_into(
    queue: asyncio.Queue[Item],
    resource: str,
    list_fn: Callable[..., Awaitable[Any]],
    namespace: str,
    **kwargs: Any,
) -> None:
    """List, then watch from that resourceVersion forever, feeding ``queue``.

    A stream that ends is resumed from the last resourceVersion seen (BOOKMARKs included); 410 Gone
    re-lists (the consumer replaces its state); errors are put into the queue for the consumer to raise.
    Anything else the list or the stream raises (an undecodable event, a client bug) ends the watch as a
    :class:`ClusterError` in the queue at once, so the wait fails now instead of at its phase budget.
    """
    try:
        rv = await _list_into(queue, resource, list_fn, namespace, kwargs)
        failures = 0
        while True:
            w = _Watch(list_fn.__self__.api_client)  # type: ignore[attr-defined]  # a bound *Api method
            try:
                async with w:
                    stream = w.stream(
                        list_fn,
                        namespace,
                        resource_version=rv,
                        timeout_seconds=WATCH_TIMEOUT_S,
                        allow_watch_bookmarks=True,
                        _request_timeout=aiohttp.ClientTimeout(sock_connect=5, sock_read=WATCH_TIMEOUT_S + 15),
                        **kwargs,
                    )
                    async for ev in stream:
                        failures = 0
                        raw = ev.get("raw_object")
                        if isinstance(raw, dict):
                            rv = str((raw.get("metadata") or {}).get("resourceVersion") or rv)
                        if ev.get("type") == "BOOKMARK":
                            continue
                        await queue.put(("event", resource, str(ev["type"]), ev["object"]))
                # The server closed the stream (timeoutSeconds): resume from rv.
            except ApiException as e:
                if e.status == 410:  # our resourceVersion was compacted: re-list, the consumer resyncs
                    rv = await _list_into(queue, resource, list_fn, namespace, kwargs)
                    continue
                if e.status not in _TRANSIENT_STATUS or failures >= WATCH_RECONNECTS:
                    with api_errors("watch", resource, namespace):
                        raise
                failures += 1
                await asyncio.sleep(min(0.2 * 2**failures, 3.0))  # reconnect back-off, not a poll
            except (aiohttp.ClientError, ConnectionError, TimeoutError) as e:  # the connection dropped
                failures += 1
                if failures > WATCH_RECONNECTS:
                    raise ClusterUnavailable(
                        f"the watch on {resource} in namespace {namespace!r} kept dropping ({type(e).__name__}); "
                        "check the API server"
                    ) from e
                await asyncio.sleep(min(0.2 * 2**failures, 3.0))  # reconnect back-off, not a poll
    except CoderStackError as e:
        await queue.put(("error", resource, "", e))
    except Exception as e:  # not a timeout, a reconnect or a 410: the watch is dead, say so now
        await queue.put(("error", resource, "", _watch_died(resource, namespace, kwargs, e)))


def _watch_died(resource: str, namespace: str, kwargs: dict[str, Any], e: Exception) -> ClusterError:
    """The error for a watch that died of something unexpected, chained to it as ``raise ... from e`` does.

    Only the exception's type is named: its text may quote the event's object (a pod's env, say).
    """
    selector = kwargs.get("label_selector") or kwargs.get("field_selector")
    err = ClusterError(
        f"the watch on {resource} in namespace {namespace!r}"
        + (f" ({selector})" if selector else "")
        + f" failed unexpectedly ({type(e).__name__}), so the wait stopped: this is not a timeout. "
        "The API server (or a proxy in front of it) sent a response the client could not read, or the client "
        "failed: retry the wait; if it fails the same way again, check the API server's address in the "
        "kubeconfig and the kubernetes-asyncio version, and report it with the chained traceback"
    )
    err.__cause__ = e
    err.__suppress_context__ = True
    return err


@contextlib.asynccontextmanager
async def watching(*watchers: Awaitable[None]) -> AsyncIterator[None]:
    tasks = [asyncio.ensure_future(w) for w in watchers]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


__all__ = [
    "WATCH_RECONNECTS",
    "WATCH_TIMEOUT_S",
    "Item",
    "watch_into",
    "watching",
]
