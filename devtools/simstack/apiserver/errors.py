"""The API server's errors as the real one answers them: ``Status`` objects with a code, a reason and
details, built from the store's errors; and the decoding of boolean query parameters (Go's
strconv.ParseBool), which answers with one of them. Every other module of the server raises these.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from simstack.store import Obj, ResourceType, StoreError


class ApiError(Exception):
    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}


def status_obj(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> Obj:
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success" if code < 400 else "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def status_response(err: ApiError) -> web.Response:
    return web.json_response(
        status_obj(err.code, err.reason, err.message, err.details), status=err.code, headers=err.headers
    )


def error_details(rt: ResourceType | None, name: str | None) -> dict[str, Any] | None:
    if rt is None:
        return None
    d: dict[str, Any] = {"kind": rt.plural}
    if name:
        d["name"] = name
    if rt.group:
        d["group"] = rt.group
    return d


def from_store_error(e: StoreError, rt: ResourceType | None, name: str | None) -> ApiError:
    return ApiError(e.code, e.reason, str(e), error_details(rt, name))


def not_found_resource() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def bad_request(msg: str) -> ApiError:
    return ApiError(400, "BadRequest", msg)


_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_bool(value: str | None, param: str = "") -> bool:
    """Go's strconv.ParseBool, as the API server decodes ``?watch=``; an empty value is false."""
    if value is None or value == "":
        return False
    if value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    raise bad_request(f'strconv.ParseBool: parsing "{value}": invalid syntax ({param})')
