"""Runnable images: a pod whose image the simulated cluster is told to *run* becomes a local process.

:class:`PodRuntime` is the image-to-directory mapping and what a real pod gets from its node, prepared per
pod in a temporary sandbox: the ServiceAccount token (bound to the pod's ``serviceAccountName`` in the API
server's authorizer) and the cluster CA, ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT`` for the API
server's TLS listener, and the cluster DNS names of the Services (resolved by the ``sitecustomize`` in
``devtools/simstack/podshim`` for this process only). :class:`PodProcess` is one container's process: its command and
args from the container spec, its environment, stdout and stderr into the container's log file, SIGTERM then
SIGKILL after the grace period, and death with the simulated cluster.

The image contract: the image's WORKDIR (``/opt/coder-stack``) is the mapped directory, and the programs on
its PATH (``prefect``, ``python``) are those of this interpreter's environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from simstack.store import Obj

SHIM_DIR = Path(__file__).resolve().parent / "podshim"
# GUESS: what a Python image's ENV sets (the project's Dockerfile is expected to set the same).
IMAGE_ENV = {"PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"}
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand_args(args: list[str], env: dict[str, str]) -> list[str]:
    """``$(VAR)`` in command/args from the container's environment (``$$`` escapes), as the kubelet does."""

    def one(a: str) -> str:
        return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), a.replace("$$(", "\0(")).replace("\0(", "$(")

    return [one(str(a)) for a in args]


def unrunnable_hint(image: str) -> str:
    """What the simulated cluster adds to the image pull error of an image it cannot run (neither a stand-in's
    nor a runnable one). GUESS: no kubelet says this; it is the simulator telling the user how to run the image."""
    return (
        f"(simulated cluster: it runs only its stand-ins' images and the images it is told to run; to run this "
        f'checkout as "{image}", restart the sim with `coder-stack sim --project-image {image}`)'
    )


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it if the thread that started it (the sim's loop) dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class PodRuntime:
    """How the simulated cluster runs the pods of runnable images (set on the cluster by ``SimStack``)."""

    images: dict[str, Path]
    root: Path
    api_host: str
    api_port: int
    ca_file: Path
    issue_token: Callable[[str, str], str]
    service_dns: Callable[[str], Awaitable[dict[str, dict[str, int]]]]
    bin_dir: Path = field(default_factory=lambda: Path(sys.executable).parent)

    def workdir(self, image: str) -> Path | None:
        return self.images.get(image)

    async def sandbox(self, pod: Obj) -> tuple[dict[str, str], dict[str, str]]:
        """Prepare the pod's sandbox; the environment its containers get from the image and the node, and the
        variables of the emulation (read by ``devtools/simstack/podshim/sitecustomize.py`` only)."""
        meta = pod["metadata"]
        ns, name = meta["namespace"], meta["name"]
        box = self.root / "pods" / f"{ns}_{name}_{meta['uid']}"
        sa_dir = box / "serviceaccount"
        sa_dir.mkdir(parents=True, exist_ok=True)
        (box / "home").mkdir(exist_ok=True)
        (box / "tmp").mkdir(exist_ok=True)
        sa = pod["spec"].get("serviceAccountName") or "default"
        token_file = sa_dir / "token"
        token_file.touch(mode=0o600)
        token_file.write_text(self.issue_token(ns, sa))
        shutil.copyfile(self.ca_file, sa_dir / "ca.crt")
        (sa_dir / "namespace").write_text(ns)
        dns_file = box / "dns.json"
        dns_file.write_text(json.dumps(await self.service_dns(ns)))
        env = {
            "PATH": f"{self.bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(box / "home"),
            "TMPDIR": str(box / "tmp"),
            "HOSTNAME": name,
            **IMAGE_ENV,
            # the "kubernetes" Service's environment variables, pointed at the API server's TLS listener
            "KUBERNETES_SERVICE_HOST": self.api_host,
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.api_port),
            "KUBERNETES_PORT": f"tcp://{self.api_host}:{self.api_port}",
            f"KUBERNETES_PORT_{self.api_port}_TCP": f"tcp://{self.api_host}:{self.api_port}",
            f"KUBERNETES_PORT_{self.api_port}_TCP_PROTO": "tcp",
            f"KUBERNETES_PORT_{self.api_port}_TCP_PORT": str(self.api_port),
            f"KUBERNETES_PORT_{self.api_port}_TCP_ADDR": self.api_host,
        }
        emulation = {
            "SIMSTACK_POD_SERVICEACCOUNT": str(sa_dir),
            "SIMSTACK_POD_DNS": str(dns_file),
            # a container writes into its own filesystem; here bytecode caches go to the sandbox, not the directory
            "PYTHONPYCACHEPREFIX": str(box / "pycache"),
        }
        return env, emulation

    def log_file(self, pod: Obj, container: str) -> Path:
        meta = pod["metadata"]
        d = self.root / "logs" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{container}.log"


class PodProcess:
    """One container of a runnable pod, as a local process group."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @classmethod
    async def start(cls, runtime: PodRuntime, pod: Obj, container: Obj, env: dict[str, str]) -> PodProcess:
        """Start the container's command. Raises FileNotFoundError (with the kubelet's message) when there is
        no command or it is not on the image's PATH."""
        workdir = runtime.workdir(str(container.get("image", "")))
        if workdir is None:
            raise FileNotFoundError(f"image {container.get('image')!r} is not runnable")
        node_env, emulation = await runtime.sandbox(pod)
        full = node_env | env  # the container's env wins over the image's and the Service variables
        full |= emulation
        full["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIM_DIR), env.get("PYTHONPATH", "")) if p)
        argv = expand_args(list(container.get("command") or []) + list(container.get("args") or []), full)
        if not argv:
            # GUESS: the image's ENTRYPOINT/CMD are not known to the simulated cluster
            raise FileNotFoundError("no command: the simulated cluster does not know the image's ENTRYPOINT/CMD")
        exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=full["PATH"])
        if exe is None or not os.access(exe, os.X_OK):
            raise FileNotFoundError(f'exec: "{argv[0]}": executable file not found in $PATH')
        log_path = runtime.log_file(pod, str(container["name"]))
        with log_path.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                exe,
                *argv[1:],
                cwd=str(workdir),
                env=full,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        return cls(proc, log_path)

    @staticmethod
    def exit_code(returncode: int) -> int:
        """The container's exit code: a signal N is 128+N, as the runtime reports it."""
        return 128 - returncode if returncode < 0 else returncode

    async def wait(self) -> int:
        return self.exit_code(await self.proc.wait())

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def stop(self, grace_s: float) -> int:
        """SIGTERM to the process group, SIGKILL after ``grace_s`` (real seconds); the exit code. Then SIGKILL to
        every process the container started, also those in process groups of their own (Prefect's engine runs
        in one): a container's processes all end with it."""
        family = _descendants(self.proc.pid)
        if self.proc.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), max(grace_s, 0.0))
            except TimeoutError:
                family |= _descendants(self.proc.pid)
                self._signal(signal.SIGKILL)
        rc = await self.proc.wait()
        self._signal(signal.SIGKILL)  # anything the container left behind in its group
        for pid in family:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return self.exit_code(rc)


def _descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # after "(comm)": state, ppid, ...
        if len(fields) > 1 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out
