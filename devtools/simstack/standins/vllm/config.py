"""The server's configuration as the real one reads it from its args and env (``VllmConfig``, ``parse_args``), and
the start-up GPU memory check: vLLM's own check and message (``startup_memory_error``), the bytes a server holds
(``requested_memory``) and the log a server that failed the check leaves (``startup_failure_log``)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

from simstack.standins._server import expand_k8s_vars

DEFAULT_MAX_MODEL_LEN = 32768
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's CacheConfig.gpu_memory_utilization default


@dataclass
class VllmConfig:
    model: str
    served_names: list[str]
    api_key: str | None
    auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    embed: bool = False
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION

    @property
    def name(self) -> str:
        return self.served_names[0]


def parse_args(args: list[str], env: dict[str, str]) -> VllmConfig:
    argv = [expand_k8s_vars(a, env) for a in args]
    # "--flag=value" -> "--flag", "value"
    tokens: list[str] = []
    for a in argv:
        if a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            tokens += [k, v]
        else:
            tokens.append(a)
    model: str | None = None
    served: list[str] = []
    api_key: str | None = None
    cfg: dict[str, Any] = {
        "auto": False,
        "parser": None,
        "embed": False,
        "max_len": DEFAULT_MAX_MODEL_LEN,
        "gpu_util": DEFAULT_GPU_MEMORY_UTILIZATION,
    }
    i = 0
    positional: list[str] = []
    while i < len(tokens):
        t = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if t == "--model" and nxt is not None:
            model = nxt
            i += 2
        elif t == "--served-model-name":
            i += 1
            while i < len(tokens) and not tokens[i].startswith("--"):
                served.append(tokens[i])
                i += 1
        elif t == "--api-key" and nxt is not None:
            api_key = nxt
            i += 2
        elif t == "--enable-auto-tool-choice":
            cfg["auto"] = True
            i += 1
        elif t == "--tool-call-parser" and nxt is not None:
            cfg["parser"] = nxt
            i += 2
        elif t in ("--task", "--convert") and nxt is not None:
            cfg["embed"] = cfg["embed"] or nxt in ("embed", "embedding")
            i += 2
        elif t == "--runner" and nxt is not None:
            cfg["embed"] = cfg["embed"] or nxt == "pooling"
            i += 2
        elif t == "--max-model-len" and nxt is not None:
            with contextlib.suppress(ValueError):
                cfg["max_len"] = int(nxt.lower().replace("k", "000"))
            i += 2
        elif t == "--gpu-memory-utilization" and nxt is not None:
            with contextlib.suppress(ValueError):
                cfg["gpu_util"] = float(nxt)
            i += 2
        elif t.startswith("--"):
            # unknown flag: swallow its value if it has one
            i += 2 if nxt is not None and not nxt.startswith("--") else 1
        else:
            positional.append(t)
            i += 1
    if model is None:
        pos = [p for p in positional if p != "serve"]
        model = pos[0] if pos else None
    if api_key is None:
        api_key = env.get("VLLM_API_KEY") or None
    if model is None:
        model = served[0] if served else "Qwen/Qwen3-0.6B"
    if not served:
        served = [model]
    return VllmConfig(
        model=model,
        served_names=served,
        api_key=api_key,
        auto_tool_choice=cfg["auto"],
        tool_call_parser=cfg["parser"],
        embed=cfg["embed"],
        max_model_len=cfg["max_len"],
        gpu_memory_utilization=cfg["gpu_util"],
    )


# --------------------------------------------------------------------------------------------------
# Start-up: the GPU memory check.

GIB_BYTES = 1 << 30  # vllm/utils/mem_constants.py GiB_bytes
# The check runs in the worker's init_device, before the weights load. In the recorded start
# (recordings/vllm-0.32.0-startup.txt) the worker's first line comes 31.3 s into a 39.3 s start: 0.8 of it.
MEMORY_CHECK_AT = 0.8


def format_gib(b: int) -> float:
    """vllm/utils/mem_utils.py ``format_gib``."""
    return round(b / GIB_BYTES, 2)


def requested_memory(total_memory: int, gpu_memory_utilization: float) -> int:
    """The bytes a server holds on its GPU: ``math.ceil(total * gpu_memory_utilization)`` (vLLM's
    ``request_memory``)."""
    return math.ceil(total_memory * gpu_memory_utilization)


def startup_memory_error(
    gpu_memory_utilization: float, free_memory: int, total_memory: int, device: str = "cuda:0"
) -> str | None:
    """vLLM's start-up memory check, or None when the share is free.

    Copied from vLLM's own source: ``request_memory(init_snapshot, cache_config)`` in
    ``vllm/v1/worker/utils.py``, which ``Worker.init_device`` (``vllm/v1/worker/gpu_worker.py``) calls on a
    fresh ``MemorySnapshot`` (``torch.cuda.mem_get_info``): it raises ``ValueError`` with this text when the
    free memory is less than ``ceil(total * gpu_memory_utilization)``. ``device`` is the snapshot's
    ``torch.device`` (``cuda:0`` for the one GPU a pod sees); numbers through ``format_gib`` (GiB, 2 places)
    and the utilization as the float vLLM parsed.
    """
    requested = requested_memory(total_memory, gpu_memory_utilization)
    if free_memory >= requested:
        return None
    return (
        f"Free memory on device {device} "
        f"({format_gib(free_memory)}/"
        f"{format_gib(total_memory)} GiB) on startup "
        f"is less than desired GPU memory utilization "
        f"({gpu_memory_utilization}, "
        f"{format_gib(requested)} GiB). Decrease GPU memory "
        f"utilization or reduce GPU memory used by other processes."
    )


def startup_failure_log(error: str, when: float | None = None) -> str:
    """The tail of a vLLM 0.32.0 log whose engine failed the memory check; the process then exits 1.

    The ``ValueError: ...`` text is vLLM's own (``startup_memory_error``). GUESS: the lines around it, from
    vLLM's source rather than a recorded failure: ``EngineCoreProc.run_engine_core`` logs "EngineCore failed to
    start." with the traceback (prefixed ``(EngineCore pid=N)`` as in the recorded start) and re-raises, and
    the API server's ``wait_for_engine_startup`` raises ``RuntimeError: Engine core initialization failed. See
    root cause above. Failed core proc(s): {}``; an uncaught exception exits the interpreter with code 1. The
    pids, the source line numbers and the traceback frames in between are not reproduced.
    """
    stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(when))
    api, core = "(APIServer pid=1)", "(EngineCore pid=72)"
    return (
        f"{api} INFO {stamp} [api_utils.py:347]  \u2584\u2584 \u2584\u2588 \u2588     \u2588     "
        f"\u2588 \u2580\u2584\u2580 \u2588  version 0.32.0\n"
        f"{core} ERROR {stamp} [core.py:842] EngineCore failed to start.\n"
        f"{core} ERROR {stamp} [core.py:842] Traceback (most recent call last):\n"
        f"{core} ERROR {stamp} [core.py:842] ValueError: {error}\n"
        f"{core} ValueError: {error}\n"
        f"{api} RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {{}}\n"
    )
