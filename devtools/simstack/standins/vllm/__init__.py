"""Stand-in for the vLLM OpenAI-compatible server (image ``vllm/vllm-openai``), as vLLM 0.32.0 answers.

Held to the exchanges recorded from real vLLM 0.32.0 (``devtools/simstack/recordings/vllm-0.32.0.jsonl``, replayed by
``tests/conformance/test_vllm_conformance.py``): open ``/health`` (empty body), ``/version`` and ``/metrics``
(every recorded ``vllm:*`` family), bearer auth on ``/v1/*`` only, every answer naming the first served
name, vLLM's error bodies (400 "Bad Request" pydantic lists, 404 ``NotFoundError``, int ``code``), its
vLLM-only null fields, stream chunks as recorded. Recorded prompts get the recorded texts token for token
(``recorded_answers``); unrecorded ones run to ``max_tokens`` like the recorded answers do. Whatever no
recording shows is marked ``GUESS``.

Configuration, as the real server reads it: ``--model`` (or the positional model after ``serve``),
``--served-model-name`` (one or more), ``--api-key`` or env ``VLLM_API_KEY``, ``--enable-auto-tool-choice``
with ``--tool-call-parser``, ``--task embed`` (also ``--runner pooling`` / ``--convert embed``),
``--max-model-len``, ``--gpu-memory-utilization`` (vLLM's default 0.9): the share of the GPU a server asks
for when it starts (``startup_memory_error``: vLLM's own check and message; the simulated kubelet calls it
with the node's GPU memory and what the other servers on that GPU hold).

One module per concern:

- ``config``: the args and env the server reads, and the start-up GPU memory check;
- ``text``: the tokenizer, the text written for raw (FIM) and chat prompts, generation with stop strings;
- ``recorded``: the recorded answers and what follows them; ``tools``: tool choice and schema-driven arguments;
- ``template``: the chat prompt template; ``errors``: vLLM's error bodies; ``metrics``: the ``/metrics`` exposition;
- ``server``: the HTTP server and ``start_vllm``, registered in ``FACTORIES``.
"""

from __future__ import annotations

from simstack.standins.vllm.config import (
    MEMORY_CHECK_AT,
    VllmConfig,
    parse_args,
    requested_memory,
    startup_failure_log,
    startup_memory_error,
)
from simstack.standins.vllm.errors import VllmError
from simstack.standins.vllm.metrics import Metrics
from simstack.standins.vllm.server import IMAGE, VERSION, VllmServer, embed_vector, start_vllm
from simstack.standins.vllm.text import count_tokens, tokenize

__all__ = [
    "IMAGE",
    "MEMORY_CHECK_AT",
    "VERSION",
    "Metrics",
    "VllmConfig",
    "VllmError",
    "VllmServer",
    "count_tokens",
    "embed_vector",
    "parse_args",
    "requested_memory",
    "start_vllm",
    "startup_failure_log",
    "startup_memory_error",
    "tokenize",
]
