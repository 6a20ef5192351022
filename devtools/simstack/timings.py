"""Durations of the simulated cluster, in simulated seconds (the controllers multiply by ``time_scale``).

The defaults reproduce the runbook's ~10 minute cold start of coder-chat on a fresh L4 node: node
provisioning 240 s, vLLM image pull 240 s, weight staging 150 s, server start 40 s. The other models
scale with the size of their weights (the weights go through host RAM and the model-cache PVC).
"""

from __future__ import annotations

from dataclasses import dataclass

from coder_stack.spec import ModelSpec

# coder-chat's weights (Qwen2.5-Coder-7B-AWQ, 5.5 GB) take REFERENCE_WEIGHTS_S to stage.
REFERENCE_WEIGHTS_GB = 5.5
REFERENCE_WEIGHTS_S = 150.0


@dataclass(frozen=True)
class Timings:
    node_provision_s: float = 240.0  # autoscaler: TriggeredScaleUp -> Node object exists and is Ready
    slow_node_provision_s: float = 285.0  # fault slow-node: longer, still within coder-chat's node budget (300)
    gpu_image_pull_s: float = 240.0  # ~10 GB vllm/vllm-openai image, once per node
    cpu_image_pull_s: float = 30.0  # a CPU image not yet on the node
    image_pull_fail_s: float = 3.0  # fault imagepull: until ErrImagePull
    weights_cached_s: float = 3.0  # init container finds the weights on the model-cache PVC
    cpu_start_s: float = 6.0  # a CPU server (LiteLLM, Open WebUI, Tabby, embeddings) until Ready
    crash_after_s: float = 6.0  # fault crashloop: the main container exits 1 this long after it starts
    backoff_initial_s: float = 10.0  # CrashLoopBackOff / ImagePullBackOff: 10 s, doubling ...
    backoff_max_s: float = 300.0  # ... capped at 5 min, as the kubelet does
    termination_s: float = 2.0  # SIGTERM -> container exit (capped by the pod's grace period)
    scale_down_unneeded_s: float = 600.0  # cluster-autoscaler --scale-down-unneeded-time
    progress_deadline_s: float = 600.0  # default Deployment progressDeadlineSeconds
    mount_retry_s: float = 120.0  # FailedMount re-reported this often while a Secret is missing


@dataclass(frozen=True)
class ModelTimings:
    weights_s: float  # init container staging the weights (first time for this model)
    server_start_s: float  # vLLM loading the model until /health answers


def model_timings(model: ModelSpec) -> ModelTimings:
    """Per-model durations from the size of the weights.

    coder-chat (5.5 GB): weights 150 s, start 40 s; coder-fim (3.1 GB): 85 s, 27 s;
    coder-agent (9.5 GB): 259 s, 62 s.
    """
    ratio = model.weights_gb / REFERENCE_WEIGHTS_GB
    return ModelTimings(weights_s=round(REFERENCE_WEIGHTS_S * ratio, 1), server_start_s=round(10.0 + 30.0 * ratio, 1))
