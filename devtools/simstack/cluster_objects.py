"""The reference deployment of the runbook as Kubernetes objects, derived from a ``StackSpec``.

Everything is plain wire-form dicts (what ``kubectl get -o json`` shows), created in the store at sim
start. See docs/DESIGN.md "Simulated cluster: objects".
"""

from __future__ import annotations

import base64
import re
import secrets as _secrets
from typing import Any

import yaml

from coder_stack.spec import ModelSpec, StackSpec
from simstack.layout import (
    EMBEDDINGS_PORT,
    EMBEDDINGS_SERVICE,
    EXCLUSIVE_GPU_MEMORY_UTILIZATION,
    gpu_memory_utilization_arg,
    gpu_share,
    stack_workloads,
)

Obj = dict[str, Any]

NAME_LABEL = "app.kubernetes.io/name"
POOL_LABEL = "cloud.google.com/gke-nodepool"
ACCEL_LABEL = "cloud.google.com/gke-accelerator"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
CPU_POOL = "default-pool"
GPU_POOL = "gpu-pool"
L4 = "nvidia-l4"

VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"
LITELLM_IMAGE = "ghcr.io/berriai/litellm:main-v1.74.9-stable"
OPENWEBUI_IMAGE = "ghcr.io/open-webui/open-webui:v0.6.18"
TABBY_IMAGE = "tabbyml/tabby:0.31.2"
CPU_IMAGES = (VLLM_IMAGE, LITELLM_IMAGE, OPENWEBUI_IMAGE, TABBY_IMAGE)  # already on the CPU node

EMBEDDINGS_SERVED = "bge-small-en-v1.5"
LITELLM_CONFIG = "litellm-config"
LITELLM_SECRET = "litellm-secrets"  # noqa: S105 (a name, not a value)


def generate_secrets() -> dict[str, str]:
    """Random values for the Secrets that exist at sim start.

    The upstream key LiteLLM sends to vLLM and vLLM's --api-key are the same shared key, as on the
    reference platform ("shared upstream key", created by the raw-vllm app).
    """
    upstream = "sk-up-" + _secrets.token_hex(16)
    return {"master_key": "sk-" + _secrets.token_hex(20), "upstream_key": upstream, "vllm_key": upstream}


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def parse_quantity(q: str | int | float | None) -> float:
    """Kubernetes quantity -> float (cpu in cores, memory in bytes)."""
    if q is None:
        return 0.0
    if isinstance(q, int | float):
        return float(q)
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", q)
    if not m:
        raise ValueError(f"invalid quantity {q!r}")
    num, suffix = float(m.group(1)), m.group(2)
    factors = {
        "": 1,
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 1024,
        "Mi": 1024**2,
        "Gi": 1024**3,
        "Ti": 1024**4,
    }
    if suffix not in factors:
        raise ValueError(f"invalid quantity {q!r}")
    return num * factors[suffix]


def gib(gb: float) -> str:
    return f"{gb:g}Gi" if float(gb).is_integer() else f"{round(gb * 1024)}Mi"


# ------------------------------------------------------------------ nodes
def _node(name: str, index: int, labels: dict[str, str], capacity: dict[str, str], taints: list[Obj]) -> Obj:
    return {
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/zone": "us-central1-a",
                **labels,
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": taints, "podCIDR": f"10.8.{index}.0/24", "providerID": f"gce://coder/us-central1-a/{name}"}
        if taints
        else {"podCIDR": f"10.8.{index}.0/24", "providerID": f"gce://coder/us-central1-a/{name}"},
        "status": {
            "capacity": dict(capacity),
            "allocatable": dict(capacity),
            "conditions": [],  # filled by the cluster when the node registers
            "addresses": [
                {"type": "InternalIP", "address": f"10.128.0.{index + 10}"},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": f"boot-{name}",
                "containerRuntimeVersion": "containerd://1.7.24",
                "kernelVersion": "6.6.56+",
                "kubeProxyVersion": "v1.32.2-gke.1000",
                "kubeletVersion": "v1.32.2-gke.1000",
                "machineID": f"machine-{name}",
                "operatingSystem": "linux",
                "osImage": "Container-Optimized OS from Google",
                "systemUUID": f"uuid-{name}",
            },
        },
    }


def cpu_node(name: str = "default-pool-1", index: int = 0) -> Obj:
    return _node(
        name,
        index,
        {POOL_LABEL: CPU_POOL, "node.kubernetes.io/instance-type": "e2-standard-4"},
        {"cpu": "4", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"},
        [],
    )


PHYSICAL_GPUS_PER_NODE = 1  # a g2-standard-4 carries one L4


def gpu_sharing_labels(spec: StackSpec) -> dict[str, str]:
    """The labels a time-sliced GPU node carries ({} when exclusive): GKE's time-sharing labels and the
    NVIDIA device plugin's (GPU feature discovery), with the GPU's memory in MiB."""
    share = gpu_share(spec)
    if not share.time_sliced:
        return {}
    return {
        "cloud.google.com/gke-gpu-sharing-strategy": "time-sharing",
        "cloud.google.com/gke-max-shared-clients-per-gpu": str(share.replicas),
        "nvidia.com/gpu.sharing-strategy": "time-slicing",
        "nvidia.com/gpu.replicas": str(share.replicas),
        "nvidia.com/gpu.memory": str(share.gpu_memory_mib),
    }


def gpu_node_template(spec: StackSpec) -> Obj:
    """What a node of the GPU pool looks like (the autoscaler's node template). Time-sliced (the spec's
    ``gpu_sharing``), it advertises replicas x its physical GPUs as ``nvidia.com/gpu`` and the sharing labels."""
    share = gpu_share(spec)
    gpus = PHYSICAL_GPUS_PER_NODE * (share.replicas if share.time_sliced else 1)
    return _node(
        "template",
        0,
        {
            POOL_LABEL: GPU_POOL,
            ACCEL_LABEL: L4,
            "node.kubernetes.io/instance-type": "g2-standard-4",
            **gpu_sharing_labels(spec),
        },
        {
            "cpu": "4",
            "memory": gib(spec.gpu_node_memory_gb),
            GPU_RESOURCE: str(gpus),
            "pods": "110",
            "ephemeral-storage": "100Gi",
        },
        [dict(GPU_TAINT)],
    )


def gpu_node(spec: StackSpec, name: str, index: int) -> Obj:
    node = gpu_node_template(spec)
    fresh = _node(name, index, {}, {}, [])
    node["metadata"]["name"] = name
    node["metadata"]["labels"]["kubernetes.io/hostname"] = name
    node["spec"]["podCIDR"] = fresh["spec"]["podCIDR"]
    node["spec"]["providerID"] = fresh["spec"]["providerID"]
    node["status"]["addresses"] = fresh["status"]["addresses"]
    node["status"]["nodeInfo"] = fresh["status"]["nodeInfo"]
    return node


# ------------------------------------------------------------------ workloads
def _deployment(
    namespace: str,
    name: str,
    replicas: int,
    pod_spec: Obj,
    *,
    recreate: bool = False,
    labels: dict | None = None,
    app_label: str | None = None,
) -> Obj:
    sel = {NAME_LABEL: app_label or name}
    strategy: Obj = (
        {"type": "Recreate"}
        if recreate
        else {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}
    )
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": {**sel, **(labels or {})}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(sel)},
            "strategy": strategy,
            "revisionHistoryLimit": 10,
            "progressDeadlineSeconds": 600,
            "template": {"metadata": {"labels": {**sel, **(labels or {})}}, "spec": pod_spec},
        },
    }


def _service(namespace: str, name: str, port: int, target: int | None = None, app_label: str | None = None) -> Obj:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": {NAME_LABEL: app_label or name}},
        "spec": {
            "type": "ClusterIP",
            "selector": {NAME_LABEL: app_label or name},
            "ports": [{"name": "http", "port": port, "targetPort": target or port, "protocol": "TCP"}],
        },
    }


def _secret_env(var: str, secret: str, key: str) -> Obj:
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def vllm_args(model: ModelSpec, gpu_memory_utilization: str = EXCLUSIVE_GPU_MEMORY_UTILIZATION) -> list[str]:
    args = [
        "--model",
        f"/models/{model.name}",
        "--served-model-name",
        model.served_model_name,
        "--api-key",
        "$(VLLM_API_KEY)",
        "--port",
        str(model.port),
        "--max-model-len",
        "16384",
        "--gpu-memory-utilization",
        gpu_memory_utilization,
    ]
    if model.role == "agent":
        args += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    return args


def model_deployment(spec: StackSpec, model: ModelSpec) -> Obj:
    ns = spec.serving_namespace
    vref = spec.vllm_key
    pod_spec = {
        "initContainers": [
            {
                "name": "stage-weights",
                "image": VLLM_IMAGE,
                "command": ["sh", "-c"],
                "args": [
                    f"test -f /models/{model.name}/config.json || "
                    f"huggingface-cli download --local-dir /models/{model.name} $(HF_REPO)"
                ],
                "env": [{"name": "HF_REPO", "value": f"Qwen/{model.served_model_name}"}],
                "volumeMounts": [{"name": "model-cache", "mountPath": "/models"}],
                "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
            }
        ],
        "containers": [
            {
                "name": "vllm",
                "image": VLLM_IMAGE,
                "args": vllm_args(model, gpu_memory_utilization_arg(spec, model)),
                "env": [
                    _secret_env("VLLM_API_KEY", vref.name, vref.key),
                    {"name": "HF_HUB_OFFLINE", "value": "1"},
                ],
                "ports": [{"name": "http", "containerPort": model.port, "protocol": "TCP"}],
                "resources": {
                    "limits": {GPU_RESOURCE: "1"},
                    "requests": {"cpu": "2", "memory": "8Gi", GPU_RESOURCE: "1"},
                },
                "readinessProbe": {
                    "httpGet": {"path": "/health", "port": model.port, "scheme": "HTTP"},
                    "periodSeconds": 5,
                    "failureThreshold": 3,
                    "timeoutSeconds": 1,
                    "successThreshold": 1,
                },
                "volumeMounts": [
                    {"name": "model-cache", "mountPath": "/models"},
                    {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108,
                ],
            }
        ],
        "nodeSelector": {ACCEL_LABEL: L4},
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        "volumes": [
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
        ],
    }
    # One GPU per pod: a rolling update would need a second GPU, so the model servers use Recreate.
    return _deployment(ns, model.name, 0, pod_spec, recreate=True, labels={"app.kubernetes.io/part-of": "coder-stack"})


def proxy_config(spec: StackSpec) -> str:
    model_list: list[Obj] = []
    for m in spec.models:
        if m.register_at_runtime:
            continue  # registered with /model/new (store_model_in_db)
        model_list.append(
            {
                "model_name": m.alias,
                "litellm_params": {
                    "model": f"openai/{m.served_model_name}",
                    "api_base": spec.model_incluster_url(m),
                    "api_key": "os.environ/UPSTREAM_API_KEY",
                    "input_cost_per_token": m.input_cost_per_token,
                    "output_cost_per_token": m.output_cost_per_token,
                },
            }
        )
    model_list.append(
        {
            "model_name": spec.embeddings_alias,
            "litellm_params": {
                "model": f"openai/{EMBEDDINGS_SERVED}",
                "api_base": spec.service_url(EMBEDDINGS_SERVICE, spec.gateway_namespace, EMBEDDINGS_PORT) + "/v1",
                "api_key": "os.environ/UPSTREAM_API_KEY",
                "input_cost_per_token": 2e-8,
                "output_cost_per_token": 0.0,
            },
            "model_info": {"mode": "embedding"},
        }
    )
    cfg = {
        "model_list": model_list,
        "general_settings": {
            "master_key": "os.environ/PROXY_MASTER_KEY",
            "database_url": "os.environ/DATABASE_URL",
            "store_model_in_db": True,
            "proxy_batch_write_at": 10,
        },
        "litellm_settings": {"drop_params": True, "request_timeout": 600},
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def litellm_deployment(spec: StackSpec) -> Obj:
    ns = spec.gateway_namespace
    mk = spec.master_key
    up = spec.upstream_key
    pod_spec = {
        "containers": [
            {
                "name": "litellm",
                "image": LITELLM_IMAGE,
                "args": ["--config", "/etc/litellm/proxy_config.yaml", "--port", str(spec.gateway_port)],
                "env": [
                    _secret_env("PROXY_MASTER_KEY", mk.name, mk.key),
                    _secret_env("LITELLM_MASTER_KEY", mk.name, mk.key),
                    _secret_env("UPSTREAM_API_KEY", up.name, up.key),
                    {"name": "DATABASE_URL", "value": f"postgresql://litellm@litellm-db-rw.{ns}.svc:5432/litellm"},
                    {"name": "STORE_MODEL_IN_DB", "value": "True"},
                    {"name": "PROXY_BATCH_WRITE_AT", "value": "10"},
                ],
                "ports": [{"name": "http", "containerPort": spec.gateway_port, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
                "readinessProbe": {
                    "httpGet": {"path": "/health/readiness", "port": spec.gateway_port},
                    "periodSeconds": 10,
                },
                "volumeMounts": [{"name": "config", "mountPath": "/etc/litellm", "readOnly": True}],
            }
        ],
        "volumes": [{"name": "config", "configMap": {"name": LITELLM_CONFIG}}],
    }
    return _deployment(ns, spec.gateway_service, 1, pod_spec)


def embeddings_deployment(spec: StackSpec) -> Obj:
    up = spec.upstream_key
    pod_spec = {
        "containers": [
            {
                "name": "embeddings",
                "image": VLLM_IMAGE,
                "args": [
                    "--model",
                    f"/models/{EMBEDDINGS_SERVED}",
                    "--served-model-name",
                    EMBEDDINGS_SERVED,
                    "--task",
                    "embed",
                    "--api-key",
                    "$(VLLM_API_KEY)",
                    "--port",
                    "8000",
                ],
                "env": [_secret_env("VLLM_API_KEY", up.name, up.key)],
                "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
                "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}, "periodSeconds": 5},
            }
        ]
    }
    return _deployment(spec.gateway_namespace, EMBEDDINGS_SERVICE, 1, pod_spec)


def openwebui_deployment(
    spec: StackSpec,
    name: str,
    gateway_local_url: str,
    app_label: str | None = None,
    *,
    persistent_config: str | None = "False",
    secret_via_env_from: bool = False,
) -> Obj:
    """Open WebUI reading its OpenAI connection and session secret from ``spec.openwebui_secret``.

    ``persistent_config``: the ``ENABLE_PERSISTENT_CONFIG`` env value; the default ``"False"`` makes the
    environment win, so a re-minted key reaches the app. ``None`` leaves it out: Open WebUI's own default
    (persistence on), where the connection stored at the first launch wins over the environment.
    ``secret_via_env_from``: load the whole Secret with ``envFrom`` instead of one ``secretKeyRef`` per key.
    """
    sec = spec.openwebui_secret
    env: list[Obj] = [{"name": "OPENAI_API_BASE_URL", "value": gateway_local_url.rstrip("/") + "/v1"}]
    if not secret_via_env_from:
        env += [
            _secret_env("OPENAI_API_KEY", sec, "OPENAI_API_KEY"),
            _secret_env("WEBUI_SECRET_KEY", sec, "WEBUI_SECRET_KEY"),
        ]
    env.append({"name": "ENABLE_OLLAMA_API", "value": "False"})
    if persistent_config is not None:
        env.append({"name": "ENABLE_PERSISTENT_CONFIG", "value": persistent_config})
    env.append({"name": "PORT", "value": "8080"})
    container: Obj = {
        "name": "open-webui",
        "image": OPENWEBUI_IMAGE,
        "env": env,
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}},
        "readinessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
    }
    if secret_via_env_from:
        container["envFrom"] = [{"secretRef": {"name": sec}}]
    return _deployment(spec.experience_namespace, name, 0, {"containers": [container]}, app_label=app_label)


def tabby_deployment(spec: StackSpec, name: str, app_label: str | None = None) -> Obj:
    pod_spec = {
        "containers": [
            {
                "name": "tabby",
                "image": TABBY_IMAGE,
                "args": ["serve", "--port", "8080"],
                "env": [
                    {"name": "TABBY_ROOT", "value": "/data"},
                    {"name": "TABBY_DISABLE_USAGE_COLLECTION", "value": "1"},
                ],
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}},
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 10},
                "volumeMounts": [{"name": "config", "mountPath": "/data", "readOnly": True}],
            }
        ],
        "volumes": [{"name": "config", "secret": {"secretName": spec.tabby_config_secret}}],
    }
    return _deployment(spec.experience_namespace, name, 0, pod_spec, app_label=app_label)


def _secret(namespace: str, name: str, data: dict[str, str]) -> Obj:
    return {
        "metadata": {"name": name, "namespace": namespace},
        "type": "Opaque",
        "data": {k: b64(v) for k, v in data.items()},
    }


def reference_objects(spec: StackSpec, secrets: dict[str, str], gateway_local_url: str) -> list[tuple[str, Obj]]:
    """Namespaces, Secrets, ConfigMaps, Services and Deployments (nodes come from the cluster)."""
    out: list[tuple[str, Obj]] = []
    for ns in dict.fromkeys(
        [spec.serving_namespace, spec.gateway_namespace, spec.experience_namespace, "default", "kube-system"]
    ):
        out.append(("namespaces", {"metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}}))
        out.append(("serviceaccounts", {"metadata": {"name": "default", "namespace": ns}}))
    # Secrets: the master/upstream keys may share one Secret (the default: litellm-secrets).
    by_secret: dict[tuple[str, str], dict[str, str]] = {}
    for ref, value in (
        (spec.master_key, secrets["master_key"]),
        (spec.upstream_key, secrets["upstream_key"]),
        (spec.vllm_key, secrets["vllm_key"]),
    ):
        by_secret.setdefault((ref.namespace, ref.name), {})[ref.key] = value
    for (ns, name), data in by_secret.items():
        out.append(("secrets", _secret(ns, name, data)))
    gw = spec.gateway_namespace
    out.append(
        (
            "configmaps",
            {"metadata": {"name": LITELLM_CONFIG, "namespace": gw}, "data": {"proxy_config.yaml": proxy_config(spec)}},
        )
    )
    workloads = stack_workloads(spec)
    for w in workloads:
        out.append(("services", _service(w.namespace, w.name, w.port, app_label=w.app_label)))
    models = {m.name: m for m in spec.models}
    frontends = {fe.name: fe for fe in spec.frontends}
    for w in workloads:
        if w.kind == "gateway":
            out.append(("deployments", litellm_deployment(spec)))
        elif w.kind == "embeddings":
            out.append(("deployments", embeddings_deployment(spec)))
        elif w.kind == "model":
            out.append(("deployments", model_deployment(spec, models[w.name])))
        elif frontends[w.name].app == "tabby":
            out.append(("deployments", tabby_deployment(spec, w.name, w.app_label)))
        else:
            out.append(("deployments", openwebui_deployment(spec, w.name, gateway_local_url, w.app_label)))
    return out
