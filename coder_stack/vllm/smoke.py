"""The vLLM model server itself: a smoke of the pod, with the shared vLLM key, no gateway in between."""

from __future__ import annotations

from typing import Literal

import httpx
from pydantic import SecretStr

from coder_stack.errors import SmokeFailed
from coder_stack.probe import Check, SmokeResult, Timer, excerpt, hops, judge_fim, stream_first_token, usage_of
from coder_stack.spec import ModelSpec, Timeouts
from coder_stack.transport import error_detail, openai_client


async def smoke_direct(
    http: httpx.AsyncClient, base_url: str, vllm_key: SecretStr, model: ModelSpec, timeouts: Timeouts | None = None
) -> SmokeResult:
    """The pod itself: /health, the served name in /v1/models, one streamed completion (time to first token)."""
    timeouts = timeouts or Timeouts()
    base = base_url.rstrip("/")
    secrets = (vllm_key.get_secret_value(),)
    total, lap = Timer(), Timer()
    checks: list[Check] = []

    with hops(f"{model.name}: GET /health", via="direct", unreachable="pod", secrets=secrets):
        health = await http.get(f"{base}/health", timeout=timeouts.connect_s + 10)
    if health.status_code != 200:
        _, msg = error_detail(health.content)
        raise SmokeFailed(
            f"{model.name}: GET /health answered {health.status_code} {msg}: the vLLM engine is not healthy", hop="pod"
        )
    checks.append(Check(name="GET /health", seconds=lap.lap(), detail="200"))

    oai = openai_client(http, base, vllm_key, timeouts)
    with hops(f"{model.name}: GET /v1/models", via="direct", unreachable="pod", secrets=secrets):
        ids = [m.id async for m in oai.models.list()]
    if model.served_model_name not in ids:
        raise SmokeFailed(
            f"{model.name}: /v1/models lists {ids}, not {model.served_model_name!r}: the pod's --served-model-name "
            "and spec.models[].served_model_name disagree",
            hop="model",
        )
    checks.append(Check(name="served name in /v1/models", seconds=lap.lap(), detail=model.served_model_name))

    endpoint: Literal["chat", "completions"] = "completions" if model.role == "fim" else "chat"
    with hops(f"{model.name}: streamed {endpoint}", via="direct", unreachable="pod", secrets=secrets):
        ttft, text, usage = await stream_first_token(oai, model)
    if not text.strip():
        raise SmokeFailed(f"{model.name}: the streamed {endpoint} call returned no text", hop="model")
    if model.role == "fim":
        judge_fim(text, hop="model", where=f"{model.name}: FIM via /v1/completions")
    if ttft is None:
        raise SmokeFailed(f"{model.name}: no token arrived in the stream", hop="model")
    checks.append(Check(name=f"streamed /v1/{endpoint.replace('chat', 'chat/completions')}", seconds=lap.lap()))
    return SmokeResult(
        kind="direct",
        target=model.served_model_name,
        checks=checks,
        ttft_s=ttft,
        total_s=total.lap(),
        excerpt=excerpt(text, *secrets),
        usage=[usage_of(model.served_model_name, endpoint, usage)] if usage else [],
    )


__all__ = ["smoke_direct"]
