"""A cancellation that lands in a clean-up (a lost GPU lease, a cancel from the UI, a SIGTERM in the flow's
``finally``) must not stop the scale-downs the clean-up has begun: they finish, then the cancellation goes on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
from simstack.stack import SimStack

import coder_stack.flows.gpu_steps as gpu_steps
from coder_stack.kubernetes.client import ClusterTarget
from tests.conftest import scale
from tests.kits.flowkit import SERVING, SPEC, replicas


async def test_a_cancellation_during_the_scale_downs_still_leaves_the_models_at_zero(
    make_sim: Callable[..., SimStack], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_sim()
    scale(sim, SERVING, "coder-chat", 1)
    scale(sim, SERVING, "coder-fim", 1)
    real_scale = gpu_steps.scale
    entered: asyncio.Queue[str] = asyncio.Queue()
    gate = asyncio.Event()

    async def held_scale(api: Any, ns: str, name: str, n: int) -> Any:
        await entered.put(name)
        await gate.wait()  # the cancellation arrives while every scale-down is in flight
        return await real_scale(api, ns, name, n)

    monkeypatch.setattr(gpu_steps, "scale", held_scale)
    monkeypatch.setattr(gpu_steps, "logger", lambda: logging.getLogger("test-release"))
    models = [m for m in SPEC.models if m.name in ("coder-chat", "coder-fim")]
    target = ClusterTarget(kubeconfig=str(sim.kubeconfig_path))
    task = asyncio.ensure_future(gpu_steps.release(target, SPEC, models, []))
    started = {await asyncio.wait_for(entered.get(), 20), await asyncio.wait_for(entered.get(), 20)}
    assert started == {"coder-chat", "coder-fim"}
    task.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    now = replicas(sim)
    assert now["coder-chat"] == 0 and now["coder-fim"] == 0, now
