"""The HTTP stack: bounded retries only for what is retriable, explicit timeouts, no key in a log line."""

from __future__ import annotations

import json
import logging
import time

import httpx
import pytest
from pydantic import SecretStr

from coder_stack.spec import Timeouts
from coder_stack.transport import RetryingTransport, bearer, error_detail, make_client, scrub_url

SECRET = "sk-http-test-secret-0123456789"


class Script(httpx.AsyncBaseTransport):
    """Answers from a list: an int status, a (status, headers) pair, or an exception to raise."""

    def __init__(self, steps: list[object]) -> None:
        self.steps = list(steps)
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        step = self.steps.pop(0) if self.steps else 200
        if isinstance(step, Exception):
            raise step
        headers: dict[str, str] = {}
        if isinstance(step, tuple):
            step, headers = step
        assert isinstance(step, int)
        return httpx.Response(step, headers=headers, json={"ok": step == 200}, request=request)


async def test_503_then_200_is_retried() -> None:
    s = Script([503, 503, 200])
    async with make_client(Timeouts(), transport=s, backoff_s=0.01) as c:
        r = await c.get("http://x/health")
    assert r.status_code == 200 and s.calls == 3


async def test_429_honours_retry_after() -> None:
    s = Script([(429, {"retry-after": "0.3"}), 200])
    async with make_client(Timeouts(), transport=s, backoff_s=0.01) as c:
        t0 = time.monotonic()
        r = await c.get("http://x/v1/models")
    assert r.status_code == 200 and s.calls == 2
    assert time.monotonic() - t0 >= 0.28


async def test_retry_after_beyond_the_bound_is_returned_not_waited() -> None:
    s = Script([(429, {"retry-after": "120"}), 200])
    async with make_client(Timeouts(), transport=s, max_wait_s=2) as c:
        r = await c.get("http://x/v1/models")
    assert r.status_code == 429 and s.calls == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 500])
async def test_non_retriable_statuses_are_not_retried(status: int) -> None:
    s = Script([status, 200])
    async with make_client(Timeouts(), transport=s, backoff_s=0.01) as c:
        r = await c.post("http://x/v1/chat/completions", json={})
    assert r.status_code == status and s.calls == 1


async def test_connection_refused_is_retried_a_bounded_number_of_times() -> None:
    s = Script([httpx.ConnectError("refused")] * 10)
    async with make_client(Timeouts(), transport=s, attempts=3, backoff_s=0.01) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get("http://x/health")
    assert s.calls == 3


async def test_read_errors_are_not_retried() -> None:
    s = Script([httpx.ReadTimeout("slow"), 200])
    async with make_client(Timeouts(), transport=s, backoff_s=0.01) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post("http://x/v1/completions", json={})
    assert s.calls == 1


def test_timeouts_are_explicit() -> None:
    c = make_client(Timeouts(connect_s=5, request_s=42))
    assert c.timeout.connect == 5 and c.timeout.read == 42
    assert isinstance(c._transport, RetryingTransport)


def test_scrub_url_drops_the_query_that_may_hold_a_key() -> None:
    assert scrub_url(f"http://gw:4000/key/info?key={SECRET}") == "http://gw:4000/key/info"
    assert SECRET not in scrub_url(httpx.URL("http://u:p@gw/x", params={"key": SECRET}))


def test_bearer_is_the_only_unwrap_and_secretstr_hides_the_key() -> None:
    k = SecretStr(SECRET)
    assert SECRET not in repr(k) and SECRET not in str(k)
    assert bearer(k) == {"Authorization": f"Bearer {SECRET}"}


def test_error_detail_reads_litellm_and_vllm_bodies_and_redacts() -> None:
    assert (
        error_detail(
            b'{"error":{"type":"budget_exceeded","message":"Budget has been exceeded! Key=x (sk-abcdefghijkl)"}}'
        )[0]
        == "budget_exceeded"
    )
    assert SECRET not in error_detail(f'{{"error":{{"message":"bad key {SECRET}"}}}}')[1]
    assert error_detail(b'{"error":"Unauthorized"}') == ("", "Unauthorized")


async def test_httpx_log_lines_never_carry_a_key_in_the_url_or_header(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = Script([200])
    async with make_client(Timeouts(), transport=s, base_url="http://gw:4000") as c:
        await c.get("/key/info", params={"key": SECRET}, headers=bearer(SecretStr(SECRET)))
    logging.getLogger("httpx").info("Authorization: Bearer %s", SECRET)
    logging.getLogger("openai._base_client").debug("Request options: %s", {"headers": {"Authorization": SECRET}})
    assert any("/key/info" in r.getMessage() for r in caplog.records)
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_api_bodies_withhold_secret_values_in_objects_lists_and_non_json() -> None:
    from coder_stack.transport import redact_api_body

    applied = {"kubectl.kubernetes.io/last-applied-configuration": '{"data":{"k":"c2VjcmV0"}}'}
    secret = {"kind": "Secret", "metadata": {"name": "s", "annotations": applied}, "data": {"k": "c2VjcmV0"}}
    listed = {"kind": "SecretList", "items": [{"metadata": {"name": "s"}, "data": {"k": "c2VjcmV0"}}]}
    event = {"type": "ADDED", "object": {"kind": "Secret", "stringData": {"k": "secret"}}}
    for body in (secret, listed, event):
        out = str(redact_api_body(json.dumps(body).encode()))
        assert "c2VjcmV0" not in out and '"secret"' not in out and '"k":"<withheld>"' in out
    cm = {"kind": "ConfigMap", "data": {"k": "visible"}}
    assert "visible" in str(redact_api_body(json.dumps(cm)))
    assert "c2VjcmV0" not in str(redact_api_body(b'Secret {"data": c2VjcmV0'))
