"""The wake claim on a model's Deployment (coder_stack.usecases.wake) against the simulated API server: of two wakes
that both read "no claim", exactly one writes it and the other finds the winner's; a dead run's claim is taken
over; every later change and the removal apply only while the annotation is still the run's own."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

import coder_stack.usecases.wake as wake
from coder_stack.kubernetes.workloads import annotate_deployment, read_deployment
from coder_stack.spec import StackSpec
from coder_stack.usecases.wake import WAKE, WakeState, claim_wake, clear_wake_of, release_claim, update_wake
from tests.kits.apiserver import NS, ServerThread, deployment, namespace

SPEC = StackSpec()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = ServerThread(tmp_path_factory.mktemp("wake-claim"))

    async def setup() -> None:
        srv.store.create("namespaces", namespace("serving"))
        for m in SPEC.models:
            srv.store.create("deployments", deployment(m.name, replicas=0))

    srv.run(setup())
    yield srv
    srv.stop()


async def alive(run: str) -> str | None:
    return None


async def dead(run: str) -> str | None:
    return "Crashed: killed"


async def wake_annotation(api: Any, name: str) -> str | None:
    dep = await read_deployment(api, NS, name)
    return ((dep.metadata.annotations if dep.metadata else None) or {}).get(WAKE)


@pytest.mark.parametrize(("model", "other_annotation"), [("coder-chat", False), ("coder-fim", True)])
async def test_two_wakes_that_both_read_no_claim_make_one_claim(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch, model: str, other_annotation: bool
) -> None:
    """Both reads happen before either write (a barrier): one conditional write wins, the loser reads again and
    finds the winner's claim, pending under a live run. With and without other annotations on the Deployment."""
    async with server.api() as api:
        if other_annotation:
            await annotate_deployment(api, NS, model, {"coder-stack.io/activity": "{}"})
        barrier = asyncio.Barrier(2)
        reads = 0
        real_read = wake.read_deployment

        async def read_together(*args: Any) -> Any:
            nonlocal reads
            dep = await real_read(*args)
            reads += 1
            if reads <= 2:
                await barrier.wait()  # neither writes before both have read "no claim"
            return dep

        monkeypatch.setattr(wake, "read_deployment", read_together)
        m = SPEC.model(model)
        a, b = await asyncio.gather(
            claim_wake(api, SPEC, m, "run-a", 600, alive), claim_wake(api, SPEC, m, "run-b", 600, alive)
        )
        assert reads == 3  # the loser read once more
        won = [o for o in (a, b) if o.claim is not None]
        lost = [o for o in (a, b) if o.pending is not None]
        assert len(won) == 1 and len(lost) == 1, (a, b)
        assert won[0].claim is not None and lost[0].pending is not None
        assert lost[0].pending.run == won[0].claim.run and lost[0].pending.state == "starting"
        assert await wake_annotation(api, model) == won[0].claim.raw
        assert await release_claim(api, SPEC, won[0].claim)
        assert await wake_annotation(api, model) is None


async def test_a_dead_runs_claim_is_taken_over_and_every_change_is_conditional_on_the_claim(
    server: ServerThread,
) -> None:
    m = SPEC.model("coder-agent")
    async with server.api() as api:
        stale = WakeState.waiting("run-dead", ["coder-chat"]).to_annotation()
        await annotate_deployment(api, NS, m.name, {WAKE: stale})
        # a live run's claim is left alone
        kept = await claim_wake(api, SPEC, m, "run-new", 600, alive)
        assert kept.claim is None and kept.pending is not None and kept.pending.run == "run-dead"
        # a dead run's claim is taken over
        got = await claim_wake(api, SPEC, m, "run-new", 600, dead)
        assert got.claim is not None and got.took_over and "run-dead" in got.took_over
        mine = got.claim
        # the dead run (say it came back) can change nothing: its claim value is gone
        old = wake.Claim(model=m.name, run="run-dead", raw=stale)
        assert await update_wake(api, SPEC, old, WakeState.starting("run-dead", 1)) is None
        assert not await release_claim(api, SPEC, old)
        assert await clear_wake_of(api, SPEC, "run-dead") == []
        assert await wake_annotation(api, m.name) == mine.raw
        # the owner moves it on, and the crash clean-up of the owner removes it
        moved = await update_wake(api, SPEC, mine, WakeState.waiting("run-new", ["coder-fim"]))
        assert moved is not None and await wake_annotation(api, m.name) == moved.raw
        assert not await release_claim(api, SPEC, mine)  # the superseded value no longer matches
        assert await clear_wake_of(api, SPEC, "run-new") == [m.name]
        assert await wake_annotation(api, m.name) is None
        # an unreadable annotation is stale too
        await annotate_deployment(api, NS, m.name, {WAKE: "{garbage"})
        again = await claim_wake(api, SPEC, m, "run-3", 600, alive)
        assert again.claim is not None and again.took_over and "unreadable" in again.took_over
        assert await release_claim(api, SPEC, again.claim)
