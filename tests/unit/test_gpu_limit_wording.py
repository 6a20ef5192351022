"""How `coder-stack status` states the GPU limit: in hundredths of the GPU when it is time-sliced (the limit counts
shares), in slots as before when it is exclusive."""

from __future__ import annotations

from coder_stack.orchestration.gpu_limit import GPU_LIMIT, GpuLimitStatus, GpuRun
from coder_stack.spec import SHARE_SLOTS


def run(name: str, slots: int, shares: bool) -> GpuRun:
    return GpuRun(run_id=name, label=f"bring_up/{name}", holds_slot=True, slots=slots, shares=shares, heartbeat_age_s=3)


def test_a_time_sliced_limit_is_stated_in_hundredths_with_each_run_s_share() -> None:
    text = GpuLimitStatus(
        exists=True, limit=SHARE_SLOTS, active_slots=90, runs=[run("chat", 55, True), run("fim", 35, True)]
    ).describe()
    assert text.startswith(f"GPU limit {GPU_LIMIT} (time-sliced): 90 of {SHARE_SLOTS} hundredths of the GPU held; ")
    assert "bring_up/chat holds 55 hundredths of the GPU: live" in text, text
    assert "bring_up/fim holds 35 hundredths of the GPU: live" in text, text
    assert "but only" not in text, text  # 55 + 35 on record = 90 held: every share accounted for


def test_an_exclusive_limit_keeps_its_wording() -> None:
    text = GpuLimitStatus(exists=True, limit=1, active_slots=1, runs=[run("chat", 1, False)]).describe()
    held = "bring_up/chat holds the GPU: live (last heartbeat 3 s ago; one every 30 s)"
    assert text == f"GPU limit {GPU_LIMIT}: 1/1 slot(s) held; {held}", text
