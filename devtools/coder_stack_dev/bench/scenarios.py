"""The benchmark's scenarios. Each builds fresh simulated clusters and runs real flows against them.

All flows run in this process, on one event loop, against the Prefect API the caller set up (the
benchmark uses one ``prefect_test_harness()`` for the whole run). Concurrent flows are
``asyncio.gather``-ed in this process, as a worker running several flow runs would interleave them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from simstack.stack import SimStack
from simstack.standins import SimServices
from simstack.timings import Timings, model_timings

import coder_stack.flows.swap as swap_flow
from coder_stack.errors import PodFailed
from coder_stack.flows.params import Connection
from coder_stack.flows.swap import SwapOptions, swap_model
from coder_stack.flows.validate import Stage, ValidateOptions, validate_coder_stack
from coder_stack.orchestration.gpu import gpu_session
from coder_stack.orchestration.gpu_limit import ensure_gpu_limit
from coder_stack.orchestration.prefect_api import SLOT_REQUEST_PATH
from coder_stack.spec import ModelSpec, PhaseBudgets, StackSpec, spec_yaml
from coder_stack_dev.bench.flows import bench_bringup, gpu_session_run, sequential_runbook
from coder_stack_dev.bench.rss import SimProcess
from coder_stack_dev.bench.simrec import SimRecorder

# The wall clock and the monotonic clock, tied once (Prefect's task-run times are wall clock).
_WALL_MINUS_MONO = time.time() - time.monotonic()


def to_mono(dt: datetime) -> float:
    return dt.timestamp() - _WALL_MINUS_MONO


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------ stacks
def bench_spec(models: int, gpus: int, weights_gb: float = 5.5) -> StackSpec:
    """A stack of ``models`` GPU model Deployments (m01, m02, ...) on ``gpus`` GPUs; no client keys."""
    ms = [
        ModelSpec(
            name=f"m{i:02d}",
            role="chat",
            served_model_name=f"bench-model-{i:02d}",
            alias=f"m{i:02d}",
            weights_gb=weights_gb,
            budgets=PhaseBudgets(node=300, image=420, weights=300, start=180),
        )
        for i in range(1, models + 1)
    ]
    return StackSpec(gpus=gpus, models=ms, default_model=ms[0].name, virtual_keys=[])


@dataclass
class Bench:
    sim: SimStack
    rec: SimRecorder
    connection: Connection


@contextlib.contextmanager
def fresh_sim(
    time_scale: float, spec: StackSpec | None = None, gpu_pool: str = "autoscaled", faults: dict[str, str] | None = None
) -> Iterator[Bench]:
    """A new simulated cluster (GPU pool empty, autoscaled) with a recorder attached."""
    spec = spec or StackSpec()
    with tempfile.TemporaryDirectory(prefix="coder-bench-") as tmp:
        stack_file = None
        if spec != StackSpec():
            stack_file = Path(tmp) / "stack.yaml"
            stack_file.write_text(spec_yaml(spec))
        with SimStack(spec=spec, time_scale=time_scale, gpu_pool=gpu_pool, faults=faults) as sim:
            rec = SimRecorder.attach(sim, spec.gpus)
            conn = Connection(kubeconfig=str(sim.kubeconfig_path), stack_file=str(stack_file) if stack_file else None)
            yield Bench(sim, rec, conn)


# ------------------------------------------------------------------ detect + peers
async def bringup(time_scale: float, peer: str, model: str = "coder-chat") -> dict[str, Any]:
    """One cold start of ``model`` on a fresh cluster, waited for by ``peer``."""
    with fresh_sim(time_scale) as b:
        out = await bench_bringup(connection=b.connection, model=model, peer=peer, time_scale=time_scale)
        mark = b.rec.first_ready(model)
        if mark is None:
            raise RuntimeError(f"the simulated cluster never recorded {model} Ready")
        out["sim_ready_mono"] = mark.mono
        out["detect_ms"] = (out["t_done"] - mark.mono) * 1000
        out["bringup_s"] = out["t_done"] - out["t_scaled"]
        out["sim_cold_start_s"] = mark.mono - out["t_scaled"]
        rep = out.get("ready_report")
        if rep:
            seen = datetime.fromisoformat(rep["ready_at"]).timestamp()
            out["watch_ms"] = (seen - mark.wall) * 1000  # pod Ready written -> wait_ready saw it
            out["deployment_lag_ms"] = rep["deployment_lag_s"] * 1000  # -> the Deployment's status agreed
        return out


async def detect(time_scale: float, n: int, log: Any) -> dict[str, Any]:
    runs = []
    for i in range(n):
        r = await bringup(time_scale, "ours")
        runs.append(r)
        log(f"  bring-up {i + 1}/{n}: Ready -> wait task returned {r['detect_ms']:.0f} ms")
    d = [r["detect_ms"] for r in runs]
    return {
        "detect_p50_ms": percentile(d, 0.5),
        "detect_p95_ms": percentile(d, 0.95),
        "detect_max_ms": max(d),
        "detect_samples_ms": [round(x, 1) for x in d],
        "watch_p50_ms": percentile([r["watch_ms"] for r in runs], 0.5),
        "deployment_lag_p50_ms": percentile([r["deployment_lag_ms"] for r in runs], 0.5),
        "bringup_s": [round(r["bringup_s"], 3) for r in runs],
        "sim_cold_start_s": round(median([r["sim_cold_start_s"] for r in runs]), 4),
    }


async def fault_report(time_scale: float, n: int, log: Any) -> dict[str, Any]:
    """A cold start of coder-chat whose server crash-loops, ``n`` times: from the simulated cluster's write of
    CrashLoopBackOff to the wait task failing with PodFailed (the phase budgets are minutes: a report after a
    budget would show as such, a report after a poll as its interval)."""
    lags = []
    for i in range(n):
        with fresh_sim(time_scale, faults={"coder-chat": "crashloop"}) as b:
            try:
                await bench_bringup(connection=b.connection, model="coder-chat", time_scale=time_scale)
            except PodFailed:
                t_failed = time.monotonic()
            else:
                raise RuntimeError("the crash-looping coder-chat was reported Ready")
            mark = b.rec.first_waiting("coder-chat", "CrashLoopBackOff")
            if mark is None:
                raise RuntimeError("the simulated cluster never recorded coder-chat in CrashLoopBackOff")
            lags.append((t_failed - mark.mono) * 1000)
        log(f"  crash loop {i + 1}/{n}: CrashLoopBackOff -> PodFailed {lags[-1]:.0f} ms")
    return {
        "fault_report_p50_ms": percentile(lags, 0.5),
        "fault_report_max_ms": max(lags),
        "fault_report_samples_ms": [round(x, 1) for x in lags],
    }


async def peers(time_scale: float, reps: int, ours: dict[str, Any], log: Any) -> dict[str, Any]:
    """Each peer's bring-ups beside ours (``ours``: :func:`detect`'s result): the ratios of the median bring-up
    times (scale-up -> the wait returned), and, split out of them, each side's detection (the simulated cluster's
    Ready write -> the wait returned) and the simulated cold start it waited through (scale-up -> that write)."""
    out: dict[str, Any] = {}
    for peer in ("naive", "kubectl"):
        runs = []
        for i in range(reps):
            r = await bringup(time_scale, peer)
            runs.append(r)
            if "kubectl_path" in r:
                out.setdefault("kubectl_paths", []).append(r["kubectl_path"])
            log(
                f"  {peer} {i + 1}/{reps}: scale-up -> detected Ready {r['bringup_s']:.2f} s "
                f"(Ready -> returned {r['detect_ms']:.0f} ms)"
            )
        out[f"{peer}_bringup_s"] = [round(r["bringup_s"], 3) for r in runs]
        out[f"{peer}_detect_p50_ms"] = percentile([r["detect_ms"] for r in runs], 0.5)
        out[f"{peer}_cold_start_s"] = round(median([r["sim_cold_start_s"] for r in runs]), 4)
    mine = median(ours["bringup_s"])
    out["ours_bringup_s_median"] = round(mine, 3)
    out["naive_poll_ratio"] = median(out["naive_bringup_s"]) / mine
    out["kubectl_wait_ratio"] = median(out["kubectl_bringup_s"]) / mine
    # The ratio's two parts: detection alone (> 1: ours returns sooner after Ready), and the cold start each
    # side's wait saw the simulated cluster take (the sim's pod steps run on timers after each write, so the
    # watchers' load on its API server can lengthen them by milliseconds; a real kubelet's would not).
    out["kubectl_detect_ratio"] = out["kubectl_detect_p50_ms"] / ours["detect_p50_ms"]
    out["kubectl_cold_start_diff_ms"] = round((ours["sim_cold_start_s"] - out["kubectl_cold_start_s"]) * 1000, 1)
    return out


# ------------------------------------------------------------------ validate: overhead, overlap
def validate_critical_path(spec: StackSpec, timings: Timings | None = None) -> tuple[float, list[tuple[str, float]]]:
    """Simulated seconds of the unavoidable waits on validate_coder_stack's longest chain (chat, FIM stages).

    Fresh cluster, GPU pool empty: coder-chat's cold start (node, image, weights, start) hides the keys
    and front-ends (CPU image pull + start); each gateway smoke waits for LiteLLM's batched spend write;
    the swap and the teardown wait for the pod to terminate; coder-fim lands on the same node (image
    cached) and stages its own weights.
    """
    t = timings or Timings()
    spend = SimServices(resolve_url=lambda url: None).spend_write_delay_s
    chat, fim = model_timings(spec.model("coder-chat")), model_timings(spec.model("coder-fim"))
    cold = t.node_provision_s + t.gpu_image_pull_s + chat.weights_s + chat.server_start_s
    frontends = t.cpu_image_pull_s + t.cpu_start_s
    parts = [
        ("coder-chat cold start (node, image, weights, start), front-ends hidden behind it", max(cold, frontends)),
        ("chat gateway smoke: LiteLLM's batched spend write", spend),
        ("swap: coder-chat pod terminates", t.termination_s),
        ("coder-fim weights + start (node and image already there)", fim.weights_s + fim.server_start_s),
        ("FIM gateway smoke: LiteLLM's batched spend write", spend),
        ("teardown: pods terminate", t.termination_s),
    ]
    return sum(s for _, s in parts), parts


async def _task_runs(flow_run_id: UUID, names: set[str], settle_s: float = 15.0) -> list[Any]:
    """The flow run's task runs with these names, once they all have start and end times."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + settle_s
    async with get_client() as client:
        while True:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            wanted = [r for r in runs if r.name.rsplit("-", 1)[0] in names or r.name in names]
            if wanted and all(r.start_time and r.end_time for r in wanted):
                return wanted
            if time.monotonic() > deadline:
                return [r for r in wanted if r.start_time and r.end_time]
            await asyncio.sleep(0.5)


async def validate(time_scale: float, log: Any) -> dict[str, Any]:
    spec = StackSpec()
    path_sim_s, parts = validate_critical_path(spec)
    with fresh_sim(time_scale) as b:
        t0 = time.monotonic()
        state = await validate_coder_stack(
            options=ValidateOptions(stages=[Stage.CHAT, Stage.FIM]), connection=b.connection, return_state=True
        )
        wall = time.monotonic() - t0
        report = await state.aresult()
        timeline = b.sim.timeline
        chat_ready = b.rec.first_ready("coder-chat")
    chat_up = next(t for t, ns, n, r in timeline if n == "coder-chat" and r == 1)
    critical = path_sim_s * time_scale
    out: dict[str, Any] = {
        "validate_wall_s": round(wall, 3),
        "validate_critical_path_s": round(critical, 3),
        "validate_critical_path_parts_sim_s": {k: v for k, v in parts},
        "validate_overhead_ratio": wall / critical,
        "validate_outcome": report.outcome if hasattr(report, "outcome") else str(getattr(report, "status", "")),
        "validate_steps": getattr(report, "steps", None),
    }
    log(f"  validate: {wall:.1f} s wall, critical path {critical:.1f} s")
    # overlap: key minting + front-ends (ensure-keys start .. last front-end Ready) inside chat's cold start
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None and chat_ready is not None
    runs = await _task_runs(flow_run_id, {"ensure-keys", "wait-frontend-ready"})
    keys = [r for r in runs if r.name.startswith("ensure-keys")]
    fes = [r for r in runs if r.name.startswith("wait-frontend-ready")]
    if keys and fes:
        w0 = min(to_mono(r.start_time) for r in keys)
        w1 = max(to_mono(r.end_time) for r in fes)
        hidden = max(0.0, min(w1, chat_ready.mono) - max(w0, chat_up))
        out["overlap_fraction"] = hidden / (w1 - w0) if w1 > w0 else 1.0
        out["overlap_work_s"] = round(w1 - w0, 3)
        out["overlap_cold_start_s"] = round(chat_ready.mono - chat_up, 3)
        out["overlap_work_starts_after_scale_up_s"] = round(w0 - chat_up, 3)
        out["overlap_work_ends_before_ready_s"] = round(chat_ready.mono - w1, 3)
    else:
        out["overlap_fraction"] = float("nan")
        out["overlap_note"] = f"task runs not found in the API: {[r.name for r in runs]}"
    return out


async def sequential(time_scale: float, log: Any) -> dict[str, Any]:
    with fresh_sim(time_scale) as b:
        t0 = time.monotonic()
        await sequential_runbook(connection=b.connection)
        wall = time.monotonic() - t0
    log(f"  sequential runbook: {wall:.1f} s wall")
    return {"sequential_wall_s": round(wall, 3)}


# ------------------------------------------------------------------ handoff between queued swaps
@asynccontextmanager
async def _recording_session(sessions: list[dict[str, float]], timeout_s: float, **kw: Any) -> AsyncIterator[None]:
    """flows.swap's gpu_session, recording when each session got the GPU and when its GPU work ended."""
    rec = {"ask": time.monotonic()}
    try:
        async with gpu_session(timeout_s, **kw):
            rec["enter"] = time.monotonic()
            try:
                yield
            finally:
                rec["exit"] = time.monotonic()
    finally:
        rec["released"] = time.monotonic()
        if "exit" in rec:
            sessions.append(rec)


async def handoff(time_scale: float, n: int, log: Any) -> dict[str, Any]:
    """``n`` swap_model runs queued at once on one GPU, each to a different model."""
    spec = bench_spec(n, 1, weights_gb=3.1)
    sessions: list[dict[str, float]] = []
    original = swap_flow.gpu_session
    swap_flow.gpu_session = lambda timeout_s, **kw: _recording_session(sessions, timeout_s, **kw)  # type: ignore[assignment,misc]
    try:
        with fresh_sim(time_scale, spec) as b:
            await ensure_gpu_limit(1)
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(
                    swap_model(options=SwapOptions(target=m.name), connection=b.connection, return_state=True)
                    for m in spec.models
                )
            )
            total = time.monotonic() - t0
            timeline = b.sim.timeline
            overcommit = b.rec.overcommit_live
    finally:
        swap_flow.gpu_session = original
    failed = [r for r in results if not r.is_completed()]
    ups = sorted(t for t, ns, _n, r in timeline if ns == spec.serving_namespace and r == 1)
    sessions.sort(key=lambda s: s["enter"])
    hand, acquire, prep, release_s, late = [], [], [], [], []
    for prev, nxt in itertools.pairwise(sessions):
        up = next((t for t in ups if t >= nxt["enter"]), None)
        if up is None:
            continue
        # From when the GPU was free and the next run asked for it: a run can ask after the GPU was freed
        # (on SQLite its flow run's creation can answer 503, which Prefect's client retries after 2 s, 4 s,
        # 8 s), and the GPU idle meanwhile is no hand-off latency.
        free = max(prev["exit"], nxt["ask"])
        if nxt["ask"] > prev["exit"]:
            late.append(nxt["ask"] - prev["exit"])
        hand.append(up - free)
        acquire.append(nxt["enter"] - free)
        release_s.append(prev["released"] - prev["exit"])
        prep.append(up - nxt["enter"])
    log(f"  {n} queued swaps: {total:.1f} s, {len(hand)} hand-offs {', '.join(f'{h:.2f}' for h in hand)} s")
    if late:
        log(f"  {len(late)} run(s) asked after the GPU was freed, by {', '.join(f'{h:.2f}' for h in late)} s")
    return {
        "handoff_p50_s": percentile(hand, 0.5),
        "handoff_p95_s": percentile(hand, 0.95),
        "handoff_samples_s": [round(h, 3) for h in hand],
        "handoff_count": len(hand),
        "handoff_asked_late_s": [round(h, 3) for h in late],
        "handoff_slot_wait_s": [round(h, 3) for h in acquire],
        "handoff_in_session_s": [round(h, 3) for h in prep],
        "handoff_release_call_s": [round(h, 3) for h in release_s],
        "handoff_total_s": round(total, 3),
        "handoff_failed_runs": len(failed),
        "handoff_overcommit": overcommit,
    }


# ------------------------------------------------------------------ scale
@dataclass
class SlotRequests:
    """What the GPU slot requests cost in this process: each ``increment-with-lease`` call and the HTTP
    status of every attempt. 503 is the Prefect server on SQLite failing the request's transaction
    (SQLITE_BUSY); the GPU session asks again after 20-50 ms (coder_stack/orchestration/gpu.py)."""

    calls: int = 0
    seconds: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "slot_requests": self.calls,
            "slot_request_s": round(self.seconds, 3),
            "slot_request_503": self.statuses.get(503, 0),
            "slot_request_statuses": {str(k): v for k, v in sorted(self.statuses.items())},
        }


@contextlib.contextmanager
def slot_requests() -> Iterator[SlotRequests]:
    """Instrument Prefect's client in this process for the block (benchmark only)."""
    import httpx
    from prefect.client.orchestration import PrefectClient

    rec = SlotRequests()
    orig_call = PrefectClient.increment_concurrency_slots_with_lease
    # At the transport, below the clients' hooks and retries: every answer the server gave is counted
    # (the GPU session's client turns a 503 to the slot request into an exception in a response hook).
    orig_send = httpx.AsyncHTTPTransport.handle_async_request

    async def call(self: PrefectClient, *args: Any, **kwargs: Any) -> Any:
        t = time.monotonic()
        try:
            return await orig_call(self, *args, **kwargs)
        finally:
            rec.calls += 1
            rec.seconds += time.monotonic() - t

    async def send(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        response = await orig_send(self, request)
        if request.url.path.endswith(SLOT_REQUEST_PATH):
            rec.statuses[response.status_code] = rec.statuses.get(response.status_code, 0) + 1
        return response

    PrefectClient.increment_concurrency_slots_with_lease = call  # type: ignore[method-assign,assignment]
    httpx.AsyncHTTPTransport.handle_async_request = send  # type: ignore[method-assign]
    try:
        yield rec
    finally:
        PrefectClient.increment_concurrency_slots_with_lease = orig_call  # type: ignore[method-assign]
        httpx.AsyncHTTPTransport.handle_async_request = orig_send  # type: ignore[method-assign]


async def scale_case(models: int, gpus: int, time_scale: float) -> dict[str, Any]:
    spec = bench_spec(models, gpus)
    await ensure_gpu_limit(gpus)
    # The cluster in its own process: 20 sessions' worth of simulated controllers must not share the
    # flows' GIL (a real cluster is not in the worker's process).
    sim = SimProcess(spec, time_scale)
    try:
        conn = Connection(kubeconfig=str(sim.kubeconfig), stack_file=str(sim.stack))
        with slot_requests() as slots:
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(gpu_session_run(connection=conn, model=m.name, return_state=True) for m in spec.models)
            )
            total = time.monotonic() - t0
    finally:
        rec = sim.stop()
    if not rec:
        raise RuntimeError("the simulated cluster's process did not report what it recorded")
    failed = sum(1 for r in results if not r.is_completed())
    timings = Timings()
    mt = model_timings(spec.models[0])
    first = timings.node_provision_s + timings.gpu_image_pull_s + mt.weights_s + mt.server_start_s
    later = mt.weights_s + mt.server_start_s + timings.termination_s
    rounds = -(-models // gpus)
    ideal = (first + timings.termination_s + (rounds - 1) * later) * time_scale
    return {
        "models": models,
        "gpus": gpus,
        "total_s": round(total, 3),
        "ideal_s": round(ideal, 3),
        "ratio_to_ideal": round(total / ideal, 3),
        "sessions_per_gpu": rounds,
        "overcommit": rec["overcommit_live"] + rec["overcommit_bound"],
        "max_gpu_pods": rec["max_live"],
        "max_gpu_pods_bound": rec["max_bound"],
        "gpu_pods_seen": rec["gpu_pods_seen"],
        "failed_runs": failed,
        **slots.as_dict(),
    }


async def scale(time_scale: float, models: tuple[int, ...], gpus: tuple[int, ...], log: Any) -> list[dict[str, Any]]:
    rows = []
    for n in models:
        for g in gpus:
            row = await scale_case(n, g, time_scale)
            rows.append(row)
            log(
                f"  {n} model(s) on {g} GPU(s): {row['total_s']:.1f} s (ideal {row['ideal_s']:.1f} s), "
                f"overcommit {row['overcommit']}, max GPU pods {row['max_gpu_pods']}, "
                f"slot requests {row['slot_requests']} ({row['slot_request_503']} answered 503, "
                f"{row['slot_request_s']:.1f} s in them)"
            )
    return rows
