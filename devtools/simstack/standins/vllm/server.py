"""The HTTP server: ``VllmServer`` (routes, auth, request checks, the chat, completions and embeddings answers
and their streams, the accounting in ``/metrics``), ``embed_vector``, and ``start_vllm``, registered in
``FACTORIES`` for the image."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiohttp import web

from simstack.standins import FACTORIES, ContainerRun, RunningBackend, SimServices
from simstack.standins._server import Handler, bearer_token, counting_middleware, json_response, serve
from simstack.standins.vllm.config import VllmConfig, parse_args
from simstack.standins.vllm.errors import VllmError, _input_repr, validation_error
from simstack.standins.vllm.metrics import _HISTOGRAMS_TIMED, Metrics
from simstack.standins.vllm.recorded import (
    _after_tool_result,
    _norm_messages,
    after_recorded,
    continue_recorded,
    recorded_answers,
)
from simstack.standins.vllm.template import chat_prompt_text
from simstack.standins.vllm.text import (
    Generation,
    _hex16,
    _stop_list,
    _text_of,
    chat_answer,
    completion_stream,
    count_tokens,
    generate,
    tokenize,
    tokens_of,
)
from simstack.standins.vllm.tools import pick_tool, tool_call

IMAGE = "vllm/vllm-openai"
VERSION = "0.32.0"
EMBED_DIM = 384


class VllmServer:
    def __init__(self, cfg: VllmConfig, run: ContainerRun, services: SimServices) -> None:
        self.cfg = cfg
        self.run = run
        self.services = services
        self.metrics = Metrics()
        self.created = int(time.time())
        # GUESS: a constant per configuration (the recording shows one value, vllm-0.32.0-c3c853d5).
        digest = hashlib.sha256(json.dumps([cfg.model, cfg.served_names, cfg.max_model_len]).encode()).hexdigest()
        self.fingerprint = f"vllm-{VERSION}-{digest[:8]}"

    # ---- app
    def app(self) -> web.Application:
        names = [self.run.app or "vllm"]
        if "vllm" not in names:
            names.append("vllm")
        app = web.Application(
            middlewares=[counting_middleware(self.services.counters, names), self._auth],
            client_max_size=64 * 1024 * 1024,
        )
        app.router.add_get("/health", self.health)
        app.router.add_get("/ping", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics_route)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Only /v1/* needs the key (health-noauth, version, metrics are open); 401 body is a bare string.
        if self.cfg.api_key and request.path.startswith("/v1") and request.method != "OPTIONS":
            token = bearer_token(request)
            if token is None or not secrets.compare_digest(token, self.cfg.api_key):
                return json_response({"error": "Unauthorized"}, status=401)
        try:
            return await handler(request)
        except VllmError as e:
            return e.response()

    # ---- open routes
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)  # empty body, no content-type (health-noauth)

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": VERSION})

    async def metrics_route(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(self.cfg.name).encode(),
            headers={"Content-Type": "text/plain; version=1.0.0; charset=utf-8"},
        )

    # ---- /v1
    async def models(self, request: web.Request) -> web.Response:
        now = int(time.time())  # GUESS: the recording's "created" equals the clock at the request
        data = [
            {
                "id": name,
                "object": "model",
                "created": now,
                "owned_by": "vllm",
                "root": self.cfg.model,
                "parent": None,
                "max_model_len": self.cfg.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{_hex16()}",
                        "object": "model_permission",
                        "created": now,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for name in self.cfg.served_names
        ]
        return json_response({"object": "list", "data": data})

    async def _body(self, request: web.Request, required: tuple[str, ...] = ()) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            # GUESS: an empty body is a missing body
            raise validation_error([{"type": "missing", "loc": "body", "msg": "Field required", "input": None}])
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            pos = e.pos if isinstance(e, json.JSONDecodeError) else e.start
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "Invalid UTF-8"
            raise validation_error(
                [
                    {
                        "type": "json_invalid",
                        "loc": f"body.{pos}",
                        "msg": "JSON decode error",
                        "input": _input_repr({}),
                        "ctx": {"error": msg},
                    }
                ]
            ) from e
        if not isinstance(body, dict):
            # GUESS: pydantic's model_type error
            raise validation_error(
                [
                    {
                        "type": "model_attributes_type",
                        "loc": "body",
                        "msg": "Input should be a valid dictionary or object to extract fields from",
                        "input": _input_repr(body),
                    }
                ]
            )
        missing = [k for k in required if k not in body]
        if missing:
            raise validation_error(
                [
                    {"type": "missing", "loc": f"body.{k}", "msg": "Field required", "input": _input_repr(body)}
                    for k in missing
                ]
            )
        return body

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model not in self.cfg.served_names:
            raise VllmError(
                404,
                f"The model `{model}` does not exist. Valid aliases: {', '.join(self.cfg.served_names)}.",
                "NotFoundError",
                "model",
            )

    def _max_tokens(self, body: dict[str, Any], prompt_tokens: int, default: int | None) -> int:
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        value = body.get(key)
        if value is None:
            value = default if default is not None else self.cfg.max_model_len - prompt_tokens
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise VllmError(400, f"max_tokens must be at least 1, got {value}.", param=key)  # GUESS: message
        if value > self.cfg.max_model_len:  # err-max-tokens-100000, err-completions-max-tokens-100000
            raise VllmError(
                400,
                f"max_tokens={value} cannot be greater than max_model_len={self.cfg.max_model_len}. Please request "
                f"fewer output tokens. (parameter=max_tokens, value={value})",
                param="max_tokens",
            )
        if prompt_tokens + value > self.cfg.max_model_len:
            # GUESS: the message of the prompt-plus-completion check (not recorded)
            raise VllmError(
                400,
                f"This model's maximum context length is {self.cfg.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + value} tokens ({prompt_tokens} in the messages, {value} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="max_tokens",
            )
        return value

    async def _decode_pause(self) -> None:
        """Between streamed tokens: the configured decode time (SimServices.vllm_decode_s), else a yield."""
        await asyncio.sleep(max(0.0, self.services.vllm_decode_s) * self.services.time_scale)

    def _account(
        self, prompt_tokens: int, gen: Generation | None, completion_tokens: int, finish: str, t0: float, body: Any
    ) -> None:
        """Count one finished request in /metrics."""
        m = self.metrics
        m.prompt_tokens += prompt_tokens
        m.generation_tokens += completion_tokens
        key = finish if finish in m.success else "stop"
        m.success[key] = m.success.get(key, 0) + 1
        elapsed = time.monotonic() - t0
        m.observe("request_prompt_tokens", prompt_tokens)
        m.observe("request_prefill_kv_computed_tokens", prompt_tokens)
        m.observe("request_generation_tokens", completion_tokens)
        m.observe("request_max_num_generation_tokens", completion_tokens)
        m.observe("request_params_n", int(body.get("n") or 1) if isinstance(body, dict) else 1)
        max_tokens = body.get("max_tokens") if isinstance(body, dict) else None
        if isinstance(max_tokens, int):
            m.observe("request_params_max_tokens", max_tokens)
        m.observe("request_num_preemptions", 0)
        m.observe("request_queue_time_seconds", 0.0)
        m.observe("time_to_first_token_seconds", elapsed)
        m.observe("request_prefill_time_seconds", elapsed)
        for name in _HISTOGRAMS_TIMED:
            m.observe(name, elapsed)
        if completion_tokens > 1:
            m.observe("request_time_per_output_token_seconds", 0.0)
            for _ in range(min(completion_tokens - 1, 10000)):
                m.observe("inter_token_latency_seconds", 0.0)

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        }

    def _tool_answer(
        self, body: dict[str, Any], messages: list[dict[str, Any]], tools: list[dict[str, Any]], tool_choice: Any
    ) -> tuple[list[dict[str, Any]], int, str, str | None]:
        """A tool call forced by ``tool_choice`` (required or named): (calls, completion tokens, finish, content)."""
        user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        if isinstance(tool_choice, dict):
            fname = (tool_choice.get("function") or {}).get("name")
            tool = next((t for t in tools if t.get("function", {}).get("name") == fname), None)
            if tool is None:
                raise VllmError(400, f"Tool '{fname}' has not been passed in `tools`.")  # GUESS: message
            call = tool_call(tool, user)
            # GUESS: a named tool call finishes "stop" with content "" (no recording)
            return [call], count_tokens(call["function"]["arguments"]) + 1, "stop", ""
        rec = recorded_answers().get(("chat", _norm_messages(messages), "required"))
        if rec is not None and rec.call is not None and rec.call_tokens is not None:
            name, arguments = rec.call  # tools-required, tool-loop-required
            call = {
                "id": f"chatcmpl-tool-{_hex16()}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            return [call], rec.call_tokens, "tool_calls", ""
        call = tool_call(pick_tool(tools, user), user)
        # GUESS: guided decoding writes [{"name": ..., "parameters": {...}}] and EOS; recorded calls are 25
        # tokens for {"city": "Paris"}, this count gives 17 for it.
        guided = json.dumps(
            [{"name": call["function"]["name"], "parameters": json.loads(call["function"]["arguments"])}]
        )
        return [call], count_tokens(guided) + 1, "tool_calls", ""

    def _text_tokens(self, body: dict[str, Any], messages: list[dict[str, Any]], mode: str) -> Iterator[str]:
        """The model's tokens for a prompt answered in text (EOS = the iterator ends)."""
        rec = recorded_answers().get(("chat", _norm_messages(messages), mode))
        if rec is not None and rec.call is None:
            return continue_recorded(rec, after_recorded("chat", "", "".join(rec.tokens)))
        tools = body.get("tools") or []
        user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        last_user_idx = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        after_user = messages[last_user_idx + 1 :]
        if any(m.get("role") == "tool" for m in after_user):
            return tokens_of(_after_tool_result(user, after_user))
        if mode == "auto" and tools:
            call = tool_call(pick_tool(tools, user), user)
            # Qwen2.5-Coder writes the call as bare JSON, no <tool_call> tags: the parser finds nothing and
            # it is the content, finish "stop" (tools-auto).
            plain = json.dumps(
                {"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])},
                ensure_ascii=False,
            )
            return iter(tokenize(plain))
        return tokens_of(chat_answer(messages))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        if self.cfg.embed:
            raise VllmError(400, "The model does not support Chat Completions API")  # GUESS: message
        body = await self._body(request, required=("messages",))
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            # GUESS: pydantic's list error for messages
            raise validation_error(
                [
                    {
                        "type": "list_type",
                        "loc": "body.messages",
                        "msg": "Input should be a valid list",
                        "input": _input_repr(messages),
                    }
                ]
            )
        self._check_model(body)
        model = self.cfg.name  # every answer names the FIRST served name (all recorded answers)
        tools = body.get("tools") or []
        prompt_tokens = count_tokens(chat_prompt_text(messages, tools))
        max_tokens = self._max_tokens(body, prompt_tokens, None)
        stop = _stop_list(body.get("stop"))
        n = int(body.get("n") or 1)

        tool_choice = body.get("tool_choice")
        if tools and tool_choice is None:
            tool_choice = "auto"
        if tool_choice is None:
            tool_choice = "none"
        if tool_choice == "auto" and tools and not (self.cfg.auto_tool_choice and self.cfg.tool_call_parser):
            raise VllmError(
                400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
            )  # GUESS: message (from vLLM's source, not recorded)
        if tool_choice not in ("none", "auto", "required") and not isinstance(tool_choice, dict):
            raise VllmError(400, f"Invalid value for tool_choice: {tool_choice!r}")  # GUESS: message
        if tool_choice == "required" and not tools:
            raise VllmError(400, "When using `tool_choice`, `tools` must be set.")  # GUESS: message

        last_user_idx = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        has_tool_result = any(m.get("role") == "tool" for m in messages[last_user_idx + 1 :])
        calls: list[dict[str, Any]] = []
        gen: Generation | None = None
        content: str | None
        if tools and (tool_choice == "required" or isinstance(tool_choice, dict)):
            calls, completion_tokens, finish, content = self._tool_answer(body, messages, tools, tool_choice)
            stop_reason: str | None = None
        elif tool_choice == "auto" and tools and not has_tool_result and not self.services.vllm_auto_tool_habit:
            # Hook: a model that uses the hermes tags gets a proper call. GUESS: content None, finish tool_calls.
            user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
            calls = [tool_call(pick_tool(tools, user), user)]
            completion_tokens, finish, content, stop_reason = (
                count_tokens(calls[0]["function"]["arguments"]) + 5,
                "tool_calls",
                None,
                None,
            )
        else:
            mode = "auto" if tools and tool_choice == "auto" else "none"
            gen = generate(
                self._text_tokens(body, messages, mode), max_tokens, stop, bool(body.get("include_stop_str_in_output"))
            )
            content, finish, stop_reason, completion_tokens = (
                gen.text,
                gen.finish_reason,
                gen.stop_reason,
                gen.completion_tokens,
            )

        rid = f"chatcmpl-{_hex16()}"
        created = int(time.time())
        if tools and self.cfg.tool_call_parser and tool_choice == "auto":
            mode_key = "streaming" if body.get("stream") else "non_streaming"
            outcome = "tool_call" if calls else "no_tool_call"
            steps = (len(gen.deltas) if gen else 2 + len(calls)) if body.get("stream") else n
            self.metrics.tool_parser[(mode_key, outcome)] = self.metrics.tool_parser.get((mode_key, outcome), 0) + steps
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream_chat(
                request, rid, created, model, n, gen, calls, finish, prompt_tokens, completion_tokens, include_usage,
                t0, body,
            )  # fmt: skip
        self._account(prompt_tokens, gen, completion_tokens * n, finish, t0, body)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
        }
        if calls:
            message["tool_calls"] = calls  # absent, not [], when there are none (chat-hi)
        message["reasoning"] = None
        return json_response(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": i,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": stop_reason,
                        "token_ids": None,
                        "routed_experts": None,
                    }
                    for i in range(n)
                ],
                "service_tier": None,
                "system_fingerprint": self.fingerprint,
                "usage": self._usage(prompt_tokens, completion_tokens * n),
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "prompt_text": None,
                "kv_transfer_params": None,
                "ec_transfer_params": None,
                "metrics": None,
            }
        )

    async def _sse(self, request: web.Request, events: AsyncIterator[dict[str, Any]]) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        self.metrics.running += 1
        try:
            async for ev in events:
                await resp.write(f"data: {json.dumps(ev, ensure_ascii=False, separators=(',', ':'))}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        finally:
            self.metrics.running -= 1
        await resp.write_eof()
        return resp

    async def _stream_chat(
        self,
        request: web.Request,
        rid: str,
        created: int,
        model: str,
        n: int,
        gen: Generation | None,
        calls: list[dict[str, Any]],
        finish: str,
        prompt_tokens: int,
        completion_tokens: int,
        include_usage: bool,
        t0: float,
        body: dict[str, Any],
    ) -> web.StreamResponse:
        """Chunks as chat-reverse-stream(-usage) and tools-required-stream show them."""

        def chunk(choice: dict[str, Any], **top: Any) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [choice], **top}  # fmt: skip

        def step(i: int, delta: dict[str, Any], last: bool, stop_reason: str | None = None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
            if last:
                choice["finish_reason"] = finish
                choice["stop_reason"] = stop_reason
            choice["token_ids"] = None
            # system_fingerprint rides on the stream's last chunk: the usage chunk if there is one.
            fp = {"system_fingerprint": self.fingerprint} if last and i == n - 1 and not include_usage else {}
            return chunk(choice, **fp)

        async def events() -> AsyncIterator[dict[str, Any]]:
            try:
                for i in range(n):
                    first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}  # fmt: skip
                    yield chunk(first, prompt_token_ids=None, prompt_text=None)
                for i in range(n):
                    if calls:
                        for j, c in enumerate(calls):
                            head = {
                                "id": c["id"],
                                "type": "function",
                                "index": j,
                                "function": {"name": c["function"]["name"]},
                            }
                            yield step(i, {"content": None, "tool_calls": [head]}, False)
                            for piece in tokenize(c["function"]["arguments"]):
                                yield step(
                                    i,
                                    {"content": None, "tool_calls": [{"index": j, "function": {"arguments": piece}}]},
                                    False,
                                )
                                await asyncio.sleep(0)
                        yield step(i, {}, True)
                    else:
                        assert gen is not None
                        for k, delta in enumerate(gen.deltas):
                            last = k == len(gen.deltas) - 1
                            yield step(i, {"content": delta}, last, gen.stop_reason if last else None)
                            await self._decode_pause()
                if include_usage:
                    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens * n,
                             "completion_tokens": completion_tokens * n}  # fmt: skip
                    yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": usage, "system_fingerprint": self.fingerprint}  # fmt: skip
                self._account(prompt_tokens, gen, completion_tokens * n, finish, t0, body)
            except (ConnectionResetError, asyncio.CancelledError):
                self.metrics.success["abort"] += 1
                raise

        return await self._sse(request, events())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        if self.cfg.embed:
            raise VllmError(400, "The model does not support Completions API")  # GUESS: message
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            prompts = [" ".join(f"t{p}" for p in prompt)]
        else:
            # GUESS: message
            raise VllmError(400, "Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
        self._check_model(body)
        model = self.cfg.name  # the FIRST served name, whichever was asked for (fim-nostop)
        n = int(body.get("n") or 1)
        stop = _stop_list(body.get("stop"))
        include_stop = bool(body.get("include_stop_str_in_output"))
        prompt_tokens_each = [count_tokens(p) for p in prompts]
        max_tokens = self._max_tokens(body, max(prompt_tokens_each), 16)
        gens = [generate(self._completion_tokens(p), max_tokens, stop, include_stop) for p in prompts]
        prompt_tokens = sum(prompt_tokens_each)
        completion_tokens = sum(g.completion_tokens for g in gens) * n
        rid = f"cmpl-{_hex16()}"
        created = int(time.time())
        echo = bool(body.get("echo"))
        choices = []
        for pi, g in enumerate(gens):
            for k in range(n):
                choices.append((pi * n + k, prompts[pi] if echo else "", g))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            def chunk(idx: int, text: str, g: Generation, last: bool, final: bool) -> dict[str, Any]:
                choice = {"index": idx, "text": text, "logprobs": None,
                          "finish_reason": g.finish_reason if last else None,
                          "stop_reason": g.stop_reason if last else None,
                          "prompt_token_ids": None, "token_ids": None}  # fmt: skip
                fp = {"system_fingerprint": self.fingerprint} if final and not include_usage else {}
                return {"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [choice], **fp}  # fmt: skip

            async def events() -> AsyncIterator[dict[str, Any]]:
                for c, (idx, echoed, g) in enumerate(choices):
                    for j, delta in enumerate(g.deltas):
                        last = j == len(g.deltas) - 1
                        yield chunk(idx, (echoed if j == 0 else "") + delta, g, last, last and c == len(choices) - 1)
                        await self._decode_pause()
                if include_usage:
                    # GUESS: the completions usage chunk is shaped like the recorded chat one
                    yield {
                        "id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                                  "completion_tokens": completion_tokens},
                        "system_fingerprint": self.fingerprint,
                    }  # fmt: skip
                for g in gens:
                    self._account(0, g, g.completion_tokens * n, g.finish_reason, t0, body)
                self.metrics.prompt_tokens += prompt_tokens

            return await self._sse(request, events())
        for g in gens:
            self._account(0, g, g.completion_tokens * n, g.finish_reason, t0, body)
        self.metrics.prompt_tokens += prompt_tokens
        return json_response(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": idx,
                        "text": echoed + g.text,
                        "logprobs": None,
                        "finish_reason": g.finish_reason,
                        "stop_reason": g.stop_reason,
                        "token_ids": None,
                        "prompt_logprobs": None,
                        "prompt_token_ids": None,
                        "routed_experts": None,
                    }
                    for idx, echoed, g in choices
                ],
                "service_tier": None,
                "system_fingerprint": self.fingerprint,
                "usage": self._usage(prompt_tokens, completion_tokens),
                "kv_transfer_params": None,
                "ec_transfer_params": None,
                "metrics": None,
            }
        )

    @staticmethod
    def _completion_tokens(prompt: str) -> Iterator[str]:
        """A raw prompt's tokens: the recorded answer (fim-nostop) and its continuation, else the FIM/code
        model's own; a base model never stops by itself (finish "length")."""
        rec = recorded_answers().get(("completions", prompt, "none"))
        if rec is not None:
            return continue_recorded(rec, after_recorded("completions", prompt, "".join(rec.tokens)))
        return tokens_of(completion_stream(prompt))

    async def embeddings(self, request: web.Request) -> web.Response:
        if not self.cfg.embed:
            raise VllmError(400, "The model does not support Embeddings API")
        body = await self._body(request)
        inp = body.get("input")
        if isinstance(inp, str):
            texts = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(x, str) for x in inp):
            texts = list(inp)
        elif isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
            texts = [" ".join(map(str, inp))]
        elif isinstance(inp, list) and inp and all(isinstance(x, list) for x in inp):
            texts = [" ".join(map(str, x)) for x in inp]
        else:
            raise VllmError(400, "input: Field required (a string or a list of strings)")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise VllmError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}")
        data = []
        for i, t in enumerate(texts):
            vec = embed_vector(t)
            emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if fmt == "base64" else vec
            data.append({"index": i, "object": "embedding", "embedding": emb})
        prompt_tokens = sum(count_tokens(t) + 2 for t in texts)
        self.metrics.prompt_tokens += prompt_tokens
        self.metrics.success["stop"] += len(texts)
        return json_response(
            {
                "id": f"embd-{_hex16()}",  # GUESS: embeddings are not recorded
                "object": "list",
                "created": int(time.time()),
                "model": body.get("model") or self.cfg.name,
                "data": data,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0},
            }
        )


def embed_vector(text: str, dim: int = EMBED_DIM) -> list[float]:
    """Deterministic unit vector from a hash of the text."""
    raw = hashlib.shake_256(text.encode()).digest(dim * 2)
    vals = [(int.from_bytes(raw[2 * i : 2 * i + 2], "little") / 32767.5) - 1.0 for i in range(dim)]
    norm = sum(v * v for v in vals) ** 0.5 or 1.0
    return [v / norm for v in vals]


async def start_vllm(run: ContainerRun, services: SimServices) -> RunningBackend:
    cfg = parse_args(run.args, run.env)
    server = VllmServer(cfg, run, services)
    return await serve(server.app())


FACTORIES[IMAGE] = start_vllm
