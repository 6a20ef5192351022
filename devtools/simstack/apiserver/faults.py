"""Fault injection for reliability tests: failures (500/429/403/...) queued for the next N requests that
match a method and a path regex, and watch streams dropped after K events. The running server holds
one :class:`ApiFaults` (``app["faults"]``); the router asks it before each request, the watch handler
before each stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from simstack.apiserver.errors import ApiError


@dataclass
class _Fault:
    method: str
    path: re.Pattern[str]
    status: int
    remaining: int
    retry_after: int | None
    message: str | None


@dataclass
class WatchDrop:
    path: re.Pattern[str]
    after_events: int
    remaining: int
    abort: bool


_FAULT_REASON = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@dataclass
class ApiFaults:
    """Faults a test queues on the running API server (``app["faults"]``). Thread-safe enough for
    use from a test thread: every method only appends/pops Python lists."""

    _faults: list[_Fault] = field(default_factory=list)
    _drops: list[WatchDrop] = field(default_factory=list)
    fired: list[tuple[str, str, int]] = field(default_factory=list)

    def fail(
        self,
        method: str,
        path: str,
        status: int = 500,
        *,
        times: int = 1,
        retry_after: int | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``times`` requests matching ``method`` ("*" = any) and ``path`` (a regex
        searched in the URL path) with ``status`` (429 adds ``Retry-After``, default 1 s)."""
        if status == 429 and retry_after is None:
            retry_after = 1
        self._faults.append(_Fault(method.upper(), re.compile(path), status, times, retry_after, message))

    def drop_watch(self, path: str, after_events: int = 0, *, times: int = 1, abort: bool = False) -> None:
        """End the next ``times`` watch streams matching ``path`` after ``after_events`` events (the
        server closes the stream, as a load balancer would; ``abort=True`` resets the connection)."""
        self._drops.append(WatchDrop(re.compile(path), after_events, times, abort))

    def clear(self) -> None:
        self._faults.clear()
        self._drops.clear()

    def take_failure(self, method: str, path: str) -> ApiError | None:
        for f in list(self._faults):
            if f.method in ("*", method) and f.path.search(path):
                f.remaining -= 1
                if f.remaining <= 0:
                    self._faults.remove(f)
                self.fired.append((method, path, f.status))
                reason = _FAULT_REASON.get(f.status, "InternalError")
                headers: dict[str, str] = {}
                details: dict[str, Any] = {}
                if f.retry_after is not None:
                    headers["Retry-After"] = str(f.retry_after)
                    details["retryAfterSeconds"] = f.retry_after
                msg = f.message or {
                    429: "Too many requests, please try again later.",
                    403: "forbidden: injected fault",
                    503: "the server is currently unable to handle the request",
                    504: "the server was unable to return a response in the time allotted",
                }.get(f.status, "Internal error occurred: injected fault")
                return ApiError(f.status, reason, msg, details or None, headers)
        return None

    def take_watch_drop(self, path: str) -> WatchDrop | None:
        for d in list(self._drops):
            if d.path.search(path):
                d.remaining -= 1
                if d.remaining <= 0:
                    self._drops.remove(d)
                return d
        return None
