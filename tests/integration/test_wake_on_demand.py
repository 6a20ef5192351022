"""Wake on demand through the simulated gateway, with the product's callback (coder_stack/litellm/wake_hook.py) loaded
by `coder-stack wake-setup --apply` exactly as a user installs it: the LiteLLM stand-in runs it from the files
mounted beside its proxy config, and it reads the models' Deployments with the gateway pod's ServiceAccount.
Prefect is stood in for by an event recorder here (the whole chain, trigger and worker included, is
tests/flows/test_wake_on_demand.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiohttp import web
from simstack.apiserver.rbac import RBACAuthorizer
from simstack.stack import SimStack

from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.kubernetes.workloads import annotate_deployment, scale
from coder_stack.spec import StackSpec
from coder_stack.usecases import wake_setup as ws

ADMIN = "tok-wake-e2e-admin"
WAKE = "coder-stack.io/wake"


class Recorder:
    """Prefect's `POST /api/events`, as far as the callback sees it: 204, and every batch kept."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.raw: list[str] = []
        self.url = ""
        self.delay_s = 0.0  # a busy Prefect server: each POST answered this late

    async def events(self, request: web.Request) -> web.Response:
        text = await request.text()
        await asyncio.sleep(self.delay_s)
        self.raw.append(text + json.dumps(dict(request.headers)))
        self.batches.append(json.loads(text))
        return web.Response(status=204)


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    app = web.Application()
    app.router.add_post("/api/events", rec.events)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.url = f"http://127.0.0.1:{port}/api"
    yield rec
    await runner.cleanup()


@pytest.fixture
def cluster(make_sim: Callable[..., SimStack]) -> SimStack:
    return make_sim(
        api_token=ADMIN, authorizer=lambda store: RBACAuthorizer(store, {}, superusers={ADMIN}), pod_api=True
    )


def _target(sim: SimStack) -> ClusterTarget:
    return ClusterTarget(kubeconfig=str(sim.kubeconfig_path), context="coder-sim")


async def _install(sim: SimStack, rec: Recorder, spec: StackSpec | None = None) -> None:
    async with open_api(_target(sim)) as api:
        report = await ws.apply(api, spec or StackSpec(), rec.url, timeout_s=60, poll_s=0.05)
    assert report.changed, report.lines


def _hook(sim: SimStack) -> Any:
    """The product's callback instance inside the running gateway."""
    for pod in sim.store.list("pods", "litellm"):
        backend = sim.cluster.kubelet.running.get(pod["metadata"]["uid"])  # type: ignore[union-attr]
        if backend is not None and hasattr(backend, "proxy") and backend.proxy.state.callbacks.instances:
            return backend.proxy.state.callbacks.instances[0]
    raise AssertionError("no gateway pod runs the wake callback")


def _chat(model: str = "coder-chat", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "write a haiku about tests"}], **kw}


async def test_a_burst_for_a_reclaimed_model_is_answered_readably_at_once_and_asks_for_one_wake(
    cluster: SimStack, recorder: Recorder
) -> None:
    await _install(cluster, recorder)
    # Prefect takes 3 s to accept the event: a callback that posted it before answering would keep every request
    # at least that long, so the bound below tells "at once" from "after the wake was asked for" on a loaded CI
    # machine too (one CI run saw the whole burst answered in 1.02 s there; 0.1 s on an idle machine).
    recorder.delay_s = 3.0
    master = cluster.secrets["master_key"]
    headers = {"Authorization": f"Bearer {master}"}
    async with httpx.AsyncClient(base_url=cluster.gateway_url, headers=headers, timeout=30) as c:

        async def one() -> tuple[httpx.Response, float]:
            t0 = time.monotonic()
            r = await c.post("/v1/chat/completions", json=_chat())
            return r, time.monotonic() - t0

        answers = await asyncio.gather(*(one() for _ in range(50)))
        for r, _ in answers:
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 60  # the estimate: minutes, not "try again now"
            msg = r.json()["error"]["message"]
            assert msg.startswith("coder-chat is starting (node, image, weights): ready in about"), msg
        waits = sorted(s for _, s in answers)
        assert waits[len(waits) // 2] < 2.0, waits  # the person asking is told at once (median of 50)

        # Tabby's route gets a fast 503 with Retry-After, never text in the editor
        r = await c.post("/v1/completions", json={"model": "coder-fim", "prompt": "def add(a, b):", "max_tokens": 8})
        assert r.status_code == 503 and "retry-after" in r.headers, r.text
        assert "choices" not in r.json()

    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_hook(cluster).drain(), cluster.loop))
    events = [e for batch in recorder.batches for e in batch]
    by_model = sorted(e["resource"]["prefect.resource.name"] for e in events)
    assert by_model == ["coder-chat", "coder-fim"], events  # 50 chat requests: one wake; the FIM request: one
    chat = next(e for e in events if e["resource"]["prefect.resource.name"] == "coder-chat")
    assert chat["event"] == "coder-stack.model.wake-requested"
    assert chat["resource"]["prefect.resource.id"] == "coder-stack.model.coder-chat"
    for raw in recorder.raw:  # no key of any kind travels with the event
        for secret in cluster.secrets.values():
            assert secret not in raw
        assert "haiku" not in raw  # nor the prompt


async def test_a_model_about_to_be_ready_is_waited_for_and_the_request_served(
    cluster: SimStack, recorder: Recorder
) -> None:
    await _install(cluster, recorder)
    ready_by = datetime.now(UTC) + timedelta(seconds=3)
    wake = {"state": "starting", "run": "r-1", "since": datetime.now(UTC).isoformat(), "ready_by": ready_by.isoformat()}
    async with open_api(_target(cluster)) as api:
        await annotate_deployment(api, "serving", "coder-chat", {WAKE: json.dumps(wake)})
        await scale(api, "serving", "coder-chat", 1)  # comes up in about a second at the sim's time scale
    headers = {"Authorization": f"Bearer {cluster.secrets['master_key']}"}
    async with httpx.AsyncClient(base_url=cluster.gateway_url, headers=headers, timeout=60) as c:
        r = await c.post("/v1/chat/completions", json=_chat(max_tokens=8))
    assert r.status_code == 200, r.text  # held (hold_s 20 > 3 s left), then passed to the model once Ready
    assert r.json()["choices"][0]["message"]["content"]
    assert recorder.batches == []  # a wake in progress is not asked for again


async def test_a_fim_request_while_chat_is_in_use_says_it_waits_for_the_gpu(
    cluster: SimStack, recorder: Recorder
) -> None:
    await _install(cluster, recorder)
    since = datetime.now(UTC).isoformat()
    wake = {"state": "waiting-for-gpu", "run": "r-2", "since": since, "busy": ["coder-chat"], "ready_by": None}
    async with open_api(_target(cluster)) as api:
        await annotate_deployment(api, "serving", "coder-fim", {WAKE: json.dumps(wake)})
    headers = {"Authorization": f"Bearer {cluster.secrets['master_key']}"}
    async with httpx.AsyncClient(base_url=cluster.gateway_url, headers=headers, timeout=30) as c:
        r = await c.post("/v1/completions", json={"model": "coder-fim", "prompt": "def add(a, b):", "max_tokens": 8})
    assert r.status_code == 503 and "retry-after" in r.headers, r.text
    assert r.json()["error"]["message"].startswith("coder-fim waits for the GPU: coder-chat is in use")


async def test_chat_as_message_tells_open_webui_in_the_conversation_never_tabby(
    cluster: SimStack, recorder: Recorder
) -> None:
    spec = StackSpec(wake={"chat_as_message": True})
    await _install(cluster, recorder, spec)
    headers = {"Authorization": f"Bearer {cluster.secrets['master_key']}"}
    async with httpx.AsyncClient(base_url=cluster.gateway_url, headers=headers, timeout=30) as c:
        r = await c.post("/v1/chat/completions", json=_chat())
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        assert text.startswith("coder-chat is starting"), text
        r = await c.post("/v1/completions", json={"model": "coder-fim", "prompt": "def add(a, b):", "max_tokens": 8})
        assert r.status_code == 503  # never text for FIM
