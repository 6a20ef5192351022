"""The one HTTP stack: httpx for admin calls, the openai 2.x SDK (built on httpx) for OpenAI-compatible calls.

Why openai 2.x: 3.x is built on ``httpx2`` and cannot take our ``httpx`` client, so one transport (port-forward
or not), one place for timeouts, retries and redaction would be lost.

- Explicit timeouts: connect from ``spec.timeouts.connect_s`` (5 s), read from ``spec.timeouts.request_s``.
- Retries only for what is retriable, bounded, in the transport (so the openai SDK runs with
  ``max_retries=0``): connection refused while a server starts, 503, 429 honouring ``Retry-After``.
- Redaction: a log filter on the ``httpx`` and ``openai`` loggers strips ``Authorization`` headers and any
  query string carrying a key (LiteLLM's ``/key/info?key=`` is the one URL that holds a key); on
  ``kubernetes_asyncio``'s REST client it withholds the values of every Secret in a logged response body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from email.utils import parsedate_to_datetime
from time import time

import httpx
from openai import AsyncOpenAI
from pydantic import SecretStr

from coder_stack.errors import redact
from coder_stack.spec import Timeouts

RETRY_STATUSES = frozenset({429, 503})
DEFAULT_ATTEMPTS = 4
DEFAULT_BACKOFF_S = 0.5
DEFAULT_MAX_WAIT_S = 10.0

_KEY_QUERY = re.compile(r"\?[^\s\"']*")


def scrub_url(url: str | httpx.URL) -> str:
    """A URL fit for a log or an error: no query string (it may hold a key), no userinfo."""
    u = httpx.URL(str(url))
    return str(u.copy_with(query=None, fragment=None, username=None, password=None))


WITHHELD = "<withheld>"
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def _withhold_secret(obj: dict[str, object]) -> None:
    """Blank a Secret object's values in place: ``data``/``stringData`` (base64 or plain) and the
    last-applied annotation that repeats them. Key names stay (they are not secret and help reading a log)."""
    for field in ("data", "stringData"):
        values = obj.get(field)
        if isinstance(values, dict):
            obj[field] = dict.fromkeys(values, WITHHELD)
        elif values is not None:
            obj[field] = WITHHELD
    meta = obj.get("metadata")
    annotations = meta.get("annotations") if isinstance(meta, dict) else None
    if isinstance(annotations, dict) and _LAST_APPLIED in annotations:
        annotations[_LAST_APPLIED] = WITHHELD


def _withhold_secrets_in(value: object) -> object:
    """Every Secret in a decoded API body, wherever it sits (an object, a SecretList's items, an event's
    object), with its values withheld."""
    if isinstance(value, list):
        return [_withhold_secrets_in(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _withhold_secrets_in(v) for k, v in value.items()}
    if out.get("kind") == "Secret":
        _withhold_secret(out)
    elif out.get("kind") == "SecretList" and isinstance(items := out.get("items"), list):
        for item in items:
            if isinstance(item, dict):
                _withhold_secret(item)
    return out


def redact_api_body(body: object) -> object:
    """A Kubernetes API body fit for a log: Secret values withheld. kubernetes_asyncio's REST client logs
    every response body at DEBUG (``response body: %s`` with the raw bytes), so reading a Secret would put
    its data, base64-encoded, into the log. A body that is not JSON and mentions a Secret is withheld whole."""
    if not isinstance(body, (bytes, bytearray, str)):
        return body
    text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else body
    try:
        decoded = json.loads(text)
    except ValueError:
        return f"{WITHHELD} ({len(text)} characters, not JSON)" if "Secret" in text else text
    return json.dumps(_withhold_secrets_in(decoded), separators=(",", ":"))


class RedactingFilter(logging.Filter):
    """Rewrites log records so that no auth header, key, key-bearing query string or Secret value reaches
    a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("kubernetes_asyncio") and record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            record.args = tuple(redact_api_body(a) for a in args)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        cleaned = redact(_KEY_QUERY.sub("?<redacted>", message), limit=4000)
        if cleaned != message or record.args:
            record.msg = cleaned
            record.args = None
        return True


_FILTER = RedactingFilter()
# A logger's filters see only the records made on that very logger (not its children's), so each is named:
# kubernetes_asyncio's REST client logs response bodies (Secrets among them) at DEBUG, its kubeconfig
# loader logs what it tries.
_FILTERED_LOGGERS = (
    "httpx",
    "httpcore",
    "openai",
    "openai._base_client",
    "kubernetes_asyncio.client.rest",
    "kubernetes_asyncio.config.kube_config",
)


def install_log_redaction() -> None:
    """Attach the redacting filter to the loggers that see requests. Idempotent."""
    for name in _FILTERED_LOGGERS:
        lg = logging.getLogger(name)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)


install_log_redaction()


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time())
    except (TypeError, ValueError):
        return None


class RetryingTransport(httpx.AsyncBaseTransport):
    """Retries connection refused, 503 and 429 (honouring Retry-After), a bounded number of times.

    Anything else — 4xx, 500, a read timeout after the request was sent — is returned or raised as is: the
    caller decides, since a non-idempotent call may already have happened.
    """

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff_s: float = DEFAULT_BACKOFF_S,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
    ) -> None:
        self._inner = inner or httpx.AsyncHTTPTransport()
        self._attempts = max(1, attempts)
        self._backoff_s = backoff_s
        self._max_wait_s = max_wait_s

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        waited = 0.0
        for attempt in range(1, self._attempts + 1):
            last = attempt == self._attempts
            delay = self._backoff_s * 2 ** (attempt - 1)
            try:
                response = await self._inner.handle_async_request(request)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if last or waited + delay > self._max_wait_s:
                    raise
            else:
                if response.status_code not in RETRY_STATUSES or last:
                    return response
                hinted = _retry_after_s(response)
                if hinted is not None:
                    delay = hinted
                if waited + delay > self._max_wait_s:
                    return response  # the server asks for longer than we may wait: let the caller say so
                await response.aclose()
            await asyncio.sleep(delay)
            waited += delay
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        await self._inner.aclose()


def timeout_for(timeouts: Timeouts, read_s: float | None = None) -> httpx.Timeout:
    return httpx.Timeout(
        connect=timeouts.connect_s,
        read=read_s if read_s is not None else timeouts.request_s,
        write=timeouts.request_s,
        pool=timeouts.connect_s,
    )


def make_client(
    timeouts: Timeouts,
    *,
    base_url: str = "",
    attempts: int = DEFAULT_ATTEMPTS,
    max_wait_s: float = DEFAULT_MAX_WAIT_S,
    backoff_s: float = DEFAULT_BACKOFF_S,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """The project's httpx client: explicit timeouts, retriable-only bounded retries, no redirects."""
    install_log_redaction()
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        timeout=timeout_for(timeouts),
        transport=RetryingTransport(transport, attempts=attempts, max_wait_s=max_wait_s, backoff_s=backoff_s),
        follow_redirects=False,
    )


def bearer(key: SecretStr) -> dict[str, str]:
    """The only place a key is unwrapped for HTTP: an Authorization header."""
    return {"Authorization": f"Bearer {key.get_secret_value()}"}


def openai_client(http: httpx.AsyncClient, base_url: str, key: SecretStr, timeouts: Timeouts) -> AsyncOpenAI:
    """An OpenAI-compatible client on our httpx client. ``base_url`` is without ``/v1``."""
    return AsyncOpenAI(
        api_key=key.get_secret_value(),
        base_url=f"{base_url.rstrip('/')}/v1",
        http_client=http,
        max_retries=0,  # our transport retries what is retriable
        timeout=timeout_for(timeouts),
    )


def error_detail(body: bytes | str | object) -> tuple[str, str]:
    """(type, message) from an OpenAI/LiteLLM/vLLM error body; redacted and short."""
    data: object = body
    if isinstance(body, bytes | str):
        try:
            data = json.loads(body)
        except ValueError:
            text = body.decode(errors="replace") if isinstance(body, bytes) else body
            return "", redact(text.strip(), limit=300)
    etype, message = "", ""
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            etype = str(err.get("type") or "")
            message = str(err.get("message") or err.get("detail") or "")
        elif err is not None:
            message = str(err)
        if not message and "detail" in data:
            message = str(data["detail"])
    elif data is not None:
        message = str(data)
    return redact(etype, limit=80), redact(message, limit=300)


__all__ = [
    "RedactingFilter",
    "RetryingTransport",
    "bearer",
    "error_detail",
    "install_log_redaction",
    "make_client",
    "openai_client",
    "scrub_url",
    "timeout_for",
]
