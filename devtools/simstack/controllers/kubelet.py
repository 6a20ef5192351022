"""One kubelet for every node: walks each bound pod through its phases with the real states, events
and timings (Secret/ConfigMap volumes, sandbox and pod IP, image pulls with the node's image cache,
init containers staging weights, CreateContainerConfigError, CrashLoopBackOff, OOMKilled, ImagePullBackOff),
starts the app's stand-in with the container's resolved environment before writing Ready, and
terminates pods gracefully. A pod whose image is runnable (:mod:`simstack.podruntime`) runs its container as a
local process instead: Running while it runs, then ``terminated`` with its exit code and, for
``restartPolicy: Never``, phase Succeeded or Failed; its output is the container's log. A container whose image
is neither (no behaviour to give it) is never started: its pull fails (``ErrImagePull``, then ``ImagePullBackOff``
with back-off, the pod Pending), as for an image the registry does not have, with a hint how to run it here.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from simstack.cluster_objects import GPU_RESOURCE, NAME_LABEL, VLLM_IMAGE, parse_quantity
from simstack.controllers.context import ClusterContext
from simstack.controllers.faults import injected_crash
from simstack.controllers.loop import Loop, log
from simstack.controllers.objects import pod_requests
from simstack.layout import gpu_share
from simstack.podruntime import PodProcess, unrunnable_hint
from simstack.pods import MissingConfigError, expand, missing_volumes, mounted_files, resolve_container_env
from simstack.standins import ContainerRun, RunningBackend
from simstack.standins import vllm as vllm_standin
from simstack.store import NotFoundError, Obj, now_rfc3339
from simstack.timings import model_timings


def _image_ref(image: str) -> str:
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return "docker.io/" + (image if "/" in image else "library/" + image)


def _image_id(image: str) -> str:
    return _image_ref(image).rsplit(":", 1)[0] + "@sha256:" + hashlib.sha256(image.encode()).hexdigest()


@dataclass
class _CState:
    name: str
    image: str
    init: bool
    state: Obj
    last_state: Obj = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    restart_count: int = 0
    image_id: str = ""
    container_id: str | None = None

    def to_status(self) -> Obj:
        out: Obj = {
            "name": self.name,
            "image": self.image,
            "imageID": self.image_id,
            "ready": self.ready,
            "restartCount": self.restart_count,
            "started": self.started,
            "state": copy.deepcopy(self.state),
            "lastState": copy.deepcopy(self.last_state),
        }
        if self.container_id:
            out["containerID"] = self.container_id
        return out


@dataclass
class _PodRun:
    uid: str
    namespace: str
    name: str
    node: str
    init: list[_CState]
    main: list[_CState]
    phase: str = "Pending"
    host_ip: str = ""
    pod_ip: str = ""
    start_time: str = ""
    conditions: dict[str, Obj] = field(default_factory=dict)
    done_reason: str | None = None  # PodCompleted / PodFailed once every container has terminated for good

    def set_condition(self, ctype: str, status: bool, reason: str | None = None, message: str | None = None) -> None:
        s = "True" if status else "False"
        cur = self.conditions.get(ctype)
        ltt = cur["lastTransitionTime"] if cur and cur["status"] == s else now_rfc3339()
        c: Obj = {"type": ctype, "status": s, "lastProbeTime": None, "lastTransitionTime": ltt}
        if reason:
            c["reason"] = reason
        if message:
            c["message"] = message
        self.conditions[ctype] = c

    def refresh_conditions(self) -> None:
        if self.init:
            pending = [c.name for c in self.init if "terminated" not in c.state]
            if pending:
                self.set_condition(
                    "Initialized",
                    False,
                    "ContainersNotInitialized",
                    f"containers with incomplete status: [{' '.join(pending)}]",
                )
            else:
                self.set_condition("Initialized", True)
        else:
            self.set_condition("Initialized", True)
        unready = [c.name for c in self.main if not c.ready]
        if self.done_reason:
            self.set_condition("Ready", False, self.done_reason)
            self.set_condition("ContainersReady", False, self.done_reason)
        elif unready:
            msg = f"containers with unready status: [{' '.join(unready)}]"
            self.set_condition("Ready", False, "ContainersNotReady", msg)
            self.set_condition("ContainersReady", False, "ContainersNotReady", msg)
        else:
            self.set_condition("Ready", True)
            self.set_condition("ContainersReady", True)

    def status(self, base: Obj) -> Obj:
        self.refresh_conditions()
        order = ["PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"]
        conds = {c["type"]: c for c in base.get("conditions") or []}
        conds.update(self.conditions)
        st: Obj = {
            "phase": self.phase,
            "conditions": [conds[t] for t in order if t in conds],
            "hostIP": self.host_ip,
            "hostIPs": [{"ip": self.host_ip}],
            "startTime": self.start_time,
            "qosClass": base.get("qosClass", "BestEffort"),
            "containerStatuses": [c.to_status() for c in self.main],
        }
        if self.pod_ip:
            st["podIP"] = self.pod_ip
            st["podIPs"] = [{"ip": self.pod_ip}]
        if self.init:
            st["initContainerStatuses"] = [c.to_status() for c in self.init]
        return st


class _PodGone(Exception):
    pass


class Kubelet:
    """One kubelet for every node: walks bound pods through their phases, runs and stops stand-ins."""

    def __init__(self, cluster: ClusterContext) -> None:
        self.c = cluster
        self.loop = Loop("kubelet", self.reconcile)
        self.workers: dict[str, asyncio.Task[None]] = {}
        self.terminating: dict[str, asyncio.Task[None]] = {}
        self.running: dict[str, RunningBackend] = {}  # pod uid -> stand-in
        self.weights_cached: set[str] = set()  # models on the model-cache PVC
        self._pull_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._config_waiters: set[asyncio.Future[None]] = set()
        self._ip_seq: dict[str, int] = {}
        self._pods: dict[str, tuple[str, str]] = {}  # uid -> (namespace, name)
        self._cleanups: set[asyncio.Future[None]] = set()
        self.processes: dict[str, PodProcess] = {}  # pod uid -> the process of a runnable pod's container
        self._logs: dict[tuple[str, str, str], Path] = {}  # (namespace, pod, container) -> its log file
        # time-sliced GPUs: pod uid -> (node, bytes) a vLLM server holds on the node's one physical GPU, from
        # its container's start until the container stops
        self.gpu_held: dict[str, tuple[str, int]] = {}
        self._standin_logs: str | None = None  # a directory for the logs stand-in containers write
        self._previous_logs: dict[tuple[str, str, str], Path] = {}  # a stand-in container's instance before

    def log_file(self, namespace: str, pod: str, container: str, previous: bool = False) -> Path | None:
        """The log file of a runnable pod's container (what ``pods/log`` serves), if it ever ran; ``previous``:
        the instance before the current one (kept for the stand-ins' containers only)."""
        if previous:
            return self._previous_logs.get((namespace, pod, container))
        return self._logs.get((namespace, pod, container))

    # -- manager
    def reconcile(self) -> None:
        store = self.c.store
        pods = store.list("pods")
        seen = set()
        for pod in pods:
            meta = pod["metadata"]
            uid = meta["uid"]
            seen.add(uid)
            self._pods[uid] = (meta["namespace"], meta["name"])
            if meta.get("deletionTimestamp"):
                if not pod["spec"].get("nodeName"):
                    # never bound: nothing runs, the API server removes it at once
                    store.delete("pods", meta["namespace"], meta["name"])
                elif uid not in self.terminating:
                    self.terminating[uid] = asyncio.get_running_loop().create_task(self._terminate(pod))
                continue
            node = pod["spec"].get("nodeName")
            if node and uid not in self.workers and store.find("nodes", None, node) is not None:
                self.workers[uid] = asyncio.get_running_loop().create_task(
                    self._run_pod(pod), name=f"pod {meta['name']}"
                )
        for uid in [u for u in list(self.workers) if u not in seen]:  # removed without a graceful deletion
            self.workers.pop(uid).cancel()
            self.gpu_held.pop(uid, None)
            asyncio.get_running_loop().create_task(self._stop_backend(uid))

    def config_changed(self) -> None:
        for fut in self._config_waiters:
            if not fut.done():
                fut.set_result(None)
        self._config_waiters.clear()

    async def _wait_config(self, timeout: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._config_waiters.add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            self._config_waiters.discard(fut)

    async def stop_all(self) -> None:
        tasks = list(self.workers.values()) + list(self.terminating.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for uid in list(self.running):
            await self._stop_backend(uid)
        procs = list(self.processes.values())
        self.processes.clear()
        await asyncio.gather(*(p.stop(2.0) for p in procs), return_exceptions=True)
        self.gpu_held.clear()
        if self._standin_logs is not None:
            shutil.rmtree(self._standin_logs, ignore_errors=True)
            self._standin_logs = None

    async def _stop_backend(self, uid: str) -> None:
        ns_name = self._pods.get(uid)
        if ns_name:
            self.c.backends.unregister(*ns_name)
        backend = self.running.pop(uid, None)
        if backend is not None:
            try:
                await backend.stop()
            except Exception:
                log.exception("stopping stand-in of %s failed", ns_name)

    # -- status writing
    def _write(self, r: _PodRun) -> Obj:
        store = self.c.store
        pod = store.find("pods", r.namespace, r.name)
        if pod is None or pod["metadata"]["uid"] != r.uid:
            raise _PodGone(r.name)
        pod["status"] = r.status(pod.get("status") or {})
        return store.update("pods", pod, status_only=True)

    def _event(self, r: _PodRun, reason: str, message: str, type_: str = "Normal", cs: _CState | None = None) -> None:
        pod = self.c.store.find("pods", r.namespace, r.name)
        if pod is None:
            return
        fp = None
        if cs is not None:
            fp = f"spec.{'initContainers' if cs.init else 'containers'}{{{cs.name}}}"
        self.c.events.emit(pod, reason, message, type_, component="kubelet", host=r.node, field_path=fp)

    def _backoff(self, n: int) -> float:
        t = self.c.timings
        return float(min(t.backoff_initial_s * (2 ** max(n - 1, 0)), t.backoff_max_s))

    # -- pod life
    async def _run_pod(self, pod: Obj) -> None:
        try:
            await self._walk(pod)
        except (_PodGone, NotFoundError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("kubelet: pod %s failed", pod["metadata"]["name"])

    def _containers(self, pod: Obj) -> tuple[list[_CState], list[_CState]]:
        spec = pod["spec"]
        inits = [
            _CState(c["name"], c["image"], True, {"waiting": {"reason": "PodInitializing"}})
            for c in spec.get("initContainers") or []
        ]
        main_reason = "PodInitializing" if inits else "ContainerCreating"
        mains = [
            _CState(c["name"], c["image"], False, {"waiting": {"reason": main_reason}}) for c in spec["containers"]
        ]
        return inits, mains

    async def _walk(self, pod: Obj) -> None:
        store = self.c.store
        meta, spec = pod["metadata"], pod["spec"]
        node = store.get("nodes", None, spec["nodeName"])
        inits, mains = self._containers(pod)
        r = _PodRun(meta["uid"], meta["namespace"], meta["name"], spec["nodeName"], inits, mains)
        r.host_ip = next(
            (a["address"] for a in node["status"].get("addresses") or [] if a["type"] == "InternalIP"), "10.128.0.1"
        )
        r.start_time = now_rfc3339()
        r.set_condition("PodReadyToStartContainers", False)
        r.set_condition("PodScheduled", True)
        self._write(r)

        # volumes: Secret / ConfigMap volumes must exist before the sandbox starts
        last_report = -math.inf
        while True:
            missing = missing_volumes(store, r.namespace, spec)
            if not missing:
                break
            mono = time.monotonic()
            if mono - last_report >= self.c.scaled(self.c.timings.mount_retry_s):
                last_report = mono
                for vol, why in missing:
                    self._event(r, "FailedMount", f'MountVolume.SetUp failed for volume "{vol}" : {why}', "Warning")
            await self._wait_config(self.c.scaled(self.c.timings.mount_retry_s))

        idx = self._ip_seq.get(r.node, 1) + 1
        self._ip_seq[r.node] = idx
        cidr = node["spec"].get("podCIDR", "10.8.0.0/24")
        r.pod_ip = cidr.rsplit(".", 1)[0] + f".{idx}"
        r.set_condition("PodReadyToStartContainers", True)
        self._write(r)

        model = self.c.model_of(pod)
        mt = model_timings(model) if model else None
        app = (meta.get("labels") or {}).get(NAME_LABEL, "")

        for cs, cspec in zip(inits, spec.get("initContainers") or [], strict=False):
            await self._pull(r, pod, cs)
            await self._env(r, pod, cs, cspec)
            self._start_container(r, cs)
            self._write(r)
            if model is not None and mt is not None:
                cached = model.name in self.weights_cached
                await self.c.sleep(self.c.timings.weights_cached_s if cached else mt.weights_s)
                self.weights_cached.add(model.name)
            else:
                await self.c.sleep(1.0)
            cs.state = {
                "terminated": {
                    "exitCode": 0,
                    "reason": "Completed",
                    "startedAt": cs.state["running"]["startedAt"],
                    "finishedAt": now_rfc3339(),
                    "containerID": cs.container_id,
                }
            }
            cs.ready = True
            cs.started = False
            if cs is not inits[-1]:
                self._write(r)  # the last one is reported together with the main container's start

        for cs in mains:
            if inits:
                cs.state = {"waiting": {"reason": "PodInitializing"}}
        for cs in mains:
            await self._pull(r, pod, cs)
        main, mspec = mains[0], spec["containers"][0]
        if self.c.runtime is not None and self.c.runtime.workdir(main.image) is not None:
            await self._run_process(r, pod, main, mspec)
            return
        start_s = mt.server_start_s if mt else self.c.timings.cpu_start_s
        while True:
            env = await self._env(r, pod, main, mspec)
            for cs in mains:
                self._start_container(r, cs)
            r.phase = "Running"
            self._write(r)
            refused = self._claim_gpu_memory(r, pod, main, mspec, env)
            if refused is not None:
                await self.c.sleep(start_s * vllm_standin.MEMORY_CHECK_AT)
                self._write_log(r, main, vllm_standin.startup_failure_log(refused))
                await self._crash_loop(r, main, "Error", 1)
                continue
            crash = self._crash(pod, r.node)
            if crash is not None:
                delay, reason, code = crash
                await self.c.sleep(min(delay, start_s) if reason == "Error" else start_s * 0.6)
                await self._crash_loop(r, main, reason, code)
                continue
            await self.c.sleep(start_s)
            if await self._serve(r, pod, main, mspec, env, app):
                break
        for cs in mains:
            cs.ready = True
        self._write(r)

    async def _run_process(self, r: _PodRun, pod: Obj, cs: _CState, cspec: Obj) -> None:
        """The container of a runnable pod as a local process, restarted as its ``restartPolicy`` says."""
        assert self.c.runtime is not None
        policy = pod["spec"].get("restartPolicy", "Always")
        while True:
            env = await self._env(r, pod, cs, cspec)
            try:
                proc = await PodProcess.start(self.c.runtime, pod, cspec, env)
            except OSError as e:
                # the runtime's StartError: exit code 128, the message in the terminated state
                cs.container_id = "containerd://" + hashlib.sha256(f"{r.uid}/{cs.name}".encode()).hexdigest()
                cs.state = {"running": {"startedAt": now_rfc3339()}}
                code, reason, message = 128, "StartError", f"failed to start container: {e}"
                self._event(r, "Created", f"Created container: {cs.name}", cs=cs)
                self._event(r, "Failed", f"Error: {message}", "Warning", cs)
            else:
                self.processes[r.uid] = proc
                self._logs[(r.namespace, r.name, cs.name)] = proc.log_path
                self._start_container(r, cs)
                cs.ready = True  # no readiness probe: Ready once started
                r.phase = "Running"
                self._write(r)
                code = await proc.wait()
                self.processes.pop(r.uid, None)
                reason, message = ("Completed" if code == 0 else "Error"), ""
            started = cs.state.get("running", {}).get("startedAt", now_rfc3339())
            terminated: Obj = {
                "exitCode": code,
                "reason": reason,
                "startedAt": started,
                "finishedAt": now_rfc3339(),
                "containerID": cs.container_id,
            }
            if message:
                terminated["message"] = message
            cs.ready = False
            cs.started = False
            if policy == "Always" or (policy == "OnFailure" and code != 0):
                await self._crash_loop(r, cs, reason, code)
                continue
            cs.state = {"terminated": terminated}
            r.phase = "Succeeded" if code == 0 else "Failed"
            r.done_reason = "PodCompleted" if code == 0 else "PodFailed"
            self._write(r)
            return

    def _crash(self, pod: Obj, node_name: str) -> tuple[float, str, int] | None:
        crash = injected_crash(self.c.fault_of(pod), self.c.timings)
        if crash is not None:
            return crash
        model = self.c.model_of(pod)
        if model is not None:
            node = self.c.store.find("nodes", None, node_name)
            mem_gb = parse_quantity((node or {}).get("status", {}).get("capacity", {}).get("memory", "0")) / 1024**3
            if model.weights_gb + self.c.spec.host_ram_overhead_gb > mem_gb:
                return (0.0, "OOMKilled", 137)
        return None

    def _claim_gpu_memory(self, r: _PodRun, pod: Obj, cs: _CState, cspec: Obj, env: dict[str, str]) -> str | None:
        """A vLLM server starting on a time-sliced GPU: its share (``--gpu-memory-utilization``) of the node's
        GPU memory is held from now until its container stops, or, when the servers already on that GPU leave
        less free, vLLM's own start-up error (None: the share is held). Exclusive GPUs: nothing to check."""
        share = gpu_share(self.c.spec)
        if not share.time_sliced or cs.image != VLLM_IMAGE or pod_requests(pod["spec"]).get(GPU_RESOURCE, 0) <= 0:
            return None
        self._new_log(r, cs)
        cfg = vllm_standin.parse_args([str(a) for a in cspec.get("args") or []], env)
        total = share.gpu_memory_bytes
        held = sum(b for uid, (node, b) in self.gpu_held.items() if node == r.node and uid != r.uid)
        error = vllm_standin.startup_memory_error(cfg.gpu_memory_utilization, max(total - held, 0), total)
        if error is None:
            self.gpu_held[r.uid] = (r.node, vllm_standin.requested_memory(total, cfg.gpu_memory_utilization))
        return error

    def _new_log(self, r: _PodRun, cs: _CState) -> None:
        """A new instance of a stand-in's container: a new, empty log; the last one is kept as ``previous``."""
        if self._standin_logs is None:
            self._standin_logs = tempfile.mkdtemp(prefix="coder-sim-logs-")
        key = (r.namespace, r.name, cs.name)
        if key in self._logs:
            self._previous_logs[key] = self._logs[key]
        path = Path(self._standin_logs) / f"{r.uid}-{cs.name}-{cs.restart_count}.log"
        path.write_text("", encoding="utf-8")
        self._logs[key] = path

    def _write_log(self, r: _PodRun, cs: _CState, text: str) -> None:
        """Append to the log of a stand-in's container's current instance (what ``pods/log`` serves)."""
        path = self._logs.get((r.namespace, r.name, cs.name))
        if path is not None:
            with path.open("a", encoding="utf-8") as f:
                f.write(text)

    async def _crash_loop(self, r: _PodRun, cs: _CState, reason: str, code: int) -> None:
        self.gpu_held.pop(r.uid, None)  # the container has exited: its GPU memory is free
        started = cs.state.get("running", {}).get("startedAt", now_rfc3339())
        cs.last_state = {
            "terminated": {
                "exitCode": code,
                "reason": reason,
                "startedAt": started,
                "finishedAt": now_rfc3339(),
                "containerID": cs.container_id,
            }
        }
        cs.restart_count += 1
        cs.started = False
        cs.ready = False
        backoff = self._backoff(cs.restart_count)
        cs.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {_fmt_sim(backoff)} restarting failed container={cs.name} "
                f"pod={r.name}_{r.namespace}({r.uid})",
            }
        }
        self._write(r)
        self._event(
            r,
            "BackOff",
            f"Back-off restarting failed container {cs.name} in pod {r.name}_{r.namespace}({r.uid})",
            "Warning",
            cs,
        )
        await self.c.sleep(backoff)
        self._event(r, "Pulled", f'Container image "{cs.image}" already present on machine', cs=cs)

    async def _serve(self, r: _PodRun, pod: Obj, cs: _CState, cspec: Obj, env: dict[str, str], app: str) -> bool:
        """Start the stand-in and register it (before Ready is written). False if it failed to start."""
        ports = cspec.get("ports") or []
        port = int(ports[0]["containerPort"]) if ports else 8000
        run = ContainerRun(
            namespace=r.namespace,
            pod_name=r.name,
            app=app,
            image=cs.image,
            args=[expand(a, env) for a in cspec.get("args") or []],
            env=dict(env),
            files=mounted_files(self.c.store, r.namespace, pod["spec"], cspec),
            container_port=port,
            service_account=pod["spec"].get("serviceAccountName") or "default",
        )
        task = asyncio.ensure_future(self.c.start_standin(run))
        try:
            backend = await asyncio.shield(task)
        except asyncio.CancelledError:

            def _cleanup(t: asyncio.Future[RunningBackend | None]) -> None:
                if not t.cancelled() and t.exception() is None and t.result() is not None:
                    res = t.result()
                    assert res is not None
                    self._cleanups.add(asyncio.ensure_future(res.stop()))

            task.add_done_callback(_cleanup)
            raise
        except Exception:
            log.exception("stand-in of %s/%s failed to start", r.namespace, r.name)
            await self._crash_loop(r, cs, "Error", 1)
            return False
        if backend is not None:
            self.running[r.uid] = backend
            self.c.backends.register(r.namespace, r.name, port, "127.0.0.1", backend.port)
        return True

    def _start_container(self, r: _PodRun, cs: _CState) -> None:
        cs.container_id = "containerd://" + hashlib.sha256(f"{r.uid}/{cs.name}/{cs.restart_count}".encode()).hexdigest()
        self._event(r, "Created", f"Created container: {cs.name}", cs=cs)
        self._event(r, "Started", f"Started container {cs.name}", cs=cs)
        cs.state = {"running": {"startedAt": now_rfc3339()}}
        cs.started = True

    async def _env(self, r: _PodRun, pod: Obj, cs: _CState, cspec: Obj) -> dict[str, str]:
        reported = ""
        while True:
            try:
                return resolve_container_env(self.c.store, r.namespace, cspec, pod)
            except MissingConfigError as e:
                msg = str(e)
            if msg != reported:
                reported = msg
                cs.state = {"waiting": {"reason": "CreateContainerConfigError", "message": msg}}
                self._write(r)
                self._event(r, "Failed", f"Error: {msg}", "Warning", cs)
            await self._wait_config(self.c.scaled(self.c.timings.backoff_max_s))

    def can_run(self, image: str) -> bool:
        """Whether a container of this image gets a behaviour here: a stand-in's image, or a runnable image
        (:mod:`simstack.podruntime`). Any other image cannot be pulled: ErrImagePull, then ImagePullBackOff."""
        runtime = self.c.runtime
        return (runtime is not None and runtime.workdir(image) is not None) or self.c.has_standin(image)

    async def _pull(self, r: _PodRun, pod: Obj, cs: _CState) -> None:
        image = cs.image
        t = self.c.timings
        attempt = 0
        while self.c.fault_of(pod) == "imagepull" or not self.can_run(image):
            attempt += 1
            self._event(r, "Pulling", f'Pulling image "{image}"', cs=cs)
            await self.c.sleep(t.image_pull_fail_s)
            ref = _image_ref(image)
            why = (
                f'rpc error: code = NotFound desc = failed to pull and unpack image "{ref}": '
                f'failed to resolve reference "{ref}": {ref}: not found'
            )
            if not self.can_run(image):
                # the pull error a registry gives for an image it does not have, and how to run it here
                why += " " + unrunnable_hint(image)
            cs.state = {"waiting": {"reason": "ErrImagePull", "message": why}}
            self._write(r)
            self._event(r, "Failed", f'Failed to pull image "{image}": {why}', "Warning", cs)
            self._event(r, "Failed", "Error: ErrImagePull", "Warning", cs)
            backoff = self._backoff(attempt)
            await self.c.sleep(min(1.0, backoff))
            cs.state = {
                "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": f'Back-off pulling image "{image}": ErrImagePull: {why}',
                }
            }
            self._write(r)
            self._event(r, "BackOff", f'Back-off pulling image "{image}"', cs=cs)
            self._event(r, "Failed", "Error: ImagePullBackOff", "Warning", cs)
            await self.c.sleep(backoff)
        lock = self._pull_locks.setdefault((r.node, image), asyncio.Lock())
        async with lock:
            cache = self.c.image_cache.setdefault(r.node, set())
            if image in cache:
                self._event(r, "Pulled", f'Container image "{image}" already present on machine', cs=cs)
            else:
                self._event(r, "Pulling", f'Pulling image "{image}"', cs=cs)
                dur = t.gpu_image_pull_s if image == VLLM_IMAGE else t.cpu_image_pull_s
                await self.c.sleep(dur)
                cache.add(image)
                size = 10_442_000_000 if image == VLLM_IMAGE else 1_200_000_000
                took = _fmt_sim(dur)
                self._event(
                    r,
                    "Pulled",
                    f'Successfully pulled image "{image}" in {took} ({took} including waiting). '
                    f"Image size: {size} bytes.",
                    cs=cs,
                )
        cs.image_id = _image_id(image)

    async def _terminate(self, pod: Obj) -> None:
        meta = pod["metadata"]
        uid, ns, name = meta["uid"], meta["namespace"], meta["name"]
        worker = self.workers.pop(uid, None)
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
        try:
            self.c.backends.unregister(ns, name)
            for c in pod["spec"]["containers"]:
                st = next(
                    (s for s in (pod.get("status") or {}).get("containerStatuses") or [] if s["name"] == c["name"]),
                    None,
                )
                if st and "running" in (st.get("state") or {}):
                    self.c.events.emit(
                        pod,
                        "Killing",
                        f"Stopping container {c['name']}",
                        component="kubelet",
                        host=pod["spec"].get("nodeName"),
                        field_path=f"spec.containers{{{c['name']}}}",
                    )
            await self._stop_backend(uid)
            grace = float(meta.get("deletionGracePeriodSeconds", 30))
            proc = self.processes.pop(uid, None)
            if proc is not None:
                # a real process gets the real grace period: SIGTERM, SIGKILL when it is over
                await self._stopped_process(pod, await proc.stop(grace))
            else:
                await self.c.sleep(min(grace, self.c.timings.termination_s))
            self.gpu_held.pop(uid, None)  # the container has stopped: its GPU memory is free
            cur = self.c.store.find("pods", ns, name)
            if cur is not None and cur["metadata"]["uid"] == uid:
                status = cur.get("status") or {}
                for cs in status.get("containerStatuses") or []:
                    started = (cs.get("state") or {}).get("running", {}).get("startedAt")
                    if started:
                        cs["state"] = {
                            "terminated": {
                                "exitCode": 0,
                                "reason": "Completed",
                                "startedAt": started,
                                "finishedAt": now_rfc3339(),
                                "containerID": cs.get("containerID"),
                            }
                        }
                    cs["ready"] = False
                    cs["started"] = False
                for c in status.get("conditions") or []:
                    if c["type"] in ("Ready", "ContainersReady") and c["status"] == "True":
                        c.update(status="False", reason="PodCompleted", lastTransitionTime=now_rfc3339())
                cur["status"] = status
                self.c.store.update("pods", cur, status_only=True)
                self.c.store.delete("pods", ns, name)
        except NotFoundError:
            pass
        finally:
            self.gpu_held.pop(uid, None)
            self.terminating.pop(uid, None)
            self._pods.pop(uid, None)
            for key in [k for k in self._logs if k[:2] == (ns, name)]:
                del self._logs[key]
            for key in [k for k in self._previous_logs if k[:2] == (ns, name)]:
                del self._previous_logs[key]

    async def _stopped_process(self, pod: Obj, code: int) -> None:
        """The terminated state of a runnable pod's container its deletion stopped."""
        meta = pod["metadata"]
        cur = self.c.store.find("pods", meta["namespace"], meta["name"])
        if cur is None or cur["metadata"]["uid"] != meta["uid"]:
            return
        status = cur.get("status") or {}
        for st in status.get("containerStatuses") or []:
            started = (st.get("state") or {}).get("running", {}).get("startedAt")
            if started:
                st["state"] = {
                    "terminated": {
                        "exitCode": code,
                        "reason": "Completed" if code == 0 else "Error",
                        "startedAt": started,
                        "finishedAt": now_rfc3339(),
                        "containerID": st.get("containerID"),
                    }
                }
                st["ready"] = False
                st["started"] = False
        if cur["spec"].get("restartPolicy") != "Always" and status.get("phase") == "Running":
            status["phase"] = "Succeeded" if code == 0 else "Failed"
        cur["status"] = status
        self.c.store.update("pods", cur, status_only=True)


def _fmt_sim(sim_seconds: float) -> str:
    """Go's time.Duration formatting of a simulated duration (what the real message would say)."""
    s = float(sim_seconds)
    if s < 1:
        return f"{s * 1000:g}ms"
    m, sec = divmod(s, 60)
    h, m = divmod(int(m), 60)
    secs = f"{sec:.3f}".rstrip("0").rstrip(".")
    if h:
        return f"{h}h{m}m{secs}s"
    if m:
        return f"{m}m{secs}s"
    return f"{secs}s"
