"""The check before anything is scaled: namespaces and Deployments exist, each model fits the GPU node's
host RAM (machine type advice), in time-sliced mode the models' shares fit the GPU and the cluster advertises
time-slicing, and which GPU models are active now.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.errors import Forbidden, NotFound, PreflightError
from coder_stack.kubernetes.client import API_TIMEOUT, api_errors
from coder_stack.kubernetes.pods import list_pods
from coder_stack.kubernetes.workloads import deployment_replicas
from coder_stack.spec import SELECTOR_KEY, ShareVerdict, StackSpec

GPU_RESOURCE = "nvidia.com/gpu"
# GCP G2 machine types (one L4) by host RAM: the memory caps the model size (weights staged through RAM).
G2_BY_MEMORY_GB: tuple[tuple[int, str], ...] = (
    (16, "g2-standard-4"),
    (32, "g2-standard-8"),
    (64, "g2-standard-16"),
    (128, "g2-standard-32"),
)


# What a time-sliced GPU node advertises: GKE's time-sharing labels and the NVIDIA device plugin's (GPU feature
# discovery) labels. Its nvidia.com/gpu capacity is then replicas x physical GPUs.
GKE_SHARING_STRATEGY = "cloud.google.com/gke-gpu-sharing-strategy"  # "time-sharing"
GKE_MAX_SHARED_CLIENTS = "cloud.google.com/gke-max-shared-clients-per-gpu"  # "<replicas>"
NVIDIA_SHARING_STRATEGY = "nvidia.com/gpu.sharing-strategy"  # "time-slicing"
NVIDIA_REPLICAS = "nvidia.com/gpu.replicas"  # "<replicas>"
NVIDIA_GPU_MEMORY_MIB = "nvidia.com/gpu.memory"  # "<MiB>" of one GPU
TIME_SLICED = {GKE_SHARING_STRATEGY: "time-sharing", NVIDIA_SHARING_STRATEGY: "time-slicing"}


def time_slicing_advice(replicas: int) -> str:
    """What to configure so a GPU node pool is time-sliced with ``replicas`` per GPU (GKE, or the device plugin)."""
    return (
        "GKE: a GPU node pool created with `--accelerator type=TYPE,count=N,gpu-sharing-strategy=time-sharing,"
        f"max-shared-clients-per-gpu={replicas}`; the NVIDIA device plugin: its config `sharing: {{timeSlicing: "
        f"{{resources: [{{name: nvidia.com/gpu, replicas: {replicas}}}]}}}}`; or set gpu_sharing.mode: exclusive"
    )


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def parse_memory_gb(quantity: str) -> float:
    """A Kubernetes memory quantity in GB, binary units counted as GB ("16Gi" -> 16.0) as machine types are."""
    q = str(quantity).strip()
    units = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "Pi": 2**50,
        "k": 10**3,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
        "P": 10**15,
    }
    for suffix in sorted(units, key=len, reverse=True):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * units[suffix] / 2**30
    if q.endswith("m"):
        return float(q[:-1]) / 1000 / 2**30
    return float(q) / 2**30


def node_size_for(need_gb: float) -> str:
    for gb, machine in G2_BY_MEMORY_GB:
        if need_gb <= gb:
            return f"{machine} ({gb} GB)"
    return f"a node with more than {G2_BY_MEMORY_GB[-1][0]} GB of RAM"


class ModelFit(_Report):
    name: str = Field(description="Model deployment name.")
    weights_gb: float = Field(ge=0, description="Size of the weights.")
    need_gb: float = Field(ge=0, description="Weights plus vLLM's host-RAM overhead.")
    node_memory_gb: float = Field(ge=0, description="Host RAM of the GPU node.")
    fits: bool = Field(description="need_gb <= node_memory_gb.")


class ActiveModel(_Report):
    name: str = Field(description="Model deployment name.")
    replicas: int = Field(ge=0, description="spec.replicas.")
    ready_replicas: int = Field(ge=0, description="status.readyReplicas.")


class GpuNode(_Report):
    name: str = Field(description="Node name.")
    gpus: int = Field(ge=0, description="Its nvidia.com/gpu capacity (replicas x physical GPUs when time-sliced).")
    time_sliced: bool = Field(description="A GKE or device-plugin label says its GPUs are time-sliced.")
    replicas: int | None = Field(None, description="Time-slicing replicas per GPU its labels advertise.")
    gpu_memory_gb: float | None = Field(None, description="One GPU's memory from its nvidia.com/gpu.memory label.")


class SharingReport(_Report):
    """The time-sliced mode's part of the preflight (absent in exclusive mode)."""

    nodes: list[GpuNode] = Field(description="The GPU nodes and what each advertises.")
    cluster_checked: bool = Field(description="GPU nodes were seen, so time-slicing was checked on the cluster.")
    gpu_memory_gb: float = Field(ge=0, description="One GPU's memory the shares were planned against.")
    gpu_memory_source: str = Field(description="Where gpu_memory_gb came from: nodes or spec.")
    together: list[ShareVerdict] = Field(
        description="The models asked for, planned together on one GPU; or each model alone when none were named."
    )


class PreflightReport(_Report):
    namespaces: list[str] = Field(description="Namespaces that exist.")
    deployments: list[str] = Field(description="Deployments checked (namespace/name).")
    gpu_nodes: list[str] = Field(description="Nodes with nvidia.com/gpu capacity.")
    gpu_node_memory_gb: float = Field(ge=0, description="Host RAM of the smallest GPU node (or the spec's value).")
    memory_source: str = Field(description="Where gpu_node_memory_gb came from: nodes or spec.")
    models: list[ModelFit] = Field(description="Each requested model against the node memory.")
    active_models: list[ActiveModel] = Field(description="GPU models with replicas > 0 right now.")
    notes: list[str] = Field(default_factory=list, description="Anything the operator should know.")
    sharing: SharingReport | None = Field(None, description="Time-sliced mode: the GPU's shares; None if exclusive.")


async def preflight(api: ApiClient, spec: StackSpec, models: list[str] | None = None) -> PreflightReport:
    """Check before anything is scaled: namespaces and Deployments exist, each model fits the GPU node's RAM.

    ``models`` limits the fit check to those model names (default: all of the spec's models).
    In time-sliced mode (``spec.gpu_sharing``) the named models are planned together on one GPU (each model
    alone when none are named): their shares must fit the card, each share its weights plus the least KV cache,
    and when two or more would share it the cluster's GPU nodes must advertise time-slicing with enough replicas.
    Reports which GPU models have replicas > 0 now, for take-over decisions.
    """
    core = client.CoreV1Api(api)
    apps = client.AppsV1Api(api)
    notes: list[str] = []
    missing: list[str] = []
    namespaces = [spec.serving_namespace, spec.gateway_namespace, spec.experience_namespace]
    present_ns: list[str] = []
    for ns in dict.fromkeys(namespaces):
        try:
            with api_errors("get", "namespaces", None, ns):
                await core.read_namespace(ns, _request_timeout=API_TIMEOUT)
            present_ns.append(ns)
        except NotFound:
            missing.append(f"namespace {ns}")
    wanted = [(spec.serving_namespace, m.name) for m in spec.models] + [
        (spec.experience_namespace, f.name) for f in spec.frontends
    ]
    deployments: dict[tuple[str, str], client.V1Deployment] = {}
    for ns in dict.fromkeys(ns for ns, _ in wanted):
        if ns not in present_ns:
            continue
        with api_errors("list", "deployments", ns):
            deps = await apps.list_namespaced_deployment(ns, _request_timeout=API_TIMEOUT)
        for d in deps.items or []:
            deployments[(ns, d.metadata.name)] = d
    for ns, name in wanted:
        if ns in present_ns and (ns, name) not in deployments:
            missing.append(f"deployment {ns}/{name}")
    if missing:
        raise NotFound(
            f"the cluster lacks what the stack needs: {', '.join(missing)}. Sync the platform's apps "
            "(coder-chat, coder-fim, coder-agent, open-webui, tabby) or fix the stack spec's names; nothing was changed"
        )

    gpu_nodes: list[str] = []
    gpu_node_details: list[GpuNode] = []
    nodes_listed = False
    memory = spec.gpu_node_memory_gb
    source = "spec"
    try:
        with api_errors("list", "nodes"):
            nodes = await core.list_node(_request_timeout=API_TIMEOUT)
        nodes_listed = True
        mems = []
        for n in nodes.items or []:
            cap = (n.status.capacity if n.status else None) or {}
            gpus = gpu_capacity(n)
            if gpus > 0:
                gpu_nodes.append(n.metadata.name)
                gpu_node_details.append(gpu_node(n.metadata.name, gpus, n.metadata.labels or {}))
                if cap.get("memory"):
                    mems.append(parse_memory_gb(cap["memory"]))
        if mems:
            memory = round(min(mems), 2)
            source = "nodes"
        else:
            notes.append(f"no GPU node exists now (autoscaled pool at 0?): using spec.gpu_node_memory_gb={memory:g} GB")
    except Forbidden:
        notes.append(f"not allowed to list nodes: using spec.gpu_node_memory_gb={memory:g} GB")

    names = models if models is not None else [m.name for m in spec.models]
    fits = []
    for model_name in names:
        m = spec.model(model_name)
        need = m.weights_gb + spec.host_ram_overhead_gb
        fits.append(
            ModelFit(name=m.name, weights_gb=m.weights_gb, need_gb=need, node_memory_gb=memory, fits=need <= memory)
        )
    too_big = [f for f in fits if not f.fits]
    if too_big:
        f = too_big[0]
        raise PreflightError(
            f"model {f.name} needs {f.need_gb:g} GB of host RAM ({f.weights_gb:g} GB weights + "
            f"{spec.host_ram_overhead_gb:g} GB vLLM overhead) but the GPU node has {memory:g} GB ({source}); "
            "vLLM stages weights through host RAM, so it would be OOMKilled while loading. Use a smaller model or "
            f"a GPU node pool of {node_size_for(f.need_gb)}; nothing was changed"
            + (f" (also too big: {', '.join(x.name for x in too_big[1:])})" if len(too_big) > 1 else "")
        )

    sharing = (
        _check_sharing(spec, models, gpu_node_details, nodes_listed, notes)
        if spec.gpu_sharing.mode == "time-sliced"
        else None
    )

    active = []
    for m in spec.models:
        d = deployments[(spec.serving_namespace, m.name)]
        replicas = int(d.spec.replicas or 0) if d.spec else 0
        if replicas > 0:
            st = d.status or client.V1DeploymentStatus()
            active.append(ActiveModel(name=m.name, replicas=replicas, ready_replicas=int(st.ready_replicas or 0)))
    return PreflightReport(
        namespaces=present_ns,
        deployments=[f"{ns}/{n}" for ns, n in wanted],
        gpu_nodes=gpu_nodes,
        gpu_node_memory_gb=memory,
        memory_source=source,
        models=fits,
        active_models=active,
        notes=notes,
        sharing=sharing,
    )


def _label_int(labels: dict[str, str], key: str) -> int | None:
    try:
        return int(str(labels[key]))
    except (KeyError, ValueError):
        return None


def gpu_capacity(node: client.V1Node) -> int:
    """A node's ``nvidia.com/gpu`` capacity (time-sliced: replicas x GPUs); 0 when it has none or an unreadable one."""
    cap = (node.status.capacity if node.status else None) or {}
    try:
        return int(str(cap.get(GPU_RESOURCE, "0")))
    except ValueError:
        return 0


def gpu_node(name: str, gpus: int, labels: dict[str, str]) -> GpuNode:
    """What one GPU node advertises about sharing: GKE's labels first, then the device plugin's."""
    time_sliced = any(labels.get(k) == v for k, v in TIME_SLICED.items())
    replicas = None
    if time_sliced:
        replicas = _label_int(labels, GKE_MAX_SHARED_CLIENTS) or _label_int(labels, NVIDIA_REPLICAS)
    mib = _label_int(labels, NVIDIA_GPU_MEMORY_MIB)
    return GpuNode(
        name=name,
        gpus=gpus,
        time_sliced=time_sliced,
        replicas=replicas,
        gpu_memory_gb=round(mib / 1024, 2) if mib else None,
    )


def _check_sharing(
    spec: StackSpec, models: list[str] | None, nodes: list[GpuNode], nodes_listed: bool, notes: list[str]
) -> SharingReport:
    """Time-sliced mode: refuse (PreflightError) a combination that does not fit one GPU, or that the cluster's GPU
    nodes cannot run together because none advertises time-slicing (or too few replicas); notes otherwise."""
    sharing = spec.gpu_sharing
    sliced = [n for n in nodes if n.time_sliced]
    # One GPU's memory: the smallest a time-sliced node's label gives (the device plugin's GPU feature discovery
    # sets it; GKE's own labels do not), else the spec's.
    labelled = [n.gpu_memory_gb for n in (sliced or nodes) if n.gpu_memory_gb]
    card, card_source = (min(labelled), "nodes") if labelled else (sharing.gpu_memory_gb, "spec")
    if labelled and abs(card - sharing.gpu_memory_gb) >= 0.01:
        notes.append(
            f"the GPU nodes' nvidia.com/gpu.memory label says {card:g} GB per GPU, the spec's "
            f"gpu_sharing.gpu_memory_gb {sharing.gpu_memory_gb:g} GB: planned with {card:g} GB"
        )
    advertised = [n.replicas for n in sliced if n.replicas]
    replicas = min(advertised) if advertised else None
    if replicas is not None and replicas != sharing.replicas:
        notes.append(
            f"the GPU nodes advertise {replicas} time-slicing replicas per GPU, the spec's gpu_sharing.replicas is "
            f"{sharing.replicas}: planned with {replicas}; set gpu_sharing.replicas: {replicas} to match"
        )
    groups = [models] if models is not None else [[m.name] for m in spec.models]
    verdicts = [spec.shares_fit(g, gpu_memory_gb=card, replicas=replicas) for g in groups]
    memory_from = (
        f"the nodes' {NVIDIA_GPU_MEMORY_MIB} label" if card_source == "nodes" else "spec gpu_sharing.gpu_memory_gb"
    )
    for v in verdicts:
        if not v.fits:
            # what to do first: a long list of models must not push it past the message's length limit
            raise PreflightError(
                f"{' and '.join(m.name for m in v.models)} cannot share one GPU; nothing was changed: "
                + "; ".join(v.problems())
                + f". The numbers (GPU memory from {memory_from}): {v.summary()}"
            )

    widest = max(verdicts, key=lambda v: len(v.models))
    names = " and ".join(m.name for m in widest.models)
    need = max(sharing.replicas, len(widest.models))
    if not nodes_listed:
        notes.append("not allowed to list nodes: could not check that the GPU nodes advertise time-slicing")
    elif not nodes:
        notes.append(
            "no GPU node exists now (autoscaled pool at 0?), so whether the pool is time-sliced cannot be seen: the "
            "Kubernetes API shows a node pool's labels only on its nodes. Check the pool's accelerator "
            "gpuSharingConfig (gcloud container node-pools describe) or the device plugin's config; if it is not "
            f"time-sliced: {time_slicing_advice(need)}"
        )
    elif not sliced:
        seen = ", ".join(f"{n.name} ({GPU_RESOURCE}={n.gpus})" for n in nodes)
        message = (
            f"gpu_sharing.mode is time-sliced but no GPU node advertises time-slicing (no {GKE_SHARING_STRATEGY}="
            f"time-sharing or {NVIDIA_SHARING_STRATEGY}=time-slicing label on {seen})"
        )
        if len(widest.models) > 1:
            raise PreflightError(
                f"{message}, so {names} cannot share a GPU: one would stay Pending (or the autoscaler would add a "
                f"GPU node). To share it: {time_slicing_advice(need)}; nothing was changed"
            )
        notes.append(f"{message}: {names} runs alone on a GPU. To share it: {time_slicing_advice(need)}")
    return SharingReport(
        nodes=nodes,
        cluster_checked=bool(nodes),
        gpu_memory_gb=card,
        gpu_memory_source=card_source,
        together=verdicts,
    )


class ModelOnGpu(_Report):
    name: str = Field(description="The GPU model's Deployment.")
    replicas: int = Field(description="Its spec.replicas now.")
    pods: list[str] = Field(description="Its pods that still exist, terminating ones included.")


async def models_on_gpu(api: ApiClient, spec: StackSpec, keep: str | Collection[str] | None = None) -> list[ModelOnGpu]:
    """The GPU models other than ``keep`` (a name or several) that hold or will hold a GPU: replicas > 0, or a
    pod still there (a terminating pod still holds its GPU memory).

    The check inside a GPU session, between the grant and the next model's scale-up: what ``preflight``
    already checked (namespaces, Deployments, node RAM) is not read again. One Deployment list and one
    pod list for all the models, at once. A Deployment missing now was deleted since the preflight: NotFound.
    """
    ns = spec.serving_namespace
    kept = {keep} if isinstance(keep, str) else set(keep or ())
    models = [m for m in spec.models if m.name not in kept]

    async def pods() -> dict[str, list[str]]:
        # one list for every model: each model's selector is SELECTOR_KEY=<its name>
        names = ",".join(m.name for m in models)
        by_model: dict[str, list[str]] = {}
        for p in await list_pods(api, ns, f"{SELECTOR_KEY} in ({names})"):
            by_model.setdefault((p.metadata.labels or {}).get(SELECTOR_KEY, ""), []).append(p.metadata.name)
        return by_model

    if not models:
        return []
    replicas_of, pods_of = await asyncio.gather(deployment_replicas(api, ns), pods())
    missing = [m.name for m in models if m.name not in replicas_of]
    if missing:
        raise NotFound(
            f"deployment(s) {', '.join(f'{ns}/{n}' for n in missing)} vanished during the run; sync the platform's "
            "apps and run again; nothing was scaled"
        )
    out = []
    for m in models:
        replicas = replicas_of[m.name]
        ps = pods_of.get(m.name, [])
        if replicas > 0 or ps:
            out.append(ModelOnGpu(name=m.name, replicas=replicas, pods=ps))
    return out


__all__ = [
    "G2_BY_MEMORY_GB",
    "GKE_MAX_SHARED_CLIENTS",
    "GKE_SHARING_STRATEGY",
    "GPU_RESOURCE",
    "NVIDIA_GPU_MEMORY_MIB",
    "NVIDIA_REPLICAS",
    "NVIDIA_SHARING_STRATEGY",
    "ActiveModel",
    "GpuNode",
    "ModelFit",
    "ModelOnGpu",
    "PreflightReport",
    "SharingReport",
    "gpu_capacity",
    "gpu_node",
    "models_on_gpu",
    "node_size_for",
    "parse_memory_gb",
    "preflight",
    "time_slicing_advice",
]
