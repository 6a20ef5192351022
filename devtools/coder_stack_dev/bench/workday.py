"""The workday scenario: what one day of use costs in billed GPU-node hours and cold-start waits, per policy.

One day (:func:`workday_trace`): users' requests to coder-chat 09:00-12:00 and 13:30-17:30 with gaps and a
lunch break, and a validate run (take_over, agent stage) started 09:40 and killed at 10:00 with coder-agent
serving and the GPU slot held. Each policy's day runs twice: in :class:`Day`, an event-driven replay in
simulated time (milliseconds; the table's numbers), and, in the full run, in :class:`SimDay` on the real
simulated cluster (time-scaled; the table's "sim" columns), which checks the replay.

What the project's own code and numbers decide (in both):

- the GPU node: it bills from the autoscaler's TriggeredScaleUp (the VM is created when provisioning
  starts) until the autoscaler removes it ``scale_down_unneeded_s`` after its last GPU pod is gone (a real
  cluster-autoscaler: 10 min unneeded); a pod waits ``node_provision_s`` for a new node, pulls the vLLM image
  once per node, finds its weights on the model-cache PVC and starts (``devtools/simstack/timings.py``). The replay
  models these steps with those durations; :class:`SimDay` and :func:`sim_check` run ``SimStack``'s own
  deployment controller, scheduler, kubelet and cluster-autoscaler;
- the idle decision: at every reclaim tick the replay renders the stand-in vLLM's ``/metrics``
  (``devtools/simstack/standins/vllm.py: Metrics``, whose counters the trace's requests move), parses it with
  ``coder_stack/vllm/metrics.py`` (``parse_exposition``, ``activity_of``) and judges it with ``judge`` and the
  spec's ``idle_after_s`` / ``idle_grace_s``, keeping the reading between ticks as the annotation string
  ``read_idleness`` keeps; :class:`SimDay` calls ``coder_stack/usecases/idle.py: read_idleness`` itself
  through the Kubernetes API against the stand-in pod;
- the schedules: the morning bring-up, the evening teardown and the reclaim cadence are read from
  ``prefect.yaml``; a killed run's slot is held until its lease (``coder_stack/orchestration/gpu.py:
  LEASE_SECONDS``) expires, and reclaim changes nothing while another run holds the slot
  (``flows/reclaim.py``).

What is modelled (no Prefect server or flow runs; the same in both):

- the GPU slot (tag:gpu, limit 1) is a variable: taken by the bring-up, ``coder-stack up`` and the validate
  run, released when they end; the killed run's lease is taken to expire the full ``LEASE_SECONDS`` after
  the kill (an upper bound: Prefect renews it before it runs out);
- the flows' own durations are 0 in the replay (a flow's API calls take seconds, the cluster's waits
  minutes); in :class:`SimDay` the driver's calls take wall time, which counts as simulated time;
- a request that finds coder-chat not serving brings it back at once: by hand the engineer swaps it back
  with kubectl, with the flows ``coder-stack up`` (bring_up: waits for the GPU slot, frees the GPU, scales
  coder-chat up, smokes it). Nobody's reaction time is counted, so the waits are lower bounds;
- the model-cache PVC already holds every model's weights (a workday after the first);
- the crash clean-up (flows/cleanup.py) scales a killed run's models to 0 and frees its slot
  ``crash_cleanup_s`` after the kill: by default the clean-up's bound (120 s), not its measurement (the crash
  group measures it: ~75 s); it does not bring back what the killed run had taken over;
- requests are instantaneous (nothing is running or waiting at a reclaim tick).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml
from simstack.standins.vllm import Metrics
from simstack.timings import Timings, model_timings

from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.orchestration.gpu import LEASE_SECONDS
from coder_stack.spec import StackSpec
from coder_stack.usecases.idle import read_idleness
from coder_stack.vllm.metrics import Reading, activity_of, judge, parse_exposition

HOUR = 3600.0
MINUTE = 60.0
WORKDAYS_PER_MONTH = 21
# ASSUMPTION: the on-demand hourly price of the sim's GPU node type (g2-standard-4: 1 NVIDIA L4, 4 vCPU,
# 16 GB) in us-central1, from Google Cloud's "VM instance pricing" page (accelerator-optimized G2) as of
# 2026; no discounts, no CPU nodes, disks or control plane. Override with --workday-price.
NODE_PRICE_PER_HOUR = 0.7068
NODE_PRICE_SOURCE = "GCP g2-standard-4 (1 x L4) on-demand, us-central1, Compute Engine VM instance pricing"

CHAT = "coder-chat"
AGENT = "coder-agent"
PREFECT_YAML = Path(__file__).resolve().parents[3] / "prefect.yaml"


def hm(s: float) -> str:
    """Seconds since midnight as HH:MM (HH:MM:SS when not on a minute)."""
    h, rest = divmod(round(s), 3600)
    m, sec = divmod(rest, 60)
    return f"{h:02d}:{m:02d}" + (f":{sec:02d}" if sec else "")


def at(clock: str) -> float:
    h, m = clock.split(":")
    return int(h) * HOUR + int(m) * MINUTE


# ------------------------------------------------------------------ schedules from prefect.yaml
@dataclass(frozen=True)
class Schedules:
    bring_up_s: float  # morning-bring-up
    teardown_s: float  # evening-teardown
    reclaim_every_s: float  # reclaim-idle-models


def _cron_time(cron: str) -> float:
    minute, hour = cron.split()[:2]
    return int(hour) * HOUR + int(minute) * MINUTE


def _cron_every(cron: str) -> float:
    minute, hour = cron.split()[:2]
    if not minute.startswith("*/") or hour != "*":
        raise ValueError(f"not an every-N-minutes cron: {cron!r}")
    return int(minute[2:]) * MINUTE


def read_schedules(path: Path = PREFECT_YAML) -> Schedules:
    """The three scheduled deployments' crons (local time) from prefect.yaml."""
    doc = yaml.safe_load(path.read_text())
    crons = {d["name"]: d["schedules"][0]["cron"] for d in doc["deployments"] if d.get("schedules")}
    return Schedules(
        bring_up_s=_cron_time(crons["morning-bring-up"]),
        teardown_s=_cron_time(crons["evening-teardown"]),
        reclaim_every_s=_cron_every(crons["reclaim-idle-models"]),
    )


# ------------------------------------------------------------------ the trace and the policies
@dataclass(frozen=True)
class Trace:
    """One workday: users' requests to coder-chat, and one validate run killed while it held the GPU."""

    requests: tuple[float, ...]  # seconds since midnight, each one request to coder-chat
    killed_start: float  # the validate run (take_over) starts: frees coder-chat, brings coder-agent up
    kill_at: float  # ... and is killed here, coder-agent serving, the GPU slot held
    killed_calls_every_s: float  # its agent stage calls coder-agent this often from Ready until the kill
    end: float  # the replay stops (after the last node could have drained)

    @property
    def first(self) -> float:
        return min(self.requests)


def _every(start: str, end: str, step_min: float) -> list[float]:
    t, stop, out = at(start), at(end), []
    while t <= stop:
        out.append(t)
        t += step_min * MINUTE
    return out


def workday_trace() -> Trace:
    """09:00-09:36 every 4 min; a meeting (the validate runs 09:40, killed 10:00); 10:40-10:56; a 24-min gap;
    11:20-11:56; lunch 12:00-13:30; 13:30-14:58; a 47-min gap; 15:45-17:29. 75 requests."""
    reqs = (
        _every("09:00", "09:36", 4)
        + _every("10:40", "10:56", 4)
        + _every("11:20", "11:56", 4)
        + _every("13:30", "14:58", 4)
        + _every("15:45", "17:29", 4)
    )
    return Trace(tuple(reqs), at("09:40"), at("10:00"), 120.0, at("19:30"))


def short_trace() -> Trace:
    """The tests' trace: 09:00-09:20 every 4 min, the killed run 09:30-09:50, 10:30-10:42, 11:40-12:00."""
    reqs = _every("09:00", "09:20", 4) + _every("10:30", "10:42", 4) + _every("11:40", "12:00", 4)
    return Trace(tuple(reqs), at("09:30"), at("09:50"), 120.0, at("19:30"))


@dataclass(frozen=True)
class Policy:
    name: str
    label: str
    up_s: float  # coder-chat brought up (by hand, or the morning bring-up)
    down_s: float  # everything to 0 (by hand, or the evening teardown)
    flows: bool  # the day runs on the flows (GPU slot, reclaim) rather than by hand
    crash_cleanup_s: float | None = None  # None: no clean-up of a killed run
    idle_after_s: float | None = None  # None: no idle reclaim
    killed: bool = True  # False: the validate run finishes normally at kill_at (the leak's baseline)


def policies(
    s: Schedules, crash_cleanup_s: float = 120.0, idle_after_min: tuple[int, ...] = (15, 30, 60)
) -> list[Policy]:
    rows = [
        Policy("by_hand", "runbook by hand (up 09:00, down 18:00)", at("09:00"), at("18:00"), False),
        Policy("schedules", f"schedules (up {hm(s.bring_up_s)}, down {hm(s.teardown_s)})", s.bring_up_s,
               s.teardown_s, True),
        Policy("schedules_cleanup", "schedules + crash clean-up", s.bring_up_s, s.teardown_s, True, crash_cleanup_s),
    ]  # fmt: skip
    rows += [
        Policy(f"reclaim_{m}", f"schedules + clean-up + reclaim {m} min", s.bring_up_s, s.teardown_s, True,
               crash_cleanup_s, m * MINUTE)
        for m in idle_after_min
    ]  # fmt: skip
    # what reclaim alone does with the killed run (the spec's default idle_after_s), for comparison
    default = StackSpec().idle_after_s
    rows.append(Policy(f"reclaim_{default / MINUTE:.0f}_no_cleanup",
                       f"schedules + reclaim {default / MINUTE:.0f} min, no clean-up", s.bring_up_s, s.teardown_s,
                       True, None, default))  # fmt: skip
    return rows


# ------------------------------------------------------------------ the replay
@dataclass
class _Pod:
    model: str
    created: float
    node: str | None = None
    ready_at: float | None = None
    terminating: bool = False
    metrics: Metrics | None = None


@dataclass
class _Node:
    name: str
    requested: float
    ready: float | None = None
    image_cached: bool = False
    idle_since: float | None = None
    removed: float | None = None


@dataclass
class Result:
    policy: str
    label: str
    node_seconds: float
    nodes: list[dict[str, str]]
    cold_starts: list[dict[str, Any]]
    wait_s: float  # sum over bring-backs: Ready - the first waiting request's arrival
    request_wait_s: float  # sum over every request of its wait
    reclaims: list[dict[str, str]]
    killed: dict[str, Any]
    events: list[tuple[float, str]]

    @property
    def node_hours(self) -> float:
        return self.node_seconds / HOUR

    def as_dict(self, price: float) -> dict[str, Any]:
        d = asdict(self)
        d.pop("events")
        d["events"] = [f"{hm(t)} {what}" for t, what in self.events]
        d["node_hours"] = round(self.node_hours, 3)
        d["wait_min"] = round(self.wait_s / MINUTE, 1)
        d["cost_per_day"] = round(self.node_hours * price, 2)
        d["cost_per_month"] = round(self.node_hours * price * WORKDAYS_PER_MONTH, 2)
        return d


class Day:
    """One policy's day, event by event, in simulated seconds since midnight."""

    def __init__(
        self, policy: Policy, trace: Trace, schedules: Schedules, spec: StackSpec | None = None,
        timings: Timings | None = None, lease_s: float = LEASE_SECONDS,
    ) -> None:  # fmt: skip
        self.p, self.trace, self.sched = policy, trace, schedules
        spec = spec or StackSpec()
        if policy.idle_after_s is not None:
            spec = spec.model_copy(update={"idle_after_s": policy.idle_after_s})
        self.spec = spec
        self.t = timings or Timings()
        self.lease_s = lease_s
        self.date = datetime(2026, 12, 1, tzinfo=UTC)
        self.now = 0.0
        self._q: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.replicas: dict[str, int] = {m.name: 0 for m in spec.models}
        self.pods: dict[str, _Pod] = {}  # model -> its pod (not terminating)
        self.terminating: list[_Pod] = []
        self.nodes: list[_Node] = []
        self.annotations: dict[str, str] = {}  # model -> kept reading (coder-stack.io/activity)
        self.slot: str | None = None  # who holds the GPU slot
        self.slot_queue: list[tuple[str, Callable[[], None]]] = []
        self.waiting: list[float] = []  # requests waiting for coder-chat
        self.bringing_back: float | None = None  # first waiting request of the bring-back under way
        self.cold_starts: list[dict[str, Any]] = []
        self.request_wait_s = 0.0
        self.reclaims: list[dict[str, str]] = []
        self.events: list[tuple[float, str]] = []
        self.killed: dict[str, Any] = {}
        self._on_ready: dict[str, list[Callable[[], None]]] = {}
        self._on_gone: dict[str, list[Callable[[], None]]] = {}

    # ---- event loop
    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._q, (t, next(self._seq), fn))

    def log(self, what: str) -> None:
        self.events.append((self.now, what))

    def run(self) -> Result:
        self._seed()
        while self._q:
            t, _, fn = heapq.heappop(self._q)
            if t > self.trace.end:
                break
            self.now = t
            fn()
        return self._result()

    def _seed(self) -> None:
        p, tr, s = self.p, self.trace, self.sched
        self.at(p.up_s, self._morning)
        self.at(p.down_s, self._evening)
        for r in tr.requests:
            self.at(r, functools.partial(self._request, r))
        self.at(tr.killed_start, self._validate_start)
        self.at(tr.kill_at, self._validate_end)
        if p.flows and p.idle_after_s is not None:
            tick = s.reclaim_every_s
            for k in range(int(tr.end // tick) + 1):
                self.at(k * tick + 1e-3, self._reclaim)  # just after the minute: after that minute's requests

    # ---- the cluster: pods, the GPU node, the autoscaler (devtools/simstack/controllers: deployment, scheduler,
    # kubelet, autoscaler; durations from Timings)
    def _node(self) -> _Node | None:
        return next((n for n in self.nodes if n.removed is None), None)

    def scale(self, model: str, replicas: int, why: str = "") -> None:
        if self.replicas[model] == replicas:
            return
        self.replicas[model] = replicas
        self.log(f"{model} scaled to {replicas}" + (f" ({why})" if why else ""))
        if replicas == 0 and model == AGENT and self.now >= self.trace.kill_at and "agent_until" not in self.killed:
            self.killed["agent_until"] = hm(self.now)
            self.killed["agent_min_after_kill"] = round((self.now - self.trace.kill_at) / MINUTE, 1)
            self.killed["agent_stopped_by"] = why
        self._apply(model, replicas)

    def _has_pods(self, model: str) -> bool:
        """A pod of ``model`` still exists (terminating)."""
        return any(q.model == model for q in self.terminating)

    def _apply(self, model: str, replicas: int) -> None:
        if replicas == 1:
            self.pods[model] = _Pod(model, self.now)
            self._schedule()
            return
        pod = self.pods.pop(model, None)
        if pod is not None:
            pod.terminating = True
            self.terminating.append(pod)
            self.at(self.now + self.t.termination_s, lambda: self._gone(pod))

    def _busy(self, node: _Node) -> bool:
        return any(q.node == node.name for q in [*self.pods.values(), *self.terminating])

    def _gone(self, pod: _Pod) -> None:
        self.terminating.remove(pod)
        self.log(f"{pod.model} pod gone")
        self._idle_check()
        if not any(q.model == pod.model for q in self.terminating):
            for fn in self._on_gone.pop(pod.model, []):
                fn()
        self._schedule()

    def _idle_check(self) -> None:
        node = self._node()
        if node is not None and node.ready is not None and not self._busy(node) and node.idle_since is None:
            node.idle_since = self.now
            self.at(self.now + self.t.scale_down_unneeded_s, lambda: self._maybe_remove(node))

    def _maybe_remove(self, node: _Node) -> None:
        since = node.idle_since
        if node.removed is None and since is not None and self.now - since >= self.t.scale_down_unneeded_s - 1e-6:
            node.removed = self.now
            self.log(f"GPU node {node.name} removed by the autoscaler (billed {hm(node.requested)}-{hm(self.now)})")

    def _schedule(self) -> None:
        """Bind a pending GPU pod when the one GPU is free; ask the autoscaler for a node when there is none."""
        pending = [q for q in self.pods.values() if q.node is None]
        if not pending:
            return
        if any(q.node is not None for q in [*self.pods.values(), *self.terminating]):
            return  # the GPU is taken (a pod running or terminating): Unschedulable, max node group size
        node = self._node()
        pod = min(pending, key=lambda q: q.created)
        if node is None:
            name = f"gpu-{len(self.nodes) + 1}"
            node = _Node(name, self.now)
            self.nodes.append(node)
            self.log(f"TriggeredScaleUp: GPU node {name} provisioning (billed from now)")
            self.at(self.now + self.t.node_provision_s, lambda: self._node_ready(node))
            return
        if node.ready is None:
            return
        pod.node = node.name
        node.idle_since = None
        spec = self.spec.model(pod.model)
        mt = model_timings(spec)
        pull = 0.0 if node.image_cached else self.t.gpu_image_pull_s
        node.image_cached = True
        self.at(self.now + pull + self.t.weights_cached_s + mt.server_start_s, lambda: self._ready(pod))

    def _node_ready(self, node: _Node) -> None:
        node.ready = self.now
        self.log(f"GPU node {node.name} Ready")
        self._schedule()
        self._idle_check()

    def _ready(self, pod: _Pod) -> None:
        if self.pods.get(pod.model) is not pod:
            return
        pod.ready_at = self.now
        # a fresh engine: its counters start at 0, vllm:request_success_created = its start
        pod.metrics = Metrics(started=(self.date + timedelta(seconds=self.now)).timestamp())
        self.log(f"{pod.model} Ready")
        for fn in self._on_ready.pop(pod.model, []):
            fn()

    def is_ready(self, model: str) -> bool:
        pod = self.pods.get(model)
        return pod is not None and pod.ready_at is not None

    def when_ready(self, model: str, fn: Callable[[], None]) -> None:
        if self.is_ready(model):
            fn()
        else:
            self._on_ready.setdefault(model, []).append(fn)

    def up(self, model: str, then: Callable[[], None]) -> None:
        """Scale ``model`` to 1 and call ``then`` once it is Ready."""
        self.scale(model, 1)
        self.when_ready(model, then)

    def when_gone(self, models: list[str], fn: Callable[[], None], why: str = "") -> None:
        """Scale ``models`` to 0 and call ``fn`` once all their pods are gone (flows.common.free_gpu)."""
        for m in models:
            self.scale(m, 0, why)
        left = [m for m in dict.fromkeys(models) if self._has_pods(m)]
        if not left:
            fn()
            return
        remaining = set(left)

        def one(m: str) -> None:
            remaining.discard(m)
            if not remaining:
                fn()

        for m in left:
            self._on_gone.setdefault(m, []).append(functools.partial(one, m))

    def serve(self, model: str, n: int = 1) -> None:
        """``n`` requests finish on ``model`` (what the stand-in's _account does to its counters)."""
        pod = self.pods[model]
        assert pod.metrics is not None
        pod.metrics.success["stop"] += n
        pod.metrics.prompt_tokens += 400 * n
        pod.metrics.generation_tokens += 150 * n

    # ---- the GPU slot (tag:gpu, limit 1)
    def take_slot(self, who: str, fn: Callable[[], None]) -> None:
        if not self.p.flows:
            fn()
        elif self.slot is None:
            self.slot = who
            fn()
        else:
            self.slot_queue.append((who, fn))

    def free_slot(self, who: str) -> None:
        if not self.p.flows or self.slot != who:
            return
        self.slot = None
        self.log(f"GPU slot released ({who})")
        if self.slot_queue:
            nxt, fn = self.slot_queue.pop(0)
            self.slot = nxt
            fn()

    # ---- the day
    def _morning(self) -> None:
        self.log("by hand: coder-chat up" if not self.p.flows else "morning-bring-up")
        self._bring_up("morning-bring-up")

    def _bring_up(self, who: str) -> None:
        """bring_up (or by hand: kubectl): free the GPU except coder-chat, scale it up, smoke it."""

        def go() -> None:
            others = [m for m in self.pods if m != CHAT]
            how = "by hand: swapped back" if not self.p.flows else f"{who} frees the GPU"
            self.when_gone(others, functools.partial(self.up, CHAT, done), how)

        def done() -> None:
            if self.p.flows:
                self.serve(CHAT, 2)  # the direct and the gateway smoke
            self.free_slot(who)

        self.take_slot(who, go)

    def _evening(self) -> None:
        self.log("by hand: everything down" if not self.p.flows else "evening-teardown")
        for m in list(self.replicas):
            self.scale(m, 0, "by hand at the end of the day" if not self.p.flows else "evening-teardown")

    def _request(self, r: float) -> None:
        if self.now >= self.p.down_s or (self.now < self.p.up_s and not self.p.flows):
            return  # outside the policy's day (none of the trace's requests are)
        if self.is_ready(CHAT):
            self.serve(CHAT)
            return
        self.waiting.append(r)
        if self.bringing_back is None:
            self.bringing_back = r
            state = "cold-starting" if self.replicas[CHAT] else "at 0"
            self.log(f"request finds coder-chat {state}" + ("" if self.replicas[CHAT] else ": bring it back"))
            if not self.replicas[CHAT] or any(m != CHAT for m in self.pods):
                self._bring_up("coder-stack up")
            self.when_ready(CHAT, self._served_waiting)

    def _served_waiting(self) -> None:
        first = self.bringing_back
        assert first is not None
        self.cold_starts.append(
            {"request": hm(first), "ready": hm(self.now), "wait_min": round((self.now - first) / MINUTE, 2),
             "requests_waiting": len(self.waiting)}
        )  # fmt: skip
        self.request_wait_s += sum(self.now - r for r in self.waiting)
        self.serve(CHAT, len(self.waiting))
        self.waiting.clear()
        self.bringing_back = None

    # ---- the validate run that is killed
    def _validate_start(self) -> None:
        self.log("validate_coder_stack (take_over, agent stage) starts")

        def go() -> None:
            self.killed["had_chat"] = CHAT in self.pods
            others = [m for m in self.pods if m != AGENT]
            self.when_gone(others, functools.partial(self.up, AGENT, calls), "validate frees the GPU")

        def calls() -> None:
            t = self.now
            while t < self.trace.kill_at:
                self.at(t, lambda: self.serve(AGENT) if self.is_ready(AGENT) else None)
                t += self.trace.killed_calls_every_s

        self.take_slot("validate", go)

    def _validate_end(self) -> None:
        if not self.p.killed:
            self.log("validate finishes: coder-agent to 0, coder-chat restored")

            def restore() -> None:
                if self.killed.get("had_chat"):
                    self.scale(CHAT, 1)
                    self.when_ready(CHAT, lambda: self.free_slot("validate"))
                else:
                    self.free_slot("validate")

            self.when_gone([AGENT], restore, "validate finishes")
            return
        self.log("validate killed (SIGKILL): coder-agent serving, the GPU slot held")
        self.killed["agent_serving_at_kill"] = self.is_ready(AGENT)
        if self.p.flows:
            if self.p.crash_cleanup_s is not None:
                self.at(self.now + self.p.crash_cleanup_s, self._crash_cleanup)
            else:
                self.at(self.now + self.lease_s, self._lease_expires)

    def _crash_cleanup(self) -> None:
        self.log("crash clean-up: the killed run's coder-agent to 0, its slot freed")
        self.killed["cleaned_up"] = hm(self.now)
        self.scale(AGENT, 0, "crash clean-up")
        self.free_slot("validate")

    def _lease_expires(self) -> None:
        self.log("the killed run's slot lease expires")
        self.free_slot("validate")

    # ---- reclaim_idle_models (flows/reclaim.py) every few minutes
    def _reclaim(self) -> None:
        if self.slot is not None:
            return  # GPU limit held by another run: nothing read or changed
        self._read_and_reclaim()

    def _read_and_reclaim(self) -> None:
        spec = self.spec
        now_dt = self.date + timedelta(seconds=self.now)
        for name, reps in list(self.replicas.items()):
            if not reps:
                continue
            pod = self.pods.get(name)
            if pod is None or pod.ready_at is None or pod.metrics is None:
                continue  # no Ready pod: not read, left serving
            model = spec.model(name)
            exposition = pod.metrics.render(model.served_model_name)  # the stand-in's GET /metrics body
            activity = activity_of(parse_exposition(exposition), model.served_model_name)
            previous = Reading.from_annotation(self.annotations.get(name))
            ready_since = self.date + timedelta(seconds=pod.ready_at)
            verdict = judge(activity, previous, now_dt, ready_since, spec.idle_after_s, spec.idle_grace_s)
            if verdict.reading is not None:
                self.annotations[name] = verdict.reading.to_annotation()
            if verdict.idle:
                self.log(f"reclaim: {name} {verdict.reason}: scaled to 0")
                self.reclaims.append({"model": name, "at": hm(self.now), "reason": verdict.reason})
                self.scale(name, 0, "reclaim_idle_models")

    # ---- the result
    def _result(self) -> Result:
        end = self.trace.end
        secs = 0.0
        nodes = []
        for n in self.nodes:
            stop = n.removed if n.removed is not None else end
            secs += stop - n.requested
            nodes.append({"billed_from": hm(n.requested), "billed_until": hm(stop) if n.removed else f"{hm(end)}+"})
        slot_free = next(
            (t for t, what in self.events if t >= self.trace.kill_at and what == "GPU slot released (validate)"), None
        )
        killed = dict(self.killed)
        killed["slot_free_at"] = hm(slot_free) if slot_free is not None else "no slot (by hand)"
        return Result(
            policy=self.p.name,
            label=self.p.label,
            node_seconds=secs,
            nodes=nodes,
            cold_starts=self.cold_starts,
            wait_s=sum(c["wait_min"] for c in self.cold_starts) * MINUTE,
            request_wait_s=self.request_wait_s,
            reclaims=self.reclaims,
            killed=killed,
            events=self.events,
        )


def replay(policy: Policy, trace: Trace, schedules: Schedules | None = None, **kw: Any) -> Result:
    return Day(policy, trace, schedules or read_schedules(), **kw).run()


def workday(
    trace: Trace | None = None,
    *,
    crash_cleanup_s: float = 120.0,
    price: float = NODE_PRICE_PER_HOUR,
    timings: Timings | None = None,
    sim_scale: float | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every policy's day on the trace, and each one's day with the validate run finishing normally; with
    ``sim_scale``, each policy's day also on the simulated cluster (:class:`SimDay`; 0.004: ~3 min each)."""
    trace = trace or workday_trace()
    sched = read_schedules()
    rows = []
    for p in policies(sched, crash_cleanup_s):
        res = replay(p, trace, sched, timings=timings)
        base = replay(replace(p, killed=False), trace, sched, timings=timings)
        d = res.as_dict(price)
        d["killed"]["extra_node_min_vs_normal_end"] = round((res.node_seconds - base.node_seconds) / MINUTE, 1)
        d["killed"]["extra_cost_per_day_vs_normal_end"] = round((res.node_hours - base.node_hours) * price, 2)
        if sim_scale is not None:
            t0 = time.monotonic()
            on_sim = sim_day(p, trace, sim_scale, sched).as_dict(price)
            on_sim["wall_s"] = round(time.monotonic() - t0, 1)
            d["sim"] = on_sim
            if log is not None:
                log(
                    f"  {p.name}: replay {d['node_hours']:.2f} node-h, wait {d['wait_min']:.1f} min; on the sim "
                    f"{on_sim['node_hours']:.2f} node-h, wait {on_sim['wait_min']:.1f} min ({on_sim['wall_s']:.0f} s)"
                )
        rows.append(d)
    return {
        "workday": rows,
        "workday_assumptions": {
            "node_price_per_hour": price,
            "node_price_source": f"ASSUMPTION: {NODE_PRICE_SOURCE}",
            "workdays_per_month": WORKDAYS_PER_MONTH,
            "crash_cleanup_s": crash_cleanup_s,
            "crash_cleanup_note": "the clean-up's bound (kill -> models at 0, slot freed), not a measurement",
            "lease_s": LEASE_SECONDS,
            "schedules": {
                k: hm(v) if k != "reclaim_every_s" else f"every {v / MINUTE:.0f} min" for k, v in asdict(sched).items()
            },
            "timings": asdict(timings or Timings()),
            "requests": len(trace.requests),
            "sim_days_time_scale": sim_scale,
            "trace": f"{hm(trace.first)}-{hm(max(trace.requests))}, killed run {hm(trace.killed_start)}-"
            f"{hm(trace.kill_at)}",
        },
    }


# ------------------------------------------------------------------ the same day on the simulated cluster
class SimDay(Day):
    """The same policy logic as :class:`Day`, but the cluster is the real simulated one: a ``SimStack``
    (autoscaled GPU pool, empty at the start, ``time_scale``), its deployment controller, scheduler, kubelet
    and cluster-autoscaler; the requests are HTTP requests to the stand-in vLLM pod; each reclaim tick calls
    ``coder_stack.usecases.idle.read_idleness`` through the Kubernetes API (port-forward to /metrics, the
    reading kept on the Deployment). The sim runs on the wall clock compressed by ``time_scale``, so the spec
    given to read_idleness has ``idle_after_s`` and ``idle_grace_s`` times ``time_scale``. Still modelled as in
    the replay: the GPU slot (no Prefect server), the flows' own durations (the driver's calls take wall time
    that counts as simulated time), the users' instant bring-back.
    """

    def __init__(self, policy: Policy, trace: Trace, schedules: Schedules, time_scale: float, start_s: float) -> None:
        super().__init__(policy, trace, schedules)
        self.scale_f = time_scale
        self.start_s = start_s
        self.wall_spec = self.spec.model_copy(
            update={
                "idle_after_s": self.spec.idle_after_s * time_scale,
                "idle_grace_s": self.spec.idle_grace_s * time_scale,
            }
        )
        self.sim_pods: dict[str, set[str]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.sim: Any = None
        self.api: Any = None
        self._m0 = 0.0
        self._aloop: asyncio.AbstractEventLoop | None = None

    # ---- clocks
    def _vnow(self) -> float:
        return self.start_s + (time.monotonic() - self._m0) / self.scale_f

    def _wall(self, v: float) -> float:
        return self._m0 + (v - self.start_s) * self.scale_f

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """From the sim's thread: run ``fn`` on the driver's loop at the simulated now."""

        def call() -> None:
            self.now = self._vnow()
            fn(*args)

        assert self._aloop is not None
        self._aloop.call_soon_threadsafe(call)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- run
    def run(self) -> Result:
        from simstack.stack import SimStack

        with SimStack(spec=StackSpec(), time_scale=self.scale_f, gpu_pool="autoscaled") as sim:
            self.sim = sim
            # a workday after the first: every model's weights already on the model-cache PVC
            assert sim.cluster is not None
            sim.call(sim.cluster.kubelet.weights_cached.update, [m.name for m in self.spec.models])
            sim.call(sim.store.listeners.append, self._listen)
            return asyncio.run(self._arun())

    async def _arun(self) -> Result:
        self._aloop = asyncio.get_running_loop()
        self.now = self.start_s
        self._seed()
        self._q = [e for e in self._q if e[0] >= self.start_s]  # nothing happens before the start
        heapq.heapify(self._q)
        self.at(self.trace.end, lambda: None)  # run until the end: nodes drain after the last event
        kubeconfig = str(self.sim.kubeconfig_path)
        async with open_api(ClusterTarget(kubeconfig=kubeconfig)) as api:
            self.api = api
            self._m0 = time.monotonic()
            while self._q:
                t = self._q[0][0]
                if t > self.trace.end:
                    break
                delay = self._wall(t) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(min(delay, 0.01))
                    continue
                _, _, fn = heapq.heappop(self._q)
                self.now = max(t, self._vnow())
                fn()
                await asyncio.sleep(0)
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self.now = self.trace.end
        return self._result()

    # ---- what the sim's store shows (its listener runs on the sim's thread)
    def _listen(self, ev: Any) -> None:
        from simstack.cluster_objects import GPU_POOL, POOL_LABEL

        obj = ev.obj
        meta = obj.get("metadata") or {}
        if ev.plural == "nodes" and (meta.get("labels") or {}).get(POOL_LABEL) == GPU_POOL:
            if ev.type == "ADDED":
                self._post(self._node_added, meta["name"])
            elif ev.type == "DELETED":
                self._post(self._node_deleted, meta["name"])
        elif ev.plural == "events" and ev.type == "ADDED" and obj.get("reason") == "TriggeredScaleUp":
            self._post(self._scale_up)
        elif ev.plural == "pods" and meta.get("namespace") == self.spec.serving_namespace:
            model = (meta.get("labels") or {}).get("app.kubernetes.io/name", "")
            if model not in self.replicas:
                return
            if ev.type == "ADDED":
                self._post(self._pod_added, model, meta["name"])
            elif ev.type == "DELETED":
                self._post(self._pod_deleted, model, meta["name"])
            elif _pod_ready(obj) and not _pod_ready(ev.old):
                self._post(self._pod_ready, model)

    def _scale_up(self) -> None:
        self.nodes.append(_Node("", self.now))
        self.log("TriggeredScaleUp: GPU node provisioning (billed from now)")

    def _node_added(self, name: str) -> None:
        node = next((n for n in self.nodes if not n.name), None)
        if node is None:
            node = _Node(name, self.now)
            self.nodes.append(node)
        node.name, node.ready = name, self.now
        self.log(f"GPU node {name} Ready")

    def _node_deleted(self, name: str) -> None:
        for n in self.nodes:
            if n.name == name and n.removed is None:
                n.removed = self.now
                self.log(f"GPU node {name} removed by the autoscaler (billed {hm(n.requested)}-{hm(self.now)})")

    def _pod_added(self, model: str, name: str) -> None:
        self.sim_pods.setdefault(model, set()).add(name)

    def _pod_deleted(self, model: str, name: str) -> None:
        left = self.sim_pods.setdefault(model, set())
        left.discard(name)
        if not left:
            self.log(f"{model} pod gone")
            for fn in self._on_gone.pop(model, []):
                fn()

    def _pod_ready(self, model: str) -> None:
        pod = self.pods.get(model)
        if self.replicas[model] == 1 and pod is not None and pod.ready_at is None:
            pod.ready_at = self.now
            self.log(f"{model} Ready")
            for fn in self._on_ready.pop(model, []):
                fn()

    # ---- what the day does to the sim
    def _has_pods(self, model: str) -> bool:
        return bool(self.sim_pods.get(model))

    def _apply(self, model: str, replicas: int) -> None:
        from simstack.store import Store

        if replicas == 1:
            self.pods[model] = _Pod(model, self.now)
        else:
            self.pods.pop(model, None)
        ns = self.spec.serving_namespace

        def _scale(store: Store) -> None:
            d = store.get("deployments", ns, model)
            d["spec"]["replicas"] = replicas
            store.update("deployments", d)

        self.sim.call(_scale, self.sim.store)

    def serve(self, model: str, n: int = 1) -> None:
        self._spawn(self._requests(model, n))

    async def _requests(self, model: str, n: int) -> None:
        m = self.spec.model(model)
        base = self.sim.backends.resolve_url(self.spec.service_url(m.name, self.spec.serving_namespace, m.port))
        headers = {"Authorization": f"Bearer {self.sim.secrets['vllm_key']}"}
        body = {"model": m.served_model_name, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(timeout=30) as http:
            for _ in range(n):
                resp = await http.post(f"{base}/v1/chat/completions", json=body, headers=headers)
                if resp.status_code != 200:
                    self.log(f"request to {model} answered {resp.status_code}")

    def _read_and_reclaim(self) -> None:
        self._spawn(self._areclaim())

    async def _areclaim(self) -> None:
        for name, reps in list(self.replicas.items()):
            if not reps or not self.is_ready(name):
                continue
            idle = await read_idleness(self.api, self.wall_spec, self.wall_spec.model(name))
            self.now = self._vnow()
            if idle.idle and self.replicas[name] and self.slot is None:
                reason = f"idle {idle.idle_s / self.scale_f / MINUTE:.1f} simulated min (read_idleness: {idle.reason})"
                self.log(f"reclaim: {name} {reason}: scaled to 0")
                self.reclaims.append({"model": name, "at": hm(self.now), "reason": reason})
                self.scale(name, 0, "reclaim_idle_models")


def _pod_ready(obj: dict[str, Any] | None) -> bool:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def sim_day(policy: Policy, trace: Trace, time_scale: float, schedules: Schedules | None = None) -> Result:
    """``policy``'s day on the simulated cluster, from a minute before its first event to ``trace.end``."""
    start = min(policy.up_s, trace.killed_start, trace.first) - 5 * MINUTE
    return SimDay(policy, trace, schedules or read_schedules(), time_scale, start).run()


# ------------------------------------------------------------------ the node steps on the simulated cluster
@dataclass
class _SimMarks:
    nodes_added: list[float] = field(default_factory=list)
    nodes_deleted: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)
    gone: list[float] = field(default_factory=list)


def modelled_durations(timings: Timings | None = None) -> dict[str, float]:
    """The same steps as :func:`sim_check`, through the replay's own cluster model (:class:`Day`).

    The replay assumes the weights are on the PVC; the sim check's first start stages them, so its first step
    is the replay's cold start plus the staging the replay never does (``model_timings`` of coder-chat)."""
    t = timings or Timings()
    day = Day(
        Policy("check", "check", 0.0, 0.0, False), Trace((0.0,), 0.0, 0.0, 60.0, 0.0), read_schedules(), timings=t
    )
    marks: dict[str, float] = {}

    def step(name: str, then: Callable[[], None] | None = None) -> Callable[[], None]:
        def fn() -> None:
            marks[name] = day.now
            if then is not None:
                then()

        return fn

    def first_down() -> None:
        node = day._node()
        day.scale(CHAT, 0)
        wait_removed(node)

    def wait_removed(node: _Node | None) -> None:
        def poll() -> None:
            if node is not None and node.removed is None:
                day.at(day.now + 1.0, poll)
            else:
                marks["removed"] = day.now
                up_again()

        poll()

    def up_again() -> None:
        marks["up2"] = day.now
        day.scale(CHAT, 1)
        day.when_ready(CHAT, step("ready2", down_up))

    def down_up() -> None:
        def again() -> None:
            marks["up3"] = day.now
            day.up(CHAT, step("ready3"))

        day.when_gone([CHAT], again)

    day.scale(CHAT, 1)
    day.when_ready(CHAT, step("ready1", first_down))
    while day._q:
        tt, _, fn = heapq.heappop(day._q)
        day.now = tt
        fn()
    staging = model_timings(StackSpec().model(CHAT)).weights_s - t.weights_cached_s
    return {
        "first_cold_start_s": marks["ready1"] + staging,
        "scale_to_0_until_node_removed_s": marks["removed"] - marks["ready1"],
        "cold_start_new_node_s": marks["ready2"] - marks["up2"],
        "warm_start_same_node_s": marks["ready3"] - marks["up3"],
    }


def sim_check(time_scale: float, timeout_s: float = 120.0) -> dict[str, Any]:
    """On a fresh simulated cluster (autoscaled GPU pool, empty): coder-chat up from nothing; down until the
    autoscaler removes the node; up again on a new node (weights now on the PVC); down and at once up again
    on the same node. The measured simulated seconds of each step, and the replay's."""
    from simstack.cluster_objects import GPU_POOL, POOL_LABEL
    from simstack.stack import SimStack
    from simstack.store import Store, WatchEvent

    spec = StackSpec()
    ns = spec.serving_namespace
    marks = _SimMarks()

    def on_event(ev: WatchEvent) -> None:
        obj, mono = ev.obj, time.monotonic()
        if ev.plural == "nodes" and (obj["metadata"].get("labels") or {}).get(POOL_LABEL) == GPU_POOL:
            (marks.nodes_deleted if ev.type == "DELETED" else marks.nodes_added if ev.type == "ADDED" else []).append(
                mono
            )
        if ev.plural == "pods" and (obj["metadata"].get("labels") or {}).get("app.kubernetes.io/name") == CHAT:
            conds = (obj.get("status") or {}).get("conditions") or []
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)
            old = ((ev.old or {}).get("status") or {}).get("conditions") or []
            was = any(c.get("type") == "Ready" and c.get("status") == "True" for c in old)
            if ev.type == "DELETED":
                marks.gone.append(mono)
            elif ready and not was:
                marks.ready.append(mono)

    def wait(pred: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError(f"sim check: {what} did not happen within {timeout_s:.0f} s")
            time.sleep(0.002)

    with SimStack(spec=spec, time_scale=time_scale, gpu_pool="autoscaled") as sim:
        sim.call(sim.store.listeners.append, on_event)

        def scale(n: int) -> float:
            def _scale(store: Store) -> None:
                d = store.get("deployments", ns, CHAT)
                d["spec"]["replicas"] = n
                store.update("deployments", d)

            t = time.monotonic()
            sim.call(_scale, sim.store)
            return t

        t0 = scale(1)
        wait(lambda: len(marks.ready) >= 1, "coder-chat Ready (fresh cluster)")
        t1 = scale(0)
        wait(lambda: len(marks.nodes_deleted) >= 1, "the GPU node removed")
        t2 = scale(1)
        wait(lambda: len(marks.ready) >= 2, "coder-chat Ready on a new node")
        scale(0)
        wait(lambda: len(marks.gone) >= 2, "coder-chat pod gone")
        t3 = scale(1)
        wait(lambda: len(marks.ready) >= 3, "coder-chat Ready on the same node")
        scale(0)
        same_node = len(marks.nodes_added) == 2
    measured = {
        "first_cold_start_s": (marks.ready[0] - t0) / time_scale,
        "scale_to_0_until_node_removed_s": (marks.nodes_deleted[0] - t1) / time_scale,
        "cold_start_new_node_s": (marks.ready[1] - t2) / time_scale,
        "warm_start_same_node_s": (marks.ready[2] - t3) / time_scale,
    }
    modelled = modelled_durations()
    return {
        "time_scale": time_scale,
        "measured_s": {k: round(v, 1) for k, v in measured.items()},
        "modelled_s": modelled,
        "ratio": {k: round(measured[k] / modelled[k], 3) for k in measured},
        "third_start_on_the_same_node": same_node,
    }


# ------------------------------------------------------------------ the table
def table(res: dict[str, Any]) -> str:
    rows = res.get("workday") or []
    if not rows:
        return ""
    a = res["workday_assumptions"]
    sims = all("sim" in r for r in rows)
    out = [
        f"workday: {a['trace']}, {a['requests']} requests to coder-chat; node price ${a['node_price_per_hour']:.4f}/h "
        f"({a['node_price_source']}); month = {a['workdays_per_month']} workdays; crash clean-up bound "
        f"{a['crash_cleanup_s']:.0f} s",
        "",
        f"{'policy':<42} {'node h':>7} {'wait min':>8} {'cold':>4} {'$/day':>7} {'$/month':>8}"
        + (f" {'sim node h':>10} {'sim wait':>8}" if sims else "")
        + "  killed run's coder-agent after the kill",
    ]
    for r in rows:
        k = r["killed"]
        left = f"{k.get('agent_min_after_kill', float('nan')):.0f} min, to {k.get('agent_until', '?')} "
        left += f"({k.get('agent_stopped_by', '')}); slot free {k['slot_free_at']}"
        out.append(
            f"{r['label']:<42} {r['node_hours']:>7.2f} {r['wait_min']:>8.1f} {len(r['cold_starts']):>4} "
            f"{r['cost_per_day']:>7.2f} {r['cost_per_month']:>8.2f}"
            + (f" {r['sim']['node_hours']:>10.2f} {r['sim']['wait_min']:>8.1f}" if sims else "")
            + f"  {left}"
        )
    chk = res.get("workday_sim_check")
    if chk:
        out += ["", f"sim check (SimStack, time scale {chk['time_scale']}): measured vs replay, simulated s"]
        for key, v in chk["measured_s"].items():
            out.append(f"  {key:<34} {v:>7.1f} vs {chk['modelled_s'][key]:>7.1f}  (x{chk['ratio'][key]:.3f})")
    return "\n".join(out)
