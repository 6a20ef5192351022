"""vLLM's error bodies: ``VllmError`` (``{"error": {"message", "type", "param", "code": <status>}}``) and the
400 "Bad Request" of a request that fails validation (``validation_error``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from simstack.standins._server import json_response


class VllmError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def response(self) -> web.Response:
        # error.code is the HTTP status as an int (every recorded error: err-*).
        return json_response(
            {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}},
            status=self.status,
        )


def _input_repr(value: Any) -> str:
    """vLLM's rendering of a pydantic error's ``input`` (err-malformed-json, err-missing-messages)."""
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"  # GUESS: lists are summarised like dicts
    return repr(value)


def validation_error(errors: list[dict[str, Any]]) -> VllmError:
    """A request-validation failure: 400 "Bad Request", the pydantic error list as the message, the first
    location as ``param`` (err-malformed-json, err-missing-messages)."""
    n = len(errors)
    message = f"{n} validation error{'s' if n != 1 else ''}:\n" + "\n".join(f"  {e!r}" for e in errors)
    return VllmError(400, message, "Bad Request", str(errors[0]["loc"]))
