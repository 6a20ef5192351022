"""``SimStack``: the whole simulated cluster (API server, controllers, stand-ins) on its own thread.

See docs/DESIGN.md "The simulated stack's Python API". Everything inside runs on one event loop in a
daemon thread; callers in other threads talk to it through the API server (a kubeconfig), through
``run(coro)``, or through the thread-safe helpers below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

from coder_stack.spec import StackSpec
from simstack.backends import Backends
from simstack.certs import ClusterCA, make_cluster_ca
from simstack.cluster_objects import generate_secrets, reference_objects
from simstack.controllers.cluster import Cluster
from simstack.controllers.context import StandinStarter
from simstack.controllers.faults import check_fault
from simstack.kubeproxy import ServiceForwarder, ServiceProxies
from simstack.layout import gateway_workloads
from simstack.podruntime import PodRuntime
from simstack.standins import PodAccess, SimServices, has_standin
from simstack.store import Store, WatchEvent
from simstack.timings import Timings

log = logging.getLogger("simstack.stack")
T = TypeVar("T")


class SimStack:
    """The simulated cluster of the runbook's reference deployment. Use as a context manager."""

    def __init__(
        self,
        spec: StackSpec | None = None,
        time_scale: float = 0.01,
        faults: dict[str, str] | None = None,
        gpu_pool: str = "autoscaled",
        *,
        kubeconfig_path: str | Path | None = None,
        timings: Timings | None = None,
        start_standin: StandinStarter | None = None,
        api_token: str | None = None,
        authorizer: Callable[[Store], Any] | None = None,
        ready_timeout: float | None = None,
        runnable_images: dict[str, str | Path] | None = None,
        pod_api: bool = False,
    ) -> None:
        if gpu_pool not in ("autoscaled", "static"):
            raise ValueError(f"gpu_pool must be 'autoscaled' or 'static', got {gpu_pool!r}")
        for name, fault in (faults or {}).items():
            check_fault(name, fault)
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.spec = spec or StackSpec()
        self.time_scale = time_scale
        self.gpu_pool = gpu_pool
        self._faults = dict(faults or {})
        self._timings = timings
        self._start_standin = start_standin
        self._api_token = api_token
        self._authorizer_factory = authorizer
        self.authorizer: Any = None
        self._ready_timeout = ready_timeout if ready_timeout is not None else 30.0 + 60.0 * time_scale
        self._secrets = generate_secrets()
        self._timeline: list[tuple[float, str, str, int]] = []
        self._tmpdir: str | None = None
        self._user_kubeconfig = Path(kubeconfig_path) if kubeconfig_path else None
        self._kubeconfig_path: Path | None = None
        self._kubeconfig_text: str | None = None
        self.api_url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None
        self._forwarder: ServiceForwarder | None = None
        self._store: Store | None = None
        self._backends: Backends | None = None
        self._services: SimServices | None = None
        self.cluster: Cluster | None = None
        self._started = False
        # image -> working directory: pods of these images run as local processes (devtools/simstack/podruntime.py)
        self._runnable = {image: Path(d).resolve() for image, d in (runnable_images or {}).items()}
        for image, d in self._runnable.items():
            if not d.is_dir():
                raise ValueError(f"runnable image {image!r}: {d} is not a directory")
            if has_standin(image):
                raise ValueError(f"runnable image {image!r} is a stand-in's image; name the image another way")
        self._runtime_dir: str | None = None
        # pods reach the API server (TLS listener, ServiceAccount tokens, the cluster CA) also without runnable
        # images: the LiteLLM stand-in's callbacks (devtools/simstack/standins/litellm/callbacks.py) use it
        self._pod_api = pod_api or bool(self._runnable)
        self._proxies: ServiceProxies | None = None
        self._sa_tokens: dict[str, tuple[str, str]] = {}

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> SimStack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> SimStack:
        if self._started:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._thread_main, name="simstack", daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._astart(), loop)
        try:
            fut.result(timeout=self._ready_timeout + 10)
        except BaseException:
            self._started = True
            self.stop()
            raise
        self._started = True
        return self

    def _thread_main(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _astart(self) -> None:
        spec = self.spec
        self._store = store = Store()
        self._backends = backends = Backends(store, spec.access.cluster_domain)
        self._services = SimServices(resolve_url=backends.resolve_url, time_scale=self.time_scale)
        store.listeners.append(self._record_timeline)
        self._forwarder = ServiceForwarder(backends, spec.gateway_namespace, spec.gateway_service, spec.gateway_port)
        await self._forwarder.start()
        self.cluster = Cluster(
            store,
            backends,
            self._services,
            spec,
            time_scale=self.time_scale,
            gpu_pool=self.gpu_pool,
            faults=self._faults,
            timings=self._timings,
            start_standin=self._start_standin,
        )
        self.cluster.start()
        for plural, obj in reference_objects(spec, self._secrets, self.gateway_url):
            store.create(plural, obj)
        try:
            from simstack.apiserver import kubeconfig_yaml, start_apiserver
        except ImportError as e:  # the API server is not there: controllers only
            log.warning("no API server: %s", e)
        else:
            if self._authorizer_factory is not None:
                self.authorizer = self._authorizer_factory(store)
            ca = None
            if self._pod_api:
                self._runtime_dir = tempfile.mkdtemp(prefix="coder-sim-pods-")
                ca = make_cluster_ca(Path(self._runtime_dir) / "pki", spec.access.cluster_domain)
            self._runner, self.api_url = await start_apiserver(
                store,
                backends,
                authorizer=self.authorizer,
                log_file=self.cluster.kubelet.log_file,
                tls=ca.server_context() if ca is not None else None,
            )
            self._kubeconfig_text = kubeconfig_yaml(self.api_url, token=self._api_token)
            if ca is not None and self._runtime_dir is not None:
                self._start_runtime(ca, Path(self._runtime_dir))
        await self._wait_gateway_ready(self._ready_timeout)
        if self._kubeconfig_text is not None:
            if self._user_kubeconfig is not None:
                self._kubeconfig_path = self.write_kubeconfig(self._user_kubeconfig)
            else:
                self._tmpdir = tempfile.mkdtemp(prefix="coder-sim-")
                self._kubeconfig_path = self.write_kubeconfig(Path(self._tmpdir) / "kubeconfig")

    def _start_runtime(self, ca: ClusterCA, root: Path) -> None:
        """Pods of runnable images: their API access (the TLS listener, ServiceAccount tokens), their DNS."""
        assert self.cluster is not None
        tls_url = self.api_server.tls_url
        assert tls_url is not None
        host, _, port = tls_url.removeprefix("https://").rpartition(":")
        self._proxies = ServiceProxies(self.store, self.backends, self.spec.access.cluster_domain)
        self.cluster.runtime = PodRuntime(
            images=dict(self._runnable),
            root=root,
            api_host=host,
            api_port=int(port),
            ca_file=ca.ca_file,
            issue_token=self._issue_token,
            service_dns=self._proxies.dns,
        )
        assert self._services is not None
        self._services.pod_access = PodAccess(host, int(port), ca.ca_file, self._issue_token)

    def _issue_token(self, namespace: str, service_account: str) -> str:
        """A token for a pod's ServiceAccount, known to the authorizer as that ServiceAccount (the real
        cluster's projected, signed token; here an opaque random one the RBAC authorizer maps)."""
        token = secrets.token_urlsafe(32)
        self._sa_tokens[token] = (namespace, service_account)
        tokens = getattr(self.authorizer, "tokens", None)
        if isinstance(tokens, dict):
            tokens[token] = (namespace, service_account)
        return token

    def service_account_tokens(self, namespace: str, service_account: str) -> list[str]:
        """The tokens issued to pods of a ServiceAccount (for tests that call the API as that pod)."""
        return [t for t, who in self._sa_tokens.items() if who == (namespace, service_account)]

    async def _wait_gateway_ready(self, timeout: float) -> None:
        store = self.store
        spec = self.spec
        deadline = time.monotonic() + timeout
        wanted = [(w.namespace, w.name) for w in gateway_workloads(spec)]
        while True:
            ok = True
            for ns, name in wanted:
                d = store.find("deployments", ns, name)
                st = (d or {}).get("status") or {}
                if st.get("readyReplicas", 0) < (d or {}).get("spec", {}).get("replicas", 1):
                    ok = False
            if ok:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"simulated gateway not Ready within {timeout:.0f}s")
            await store.wait_change(timeout=left)

    def stop(self) -> None:
        if not self._started or self._loop is None:
            return
        self._started = False
        loop = self._loop
        if loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._astop(), loop)
            try:
                fut.result(timeout=15)
            except Exception:
                log.exception("simstack teardown failed")
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if not loop.is_running():
            loop.close()
        for d in (self._tmpdir, self._runtime_dir):
            if d:
                shutil.rmtree(d, ignore_errors=True)
        self._tmpdir = self._runtime_dir = None

    async def _astop(self) -> None:
        if self.cluster is not None:
            await self.cluster.stop()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
        if self._forwarder is not None:
            await self._forwarder.stop()
        if self._proxies is not None:
            await self._proxies.stop()
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for t in rest:
            t.cancel()
        for t in rest:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # ------------------------------------------------------------------ API
    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the sim's loop from another thread and return its result."""
        if self._loop is None or not self._started:
            coro.close()
            raise RuntimeError("SimStack is not running")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("SimStack.run() called from the sim's own loop: await the coroutine instead")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Any, *args: Any) -> Any:
        """Call a plain function on the sim's loop (e.g. to read the store) and return its result."""

        async def _call() -> Any:
            return fn(*args)

        if threading.current_thread() is self._thread:
            return fn(*args)
        return self.run(_call())

    def set_fault(self, deployment: str, fault: str | None) -> None:
        """Inject (or clear with None) a fault for a deployment: crashloop, imagepull, oom, unschedulable, slow-node."""
        check_fault(deployment, fault)
        self._faults[deployment] = fault or ""
        if self.cluster is None:
            return
        self.call(self.cluster.set_fault, deployment, fault)

    @property
    def faults(self) -> dict[str, str]:
        return {k: v for k, v in self._faults.items() if v}

    @property
    def secrets(self) -> dict[str, str]:
        return dict(self._secrets)

    @property
    def timeline(self) -> list[tuple[float, str, str, int]]:
        return list(self._timeline)

    def _record_timeline(self, ev: WatchEvent) -> None:
        if ev.plural != "deployments" or ev.type == "DELETED":
            return
        reps = int((ev.obj.get("spec") or {}).get("replicas", 1))
        if ev.old is not None and int((ev.old.get("spec") or {}).get("replicas", 1)) == reps:
            return
        meta = ev.obj["metadata"]
        self._timeline.append((time.monotonic(), meta.get("namespace", ""), meta["name"], reps))

    @property
    def gateway_url(self) -> str:
        if self._forwarder is None:
            raise RuntimeError("SimStack is not started")
        return f"http://127.0.0.1:{self._forwarder.port}"

    @property
    def kubeconfig_path(self) -> Path:
        if self._kubeconfig_path is None:
            raise RuntimeError("no kubeconfig: the sim is not started or simstack.apiserver is missing")
        return self._kubeconfig_path

    @property
    def kubeconfig(self) -> str:
        if self._kubeconfig_text is None:
            raise RuntimeError("no kubeconfig: the sim is not started or simstack.apiserver is missing")
        return self._kubeconfig_text

    def write_kubeconfig(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch(mode=0o600, exist_ok=True)
        p.write_text(self.kubeconfig)
        return p

    @property
    def store(self) -> Store:
        """The object store. Not thread-safe: touch it only on the sim's loop (``run``/``call``)."""
        if self._store is None:
            raise RuntimeError("SimStack is not started")
        return self._store

    @property
    def api_server(self) -> Any:
        """The API server (``simstack.apiserver.ApiServer``): ``.faults`` (ApiFaults), ``.requests``,
        ``.authorizer``. Its hooks are plain lists: safe to queue faults from a test thread."""
        if self._runner is None:
            raise RuntimeError("SimStack is not started or simstack.apiserver is missing")
        return self._runner.app["apiserver"]

    @property
    def backends(self) -> Backends:
        if self._backends is None:
            raise RuntimeError("SimStack is not started")
        return self._backends

    @property
    def services(self) -> SimServices:
        if self._services is None:
            raise RuntimeError("SimStack is not started")
        return self._services

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("SimStack is not started")
        return self._loop


def run_sim(
    kubeconfig: Path,
    time_scale: float,
    faults: dict[str, str],
    gpu_pool: str,
    exit_after: float | None,
    *,
    spec: StackSpec | None = None,
    runnable_images: dict[str, str | Path] | None = None,
) -> None:
    """``coder-stack sim``: run the simulated cluster until SIGINT/SIGTERM or ``exit_after`` seconds. Pods of
    ``runnable_images`` (image -> working directory) run as local processes; other images without a stand-in
    end in ImagePullBackOff."""
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    try:
        with SimStack(
            spec=spec,
            time_scale=time_scale,
            faults=faults,
            gpu_pool=gpu_pool,
            kubeconfig_path=kubeconfig,
            runnable_images=runnable_images,
            pod_api=True,  # the gateway pod reaches the API server: `coder-stack wake-setup --apply` works here
        ) as sim:
            path = sim.kubeconfig_path
            for image, workdir in (runnable_images or {}).items():
                print(f"pods of image {image} run {Path(workdir).resolve()} as local processes", flush=True)
            print(
                f"ready: kubeconfig at {path}, gateway at {sim.gateway_url} (time scale {time_scale:g}, "
                f"GPU pool {gpu_pool}), try: kubectl --kubeconfig {path} get deploy -n {sim.spec.serving_namespace}",
                flush=True,
            )
            stop.wait(exit_after)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
