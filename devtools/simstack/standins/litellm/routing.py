"""A data-plane call (chat, completions/FIM, embeddings) routed to a vLLM backend: scope, budget and model
checks, the request as the backend gets it, the call upstream, and the ``/health`` probe of every model."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from simstack.standins._server import bump, json_response, read_json
from simstack.standins.litellm import callbacks, models, reshape, spend
from simstack.standins.litellm.auth import Caller, key_models
from simstack.standins.litellm.errors import ProxyError, connection_error, upstream_error
from simstack.standins.litellm.shape import now

if TYPE_CHECKING:
    from simstack.standins.litellm.models import Deployment
    from simstack.standins.litellm.state import ProxyState

ACCESS_DENIED = (
    "The requested model '{model}' is not available for this API key, or the model name is invalid. "
    "Check the models available to you and try again."
)


def _router_error(st: ProxyState, caller: Caller, message: str, param: str | None, echo: bool) -> ProxyError:
    """Recorded (chat-ghost, chat-missing-messages): router 400s carry call-id, cost 0, key spend."""
    err = ProxyError(400, message, "invalid_request_error", param)
    err.extra = {"provider_specific_fields": {"error": message}} if echo else {}
    err.headers = {"x-litellm-call-id": str(uuid.uuid4()), "x-litellm-response-cost": "0"}
    rec = st.db["keys"].get(caller.token or "") or {}
    if rec.get("max_budget") is not None:
        err.headers["x-litellm-key-max-budget"] = str(float(rec["max_budget"]))
    err.headers["x-litellm-key-spend"] = "0.0"
    return err


async def forward(st: ProxyState, request: web.Request, caller: Caller, route: str) -> web.StreamResponse:
    """A data-plane call of ``caller`` on ``route`` (``/chat/completions``, ``/completions``, ``/embeddings``)."""
    started = now()
    ua = request.headers.get("User-Agent", "")
    try:
        body = await read_json(request)
    except ValueError as e:
        raise ProxyError(400, f"Invalid request body: {e}", "bad_request_error") from e  # GUESS
    if not isinstance(body, dict):
        raise ProxyError(400, "Invalid request body: expected a JSON object", "bad_request_error")  # GUESS
    model = body.get("model")
    scope = key_models(st, caller)
    if not caller.is_master and scope is not None and model not in scope:
        # recorded (chat-out-of-scope, chat-unknown-model): 403 for anything outside the scope, and
        # the refusal is logged as a failed call of the key
        err = ProxyError(403, ACCESS_DENIED.format(model=model), "key_model_access_denied", "model")
        dep = models.pick(st, str(model)) if isinstance(model, str) else None
        spend.record(st, caller, dep, None, route, model=str(model), error=err, started=started, user_agent=ua)
        raise await auth_failure(st, request, route, err, caller, body)
    # GUESS: the order scope -> budget -> unknown model is recorded only pairwise (an over-budget key calling
    # a model it lacks, or an alias the gateway lacks, was not recorded)
    try:
        spend.check_budget(st, caller)
    except ProxyError as err:
        raise await auth_failure(st, request, route, err, caller, body) from None
    cbs = st.callbacks
    if not cbs.instances:
        return await _route(st, request, caller, route, body, model, ua, started)
    # callbacks.py: the pre-call hook after the key's checks, before the router; the failure hook on any failure
    auth = callbacks.user_api_key_auth(caller.token, st.db["keys"].get(caller.token or ""), body, request.path)
    data = callbacks.request_data(body, route, dict(request.headers))
    call_id = str(data["litellm_call_id"])
    try:
        data = await cbs.pre_call(auth, data, CALL_TYPES[route])
    except Exception as e:
        replaced = await cbs.failure(auth, data, e)
        raise callbacks.hook_error(replaced or e, route, call_id) from e
    new_body = callbacks.strip_added(data, body)
    try:
        return await _route(st, request, caller, route, new_body, model, ua, started)
    except ProxyError as err:
        target = new_body.get("model")
        replaced = await cbs.failure(auth, data, callbacks.failure_exception(err, str(target)))
        if replaced is not None:
            raise callbacks.hook_error(replaced, route, call_id) from err
        raise


async def auth_failure(
    st: ProxyState,
    request: web.Request,
    route: str,
    err: ProxyError,
    caller: Caller | None,
    body: dict[str, Any] | None = None,
) -> ProxyError:
    """A call refused by the key's checks (authentication, model scope, budget): the callbacks' failure hooks run
    as LiteLLM's auth exception handler runs them (read in 1.108.7's ``auth/auth_exception_handler.py``), and an
    ``HTTPException`` one returns replaces the error. GUESS: the ``user_api_key_dict`` of an unauthenticated call
    (only the route is set here; never the key)."""
    cbs = st.callbacks
    if not cbs.instances:
        return err
    if body is None:
        try:
            parsed = await read_json(request)
        except ValueError:
            parsed = {}
        body = parsed if isinstance(parsed, dict) else {}
    if caller is None:
        auth = callbacks.UserAPIKeyAuth(request_route=request.path)
    else:
        auth = callbacks.user_api_key_auth(caller.token, st.db["keys"].get(caller.token or ""), body, request.path)
    replaced = await cbs.failure(auth, dict(body), callbacks.ProxyCallError(err))
    if replaced is None:
        return err
    return callbacks.hook_error(replaced, route, str(uuid.uuid4()))


CALL_TYPES = {"/chat/completions": "acompletion", "/completions": "atext_completion", "/embeddings": "aembedding"}


async def _route(
    st: ProxyState,
    request: web.Request,
    caller: Caller,
    route: str,
    body: dict[str, Any],
    asked: Any,
    ua: str,
    started: dt.datetime,
) -> web.StreamResponse:
    """The router: ``body["model"]`` (a callback may have changed it) to a deployment; the answer names the alias
    the client asked for (``asked``; observed on 1.108.7 for a callback's reroute: ``model`` is the asked alias,
    ``x-litellm-model-group`` the one that served)."""
    model = body.get("model")
    known = models.model_names(st)
    if not isinstance(model, str) or model not in known:
        msg = (
            f"{route}: Invalid model name passed in model={model}. Call `/v1/models` to view available models "
            "for your key."
        )
        raise _router_error(st, caller, msg, None, echo=True)
    if route == "/chat/completions" and "messages" not in body:
        raise _router_error(st, caller, f"{route}: Missing required parameter: 'messages'.", "messages", False)
    dep = models.pick(st, model)
    assert dep is not None
    alias = asked if isinstance(asked, str) else model
    bump(st.services.counters, f"litellm:upstream:{model}")
    bump(st.services.counters, f"litellm:deployment:{dep.model_id}")
    stream = bool(body.get("stream")) and route != "/embeddings"
    mock = body.get("mock_response")
    if not isinstance(mock, str):
        # recorded (hook-fallback): a config model with ``mock_response`` in its litellm_params is answered by
        # LiteLLM itself too (nothing sent to its api_base), as a request's own; GUESS: the request's wins over
        # the model's when both are set (not observed)
        mock = dep.litellm_params.get("mock_response")
    if isinstance(mock, str) and route != "/embeddings":
        # observed: a callback's mock_response is answered by LiteLLM itself, usage 10/20
        # GUESS: the mocked usage is charged at the alias's prices (not checked on the real proxy)
        spend.record(st, caller, dep, callbacks.MOCK_USAGE, route, started=started, user_agent=ua, stream=stream)
        hdrs = reshape.headers(st, caller, dep, callbacks.MOCK_USAGE, started, route, stream=stream)
        if not stream:
            return json_response(callbacks.mock_answer(mock, alias, route), headers=hdrs)
        sse = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8"} | hdrs)
        await sse.prepare(request)
        for chunk in callbacks.mock_chunks(mock, alias, route):
            await sse.write(f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode())
        await sse.write(b"data: [DONE]\n\n")
        await sse.write_eof()
        return sse
    upstream_body = dict(body)
    upstream_body["model"] = dep.served_name
    upstream_route = route
    text_model = dep.provider == "text-completion-openai"
    if text_model and route == "/chat/completions":
        # recorded (fim-via-chat): a text-completion model on the chat route gets the messages' content
        # as the raw prompt; the completion comes back as message.content
        upstream_body.pop("messages", None)
        upstream_body["prompt"] = "".join(
            str(m.get("content") or "") for m in body.get("messages") or [] if isinstance(m, dict)
        )
        upstream_route = "/completions"
    url = _upstream_url(st, dep, upstream_route)
    if url is None:
        raise connection_error(model)
    headers = {"Content-Type": "application/json"}
    if dep.litellm_params.get("api_key"):
        headers["Authorization"] = f"Bearer {dep.litellm_params['api_key']}"
    assert st.session is not None
    if stream and route == "/chat/completions" and not text_model:
        upstream_body["stream_options"] = {"include_usage": True}  # LiteLLM meters chat streams itself
    try:
        resp = await st.session.post(url, data=json.dumps(upstream_body), headers=headers)
    except (aiohttp.ClientError, OSError) as e:
        raise connection_error(model) from e
    try:
        if resp.status >= 400:
            text = await resp.text()
            raise upstream_error(resp.status, text, model)
        if stream:
            return await reshape.relay_stream(st, request, resp, caller, dep, body, route, started, ua, alias)
        try:
            payload = await resp.json(content_type=None)
        except (json.JSONDecodeError, aiohttp.ContentTypeError) as e:
            raise ProxyError(  # GUESS
                500, f"litellm.APIError: APIError: OpenAIException - invalid JSON from upstream: {e}", None, None
            ) from e
    except (aiohttp.ClientError, OSError) as e:
        raise connection_error(model) from e
    finally:
        resp.release()
    usage = payload.get("usage") if isinstance(payload, dict) else None
    spend.record(st, caller, dep, usage, route, started=started, request_id=payload.get("id"), user_agent=ua)
    out = reshape.reshape(payload, alias, route, text_model)
    return json_response(out, headers=reshape.headers(st, caller, dep, usage, started, route))


def _upstream_url(st: ProxyState, dep: Deployment, route: str) -> str | None:
    base = str(dep.litellm_params.get("api_base") or "https://api.openai.com/v1").rstrip("/")
    return st.services.resolve_url(base + route)


async def _upstream_json(st: ProxyState, dep: Deployment, route: str, body: dict[str, Any]) -> tuple[int, Any]:
    url = _upstream_url(st, dep, route)
    if url is None:
        raise aiohttp.ClientConnectionError("Connection error.")
    headers = {}
    if dep.litellm_params.get("api_key"):
        headers["Authorization"] = f"Bearer {dep.litellm_params['api_key']}"
    assert st.session is not None
    async with st.session.post(url, json=body, headers=headers) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except json.JSONDecodeError:
            return resp.status, text


async def health(st: ProxyState) -> dict[str, Any]:
    """/health: one tiny call to every deployment."""
    # GUESS: /health (which calls every model) was not recorded; its shape is from LiteLLM's docs
    healthy, unhealthy = [], []
    for dep in models.deployments(st):
        mode = dep.model_info.get("mode", "chat")
        path: str
        body: dict[str, Any]
        if mode == "embedding":
            path, body = "/embeddings", {"model": dep.served_name, "input": ["test"]}
        else:
            path, body = (
                "/chat/completions",
                {
                    "model": dep.served_name,
                    "messages": [{"role": "user", "content": "ping"}],
                    "max_tokens": 1,
                },
            )
        entry = dep.public()["litellm_params"] | {"model_id": dep.model_id}
        try:
            status, resp = await _upstream_json(st, dep, path, body)
        except aiohttp.ClientError as e:
            unhealthy.append(entry | {"error": f"litellm.APIConnectionError: {e}"})
            continue
        if status < 400:
            healthy.append(entry)
        else:
            unhealthy.append(entry | {"error": f"Error code: {status} - {resp}"})
    return {
        "healthy_endpoints": healthy,
        "unhealthy_endpoints": unhealthy,
        "healthy_count": len(healthy),
        "unhealthy_count": len(unhealthy),
    }
