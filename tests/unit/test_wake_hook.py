"""The wake-on-demand hook (coder_stack/litellm/wake_hook.py) against a fake Kubernetes API and a fake Prefect
events endpoint on 127.0.0.1, called as LiteLLM calls it: ``async_pre_call_hook(user_api_key_dict, cache, data,
call_type)``."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import HTTPException

from coder_stack.litellm import wake_hook
from tests.litellm_proxy.fakes import FakeCluster, serve, settings

FAKE_KEY = "sk-FAKE-KEY-9f8e7d6c5b4a"
PROMPT = "a-prompt-that-must-stay-private"
USER = {"api_key": FAKE_KEY, "token": "hashed-" + FAKE_KEY, "user_id": "someone"}


class Rig:
    def __init__(self, tmp: Path, base: str, cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp, self.base, self.c = tmp, base, cluster
        self.file = tmp / "coder_stack_wake.json"
        (tmp / "var/run/secrets").mkdir(parents=True)
        (tmp / "var/run/secrets/token").write_text("sa-token\n")
        env = {"CODER_STACK_WAKE_SETTINGS": str(self.file), "PREFECT_API_AUTH_STRING": "admin:pass"}
        monkeypatch.setattr(wake_hook, "ENV", env)
        monkeypatch.setattr(wake_hook, "ROOT", str(tmp))
        monkeypatch.setattr(wake_hook, "POLL_S", 0.05)
        self.write()
        self.hook = wake_hook.WakeOnDemand()

    def write(self, **over: Any) -> None:
        self.file.write_text(json.dumps(settings(self.base, **over)))
        st = self.file.stat()  # a new mtime even within the file system's clock resolution
        os.utime(self.file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    async def call(self, model: str, call_type: str = "acompletion", **extra: Any) -> Any:
        data = {"model": model, "messages": [{"role": "user", "content": PROMPT}], **extra}
        return await self.hook.async_pre_call_hook(USER, None, data, call_type)


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    c = FakeCluster()
    async with serve(c) as base:
        r = Rig(tmp_path, base, c, monkeypatch)
        yield r
        await r.hook.drain()


def msg(e: pytest.ExceptionInfo[HTTPException]) -> str:
    detail: Any = e.value.detail
    return str(detail["error"])


def in_future(s: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=s)).isoformat()


def no_secret_anywhere(r: Rig, caplog: pytest.LogCaptureFixture) -> None:
    seen = caplog.text + "".join(r.c.bodies) + json.dumps(r.c.event_headers)
    assert FAKE_KEY not in seen and "someone" not in seen and PROMPT not in "".join(str(e) for e in r.c.events)
    assert FAKE_KEY not in caplog.text and PROMPT not in caplog.text


async def test_a_serving_model_passes_and_the_hot_path_never_waits_for_the_api(rig: Rig) -> None:
    rig.c.set("coder-chat", ready=1)
    data = await rig.call("coder-chat")
    assert data["model"] == "coder-chat" and "mock_response" not in data
    for _ in range(100):
        await rig.call("coder-chat")
    assert rig.c.reads == 1  # one read, then the cached verdict
    # a stale verdict: the request passes at once while the refresh is still waiting for a (hung) API
    rig.c.hang = True
    rig.hook._verdicts["coder-chat"].read_at -= 6
    assert (await rig.call("coder-chat"))["model"] == "coder-chat"
    assert "coder-chat" in rig.hook._reads and not rig.hook._reads["coder-chat"].done()


async def test_an_alias_not_in_the_settings_is_untouched(rig: Rig) -> None:
    data = await rig.call("embeddings", "aembedding")
    assert data["model"] == "embeddings" and rig.c.reads == 0


async def test_switched_off_in_its_settings_it_lets_every_request_pass_and_asks_for_nothing(rig: Rig) -> None:
    rig.c.set("coder-chat", ready=0)
    rig.write(enabled=False)  # wake.enabled: false, as wake-setup writes it: re-read without a restart
    data = await rig.call("coder-chat")
    await rig.hook.drain()
    assert data["model"] == "coder-chat" and rig.c.reads == 0 and rig.c.events == []
    rig.write(enabled=True)
    with pytest.raises(HTTPException):
        await rig.call("coder-chat")


async def test_a_burst_of_50_for_a_model_that_is_down_makes_one_read_one_event_and_readable_503s(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rig.c.set("coder-chat", ready=0, cold_start_s=412.5)
    results = await asyncio.gather(*(rig.call("coder-chat") for _ in range(50)), return_exceptions=True)
    await rig.hook.drain()
    assert all(isinstance(e, HTTPException) and e.status_code == 503 for e in results), results
    e = results[0]
    assert isinstance(e, HTTPException) and e.headers == {"Retry-After": "412"}
    assert e.detail == {"error": "coder-chat is starting (node, image, weights): ready in about 7 min."}
    assert rig.c.reads == 1
    assert len(rig.c.events) == 1
    ev = rig.c.events[0]
    assert ev["event"] == "coder-stack.model.wake-requested"
    assert ev["resource"] == {
        "prefect.resource.id": "coder-stack.model.coder-chat",
        "prefect.resource.name": "coder-chat",
        "coder-stack.alias": "coder-chat",
    }
    assert ev["payload"] == {"alias": "coder-chat", "route": "chat", "reason": "not serving: 0 replicas"}
    assert rig.c.event_headers[0]["Authorization"] == "Basic " + base64.b64encode(b"admin:pass").decode()
    # the next burst within burst_s asks for nothing more
    rig.hook._verdicts.clear()
    await asyncio.gather(*(rig.call("coder-chat") for _ in range(5)), return_exceptions=True)
    await rig.hook.drain()
    assert len(rig.c.events) == 1
    no_secret_anywhere(rig, caplog)


async def test_the_estimate_falls_back_to_the_settings_when_no_cold_start_was_measured(rig: Rig) -> None:
    rig.c.set("coder-chat", ready=0)
    with pytest.raises(HTTPException) as e:
        await rig.call("coder-chat")
    assert e.value.headers == {"Retry-After": "600"} and "ready in about 10 min" in msg(e)


async def test_a_request_cancelled_mid_read_leaves_the_shared_read_and_the_one_event_to_the_others(rig: Rig) -> None:
    """Two requests interleaved on one Deployment read; the first is cancelled (its client went away) while the read
    is in flight: the second still gets its 503 from that same read, and the model is asked for exactly once."""
    rig.c.set("coder-chat", ready=0)
    rig.c.gate = asyncio.Event()
    first = asyncio.ensure_future(rig.call("coder-chat"))
    await rig.c.read_started.wait()
    second = asyncio.ensure_future(rig.call("coder-chat"))
    await asyncio.sleep(0)  # one loop step: the second runs to its await on the read in flight (no I/O before it)
    first.cancel()
    rig.c.gate.set()
    with pytest.raises(HTTPException) as e:
        await second
    assert first.cancelled() and e.value.status_code == 503
    await rig.hook.drain()
    assert rig.c.reads == 1 and len(rig.c.events) == 1


async def test_a_model_waiting_for_the_gpu_says_who_holds_it_and_asks_for_nothing_more(rig: Rig) -> None:
    wake = {"state": "waiting-for-gpu", "run": "r1", "since": in_future(0), "busy": ["coder-chat"], "ready_by": None}
    rig.c.set("coder-fim", ready=0, wake=wake)
    with pytest.raises(HTTPException) as e:
        await rig.call("coder-fim", "atext_completion")
    text = msg(e)
    assert text.startswith("coder-fim waits for the GPU: coder-chat is in use; it starts when coder-chat has been idle")
    assert e.value.status_code == 503 and e.value.headers is not None and "Retry-After" in e.value.headers
    await rig.hook.drain()
    assert rig.c.events == []  # a wake is already pending


async def test_a_model_about_to_be_ready_is_held_then_passes(rig: Rig) -> None:
    wake = {"state": "starting", "run": "r1", "since": in_future(-600), "busy": [], "ready_by": in_future(3)}
    rig.c.set("coder-chat", ready=0, wake=wake)
    rig.c.ready_from_read["coder-chat"] = 3  # ready on the third read: the hold polled twice
    data = await rig.call("coder-chat")
    assert data["model"] == "coder-chat" and "mock_response" not in data
    assert rig.c.reads == 3


async def test_a_hold_is_bounded_then_answers_503(rig: Rig) -> None:
    rig.write(hold_s=1)
    wake = {"state": "starting", "run": "r1", "since": in_future(-600), "busy": [], "ready_by": in_future(1)}
    rig.c.set("coder-chat", ready=0, wake=wake)
    with pytest.raises(HTTPException) as e:
        await rig.call("coder-chat")
    assert "coder-chat is starting" in msg(e) and rig.c.reads >= 2


async def test_a_model_starting_later_than_hold_s_answers_at_once_with_ready_by(rig: Rig) -> None:
    wake = {"state": "starting", "run": "r1", "since": in_future(-60), "busy": [], "ready_by": in_future(400)}
    rig.c.set("coder-chat", ready=0, wake=wake)
    with pytest.raises(HTTPException) as e:
        await rig.call("coder-chat")
    assert rig.c.reads == 1 and "ready in about 7 min" in msg(e)


async def test_a_fallback_alias_answers_while_the_model_is_down_and_the_wake_is_still_asked(rig: Rig) -> None:
    s = settings(rig.base)
    s["models"]["coder-chat"]["fallback"] = "coder-small"
    rig.write(models=s["models"])
    rig.c.set("coder-chat", ready=0)
    data = await rig.call("coder-chat")
    await rig.hook.drain()
    assert data["model"] == "coder-small" and len(rig.c.events) == 1


async def test_chat_as_message_for_chat_never_for_fim(rig: Rig) -> None:
    rig.c.set("coder-chat", ready=0)
    rig.c.set("coder-fim", ready=0)
    with pytest.raises(HTTPException):
        await rig.call("coder-chat")
    rig.write(chat_as_message=True)  # re-read because the file changed
    data = await rig.call("coder-chat")
    assert data["mock_response"].startswith("coder-chat is starting (node, image, weights): ready in about")
    with pytest.raises(HTTPException) as e:  # the chat alias called as a completion (FIM): no text
        await rig.call("coder-chat", "atext_completion")
    assert e.value.status_code == 503
    with pytest.raises(HTTPException):
        await rig.call("coder-fim", "atext_completion")
    with pytest.raises(HTTPException):
        await rig.call("coder-fim", "acompletion")


async def test_an_unreachable_api_never_blocks_a_request_and_a_known_down_model_still_gets_503(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # nothing known and the API hangs: bounded by the timeout, then the request goes on as without the hook
    rig.c.hang = True
    assert (await rig.call("coder-chat"))["model"] == "coder-chat"
    assert "could not read the Deployment of coder-chat (ReadTimeout)" in caplog.text
    # known down, then the API goes away: the 503 with what is known
    rig.c.hang = False
    rig.c.set("coder-fim", ready=0, cold_start_s=120)
    with pytest.raises(HTTPException):
        await rig.call("coder-fim", "atext_completion")
    rig.write(kubernetes={"url": "http://127.0.0.1:9", "token_file": None, "ca_file": None})
    rig.hook._verdicts["coder-fim"].read_at -= 5
    with pytest.raises(HTTPException) as e:
        await rig.call("coder-fim", "atext_completion")
    assert e.value.headers == {"Retry-After": "120"}
    assert "could not read the Deployment of coder-fim (ConnectError)" in caplog.text
    no_secret_anywhere(rig, caplog)


async def test_prefect_unreachable_still_answers_and_asks_again_later(
    rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(wake_hook, "EVENT_RETRY_S", 0.0)
    monkeypatch.setattr(wake_hook, "EVENT_BACKOFF_S", 0.01)
    rig.write(prefect_api_url="http://127.0.0.1:9/api")
    rig.c.set("coder-chat", ready=0)
    t0 = time.monotonic()
    with pytest.raises(HTTPException):
        await rig.call("coder-chat")
    assert time.monotonic() - t0 < wake_hook.EVENT_TIMEOUT_S  # the answer never waits for the event
    await rig.hook.drain()
    for n in (1, 2, 3):  # tried in the background before it is left to the next request
        assert f"Prefect did not take the wake of coder-chat (ConnectError, try {n} of 3)" in caplog.text
    rig.write()  # Prefect back: the wake Prefect did not take is asked again (not only after burst_s)
    rig.hook._verdicts.clear()
    with pytest.raises(HTTPException):
        await rig.call("coder-chat")
    await rig.hook.drain()
    assert len(rig.c.events) == 1
    no_secret_anywhere(rig, caplog)


async def test_a_failed_connection_forgets_the_serving_verdict(rig: Rig) -> None:
    rig.c.set("coder-chat", ready=1)
    await rig.call("coder-chat")
    await rig.hook.async_post_call_failure_hook({"model": "coder-chat"}, ConnectionError("x"), USER)
    assert "coder-chat" not in rig.hook._verdicts
    rig.c.set("coder-chat", ready=0)
    with pytest.raises(HTTPException):
        await rig.call("coder-chat")


async def test_in_a_pod_it_reads_the_api_over_https_with_the_service_account_token_and_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The defaults of a real pod: ``kubernetes.url`` null (the API from KUBERNETES_SERVICE_HOST/PORT), https checked
    against the mounted CA, the mounted token as Bearer; the paths opened under ROOT."""
    sa = tmp_path / "var/run/secrets/kubernetes.io/serviceaccount"
    sa.mkdir(parents=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=kubernetes",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"), "-out", str(sa / "ca.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    (sa / "token").write_text("pod-sa-token\n")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(sa / "ca.crt", tmp_path / "key.pem")
    c = FakeCluster()
    c.set("coder-chat", ready=1)
    async with serve(c, tls) as base:
        port = base.rsplit(":", 1)[1]
        s = settings(base)
        s["kubernetes"] = {
            "url": None,
            "token_file": "/var/run/secrets/kubernetes.io/serviceaccount/token",
            "ca_file": "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        }
        (tmp_path / "coder_stack_wake.json").write_text(json.dumps(s))
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port,
               "CODER_STACK_WAKE_SETTINGS": str(tmp_path / "coder_stack_wake.json")}  # fmt: skip
        monkeypatch.setattr(wake_hook, "ENV", env)
        monkeypatch.setattr(wake_hook, "ROOT", str(tmp_path))
        hook = wake_hook.WakeOnDemand()
        data = await hook.async_pre_call_hook(USER, None, {"model": "coder-chat"}, "acompletion")
        await hook.drain()
    assert data == {"model": "coder-chat"} and c.reads == 1 and c.read_auth == ["Bearer pod-sa-token"]
