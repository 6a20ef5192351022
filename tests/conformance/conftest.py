"""vLLM-specific fixtures of the conformance suite: a vLLM stand-in configured like the recording."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from simstack.standins import ContainerRun, SimServices, start_standin

# As recorded (devtools/simstack/recordings/README.md): one model under three served names, an API key,
# --enable-auto-tool-choice --tool-call-parser hermes, max_model_len 4096.
VLLM_SERVED = ["qwen2.5-coder-7b-instruct", "qwen2.5-coder-1.5b", "qwen2.5-coder-14b-instruct"]
VLLM_MODEL_DIR = "/models/qwen2.5-coder"


@dataclass
class VllmUnderTest:
    url: str
    key: str
    model_dir: str
    services: SimServices


@pytest.fixture(scope="module")
async def vllm_standin() -> AsyncIterator[VllmUnderTest]:
    key = "sk-" + secrets.token_hex(16)  # made up per run: no key is written down anywhere
    run = ContainerRun(
        namespace="serving",
        pod_name="coder-chat-0",
        app="coder-chat",
        image="vllm/vllm-openai:v0.32.0",
        args=[
            "--model",
            VLLM_MODEL_DIR,
            "--served-model-name",
            *VLLM_SERVED,
            "--api-key",
            "$(VLLM_API_KEY)",
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
            "--max-model-len",
            "4096",
        ],
        env={"VLLM_API_KEY": key},
    )
    services = SimServices(resolve_url=lambda u: u)
    backend = await start_standin(run, services)
    assert backend is not None
    try:
        yield VllmUnderTest(f"http://127.0.0.1:{backend.port}", key, VLLM_MODEL_DIR, services)
    finally:
        await backend.stop()
