"""`kubectl exec deploy/x -- command`: run a command in a Ready pod over the exec WebSocket; the exit
code comes from the Status on channel 3.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.stream import WsApiClient
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import ClusterRequestError, ClusterUnavailable, SpecError, WaitTimeout
from coder_stack.kubernetes.client import ws_errors
from coder_stack.kubernetes.pods import main_container, ready_pod


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExecResult(_Report):
    pod: str = Field(description="The pod the command ran in.")
    exit_code: int = Field(description="The command's exit code.")
    stdout: str = Field(description="What it wrote to stdout.")
    stderr: str = Field(description="What it wrote to stderr.")


def _exit_code(status: dict[str, Any]) -> int | None:
    if status.get("status") == "Success":
        return 0
    for cause in (status.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            try:
                return int(cause.get("message"))
            except (TypeError, ValueError):
                return None
    return None


async def exec_in_deployment(
    api: ApiClient,
    namespace: str,
    deployment_selector: str,
    command: list[str],
    timeout_s: float,
    *,
    container: str | None = None,
) -> ExecResult:
    """`kubectl exec deploy/x -- command`: run a command in a Ready pod of the deployment.

    The exit code comes from the Status on channel 3. stdout/stderr are returned as written: callers
    must not log them if the command can print a secret.
    """
    if not command:
        raise SpecError("exec needs a command")
    pod = await ready_pod(api, namespace, deployment_selector)
    pod_name = pod.metadata.name
    container = container or main_container(pod, init=False)
    out, err = bytearray(), bytearray()
    status: dict[str, Any] | None = None
    async with WsApiClient(configuration=api.configuration) as ws_api:
        core = client.CoreV1Api(ws_api)
        try:
            async with asyncio.timeout(timeout_s):
                with ws_errors("create", "pods/exec", namespace, pod_name):
                    ctx: Any = await core.connect_get_namespaced_pod_exec(
                        pod_name,
                        namespace,
                        command=command,  # type: ignore[arg-type]  # WsApiClient expands a list
                        container=container,
                        stderr=True,
                        stdin=False,
                        stdout=True,
                        tty=False,
                        _preload_content=False,
                    )
                    async with ctx as ws:
                        async for msg in ws:
                            if msg.type == aiohttp.WSMsgType.BINARY:
                                data = bytes(msg.data)
                            elif msg.type == aiohttp.WSMsgType.TEXT:
                                data = str(msg.data).encode()
                            else:
                                break
                            if not data:
                                continue
                            channel, payload = data[0], data[1:]
                            if channel == 1:
                                out += payload
                            elif channel == 2:
                                err += payload
                            elif channel == 3 and payload:
                                try:
                                    status = json.loads(payload)
                                except ValueError:
                                    status = {"status": "Failure", "message": payload.decode(errors="replace")}
        except TimeoutError:
            raise WaitTimeout(
                f"command in pod {namespace}/{pod_name} did not finish within {timeout_s:.0f}s",
                phase="exec",
                elapsed_s=timeout_s,
            ) from None
    if status is None:
        raise ClusterUnavailable(
            f"exec in pod {namespace}/{pod_name}: the stream ended without an exit status; retry the command"
        )
    code = _exit_code(status)
    if code is None:
        raise ClusterRequestError(
            f"exec in pod {namespace}/{pod_name} (container {container}) could not run the command: "
            f"{status.get('message') or status.get('reason') or 'unknown error'}"
        )
    return ExecResult(
        pod=pod_name,
        exit_code=code,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
    )


__all__ = [
    "ExecResult",
    "exec_in_deployment",
]
