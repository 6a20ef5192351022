"""The crash chain's configuration agrees with itself: the heartbeat the flows are given, the automation that
takes a silent run for dead, and the clean-up trigger in prefect.yaml (which `prefect deploy` installs)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import pytest
import yaml
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger

from coder_stack.errors import ConfigError
from coder_stack.flows.cleanup import GPU_FLOWS
from coder_stack.orchestration.gpu_limit import LEASE_SECONDS, GpuRun
from coder_stack.orchestration.liveness import (
    CRASH_SETTLE_S,
    HEARTBEAT_S,
    RunLiveness,
    crash_automation,
    parse_run_id,
)

PREFECT_YAML = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())


def deployment(name: str) -> dict:
    return next(d for d in PREFECT_YAML["deployments"] if d["name"] == name)


def heartbeat_frequencies() -> set[int]:
    """The heartbeat every flow run actually gets: each pool's job variables in prefect.yaml, and what the CLI sets."""
    import coder_stack.app.cli  # noqa: F401 - sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY's default for its runs

    pools = {int(p["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) for p in pools_of_prefect_yaml()}
    return pools | {int(os.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])}


def pools_of_prefect_yaml() -> list[dict]:
    return list(PREFECT_YAML["definitions"]["work_pools"].values())


def test_the_automation_watches_the_flows_the_cleanup_trigger_serves_and_spares_a_run_one_heartbeat_late() -> None:
    """Checked against what runs get (prefect.yaml, the CLI), not against the constants that built it: the
    automation marks Crashed exactly the flows whose Crashed state starts the clean-up, and a run that sends its
    heartbeats as configured but one arrives a whole interval late is not marked."""
    a = crash_automation(list(GPU_FLOWS))
    assert isinstance(a.trigger, EventTrigger)
    [trigger] = deployment("clean-up-crashed-run")["triggers"]
    watched = a.model_dump(mode="json")["trigger"]["match_related"]["prefect.resource.name"]
    assert sorted(watched) == sorted(trigger["match_related"]["prefect.resource.name"])
    for every in heartbeat_frequencies():
        assert a.trigger.within > timedelta(seconds=1.5 * every), every  # one late heartbeat is not death
    assert a.trigger.within < timedelta(seconds=LEASE_SECONDS)  # found before the dead run's slot frees itself
    [action] = a.actions
    assert isinstance(action, ChangeFlowRunState) and action.state == StateType.CRASHED


def test_status_calls_a_run_dead_only_after_two_heartbeats_it_should_have_sent_are_missing() -> None:
    """`status` and the clean-up judge silence from the heartbeat age: one missed heartbeat (of the frequency runs
    are given) is not death, two are; and the clean-up's wait after a mark outlasts one interval, so a live run's
    next heartbeat can prove it alive."""
    for every in heartbeat_frequencies():
        one_missed = RunLiveness(run_id=uuid4(), state="RUNNING", heartbeat_age_s=1.9 * every)
        two_missed = RunLiveness(run_id=uuid4(), state="RUNNING", heartbeat_age_s=2 * every + 1)
        assert not one_missed.silent and two_missed.silent, every
        assert every < CRASH_SETTLE_S


def test_prefect_yaml_gives_every_pool_the_heartbeat_and_triggers_the_clean_up_on_crashed_gpu_runs() -> None:
    for pool in PREFECT_YAML["definitions"]["work_pools"].values():
        assert pool["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_S), pool["name"]
    dep = deployment("clean-up-crashed-run")
    assert dep["entrypoint"] == "flows/cleanup.py:clean_up_crashed_run"
    [trigger] = dep["triggers"]
    assert trigger["expect"] == ["prefect.flow-run.Crashed"]
    assert trigger["match"] == {"prefect.resource.id": "prefect.flow-run.*"}
    assert trigger["match_related"] == {"prefect.resource.role": "flow", "prefect.resource.name": list(GPU_FLOWS)}
    assert trigger["parameters"] == {"crashed_run": "{{ event.resource.id }}"}
    # Every flow the automation watches is deployed (a renamed flow would silently leave the chain).
    entry_flows = {d["entrypoint"].split(":")[1] for d in PREFECT_YAML["deployments"]}
    assert {"validate_coder_stack", "swap_model", "bring_up", "reclaim_idle_models", "wake_model"} == set(GPU_FLOWS)
    assert {"bring_up", "swap_model", "validate_coder_stack", "reclaim_idle_models", "wake_model"} <= entry_flows


def test_a_run_id_is_taken_bare_or_as_the_trigger_passes_it_and_anything_else_says_what_to_pass() -> None:
    rid = uuid4()
    assert parse_run_id(str(rid)) == rid
    assert parse_run_id(f"prefect.flow-run.{rid}") == rid
    with pytest.raises(ConfigError, match="not a flow run id: pass the id from the Prefect UI or `coder-stack status`"):
        parse_run_id("validate-coder-stack")


def test_status_wording_for_a_dead_holder_says_when_the_slot_frees_itself_and_how_to_free_it_now() -> None:
    dead = GpuRun(
        run_id="r1",
        label="swap_model/x",
        heartbeat_age_s=95,
        holds_slot=True,
        dead=True,
        lease_expires_by="12:40:00 UTC",
    )
    text = dead.describe()
    assert text.startswith("swap_model/x holds the GPU: DEAD (last heartbeat 95 s ago; one is due every 30 s)")
    assert "frees itself by 12:40:00 UTC" in text and "free it now: `coder-stack cleanup r1`" in text
    live = GpuRun(run_id="r2", label="validate_coder_stack/y", heartbeat_age_s=4, holds_slot=True)
    assert live.describe() == "validate_coder_stack/y holds the GPU: live (last heartbeat 4 s ago; one every 30 s)"


def test_gpu_flows_are_exactly_the_flows_that_take_the_gpu_limit() -> None:
    """GPU_FLOWS (and so prefect.yaml's trigger, held equal above) names every flow whose module takes
    ``gpu_session``: a new GPU flow left off the list would crash with nobody cleaning up after it."""
    import ast

    import coder_stack.flows as flows_pkg

    taking: set[str] = set()
    for path in Path(flows_pkg.__file__).resolve().parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        if not any(isinstance(n, ast.Name) and n.id == "gpu_session" for n in ast.walk(tree)):
            continue
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef)):
            for d in fn.decorator_list:
                if isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == "flow":
                    taking |= {
                        str(kw.value.value)
                        for kw in d.keywords
                        if kw.arg == "name" and isinstance(kw.value, ast.Constant)
                    }
    assert taking, "no flow module takes gpu_session: the scan found nothing"
    assert taking == set(GPU_FLOWS)
