"""The development tools' tier's fixtures (the shared ``sim`` / ``make_sim`` are in tests/conftest.py).

``sim_autoscaled``: a started SimStack whose GPU pool starts empty and scales up on demand (max spec.gpus nodes).
``fake_standins``: tiny aiohttp servers registered in ``simstack.standins.FACTORIES`` for every image
(answer ``/health`` and ``/v1/models``); ``fake_standins.runs`` holds every ``ContainerRun`` started.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from simstack import standins
from simstack.stack import SimStack

from tests.kits.standins import FakeStandins


@pytest.fixture
def sim_autoscaled(make_sim: Callable[..., SimStack]) -> SimStack:
    """A started SimStack whose GPU pool starts empty and scales up on demand (max spec.gpus nodes)."""
    return make_sim(gpu_pool="autoscaled")


@pytest.fixture
def fake_standins(monkeypatch: pytest.MonkeyPatch) -> FakeStandins:
    fakes = FakeStandins()
    for repo in ("vllm/vllm-openai", "ghcr.io/berriai/litellm", "ghcr.io/open-webui/open-webui", "tabbyml/tabby"):
        monkeypatch.setitem(standins.FACTORIES, repo, fakes.factory)
    return fakes
