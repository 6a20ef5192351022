"""``python -m coder_stack_dev.bench.run [--quick] [--json PATH]``: the benchmark on the simulated stack.

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Config:
    name: str
    time_scale: float  # detect, peers, handoff: coder-chat's 670 simulated seconds of cold start x this
    detect_n: int
    peer_reps: int
    validate_scale: float  # validate and the sequential runbook
    handoff_sessions: int  # queued swaps: one hand-off fewer (full: 10 hand-offs for the p95)
    scale_scale: float
    scale_models: tuple[int, ...]
    scale_gpus: tuple[int, ...]
    rss_scale: float
    rss_sessions: int
    rss_gpus: int
    workday_sim_scale: float  # the workday's sim check (SimStack); the day itself is replayed in simulated time
    workday_trace: str  # "full" (workday_trace) or "short" (short_trace)
    workday_sim_days: float | None  # each policy's day also on SimStack at this time scale (None: replay only)


FULL = Config("full", 0.01, 20, 3, 0.08, 11, 0.005, (1, 5, 20), (1, 2, 4), 0.005, 20, 4, 0.01, "full", 0.004)
QUICK = Config("quick", 0.005, 6, 1, 0.01, 3, 0.003, (1, 3, 6), (1, 2), 0.003, 5, 2, 0.005, "full", None)
# the tests' plumbing run
TINY = Config("tiny", 0.002, 2, 1, 0.002, 2, 0.002, (1, 2, 3), (1,), 0.002, 2, 1, 0.002, "short", None)

TARGETS: dict[str, tuple[str, float]] = {
    "detect_p95_ms": ("<=", 250.0),
    "fault_report_max_ms": ("<=", 2000.0),
    "validate_overhead_ratio": ("<=", 1.05),
    "overlap_fraction": (">=", 0.95),
    "handoff_p95_s": ("<=", 2.0),
    "flow_process_rss_mb": ("<=", 300.0),
    "crash_gpu0_max_s": ("<=", 150.0),
}
# The crash group's repetitions (each one to two minutes of real-time heartbeats), per configuration name.
CRASH_REPS = {"full": 3, "quick": 1, "tiny": 1}
# The deployed clean-up's wait after the mark in the tests' plumbing run (production's CRASH_SETTLE_S, 40 s, in the
# others): the plumbing is the same, and the wait is proven where it matters (tests/flows/test_crash_cleanup.py).
CRASH_SETTLE = {"tiny": 1.0}


# Linear: the seconds each extra round of sessions adds, from 5 to 20 sessions, at most this many times
# what it adds from 1 to 5 (the machine's noise is ~20 %).
LINEAR_RATIO = 1.5


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


def linearity(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per GPU count: seconds each extra round of sessions added, from the fewest to the middle and from
    the middle to the most sessions. Total time is linear in the sessions when the two agree."""
    out = []
    for g in sorted({r["gpus"] for r in rows}):
        rs = sorted((r for r in rows if r["gpus"] == g), key=lambda r: r["models"])
        if len(rs) < 3 or len({r["sessions_per_gpu"] for r in rs}) < 3:
            continue
        a, b, c = rs[0], rs[len(rs) // 2], rs[-1]

        def slope(x: dict[str, Any], y: dict[str, Any]) -> float:
            return (y["total_s"] - x["total_s"]) / (y["sessions_per_gpu"] - x["sessions_per_gpu"])

        first, second = slope(a, b), slope(b, c)
        out.append(
            {
                "gpus": g,
                "sessions": [a["models"], b["models"], c["models"]],
                "s_per_round_first": round(first, 3),
                "s_per_round_second": round(second, 3),
                "ratio": round(second / first, 3) if first > 0 else float("nan"),
            }
        )
    return out


def table(res: dict[str, Any]) -> str:
    rss = res.get("peak_rss_mb") or {}
    rows = [
        ("detect_p50_ms", res.get("detect_p50_ms"), ""),
        ("detect_p95_ms", res.get("detect_p95_ms"), "<= 250"),
        ("  pod Ready written -> wait saw it, p50 (ms)", res.get("watch_p50_ms"), ""),
        ("fault_report_p50_ms", res.get("fault_report_p50_ms"), ""),
        ("fault_report_max_ms", res.get("fault_report_max_ms"), "<= 2000"),
        ("validate_overhead_ratio", res.get("validate_overhead_ratio"), "<= 1.05 (at a critical path >= 60 s)"),
        (
            "  validate wall / critical path (s)",
            (
                f"{res['validate_wall_s']:.1f} / {res['validate_critical_path_s']:.1f}"
                if "validate_wall_s" in res
                else None
            ),
            "",
        ),
        ("overlap_fraction", res.get("overlap_fraction"), ">= 0.95"),
        ("handoff_p50_s", res.get("handoff_p50_s"), ""),
        ("handoff_p95_s", res.get("handoff_p95_s"), "<= 2"),
        ("naive_poll_ratio", res.get("naive_poll_ratio"), "(> 1: ours is faster)"),
        ("kubectl_wait_ratio", res.get("kubectl_wait_ratio"), "~1"),
        ("  kubectl: Ready -> returned, p50 (ms)", res.get("kubectl_detect_p50_ms"), "ours: detect_p50_ms"),
        ("  kubectl_detect_ratio", res.get("kubectl_detect_ratio"), "(> 1: ours returns sooner)"),
        ("  cold start: ours - kubectl's (ms)", res.get("kubectl_cold_start_diff_ms"), "(the sim's, not a wait)"),
        ("sequential_ratio", res.get("sequential_ratio"), "(> 1: ours is faster)"),
        ("peak_rss_mb flow process", rss.get("flow_process"), "<= 300"),
        ("peak_rss_mb simulated stack", rss.get("sim"), ""),
        ("peak_rss_mb bench process (flows + sims)", rss.get("bench_process"), ""),
        ("crash: SIGKILL -> Crashed, median (s)", res.get("crash_crashed_median_s"), ""),
        ("wake: request -> readable 503, median (ms)", res.get("wake_answer_ms_median"), "< 1000"),
        ("wake: request -> wake_model run exists, median (s)", res.get("wake_to_run_s_median"), ""),
        ("wake: request -> run Running, median (s)", res.get("wake_to_running_s_median"), ""),
        ("wake: request -> model scaled up, median (s)", res.get("wake_to_scale_up_s_median"), "what the wake adds"),
        ("wake: request -> Ready on a real cluster, est. (s)", res.get("wake_request_to_ready_real_s_estimate"), ""),
        ("crash: SIGKILL -> GPU at 0, median (s)", res.get("crash_gpu0_median_s"), ""),
        ("crash: SIGKILL -> slot free, median (s)", res.get("crash_slot_free_median_s"), ""),
        ("crash: SIGKILL -> GPU at 0, worst (s)", res.get("crash_gpu0_max_s"), "<= 150"),
    ]
    # the wake hook's overhead on a serving model (--only hook): every figure hook_overhead returned
    rows += [
        (f"hook: {k}", v, "")
        for k, v in (res.get("hook_overhead") or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    rows = [r for r in rows if r[1] is not None]
    out: list[str] = []
    if rows:
        w = max(len(r[0]) for r in rows)
        out += [f"{'figure':<{w}}  {'value':>12}  target", f"{'-' * w}  {'-' * 12}  {'-' * 30}"]
        for name, value, target in rows:
            out.append(f"{name:<{w}}  {_fmt(value):>12}  {target}")
    if res.get("scale"):
        out += ["", "scale: every model requested at once (one GPU session each)", ""]
        out.append(
            f"{'models':>6} {'GPUs':>4} {'total s':>8} {'ideal s':>8} {'ratio':>6} {'s/round':>8} "
            f"{'overcommit':>10} {'max GPU pods':>12} {'slot req':>8} {'503':>4} {'in req s':>8}"
        )
        for r in res["scale"]:
            per = r["total_s"] / r["sessions_per_gpu"]
            out.append(
                f"{r['models']:>6} {r['gpus']:>4} {r['total_s']:>8.1f} {r['ideal_s']:>8.1f} "
                f"{r['ratio_to_ideal']:>6.2f} {per:>8.2f} {r['overcommit']:>10} {r['max_gpu_pods']:>12} "
                f"{r['slot_requests']:>8} {r['slot_request_503']:>4} {r['slot_request_s']:>8.1f}"
            )
        lin = res.get("scale_linearity") or []
        if lin:
            out += ["", "linearity: seconds added per extra round of sessions (equal = linear)"]
            for x in lin:
                a, b, c = x["sessions"]
                out.append(
                    f"  {x['gpus']} GPU(s): {a}->{b} sessions {x['s_per_round_first']:.2f} s/round, "
                    f"{b}->{c} sessions {x['s_per_round_second']:.2f} s/round (ratio {x['ratio']:.2f})"
                )
    if res.get("targets"):
        out += ["", "targets:"]
        for k, v in res["targets"].items():
            out.append(f"  {k} {v['op']} {v['target']}: {_fmt(v['value'])} -> {'met' if v['met'] else 'MISSED'}")
    return "\n".join(out)


def targets(res: dict[str, Any]) -> dict[str, Any]:
    """Each target whose figure this run measured: value and whether it is met."""
    out = {
        k: {"op": op, "target": target, "value": res[k], "met": _met(res[k], op, target)}
        for k, (op, target) in TARGETS.items()
        if k in res
    }
    if "scale" in res or "handoff_overcommit" in res:
        counts = [r["overcommit"] for r in res.get("scale", [])] + [res.get("handoff_overcommit", 0)]
        out["zero_overcommit"] = {"op": "==", "target": 0, "value": sum(counts), "met": not any(counts)}
    for x in res.get("scale_linearity", []):
        out[f"linear_in_sessions_{x['gpus']}_gpu"] = {
            "op": "<=",
            "target": LINEAR_RATIO,
            "value": x["ratio"],
            "met": _met(x["ratio"], "<=", LINEAR_RATIO),
        }
    return out


# The scenario groups `--only` picks from. Those in PREFECT_GROUPS run flows on a Prefect server; the others
# need none.
GROUPS = ("detect", "validate", "handoff", "scale", "rss", "crash", "wake", "workday", "hook")
PREFECT_GROUPS = ("detect", "validate", "handoff", "scale", "rss", "crash", "wake")
# The wake group's repetitions and its worker's poll interval (None: Prefect's default, 10 s), per configuration.
WAKE_REPS = {"full": 3, "quick": 1, "tiny": 1}
WAKE_TIME_SCALE = 0.01  # coder-chat's cold start on an empty autoscaled pool: 670 simulated s, ~7 s here
HOOK_REPS = {"full": 2000, "quick": 500, "tiny": 50}  # requests per side (without / with the wake hook)


def run_hook(cfg: Config, log: Any) -> dict[str, Any]:
    """The wake hook's overhead on a request to a serving model: ``coder_stack_dev.bench.hook.hook_overhead``
    (imported here, so the other groups run without it)."""
    from coder_stack_dev.bench.hook import hook_overhead

    reps = HOOK_REPS.get(cfg.name, HOOK_REPS["full"])
    t = time.monotonic()
    log(f"hook: {reps} requests to a serving model without and with the wake hook")
    res = dict(asyncio.run(hook_overhead(reps, log)))
    return {"hook_overhead": res, "hook_seconds": round(time.monotonic() - t, 1)}


def run_workday(
    cfg: Config, log: Any, price: float, crash_cleanup_s: float, trace_file: str | None = None,
    wake_latency_s: float | None = None, react_s: float | None = 0.0, team_trace_file: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    from coder_stack.spec import StackSpec
    from coder_stack_dev.bench import workday

    models = [m.name for m in StackSpec().models]
    if trace_file is not None:
        trace = workday.read_trace(trace_file, models)
    else:
        trace = workday.short_trace() if cfg.workday_trace == "short" else workday.workday_trace()
    t = time.monotonic()
    log(f"workday: {trace.n_requests} requests replayed per policy; sim check at time scale {cfg.workday_sim_scale}")
    if cfg.workday_sim_days is not None:
        log(f"workday: each policy's day on SimStack too, time scale {cfg.workday_sim_days} (~3 min each at 0.004)")
    res = workday.workday(
        trace, crash_cleanup_s=crash_cleanup_s, price=price, sim_scale=cfg.workday_sim_days, log=log,
        wake_latency_s=workday.WAKE_LATENCY_S if wake_latency_s is None else wake_latency_s, trace_source=trace_file,
        react_s=react_s,
        team=None if team_trace_file is None else workday.read_trace(team_trace_file, models),
        team_source=team_trace_file,
    )  # fmt: skip
    res["workday_sim_check"] = workday.sim_check(cfg.workday_sim_scale)
    res["workday_seconds"] = round(time.monotonic() - t, 1)
    return res


async def _run(cfg: Config, log: Any, only: tuple[str, ...] = PREFECT_GROUPS) -> dict[str, Any]:
    from prefect.settings import PREFECT_API_URL

    from coder_stack.flows.process import freeze_startup_heap
    from coder_stack.orchestration.gpu_limit import ensure_gpu_limit
    from coder_stack_dev.bench import rss, scenarios

    res: dict[str, Any] = {}
    timing: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timing[name] = round(time.monotonic() - t0, 1)

    await ensure_gpu_limit(1)
    freeze_startup_heap()  # as the CLI does before a flow: the Prefect server and client are up by now
    if "detect" in only:
        t = time.monotonic()
        log(f"detect: {cfg.detect_n} coder-chat cold starts (time scale {cfg.time_scale})")
        det = await scenarios.detect(cfg.time_scale, cfg.detect_n, log)
        res.update(det)
        lap("detect", t)

        t = time.monotonic()
        reps = max(1, cfg.detect_n // 4)
        log(f"fault report: {reps} coder-chat cold starts into a crash loop")
        res.update(await scenarios.fault_report(cfg.time_scale, reps, log))
        lap("fault_report", t)

        t = time.monotonic()
        log(f"peers: naive retry loop and kubectl rollout status, {cfg.peer_reps} each")
        res.update(await scenarios.peers(cfg.time_scale, cfg.peer_reps, det, log))
        lap("peers", t)

    if "validate" in only:
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

    if "handoff" in only:
        t = time.monotonic()
        log(f"handoff: {cfg.handoff_sessions} swap_model runs queued on one GPU")
        res.update(await scenarios.handoff(cfg.time_scale, cfg.handoff_sessions, log))
        lap("handoff", t)

    if "scale" in only:
        t = time.monotonic()
        log(f"scale: {cfg.scale_models} models x {cfg.scale_gpus} GPUs (time scale {cfg.scale_scale})")
        res["scale"] = await scenarios.scale(cfg.scale_scale, cfg.scale_models, cfg.scale_gpus, log)
        await ensure_gpu_limit(1)
        lap("scale", t)

    if "rss" in only:
        t = time.monotonic()
        log("peak RSS: flow process and simulated stack in separate processes")
        api_url = PREFECT_API_URL.value()
        mem = await asyncio.to_thread(rss.measure, api_url, cfg.rss_scale, cfg.rss_sessions, cfg.rss_gpus)
        mem["bench_process"] = round(rss.vmhwm_mb(), 1)
        res["peak_rss_mb"] = mem
        res["flow_process_rss_mb"] = mem["flow_process"]
        lap("rss", t)

    if "crash" in only:
        from coder_stack_dev.bench import crash

        t = time.monotonic()
        reps = CRASH_REPS.get(cfg.name, 1)
        log(f"crash: {reps} flow process(es) SIGKILLed mid cold start; the crash chain frees the GPU")
        res.update(await crash.crash(cfg.time_scale, reps, log, settle_s=CRASH_SETTLE.get(cfg.name)))
        lap("crash", t)

    if "wake" in only:
        from coder_stack_dev.bench import wake

        t = time.monotonic()
        reps = WAKE_REPS.get(cfg.name, 1)
        log(f"wake: {reps} request(s) for a reclaimed coder-chat through the gateway, to Ready with no human action")
        res.update(await wake.wake(WAKE_TIME_SCALE, reps, log))
        lap("wake", t)
    res["scenario_seconds"] = timing
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="coder-stack bench", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="Fewer, shorter runs (under 3 minutes); not for the record.")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests' plumbing run
    p.add_argument("--json", metavar="PATH", default="bench-results.json", help="Where to write the results.")
    p.add_argument("--verbose", action="store_true", help="Show Prefect's run logs on the terminal.")
    p.add_argument(
        "--only",
        metavar="GROUPS",
        default=",".join(GROUPS),
        help=f"Comma-separated scenario groups to run, of: {', '.join(GROUPS)} (default: all).",
    )
    p.add_argument(
        "--prefect-api",
        metavar="URL",
        help="Run the flows against this Prefect server (e.g. one on PostgreSQL) instead of a temporary "
        "SQLite test server. It should be used by nothing else meanwhile; the run sets tag:gpu.",
    )
    p.add_argument(
        "--workday-price",
        type=float,
        metavar="USD",
        help="The GPU node's hourly price for the workday's cost (default: GCP g2-standard-4 on-demand, assumed).",
    )
    p.add_argument(
        "--crash-cleanup-s",
        type=float,
        default=120.0,
        metavar="S",
        help="The workday's crash clean-up bound: a killed run's models at 0 and slot freed this long after the kill.",
    )
    p.add_argument(
        "--trace",
        metavar="FILE",
        help="The workday's requests from this trace file (CSV time,model,kind; the format and an example, the "
        "built-in day: devtools/coder_stack_dev/bench/workday/workday.trace.csv) instead of the built-in day.",
    )
    p.add_argument(
        "--team-trace",
        metavar="FILE",
        help="The workday's chat-and-completion rows (exclusive and time-sliced GPU) from this trace file (same "
        "format; the built-in team day: devtools/coder_stack_dev/bench/workday/team.trace.csv).",
    )
    p.add_argument(
        "--wake-latency-s",
        type=float,
        metavar="S",
        help="The workday's wake latency, event -> trigger -> worker -> flow start (default 10 s: Prefect's "
        "process worker polls every 10 s).",
    )
    p.add_argument(
        "--react-s",
        default="0",
        metavar="S|never",
        help="The workday without wake: a person brings a model back this long after the first request that "
        "failed (default 0: at once, a lower bound); 'never': nobody does, it stays down until a schedule.",
    )
    p.add_argument(
        "--scale-time-scale",
        type=float,
        metavar="F",
        help="Time scale of the scale scenario only (default: the configuration's; 0.005 in the full run).",
    )
    args = p.parse_args(argv)
    cfg = TINY if args.tiny else QUICK if args.quick else FULL
    if args.scale_time_scale is not None:
        if not 0.001 <= args.scale_time_scale <= 1.0:
            p.error("--scale-time-scale: give a factor between 0.001 and 1 (0.01 makes coder-chat's cold start ~7 s)")
        cfg = replace(cfg, scale_scale=args.scale_time_scale)
    only = tuple(g.strip() for g in args.only.split(",") if g.strip())
    unknown = sorted(set(only) - set(GROUPS))
    if unknown or not only:
        p.error(f"--only: unknown group(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(GROUPS)}")
    if args.workday_price is not None and args.workday_price <= 0:
        p.error("--workday-price: give a price above 0 (USD per node-hour)")
    if args.crash_cleanup_s < 0:
        p.error("--crash-cleanup-s: give 0 or more seconds")
    react_s: float | None = None
    if args.react_s != "never":
        try:
            react_s = float(args.react_s)
        except ValueError:
            react_s = -1.0
        if not react_s >= 0:
            p.error("--react-s: give 0 or more seconds, or 'never'")
    if "hook" in only:  # a real LiteLLM proxy is needed: say so before any group runs, not after them
        from coder_stack_dev.bench.hook import litellm_program

        try:
            litellm_program()
        except RuntimeError as e:
            p.error(f"hook: {e} (or leave hook out: --only {','.join(g for g in only if g != 'hook') or 'workday'})")
    if args.wake_latency_s is not None and args.wake_latency_s < 0:
        p.error("--wake-latency-s: give 0 or more seconds")
    for flag, path in (("--trace", args.trace), ("--team-trace", args.team_trace)):
        if path is None:
            continue
        from coder_stack.spec import StackSpec
        from coder_stack_dev.bench.workday import TraceError, read_trace

        try:
            read_trace(path, [m.name for m in StackSpec().models])  # a bad file fails before any run
        except TraceError as e:
            p.error(f"{flag}: {e}")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")  # as the CLI: GPU sessions require it

    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.monotonic()
    info = machine()
    log(f"coder-stack bench ({cfg.name}) on {info['cpu']} x{info['cores']}, load {info['loadavg_start']}")
    res: dict[str, Any] = {}
    prefect_groups = tuple(g for g in only if g in PREFECT_GROUPS)
    if prefect_groups:
        if args.prefect_api:
            server: Any = temporary_settings(updates={PREFECT_API_URL: args.prefect_api})
            info["prefect_server"] = "given: " + args.prefect_api
        else:
            server = prefect_test_harness(server_startup_timeout=120)
            info["prefect_server"] = "prefect_test_harness (temporary, SQLite)"
        with server:
            log(f"Prefect API {PREFECT_API_URL.value()} ready after {time.monotonic() - t_start:.1f} s")
            if not args.verbose:
                _quiet_prefect_console()
            res = asyncio.run(_run(cfg, log, prefect_groups))
    if "workday" in only:
        from coder_stack_dev.bench.workday import NODE_PRICE_PER_HOUR

        price = args.workday_price if args.workday_price is not None else NODE_PRICE_PER_HOUR
        res.update(
            run_workday(
                cfg, log, price, args.crash_cleanup_s, args.trace, args.wake_latency_s, react_s, args.team_trace
            )
        )
    if "hook" in only:
        res.update(run_hook(cfg, log))
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if res.get("scale"):
        res["scale_linearity"] = linearity(res["scale"])
    res["targets"] = targets(res)
    res["config"] = asdict(cfg)
    res["machine"] = info
    res["command"] = "python -m coder_stack_dev.bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    res["total_seconds"] = round(time.monotonic() - t_start, 1)
    Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(table(res))
    if "workday" in res:
        from coder_stack_dev.bench.workday import table as workday_table

        print(("\n" if table(res) else "") + workday_table(res))
    print(f"\n{cfg.name} run: {res['total_seconds']:.0f} s; JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
