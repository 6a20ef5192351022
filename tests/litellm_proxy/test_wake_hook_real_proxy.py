"""The wake hook inside a real LiteLLM 1.108.7 proxy: what the clients (Open WebUI, Tabby, the openai SDK) see."""

from __future__ import annotations

import asyncio
import json

from tests.litellm_proxy.conftest import FALLBACK_TEXT, Proxy

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
FIM = {"prompt": "def add(a, b):\n    return", "max_tokens": 8}


async def test_the_hook_loads_and_a_serving_alias_answers_through_it(proxy: Proxy, no_leak: None) -> None:
    proxy.cluster.set("coder-chat", ready=1)
    async with proxy.client() as c:
        reads = proxy.cluster.reads
        status, _, body = await proxy.call(
            c, "hook-serving-chat", "coder-chat is Ready: the hook passes, the upstream answers.",
            "/v1/chat/completions", {"model": "coder-chat", **CHAT}, {"coder-chat": "ready 1"},
        )  # fmt: skip
    assert status == 200 and body["choices"][0]["message"]["content"] == "pong"
    assert proxy.cluster.reads == reads + 1  # the hook was called: it read coder-chat's Deployment


async def test_a_burst_of_50_for_a_model_that_is_down_gets_readable_503s_and_makes_one_event(
    proxy: Proxy, no_leak: None
) -> None:
    proxy.cluster.set("coder-big", ready=0, cold_start_s=412.5)
    before = len(proxy.cluster.events)
    setup = {"coder-big": "ready 0, no wake, cold-start-s 412.5"}
    async with proxy.client() as c:
        answers = await asyncio.gather(
            *(
                proxy.call(c, f"hook-down-burst-{i}", "", "/v1/chat/completions", {"model": "coder-big", **CHAT}, setup)
                for i in range(50)
            )
        )
    keep = proxy.records[-50]
    keep.update(id="hook-down-chat-503", what="coder-big has 0 replicas: 503, Retry-After and the hook's message.")
    del proxy.records[-49:]
    for status, headers, body in answers:
        assert status == 503 and headers["retry-after"] == "412"
        assert body["error"]["message"] == "coder-big is starting (node, image, weights): ready in about 7 min."
        assert body["error"]["code"] == "503"
    await _until(lambda: len(proxy.cluster.events) > before)
    # every request decided (and asked, or not) before its 503 was sent: no later post can come from this burst
    assert len(proxy.cluster.events) == before + 1
    ev = proxy.cluster.events[-1]
    assert ev["event"] == "coder-stack.model.wake-requested" and ev["resource"]["prefect.resource.name"] == "coder-big"


async def test_fim_for_a_model_waiting_for_the_gpu_gets_a_fast_503_never_text(proxy: Proxy, no_leak: None) -> None:
    wake = {"state": "waiting-for-gpu", "run": "r1", "since": "2026-12-07T09:00:00+00:00", "busy": ["coder-chat"],
            "ready_by": None}  # fmt: skip
    proxy.cluster.set("coder-fim", ready=0, wake=wake)
    async with proxy.client() as c:
        status, headers, body = await proxy.call(
            c, "hook-fim-waiting-for-gpu-503", "coder-fim waits for the GPU: /v1/completions gets 503, never text.",
            "/v1/completions", {"model": "coder-fim", **FIM}, {"coder-fim": "ready 0, wake waiting-for-gpu"},
        )  # fmt: skip
    assert status == 503 and "retry-after" in headers and "choices" not in body
    assert body["error"]["message"].startswith("coder-fim waits for the GPU: coder-chat is in use; it starts when")


async def test_a_fallback_alias_answers_while_the_model_is_down(proxy: Proxy, no_leak: None) -> None:
    proxy.cluster.set("coder-agent", ready=0)
    async with proxy.client() as c:
        status, _, body = await proxy.call(
            c, "hook-fallback", "coder-agent is down and falls back to coder-small (a mock_response model).",
            "/v1/chat/completions", {"model": "coder-agent", **CHAT}, {"coder-agent": "ready 0, fallback coder-small"},
        )  # fmt: skip
    assert status == 200 and body["choices"][0]["message"]["content"] == FALLBACK_TEXT
    await _until(lambda: any(e["resource"]["prefect.resource.name"] == "coder-agent" for e in proxy.cluster.events))


async def test_chat_as_message_gives_chat_an_assistant_message_streamed_or_not_and_fim_still_503(
    proxy: Proxy, no_leak: None
) -> None:
    proxy.cluster.set("coder-big", ready=0, cold_start_s=412.5)
    proxy.write_settings(chat_as_message=True)  # the hook reads its settings again: no restart
    setup = {"coder-big": "ready 0, cold-start-s 412.5", "chat_as_message": True}
    try:
        async with proxy.client() as c:
            status, _, body = await proxy.call(
                c, "hook-chat-as-message", "chat_as_message: a 200 assistant message with the hook's text.",
                "/v1/chat/completions", {"model": "coder-big", **CHAT}, setup,
            )  # fmt: skip
            assert status == 200
            message = body["choices"][0]["message"]
            assert message["role"] == "assistant"
            assert message["content"] == "coder-big is starting (node, image, weights): ready in about 7 min."
            status, _, chunks = await proxy.call(
                c, "hook-chat-as-message-stream", "chat_as_message, streamed: the text arrives as ordinary chunks.",
                "/v1/chat/completions", {"model": "coder-big", "stream": True, **CHAT}, setup,
            )  # fmt: skip
            assert status == 200 and chunks[-1] == "[DONE]"
            text = "".join(
                (json.loads(ch)["choices"][0]["delta"].get("content") or "") for ch in chunks[:-1] if ch.strip()
            )
            assert text == "coder-big is starting (node, image, weights): ready in about 7 min."
            status, _, body = await proxy.call(
                c, "hook-chat-as-message-fim-503", "chat_as_message never applies to FIM: still 503.",
                "/v1/completions", {"model": "coder-fim", **FIM}, {**setup, "coder-fim": "ready 0, waiting-for-gpu"},
            )  # fmt: skip
            assert status == 503 and "choices" not in body
    finally:
        proxy.write_settings()


async def _until(cond: object, timeout: float = 10.0) -> None:
    """Wait for a condition the proxy's background work makes true (checked as the loop runs, bounded)."""
    assert callable(cond)
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)
