"""/metrics: the stand-in's own model of vLLM 0.32.0's exposition (prometheus_client's text format, as vLLM
writes it): each vllm:* family with its type, HELP, label dimensions and buckets, written down here from
vLLM's metric definitions; the values are this stand-in's. Conformance holds the rendered families, types
and label sets to the recorded exposition (exchange "metrics", held out: nothing here reads it).

``Metrics`` holds the server's counters and histograms and renders them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

_HISTOGRAMS_TIMED = (
    "e2e_request_latency_seconds",
    "request_inference_time_seconds",
    "request_decode_time_seconds",
)
# (name without "vllm:", type, label dimensions beside engine and model_name, HELP)
_METRIC_FAMILIES: tuple[tuple[str, str, tuple[tuple[str, tuple[str, ...]], ...], str], ...] = (
    (
        "estimated_flops_per_gpu_total",
        "counter",
        (),
        "Estimated number of floating point operations per GPU (for Model Flops Utilization calculations).",
    ),
    (
        "estimated_read_bytes_per_gpu_total",
        "counter",
        (),
        "Estimated number of bytes read from memory per GPU (for Model Flops Utilization calculations).",
    ),
    (
        "estimated_write_bytes_per_gpu_total",
        "counter",
        (),
        "Estimated number of bytes written to memory per GPU (for Model Flops Utilization calculations).",
    ),
    ("num_requests_running", "gauge", (), "Number of requests in model execution batches."),
    ("num_requests_waiting", "gauge", (), "Number of requests waiting to be processed."),
    (
        "num_requests_waiting_by_reason",
        "gauge",
        (("reason", ("capacity", "deferred")),),
        "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",  # noqa: E501
    ),
    (
        "engine_sleep_state",
        "gauge",
        (("sleep_state", ("awake", "weights_offloaded", "discard_all")),),
        "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",  # noqa: E501
    ),
    ("kv_cache_usage_perc", "gauge", (), "KV-cache usage. 1 means 100 percent usage."),
    ("prefix_cache_queries_total", "counter", (), "Prefix cache queries, in terms of number of queried tokens."),
    ("prefix_cache_hits_total", "counter", (), "Prefix cache hits, in terms of number of cached tokens."),
    (
        "external_prefix_cache_queries_total",
        "counter",
        (),
        "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.",  # noqa: E501
    ),
    (
        "external_prefix_cache_hits_total",
        "counter",
        (),
        "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.",  # noqa: E501
    ),
    ("mm_cache_queries_total", "counter", (), "Multi-modal cache queries, in terms of number of queried items."),
    ("mm_cache_hits_total", "counter", (), "Multi-modal cache hits, in terms of number of cached items."),
    ("num_preemptions_total", "counter", (), "Cumulative number of preemption from the engine."),
    ("prompt_tokens_total", "counter", (), "Number of prefill tokens processed."),
    (
        "prompt_tokens_by_source_total",
        "counter",
        (("source", ("local_compute", "local_cache_hit", "external_kv_transfer")),),
        "Number of prompt tokens by source.",
    ),
    ("prompt_tokens_cached_total", "counter", (), "Number of cached prompt tokens (local + external)."),
    (
        "prompt_tokens_cached_by_source_total",
        "counter",
        (("source", ("device", "host", "p2p", "disk", "external_unspecified")),),
        "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + vllm:external_prefix_cache_hits.",  # noqa: E501
    ),
    ("generation_tokens_total", "counter", (), "Number of generation tokens processed."),
    (
        "request_success_total",
        "counter",
        (("finished_reason", ("stop", "length", "abort", "error", "repetition")),),
        "Count of successfully processed requests.",
    ),
    (
        "admission_rejections_total",
        "counter",
        (("reason", ("max_num_queued_reqs", "max_num_queued_tokens")),),
        "Number of admission attempts rejected by a queue limit, by reason.",
    ),
    ("request_prompt_tokens", "histogram", (), "Number of prefill tokens processed."),
    ("request_generation_tokens", "histogram", (), "Number of generation tokens processed."),
    ("iteration_tokens_total", "histogram", (), "Histogram of number of tokens per engine_step."),
    (
        "request_max_num_generation_tokens",
        "histogram",
        (),
        "Histogram of maximum number of requested generation tokens.",
    ),
    ("request_params_n", "histogram", (), "Histogram of the n request parameter."),
    ("request_params_max_tokens", "histogram", (), "Histogram of the max_tokens request parameter."),
    ("time_to_first_token_seconds", "histogram", (), "Histogram of time to first token in seconds."),
    ("inter_token_latency_seconds", "histogram", (), "Histogram of inter-token latency in seconds."),
    (
        "request_time_per_output_token_seconds",
        "histogram",
        (),
        "Histogram of time_per_output_token_seconds per request.",
    ),
    ("e2e_request_latency_seconds", "histogram", (), "Histogram of e2e request latency in seconds."),
    ("request_queue_time_seconds", "histogram", (), "Histogram of time spent in WAITING phase for request."),
    ("request_inference_time_seconds", "histogram", (), "Histogram of time spent in RUNNING phase for request."),
    ("request_prefill_time_seconds", "histogram", (), "Histogram of time spent in PREFILL phase for request."),
    ("request_decode_time_seconds", "histogram", (), "Histogram of time spent in DECODE phase for request."),
    ("request_num_preemptions", "histogram", (), "Histogram of the number of times a request was preempted."),
    (
        "request_prefill_kv_computed_tokens",
        "histogram",
        (),
        "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
    ),
    ("cache_config_info", "gauge", (), "Information of the LLMEngine CacheConfig"),
    (
        "tool_call_parser_invocations_total",
        "counter",
        (
            ("mode", ("streaming", "non_streaming")),
            ("outcome", ("tool_call", "no_tool_call")),
            ("request_type", ("chat_completions", "responses", "other")),
        ),
        "Total number of ToolParser invocations. Non-streaming increments once per choice; streaming increments once per delta.",  # noqa: E501
    ),
)

_NO_ENGINE_LABEL = frozenset({"admission_rejections_total", "tool_call_parser_invocations_total"})
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)  # vLLM's 1-2-5 buckets up to max_model_len/2
_REQUEST_SECONDS = (0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680)
_TOKEN_SECONDS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
_BUCKETS: dict[str, tuple[float, ...]] = {
    "request_prompt_tokens": _TOKEN_BUCKETS,
    "request_generation_tokens": _TOKEN_BUCKETS,
    "iteration_tokens_total": (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
    "request_max_num_generation_tokens": _TOKEN_BUCKETS,
    "request_params_n": (1, 2, 5, 10, 20),
    "request_params_max_tokens": _TOKEN_BUCKETS,
    "time_to_first_token_seconds": (
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640, 2560
    ),
    "inter_token_latency_seconds": _TOKEN_SECONDS,
    "request_time_per_output_token_seconds": _TOKEN_SECONDS,
    "e2e_request_latency_seconds": _REQUEST_SECONDS,
    "request_queue_time_seconds": _REQUEST_SECONDS,
    "request_inference_time_seconds": _REQUEST_SECONDS,
    "request_prefill_time_seconds": _REQUEST_SECONDS,
    "request_decode_time_seconds": _REQUEST_SECONDS,
    "request_num_preemptions": (1, 2, 3, 4, 5, 10, 20),
    "request_prefill_kv_computed_tokens": _TOKEN_BUCKETS,
}  # fmt: skip
# GUESS: the cache configuration of the recorded CPU build (values of a GPU build differ; nothing reads them)
_CACHE_CONFIG_INFO = {
    "_block_size_resolved": "True", "block_size": "128", "cache_dtype": "auto", "cache_hit_alignment_tokens": "None",
    "effective_attention_block_size": "128", "enable_mamba_shared_prefix_checkpoint": "False",
    "enable_prefix_caching": "True", "gpu_memory_utilization": "0.92", "hash_block_size": "None",
    "is_attention_free": "False", "kv_cache_dtype_skip_layers": "[]", "kv_cache_layout": "None",
    "kv_cache_max_concurrency": "42.65625", "kv_cache_memory_bytes": "2147483648", "kv_cache_size_tokens": "174720",
    "kv_offloading_backend": "native", "kv_offloading_size": "None", "kv_sharing_fast_prefill": "False",
    "mamba_block_size": "None", "mamba_cache_dtype": "auto", "mamba_cache_mode": "none",
    "mamba_page_size_padded": "None", "mamba_ssm_cache_dtype": "auto", "num_cpu_blocks": "None",
    "num_gpu_blocks": "1365", "num_gpu_blocks_override": "None", "prefix_cache_retention_interval": "0",
    "prefix_caching_hash_algo": "sha256", "prefix_match_unit": "None", "replayssm_buffer_len": "16",
    "skip_page_size_padded": "None", "sliding_window": "None", "swa_bounded_replay": "True",
    "use_kda_recoverssm": "False", "use_replayssm": "False", "user_specified_block_size": "False",
}  # fmt: skip


def _label_sets(dims: tuple[tuple[str, tuple[str, ...]], ...]) -> list[dict[str, str]]:
    sets: list[dict[str, str]] = [{}]
    for key, vals in dims:
        sets = [d | {key: v} for d in sets for v in vals]
    return sets


def _label_text(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


@dataclass
class Metrics:
    running: int = 0
    waiting: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    started: float = field(default_factory=time.time)
    success: dict[str, int] = field(
        default_factory=lambda: {"stop": 0, "length": 0, "abort": 0, "error": 0, "repetition": 0}
    )
    hist: dict[str, list[float]] = field(default_factory=dict)
    tool_parser: dict[tuple[str, str], int] = field(default_factory=dict)  # (mode, outcome) -> invocations

    def observe(self, name: str, value: float) -> None:
        self.hist.setdefault(name, []).append(float(value))

    def _value(self, kind: str, name: str, labels: dict[str, str]) -> float:
        short = name.removeprefix("vllm:")
        if short.endswith("_created"):
            return self.started
        if kind == "histogram":
            for suffix in ("_bucket", "_count", "_sum"):
                if short.endswith(suffix):
                    obs = self.hist.get(short.removesuffix(suffix), [])
                    if suffix == "_count":
                        return float(len(obs))
                    if suffix == "_sum":
                        return float(sum(obs))
                    le = labels.get("le", "+Inf")
                    return float(len(obs) if le == "+Inf" else sum(1 for v in obs if v <= float(le)))
        if short == "num_requests_running":
            return float(self.running)
        if short == "num_requests_waiting":
            return float(self.waiting)
        if short == "num_requests_waiting_by_reason":
            return float(self.waiting if labels.get("reason") == "capacity" else 0)
        if short == "kv_cache_usage_perc":
            return 0.01 * self.running  # GUESS: 1 % of the KV cache per running request
        if short in ("prompt_tokens_total", "prefix_cache_queries_total"):
            return float(self.prompt_tokens)
        if short == "prompt_tokens_by_source_total":
            return float(self.prompt_tokens if labels.get("source") == "local_compute" else 0)
        if short == "generation_tokens_total":
            return float(self.generation_tokens)
        if short == "request_success_total":
            return float(self.success.get(labels.get("finished_reason", ""), 0))
        if short == "tool_call_parser_invocations_total":
            if labels.get("request_type") != "chat_completions":
                return 0.0
            return float(self.tool_parser.get((labels.get("mode", ""), labels.get("outcome", "")), 0))
        if short == "engine_sleep_state":
            return 1.0 if labels.get("sleep_state") == "awake" else 0.0  # the stand-in never sleeps
        if short == "cache_config_info":
            return 1.0  # an info gauge
        # GUESS: the other counters (prefix-cache hits, preemptions, FLOPs estimates ...) stay 0.
        return 0.0

    def render(self, model: str) -> str:
        """The exposition as prometheus_client writes vLLM's metrics: every counter and histogram followed
        by its ``_created`` gauge family."""
        lines: list[str] = []
        for short, kind, dims, help_text in _METRIC_FAMILIES:
            base = {} if short in _NO_ENGINE_LABEL else {"engine": "0"}
            # vLLM declares finished_reason before model_name; every other dimension comes after it
            sets = [
                base | {k: v for k, v in d.items() if k == "finished_reason"} | {"model_name": model} | d
                for d in _label_sets(dims)
            ]
            if short == "cache_config_info":
                sets = [dict(sorted((_CACHE_CONFIG_INFO | {"engine": "0"}).items()))]
            name = f"vllm:{short}"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for lab in sets:
                if kind == "histogram":
                    for le_text in (*(repr(float(b)) for b in _BUCKETS[short]), "+Inf"):
                        value = self._value(kind, f"{name}_bucket", lab | {"le": le_text})
                        lines.append(f"{name}_bucket{_label_text(lab | {'le': le_text})} {value!r}")
                    for suffix in ("_count", "_sum"):
                        lines.append(f"{name}{suffix}{_label_text(lab)} {self._value(kind, name + suffix, lab)!r}")
                else:
                    lines.append(f"{name}{_label_text(lab)} {self._value(kind, name, lab)!r}")
            if kind in ("counter", "histogram"):
                created = f"{name.removesuffix('_total') if kind == 'counter' else name}_created"
                lines += [f"# HELP {created} {help_text}", f"# TYPE {created} gauge"]
                lines += [f"{created}{_label_text(lab)} {self.started!r}" for lab in sets]
        return "\n".join(lines) + "\n"
