"""wake_model's place among the flows: a GPU flow (the crash automation and the clean-up trigger watch it, as they
watch every flow that takes ``gpu_session``), deployed with the trigger of the wake contract, and the wake
annotation's shape (what the LiteLLM callback reads)."""

from __future__ import annotations

import ast
import json
from datetime import UTC, datetime
from pathlib import Path

import yaml

from coder_stack.flows.cleanup import GPU_FLOWS
from coder_stack.usecases.wake import COLD_START, DEFAULT_COLD_START_S, WAKE, WakeState, cold_start_estimate

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = yaml.safe_load((ROOT / "prefect.yaml").read_text())


def deployment(name: str) -> dict:
    [dep] = [d for d in PREFECT_YAML["deployments"] if d["name"] == name]
    return dep


def flows_taking_the_gpu_limit() -> set[str]:
    """The ``@flow(name=...)`` of every flows/ module that enters ``gpu_session``."""
    names = set()
    for path in (ROOT / "flows").glob("*.py"):
        tree = ast.parse(path.read_text())
        calls = {
            n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }  # fmt: skip
        if "gpu_session" not in calls:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
                for dec in node.decorator_list:
                    if isinstance(dec, ast.Call) and getattr(dec.func, "id", "") == "flow":
                        names |= {k.value.value for k in dec.keywords if k.arg == "name"}  # type: ignore[attr-defined]
    return names


def test_every_flow_that_takes_the_gpu_limit_is_a_gpu_flow_watched_by_the_crash_trigger() -> None:
    assert "wake_model" in flows_taking_the_gpu_limit()
    assert flows_taking_the_gpu_limit() == set(GPU_FLOWS)
    [trigger] = deployment("clean-up-crashed-run")["triggers"]
    assert trigger["match_related"]["prefect.resource.name"] == list(GPU_FLOWS)


def test_wake_model_is_deployed_with_the_contracts_trigger_and_a_bound_on_concurrent_wakes() -> None:
    dep = deployment("wake-model")
    assert dep["entrypoint"] == "flows/wake.py:wake_model"
    assert dep["work_pool"]["name"] == "coder-stack-process"
    [trigger] = dep["triggers"]
    assert trigger["match"] == {"prefect.resource.id": "coder-stack.model.*"}
    assert trigger["expect"] == ["coder-stack.model.wake-requested"]
    assert trigger["parameters"] == {"model": "{{ event.resource.name }}"}
    # a burst that slips past the callback's de-duplication is cancelled, never queued behind a GPU wait
    assert dep["concurrency_limit"] == {"limit": 2, "collision_strategy": "CANCEL_NEW"}
    twin = deployment("wake-model-in-cluster")
    assert twin["entrypoint"] == dep["entrypoint"] and twin["pull"] == []
    assert twin["parameters"] == {"connection": {"stack_block": "coder-stack"}}
    assert twin["concurrency_limit"] == dep["concurrency_limit"] and "triggers" not in twin


def test_the_wake_annotation_has_the_contracts_shape_and_an_unreadable_one_counts_as_none() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    starting = json.loads(WakeState.starting("r1", 412.5, at).to_annotation())
    assert starting == {
        "state": "starting", "run": "r1", "since": "2026-01-02T03:04:05Z", "busy": [],
        "ready_by": "2026-01-02T03:10:57Z",
    }  # fmt: skip
    waiting = json.loads(WakeState.waiting("r1", ["coder-fim", "coder-chat"], at).to_annotation())
    assert waiting["state"] == "waiting-for-gpu" and waiting["busy"] == ["coder-chat", "coder-fim"]
    assert waiting["ready_by"] is None
    assert WAKE == "coder-stack.io/wake" and COLD_START == "coder-stack.io/cold-start-s"
    assert WakeState.from_annotation("{not json") is None and WakeState.from_annotation('{"state": "x"}') is None
    assert cold_start_estimate({COLD_START: "412.5"}) == 412.5
    assert cold_start_estimate({COLD_START: "junk"}) == cold_start_estimate({}) == DEFAULT_COLD_START_S


def test_the_standalone_hook_uses_the_flows_names_and_event_shape() -> None:
    """The callback runs inside the LiteLLM pod and cannot import coder_stack, so it keeps its own copies of the
    annotation names, the default estimate and the event; they must stay the ones the flows write and read."""
    from coder_stack.litellm import wake_hook
    from coder_stack.orchestration.wake_events import WAKE_EVENT, wake_event

    assert (wake_hook.WAKE_ANNOTATION, wake_hook.COLD_START_ANNOTATION) == (WAKE, COLD_START)
    source = Path(wake_hook.__file__).read_text()
    assert f'"event": "{WAKE_EVENT}"' in source
    ev = wake_event("coder-chat", "coder-chat", "chat", "not serving: 0 replicas")
    assert set(ev.resource.root) == {"prefect.resource.id", "prefect.resource.name", "coder-stack.alias"}
    assert set(ev.payload) == {"alias", "route", "reason"}
    assert f'float(model.get("cold_start_s", {DEFAULT_COLD_START_S:.0f}))' in source
