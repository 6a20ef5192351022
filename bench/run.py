"""``python -m bench.run [--quick] [--json PATH]``: the benchmark of issue 5 on the simulated stack.

One ``prefect_test_harness()`` (a local Prefect API server on SQLite, in a subprocess) serves every
flow of the run: it starts once (~15 s here) and nothing else shares it, so its latency is the API's,
not a shared server's. Every scenario builds fresh simulated clusters in this process (a thread each)
and runs real flows against them; see BENCHMARKS.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Config:
    name: str
    time_scale: float  # detect, peers, handoff: coder-chat's 670 simulated seconds of cold start x this
    detect_n: int
    peer_reps: int
    validate_scale: float  # validate and the sequential runbook
    handoff_sessions: int
    scale_scale: float
    scale_models: tuple[int, ...]
    scale_gpus: tuple[int, ...]
    rss_scale: float
    rss_sessions: int
    rss_gpus: int


FULL = Config("full", 0.01, 20, 3, 0.08, 6, 0.005, (1, 5, 20), (1, 2, 4), 0.005, 20, 4)
QUICK = Config("quick", 0.005, 6, 1, 0.01, 3, 0.003, (1, 5), (1, 2), 0.003, 5, 2)
TINY = Config("tiny", 0.002, 2, 1, 0.002, 2, 0.002, (1, 2), (1, 2), 0.002, 2, 1)  # the tests' plumbing run

TARGETS: dict[str, tuple[str, float]] = {
    "detect_p95_ms": ("<=", 250.0),
    "validate_overhead_ratio": ("<=", 1.05),
    "overlap_fraction": (">=", 0.95),
    "handoff_p95_s": ("<=", 2.0),
    "flow_process_rss_mb": ("<=", 300.0),
}


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    import prefect

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "prefect": prefect.__version__,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _quiet_prefect_console() -> None:
    """Keep Prefect's run logs going to the API (part of the cost measured) but off the terminal."""
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.server", "prefect.client"):
        for h in logging.getLogger(name).handlers:
            if type(h).__name__ != "APILogHandler":
                h.setLevel(logging.ERROR)


def _met(value: float, op: str, target: float) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return value <= target if op == "<=" else value >= target


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table(res: dict[str, Any]) -> str:
    rows = [
        ("detect_p50_ms", res["detect_p50_ms"], ""),
        ("detect_p95_ms", res["detect_p95_ms"], "<= 250"),
        ("validate_overhead_ratio", res["validate_overhead_ratio"], "<= 1.05 (at a critical path >= 60 s)"),
        (
            "  validate wall / critical path (s)",
            f"{res['validate_wall_s']:.1f} / {res['validate_critical_path_s']:.1f}",
            "",
        ),
        ("overlap_fraction", res["overlap_fraction"], ">= 0.95"),
        ("handoff_p50_s", res["handoff_p50_s"], ""),
        ("handoff_p95_s", res["handoff_p95_s"], "<= 2"),
        ("naive_poll_ratio", res["naive_poll_ratio"], "(> 1: ours is faster)"),
        ("kubectl_wait_ratio", res["kubectl_wait_ratio"], "~1"),
        ("sequential_ratio", res["sequential_ratio"], "(> 1: ours is faster)"),
        ("peak_rss_mb flow process", res["peak_rss_mb"]["flow_process"], "<= 300"),
        ("peak_rss_mb simulated stack", res["peak_rss_mb"]["sim"], ""),
        ("peak_rss_mb bench process (flows + sims)", res["peak_rss_mb"]["bench_process"], ""),
    ]
    w = max(len(r[0]) for r in rows)
    out = [f"{'figure':<{w}}  {'value':>12}  target", f"{'-' * w}  {'-' * 12}  {'-' * 30}"]
    for name, value, target in rows:
        out.append(f"{name:<{w}}  {_fmt(value):>12}  {target}")
    out += ["", "scale: every model requested at once (one GPU session each)", ""]
    out.append(
        f"{'models':>6} {'GPUs':>4} {'total s':>8} {'ideal s':>8} {'ratio':>6} {'s/round':>8} "
        f"{'overcommit':>10} {'max GPU pods':>12}"
    )
    for r in res["scale"]:
        per = r["total_s"] / r["sessions_per_gpu"]
        out.append(
            f"{r['models']:>6} {r['gpus']:>4} {r['total_s']:>8.1f} {r['ideal_s']:>8.1f} {r['ratio_to_ideal']:>6.2f} "
            f"{per:>8.2f} {r['overcommit']:>10} {r['max_gpu_pods']:>12}"
        )
    out += ["", "targets:"]
    for k, v in res["targets"].items():
        out.append(f"  {k} {v['op']} {v['target']}: {_fmt(v['value'])} -> {'met' if v['met'] else 'MISSED'}")
    return "\n".join(out)


async def _run(cfg: Config, log: Any) -> dict[str, Any]:
    from prefect.settings import PREFECT_API_URL

    from bench import rss, scenarios
    from coder_stack.gpu import ensure_gpu_limit

    res: dict[str, Any] = {}
    timing: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timing[name] = round(time.monotonic() - t0, 1)

    await ensure_gpu_limit(1)
    t = time.monotonic()
    log(f"detect: {cfg.detect_n} coder-chat cold starts (time scale {cfg.time_scale})")
    det = await scenarios.detect(cfg.time_scale, cfg.detect_n, log)
    res.update(det)
    lap("detect", t)

    t = time.monotonic()
    log(f"peers: naive retry loop and kubectl rollout status, {cfg.peer_reps} each")
    res.update(await scenarios.peers(cfg.time_scale, cfg.peer_reps, det["bringup_s"], log))
    lap("peers", t)

    t = time.monotonic()
    log(f"validate_coder_stack (chat, FIM) at time scale {cfg.validate_scale}")
    res.update(await scenarios.validate(cfg.validate_scale, log))
    lap("validate", t)

    t = time.monotonic()
    log("the same runbook strictly in order")
    seq = await scenarios.sequential(cfg.validate_scale, log)
    res.update(seq)
    res["sequential_ratio"] = seq["sequential_wall_s"] / res["validate_wall_s"]
    lap("sequential", t)

    t = time.monotonic()
    log(f"handoff: {cfg.handoff_sessions} swap_model runs queued on one GPU")
    res.update(await scenarios.handoff(cfg.time_scale, cfg.handoff_sessions, log))
    lap("handoff", t)

    t = time.monotonic()
    log(f"scale: {cfg.scale_models} models x {cfg.scale_gpus} GPUs (time scale {cfg.scale_scale})")
    res["scale"] = await scenarios.scale(cfg.scale_scale, cfg.scale_models, cfg.scale_gpus, log)
    await ensure_gpu_limit(1)
    lap("scale", t)

    t = time.monotonic()
    log("peak RSS: flow process and simulated stack in separate processes")
    api_url = PREFECT_API_URL.value()
    mem = await asyncio.to_thread(rss.measure, api_url, cfg.rss_scale, cfg.rss_sessions, cfg.rss_gpus)
    mem["bench_process"] = round(rss.vmhwm_mb(), 1)
    res["peak_rss_mb"] = mem
    lap("rss", t)
    res["scenario_seconds"] = timing
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="coder-stack bench", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="Fewer, shorter runs (under 3 minutes); not for the record.")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests' plumbing run
    p.add_argument("--json", metavar="PATH", default="bench-results.json", help="Where to write the results.")
    p.add_argument("--verbose", action="store_true", help="Show Prefect's run logs on the terminal.")
    args = p.parse_args(argv)
    cfg = TINY if args.tiny else QUICK if args.quick else FULL
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from prefect.testing.utilities import prefect_test_harness

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.monotonic()
    info = machine()
    log(f"coder-stack bench ({cfg.name}) on {info['cpu']} x{info['cores']}, load {info['loadavg_start']}")
    with prefect_test_harness(server_startup_timeout=120):
        log(f"Prefect test harness up after {time.monotonic() - t_start:.1f} s")
        if not args.verbose:
            _quiet_prefect_console()
        res = asyncio.run(_run(cfg, log))
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["flow_process_rss_mb"] = res["peak_rss_mb"]["flow_process"]
    res["targets"] = {
        k: {"op": op, "target": target, "value": res[k], "met": _met(res[k], op, target)}
        for k, (op, target) in TARGETS.items()
    }
    res["targets"]["zero_overcommit"] = {
        "op": "==",
        "target": 0,
        "value": sum(r["overcommit"] for r in res["scale"]) + res["handoff_overcommit"],
        "met": all(r["overcommit"] == 0 for r in res["scale"]) and res["handoff_overcommit"] == 0,
    }
    res["config"] = asdict(cfg)
    res["machine"] = info
    res["command"] = "python -m bench.run" + (" --quick" if args.quick else "") + (" --tiny" if args.tiny else "")
    res["total_seconds"] = round(time.monotonic() - t_start, 1)
    Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(table(res))
    print(f"\n{cfg.name} run: {res['total_seconds']:.0f} s; JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
