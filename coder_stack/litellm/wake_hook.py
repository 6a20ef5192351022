"""Wake on demand: a LiteLLM pre-call hook that brings a reclaimed model back and tells the person asking.

Shipped into the LiteLLM pod as ``coder_stack_wake.py`` beside the proxy's config, with its settings
``coder_stack_wake.json`` beside it, and loaded by the config line
``litellm_settings: {callbacks: ["coder_stack_wake.wake_on_demand"]}``.
Standalone on purpose: the standard library, httpx, fastapi and (when present) LiteLLM's ``CustomLogger``, nothing
of coder_stack.

For a request whose alias is in the settings' ``models`` it reads the model's Deployment (namespace ``serving``):
- one ready replica: serving, the request passes. The verdict is kept ``cache_s`` and then refreshed in the
  background while the request passes on it; after a minute without a request (``STALE_S``) the next request
  reads once more (reclaim only happens after a much longer quiet time, so a stale "serving" never hides it);
- otherwise it asks Prefect for the model (one event per ``burst_s``, concurrent requests share one read and one
  event), and answers at once: a fallback alias, a chat message (``chat_as_message``, chat only) or a 503 with
  ``Retry-After`` and a message a person can read. A model about to be ready (within ``hold_s``) is waited for.
The Kubernetes API or Prefect not answering costs at most ``TIMEOUT_S``; nothing known about the model then means
the request passes (it would fail or succeed exactly as without this hook). No key, user or prompt is logged or
sent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import ssl
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import HTTPException


class _NoProxyException(Exception):
    """Stands for LiteLLM's ProxyException where LiteLLM is not installed."""


if TYPE_CHECKING:
    _Base = object
    _ProxyException = _NoProxyException
else:
    try:
        from litellm.integrations.custom_logger import CustomLogger as _Base
        from litellm.proxy._types import ProxyException as _ProxyException
    except ImportError:  # outside the LiteLLM pod (the simulator, the tests)
        _Base = object
        _ProxyException = _NoProxyException

# Seams for the simulator; the defaults are a real pod's.
ENV: Mapping[str, str] = os.environ
ROOT = "/"
TRANSPORT: httpx.AsyncBaseTransport | None = None  # tests may route every call through one transport

LOG = logging.getLogger("coder_stack_wake")
SETTINGS_NAME = "coder_stack_wake.json"
TIMEOUT_S = 0.5  # one Kubernetes read or one event post, at most
STALE_S = 60.0  # a serving verdict older than this is read again before a request passes on it
DOWN_CACHE_S = 1.0  # a "not serving" verdict is shared this long (a burst reads once)
POLL_S = 1.0  # how often a held request looks again
EVENT_RETRY_S = 10.0  # an event Prefect did not take is tried again after this long
# The event is posted in the background (the person already has the answer), so it may wait longer than a read: a
# busy Prefect server that takes a second must not lose the wake. It is tried EVENT_TRIES times, EVENT_BACKOFF_S
# apart, then left to the next request (after EVENT_RETRY_S).
EVENT_TIMEOUT_S = 5.0
EVENT_TRIES = 3
EVENT_BACKOFF_S = 1.0
WAKE_ANNOTATION = "coder-stack.io/wake"
COLD_START_ANNOTATION = "coder-stack.io/cold-start-s"
CHAT_CALLS = frozenset({"completion", "acompletion"})
FIM_CALLS = frozenset({"text_completion", "atext_completion"})


class Unavailable(_ProxyException, HTTPException):
    """The 503 with Retry-After: a fastapi HTTPException (what the contract and the stand-in expect) that inside the
    proxy is first of all LiteLLM's ProxyException, because LiteLLM 1.108.7's /completions route drops an
    HTTPException's headers (and puts its detail's repr in the message) but answers a ProxyException as it is."""

    def __init__(self, message: str, seconds: int) -> None:
        HTTPException.__init__(self, 503, detail={"error": message}, headers={"Retry-After": str(seconds)})
        self.message, self.type, self.param, self.code, self.openai_code = (
            message, "internal_server_error", None, "503", "503"
        )  # fmt: skip
        self.provider_specific_fields = None

    def __str__(self) -> str:
        return self.message


# Plain classes, not dataclasses: LiteLLM loads this file without entering it in sys.modules, and a dataclass
# with string annotations looks its module up there (AttributeError at proxy start).
class Verdict:
    def __init__(
        self, serving: bool, read_at: float, wake: dict[str, Any] | None = None, cold_start_s: float | None = None
    ) -> None:
        self.serving, self.read_at, self.wake, self.cold_start_s = serving, read_at, wake, cold_start_s


class _Settings:
    def __init__(self, mtime: float = -1.0, data: dict[str, Any] | None = None) -> None:
        self.mtime, self.data = mtime, data or {}


def _now() -> datetime:
    return datetime.now(UTC)


def _minutes(seconds: float) -> str:
    n = max(1, math.ceil(seconds / 60))
    return f"about {n} min" if n > 1 else "about a minute"


class WakeOnDemand(_Base):
    def __init__(self) -> None:
        super().__init__()
        self._settings = _Settings()
        self._verdicts: dict[str, Verdict] = {}
        self._reads: dict[str, asyncio.Task[Verdict | None]] = {}
        self._last_event: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._clients: dict[tuple[Any, ...], httpx.AsyncClient] = {}

    # ---------------------------------------------------------------- settings
    def settings(self) -> dict[str, Any]:
        """The JSON beside this file, read again whenever its mtime changes (a ConfigMap update)."""
        path = Path(ENV.get("CODER_STACK_WAKE_SETTINGS") or Path(__file__).with_name(SETTINGS_NAME))
        try:
            mtime = path.stat().st_mtime
            if mtime != self._settings.mtime:
                self._settings = _Settings(mtime, json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            if self._settings.mtime != -2.0:
                LOG.warning("coder_stack_wake: settings %s unreadable (%s); keeping the last ones", path, e)
            self._settings.mtime = -2.0
        return self._settings.data

    # ---------------------------------------------------------------- the hooks LiteLLM calls
    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: str) -> Any:
        s = self.settings()
        alias = data.get("model")
        model = s.get("models", {}).get(alias) if isinstance(alias, str) else None
        if model is None or s.get("enabled") is False:  # off (wake.enabled: false): as if not installed
            return data
        assert isinstance(alias, str)
        v = self._verdicts.get(alias)
        age = time.monotonic() - v.read_at if v else math.inf
        if v and v.serving and age <= STALE_S:
            if age > float(s.get("cache_s", 5)):
                self._refresh_in_background(alias)
            return data
        if not (v and not v.serving and age <= DOWN_CACHE_S):
            v = await self._read(alias) or v
        if v is None or v.serving:
            return data  # serving, or nothing known (the API did not answer): as without the hook
        wake = v.wake or {}
        message, seconds = self._explain(alias, model, v)
        hold_s = float(s.get("hold_s", 20))
        if wake.get("state") == "starting" and seconds <= hold_s and await self._hold(alias, min(hold_s, seconds + 1)):
            return data
        if not wake:
            self._request_wake(alias, model, s)
        return self._answer(data, call_type, model, s, message, seconds)

    async def async_post_call_failure_hook(
        self, request_data: dict, original_exception: Exception, user_api_key_dict: Any, *args: Any, **kwargs: Any
    ) -> None:
        """A call that could not connect: forget the "serving" verdict so the next request reads again."""
        alias = request_data.get("model") if isinstance(request_data, dict) else None
        text = type(original_exception).__name__ + " " + str(getattr(original_exception, "message", ""))
        if isinstance(alias, str) and "connect" in text.lower():
            self._verdicts.pop(alias, None)

    # ---------------------------------------------------------------- deciding and answering
    def _explain(self, alias: str, model: dict[str, Any], v: Verdict) -> tuple[str, int]:
        estimate = v.cold_start_s or float(model.get("cold_start_s", 600))
        wake = v.wake or {}
        if wake.get("state") == "waiting-for-gpu":
            busy = ", ".join(str(b) for b in wake.get("busy") or []) or "another model"
            verb = "are" if len(wake.get("busy") or []) > 1 else "is"
            return (
                f"{alias} waits for the GPU: {busy} {verb} in use; it starts when {busy} has been idle long "
                f"enough to be reclaimed, then needs {_minutes(estimate)} to start. Try again later.",
                int(estimate),
            )
        remaining = estimate
        if wake.get("state") == "starting":
            try:
                ready_by = datetime.fromisoformat(str(wake.get("ready_by")).replace("Z", "+00:00"))
                remaining = max(1.0, (ready_by - _now()).total_seconds())
            except ValueError:
                pass
        return f"{alias} is starting (node, image, weights): ready in {_minutes(remaining)}.", max(1, int(remaining))

    def _answer(
        self, data: dict, call_type: str, model: dict[str, Any], s: dict[str, Any], message: str, seconds: int
    ) -> dict:
        if model.get("fallback"):
            data["model"] = model["fallback"]
            return data
        if model.get("role") == "chat" and call_type in CHAT_CALLS and s.get("chat_as_message"):
            data["mock_response"] = message
            return data
        raise Unavailable(message, seconds)

    async def _hold(self, alias: str, budget_s: float) -> bool:
        """Wait (bounded) for a model about to be ready; True once it serves."""
        deadline = time.monotonic() + budget_s
        while time.monotonic() < deadline:
            await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
            v = await self._read(alias)
            if v and v.serving:
                return True
        return False

    # ---------------------------------------------------------------- the Kubernetes read (coalesced)
    def _refresh_in_background(self, alias: str) -> None:
        self._start_read(alias)

    def _start_read(self, alias: str) -> asyncio.Task[Verdict | None]:
        """The Deployment read in flight for this alias, started if there is none: concurrent callers share it."""
        task = self._reads.get(alias)
        if task is None:
            task = asyncio.ensure_future(self._read_once(alias))
            self._reads[alias] = task
            task.add_done_callback(lambda _t: self._reads.pop(alias, None))
            self._keep(task)
        return task

    async def _read(self, alias: str) -> Verdict | None:
        return await asyncio.shield(self._start_read(alias))

    async def _read_once(self, alias: str) -> Verdict | None:
        s = self.settings()
        model = s.get("models", {}).get(alias) or {}
        k = s.get("kubernetes") or {}
        base = k.get("url") or f"https://{ENV.get('KUBERNETES_SERVICE_HOST')}:{ENV.get('KUBERNETES_SERVICE_PORT')}"
        path = f"/apis/apps/v1/namespaces/{s.get('namespace', 'serving')}/deployments/{model.get('deployment', alias)}"
        headers = {}
        token = self._file(k.get("token_file"))
        if token:
            headers["Authorization"] = f"Bearer {token.strip()}"
        try:
            client = self._client(base, k.get("ca_file") if base.startswith("https") else None)
            r = await client.get(base.rstrip("/") + path, headers=headers)
            r.raise_for_status()
            d = r.json()
        except (httpx.HTTPError, ValueError) as e:
            LOG.warning("coder_stack_wake: could not read the Deployment of %s (%s)", alias, type(e).__name__)
            return None
        notes = (d.get("metadata") or {}).get("annotations") or {}
        wake = None
        try:
            wake = json.loads(notes[WAKE_ANNOTATION]) if WAKE_ANNOTATION in notes else None
        except ValueError:
            wake = None
        try:
            cold = float(notes[COLD_START_ANNOTATION]) if COLD_START_ANNOTATION in notes else None
        except ValueError:
            cold = None
        ready = int((d.get("status") or {}).get("readyReplicas") or 0)
        v = Verdict(ready >= 1, time.monotonic(), wake if isinstance(wake, dict) else None, cold)
        self._verdicts[alias] = v
        return v

    def _file(self, name: str | None) -> str | None:
        if not name:
            return None
        try:
            return Path(ROOT, str(name).lstrip("/")).read_text()
        except OSError:
            return None

    def _client(self, base: str, ca_file: str | None) -> httpx.AsyncClient:
        key = (base, ca_file, id(asyncio.get_running_loop()))
        client = self._clients.get(key)
        if client is None:
            verify: ssl.SSLContext | bool = True
            if ca_file:
                verify = ssl.create_default_context(cafile=str(Path(ROOT, ca_file.lstrip("/"))))
            client = httpx.AsyncClient(timeout=TIMEOUT_S, verify=verify, transport=TRANSPORT)
            self._clients[key] = client
        return client

    # ---------------------------------------------------------------- the event
    def _request_wake(self, alias: str, model: dict[str, Any], s: dict[str, Any]) -> None:
        now = time.monotonic()
        last = self._last_event.get(alias)
        if last is not None and now - last < float(s.get("burst_s", 120)):
            return
        self._last_event[alias] = now
        self._keep(asyncio.ensure_future(self._post_event(alias, model, s)))

    async def _post_event(self, alias: str, model: dict[str, Any], s: dict[str, Any]) -> None:
        name = str(model.get("deployment", alias))
        event = {
            "id": str(uuid.uuid4()),
            "occurred": _now().isoformat(),
            "event": "coder-stack.model.wake-requested",
            "resource": {
                "prefect.resource.id": f"coder-stack.model.{name}",
                "prefect.resource.name": name,
                "coder-stack.alias": alias,
            },
            "payload": {"alias": alias, "route": str(model.get("role", "chat")), "reason": "not serving: 0 replicas"},
        }
        headers = {}
        auth = ENV.get(str(s.get("prefect_auth_env") or "PREFECT_API_AUTH_STRING"))
        if auth:
            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        url = str(s.get("prefect_api_url", "")).rstrip("/") + "/events"
        for attempt in range(EVENT_TRIES):
            try:
                r = await self._client(url, None).post(url, json=[event], headers=headers, timeout=EVENT_TIMEOUT_S)
                r.raise_for_status()
                LOG.info("coder_stack_wake: asked Prefect to wake %s", alias)
                return
            except httpx.HTTPError as e:
                LOG.warning(
                    "coder_stack_wake: Prefect did not take the wake of %s (%s, try %d of %d)",
                    alias, type(e).__name__, attempt + 1, EVENT_TRIES,
                )  # fmt: skip
                if attempt + 1 < EVENT_TRIES:
                    await asyncio.sleep(EVENT_BACKOFF_S * (attempt + 1))
        burst = float(s.get("burst_s", 120))
        self._last_event[alias] = time.monotonic() - burst + min(EVENT_RETRY_S, burst)

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the background reads and events (tests and an orderly shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


wake_on_demand = WakeOnDemand()
