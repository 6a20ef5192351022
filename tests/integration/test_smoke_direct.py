"""smoke_direct against the vLLM stand-in, over real HTTP: healthy passes, each fault names its hop."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from pydantic import SecretStr
from simstack.standins import ContainerRun, SimServices, start_standin

from coder_stack import probe
from coder_stack.errors import SmokeFailed, SpecError
from coder_stack.probe import EXCERPT_CHARS, Check, SmokeResult, chat_once, fim_prompt, judge_fim
from coder_stack.spec import StackSpec, Timeouts
from coder_stack.transport import make_client, openai_client
from coder_stack.vllm.smoke import smoke_direct

KEY = "sk-direct-test-0123456789abcdef"
SPEC = StackSpec()
CHAT = SPEC.model("coder-chat")
FIM = SPEC.model("coder-fim")


def vllm_run(name: str, served: str, key: str = KEY) -> ContainerRun:
    return ContainerRun(
        namespace="serving",
        pod_name=f"{name}-0",
        app=name,
        image="vllm/vllm-openai:v0.32.0",
        args=[
            "--model",
            f"/models/{name}",
            "--served-model-name",
            served,
            "--api-key",
            "$(VLLM_API_KEY)",
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
        ],
        env={"VLLM_API_KEY": key},
    )


@dataclass
class Vllm:
    chat: str
    fim: str


@pytest.fixture(scope="module")
async def vllm() -> AsyncIterator[Vllm]:
    services = SimServices(resolve_url=lambda u: u)
    chat = await start_standin(vllm_run("coder-chat", CHAT.served_model_name), services)
    fim = await start_standin(vllm_run("coder-fim", FIM.served_model_name), services)
    assert chat is not None and fim is not None
    try:
        yield Vllm(f"http://127.0.0.1:{chat.port}", f"http://127.0.0.1:{fim.port}")
    finally:
        await chat.stop()
        await fim.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(Timeouts(request_s=10), attempts=2, max_wait_s=0.5) as c:
        yield c


async def test_direct_chat_smoke_passes_and_records_time_to_first_token(vllm: Vllm, http: httpx.AsyncClient) -> None:
    res = await smoke_direct(http, vllm.chat, SecretStr(KEY), CHAT)
    assert res.kind == "direct" and res.target == CHAT.served_model_name
    assert [c.name for c in res.checks][:2] == ["GET /health", "served name in /v1/models"]
    assert res.ttft_s is not None and res.ttft_s >= 0
    # The real model answers the runbook prompt with 171 characters of prose and code, cut at max_tokens
    # (recorded: chat-reverse); the report keeps its start, never failing on the length.
    assert res.excerpt.startswith("In Python, you can reverse a string") and res.excerpt.endswith("…")
    assert len(res.excerpt) == EXCERPT_CHARS
    assert KEY not in res.model_dump_json()


async def test_any_answer_length_or_content_fits_the_report() -> None:
    """A smoke result holds whatever a real model says: long, multi-line, with secrets redacted first."""
    long = "x" * 5000 + " sk-" + "a" * 40
    res = SmokeResult(kind="direct", target="m", excerpt=long, checks=[Check(name="c", seconds=0, detail=long)])
    assert len(res.excerpt) == EXCERPT_CHARS and len(res.checks[0].detail) == 400
    cut = probe.excerpt("y" * 115 + " sk-" + "b" * 30)
    assert "b" * 8 not in cut and len(cut) <= EXCERPT_CHARS


async def test_direct_fim_smoke_uses_raw_completions_and_judges_the_start(vllm: Vllm, http: httpx.AsyncClient) -> None:
    res = await smoke_direct(http, vllm.fim, SecretStr(KEY), FIM)
    assert res.excerpt.startswith("a + b")
    assert res.ttft_s is not None
    assert res.checks[-1].name == "streamed /v1/completions"


async def test_wrong_served_name_fails_at_the_model_hop(vllm: Vllm, http: httpx.AsyncClient) -> None:
    wrong = CHAT.model_copy(update={"served_model_name": "qwen2.5-coder-7b"})
    with pytest.raises(SmokeFailed) as ei:
        await smoke_direct(http, vllm.chat, SecretStr(KEY), wrong)
    assert ei.value.hop == "model"
    assert "qwen2.5-coder-7b-instruct" in str(ei.value) and "--served-model-name" in str(ei.value)


async def test_wrong_vllm_key_fails_at_the_key_hop_without_the_key_in_the_message(
    vllm: Vllm, http: httpx.AsyncClient
) -> None:
    bad = "sk-wrong-key-abcdef0123456789"
    with pytest.raises(SmokeFailed) as ei:
        await smoke_direct(http, vllm.chat, SecretStr(bad), CHAT)
    assert ei.value.hop == "key"
    assert "401" in str(ei.value)
    assert bad not in str(ei.value) and bad not in repr(ei.value)
    assert ei.value.__cause__ is None or bad not in str(ei.value.__cause__)


async def test_unreachable_pod_fails_at_the_pod_hop(http: httpx.AsyncClient) -> None:
    with pytest.raises(SmokeFailed) as ei:
        await smoke_direct(http, "http://127.0.0.1:9", SecretStr(KEY), CHAT)
    assert ei.value.hop == "pod"
    assert "unreachable" in str(ei.value)


async def test_fim_through_chat_is_refused_by_the_code(vllm: Vllm, http: httpx.AsyncClient) -> None:
    oai = openai_client(http, vllm.fim, SecretStr(KEY), Timeouts())
    with pytest.raises(SpecError, match="/v1/completions"):
        await chat_once(oai, FIM, FIM.served_model_name, fim_prompt())


async def test_fim_through_chat_is_mangled_by_the_server(vllm: Vllm, http: httpx.AsyncClient) -> None:
    """Why the guard exists: the same prompt through the chat endpoint does not come back as the middle."""
    resp = await http.post(
        f"{vllm.fim}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": FIM.served_model_name,
            "messages": [{"role": "user", "content": fim_prompt()}],
            "max_tokens": 16,
            "temperature": 0,
        },
    )
    assert resp.status_code == 200
    text = resp.json()["choices"][0]["message"]["content"]
    with pytest.raises(SmokeFailed) as ei:
        judge_fim(text, hop="model", where="fim via chat")
    assert ei.value.hop == "model"


async def test_no_key_in_any_log_record(vllm: Vllm, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await smoke_direct(http, vllm.chat, SecretStr(KEY), CHAT)
    with pytest.raises(SmokeFailed):
        await smoke_direct(http, vllm.chat, SecretStr("sk-another-bad-key-123456789"), CHAT)
    assert caplog.records, "httpx/openai should have logged the requests"
    for r in caplog.records:
        text = r.getMessage()
        assert KEY not in text and "sk-another-bad-key-123456789" not in text
