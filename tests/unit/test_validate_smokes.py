"""validate runs a stage's smokes at once (the pod, the gateway with a client's key, the client itself) and still
reports them as the runbook orders them: each recorded in that order, the pod's failure raised at once with the
others cancelled (it explains theirs), otherwise the first failure in order once all have ended, and a
cancellation from outside cancels every smoke."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coder_stack.errors import CoderStackError
from coder_stack.flows.run import Run
from coder_stack.flows.validate import _Smokes
from coder_stack.probe import SmokeResult
from coder_stack.report import RunReport
from coder_stack.spec import StackSpec

SPEC = StackSpec()
MODEL = SPEC.model("coder-chat")


class Smoke:
    """A smoke that ends when told: passes, or fails with its own error; says whether it was cancelled."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = asyncio.Event()
        self.outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.cancelled = False

    async def run(self) -> SmokeResult:
        self.started.set()
        try:
            err = await self.outcome
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if err is not None:
            raise err
        return SmokeResult(kind="direct", target=self.name)

    def passes(self) -> None:
        self.outcome.set_result(None)

    def fails(self) -> CoderStackError:
        err = CoderStackError(f"{self.name} failed")
        self.outcome.set_result(err)
        return err


def smokes() -> tuple[_Smokes, Smoke, Smoke, Smoke]:
    run = Run(None, SPEC, RunReport(flow="validate_coder_stack"))  # type: ignore[arg-type]  # no cluster needed
    return _Smokes(run, MODEL), Smoke("pod"), Smoke("gateway"), Smoke("client")


def lines(s: _Smokes) -> list[tuple[str, bool]]:
    return [(line.check, line.ok) for line in s.section.smokes]


async def start(s: _Smokes, pod: Smoke, gw: Smoke, client: Smoke) -> asyncio.Task[Any]:
    task = asyncio.create_task(s.together(("pod", pod.run()), ("gateway", gw.run()), ("client", client.run())))
    await asyncio.gather(pod.started.wait(), gw.started.wait(), client.started.wait())
    return task


async def test_the_smokes_run_at_once_and_are_recorded_in_the_runbook_s_order() -> None:
    s, pod, gw, client = smokes()
    task = await start(s, pod, gw, client)  # all three started before any ended
    client.passes()
    gw.passes()
    pod.passes()
    await task
    assert lines(s) == [("pod", True), ("gateway", True), ("client", True)]
    assert [r.target for r in s.results] == ["pod", "gateway", "client"]


async def test_the_pod_failing_cancels_the_others_and_is_the_failure_reported() -> None:
    s, pod, gw, client = smokes()
    task = await start(s, pod, gw, client)
    err = pod.fails()
    with pytest.raises(CoderStackError) as raised:
        await task
    assert raised.value is err
    assert gw.cancelled and client.cancelled
    assert lines(s) == [("pod", False)]


async def test_a_gateway_failure_is_reported_over_its_client_s_whichever_ended_first() -> None:
    s, pod, gw, client = smokes()
    task = await start(s, pod, gw, client)
    client.fails()  # the client's failure lands first ...
    await asyncio.sleep(0)
    assert not task.done()  # ... and the run waits for the others
    pod.passes()
    err = gw.fails()
    with pytest.raises(CoderStackError) as raised:
        await task
    assert raised.value is err  # the gateway's failure explains the client's
    assert lines(s) == [("pod", True), ("gateway", False), ("client", False)]


async def test_a_client_failure_alone_is_reported_after_every_smoke_ended() -> None:
    s, pod, gw, client = smokes()
    task = await start(s, pod, gw, client)
    err = client.fails()
    gw.passes()
    await asyncio.sleep(0)
    assert not task.done()
    pod.passes()
    with pytest.raises(CoderStackError) as raised:
        await task
    assert raised.value is err
    assert lines(s) == [("pod", True), ("gateway", True), ("client", False)]


async def test_cancelling_the_stage_cancels_every_smoke() -> None:
    s, pod, gw, client = smokes()
    task = await start(s, pod, gw, client)
    gw.passes()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pod.cancelled and client.cancelled
    assert lines(s) == []  # nothing judged: the run was stopped
