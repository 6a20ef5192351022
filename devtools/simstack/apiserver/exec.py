"""``pods/exec`` over WebSocket (channel protocols v4/v5, as kubectl and kubernetes-asyncio speak
them): the command runs as a local process in the container's environment, stdin/stdout/stderr on
channels 0-2, the exit status on channel 3; refused like the real server for pods that do not run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

from aiohttp import WSMsgType, web

from simstack.apiserver.crud import Resources
from simstack.apiserver.errors import ApiError, bad_request, parse_bool
from simstack.apiserver.target import Target
from simstack.pods import MissingConfigError, resolve_container_env
from simstack.store import Obj


class Exec:
    """The exec handler; its WebSockets go into ``sockets`` (closed at shutdown)."""

    def __init__(self, resources: Resources, sockets: set[web.WebSocketResponse]) -> None:
        self.resources = resources
        self._sockets = sockets

    def _exec_target(self, t: Target, container: str | None) -> tuple[Obj, Obj]:
        pod = self.resources.read(t)
        spec = pod.get("spec") or {}
        containers = spec.get("containers") or []
        if not spec.get("nodeName"):
            raise bad_request(f"pod {t.name} does not have a host assigned")
        name = container or (containers[0]["name"] if containers else "")
        c = next((c for c in containers if c.get("name") == name), None)
        if c is None:
            names = " ".join(x.get("name", "") for x in containers)
            raise bad_request(
                f"container {name} is not valid for pod {t.name}"
                if container
                else f"a container name must be specified for pod {t.name}, choose one of: [{names}]"
            )
        st = pod.get("status") or {}
        if st.get("phase") in ("Succeeded", "Failed"):
            raise bad_request(f"cannot exec into a container in a completed pod; current phase is {st.get('phase')}")
        cs = next((x for x in st.get("containerStatuses") or [] if x.get("name") == name), None)
        if st.get("phase") != "Running" or cs is None or not (cs.get("state") or {}).get("running"):
            raise bad_request(f'unable to upgrade connection: container not found ("{name}")')
        return pod, c

    def _env(self, pod: Obj, container: Obj) -> dict[str, str]:
        """The command's environment: the container's, resolved as the kubelet resolves it for the container's
        process (:func:`simstack.pods.resolve_container_env`), over the host's PATH and the pod's HOSTNAME."""
        try:
            env = resolve_container_env(self.resources.store, pod["metadata"].get("namespace", ""), container, pod)
        except MissingConfigError as e:
            raise ApiError(500, "InternalError", f"cannot resolve the container's environment: {e}") from None
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": pod["metadata"]["name"], **env}

    async def exec(self, request: web.Request, t: Target) -> web.StreamResponse:
        q = request.query
        command = q.getall("command", [])
        if not command:
            raise bad_request("you must specify at least 1 command")
        want_stdin = parse_bool(q.get("stdin"), "stdin")
        want_stdout = parse_bool(q.get("stdout"), "stdout")
        want_stderr = parse_bool(q.get("stderr"), "stderr")
        tty = parse_bool(q.get("tty"), "tty")
        pod, container = self._exec_target(t, q.get("container"))
        if request.headers.get("Upgrade", "").lower() != "websocket":
            raise bad_request("Upgrade request required")
        env = self._env(pod, container)

        ws = web.WebSocketResponse(protocols=("v5.channel.k8s.io", "v4.channel.k8s.io"), autoping=True)
        await ws.prepare(request)
        self._sockets.add(ws)
        v5 = ws.ws_protocol == "v5.channel.k8s.io"
        proc: asyncio.subprocess.Process | None = None
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *command,
                    env=env,
                    cwd=os.environ.get("HOME", "/"),
                    stdin=asyncio.subprocess.PIPE if want_stdin else asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT if tty else asyncio.subprocess.PIPE,
                )
            except OSError as e:
                msg = (
                    f'OCI runtime exec failed: exec failed: unable to start container process: exec: "{command[0]}": '
                    f"{'executable file not found in $PATH' if isinstance(e, FileNotFoundError) else e}: unknown\r\n"
                )
                if want_stderr or want_stdout:
                    await ws.send_bytes(bytes([2 if want_stderr else 1]) + msg.encode())
                await ws.send_bytes(b"\x03" + json.dumps(self._exit_status(command, 127)).encode())
                return ws

            async def pump(stream: asyncio.StreamReader | None, channel: int, forward: bool) -> None:
                if stream is None:
                    return
                while True:
                    chunk = await stream.read(32768)
                    if not chunk:
                        return
                    if forward and not ws.closed:
                        await ws.send_bytes(bytes([channel]) + chunk)

            async def read_client() -> None:
                async for msg in ws:
                    if msg.type != WSMsgType.BINARY or not msg.data:
                        continue
                    ch, data = msg.data[0], msg.data[1:]
                    if ch == 0 and proc is not None and proc.stdin is not None and data:
                        proc.stdin.write(data)
                        with contextlib.suppress(ConnectionError):
                            await proc.stdin.drain()
                    elif ch == 255 and v5 and data[:1] == b"\x00" and proc is not None and proc.stdin is not None:
                        proc.stdin.close()
                # the client went away: stop the process, as the kubelet would
                if proc is not None and proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()

            reader = asyncio.create_task(read_client())
            await asyncio.gather(pump(proc.stdout, 1, want_stdout or tty), pump(proc.stderr, 2, want_stderr))
            code = await proc.wait()
            if not ws.closed:
                await ws.send_bytes(b"\x03" + json.dumps(self._exit_status(command, code)).encode())
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        finally:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            with contextlib.suppress(Exception):
                await ws.close()
            self._sockets.discard(ws)
        return ws

    @staticmethod
    def _exit_status(command: list[str], code: int) -> Obj:
        if code == 0:
            return {"metadata": {}, "status": "Success"}
        if code < 0:  # killed by a signal
            code = 128 - code
        return {
            "metadata": {},
            "status": "Failure",
            "message": "command terminated with non-zero exit code: error executing command "
            f"{json.dumps(command)}, exit code {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
        }
