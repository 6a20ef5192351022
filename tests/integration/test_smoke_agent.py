"""smoke_agent: a real tool loop on the vLLM stand-in (hermes parser), and a precise failure without tool calls."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr
from simstack.standins import ContainerRun, SimServices, start_standin

from coder_stack.errors import SmokeFailed
from coder_stack.litellm.smoke import smoke_agent
from coder_stack.spec import StackSpec, Timeouts
from coder_stack.transport import make_client

KEY = "sk-agent-test-0123456789abcdef"
AGENT = StackSpec().model("coder-agent")
# Talking to vLLM directly, the model id is the served name (through the gateway it is the alias).
AGENT_DIRECT = AGENT.model_copy(update={"alias": AGENT.served_model_name})


@pytest.fixture(scope="module")
async def agent_url() -> AsyncIterator[str]:
    run = ContainerRun(
        namespace="serving",
        pod_name="coder-agent-0",
        app="coder-agent",
        image="vllm/vllm-openai:v0.32.0",
        args=[
            "--model",
            "/m",
            "--served-model-name",
            AGENT.served_model_name,
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
        ],
        env={"VLLM_API_KEY": KEY},
    )
    b = await start_standin(run, SimServices(resolve_url=lambda u: u))
    assert b is not None
    try:
        yield f"http://127.0.0.1:{b.port}"
    finally:
        await b.stop()


async def test_tool_loop_passes_and_reports_the_auto_habit(agent_url: str) -> None:
    async with make_client(Timeouts()) as http:
        res = await smoke_agent(http, agent_url, SecretStr(KEY), AGENT_DIRECT, key_alias="coder-agent")
    names = [c.name for c in res.checks]
    assert names[0] == "tool_choice=required -> valid get_weather call"
    assert "Paris" in res.checks[0].detail
    assert "role:tool result used in the answer" in names
    assert res.checks[-1].detail == "plain-json"
    assert "plain JSON" in res.diagnostics[0]
    assert len(res.usage) == 3 and all(u.prompt_tokens > 0 for u in res.usage)
    assert KEY not in res.model_dump_json()


def _no_tool_calls(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    assert body["tool_choice"] == "required"
    return httpx.Response(
        200,
        json={
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": AGENT.alias,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": '{"name": "get_weather"}', "tool_calls": []},
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        },
    )


async def test_missing_tool_call_fails_at_the_model_hop() -> None:
    async with make_client(Timeouts(), transport=httpx.MockTransport(_no_tool_calls)) as http:
        with pytest.raises(SmokeFailed) as ei:
            await smoke_agent(http, "http://gw", SecretStr(KEY), AGENT)
    assert ei.value.hop == "model"
    assert "no tool_calls" in str(ei.value) and "--tool-call-parser hermes" in str(ei.value)


def _bad_arguments(request: httpx.Request) -> httpx.Response:
    call = {
        "id": "chatcmpl-tool-1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"town": 1}'},
    }
    return httpx.Response(
        200,
        json={
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": AGENT.alias,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "tool_calls",
                    "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                }
            ],
        },
    )


async def test_arguments_that_break_the_schema_fail_with_the_reason() -> None:
    async with make_client(Timeouts(), transport=httpx.MockTransport(_bad_arguments)) as http:
        with pytest.raises(SmokeFailed) as ei:
            await smoke_agent(http, "http://gw", SecretStr(KEY), AGENT)
    assert ei.value.hop == "model" and "do not match the schema" in str(ei.value)
