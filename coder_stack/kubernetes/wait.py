"""Waiting on a deployment's pods, watch-based (see :mod:`coder_stack.kubernetes.watch`), never sleep loops.

:func:`wait_ready` follows the pod through the cold-start phases (node, image, weights, start), each
with its own budget, reports each phase to ``on_phase``, and diagnoses states the pod will not recover
from (CrashLoopBackOff, image pull errors, OOMKilled, a missing Secret key, NotTriggerScaleUp) at once.
:func:`wait_gone` waits until no pod matches a selector (the GPU is free only then).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Literal

from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import NotFound, PodFailed, WaitTimeout
from coder_stack.kubernetes.pods import by_creation, is_deleting, is_pod_ready, kubectl_status, main_container
from coder_stack.kubernetes.watch import Item, watch_into, watching
from coder_stack.kubernetes.workloads import is_deployment_ready
from coder_stack.spec import PhaseBudgets

# After the pod is Ready, how long the deployment's status may lag behind (one reconcile) at least.
DEPLOYMENT_LAG_MIN_S = 5.0

PHASES: tuple[str, ...] = ("node", "image", "weights", "start")
Phase = Literal["node", "image", "weights", "start", "ready"]

_IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
_CONFIG_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError"})


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _condition(pod: client.V1Pod, ctype: str) -> client.V1PodCondition | None:
    for c in (pod.status.conditions if pod.status else None) or []:
        if c.type == ctype:
            return c
    return None


# ============================================================================================ wait_ready
class PhaseTiming(_Report):
    phase: str = Field(description="node, image, weights or start.")
    seen: bool = Field(description="Whether the pod was observed in this phase (False: skipped or done before).")
    budget_s: float = Field(ge=0, description="The phase's budget in seconds.")
    seconds: float = Field(ge=0, description="How long the phase took.")
    started_monotonic: float = Field(description="time.monotonic() when the phase began.")
    ended_monotonic: float = Field(description="time.monotonic() when the phase ended.")
    started_at: datetime = Field(description="Wall-clock start (UTC).")
    ended_at: datetime = Field(description="Wall-clock end (UTC).")


class ReadyReport(_Report):
    namespace: str = Field(description="Namespace of the deployment.")
    deployment: str = Field(description="Deployment waited for.")
    pod: str = Field(description="The pod that became Ready.")
    node: str | None = Field(None, description="Node the pod runs on.")
    phases: list[PhaseTiming] = Field(description="node, image, weights, start, in order.")
    seconds: dict[str, float] = Field(description="Seconds per phase.")
    total_s: float = Field(ge=0, description="From the start of the wait until the pod was Ready.")
    scale_up_seen: bool = Field(description="A TriggeredScaleUp event was seen: a node was provisioned for the pod.")
    already_ready: bool = Field(description="The pod was already Ready when the wait began.")
    deployment_lag_s: float = Field(ge=0, description="Pod Ready -> deployment status confirmed it.")
    ready_at: datetime = Field(description="Wall-clock time the pod was seen Ready (UTC).")


class PhaseUpdate(_Report):
    """What ``on_phase`` receives: where the cold start is now."""

    phase: str = Field(description="The phase just entered: node, image, weights, start or ready.")
    pod: str | None = Field(None, description="The pod followed, once one exists.")
    node: str | None = Field(None, description="Its node, once bound.")
    elapsed_s: float = Field(ge=0, description="Seconds since the wait began.")
    budget_s: float = Field(ge=0, description="Budget of this phase (0 for ready).")
    progress: float = Field(ge=0, le=1, description="Share of the whole budget used by the phases before this one.")
    scale_up_seen: bool = Field(description="A TriggeredScaleUp event was seen so far.")
    detail: str = Field("", description="One line in operator words.")


OnPhase = Callable[[str, PhaseUpdate], Awaitable[None] | None]


def _derive_phase(pod: client.V1Pod) -> Phase:
    """Which cold-start phase a pod is in, read from its status (see DESIGN.md, pod life cycle)."""
    spec = pod.spec or client.V1PodSpec(containers=[])
    st = pod.status or client.V1PodStatus()
    if not spec.node_name:
        return "node"
    if is_pod_ready(pod):
        return "ready"
    inits = st.init_container_statuses or []
    mains = st.container_statuses or []
    if spec.init_containers:
        done = (
            bool(inits)
            and all(c.state and c.state.terminated and c.state.terminated.exit_code == 0 for c in inits)
            and len(inits) >= len(spec.init_containers)
        )
        if not done:
            if any(c.state and c.state.running for c in inits):
                return "weights"
            if any(c.state and c.state.terminated for c in inits) and not any(
                c.state and c.state.waiting for c in inits
            ):
                return "weights"
            return "image"
        return "start"
    if st.phase == "Running" or any(c.state and (c.state.running or c.state.terminated) for c in mains):
        return "start"
    return "image"


def _event_key(ev: client.CoreV1Event) -> str:
    md = ev.metadata
    return str((md.uid or md.name) if md else id(ev))


def _event_time(ev: client.CoreV1Event) -> float:
    for ts in (ev.last_timestamp, ev.event_time, ev.first_timestamp, ev.metadata.creation_timestamp):
        if isinstance(ts, datetime):
            return ts.timestamp()
    return 0.0


class _PodEvents:
    """Events of pods, by pod name, in arrival order; kept for pods not seen yet too."""

    MAX = 2000

    def __init__(self) -> None:
        self.by_pod: dict[str, dict[str, tuple[int, client.CoreV1Event]]] = {}
        self.seq = 0
        self.count = 0

    def add(self, ev: client.CoreV1Event) -> None:
        io = ev.involved_object
        if io is None or (io.kind and io.kind != "Pod") or not io.name:
            return
        self.seq += 1
        bucket = self.by_pod.setdefault(io.name, {})
        if _event_key(ev) not in bucket:
            self.count += 1
        bucket[_event_key(ev)] = (self.seq, ev)
        if self.count > self.MAX:  # bound memory on a busy namespace: drop the oldest bucket
            oldest = min(self.by_pod, key=lambda n: max((s for s, _ in self.by_pod[n].values()), default=0))
            self.count -= len(self.by_pod.pop(oldest))

    def replace(self, events: list[client.CoreV1Event]) -> None:
        self.by_pod.clear()
        self.count = 0
        for ev in sorted(events, key=_event_time):
            self.add(ev)

    def of(self, pod: client.V1Pod) -> list[client.CoreV1Event]:
        uid = pod.metadata.uid
        out = []
        for seq, ev in sorted(self.by_pod.get(pod.metadata.name, {}).values(), key=lambda x: x[0]):
            ev_uid = ev.involved_object.uid
            if uid and ev_uid and ev_uid != uid:
                continue
            out.append((seq, ev))
        return [ev for _, ev in out]


def _last_termination(cs: client.V1ContainerStatus) -> client.V1ContainerStateTerminated | None:
    if cs.state and cs.state.terminated:
        return cs.state.terminated
    if cs.last_state and cs.last_state.terminated:
        return cs.last_state.terminated
    return None


OOM_HINT = (
    "host RAM caps model size, not VRAM: vLLM stages the weights through host RAM. "
    "Use a smaller model, or a GPU node with more memory (e.g. g2-standard-8 with 32 GB)"
)


def _fatal(pod: client.V1Pod, events: list[client.CoreV1Event], namespace: str, phase: str) -> PodFailed | None:
    """A state the pod will not recover from by waiting, or None."""
    name = pod.metadata.name
    st = pod.status or client.V1PodStatus()
    where = f"pod {namespace}/{name}"
    if st.phase in ("Failed", "Succeeded"):
        why = st.reason or st.phase
        return PodFailed(
            f"{where} ended with phase {st.phase} ({why}: {st.message or 'no message'}); "
            f"the deployment will replace it — look at `kubectl -n {namespace} describe pod {name}`",
            pod=name,
            reason=str(why),
            phase=phase,
        )
    statuses = [(c, True) for c in st.init_container_statuses or []] + [(c, False) for c in st.container_statuses or []]
    for cs, is_init in statuses:
        kind = "init container" if is_init else "container"
        waiting = cs.state.waiting if cs.state else None
        term = _last_termination(cs)
        if term is not None and (term.reason == "OOMKilled"):
            return PodFailed(
                f"{where}: {kind} {cs.name!r} was OOMKilled (exit code {term.exit_code}). {OOM_HINT}",
                pod=name,
                reason="OOMKilled",
                phase=phase,
            )
        if waiting is None or not waiting.reason:
            continue
        if waiting.reason == "CrashLoopBackOff":
            code = term.exit_code if term is not None else None
            return PodFailed(
                f"{where}: {kind} {cs.name!r} is in CrashLoopBackOff (last exit code {code}, "
                f"restarts {cs.restart_count}). Read its log: `kubectl -n {namespace} logs {name} -c {cs.name} "
                "--previous`, fix the cause (args, model, config), then restart the deployment",
                pod=name,
                reason="CrashLoopBackOff",
                phase=phase,
            )
        if waiting.reason in _IMAGE_PULL_REASONS:
            image = cs.image or _spec_image(pod, cs.name)
            return PodFailed(
                f"{where}: {kind} {cs.name!r} cannot pull image {image!r} ({waiting.reason}: "
                f"{waiting.message or _last_warning(events) or 'no message'}). Check the image name and tag, "
                "and that the node can reach the registry (pull secret)",
                pod=name,
                reason=waiting.reason,
                phase=phase,
            )
        if waiting.reason in _CONFIG_REASONS:
            return PodFailed(
                f"{where}: {kind} {cs.name!r} cannot be created ({waiting.reason}: "
                f"{waiting.message or _last_warning(events) or 'no message'}). A Secret or ConfigMap it reads "
                "(env secretKeyRef / envFrom) is missing or lacks the key: create it, then the pod starts by itself",
                pod=name,
                reason=waiting.reason,
                phase=phase,
            )
    if not (pod.spec and pod.spec.node_name):
        verdict = None
        for ev in events:
            if ev.reason in ("TriggeredScaleUp", "NotTriggerScaleUp"):
                verdict = ev
        if verdict is not None and verdict.reason == "NotTriggerScaleUp":
            sched = _condition(pod, "PodScheduled")
            why = sched.message if sched and sched.message else "unschedulable"
            return PodFailed(
                f"{where} cannot be scheduled ({why}) and the cluster autoscaler will not add a node "
                f"({verdict.message or 'NotTriggerScaleUp'}). Free the GPU (scale the other model to 0), "
                "or fix the pod's node selector/tolerations, or raise the GPU pool's maximum size",
                pod=name,
                reason="NotTriggerScaleUp",
                phase=phase,
            )
    return None


def _spec_image(pod: client.V1Pod, container: str) -> str:
    spec = pod.spec
    for c in ((spec.init_containers or []) + (spec.containers or [])) if spec else []:
        if c.name == container:
            return str(c.image)
    return "?"


def _last_warning(events: list[client.CoreV1Event]) -> str:
    for ev in reversed(events):
        if ev.type == "Warning":
            return f"{ev.reason}: {ev.message}"
    return ""


_TIMEOUT_HINTS = {
    "node": "the pod is not on a node yet. Look at the pod's events (FailedScheduling, TriggeredScaleUp) with "
    "`kubectl -n {ns} describe pod {pod}`: is the GPU still held by another model's pod, is the GPU node pool "
    "at its maximum? Raise budgets.node if the node is merely slow to provision",
    "image": "the image is still being pulled or the container created. Look at the pod's events (Pulling, "
    "FailedMount) with `kubectl -n {ns} describe pod {pod}`; the vLLM image is ~10 GB, raise budgets.image "
    "on a slow registry",
    "weights": "the init container is still staging the weights. Look at "
    "`kubectl -n {ns} logs {pod} -c {container}` and the model-cache PVC; raise budgets.weights for a slow download",
    "start": "the server has not passed its readiness probe. Look at `kubectl -n {ns} logs {pod} -c {container}` "
    "(vLLM loading the model) and the readiness probe; raise budgets.start for a large model",
}


class _Clock:
    def __init__(self) -> None:
        self.mono = time.monotonic()
        self.wall = datetime.now(UTC)

    @staticmethod
    def now() -> tuple[float, datetime]:
        return time.monotonic(), datetime.now(UTC)


class _ReadyWait:
    def __init__(
        self,
        namespace: str,
        name: str,
        budgets: PhaseBudgets,
        on_phase: OnPhase | None,
        deadline_s: float | None,
    ) -> None:
        self.ns = namespace
        self.name = name
        self.budgets = budgets
        self.on_phase = on_phase
        self.begin_mono, self.begin_wall = _Clock.now()
        self.deadline = self.begin_mono + deadline_s if deadline_s else None
        self.pods: dict[str, client.V1Pod] = {}
        self.known_uids: set[str] = set()
        self.events = _PodEvents()
        self.deployment: client.V1Deployment | None = None
        self.lists_seen: set[str] = set()
        self.phase: Phase = "node"
        self.phase_started: tuple[float, datetime] = (self.begin_mono, self.begin_wall)
        self.seen: dict[str, bool] = {"node": False}
        self.timings: list[PhaseTiming] = []
        self.ready_at: tuple[float, datetime] | None = None
        self.ready_pod: client.V1Pod | None = None
        self.already_ready = False
        self.scale_up_seen = False
        self.started_callbacks = False

    # ---- state updates
    def apply(self, item: Item) -> None:
        kind, resource, etype, payload = item
        if kind == "error":
            raise payload
        if resource == "pods":
            if kind == "list":
                self.pods = {p.metadata.name: p for p in payload}
            elif etype == "DELETED":
                self.pods.pop(payload.metadata.name, None)
            else:
                self.pods[payload.metadata.name] = payload
            for p in self.pods.values():
                if p.metadata.uid:
                    self.known_uids.add(p.metadata.uid)
        elif resource == "events":
            if kind == "list":
                self.events.replace(payload)
            elif etype != "DELETED":
                self.events.add(payload)
        elif resource == "deployments":
            if kind == "list":
                self.deployment = payload[0] if payload else None
            elif etype == "DELETED":
                self.deployment = None
            else:
                self.deployment = payload
        if kind == "list":
            self.lists_seen.add(resource)

    def live_pods(self) -> list[client.V1Pod]:
        return sorted((p for p in self.pods.values() if not is_deleting(p)), key=by_creation)

    def followed(self) -> client.V1Pod | None:
        live = self.live_pods()
        ready = [p for p in live if is_pod_ready(p)]
        candidates = ready or live
        return candidates[-1] if candidates else None

    # ---- phases
    def budget(self, phase: str) -> float:
        return float(getattr(self.budgets, phase)) if phase in PHASES else 0.0

    def _progress(self, phase: str) -> float:
        if phase == "ready":
            return 1.0
        idx = PHASES.index(phase)
        return sum(self.budget(p) for p in PHASES[:idx]) / self.budgets.total

    async def enter(self, new: Phase, pod: client.V1Pod | None, detail: str = "") -> None:
        order = (*PHASES, "ready")
        if order.index(new) <= order.index(self.phase):
            return
        now_mono, now_wall = _Clock.now()
        for p in order[order.index(self.phase) : order.index(new)]:
            started = self.phase_started if p == self.phase else (now_mono, now_wall)
            self.timings.append(
                PhaseTiming(
                    phase=p,
                    seen=self.seen.get(p, False),
                    budget_s=self.budget(p),
                    seconds=round(now_mono - started[0], 4),
                    started_monotonic=started[0],
                    ended_monotonic=now_mono,
                    started_at=started[1],
                    ended_at=now_wall,
                )
            )
        self.phase = new
        self.phase_started = (now_mono, now_wall)
        self.seen[new] = True
        if new != "ready":  # "ready" is announced once the deployment agrees
            await self.notify(new, pod, detail)

    async def notify(self, phase: str, pod: client.V1Pod | None, detail: str = "") -> None:
        if self.on_phase is None:
            return
        update = PhaseUpdate(
            phase=phase,
            pod=pod.metadata.name if pod else None,
            node=pod.spec.node_name if pod and pod.spec else None,
            elapsed_s=round(time.monotonic() - self.begin_mono, 3),
            budget_s=self.budget(phase),
            progress=self._progress(phase),
            scale_up_seen=self.scale_up_seen,
            detail=detail,
        )
        result = self.on_phase(phase, update)
        if inspect.isawaitable(result):
            await result

    def detail(self, phase: str, pod: client.V1Pod | None) -> str:
        if pod is None:
            return f"waiting for deployment {self.ns}/{self.name} to create a pod"
        name = pod.metadata.name
        if phase == "node":
            if self.scale_up_seen:
                return f"pod {name} is waiting for a node; the autoscaler is adding one (TriggeredScaleUp)"
            return f"pod {name} is waiting to be scheduled on a node"
        node = pod.spec.node_name if pod.spec else None
        return {
            "image": f"pod {name} on node {node}: pulling the image",
            "weights": f"pod {name} on node {node}: staging the model weights",
            "start": f"pod {name} on node {node}: the server is loading the model",
            "ready": f"pod {name} on node {node} is Ready",
        }.get(phase, "")

    # ---- the decision after each change
    async def step(self) -> ReadyReport | None:
        if "deployments" in self.lists_seen:
            if self.deployment is None:
                raise NotFound(
                    f"deployment {self.name!r} not found in namespace {self.ns!r} (or it was deleted while "
                    f"waiting); check the stack spec's names (`kubectl -n {self.ns} get deploy`)"
                )
            if self.deployment.spec and self.deployment.spec.replicas == 0:
                raise PodFailed(
                    f"deployment {self.ns}/{self.name} has replicas 0, so no pod will start. Scale it up first; "
                    "if it was scaled up, something scaled it back (a GitOps controller with self-heal?)",
                    pod="",
                    reason="ScaledToZero",
                    phase=self.phase,
                )
        scale_up_before = self.scale_up_seen
        for live in self.live_pods():
            evs = self.events.of(live)
            if any(ev.reason == "TriggeredScaleUp" for ev in evs):
                self.scale_up_seen = True
            failure = _fatal(live, evs, self.ns, self.phase)
            if failure is not None:
                raise failure
        pod = self.followed()
        if not self.started_callbacks:
            self.started_callbacks = True
            self.seen["node"] = True
            self.already_ready = pod is not None and is_pod_ready(pod)
            await self.notify("node", pod, self.detail("node", pod))
        if pod is not None:
            phase = _derive_phase(pod)
            if self.scale_up_seen and not scale_up_before and phase == "node" and self.phase == "node":
                await self.notify("node", pod, self.detail("node", pod))  # a node is on its way
            await self.enter(phase, pod, self.detail(phase, pod))
            if phase == "ready":
                if self.ready_at is None:
                    self.ready_at = _Clock.now()
                self.ready_pod = pod
            else:
                self.ready_at = None  # not Ready (any more): keep waiting
                self.ready_pod = None
        else:
            self.ready_at = None  # the Ready pod went away: the deployment replaces it
            self.ready_pod = None
        if self.ready_at is not None and self.deployment is not None and is_deployment_ready(self.deployment):
            return self.report()
        return None

    def report(self) -> ReadyReport:
        assert self.ready_at is not None and self.ready_pod is not None
        done_mono, _ = _Clock.now()
        seconds = {t.phase: t.seconds for t in self.timings}
        return ReadyReport(
            namespace=self.ns,
            deployment=self.name,
            pod=self.ready_pod.metadata.name,
            node=self.ready_pod.spec.node_name if self.ready_pod.spec else None,
            phases=[t for t in self.timings if t.phase in PHASES],
            seconds={p: seconds.get(p, 0.0) for p in PHASES},
            total_s=round(self.ready_at[0] - self.begin_mono, 4),
            scale_up_seen=self.scale_up_seen,
            already_ready=self.already_ready,
            deployment_lag_s=round(max(0.0, done_mono - self.ready_at[0]), 4),
            ready_at=self.ready_at[1],
        )

    def time_left(self) -> float:
        now = time.monotonic()
        if self.ready_at is not None:
            left = max(DEPLOYMENT_LAG_MIN_S, self.budget("start") - (self.ready_at[0] - self.phase_started[0]))
            limit = self.ready_at[0] + left
        else:  # a pod seen Ready that is not Ready any more is back in "start"
            limit = self.phase_started[0] + self.budget("start" if self.phase == "ready" else self.phase)
        if self.deadline is not None:
            limit = min(limit, self.deadline)
        return limit - now

    def timeout_error(self) -> WaitTimeout:
        now = time.monotonic()
        pod = self.followed()
        pod_name = pod.metadata.name if pod else "(none yet)"
        if self.ready_at is not None and self.deployment is not None:
            st = self.deployment.status or client.V1DeploymentStatus()
            return WaitTimeout(
                f"pod {self.ns}/{pod_name} is Ready but deployment {self.name} still reports readyReplicas="
                f"{st.ready_replicas or 0}/{self.deployment.spec.replicas} (observedGeneration "
                f"{st.observed_generation}, generation {self.deployment.metadata.generation}) after "
                f"{now - self.ready_at[0]:.1f}s. Look at the deployment controller and "
                f"`kubectl -n {self.ns} get deploy {self.name}`",
                phase="ready",
                elapsed_s=now - self.ready_at[0],
            )
        phase = "start" if self.phase == "ready" else self.phase
        elapsed = now - self.phase_started[0]
        overall = self.deadline is not None and now >= self.deadline - 0.001
        container = main_container(pod, init=phase == "weights")
        hint = _TIMEOUT_HINTS[phase].format(ns=self.ns, pod=pod_name, container=container)
        warning = _last_warning(self.events.of(pod)) if pod else ""
        status = f" (pod status {kubectl_status(pod)})" if pod else ""
        budget = (
            f"the overall deadline of {self.deadline - self.begin_mono:.0f}s"
            if overall and self.deadline is not None
            else f"its budget of {self.budget(phase):.0f}s"
        )
        return WaitTimeout(
            f"deployment {self.ns}/{self.name}: phase {phase!r} took {elapsed:.1f}s, over {budget}"
            f"{status}: {hint}." + (f" Last warning event: {warning}" if warning else ""),
            phase=phase,
            elapsed_s=elapsed,
        )


async def wait_ready(
    api: ApiClient,
    namespace: str,
    name: str,
    selector: str,
    budgets: PhaseBudgets,
    *,
    on_phase: OnPhase | None = None,
    deadline_s: float | None = None,
) -> ReadyReport:
    """Follow the deployment's pod through node, image, weights, start until Ready.

    Each phase has its own budget; over it -> :class:`WaitTimeout` naming the phase. A state the pod
    cannot recover from (CrashLoopBackOff, image pull errors, OOMKilled, a missing Secret key,
    Unschedulable with NotTriggerScaleUp) -> :class:`PodFailed` at once. Pending with TriggeredScaleUp is
    progress. Returns once the pod's Ready condition is True and the deployment's status agrees
    (observedGeneration >= generation, readyReplicas == replicas). ``deadline_s`` caps the whole wait.
    """
    core = client.CoreV1Api(api)
    apps = client.AppsV1Api(api)
    queue: asyncio.Queue[Item] = asyncio.Queue()
    state = _ReadyWait(namespace, name, budgets, on_phase, deadline_s)
    async with watching(
        watch_into(queue, "pods", core.list_namespaced_pod, namespace, label_selector=selector),
        watch_into(queue, "events", core.list_namespaced_event, namespace, field_selector="involvedObject.kind=Pod"),
        watch_into(
            queue, "deployments", apps.list_namespaced_deployment, namespace, field_selector=f"metadata.name={name}"
        ),
    ):
        while True:
            left = state.time_left()
            if left <= 0:
                raise state.timeout_error()
            try:
                item = await asyncio.wait_for(queue.get(), timeout=left)
            except TimeoutError:
                raise state.timeout_error() from None
            state.apply(item)
            while not queue.empty():  # apply everything already delivered before deciding
                state.apply(queue.get_nowait())
            if state.lists_seen >= {"pods", "events", "deployments"}:
                report = await state.step()
                if report is not None:
                    await state.notify("ready", state.ready_pod, state.detail("ready", state.ready_pod))
                    return report


# ============================================================================================ wait_gone
class GoneReport(_Report):
    namespace: str = Field(description="Namespace watched.")
    selector: str = Field(description="Label selector of the pods.")
    seconds: float = Field(ge=0, description="How long until no pod matched.")
    pods_seen: int = Field(ge=0, description="How many distinct pods were seen while waiting.")
    pod_names: list[str] = Field(default_factory=list, description="Their names.")


async def wait_gone(api: ApiClient, namespace: str, selector: str, timeout_s: float) -> GoneReport:
    """Watch until no pod matches the selector — not merely replicas 0: the GPU is free only then."""
    core = client.CoreV1Api(api)
    begin = time.monotonic()
    queue: asyncio.Queue[Item] = asyncio.Queue()
    pods: dict[str, client.V1Pod] = {}
    seen: list[str] = []
    listed = False
    async with watching(watch_into(queue, "pods", core.list_namespaced_pod, namespace, label_selector=selector)):
        while True:
            left = begin + timeout_s - time.monotonic()
            if listed and not pods:
                return GoneReport(
                    namespace=namespace,
                    selector=selector,
                    seconds=round(time.monotonic() - begin, 4),
                    pods_seen=len(seen),
                    pod_names=seen,
                )
            try:
                if left <= 0:
                    raise TimeoutError
                kind, _resource, etype, payload = await asyncio.wait_for(queue.get(), timeout=left)
            except TimeoutError:
                remaining = ", ".join(f"{p.metadata.name} ({kubectl_status(p)})" for p in pods.values())
                raise WaitTimeout(
                    f"pods matching {selector!r} in namespace {namespace!r} were still present after {timeout_s:.0f}s: "
                    f"{remaining}. A pod stuck Terminating may have a finalizer or an unreachable node: "
                    f"`kubectl -n {namespace} describe pod`; the GPU is not free until they are gone",
                    phase="gone",
                    elapsed_s=time.monotonic() - begin,
                ) from None
            if kind == "error":
                raise payload
            if kind == "list":
                pods = {p.metadata.name: p for p in payload}
                listed = True
            elif etype == "DELETED":
                pods.pop(payload.metadata.name, None)
            else:
                pods[payload.metadata.name] = payload
            for n in pods:
                if n not in seen:
                    seen.append(n)


__all__ = [
    "DEPLOYMENT_LAG_MIN_S",
    "OOM_HINT",
    "PHASES",
    "GoneReport",
    "OnPhase",
    "Phase",
    "PhaseTiming",
    "PhaseUpdate",
    "ReadyReport",
    "wait_gone",
    "wait_ready",
]
