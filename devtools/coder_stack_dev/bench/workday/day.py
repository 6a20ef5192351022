"""The discrete-event replay of one policy's day in simulated time (:class:`Day`): the GPU node and its
autoscaler, the pods, the GPU slot, the idle verdict of the project's own metrics code, the killed run."""

from __future__ import annotations

import functools
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from simstack.standins.vllm import Metrics
from simstack.timings import Timings, model_timings

from coder_stack.orchestration.gpu_limit import LEASE_SECONDS
from coder_stack.spec import StackSpec
from coder_stack.vllm.metrics import Reading, activity_of, judge, parse_exposition
from coder_stack_dev.bench.workday.policy import Policy
from coder_stack_dev.bench.workday.result import Result
from coder_stack_dev.bench.workday.schedules import MINUTE, Schedules, hm, read_schedules
from coder_stack_dev.bench.workday.trace import Trace

CHAT = "coder-chat"
AGENT = "coder-agent"


@dataclass
class Pod:
    model: str
    created: float
    node: str | None = None
    ready_at: float | None = None
    terminating: bool = False
    metrics: Metrics | None = None


@dataclass
class GpuNode:
    name: str
    requested: float
    ready: float | None = None
    image_cached: bool = False
    idle_since: float | None = None
    removed: float | None = None


class SharingRefused(ValueError):
    """A shared (time-sliced) policy on a spec whose models do not fit one GPU together: the message says why,
    with the spec's numbers (``StackSpec.shares_fit``), and what to change."""


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
        if policy.shared:
            verdict = spec.shares_fit(list(policy.morning))
            if spec.gpu_sharing.mode != "time-sliced" or not verdict.fits:
                why = (
                    ["gpu_sharing.mode is exclusive: set it to time-sliced"]
                    if spec.gpu_sharing.mode != "time-sliced"
                    else verdict.problems()
                )
                raise SharingRefused(
                    f"policy {policy.name}: {', '.join(policy.morning)} cannot share one GPU ({verdict.summary()}): "
                    + "; ".join(why)
                    + "; or run the exclusive policy"
                )
        self.t = timings or Timings()
        self.lease_s = lease_s
        self.date = datetime(2026, 12, 1, tzinfo=UTC)
        self.now = 0.0
        self._q: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.replicas: dict[str, int] = {m.name: 0 for m in spec.models}
        self.pods: dict[str, Pod] = {}  # model -> its pod (not terminating)
        self.terminating: list[Pod] = []
        self.nodes: list[GpuNode] = []
        self.annotations: dict[str, str] = {}  # model -> kept reading (coder-stack.io/activity)
        self.slot: str | None = None  # who holds the GPU slot
        self.slot_queue: list[tuple[str, Callable[[], None]]] = []
        self.outage: dict[str, float] = {}  # model -> the first request that found it not serving, until Ready
        self.waiting: dict[str, list[float]] = {}  # with wake: model -> requests waiting for it (delayed)
        self.failed: list[tuple[float, str]] = []  # without wake: requests that found their model not serving
        self.delays_s: list[float] = []  # with wake: each delayed request's wait (Ready - its arrival)
        self.delays_by_model: dict[str, list[float]] = {}  # the same, per model
        self.wake_pending: set[str] = set()  # with wake: woken (event sent), not Ready yet
        self.gpu_waits: dict[str, float] = {}  # with wake: model -> since when its wake waits for the GPU
        self.wakes: list[dict[str, Any]] = []
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
        for r, model in tr.all_requests:
            self.at(r, functools.partial(self._request, r, model))
        if tr.killed_run:
            self.at(tr.killed_start, self._validate_start)
            self.at(tr.kill_at, self._validate_end)
        if p.flows and p.idle_after_s is not None:
            tick = s.reclaim_every_s
            for k in range(int(tr.end // tick) + 1):
                self.at(k * tick + 1e-3, self._reclaim)  # just after the minute: after that minute's requests

    # ---- the cluster: pods, the GPU node, the autoscaler (devtools/simstack/controllers: deployment, scheduler,
    # kubelet, autoscaler; durations from Timings)
    def _node(self) -> GpuNode | None:
        return next((n for n in self.nodes if n.removed is None), None)

    def scale(self, model: str, replicas: int, why: str = "") -> None:
        if self.replicas[model] == replicas:
            return
        self.replicas[model] = replicas
        self.log(f"{model} scaled to {replicas}" + (f" ({why})" if why else ""))
        kill_at = self.trace.kill_at
        after_kill = self.trace.killed_run and self.now >= kill_at
        if replicas == 0 and model == AGENT and after_kill and "agent_until" not in self.killed:
            self.killed["agent_until"] = hm(self.now)
            self.killed["agent_min_after_kill"] = round((self.now - kill_at) / MINUTE, 1)
            self.killed["agent_stopped_by"] = why
        self._apply(model, replicas)
        if replicas == 0 and self.gpu_waits:
            self.at(self.now, self._retry_wakes)  # a wake waiting for the GPU looks again
        if replicas == 0 and model in self.wake_pending:
            # taken away before it was Ready (a validate run's take_over): that wake ends; the people waiting
            # retry, and the hook asks again
            self.wake_pending.discard(model)
            self.free_slot(f"wake {model}")  # the wake flow ends without its model: it gives the slot back
            if self.waiting.get(model):
                self._request_wake(model, self.now)

    def _has_pods(self, model: str) -> bool:
        """A pod of ``model`` still exists (terminating)."""
        return any(q.model == model for q in self.terminating)

    def _apply(self, model: str, replicas: int) -> None:
        if replicas == 1:
            self.pods[model] = Pod(model, self.now)
            self._schedule()
            return
        pod = self.pods.pop(model, None)
        if pod is not None:
            pod.terminating = True
            self.terminating.append(pod)
            self.at(self.now + self.t.termination_s, lambda: self._gone(pod))

    def _busy(self, node: GpuNode) -> bool:
        return any(q.node == node.name for q in [*self.pods.values(), *self.terminating])

    def _gone(self, pod: Pod) -> None:
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

    def _maybe_remove(self, node: GpuNode) -> None:
        since = node.idle_since
        if node.removed is None and since is not None and self.now - since >= self.t.scale_down_unneeded_s - 1e-6:
            node.removed = self.now
            self.log(f"GPU node {node.name} removed by the autoscaler (billed {hm(node.requested)}-{hm(self.now)})")

    def _schedule(self) -> None:
        """Bind a pending GPU pod when the one GPU is free; ask the autoscaler for a node when there is none."""
        pending = [q for q in self.pods.values() if q.node is None]
        if not pending:
            return
        pod = min(pending, key=lambda q: q.created)
        bound = [q for q in [*self.pods.values(), *self.terminating] if q.node is not None]
        if self.p.shared and bound:
            # time-sliced: the pod joins the GPU when its share is free beside the shares held (running or
            # terminating pods) and no other server is still starting: vLLM measures free memory when it starts,
            # so servers that share a GPU start one after another (issue 20)
            if any(q.ready_at is None and not q.terminating for q in bound):
                return
            if not self.spec.shares_fit([*{q.model for q in bound}, pod.model]).fits:
                return
        elif bound:
            return  # the GPU is taken (a pod running or terminating): Unschedulable, max node group size
        node = self._node()
        if node is None:
            name = f"gpu-{len(self.nodes) + 1}"
            node = GpuNode(name, self.now)
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

    def _node_ready(self, node: GpuNode) -> None:
        node.ready = self.now
        self.log(f"GPU node {node.name} Ready")
        self._schedule()
        self._idle_check()

    def _ready(self, pod: Pod) -> None:
        if self.pods.get(pod.model) is not pod:
            return
        pod.ready_at = self.now
        # a fresh engine: its counters start at 0, vllm:request_success_created = its start
        pod.metrics = Metrics(started=(self.date + timedelta(seconds=self.now)).timestamp())
        self.log(f"{pod.model} Ready")
        for fn in self._on_ready.pop(pod.model, []):
            fn()
        if self.p.shared:
            self._schedule()  # the next server that shares the GPU may start now

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
        """Scale ``models`` to 0 and call ``fn`` once all their pods are gone (coder_stack.flows.gpu_steps.free_gpu)."""
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

    def blockers(self, model: str) -> list[str]:
        """The models scaled up that keep ``model`` off the GPU: exclusive, every other one; shared, every other
        one unless their shares and ``model``'s fit the GPU together (``StackSpec.shares_fit``)."""
        others = [m for m, n in self.replicas.items() if n and m != model]
        if self.p.shared and others and self.spec.shares_fit([*others, model]).fits:
            return []
        return others

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
        if self.p.morning == (CHAT,):
            self._bring_up("morning-bring-up")
        else:
            self._bring_up_all("morning-bring-up", self.p.morning)

    def _bring_up_all(self, who: str, models: tuple[str, ...]) -> None:
        """The bring-up of several models that share the GPU: frees it of the others, brings each up in turn
        (one start at a time), smokes each."""

        def go() -> None:
            others = [m for m in self.pods if m not in models]
            self.when_gone(others, functools.partial(nxt, 0), f"{who} frees the GPU")

        def nxt(i: int) -> None:
            if i == len(models):
                self.free_slot(who)
                return

            def smoked() -> None:
                self.serve(models[i], 2)
                nxt(i + 1)

            self.up(models[i], smoked)

        self.take_slot(who, go)

    def _bring_up(self, who: str, model: str = CHAT) -> None:
        """bring_up (or by hand: kubectl): free the GPU except ``model``, scale it up, smoke it."""

        def go() -> None:
            others = self.blockers(model) if self.p.shared else [m for m in self.pods if m != model]
            how = "by hand: swapped back" if not self.p.flows else f"{who} frees the GPU"
            self.when_gone(others, functools.partial(self.up, model, done), how)

        def done() -> None:
            if self.p.flows:
                self.serve(model, 2)  # the direct and the gateway smoke
            self.free_slot(who)

        self.take_slot(who, go)

    def _evening(self) -> None:
        self.log("by hand: everything down" if not self.p.flows else "evening-teardown")
        for m in list(self.replicas):
            self.scale(m, 0, "by hand at the end of the day" if not self.p.flows else "evening-teardown")

    def _request(self, r: float, model: str = CHAT) -> None:
        """One request to ``model``: served when it is Ready; otherwise, without wake it fails (and a person
        brings the model back ``react_s`` later, within the policy's day), with wake it waits for the model and
        the first request of the outage wakes it."""
        if self.is_ready(model):
            self.serve(model)
            return
        state = "cold-starting" if self.replicas[model] else "at 0"
        first = model not in self.outage
        if first:
            self.outage[model] = r
            self.when_ready(model, functools.partial(self._back, model))
        if self.p.wake:
            self.waiting.setdefault(model, []).append(r)
            if not self.replicas[model] and model not in self.wake_pending:
                self.log(f"request finds {model} {state}: wake requested")
                self._request_wake(model, r)
            return
        self.failed.append((r, model))
        if not first:
            return
        in_day = self.now < self.p.down_s and (self.p.flows or self.now >= self.p.up_s)
        nobody = self.p.react_s is None or not in_day
        self.log(f"request to {model} fails: {state}" + ("" if nobody else ": bring it back"))
        if self.p.react_s is None or not in_day:
            return
        if self.p.react_s == 0:
            self._person_brings_back(model)
        else:
            self.at(self.now + self.p.react_s, functools.partial(self._person_brings_back, model))

    def _person_brings_back(self, model: str) -> None:
        if self.is_ready(model):
            return
        if not self.replicas[model] or (self.blockers(model) if self.p.shared else any(m != model for m in self.pods)):
            self._bring_up("coder-stack up", model)

    def _back(self, model: str) -> None:
        """``model`` Ready after an outage: the delayed requests are served; the outage is recorded."""
        first = self.outage.pop(model)
        waiting = self.waiting.pop(model, [])
        self.wake_pending.discard(model)
        entry: dict[str, Any] = {"model": model, "request": hm(first), "ready": hm(self.now),
                                 "wait_min": round((self.now - first) / MINUTE, 2)}  # fmt: skip
        if self.p.wake:
            entry["requests_delayed"] = len(waiting)
        else:
            entry["requests_failed"] = sum(1 for t, m in self.failed if m == model and t >= first)
        self.cold_starts.append(entry)
        self.delays_s += [self.now - r for r in waiting]
        self.delays_by_model.setdefault(model, []).extend(self.now - r for r in waiting)
        self.request_wait_s += sum(self.now - r for r in waiting)
        if waiting:
            self.serve(model, len(waiting))

    # ---- wake on demand (the wake_model flow, started by the hook's event through the deployment trigger)
    def _request_wake(self, model: str, r: float) -> None:
        self.wake_pending.add(model)
        self.wakes.append({"model": model, "requested": hm(r)})
        self.at(self.now + self.p.wake_latency_s, functools.partial(self._wake, model))

    def _wake(self, model: str) -> None:
        """The wake flow starts: idempotent (Ready or coming up: nothing to do); never evicts a model in use:
        while another model holds the GPU it waits (``waiting-for-gpu``) until reclaim takes that one away."""
        if self.is_ready(model) or self.replicas[model]:
            self.wake_pending.discard(model)
            self.gpu_waits.pop(model, None)
            return
        wake = next(w for w in reversed(self.wakes) if w["model"] == model)
        wake.setdefault("flow_start", hm(self.now))
        busy = self.blockers(model)
        if busy:
            if model not in self.gpu_waits:
                self.gpu_waits[model] = self.now
                self.log(f"wake {model} waits for the GPU: {', '.join(busy)} in use")
            return
        since = self.gpu_waits.pop(model, None)
        if since is not None:
            wake["gpu_wait_min"] = round((self.now - since) / MINUTE, 2)
        who = f"wake {model}"

        def go() -> None:
            if self.is_ready(model) or self.replicas[model]:
                self.free_slot(who)
            elif self.blockers(model):
                self.free_slot(who)  # someone took the GPU while the wake waited for the slot: wait again
                self._wake(model)
            else:
                self.log(f"wake_model brings {model} up")
                self.up(model, lambda: self.free_slot(who))

        self.take_slot(who, go)

    def _retry_wakes(self) -> None:
        for model in list(self.gpu_waits):
            self._wake(model)

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
        kill_at = self.trace.kill_at
        slot_free = next(
            (t for t, what in self.events
             if self.trace.killed_run and t >= kill_at and what == "GPU slot released (validate)"), None
        )  # fmt: skip
        killed = dict(self.killed)
        if not self.trace.killed_run:
            killed["slot_free_at"] = "no killed run"
        else:
            killed["slot_free_at"] = hm(slot_free) if slot_free is not None else "no slot (by hand)"
        cold_starts = list(self.cold_starts)
        for model, first in self.outage.items():  # never back before the end
            left = len(self.waiting.get(model, [])) or sum(1 for t, m in self.failed if m == model and t >= first)
            cold_starts.append({"model": model, "request": hm(first), "ready": None,
                                "wait_min": round((end - first) / MINUTE, 2), "requests_not_served": left})  # fmt: skip
        never = [(r, m) for m, rs in self.waiting.items() for r in rs]  # delayed past the end: count as failed
        return Result(
            policy=self.p.name,
            label=self.p.label,
            node_seconds=secs,
            nodes=nodes,
            cold_starts=cold_starts,
            wait_s=sum(c["wait_min"] for c in cold_starts) * MINUTE,
            request_wait_s=self.request_wait_s,
            reclaims=self.reclaims,
            killed=killed,
            events=self.events,
            failed_requests=len(self.failed) + len(never),
            failed_by_model={m: sum(1 for _, x in [*self.failed, *never] if x == m) for m in self.trace.by_model()},
            delayed_by_model={m: len(self.delays_by_model.get(m, [])) for m in self.trace.by_model()},
            delays_by_model={m: self.delays_by_model.get(m, []) for m in self.trace.by_model()},
            delayed_requests=len(self.delays_s),
            delays_s=self.delays_s,
            wakes=self.wakes,
        )


def replay(policy: Policy, trace: Trace, schedules: Schedules | None = None, **kw: Any) -> Result:
    return Day(policy, trace, schedules or read_schedules(), **kw).run()
