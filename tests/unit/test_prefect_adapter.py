"""``coder_stack.orchestration.prefect_api``: the one module that uses what of Prefect is not its documented API.

Two kinds of test here, both without a Prefect server (the endpoints themselves, on a real server:
tests/flows/test_prefect_api.py):

- the guard: no other product module imports a private Prefect module (a ``prefect`` module path with a segment
  starting with ``_``), touches a Prefect context's ``__var__``, names a ``/v2/`` API path, or calls
  ``gc.freeze`` from the library (it is the process owner's, ``coder_stack.flows.process``);
- the pins: the pinned Prefect still has what the adapter uses, with the signatures, request shapes and
  answers it relies on. A Prefect upgrade that changes one fails here, naming it.
"""

from __future__ import annotations

import ast
import asyncio
import gc
import inspect
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid4

import httpx
import prefect
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.responses import MinimalConcurrencyLimitResponse
from prefect.concurrency import _events
from prefect.concurrency.context import ConcurrencyContext
from prefect.context import AsyncClientContext
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_CSRF_SUPPORT_ENABLED, temporary_settings

from coder_stack.orchestration import prefect_api
from coder_stack.orchestration.prefect_api import (
    SLOT_REQUEST_PATH,
    ServerBusy,
    emit_acquired,
    emit_released,
    lease_of,
    release_at_run_end,
    released_by_us,
    request_slot,
    revoke_leases_held_by,
    slot_client,
    without_run_client,
)
from tests.unit.test_layers import PRODUCT, ROOT, module_name

ADAPTER = "coder_stack.orchestration.prefect_api"
# LiteLLM has /v2/ routes of its own (model info): the LiteLLM room may name them.
V2_ALLOWED = ("coder_stack.litellm",)


def product_sources() -> Iterator[tuple[str, ast.Module]]:
    """Every product module (the folders that install as coder_stack), by installed name, parsed."""
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if folder == "coder_stack" and path.relative_to(ROOT / folder).parts[0] in ("app", "flows", "tasks"):
                continue  # the links: read once, under their own folder
            yield module_name(path), ast.parse(path.read_text(), str(path))


def private_prefect(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "prefect" and any(p.startswith("_") for p in parts[1:])


def offences(name: str, tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"imports {a.name}" for a in node.names if private_prefect(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if private_prefect(node.module):
                found.append(f"imports {node.module}")
        elif isinstance(node, ast.Attribute) and node.attr == "__var__":
            found.append(f"reads a context's __var__ (line {node.lineno})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("/v2/"):
            if not name.startswith(V2_ALLOWED):
                found.append(f"names the API path {node.value} (line {node.lineno})")
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "freeze"
            and isinstance(node.value, ast.Name)
            and node.value.id == "gc"
            and name != "coder_stack.flows.process"
        ):
            found.append(f"calls gc.freeze (line {node.lineno}): the process owner's (coder_stack.flows.process)")
    return found


def test_only_the_adapter_uses_prefect_s_private_modules_contexts_and_v2_paths() -> None:
    seen = {}
    for name, tree in product_sources():
        seen[name] = offences(name, tree)
    assert ADAPTER in seen and len(seen) > 30, sorted(seen)  # the walk found the product, the adapter among it
    assert seen.pop(ADAPTER), "the adapter itself is caught by the guard"  # the guard is not blind to it
    bad = {name: what for name, what in seen.items() if what}
    assert not bad, f"only {ADAPTER} may use these (move the use there, with a test pinning it): {bad}"


def test_the_guard_catches_each_kind_of_use() -> None:
    source = """
import prefect.concurrency._events
from prefect.client.orchestration._concurrency_limits import client
from prefect.context import AsyncClientContext
import gc
AsyncClientContext.__var__.set(None)
PATH = "/v2/concurrency_limits/increment-with-lease"
gc.freeze()
"""
    found = offences("coder_stack.orchestration.gpu", ast.parse(source))
    assert len(found) == 5, found
    assert offences("coder_stack.flows.process", ast.parse("import gc\ngc.freeze()")) == []
    assert offences("coder_stack.litellm.admin", ast.parse("P = '/v2/model/info'")) == []


# ------------------------------------------------------------------ the pinned Prefect


def test_the_pinned_prefect_is_the_one_installed() -> None:
    """Every pin below was read on this version; on another, re-read them (prefect_api's docstring lists them)."""
    assert prefect.__version__ == prefect_api.PINNED_PREFECT


def test_the_private_event_helpers_exist_with_the_signatures_used() -> None:
    acquired = inspect.signature(_events.emit_concurrency_acquisition_events)
    released = inspect.signature(_events.emit_concurrency_release_events)
    assert list(acquired.parameters) == ["limits", "occupy"]
    assert list(released.parameters) == ["limits", "occupy", "events"]


def test_acquired_and_released_events_name_the_limit_and_the_release_follows_the_acquisition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[dict[str, Any]] = []

    def emit_event(event: str, **kw: Any) -> object:
        marker = SimpleNamespace(event=event, id=uuid4())
        sent.append({"event": event, **kw, "marker": marker})
        return marker

    monkeypatch.setattr(_events, "emit_event", emit_event)
    limit = MinimalConcurrencyLimitResponse(id=uuid4(), name="tag:gpu", limit=1)
    acquired = emit_acquired([limit])
    emit_released([limit], acquired)
    assert [s["event"] for s in sent] == ["prefect.concurrency-limit.acquired", "prefect.concurrency-limit.released"]
    for s in sent:
        assert s["resource"]["prefect.resource.id"] == f"prefect.concurrency-limit.{limit.id}"
        assert s["resource"]["prefect.resource.name"] == "tag:gpu" and s["resource"]["slots-acquired"] == "1"
    assert sent[1]["follows"] is sent[0]["marker"] and acquired == {limit.id: sent[0]["marker"]}


def test_a_lease_left_to_the_run_s_end_is_on_its_concurrency_context_until_given_back() -> None:
    lease = uuid4()
    assert release_at_run_end(lease) is False  # no run: nothing to leave it to
    with ConcurrencyContext() as ctx:
        assert release_at_run_end(lease) is True
        assert ctx.cleanup_lease_ids == [lease]  # what the context's __exit__ releases (Prefect 3.9.1)
        released_by_us(lease)
        assert ctx.cleanup_lease_ids == []
        released_by_us(lease)  # twice: harmless


async def test_get_client_hands_out_the_run_s_client_and_without_run_client_makes_its_own() -> None:
    """Why ``without_run_client`` exists: inside a flow run, ``get_client()`` returns the run's client (closed when
    the run ends); in the context it returns, a client of its own."""
    run_client = SimpleNamespace(_loop=asyncio.get_running_loop())
    var = AsyncClientContext.__var__
    token = var.set(SimpleNamespace(client=run_client))  # type: ignore[arg-type]
    try:
        with temporary_settings(updates={PREFECT_API_URL: "http://prefect.test/api"}):
            assert get_client() is run_client
            own = without_run_client().run(get_client)
            assert own is not run_client and type(own).__name__ == "PrefectClient"
            assert get_client() is run_client  # the caller's context is unchanged
    finally:
        var.reset(token)


async def test_a_lent_client_is_what_get_client_returns_and_async_with_does_not_close_it(api: None) -> None:
    """The label writes use the GPU sessions' open client: ``get_client()`` returns it in the task that borrowed
    it, and ``async with`` on it re-enters it (Prefect's client counts its entries) instead of closing it."""
    async with get_client() as owned:

        async def borrower() -> bool:
            prefect_api.lend_client(owned)
            async with get_client() as client:
                same = client is owned
            return same

        assert await asyncio.create_task(borrower())
        assert get_client() is not owned  # the caller's context is unchanged
        assert not owned._closed  # still open for its owner


# ------------------------------------------------------------------ the requests, against a stand-in transport


class Server:
    """Answers the Prefect client's requests with fixed codes and records them."""

    def __init__(self, code: int, body: Any = None) -> None:
        self.code, self.body = code, {} if body is None else body
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.code, json=self.body)


@pytest.fixture
def api() -> Iterator[None]:
    with temporary_settings(
        updates={PREFECT_API_URL: "http://prefect.test/api", PREFECT_CLIENT_CSRF_SUPPORT_ENABLED: False}
    ):
        yield


async def test_the_slot_request_posts_the_lease_and_its_flow_run_holder_and_reads_the_grant(api: None) -> None:
    limit_id, lease_id, run = uuid4(), uuid4(), uuid4()
    server = Server(200, {"lease_id": str(lease_id), "limits": [{"id": str(limit_id), "name": "tag:gpu", "limit": 1}]})
    async with slot_client(transport=httpx.MockTransport(server)) as client:
        lease = lease_of(await request_slot(client, "tag:gpu", 300.0, run))
    [req] = server.requests
    assert req.method == "POST" and req.url.path == "/api" + SLOT_REQUEST_PATH
    sent = json.loads(req.content)
    assert sent["names"] == ["tag:gpu"] and sent["slots"] == 1 and sent["mode"] == "concurrency"
    assert sent["lease_duration"] == 300.0 and sent["holder"] == {"type": "flow_run", "id": str(run)}
    assert lease.lease_id == lease_id and [(x.id, x.name) for x in lease.limits] == [(limit_id, "tag:gpu")]


async def test_a_503_to_the_slot_request_raises_server_busy_after_one_request_without_prefect_s_back_off(
    api: None,
) -> None:
    """Prefect's client retries a 503 after 2 s, 4 s, ...; the slot client's hook leaves that loop at once."""
    server = Server(503)
    async with slot_client(transport=httpx.MockTransport(server)) as client:
        with pytest.raises(ServerBusy):
            await request_slot(client, "tag:gpu", 300.0, None)
    assert len(server.requests) == 1


async def test_a_full_limit_answers_423_as_prefect_s_status_error_asked_once(api: None) -> None:
    server = Server(423, {"detail": "Concurrency limit is full"})
    async with slot_client(transport=httpx.MockTransport(server)) as client:
        with pytest.raises(httpx.HTTPStatusError) as err:
            await request_slot(client, "tag:gpu", 300.0, None)
    assert err.value.response.status_code == 423 and len(server.requests) == 1


async def test_the_hook_leaves_a_503_to_any_other_path_to_prefect() -> None:
    other = httpx.Response(503, request=httpx.Request("GET", "http://prefect.test/api/v2/concurrency_limits/x"))
    await prefect_api._no_retry_on_503(other)  # no ServerBusy: Prefect's retry applies there
    mine = httpx.Response(503, request=httpx.Request("POST", "http://prefect.test/api" + SLOT_REQUEST_PATH))
    with pytest.raises(ServerBusy):
        await prefect_api._no_retry_on_503(mine)


async def test_leases_are_revoked_by_holder_through_the_tag_limit_decrement(api: None) -> None:
    """The request shape; that the server revokes by holder id is pinned on a real server
    (tests/flows/test_prefect_api.py)."""
    server = Server(200, [])
    run = uuid4()
    async with get_client(httpx_settings={"transport": httpx.MockTransport(server)}) as client:
        await revoke_leases_held_by(client, "tag:gpu", run)
        with pytest.raises(ValueError, match="not a tag limit"):
            await revoke_leases_held_by(client, "gpu", run)
    [req] = server.requests
    assert req.method == "POST" and req.url.path == "/api/concurrency_limits/decrement"
    sent = json.loads(req.content)
    assert sent["names"] == ["gpu"] and UUID(sent["task_run_id"]) == run


# ------------------------------------------------------------------ the start-up heap freeze, the process's


def test_the_process_freezes_its_start_up_heap_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the freeze a full garbage collection no longer walks the start-up objects (0.2-0.4 s, a pause that
    fell into hand-offs); a second call does not collect again."""
    import coder_stack.flows.swap  # noqa: F401  (a flow process's heap: Prefect and the flows)
    from coder_stack.flows import process

    monkeypatch.setattr(process, "_FROZEN", False)
    collects: list[int] = []
    real_collect = gc.collect

    def counting_collect(*a: int) -> int:
        collects.append(1)
        return real_collect(*a)

    monkeypatch.setattr(gc, "collect", counting_collect)
    before = gc.get_freeze_count()
    try:
        process.freeze_startup_heap()
        frozen = gc.get_freeze_count()
        process.freeze_startup_heap()
    finally:
        gc.unfreeze()
    assert frozen > max(before, 100_000) and len(collects) == 1


def test_the_cli_freezes_the_heap_before_it_runs_a_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    from coder_stack.app import cli

    order: list[str] = []
    monkeypatch.setattr(cli, "freeze_startup_heap", lambda: order.append("freeze"))

    async def flow() -> None:
        order.append("flow")

    cli._run_flow(flow())
    assert order == ["freeze", "flow"]


async def test_every_flow_freezes_the_heap_as_it_starts_so_worker_run_flows_do_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flow run a worker starts (``prefect flow-run execute``, a Job's pod) never passes through the CLI: the
    flows' common guard freezes the start-up heap before the body runs, once per process."""
    from coder_stack.flows import guard
    from coder_stack.report import RunReport

    order: list[str] = []
    monkeypatch.setattr(guard, "freeze_startup_heap", lambda: order.append("freeze"))

    async def publish(report: RunReport, key: str) -> None:
        order.append("publish")

    monkeypatch.setattr(guard, "publish", publish)
    async with guard.guarded(RunReport(flow="t"), "k", "t", final_state_of=None):
        order.append("body")
    assert order == ["freeze", "body", "publish"]
