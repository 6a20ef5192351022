"""validate's plan on a time-sliced GPU: consecutive stages whose models fit the card together run as one group
(chat and FIM together; the agent, which needs the whole card, alone); exclusive mode keeps one stage at a time."""

from __future__ import annotations

from coder_stack_dev.bench.workday.scenario import team_spec

from coder_stack.flows.validate import plan_groups
from coder_stack.spec import StackSpec


def groups(spec: StackSpec, names: list[str]) -> list[list[str]]:
    models = [spec.model(n) for n in names]
    return [[names[i] for i in g] for g in plan_groups(spec, models)]


def test_time_sliced_chat_and_fim_form_one_group_and_the_agent_runs_alone() -> None:
    spec = team_spec()  # chat 0.55 + fim 0.35 fit a 24 GB L4; the agent takes 0.9
    assert groups(spec, ["coder-chat", "coder-fim", "coder-agent"]) == [["coder-chat", "coder-fim"], ["coder-agent"]]
    assert groups(spec, ["coder-agent", "coder-chat", "coder-fim"]) == [["coder-agent"], ["coder-chat", "coder-fim"]]
    # only consecutive stages group: the agent between them keeps them apart
    assert groups(spec, ["coder-chat", "coder-agent", "coder-fim"]) == [["coder-chat"], ["coder-agent"], ["coder-fim"]]


def test_shares_that_do_not_fit_and_exclusive_mode_keep_one_stage_per_group() -> None:
    too_big = team_spec({"coder-chat": 0.6, "coder-fim": 0.5})
    assert groups(too_big, ["coder-chat", "coder-fim"]) == [["coder-chat"], ["coder-fim"]]
    assert groups(StackSpec(), ["coder-chat", "coder-fim", "coder-agent"]) == [
        ["coder-chat"],
        ["coder-fim"],
        ["coder-agent"],
    ]
