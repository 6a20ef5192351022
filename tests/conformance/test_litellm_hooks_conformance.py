"""Conformance of the LiteLLM stand-in's callback support with a real LiteLLM 1.108.7 proxy running the project's
wake hook: every exchange of ``devtools/simstack/recordings/litellm-hooks-1.108.7.jsonl`` replayed, one test each.

Each test starts, of its own (no state carried between exchanges; the hook answers each recorded request the
same way on its first call):

- the fakes of the real-LiteLLM tier (``tests/litellm_proxy/fakes.py``: the Kubernetes API, Prefect's events
  endpoint, an OpenAI-compatible upstream), the fake Kubernetes API showing the exchange's ``setup``;
- the LiteLLM stand-in with the real tier's config (``tests/litellm_proxy/conftest.py`` ``proxy_config``: the same
  aliases, upstream addresses and the ``mock_response`` fallback model) and the **product's** hook,
  ``coder_stack/litellm/wake_hook.py`` mounted as ``coder_stack_wake.py`` beside the config, its settings JSON
  beside it, written as the real tier writes them;

then sends the recorded request and holds the answer to the recording in what the project's clients (Open
WebUI, Tabby, the openai SDK, the flows' smokes) rely on: the status; ``retry-after`` present or absent and its
value; the content type; an error's ``message``, ``type``, ``param``, ``code`` exactly (and no other field); for a
200 the shape (``choices[0].message.content``, ``finish_reason``, ``model``, a stream's chunk texts joined and its
``[DONE]``) and the values the hook decides (the mocked text, the alias in ``model``, the model group that served).

Not compared, each for its reason:
- ids (``id``, ``x-litellm-call-id``, ``x-litellm-model-id``), ``created``, ``elapsed_ms``/``chunk_ms`` and the
  duration headers: per call and per machine;
- the upstream's own text (``pong``) and usage on ``hook-serving-chat``: the fakes' upstream wrote them, not
  LiteLLM or the hook (the same fake answers here, so they are compared anyway, but only as the fake's);
- how a mocked stream is cut into chunks: the text joined is what a client shows;
- the ``x-litellm-*`` cost and version headers: the main LiteLLM conformance (litellm-1.108.7.jsonl) holds them.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from simstack.recordings import Exchange, exchanges
from simstack.standins import ContainerRun, SimServices, start_standin

from tests.litellm_proxy.conftest import WAKE_MODELS, proxy_config
from tests.litellm_proxy.fakes import FakeCluster, serve, settings

HOOKS = "litellm-hooks-1.108.7.jsonl"
EXCHANGES = exchanges(HOOKS)
REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "coder_stack" / "litellm" / "wake_hook.py"
CONF_DIR = "/etc/litellm"
CONF = f"{CONF_DIR}/config.yaml"
FAKES = "http://<fakes>"
# The real tier's test put coder-chat in the waiting model's ``busy`` list (test_wake_hook_real_proxy.py); the
# recorded ``setup`` only says "waiting-for-gpu", the recorded message names the busy model.
BUSY = ["coder-chat"]


def _raw(name: str) -> list[dict[str, Any]]:
    """The recording's lines as written (``Exchange`` does not carry ``setup``)."""
    path = REPO / "devtools" / "simstack" / "recordings" / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


SETUPS = {d["id"]: d.get("setup") for d in _raw(HOOKS)}


def test_every_exchange_has_a_setup_this_replay_understands() -> None:
    """A new recording is either covered or fails here loudly (an unknown setup word, a missing setup)."""
    assert len(EXCHANGES) >= 7 and len({ex.id for ex in EXCHANGES}) == len(EXCHANGES)
    for ex in EXCHANGES:
        setup = SETUPS.get(ex.id)
        assert isinstance(setup, dict), f"{ex.id}: no setup"
        _apply_setup(FakeCluster(), setup)  # raises on anything it cannot reproduce


def _apply_setup(cluster: FakeCluster, setup: dict[str, Any]) -> dict[str, Any]:
    """Show ``setup`` on the fake Kubernetes API; the hook settings it names, returned.

    The grammar the real tier wrote: per alias ``ready N`` then any of ``no wake``, ``wake waiting-for-gpu`` (or
    the bare state), ``cold-start-s SECONDS``, ``fallback ALIAS`` (a hook setting: checked against the tier's);
    a boolean top-level key is a hook setting (``chat_as_message``). A wake state never recorded (``starting``,
    with its ``ready_by``) is refused until a recording shows it."""
    over: dict[str, Any] = {}
    for key, value in setup.items():
        if isinstance(value, bool):
            assert key in ("chat_as_message",), f"unknown setting {key!r} in setup"
            over[key] = value
            continue
        assert key in WAKE_MODELS, f"setup names {key!r}, which the real tier's hook settings do not have"
        ready: int | None = None
        wake: dict[str, Any] | None = None
        cold: float | None = None
        for part in (p.strip() for p in str(value).split(",")):
            if m := re.fullmatch(r"ready (\d+)", part):
                ready = int(m[1])
            elif part == "no wake":
                wake = None
            elif m := re.fullmatch(r"(?:wake )?(waiting-for-gpu)", part):  # the only wake state recorded so far
                wake = {"state": m[1], "run": "r1", "since": "2026-12-07T09:00:00+00:00", "busy": BUSY,
                        "ready_by": None}  # fmt: skip
            elif m := re.fullmatch(r"cold-start-s ([0-9.]+)", part):
                cold = float(m[1])
            elif m := re.fullmatch(r"fallback (\S+)", part):
                assert WAKE_MODELS[key][1] == m[1], f"{key}: the tier's settings fall back to {WAKE_MODELS[key][1]}"
            else:
                raise AssertionError(f"setup of {key}: {part!r} is not understood by this replay")
        assert ready is not None, f"setup of {key}: no 'ready N'"
        cluster.set(key, ready=ready, wake=wake, cold_start_s=cold)
    return over


def _hook_settings(base: str, **over: Any) -> str:
    """As the real tier writes them (conftest.py ``Proxy.write_settings``)."""
    s = settings(base, **over)
    s["models"] = {
        a: {"deployment": a, "role": role, "fallback": fb, "cold_start_s": 600} for a, (role, fb) in WAKE_MODELS.items()
    }
    return json.dumps(s)


@asynccontextmanager
async def _gateway(setup: dict[str, Any]) -> AsyncIterator[tuple[str, str, str, FakeCluster]]:
    cluster = FakeCluster()
    over = _apply_setup(cluster, setup)
    master = "sk-" + secrets.token_hex(16)
    async with serve(cluster) as base:
        run = ContainerRun(
            namespace="litellm",
            pod_name="litellm-0",
            app="litellm",
            image="ghcr.io/berriai/litellm:main-v1.108.7",
            args=["--config", CONF, "--port", "4000"],
            env={"PREFECT_API_AUTH_STRING": "admin:pass"},  # as the tier's proxy had it
            files={
                CONF: yaml.safe_dump(json.loads(proxy_config(master, base))),
                f"{CONF_DIR}/coder_stack_wake.py": HOOK.read_text(),  # the product's module, as shipped
                f"{CONF_DIR}/coder_stack_wake.json": _hook_settings(base, **over),
            },
            container_port=4000,
        )
        # Only the fakes are reachable (the tier's proxy reached them and nothing else: coder-small is a
        # mock_response model and never called api.openai.com).
        services = SimServices(resolve_url=lambda u: u if u.startswith(base) else None, time_scale=0.01)
        gw = await start_standin(run, services)
        assert gw is not None
        try:
            yield f"http://127.0.0.1:{gw.port}", master, base, cluster
        finally:
            await gw.stop()


def _fill(value: Any, base: str) -> Any:
    return json.loads(json.dumps(value).replace(FAKES, base))


@pytest.mark.parametrize("ex", EXCHANGES, ids=[ex.id for ex in EXCHANGES])
async def test_hook_exchange(ex: Exchange) -> None:
    setup = SETUPS[ex.id]
    assert isinstance(setup, dict)
    async with _gateway(setup) as (url, master, base, cluster):
        assert ex.auth == "<master>" and ex.method == "POST" and not ex.request.get("query")
        headers = {"Authorization": f"Bearer {master}"}
        async with (
            httpx.AsyncClient(base_url=url, timeout=30) as c,
            c.stream("POST", ex.path, json=ex.request["body"], headers=headers) as r,
        ):
            raw = [line async for line in r.aiter_lines()]
        # the product's hook decided this answer: it read the alias's Deployment, once (a fresh hook, one request)
        assert cluster.reads == 1
        want_h = ex.response["headers"]
        got_h = {k.lower(): v for k, v in r.headers.items()}
        assert r.status_code == ex.status, "\n".join(raw)[:2000]
        assert got_h.get("retry-after") == want_h.get("retry-after")
        assert got_h.get("content-type") == want_h["content-type"]
        # which model served (the fallback's group, or the asked alias) and what it is to LiteLLM
        for h in ("x-litellm-model-group", "x-litellm-model-name", "x-litellm-model-api-base"):
            assert got_h.get(h) == _fill(want_h.get(h), base), h
        if ex.status >= 400:
            # exactly the recorded error object: message, type, param, code (no provider_specific_fields)
            assert json.loads("\n".join(raw)) == ex.body
        elif ex.is_stream:
            got = [line[len("data: ") :] for line in raw if line.startswith("data: ")]
            assert got[-1] == ex.body[-1] == "[DONE]"
            assert _joined(got[:-1]) == _joined(ex.body[:-1])
            for payload in got[:-1]:
                assert json.loads(payload)["model"] == ex.request["body"]["model"]
        else:
            got_b, want_b = json.loads("\n".join(raw)), ex.body
            assert got_b["object"] == want_b["object"] and got_b["model"] == want_b["model"]
            gc, wc = got_b["choices"][0], want_b["choices"][0]
            # content and role; the message's other fields (refusal, reasoning ...) are what the upstream sent,
            # passed through: the fakes' upstream sends none, vLLM does (the main conformance holds those)
            for k in ("content", "role"):
                assert gc["message"][k] == wc["message"][k], k
            assert gc["finish_reason"] == wc["finish_reason"]
            assert got_b["usage"] == want_b["usage"]


def _joined(payloads: list[str]) -> str:
    return "".join((json.loads(p)["choices"][0]["delta"].get("content") or "") for p in payloads)
