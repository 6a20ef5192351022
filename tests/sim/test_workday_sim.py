"""The workday scenario on the simulated cluster: the sim check's measured durations agree with the ones the
replay uses, and ``coder-stack bench --only workday`` prints the table and writes the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coder_stack.app.bench.run import main
from coder_stack.app.bench.workday import sim_check

SCALE = 0.002


def test_the_sim_measures_what_the_replay_models() -> None:
    chk = sim_check(SCALE)
    assert chk["third_start_on_the_same_node"]
    for key, modelled in chk["modelled_s"].items():
        measured = chk["measured_s"][key]
        # never faster than the sim's own durations; slower by at most the controllers' latency (wall ms)
        assert modelled - 1 <= measured <= modelled + 0.06 / SCALE, (key, measured, modelled)


@pytest.mark.timeout(120)
def test_bench_only_workday_prints_the_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    assert (
        main(["--tiny", "--only", "workday", "--json", str(out), "--workday-price", "1.0", "--crash-cleanup-s", "60"])
        == 0
    )
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    names = [r["policy"] for r in res["workday"]]
    assert names[:3] == ["by_hand", "schedules", "schedules_cleanup"]
    assert {"reclaim_15", "reclaim_30", "reclaim_60"} <= set(names)
    for r in res["workday"]:
        assert r["node_hours"] > 0 and r["cost_per_day"] == pytest.approx(r["node_hours"], abs=0.01)
        assert r["cost_per_month"] == pytest.approx(21 * r["node_hours"], abs=0.1)
        assert f"{r['cost_per_day']:.2f}" in printed and r["label"] in printed
    cleaned = next(r for r in res["workday"] if r["policy"] == "schedules_cleanup")
    assert cleaned["killed"]["agent_min_after_kill"] == 1.0  # the 60 s bound given
    assert res["workday_assumptions"]["node_price_per_hour"] == 1.0
    assert "sim check" in printed and res["workday_sim_check"]["measured_s"]
    assert "detect_p50_ms" not in res  # no Prefect group ran
