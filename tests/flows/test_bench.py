"""The benchmark's plumbing (``python -m coder_stack_dev.bench.run``) on a tiny configuration: it runs end to end,
prints its table and writes JSON with every field the issue asks for. Its numbers are not asserted
beyond sanity: they depend on the machine (see BENCHMARKS.md for a real run)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from coder_stack_dev.bench.run import FULL, GROUPS, QUICK, TARGETS, linearity, main, table
from coder_stack_dev.bench.scenarios import bench_spec, percentile, validate_critical_path

from coder_stack.spec import StackSpec

ROOT = Path(__file__).resolve().parents[2]

FIELDS = [
    "detect_p50_ms",
    "detect_p95_ms",
    "validate_overhead_ratio",
    "overlap_fraction",
    "handoff_p50_s",
    "handoff_p95_s",
    "naive_poll_ratio",
    "kubectl_wait_ratio",
    "kubectl_detect_p50_ms",  # the ratio's parts: each side's Ready -> returned, and the cold start it waited
    "kubectl_detect_ratio",
    "sequential_ratio",
    "kubectl_cold_start_diff_ms",  # either sign
    "scale",
    "peak_rss_mb",
    "fault_report_max_ms",  # the crash-loop report latency test_kube_wait no longer bounds
]


def test_percentile_and_critical_path() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([5.0], 0.95) == 5.0
    total, parts = validate_critical_path(StackSpec())
    # coder-chat 240 + 240 + 150 + 40, two spend writes of 10, two terminations of 2, coder-fim ~84.5 + ~26.9
    # (fim's weights and start scale with its 3.1 GB of weights)
    assert total == pytest.approx(670 + 10 + 2 + 111.4 + 10 + 2, abs=0.1)
    assert len(parts) == 6
    spec = bench_spec(5, 2)
    assert [m.name for m in spec.models] == ["m01", "m02", "m03", "m04", "m05"] and spec.gpus == 2


def test_linearity_compares_the_seconds_each_extra_round_adds() -> None:
    def row(models: int, gpus: int, total: float) -> dict[str, float]:
        return {"models": models, "gpus": gpus, "total_s": total, "sessions_per_gpu": -(-models // gpus)}

    linear = [row(1, 1, 4.0), row(5, 1, 12.0), row(20, 1, 42.0)]  # 2 s per extra session throughout
    curved = [row(1, 4, 4.0), row(5, 4, 6.0), row(20, 4, 30.0)]  # 2 s, then 8 s per extra round
    out = linearity(linear + curved + [row(1, 2, 4.0), row(5, 2, 8.0)])  # 2 GPUs: two points, no verdict
    assert out == [
        {"gpus": 1, "sessions": [1, 5, 20], "s_per_round_first": 2.0, "s_per_round_second": 2.0, "ratio": 1.0},
        {"gpus": 4, "sessions": [1, 5, 20], "s_per_round_first": 2.0, "s_per_round_second": 8.0, "ratio": 4.0},
    ]


def test_bad_arguments_are_refused_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--only", "scale,warp"])
    assert e.value.code == 2 and "unknown group(s) warp; choose from detect, validate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--scale-time-scale", "5"])
    assert e.value.code == 2 and "between 0.001 and 1" in capsys.readouterr().err


def test_configs_cover_the_issue() -> None:
    assert FULL.detect_n >= 20 and FULL.scale_models == (1, 5, 20) and FULL.scale_gpus == (1, 2, 4)
    assert validate_critical_path(StackSpec())[0] * FULL.validate_scale >= 60  # the target's condition
    assert QUICK.detect_n < FULL.detect_n


# Every group but ``hook``: it starts two real LiteLLM proxies (~20 s) to time the wake hook, whose loading and
# working the real-LiteLLM tier (tests/litellm_proxy/) proves, and whose report the devtools tier checks
# (test_workday_wake.py::test_bench_only_hook_reports_what_hook_overhead_measured).
TINY_GROUPS = [g for g in GROUPS if g != "hook"]


@pytest.mark.timeout(900)
def test_tiny_run_writes_every_field(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coder_stack_dev.bench.run",
            "--tiny",
            "--json",
            str(out),
            "--only",
            ",".join(TINY_GROUPS),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=880,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for f in FIELDS:
        assert f in res, f
    for f in FIELDS[:11]:
        assert isinstance(res[f], float) and math.isfinite(res[f]) and res[f] >= 0, (f, res[f])
    assert isinstance(res["kubectl_cold_start_diff_ms"], float)  # either sign
    assert res["detect_p50_ms"] <= res["detect_p95_ms"]
    assert 0.0 <= res["overlap_fraction"] <= 1.0
    assert {(r["models"], r["gpus"]) for r in res["scale"]} == {(1, 1), (2, 1), (3, 1)}
    for r in res["scale"]:
        assert r["total_s"] > 0 and r["failed_runs"] == 0 and r["overcommit"] >= 0
        assert r["slot_requests"] >= r["models"] and r["slot_request_503"] >= 0
    assert [x["gpus"] for x in res["scale_linearity"]] == [1] and "linear_in_sessions_1_gpu" in res["targets"]
    assert res["peak_rss_mb"]["flow_process"] > 0 and res["peak_rss_mb"]["sim"] > 0
    assert set(TARGETS) <= set(res["targets"])
    # GPU exclusivity holds, not merely reported: no moment with more GPU pods (alive, terminating ones too) than GPUs
    overcommit = res["targets"]["zero_overcommit"]
    assert overcommit["met"] and overcommit["value"] == 0, overcommit
    assert all(r["overcommit"] == 0 and r["max_gpu_pods"] <= r["gpus"] for r in res["scale"]), res["scale"]
    assert res["machine"]["cores"] and res["config"]["name"] == "tiny"
    assert "detect_p95_ms" in proc.stdout and "overcommit" in proc.stdout
    assert table(res) in proc.stdout
    assert len(res["workday"]) == 7 and "node h" in proc.stdout and res["workday_sim_check"]["measured_s"]
    # the crash chain, as deployed: one SIGKILLed flow process, Crashed before its GPU and slot are freed
    [kill] = res["crash_kills"]
    assert 0 < kill["crashed_s"] <= kill["gpu0_s"] and kill["slot_free_s"] > 0, kill
    assert res["crash_gpu0_max_s"] == kill["gpu0_s"] and "crash: SIGKILL -> GPU at 0" in proc.stdout
    assert res["crash_settle_s"] == 1.0  # the plumbing run's clean-up decides 1 s after the mark, not production's 40
