"""Callbacks (``litellm_settings.callbacks``) loaded and called as the real proxy does.

What the real 1.108.7 proxy does, read in its source (``litellm/proxy/common_utils/callback_utils.py``
``initialize_callbacks_on_proxy``, ``litellm/proxy/types_utils/utils.py`` ``get_instance_fn``,
``litellm/proxy/utils.py`` ``ProxyLogging.pre_call_hook`` / ``post_call_failure_hook``) and observed on a real
1.108.7 proxy (master key, config-file models, a probe callback; 2026-12-07):

- ``callbacks`` is a list or a single string; each ``module.instance`` is loaded from the file
  ``<config dir>/<module>.py`` with ``importlib.util.spec_from_file_location`` + ``exec_module``: a module
  object of its own, never put in ``sys.modules``. A module that fails to import, a missing attribute, a class
  instead of an instance, or an object neither a CustomLogger nor callable is an error out of the config load:
  the proxy does not start (read in the source; not run).
- ``async_pre_call_hook(user_api_key_dict=, cache=, data=, call_type=)`` (keywords) runs for every data-plane
  call after authentication and the key's checks (model scope, budget) and before the router (observed: it
  runs for an alias the gateway does not have, which the router then refuses); ``call_type`` is
  ``acompletion`` (chat), ``atext_completion`` (/completions), ``aembedding`` (observed). It is called only
  when the callback's *own class* defines ``async_pre_call_hook`` (``"async_pre_call_hook" in vars(cls)``).
- Its answer: ``None`` → the request as it is; a ``dict`` → replaces the request; a ``str`` → refused
  (``HTTPException(400, {"error": str})`` for these call types); an exception → raised (observed shapes in
  :func:`hook_error`).
- ``async_post_call_failure_hook(request_data=, user_api_key_dict=, original_exception=, traceback_str=)`` runs
  for every failed call: the pre-call hook's own refusal, an unknown alias, an unreachable upstream (observed),
  and a call the key's checks refused (read in the source: the auth exception handler runs it too); its
  exceptions are logged, not raised; an ``HTTPException`` it returns replaces the error.

The module gets the simulated pod around it through its seams (``ENV``, ``ROOT``; see :class:`PodSandbox`).
It runs on the simulator's event loop, not in a process of its own: every task it starts (at import, in a hook,
and the tasks those start) is cancelled when the stand-in stops, as the pod's process would end with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib.util
import logging
import posixpath
import shutil
import tempfile
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException

from simstack.standins.litellm.errors import ProxyError
from simstack.standins.litellm.hostlib import is_proxy_exception, litellm_importable

if TYPE_CHECKING:
    from simstack.standins import ContainerRun, PodAccess

log = logging.getLogger(__name__)

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MASTER_KEY_ALIAS = "litellm_proxy_master_key"  # LITELLM_PROXY_MASTER_KEY_ALIAS: what the master key is shown as
PROXY_ADMIN_ID = "default_user_id"  # litellm_proxy_admin_name (observed as the master key's user_id)
# Keys the proxy adds to a request before the hook (observed: litellm_call_id, litellm_logging_obj, metadata,
# proxy_server_request, secret_fields); the stand-in adds the plain ones and takes them off before routing.
ADDED_KEYS = ("litellm_call_id", "metadata", "proxy_server_request", "secret_fields")


_OWNER: contextvars.ContextVar[set[asyncio.Task[Any]] | None] = contextvars.ContextVar(
    "simstack_litellm_callback_tasks", default=None
)


def _track_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """A task factory on the loop that adds each task started in a callback's context to that callback's set
    (chained with the loop's own factory, installed once)."""
    prev = loop.get_task_factory()
    if getattr(prev, "simstack_litellm_callbacks", False):
        return

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Future[Any]:
        task = prev(loop, coro, **kw) if prev is not None else asyncio.Task(coro, loop=loop, **kw)
        ctx = kw.get("context")
        owned = ctx.get(_OWNER) if ctx is not None else _OWNER.get()
        if owned is not None and isinstance(task, asyncio.Task):
            owned.add(task)
            task.add_done_callback(owned.discard)
        return task

    factory.simstack_litellm_callbacks = True  # type: ignore[attr-defined]
    loop.set_task_factory(factory)  # type: ignore[arg-type]


class CallbackLoadError(Exception):
    """A ``litellm_settings.callbacks`` entry the proxy cannot load: it does not start."""


@dataclass
class UserAPIKeyAuth:
    """The fields of LiteLLM's ``UserAPIKeyAuth`` (``litellm/types/proxy/auth/user_api_key_auth.py`` and its base
    ``LiteLLM_VerificationToken``) that a hook may read. Master key (observed): ``token`` and ``api_key`` are
    ``"litellm_proxy_master_key"``, ``user_id`` ``"default_user_id"``, ``user_role`` ``"proxy_admin"``;
    ``end_user_id`` is the request's ``user``; ``request_route`` the path."""

    token: str | None = None
    api_key: str | None = None
    key_name: str | None = None
    key_alias: str | None = None
    spend: float = 0.0
    max_budget: float | None = None
    models: list[str] = field(default_factory=list)
    user_id: str | None = None
    team_id: str | None = None
    end_user_id: str | None = None
    user_role: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    expires: str | None = None
    blocked: bool | None = None
    request_route: str | None = None
    parent_otel_span: Any = None
    last_refreshed_at: float | None = None

    def model_dump(self) -> dict[str, Any]:
        """Pydantic's ``model_dump`` (the real class is a pydantic model; hooks log it this way)."""
        return {k: v for k, v in self.__dict__.items() if k != "parent_otel_span"}


class DualCache:
    """What the proxy passes as ``cache`` (its ``UserApiKeyCache``, a DualCache): an in-memory key/value cache.
    GUESS: only the get/set methods, in memory, without TTL expiry beyond what the caller asks."""

    def __init__(self) -> None:
        self._d: dict[str, Any] = {}

    def get_cache(self, key: str, **_: Any) -> Any:
        return self._d.get(key)

    def set_cache(self, key: str, value: Any, **_: Any) -> None:
        self._d[key] = value

    async def async_get_cache(self, key: str, **_: Any) -> Any:
        return self._d.get(key)

    async def async_set_cache(self, key: str, value: Any, **_: Any) -> None:
        self._d[key] = value


@dataclass
class PodSandbox:
    """The pod's filesystem as a callback module sees it, under ``root`` (the module's ``ROOT`` seam): the mounted
    files at their paths and, when the simulated cluster gives pods API access, the ServiceAccount token and the
    cluster CA at the in-cluster paths; ``env``: the container's environment plus the ``kubernetes`` Service's
    variables (the module's ``ENV`` seam)."""

    root: Path
    env: dict[str, str]

    @classmethod
    def create(cls, run: ContainerRun, access: PodAccess | None) -> PodSandbox:
        root = Path(tempfile.mkdtemp(prefix=f"coder-sim-litellm-{run.pod_name}-"))
        for path, text in run.files.items():
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        env = dict(run.env)
        if access is not None:
            sa = root / SA_DIR.lstrip("/")
            sa.mkdir(parents=True, exist_ok=True)
            (sa / "token").write_text(access.issue_token(run.namespace, run.service_account))
            shutil.copyfile(access.ca_file, sa / "ca.crt")
            (sa / "namespace").write_text(run.namespace)
            env |= {
                "KUBERNETES_SERVICE_HOST": access.api_host,
                "KUBERNETES_SERVICE_PORT": str(access.api_port),
                "KUBERNETES_SERVICE_PORT_HTTPS": str(access.api_port),
            }
        # else GUESS/sim limit: a sim started without pod API access (SimStack(pod_api=False) and no runnable
        # images) has no TLS listener; the module then finds no KUBERNETES_SERVICE_HOST and no token
        return cls(root, env)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _entries(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    raise CallbackLoadError(f"litellm_settings.callbacks must be a list or a string, not {type(value).__name__}")


def _load_one(entry: str, config_path: str, sandbox: PodSandbox, tasks: set[asyncio.Task[Any]]) -> Any:
    module_name, _, instance_name = entry.rpartition(".")
    if not module_name:
        # GUESS: a bare name is one of LiteLLM's built-in integrations ("prometheus", "langfuse", ...), which the
        # stand-in does not run; it is accepted and ignored
        return None
    rel = posixpath.join(posixpath.dirname(config_path), *module_name.split(".")) + ".py"
    file = sandbox.root / rel.lstrip("/")
    if not file.is_file():
        # The real proxy then tries ``importlib.import_module(module_name)`` from its own environment; the image
        # has no such module. GUESS: the simulated image has none either (the host's modules are not the pod's).
        raise CallbackLoadError(f"Could not import {instance_name} from {module_name}")
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise CallbackLoadError(f"Could not import {instance_name} from {module_name}")
    module = importlib.util.module_from_spec(spec)
    # The seams (contract: module-level ENV and ROOT), set before the module's code runs and again after, so a
    # module that assigns its defaults at import still ends up with the pod's.
    module.ENV = sandbox.env  # type: ignore[attr-defined]
    module.ROOT = str(sandbox.root)  # type: ignore[attr-defined]
    token = _OWNER.set(tasks)
    try:
        with litellm_importable():  # the LiteLLM classes a hook imports from the image (hostlib)
            spec.loader.exec_module(module)
    except ImportError as e:
        raise CallbackLoadError(f"Could not import {instance_name} from {module_name}") from e
    except Exception as e:
        raise CallbackLoadError(f"{entry}: the module failed while loading: {type(e).__name__}: {e}") from e
    finally:
        _OWNER.reset(token)
    module.ENV = sandbox.env  # type: ignore[attr-defined]
    module.ROOT = str(sandbox.root)  # type: ignore[attr-defined]
    if not hasattr(module, instance_name):
        raise CallbackLoadError(f"Could not import {instance_name} from {module_name}")  # GUESS: AttributeError text
    loaded = getattr(module, instance_name)
    if isinstance(loaded, type):
        raise CallbackLoadError(
            f"litellm_settings.callbacks entry '{entry}' resolved to the class {loaded.__module__}."
            f"{loaded.__qualname__}, which is neither a CustomLogger instance nor a callable, so the proxy would "
            "never run it."
        )
    # The real check is ``isinstance(loaded, CustomLogger) or callable(loaded)``. The simulator has no litellm
    # package, so a module falls back to ``object`` as its base; GUESS: an instance whose class defines one of the
    # hooks stands for a CustomLogger.
    if not (_defines(loaded, "async_pre_call_hook") or _defines(loaded, "async_post_call_failure_hook")) and not (
        callable(loaded)
    ):
        raise CallbackLoadError(
            f"litellm_settings.callbacks entry '{entry}' resolved to {type(loaded).__name__} {loaded!r}, which is "
            "neither a CustomLogger instance nor a callable."
        )
    return loaded


def _defines(obj: Any, name: str) -> bool:
    """Whether ``obj``'s class overrides the hook ``name`` (the real proxy looks in ``vars(cls)`` for the pre-call
    hook: a hook inherited from an intermediate class is not called)."""
    return name in vars(type(obj))


@dataclass
class Callbacks:
    """The loaded callbacks of one proxy process."""

    instances: list[Any]
    sandbox: PodSandbox | None
    cache: DualCache = field(default_factory=DualCache)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # every task the callbacks started, still running

    @classmethod
    def none(cls) -> Callbacks:
        return cls([], None)

    @classmethod
    def load(cls, run: ContainerRun, value: Any, config_path: str | None, access: PodAccess | None) -> Callbacks:
        entries = _entries(value)
        if not entries:
            return cls.none()
        if config_path is None:
            # GUESS: without a config file path the real proxy imports by module name from its environment
            raise CallbackLoadError(f"Could not import callbacks {entries}: no config file to load them beside")
        sandbox = PodSandbox.create(run, access)
        tasks: set[asyncio.Task[Any]] = set()
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to track
            _track_tasks(asyncio.get_running_loop())
        try:
            instances = [i for i in (_load_one(e, config_path, sandbox, tasks) for e in entries) if i is not None]
        except BaseException:
            for t in tasks:
                t.cancel()
            sandbox.remove()
            raise
        return cls(instances, sandbox, tasks=tasks)

    def close(self) -> None:
        """The pod's process ends: the callbacks' tasks with it, and the sandbox."""
        for t in list(self.tasks):
            t.cancel()
        if self.sandbox is not None:
            self.sandbox.remove()

    async def pre_call(self, auth: UserAPIKeyAuth, data: dict[str, Any], call_type: str) -> dict[str, Any]:
        """Run every callback's pre-call hook in order; the request as it leaves them. Raises what the hook raises
        (a string answer becomes LiteLLM's ``HTTPException(400, {"error": ...})``)."""
        for cb in self.instances:
            if not _defines(cb, "async_pre_call_hook"):
                continue
            token = _OWNER.set(self.tasks)
            try:
                answer = await cb.async_pre_call_hook(
                    user_api_key_dict=auth, cache=self.cache, data=data, call_type=call_type
                )
            finally:
                _OWNER.reset(token)
            if answer is None:
                continue
            if isinstance(answer, Exception):
                raise answer
            if isinstance(answer, dict):
                data = answer
            elif isinstance(answer, str):
                # process_pre_call_hook_response: "completion"/"text_completion" would raise RejectedRequestError;
                # the proxy's call types (acompletion, atext_completion, aembedding) all get this
                raise HTTPException(status_code=400, detail={"error": answer})
        return data

    async def failure(self, auth: UserAPIKeyAuth, data: dict[str, Any], exc: BaseException) -> HTTPException | None:
        """Run every callback's failure hook; the first ``HTTPException`` one returns replaces the error."""
        replaced: HTTPException | None = None
        tb = "".join(traceback.format_exception(exc))
        for cb in self.instances:
            hook = getattr(cb, "async_post_call_failure_hook", None)
            if hook is None:
                continue
            token = _OWNER.set(self.tasks)
            try:
                result = await hook(request_data=data, user_api_key_dict=auth, original_exception=exc, traceback_str=tb)
            except Exception as e:  # "[Non-Blocking] Error in async_post_call_failure_hook callback"
                log.warning("[Non-Blocking] Error in async_post_call_failure_hook callback: %s", type(e).__name__)
                continue
            finally:
                _OWNER.reset(token)
            if isinstance(result, HTTPException) and replaced is None:
                replaced = result
        return replaced


def request_data(body: dict[str, Any], route: str, headers: dict[str, str]) -> dict[str, Any]:
    """The request as the hook sees it: the body plus what the proxy adds (GUESS: the added values' contents;
    the keys were observed). The caller's key is never in it (LiteLLM drops the Authorization header)."""
    clean = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "x-litellm-api-key", "cookie")}
    return dict(body) | {
        "litellm_call_id": str(uuid.uuid4()),
        "metadata": dict(body.get("metadata") or {}),
        "proxy_server_request": {"url": route, "method": "POST", "headers": clean, "body": dict(body)},
        "secret_fields": {},
    }


def strip_added(data: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """The request as the router forwards it: without the proxy's added keys (a body's own ``metadata`` kept)."""
    out = {k: v for k, v in data.items() if k not in ADDED_KEYS}
    if "metadata" in original:
        out["metadata"] = original["metadata"]
    return out


def hook_error(exc: BaseException, route: str, call_id: str) -> ProxyError:
    """The client's answer when the hook refused the call, as observed on the real 1.108.7 proxy:

    - chat and embeddings: ``HTTPException`` → its status and its headers (``retry-after``), body
      ``{"error": {"message": detail["error"] (or the detail string), "type": "invalid_request_error" below 500,
      else "internal_server_error", "param": null, "code": "<status>", "provider_specific_fields": detail}}`` (no
      ``provider_specific_fields`` for a string detail), headers ``x-litellm-call-id``, ``x-litellm-response-cost:
      0``, ``x-litellm-key-spend: 0.0``; another exception → 500 ``internal_server_error`` with its text.
    - ``/completions``: ``HTTPException`` → its status, **no** ``retry-after``, only ``x-litellm-call-id``, body
      ``{"error": {"message": "<status>: <detail as Python prints it>", "type": "None", "param": "None",
      "code": "<status>"}}``.
    """
    if is_proxy_exception(exc):
        # recorded (hook-down-chat-503, hook-fim-waiting-for-gpu-503): a ProxyException is answered as it is, on
        # every route — its code as the status, its headers (retry-after) kept; chat also gets the cost headers
        p: Any = exc
        status = int(p.code) if str(p.code).isdigit() else 500
        err = ProxyError(status, p.message, p.type, p.param)
        if p.provider_specific_fields:
            err.extra = {"provider_specific_fields": p.provider_specific_fields}
        err.headers = {k.lower(): str(v) for k, v in (p.headers or {}).items()} | {"x-litellm-call-id": call_id}
        if route != "/completions":
            err.headers |= {"x-litellm-response-cost": "0", "x-litellm-key-spend": "0.0"}
        return err
    if route == "/completions":
        if isinstance(exc, HTTPException):
            err = ProxyError(exc.status_code, f"{exc.status_code}: {exc.detail}", "None", "None")
        else:  # GUESS: another exception on /completions was not observed
            err = ProxyError(500, str(exc), "None", "None")
        err.headers = {"x-litellm-call-id": call_id}
        return err
    if isinstance(exc, HTTPException):
        status = exc.status_code
        message, fields = _detail(exc.detail)
        err = ProxyError(status, message, "invalid_request_error" if status < 500 else "internal_server_error", None)
        if status == 401:  # read in the source (_OPENAI_ERROR_TYPE_BY_STATUS); not observed
            err.err_type = "authentication_error"
        elif status == 403:
            err.err_type = "permission_error"
        elif status == 429:
            err.err_type = "rate_limit_error"
        if fields is not None:
            err.extra = {"provider_specific_fields": fields}
        err.headers = {k.lower(): str(v) for k, v in (exc.headers or {}).items()}
    else:
        err = ProxyError(500, str(exc), "internal_server_error", None)
    err.headers |= {"x-litellm-call-id": call_id, "x-litellm-response-cost": "0", "x-litellm-key-spend": "0.0"}
    return err


def _detail(detail: Any) -> tuple[str, dict[str, Any] | None]:
    """serialize_http_exception_detail (read in the source)."""
    import json

    if isinstance(detail, str):
        return detail, None
    if isinstance(detail, dict):
        err = detail.get("error")
        if isinstance(err, str):
            return err, detail
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"], detail
        if isinstance(detail.get("message"), str):
            return detail["message"], detail
        return json.dumps(detail), detail
    return str(detail), None


# ---------------------------------------------------------------------------------------------- what the hook did


class InternalServerError(Exception):
    """What a failure hook gets for an upstream that cannot be reached: observed on 1.108.7 as
    ``litellm.InternalServerError`` with this text. GUESS: the attributes beyond the class name and the message
    (``status_code``, ``model``, ``llm_provider`` are those of LiteLLM's exception classes)."""

    def __init__(self, model: str) -> None:
        self.message = "litellm.InternalServerError: InternalServerError: OpenAIException - Connection error."
        super().__init__(self.message)
        self.status_code = 500
        self.model = model
        self.llm_provider = "openai"


class ProxyCallError(Exception):
    """GUESS: what a failure hook gets for any other failure after the pre-call hook (the real proxy passes
    LiteLLM's own exception classes, e.g. ``ProxyModelNotFoundError`` for an unknown alias, observed by name
    only): an exception carrying the status and the message the client gets."""

    def __init__(self, err: ProxyError) -> None:
        super().__init__(err.message)
        self.message = err.message
        self.status_code = err.status


def failure_exception(err: ProxyError, model: str) -> Exception:
    return InternalServerError(model) if err.connect_failed else ProxyCallError(err)


def user_api_key_auth(
    caller_token: str | None, key_row: dict[str, Any] | None, body: dict[str, Any], path: str
) -> UserAPIKeyAuth:
    """The ``user_api_key_dict`` a hook gets: the master key as observed; a virtual key GUESS (not observable
    without a database): its hash as ``token`` and ``api_key``, its row's alias, scope, spend and budget."""
    end_user = body.get("user") if isinstance(body.get("user"), str) else None
    if caller_token is None:
        return UserAPIKeyAuth(
            token=MASTER_KEY_ALIAS,
            api_key=MASTER_KEY_ALIAS,
            user_id=PROXY_ADMIN_ID,
            user_role="proxy_admin",
            end_user_id=end_user,
            request_route=path,
        )
    row = key_row or {}
    return UserAPIKeyAuth(
        token=caller_token,
        api_key=caller_token,
        key_name=row.get("key_name"),
        key_alias=row.get("key_alias"),
        spend=float(row.get("spend") or 0.0),
        max_budget=row.get("max_budget"),
        models=list(row.get("models") or []),
        user_id=row.get("user_id"),
        team_id=row.get("team_id"),
        metadata=dict(row.get("metadata") or {}),
        expires=row.get("expires"),
        blocked=row.get("blocked"),
        end_user_id=end_user,
        request_route=path,
    )


MOCK_USAGE = {"completion_tokens": 20, "prompt_tokens": 10, "total_tokens": 30}  # observed: mocked usage


def mock_answer(text: str, alias: str, route: str) -> dict[str, Any]:
    """A request whose ``mock_response`` a hook set: LiteLLM answers it itself (observed, chat and /completions)."""
    import time

    rid = f"chatcmpl-{uuid.uuid4()}"
    if route == "/completions":
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": alias,
            "choices": [{"finish_reason": "stop", "index": 0, "text": text, "logprobs": None}],
            "usage": MOCK_USAGE | {"completion_tokens_details": None, "prompt_tokens_details": None},
        }
    return {
        "id": rid,
        "created": int(time.time()),
        "model": alias,
        "object": "chat.completion",
        "choices": [{"finish_reason": "stop", "index": 0, "message": {"content": text, "role": "assistant"}}],
        "usage": dict(MOCK_USAGE),
    }


def mock_chunks(text: str, alias: str, route: str) -> list[dict[str, Any]]:
    """The streamed form (observed for chat): the text in pieces of three characters, the role on the first, an
    empty delta with ``finish_reason: stop`` last, no usage chunk. GUESS: /completions streamed in the same
    pieces as ``text_completion`` chunks (not observed)."""
    import time

    rid = f"chatcmpl-{uuid.uuid4()}"
    created = int(time.time())
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)] or [""]
    if route == "/completions":
        out = [
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": alias,
                "choices": [{"index": 0, "text": p, "finish_reason": None, "logprobs": None}],
            }
            for p in pieces
        ]
        out.append(out[-1] | {"choices": [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}]})
        return out
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": alias}
    out = []
    for i, p in enumerate(pieces):
        delta = {"role": "assistant", "content": p} if i == 0 else {"content": p}
        out.append(head | {"choices": [{"index": 0, "delta": delta}]})
    out.append(head | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return out
