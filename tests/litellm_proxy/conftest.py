"""The real-LiteLLM tier: one real ``litellm[proxy]==1.108.7`` proxy per test session, no database (a master key
and the config file's ``model_list``), with the project's wake hook copied beside its config as
``coder_stack_wake.py`` + ``coder_stack_wake.json`` and loaded by ``litellm_settings.callbacks``, as a user loads it.

The proxy runs from its own environment, ``.venv-litellm`` (``./dev.sh test`` builds it from
``requirements-litellm-proxy.txt``), or the ``litellm`` named by ``$CODER_STACK_LITELLM``. Without it the tier fails.
The fakes (Kubernetes API, Prefect's events endpoint, an OpenAI-compatible upstream) run in this process.
``CODER_STACK_RECORD=1`` writes what the proxy answered to devtools/simstack/recordings/litellm-hooks-1.108.7.jsonl.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from coder_stack_dev.processes import die_with_parent, free_port

from tests.litellm_proxy.fakes import FakeCluster, serve, settings

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "coder_stack" / "litellm" / "wake_hook.py"
RECORDING = REPO / "devtools" / "simstack" / "recordings" / "litellm-hooks-1.108.7.jsonl"
HEADERS = ("content-type", "retry-after")


def litellm_binary() -> Path:
    named = os.environ.get("CODER_STACK_LITELLM")
    path = Path(named) if named else REPO / ".venv-litellm" / "bin" / "litellm"
    if not path.is_file():
        pytest.fail(
            f"the real-LiteLLM tier needs a litellm[proxy]==1.108.7 environment and {path} is missing: run "
            "./dev.sh test (it builds .venv-litellm from tests/litellm_proxy/requirements-litellm-proxy.txt), "
            "or point $CODER_STACK_LITELLM at the litellm program of such an environment",
            pytrace=False,
        )
    return path


# the hook's models in this tier: alias -> (role, fallback, cold_start_s)
WAKE_MODELS = {
    "coder-chat": ("chat", None),
    "coder-fim": ("fim", None),
    "coder-big": ("chat", None),
    "coder-agent": ("chat", "coder-small"),
}
FALLBACK_TEXT = "coder-small answers while the big model starts."


def proxy_config(master: str, upstream: str) -> str:
    def entry(alias: str, model: str, **params: Any) -> dict[str, Any]:
        return {"model_name": alias, "litellm_params": {"model": model, **params}}

    up = {"api_base": f"{upstream}/v1", "api_key": "upstream-key"}
    cfg = {
        "model_list": [
            entry("coder-chat", "openai/coder-chat", **up),
            entry("coder-fim", "text-completion-openai/coder-fim", **up),
            entry("coder-big", "openai/coder-big", **up),
            entry("coder-agent", "openai/coder-agent", **up),
            entry("coder-small", "openai/coder-small", mock_response=FALLBACK_TEXT),
        ],
        "litellm_settings": {"callbacks": ["coder_stack_wake.wake_on_demand"]},
        "general_settings": {"master_key": master},
    }
    return json.dumps(cfg, indent=1)  # JSON is YAML


@dataclass
class Proxy:
    url: str
    master: str
    cluster: FakeCluster
    settings_file: Path
    base: str
    log: Path
    records: list[dict[str, Any]] = field(default_factory=list)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.master}"}, timeout=60)

    def write_settings(self, **over: Any) -> None:
        s = settings(self.base, **over)
        s["models"] = {
            a: {"deployment": a, "role": role, "fallback": fb, "cold_start_s": 600}
            for a, (role, fb) in WAKE_MODELS.items()
        }
        self.settings_file.write_text(json.dumps(s))
        st = self.settings_file.stat()
        os.utime(self.settings_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    async def call(
        self, client: httpx.AsyncClient, rid: str, what: str, path: str, body: dict[str, Any], setup: dict[str, Any]
    ) -> tuple[int, dict[str, str], Any]:
        """One exchange through the proxy; recorded in the recordings' format."""
        t0 = time.perf_counter()
        chunk_ms: list[float] = []
        async with client.stream("POST", path, json=body) as r:
            raw = b""
            payloads: list[str] = []
            async for line in r.aiter_lines():
                if body.get("stream") and line.startswith("data: "):
                    payloads.append(line[len("data: ") :])
                    chunk_ms.append(round((time.perf_counter() - t0) * 1000, 1))
                raw += line.encode() + b"\n"
        elapsed = round((time.perf_counter() - t0) * 1000, 1)
        headers = {k: v for k, v in r.headers.items() if k in HEADERS or k.startswith("x-litellm-")}
        parsed: Any
        if body.get("stream") and r.status_code == 200:
            parsed = payloads
        else:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw.decode()
        rec: dict[str, Any] = {
            "id": rid,
            "what": what,
            "setup": setup,
            "request": {"method": "POST", "path": path, "query": {}, "auth": "<master>", "body": body},
            "response": {"status": r.status_code, "headers": headers, "body": parsed},
            "elapsed_ms": elapsed,
        }
        if body.get("stream"):
            rec["chunk_ms"] = chunk_ms
        self.records.append(rec)
        return r.status_code, headers, parsed


@pytest.fixture(scope="session")
def litellm_program() -> Path:
    return litellm_binary()


@pytest.fixture(scope="module")  # one proxy for the tier's one module, stopped when it is done (not at session end)
async def proxy(litellm_program: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Proxy]:
    cluster = FakeCluster()
    async with serve(cluster) as base:
        d = tmp_path_factory.mktemp("litellm-proxy")
        master = "sk-" + secrets.token_hex(16)
        (d / "config.yaml").write_text(proxy_config(master, base))
        shutil.copy(HOOK, d / "coder_stack_wake.py")
        port = free_port()
        p = Proxy(f"http://127.0.0.1:{port}", master, cluster, d / "coder_stack_wake.json", base, d / "proxy.log")
        p.write_settings()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CODER_STACK_", "PREFECT_"))}
        env |= {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "PREFECT_API_AUTH_STRING": "admin:pass"}
        with p.log.open("wb") as log:
            proc = subprocess.Popen(
                [str(litellm_program), "--config", str(d / "config.yaml"), "--host", "127.0.0.1", "--port", str(port)],
                cwd=d,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
                start_new_session=True,
            )
        try:
            await _until_ready(p, proc)
            yield p
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if os.environ.get("CODER_STACK_RECORD") == "1" and p.records:
                text = "".join(json.dumps(r) + "\n" for r in p.records)
                RECORDING.write_text(text.replace(base, "http://<fakes>").replace(master, "<master>"))


async def _until_ready(p: Proxy, proc: subprocess.Popen[bytes]) -> None:
    """Wait for /health/readiness (the proxy starts in 15-35 s); fail with its log if it exits or never answers."""
    deadline = time.monotonic() + 180
    async with httpx.AsyncClient(timeout=2) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the LiteLLM proxy exited ({proc.returncode}):\n{p.log.read_text()[-4000:]}")
            try:
                if (await c.get(f"{p.url}/health/readiness")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    pytest.fail(f"the LiteLLM proxy did not answer /health/readiness in 180 s:\n{p.log.read_text()[-4000:]}")


@pytest.fixture
def no_leak(proxy: Proxy) -> Iterator[None]:
    yield
    text = proxy.log.read_text() + "".join(proxy.cluster.bodies[-200:])
    events = json.dumps(proxy.cluster.events)
    assert proxy.master not in events and "upstream-key" not in events
    assert proxy.master not in text
