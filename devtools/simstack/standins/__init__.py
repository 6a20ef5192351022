"""Stand-ins for the processes inside the simulated pods, chosen by container image.

The kubelet starts one when a container starts (``start_standin``) and stops it when the pod stops.
Each stand-in reads its configuration the way the real program does: command-line args, environment
(already resolved from ``env``/``secretKeyRef``/``envFrom``) and mounted files.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class ContainerRun:
    """What the kubelet hands a stand-in when the container starts."""

    namespace: str
    pod_name: str
    app: str  # the pod's app.kubernetes.io/name label
    image: str
    args: list[str]
    env: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)  # mounted path -> content (Secrets, ConfigMaps)
    container_port: int = 8000
    service_account: str = "default"  # the pod's spec.serviceAccountName


@dataclass
class PodAccess:
    """What a pod gets from its node to reach the API server: the ``kubernetes`` Service's host and port (the
    simulated API server's TLS listener), a token for its ServiceAccount and the cluster CA. Set by ``SimStack``
    when pods get API access (runnable images, or ``pod_api=True``)."""

    api_host: str
    api_port: int
    ca_file: Path
    issue_token: Callable[[str, str], str]  # (namespace, service account) -> token


@dataclass
class SimServices:
    """State shared by all stand-ins of one simulated stack; lives as long as the stack."""

    resolve_url: Callable[[str], str | None]  # in-cluster URL -> local URL of a Ready backend, or None
    time_scale: float = 1.0
    spend_write_delay_s: float = 10.0  # LiteLLM PROXY_BATCH_WRITE_AT, simulated seconds (scaled)
    litellm_db: dict[str, Any] = field(default_factory=dict)  # LiteLLM's Postgres: survives pod restarts
    # vLLM's decode time per streamed token, simulated seconds (scaled); 0: as fast as the loop. A slow stream
    # keeps vllm:num_requests_running at 1 while it runs, as a long generation does on the real server.
    vllm_decode_s: float = 0.0
    vllm_auto_tool_habit: bool = True  # Qwen2.5-Coder with tool_choice=auto answers with a plain JSON block
    counters: dict[str, int] = field(default_factory=dict)  # request counts per stand-in, for tests
    # Other apps' persistent state (e.g. Tabby's registration token), keyed "<app>:<namespace>".
    app_data: dict[str, Any] = field(default_factory=dict)
    pod_access: PodAccess | None = None  # API access for stand-ins that run code of the pod's (LiteLLM callbacks)


class RunningBackend(Protocol):
    port: int

    async def stop(self) -> None: ...


StandinFactory = Callable[[ContainerRun, SimServices], Awaitable[RunningBackend]]

# Filled by the stand-in modules: image repository (without tag) -> factory.
FACTORIES: dict[str, StandinFactory] = {}


def image_repository(image: str) -> str:
    name = image.rsplit("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return name


async def start_standin(run: ContainerRun, services: SimServices) -> RunningBackend | None:
    """Start the stand-in for this container's image; None if the image has no stand-in."""
    _load_factories()
    factory = FACTORIES.get(image_repository(run.image))
    if factory is None:
        return None
    return await factory(run, services)


def has_standin(image: str) -> bool:
    """Whether containers of this image (its repository, any tag) have a stand-in."""
    _load_factories()
    return image_repository(image) in FACTORIES


def _load_factories() -> None:
    # Each module registers itself in FACTORIES on import (imports are idempotent).
    from simstack.standins import litellm, openwebui, tabby, vllm  # noqa: F401
