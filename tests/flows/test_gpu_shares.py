"""Time-sliced GPU: the ``tag:gpu`` limit counts hundredths of the GPU and a session occupies its models' share,
and ``tag:gpu-start`` lets one model start on the shared GPU at a time across runs and processes.

What users rely on: chat (55) and FIM (35) hold the GPU together while the agent (90) waits for both to go and
gets it then; a session waiting for more is not overtaken in its process by a later one that would fit (the agent
is not starved); a cancelled wait or a cancelled holder leaves no slot; a run SIGKILLed while holding its share
and the start turn has both freed by the crash clean-up, another run's share untouched; two processes taking the
start turn never hold it at once; setup never switches the limit between GPUs and shares while a slot is held,
and a limit too small for a session is refused with the setup advice instead of a wait for ever. Against the
shared Prefect test server (tests/flows/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import PrefectClient, get_client
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed, Running
from simstack.stack import SimStack

from coder_stack.errors import GpuBusy, GpuLimitMissing
from coder_stack.flows.cleanup import clean_up_crashed_run
from coder_stack.orchestration import gpu
from coder_stack.orchestration.gpu import gpu_session, require_gpu_limit, start_turn
from coder_stack.orchestration.gpu_limit import GPU_LIMIT, START_LIMIT, ensure_gpu_limit, gpu_limit_status
from coder_stack.spec import SHARE_SLOTS, GpuSharing, StackSpec
from tests.flows.test_crash_cleanup import SETTLE_S
from tests.kits.flowkit import PROJECT, conn, flow_process_env, sigkill, until

pytestmark = pytest.mark.usefixtures("gpu_limit")

CHAT, FIM, AGENT = 55, 35, 90


async def slots(limit: str = GPU_LIMIT) -> int:
    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(limit)).active_slots


class Asks:
    """Every check and request for slots that found them taken (False) or got them (True), in order, by the session
    that made it (its name in ``who``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.who: dict[asyncio.Task[Any], str] = {}
        self.log: list[tuple[str, bool]] = []
        self.changed = asyncio.Event()
        take, looks_free = gpu._take_slot, gpu._slot_looks_free

        async def take_spy(client: PrefectClient) -> object:
            lease = await take(client)
            self._note(lease is not None)
            return lease

        async def looks_free_spy(*args: Any) -> bool:
            free = await looks_free(*args)
            if not free:
                self._note(False)
            return free

        monkeypatch.setattr(gpu, "_take_slot", take_spy)
        monkeypatch.setattr(gpu, "_slot_looks_free", looks_free_spy)

    def _note(self, got: bool) -> None:
        task = asyncio.current_task()
        self.log.append((self.who.get(task, "?") if task else "?", got))
        self.changed.set()

    def start(self, name: str, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.who[task] = name
        return task

    async def refused(self, name: str, after: int = 0) -> int:
        """Until ``name`` has found the slots taken once more after the ``after`` first entries; the log's length
        then."""
        while not any(w == name and not ok for w, ok in self.log[after:]):
            self.changed.clear()
            await self.changed.wait()
        return len(self.log)

    async def close(self) -> None:
        for task in self.who:
            task.cancel()
        await asyncio.gather(*self.who, return_exceptions=True)


@pytest.fixture
async def asks(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Asks]:
    """The sessions a test starts are cancelled at its end if they are still running (a failed test)."""
    spy = Asks(monkeypatch)
    yield spy
    await spy.close()


class Holder:
    """A session held until ``leave`` is set; ``entered`` is set once it holds its slots."""

    def __init__(self, occupy: int) -> None:
        self.occupy = occupy
        self.entered = asyncio.Event()
        self.leave = asyncio.Event()

    async def run(self, timeout_s: float = 60, poll_s: float = 0.05) -> None:
        async with gpu_session(timeout_s, poll_s, occupy=self.occupy):
            self.entered.set()
            await self.leave.wait()


@pytest.mark.usefixtures("shared_gpu")
async def test_chat_and_fim_hold_the_gpu_together_and_the_agent_waits_for_both_then_gets_it(
    asks: Asks,
) -> None:
    chat, fim, agent = Holder(CHAT), Holder(FIM), Holder(AGENT)
    async with asyncio.timeout(60):
        tasks = [asks.start("chat", chat.run())]
        await chat.entered.wait()
        tasks.append(asks.start("fim", fim.run()))
        await fim.entered.wait()
        assert await slots() == CHAT + FIM  # both on the GPU at once
        tasks.append(asks.start("agent", agent.run()))
        mark = await asks.refused("agent")
        chat.leave.set()  # FIM still holds 35: 35 + 90 > 100
        await tasks[0]
        assert await slots() == FIM
        await asks.refused("agent", mark)  # asked after chat's release (woken by it), and refused
        assert not agent.entered.is_set()
        fim.leave.set()
        await agent.entered.wait()
        assert await slots() == AGENT
        agent.leave.set()
        await asyncio.gather(*tasks)
    assert [w for w, ok in asks.log if ok] == ["chat", "fim", "agent"], asks.log
    assert await slots() == 0


@pytest.mark.usefixtures("shared_gpu")
async def test_a_session_waiting_for_more_is_not_overtaken_by_a_later_one_whose_share_would_fit(
    asks: Asks,
) -> None:
    """Chat holds 55; the agent (90) queues, then FIM (35, which would fit beside chat) queues behind it. FIM
    neither asks nor gets the GPU before the agent has had it."""
    chat, agent, fim = Holder(CHAT), Holder(AGENT), Holder(FIM)
    async with asyncio.timeout(60):
        tasks = [asks.start("chat", chat.run())]
        await chat.entered.wait()
        tasks.append(asks.start("agent", agent.run()))
        await asks.refused("agent")
        tasks.append(asks.start("fim", fim.run()))
        await until(lambda: gpu._room().queued == 2, 30, "FIM in line behind the agent")
        mark = len(asks.log)
        await asks.refused("agent", mark)  # the agent asked again with FIM in line: still refused
        await asks.refused("agent", await asks.refused("agent", mark))  # and once more
        assert not fim.entered.is_set() and await slots() == CHAT
        chat.leave.set()
        await agent.entered.wait()
        assert await slots() == AGENT and not fim.entered.is_set()
        agent.leave.set()
        await fim.entered.wait()
        assert await slots() == FIM
        fim.leave.set()
        await asyncio.gather(*tasks)
    assert [w for w, ok in asks.log if ok] == ["chat", "agent", "fim"], asks.log
    assert "fim" not in [w for w, _ in asks.log[: asks.log.index(("agent", True))]], asks.log  # never asked first
    assert await slots() == 0


@pytest.mark.usefixtures("shared_gpu")
async def test_a_session_cancelled_while_waiting_or_while_holding_its_share_leaves_no_slot(
    asks: Asks,
) -> None:
    chat, agent, fim = Holder(CHAT), Holder(AGENT), Holder(FIM)
    async with asyncio.timeout(60):
        held = asks.start("chat", chat.run())
        await chat.entered.wait()
        waiting = asks.start("agent", agent.run())
        await asks.refused("agent")
        waiting.cancel()  # in the middle of its wait
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await slots() == CHAT and gpu._room().queued == 0
        # the next session of this process is not stuck behind the cancelled one: FIM joins chat
        other = asks.start("fim", fim.run())
        await fim.entered.wait()
        assert await slots() == CHAT + FIM
        held.cancel()  # while holding its share
        with pytest.raises(asyncio.CancelledError):
            await held
        assert await slots() == FIM
        fim.leave.set()
        await other
        # a start turn cancelled while held is given back too
        entered = asyncio.Event()

        async def turn() -> None:
            async with start_turn(True, 30):
                entered.set()
                await asyncio.Event().wait()

        task = asyncio.ensure_future(turn())
        await entered.wait()
        assert await slots(START_LIMIT) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await slots() == 0 and await slots(START_LIMIT) == 0


async def test_a_limit_too_small_for_the_session_or_a_missing_start_limit_is_refused_with_the_setup_advice() -> None:
    """A limit of 1 left from exclusive mode while the stack is now time-sliced: the session would wait for ever."""
    with pytest.raises(GpuLimitMissing, match=r"has 1 slot\(s\) but this session needs 55 .*`coder-stack setup`"):
        async with asyncio.timeout(30), gpu_session(60, occupy=CHAT):
            pytest.fail("entered a session the limit cannot hold")
    with pytest.raises(GpuLimitMissing, match=r"needs 55"):
        await require_gpu_limit(CHAT)
    async with get_client() as client:
        with contextlib.suppress(ObjectNotFound):
            await client.delete_global_concurrency_limit_by_name(START_LIMIT)
    with pytest.raises(
        GpuLimitMissing, match=rf"{START_LIMIT} does not exist.*`coder-stack setup`.*nothing was started"
    ):
        async with asyncio.timeout(30), start_turn(True, 60):
            pytest.fail("took a start turn with no start limit")
    async with start_turn(False, 60):  # exclusive mode: nothing to take
        pass
    assert await slots() == 0


async def test_setup_never_switches_the_limit_between_gpus_and_shares_while_a_slot_is_held() -> None:
    """Exclusive mode's one slot is the whole GPU; as one hundredth it would let a 55 session join it. So is the
    other way round (55 held counted as 55 whole GPUs is harmless, but the session's models still run: refused
    alike). Once free, setup resizes."""
    async with gpu_session(30):
        with pytest.raises(GpuBusy, match=r"1 of 1 slot\(s\) held .*Run `coder-stack setup` again when "):
            await ensure_gpu_limit(SHARE_SLOTS)
        async with get_client() as client:
            assert (await client.read_global_concurrency_limit_by_name(GPU_LIMIT)).limit == 1  # left as it is
    assert await ensure_gpu_limit(SHARE_SLOTS) == f"resized {GPU_LIMIT} from 1 to {SHARE_SLOTS} slot(s)"
    async with gpu_session(30, occupy=CHAT):
        with pytest.raises(GpuBusy, match=r"55 of 100 slot\(s\) held"):
            await ensure_gpu_limit(1)
        assert await ensure_gpu_limit(SHARE_SLOTS) == f"{GPU_LIMIT} already has {SHARE_SLOTS} slot(s)"
    assert await ensure_gpu_limit(1) == f"resized {GPU_LIMIT} from {SHARE_SLOTS} to 1 slot(s)"


async def test_setup_of_a_time_sliced_stack_sizes_the_limit_in_hundredths_and_creates_the_start_limit() -> None:
    from coder_stack.app.setup import run_setup

    spec = StackSpec().model_copy(update={"gpu_sharing": GpuSharing(mode="time-sliced")})
    block = f"shares-{os.getpid()}"
    try:
        report = await run_setup(gpus=1, deploy=False, spec=spec, stack_block=block)
        assert report.gpu_limit.startswith(
            f"resized {GPU_LIMIT} from 1 to {SHARE_SLOTS} slot(s); created {START_LIMIT}"
        )
        async with get_client() as client:
            assert (await client.read_global_concurrency_limit_by_name(START_LIMIT)).limit == 1
        # setup again with no stack file: the stored stack block is time-sliced, so the limits stay as they are
        # (not sized from the `gpus` of the default spec)
        again = await run_setup(gpus=1, deploy=False, stack_block=block)
        assert again.gpu_limit == f"{GPU_LIMIT} already has {SHARE_SLOTS} slot(s); {START_LIMIT} already has 1 slot"
    finally:
        async with get_client() as client:
            with contextlib.suppress(ObjectNotFound):
                await client.delete_global_concurrency_limit_by_name(START_LIMIT)


# ------------------------------------------------------------------ processes
# Takes the start turn ROUNDS times, logging to argv[1] when it began to wait, entered and left (the monotonic
# clock, one for every process on the machine); inside, a marker file created exclusively: a second holder at the
# same moment finds it and says so. Polls every 50 ms (production: 0.5 s). Both begin when the test opens the gate
# (argv[4]), once each has said it is ready: else one could finish before the other has started.
RACER = """
import asyncio, os, sys, time
from coder_stack.orchestration import gpu

log, marker, rounds, gate = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
gpu.POLL_SECONDS = 0.05

def note(what):
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {what} {time.monotonic():.6f}\\n")

async def main():
    async with gpu.get_client() as client:  # connected and imported: ready to race
        await client.read_global_concurrency_limit_by_name(gpu.START_LIMIT)
    open(f"{gate}.ready.{os.getpid()}", "w").close()
    while not os.path.exists(gate):  # the test opens the gate when both are ready
        await asyncio.sleep(0.01)
    for _ in range(rounds):
        note("want")
        async with gpu.start_turn(True, 120):
            note("in")
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                note("OVERLAP")
            else:
                os.close(fd)
                async with gpu.get_client() as client:  # some work inside the turn: a few API calls
                    for _ in range(3):
                        await client.read_global_concurrency_limit_by_name(gpu.START_LIMIT)
                os.unlink(marker)
            note("out")

asyncio.run(main())
"""


@pytest.mark.usefixtures("shared_gpu")
async def test_two_processes_racing_for_the_start_turn_never_hold_it_at_once(prefect_api: str, tmp_path: Path) -> None:
    log, marker, rounds, gate = tmp_path / "turns.log", tmp_path / "starting", 6, tmp_path / "go"
    env = flow_process_env(prefect_api, tmp_path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(log), str(marker), str(rounds), str(gate)],
            cwd=PROJECT,
            env=env,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        ready = lambda: len(list(tmp_path.glob("go.ready.*"))) == 2 or any(p.poll() is not None for p in procs)  # noqa: E731
        await until(ready, 120, "both processes ready")
        gate.touch()
        codes = await asyncio.wait_for(asyncio.gather(*(asyncio.to_thread(p.wait) for p in procs)), 120)
    finally:
        for p in procs:
            sigkill(p)
    assert codes == [0, 0], [p.stderr.read().decode()[-2000:] for p in procs if p.stderr]
    rows = [line.split() for line in log.read_text().splitlines()]
    assert not [r for r in rows if r[1] == "OVERLAP"], rows
    turns: dict[str, list[tuple[float, float, float]]] = {}  # per process: (wanted, entered, left)
    at: dict[str, list[float]] = {}
    for pid, what, when in rows:
        at.setdefault(pid, []).append(float(when))
        if what == "out":
            turns.setdefault(pid, []).append((at[pid][-3], at[pid][-2], at[pid][-1]))
    assert sorted(len(v) for v in turns.values()) == [rounds, rounds], rows
    held = sorted((t[1], t[2]) for v in turns.values() for t in v)
    overlaps = sum(1 for a, b in itertools.pairwise(held) if b[0] < a[1])
    assert overlaps == 0, held
    # they did race: a process waited for a turn while the other held it (else the test proves nothing)
    (_, mine), (_, theirs) = turns.items()
    waited = sum(1 for w, i, _ in mine for _, a, b in theirs if w < b and a < i) + sum(
        1 for w, i, _ in theirs for _, a, b in mine if w < b and a < i
    )
    assert waited >= 1, rows
    assert await slots(START_LIMIT) == 0


FLOW = "holds_a_share_and_the_start_turn"
# A flow run that holds 55 hundredths of the GPU and the start turn, prints its run id and "holding", and waits
# there for ever (the test SIGKILLs it).
HOLDER = f"""
import asyncio
from prefect import flow
from prefect.context import FlowRunContext
from coder_stack.orchestration import gpu

@flow(name="{FLOW}")
async def holding():
    async with gpu.gpu_session(60, occupy={CHAT}):
        async with gpu.start_turn(True, 60):
            print("holder-run-id", FlowRunContext.get().flow_run.id, "holding", flush=True)
            await asyncio.Event().wait()

asyncio.run(holding())
"""


@pytest.mark.usefixtures("shared_gpu")
async def test_a_run_killed_holding_its_share_and_the_start_turn_has_both_freed_by_the_crash_clean_up(
    make_sim: Callable[..., SimStack], prefect_api: str, tmp_path: Path
) -> None:
    sim = make_sim()
    log = tmp_path / "holder.log"
    env = flow_process_env(prefect_api, tmp_path) | {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER], cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        await until(lambda: "holding" in log.read_text() or proc.poll() is not None, 120, "the run holding")
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
    assert proc.returncode == -signal.SIGKILL
    run_id = UUID(log.read_text().split("holder-run-id ", 1)[1].split()[0])
    assert await slots() == CHAT and await slots(START_LIMIT) == 1  # held until the leases expire (300 s) ...
    assert f"a model is starting on the shared GPU ({START_LIMIT} held" in (await gpu_limit_status()).describe()
    async with get_client() as client:
        await client.set_flow_run_state(run_id, Crashed(message="no heartbeat for 60 s (test)"), force=True)
    # ... unless the crash clean-up frees them, while another session holds FIM's share, untouched
    async with asyncio.timeout(60), gpu_session(30, occupy=FIM):
        assert await slots() == CHAT + FIM
        report = await clean_up_crashed_run(crashed_run=str(run_id), connection=conn(sim), settle_s=SETTLE_S)
        assert await slots() == FIM and await slots(START_LIMIT) == 0, report
        assert f"start turn freed ({START_LIMIT}: 1 -> 0 held)" in report.notes, report.notes
        assert f"GPU slot freed ({GPU_LIMIT}: {CHAT + FIM} -> {FIM} held)" in report.notes, report.notes
        assert "a model is starting" not in (await gpu_limit_status()).describe()
    assert await slots() == 0


@pytest.mark.usefixtures("shared_gpu")
async def test_status_states_the_held_shares_of_the_gpu_and_whose_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs hold 55 and 35 hundredths through real sessions (their leases labelled on the runs as a flow run's
    are): status says 90 of 100 hundredths, each run's share, and accounts for every slot (no "unaccounted")."""
    from coder_stack.flows.cleanup import GPU_FLOWS
    from tests.flows.test_crash_cleanup import _validate_named

    async with get_client() as client:
        runs = [
            (await client.create_flow_run(flow=_validate_named, name=f"share-{n}", state=Running())).id
            for n in (CHAT, FIM)
        ]
    current: ContextVar[UUID | None] = ContextVar("flow_run", default=None)
    monkeypatch.setattr(gpu, "holder_run_id", current.get)
    chat, fim = Holder(CHAT), Holder(FIM)

    async def as_run(run: UUID, holder: Holder) -> None:
        current.set(run)
        await holder.run()

    async with asyncio.timeout(60):
        tasks = [asyncio.ensure_future(as_run(runs[0], chat)), asyncio.ensure_future(as_run(runs[1], fim))]
        await chat.entered.wait()
        await fim.entered.wait()
        while gpu._PENDING:  # the lease labels
            await asyncio.gather(*list(gpu._PENDING), return_exceptions=True)
        text = (await gpu_limit_status(GPU_FLOWS)).describe()
        chat.leave.set()
        fim.leave.set()
        await asyncio.gather(*tasks)
        while gpu._PENDING:
            await asyncio.gather(*list(gpu._PENDING), return_exceptions=True)
    assert f"GPU limit {GPU_LIMIT} (time-sliced): {CHAT + FIM} of {SHARE_SLOTS} hundredths of the GPU held" in text
    assert f"share-{CHAT} holds {CHAT} hundredths of the GPU" in text, text
    assert f"share-{FIM} holds {FIM} hundredths of the GPU" in text, text
    assert "unaccounted" not in text and "not on record" not in text, text
    async with get_client() as client:
        for run in runs:
            await client.delete_flow_run(run)
