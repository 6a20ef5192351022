"""LiteLLM's error object, and the errors the stand-in shapes for a failed upstream or an unreadable body."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from simstack.standins._server import json_response, read_json


class ProxyError(Exception):
    """LiteLLM's ProxyException: ``{"error": {"message", "type", "param", "code": "<status>"}}``."""

    def __init__(self, status: int, message: str, err_type: str | None, param: str | None = "None") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param
        self.extra: dict[str, Any] = {}
        self.headers: dict[str, str] = {}
        self.connect_failed = False  # the upstream could not be reached (what a callback's failure hook is told)

    def response(self) -> web.Response:
        err = {"message": self.message, "type": self.err_type, "param": self.param, "code": str(self.status)}
        return json_response({"error": err | self.extra}, status=self.status, headers=self.headers or None)


async def read_body(request: web.Request) -> dict[str, Any]:
    """An admin route's JSON object body."""
    try:
        body = await read_json(request)
    except ValueError as e:
        raise ProxyError(400, f"Invalid request body: {e}", "bad_request_error") from e
    if not isinstance(body, dict):
        raise ProxyError(400, "Invalid request body: expected a JSON object", "bad_request_error")
    return body


def connection_error(model: str) -> ProxyError:
    # GUESS, from one observation outside the recordings: a real 1.108.7 proxy (no database, config-file models,
    # `num_retries: 0`) whose upstream refused the connection answered exactly this (500, type
    # internal_server_error, param null; headers x-litellm-call-id, x-litellm-response-cost 0, x-litellm-key-spend
    # 0.0) on 2026-12-07. With the proxy's default retries the text was not seen. (This replaced a guess from
    # memory, "litellm.APIConnectionError: ... Received Model Group=...", which the real proxy did not say.)
    err = ProxyError(
        500,
        "litellm.InternalServerError: InternalServerError: OpenAIException - Connection error.\n\n"
        f"LiteLLM: model group '{model}' failed with the error above. No fallback was attempted.",
        "internal_server_error",
        None,
    )
    err.connect_failed = True
    return err


def upstream_error(status: int, text: str, model: str) -> ProxyError:
    # GUESS: upstream errors passed through the gateway were not recorded (the recorded 400s come from
    # LiteLLM's own router); status kept and the exception class names are from memory of LiteLLM
    names = {
        400: "BadRequestError",
        401: "AuthenticationError",
        403: "PermissionDeniedError",
        404: "NotFoundError",
        408: "Timeout",
        422: "UnprocessableEntityError",
        429: "RateLimitError",
        503: "ServiceUnavailableError",
    }
    cls = names.get(status, "InternalServerError" if status >= 500 else "APIError")
    try:
        parsed = json.loads(text)
        err = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
        detail = err.get("message", err) if isinstance(err, dict) else err
    except json.JSONDecodeError:
        detail = text
    return ProxyError(
        status,
        f"litellm.{cls}: {cls}: OpenAIException - {detail}. Received Model Group={model}\n"
        "Available Model Group Fallbacks=None",
        None,
        None,
    )
