"""The project's one exception hierarchy.

Every error says what broke and what to do next. Library errors (kubernetes-asyncio, httpx, openai)
are chained with ``raise ... from e`` and never subclassed or leaked. Messages are redacted and
truncated: no header, token or key ever reaches an exception text.

``RetriableError`` marks what a retry may fix (a pod still starting, a 503, a 429, a dropped
connection); ``PermanentError`` what it cannot (a crash loop, a missing permission, bad input).
Prefect retries consult :func:`is_retriable` through ``retry_condition_fn``.
"""

from __future__ import annotations

import re
from typing import Any

MAX_MESSAGE = 800

_SECRET_PATTERNS = [
    re.compile(r"sk-[A-Za-z0-9_\-]{8,}"),
    re.compile(r"(?i)(authorization|x-api-key|api[_-]?key|token|password|secret)(\"?\s*[:=]\s*\"?)([^\s\"',}]+)"),
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=\-]+"),
]


def redact(text: str, *secrets: str | None, limit: int = MAX_MESSAGE) -> str:
    """Remove known secret values and anything shaped like a key or auth header, then truncate."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    text = _SECRET_PATTERNS[0].sub("sk-***", text)
    text = _SECRET_PATTERNS[1].sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    text = _SECRET_PATTERNS[2].sub("Bearer ***", text)
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text) - limit} more characters)"
    return text


class CoderStackError(Exception):
    """Base of every error this project raises. ``step`` is the flow step it ended (set by the flow);
    ``status`` and ``resource``, when known, are the HTTP status a system answered and what was asked for
    (``secrets/openwebui-secrets``, ``/key/update``), for callers to branch on instead of parsing the text."""

    retriable: bool = False
    step: str | None = None
    report: Any = None  # the flow's RunReport when a flow ended with this error (the CLI prints it)

    def __init__(self, message: str, *, status: int | None = None, resource: str | None = None) -> None:
        self.message = redact(message)
        self.status = status
        self.resource = resource
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class RetriableError(CoderStackError):
    """A retry may succeed (transient)."""

    retriable = True


class PermanentError(CoderStackError):
    """A retry will not help; a person has to act on the message."""


# --- input and configuration ---------------------------------------------------------------------
class SpecError(PermanentError):
    """The stack spec or a parameter is invalid."""


class ConfigError(PermanentError):
    """Kubeconfig, context, Prefect set-up or an endpoint cannot be used as given."""


# --- Kubernetes ------------------------------------------------------------------------------------
class ClusterError(CoderStackError):
    """Base for Kubernetes API problems."""


class ClusterUnavailable(RetriableError, ClusterError):
    """The API server could not be reached or answered 5xx/429."""


class Forbidden(PermanentError, ClusterError):
    """RBAC refused a call; the message names the verb and resource to grant."""


class NotFound(PermanentError, ClusterError):
    """An object the stack needs does not exist."""


class ClusterRequestError(PermanentError, ClusterError):
    """The API server refused a request for another reason (4xx)."""


# --- waiting on pods -----------------------------------------------------------------------------
class PodNotReady(RetriableError, ClusterError):
    """Still starting when the wait ended; waiting longer may succeed."""


class PodFailed(PermanentError, ClusterError):
    """The pod can never become Ready as it is (CrashLoopBackOff, ImagePullBackOff, OOMKilled...)."""

    def __init__(self, message: str, *, pod: str = "", reason: str = "", phase: str = "") -> None:
        super().__init__(message)
        self.pod = pod
        self.reason = reason
        self.phase = phase


class WaitTimeout(PermanentError, ClusterError):
    """A phase ran over its budget. Carries the phase and how long it took."""

    def __init__(self, message: str, *, phase: str = "", elapsed_s: float = 0.0) -> None:
        super().__init__(message)
        self.phase = phase
        self.elapsed_s = elapsed_s


class PreflightError(PermanentError):
    """The stack cannot work as specified; nothing was changed."""


# --- gateway and models ----------------------------------------------------------------------------
class GatewayError(CoderStackError):
    """Base for LiteLLM / vLLM HTTP problems."""


class EndpointUnavailable(RetriableError, GatewayError):
    """Connection refused, 503 or 429 from a model server or the gateway."""


class SmokeFailed(PermanentError, GatewayError):
    """A smoke check got a wrong answer. ``hop`` says where: pod, service, gateway, key-scope,
    budget, model, frontend."""

    def __init__(self, message: str, *, hop: str) -> None:
        super().__init__(f"[{hop}] {message}")
        self.hop = hop


class MetricsUnreadable(PermanentError, GatewayError):
    """A model server's /metrics could not be read, or lacks what idleness is judged by (running and
    waiting gauges, request counters for the served model): the model is left serving."""


class GatewayRequestError(PermanentError, GatewayError):
    """The gateway refused an admin call (bad master key, bad request)."""


class DeliveryRefused(PermanentError):
    """A key change would reach its Secret but not the app that uses it (e.g. Open WebUI keeping the key
    stored at its first launch); nothing was changed. The message names the setting to change."""


class KeyUnusable(PermanentError, GatewayError):
    """A virtual key exists but cannot be used (blocked, budget spent, an unknown status) and replacing it
    is not ours to decide; the message names the key's alias, what is wrong and what to do."""


# --- GPU exclusivity -----------------------------------------------------------------------------
class GpuLimitMissing(PermanentError):
    """The tag:gpu global concurrency limit does not exist, so GPU work would run unprotected."""


class GpuSlotTimeout(RetriableError):
    """A GPU session waited its time for the ``tag:gpu`` slot and another session still holds it."""


class GpuBusy(PermanentError):
    """Another model is serving and take_over was not set."""


class UnexpectedError(PermanentError):
    """An exception that is not the project's own ended a flow (a bug, or an answer nobody foresaw).
    Carries the original's type and redacted first line; the original is chained as ``__cause__``."""

    def __init__(self, original: BaseException, *, step: str | None = None) -> None:
        first = (str(original).strip().splitlines() or [""])[0]
        super().__init__(
            f"unexpected {type(original).__name__}: {redact(first, limit=300)} — this is a bug in coder-stack or an "
            "answer it did not expect; the run's report and the Prefect flow-run log have the details"
        )
        self.step = step


def one_line(err: BaseException) -> str:
    """The error as the one line a user sees: the step it ended, then what broke and what to do."""
    message = str(err).strip().replace("\n", " ") if isinstance(err, CoderStackError) else str(UnexpectedError(err))
    step = getattr(err, "step", None)
    return f"{step}: {message}" if step else message


def is_retriable(exc: BaseException) -> bool:
    return isinstance(exc, CoderStackError) and exc.retriable
