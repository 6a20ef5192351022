"""What the wake hook costs a request to a model that is serving, measured through real LiteLLM proxies.

Two real ``litellm[proxy]`` proxies (no database) route the same alias to one fast local upstream; one loads the
project's hook (``coder_stack_wake.py`` + ``.json`` beside its config, as a user loads it), the other does not.
The same N chat calls go to both, interleaved (the order alternates each round), so machine noise hits both
alike; the result is each proxy's p50/p99 and the difference. The hook reads a fake Kubernetes API that says the
model is Ready. The proxy program: ``$CODER_STACK_LITELLM`` or the checkout's ``.venv-litellm`` (``./dev.sh test``).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from coder_stack_dev.processes import die_with_parent, free_port

REPO = Path(__file__).resolve().parents[3]
ALIAS = "coder-chat"


def litellm_program() -> Path:
    named = os.environ.get("CODER_STACK_LITELLM")
    path = Path(named) if named else REPO / ".venv-litellm" / "bin" / "litellm"
    if not path.is_file():
        raise RuntimeError(
            f"{path} is missing: ./dev.sh test builds .venv-litellm (a litellm[proxy]==1.108.7 environment), "
            "or set $CODER_STACK_LITELLM to the litellm program of one"
        )
    return path


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


READS = [0]  # Deployment reads the fake Kubernetes API answered: proof that the hook ran in the hooked proxy


async def _fakes() -> tuple[web.AppRunner, str]:
    """A fast OpenAI-compatible upstream and a Kubernetes API saying the model is Ready, on 127.0.0.1."""
    answer = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": ALIAS,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }  # fmt: skip
    ready = {"metadata": {"name": ALIAS, "annotations": {}}, "status": {"readyReplicas": 1}}

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(answer)

    async def deployment(_: web.Request) -> web.Response:
        READS[0] += 1
        return web.json_response(ready)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/apis/apps/v1/namespaces/{ns}/deployments/{name}", deployment)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


def _start(program: Path, d: Path, base: str, master: str, hook: bool) -> tuple[subprocess.Popen[bytes], str]:
    d.mkdir()
    cfg: dict[str, Any] = {
        "model_list": [{"model_name": ALIAS, "litellm_params": {
            "model": f"openai/{ALIAS}", "api_base": f"{base}/v1", "api_key": "upstream"}}],
        "general_settings": {"master_key": master},
    }  # fmt: skip
    if hook:
        cfg["litellm_settings"] = {"callbacks": ["coder_stack_wake.wake_on_demand"]}
        src = resources.files("coder_stack.litellm").joinpath("wake_hook.py").read_text()
        (d / "coder_stack_wake.py").write_text(src)
        settings = {
            "version": 1, "namespace": "serving",
            "models": {ALIAS: {"deployment": ALIAS, "role": "chat", "fallback": None, "cold_start_s": 600}},
            "prefect_api_url": f"{base}/api", "prefect_auth_env": "PREFECT_API_AUTH_STRING",
            "chat_as_message": False, "hold_s": 20, "burst_s": 120, "cache_s": 5,
            "kubernetes": {"url": base, "token_file": None, "ca_file": None},
        }  # fmt: skip
        (d / "coder_stack_wake.json").write_text(json.dumps(settings))
    (d / "config.yaml").write_text(json.dumps(cfg))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CODER_STACK_", "PREFECT_"))}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    with (d / "proxy.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(program), "--config", str(d / "config.yaml"), "--host", "127.0.0.1", "--port", str(port)],
            cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            start_new_session=True,
        )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


async def _ready(proc: subprocess.Popen[bytes], url: str, log_file: Path) -> None:
    deadline = time.monotonic() + 180
    async with httpx.AsyncClient(timeout=2) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"a LiteLLM proxy exited: {log_file.read_text()[-2000:]}")
            try:
                if (await c.get(f"{url}/health/readiness")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    raise RuntimeError(f"a LiteLLM proxy did not get ready in 180 s: {log_file.read_text()[-2000:]}")


async def hook_overhead(reps: int, log: Any) -> dict[str, Any]:
    """p50/p99 of ``reps`` chat calls through a proxy without the hook and one with it (serving model), in ms."""
    program = litellm_program()
    runner, base = await _fakes()
    master = "sk-" + secrets.token_hex(16)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="hook-bench-") as tmp:
            plain, plain_url = _start(program, Path(tmp) / "plain", base, master, hook=False)
            hooked, hooked_url = _start(program, Path(tmp) / "hooked", base, master, hook=True)
            procs = [plain, hooked]
            log(f"hook overhead: starting two LiteLLM proxies ({program})")
            await asyncio.gather(
                _ready(plain, plain_url, Path(tmp) / "plain" / "proxy.log"),
                _ready(hooked, hooked_url, Path(tmp) / "hooked" / "proxy.log"),
            )
            body = {"model": ALIAS, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            times: dict[str, list[float]] = {"without": [], "with": []}
            headers = {"Authorization": f"Bearer {master}"}
            async with httpx.AsyncClient(timeout=30, headers=headers) as c:

                async def one(url: str) -> float:
                    t0 = time.perf_counter()
                    r = await c.post(f"{url}/v1/chat/completions", json=body)
                    r.raise_for_status()
                    return (time.perf_counter() - t0) * 1000

                for _ in range(10):  # warm both (first calls build clients and caches)
                    await one(plain_url)
                    await one(hooked_url)
                for i in range(reps):
                    pair = [("without", plain_url), ("with", hooked_url)]
                    for name, url in pair if i % 2 == 0 else pair[::-1]:
                        times[name].append(await one(url))
            if READS[0] == 0:
                raise RuntimeError("the hooked proxy never read the Deployment: the hook did not run")
            out: dict[str, Any] = {"reps": reps, "hook_deployment_reads": READS[0]}
            for name, values in times.items():
                out[f"{name}_hook_p50_ms"] = round(_percentile(values, 0.5), 2)
                out[f"{name}_hook_p99_ms"] = round(_percentile(values, 0.99), 2)
            out["overhead_p50_ms"] = round(out["with_hook_p50_ms"] - out["without_hook_p50_ms"], 2)
            out["overhead_p99_ms"] = round(out["with_hook_p99_ms"] - out["without_hook_p99_ms"], 2)
            log(f"hook overhead: {out}")
            return out
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        await runner.cleanup()


if __name__ == "__main__":
    import sys

    print(json.dumps(asyncio.run(hook_overhead(int(sys.argv[1]) if len(sys.argv) > 1 else 200, print))))
