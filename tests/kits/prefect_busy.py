"""The Prefect server's 503 to the GPU slot request, made below Prefect's client in httpx's transport (the server's
own body, no Retry-After), so the client sees exactly what a SQLite write conflict looks like."""

from __future__ import annotations

import time

import httpx
import pytest

from coder_stack.orchestration.prefect_api import SLOT_REQUEST_PATH


class Busy503:
    """Answers the first ``n`` slot requests with the server's 503; records every slot request's time and status."""

    def __init__(self, n: float) -> None:
        self.n = n
        self.attempts: list[tuple[float, int]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        orig = httpx.AsyncHTTPTransport.handle_async_request

        async def handle(transport: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
            if not request.url.path.endswith(SLOT_REQUEST_PATH):
                return await orig(transport, request)
            if sum(1 for _, s in self.attempts if s == 503) < self.n:
                self.attempts.append((time.monotonic(), 503))
                return httpx.Response(503, json={"exception_message": "Service Unavailable"}, request=request)
            response = await orig(transport, request)
            self.attempts.append((time.monotonic(), response.status_code))
            return response

        monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", handle)

    @property
    def statuses(self) -> list[int]:
        return [s for _, s in self.attempts]
