"""One pydantic model of the stack.

Its defaults are the runbook's reference deployment, so a user of that platform needs no file at all.
The spec names *where* secrets live (namespace/name/key), never their values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError, model_validator

from coder_stack.errors import SpecError

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
Name = Annotated[str, Field(pattern=DNS_LABEL, min_length=1, max_length=63)]
# The label a model's and a front-end's pods are selected by (value: the model's name, a front-end's selector_name).
SELECTOR_KEY = "app.kubernetes.io/name"
KeyName = Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]+$", min_length=1, max_length=253)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AccessMode(StrEnum):
    """How the flows reach Services inside the cluster."""

    IN_CLUSTER = "in-cluster"
    PORT_FORWARD = "port-forward"


class SecretRef(_Model):
    namespace: Name = Field(description="Namespace of the Secret.")
    name: Name = Field(description="Name of the Secret.")
    key: KeyName = Field(description="Key inside the Secret's data.")


class PhaseBudgets(_Model):
    """Seconds each phase of a cold start may take. Their sum is the whole readiness budget."""

    node: float = Field(300.0, ge=1, le=7200, description="Waiting for a node: scheduling, GPU node scale-up.")
    image: float = Field(420.0, ge=1, le=7200, description="Pulling the container image (~10 GB for vLLM).")
    weights: float = Field(300.0, ge=1, le=7200, description="Init container staging the weights.")
    start: float = Field(180.0, ge=1, le=7200, description="vLLM loading the model until the pod is Ready.")

    @property
    def total(self) -> float:
        return self.node + self.image + self.weights + self.start


class ModelSpec(_Model):
    name: Name = Field(description="Deployment and Service name in the serving namespace.")
    role: Literal["chat", "fim", "agent"] = Field(description="What the model is smoked for.")
    served_model_name: str = Field(
        min_length=1, max_length=200, description="vLLM --served-model-name (the id in /v1/models)."
    )
    alias: str = Field(min_length=1, max_length=200, description="Tenant-facing model_name in the LiteLLM gateway.")
    weights_gb: float = Field(gt=0, le=2000, description="Size of the weights, staged through host RAM.")
    port: int = Field(8000, ge=1, le=65535, description="Service and container port of the vLLM server.")
    budgets: PhaseBudgets = Field(default_factory=PhaseBudgets, description="Cold-start budget per phase.")
    register_at_runtime: bool = Field(
        False, description="Register this alias in LiteLLM with /model/new (not in the gateway's values)."
    )
    input_cost_per_token: float = Field(
        5e-7, ge=0, le=1, description="USD per prompt token, used when registering at runtime."
    )
    output_cost_per_token: float = Field(
        1.5e-6, ge=0, le=1, description="USD per completion token, used when registering at runtime."
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="vLLM --gpu-memory-utilization: the share of one GPU's memory this model's server takes (weights, "
        "activations and KV cache). Planned by the preflight when gpu_sharing.mode is time-sliced (the shares of the "
        "models that run together must add up to at most 1); in exclusive mode the model has the whole GPU and "
        "this is not read.",
    )

    @property
    def selector(self) -> str:
        return f"{SELECTOR_KEY}={self.name}"


class ClientKeySpec(_Model):
    """A budgeted, model-scoped LiteLLM virtual key for one client."""

    alias: Name = Field(description="LiteLLM key_alias; globally unique in the gateway.")
    models: list[str] = Field(min_length=1, max_length=50, description="Gateway aliases the key may call.")
    max_budget: float = Field(5.0, gt=0, le=100000, description="USD the key may spend per budget period.")
    budget_duration: str = Field(
        "30d", pattern=r"^[1-9][0-9]*[smhd]$", description="Budget reset period, e.g. 30d, 12h."
    )
    deliver_to: KeyDestination = Field(
        "keystore",
        description="Where the key lives: Open WebUI's Secret, Tabby's config, or the stack's keystore Secret.",
    )


FrontendApp = Literal["open-webui", "tabby"]
FRONTEND_APPS: tuple[FrontendApp, ...] = ("open-webui", "tabby")


class FrontendSpec(_Model):
    name: Name = Field(description="Deployment name in the experience namespace.")
    app: FrontendApp = Field(
        description="The app the Deployment runs: open-webui or tabby (defaults to the name when it is one of them)."
    )
    selector_name: Name | None = Field(None, description="app.kubernetes.io/name label; defaults to name.")

    @model_validator(mode="before")
    @classmethod
    def _app_from_name(cls, data: object) -> object:
        if isinstance(data, dict) and "app" not in data and data.get("name") in FRONTEND_APPS:
            return {**data, "app": data["name"]}
        return data

    @property
    def selector(self) -> str:
        return f"{SELECTOR_KEY}={self.selector_name or self.name}"


KeyDestination = Literal["openwebui-secrets", "tabby-config", "keystore"]
OPENWEBUI_KEY = "OPENAI_API_KEY"  # Open WebUI's key, in its Secret
OPENWEBUI_SESSION_KEY = "WEBUI_SECRET_KEY"  # signs Open WebUI's user sessions: generated once, never replaced
TABBY_CONFIG_KEY = "config.toml"  # Tabby's whole config file, in its Secret
CONSUMER_OF: dict[KeyDestination, FrontendApp] = {"openwebui-secrets": "open-webui", "tabby-config": "tabby"}


@dataclass(frozen=True)
class KeyHome:
    """Where a client's key lives and which Deployment reads it (restarted when it changes)."""

    namespace: str
    secret: str
    data_key: str
    consumer: str | None
    consumer_namespace: str

    @property
    def where(self) -> str:
        return f"{self.namespace}/{self.secret}:{self.data_key}"


class EndpointOverrides(_Model):
    """Explicit URLs that win over the access mode, e.g. a gateway behind an ingress."""

    gateway: AnyHttpUrl | None = Field(None, description="Base URL of LiteLLM, without /v1.")
    models: dict[str, AnyHttpUrl] = Field(
        default_factory=dict, description="Base URL (without /v1) per model deployment name."
    )


class AccessSpec(_Model):
    mode: AccessMode = Field(AccessMode.PORT_FORWARD, description="How Services are reached.")
    overrides: EndpointOverrides = Field(default_factory=EndpointOverrides, description="URL overrides.")
    cluster_domain: str = Field("cluster.local", min_length=1, max_length=253, description="Cluster DNS.")


class Timeouts(_Model):
    connect_s: float = Field(5.0, gt=0, le=120, description="HTTP connect timeout.")
    request_s: float = Field(60.0, gt=0, le=3600, description="HTTP read timeout for one request.")
    deletion_s: float = Field(120.0, gt=0, le=3600, description="Scale-to-0: until the pods are gone.")
    frontend_ready_s: float = Field(300.0, gt=0, le=3600, description="Open WebUI / Tabby Ready.")
    spend_visible_s: float = Field(30.0, ge=0, le=600, description="Wait for LiteLLM's batched spend write.")
    gpu_limit_s: float = Field(
        3600.0, gt=0, le=86400, description="How long a flow queues for the GPU limit before giving up."
    )


def _default_models() -> list[ModelSpec]:
    return [
        ModelSpec(
            name="coder-chat",
            role="chat",
            served_model_name="qwen2.5-coder-7b-instruct",
            alias="coder-chat",
            weights_gb=5.5,
            budgets=PhaseBudgets(node=300, image=420, weights=300, start=180),  # 1200 s
        ),
        ModelSpec(
            name="coder-fim",
            role="fim",
            served_model_name="qwen2.5-coder-1.5b",
            alias="coder-fim",
            weights_gb=3.1,
            # 600 s in all, as the runbook; a cold GPU node (~4 min) and image pull (~4 min) still fit.
            budgets=PhaseBudgets(node=240, image=240, weights=90, start=30),
        ),
        ModelSpec(
            name="coder-agent",
            role="agent",
            served_model_name="qwen2.5-coder-14b-instruct",
            alias="coder-agent",
            weights_gb=9.5,
            register_at_runtime=True,
            budgets=PhaseBudgets(node=300, image=420, weights=300, start=180),  # 1200 s
        ),
    ]


def _default_keys() -> list[ClientKeySpec]:
    return [
        ClientKeySpec(
            alias="open-webui", models=["coder-chat", "coder-fim", "embeddings"], deliver_to="openwebui-secrets"
        ),
        ClientKeySpec(alias="tabby", models=["coder-fim", "embeddings"], deliver_to="tabby-config"),
        ClientKeySpec(alias="coder-agent", models=["coder-agent"], deliver_to="keystore"),
    ]


class WakeSpec(_Model):
    """Wake on demand: what the LiteLLM callback (``coder-stack wake-setup``) and the ``wake_model`` flow do when a
    request names a model that is not serving."""

    enabled: bool = Field(
        True,
        description="A request for a model that is down asks for it (one wake per burst); false: the callback lets "
        "every request pass as if it were not installed (a ConfigMap update, no gateway restart).",
    )
    chat_as_message: bool = Field(
        False,
        description="Answer a chat request for a model that is starting with an assistant message saying so (Open "
        "WebUI shows it in the conversation) instead of a 503. Never for FIM: Tabby gets a fast 503.",
    )
    hold_s: float = Field(
        20.0, ge=0, le=300, description="Hold a request (at most this long) when its model is this close to Ready."
    )
    burst_s: float = Field(
        120.0, ge=1, le=3600, description="One wake request per model per this many seconds, however many requests."
    )
    cache_s: float = Field(
        5.0, ge=0.1, le=300, description="How long the callback trusts that a model is serving before it looks again."
    )
    wait_for_gpu_s: float = Field(
        14400.0,
        ge=0,
        le=86400,
        description="How long a wake waits for the GPU while another model is in use (it is never evicted).",
    )
    fallbacks: dict[str, str] = Field(
        default_factory=dict,
        description="Gateway alias -> an alias to answer with while the model is down (a smaller or hosted model).",
    )
    prefect_api_url: AnyHttpUrl | None = Field(
        None,
        description="The Prefect API as the LiteLLM pod reaches it (with /api); empty: the URL `wake-setup` is given.",
    )


class GpuSharing(_Model):
    """How models share a GPU: ``exclusive`` (each model asks for a whole ``nvidia.com/gpu`` and has the card to
    itself; today's behaviour) or ``time-sliced`` (the cluster advertises each physical GPU as ``replicas``
    ``nvidia.com/gpu`` and models run on one card together, each in the share of its memory set by its
    ``gpu_memory_utilization``)."""

    mode: Literal["exclusive", "time-sliced"] = Field(
        "exclusive",
        description="exclusive: one model per GPU (the default); time-sliced: models share a GPU when their "
        "gpu_memory_utilization shares fit its memory (the GPU node pool must be time-shared: GKE "
        "gpu-sharing-strategy=time-sharing, or the NVIDIA device plugin's sharing.timeSlicing).",
    )
    gpu_memory_gb: float = Field(
        24.0,
        gt=0,
        le=1024,
        description="Memory of one physical GPU in GB (an L4: 24). The preflight uses the nodes' "
        "nvidia.com/gpu.memory label instead when a GPU node has it.",
    )
    replicas: int = Field(
        2,
        ge=1,
        le=256,
        description="Time-slicing replicas per physical GPU the cluster advertises (GKE max-shared-clients-per-gpu, "
        "the device plugin's replicas): at most this many models share one GPU.",
    )
    min_kv_cache_gb: float = Field(
        1.0,
        ge=0,
        le=1024,
        description="The least KV cache, in GB, a model's share must hold beside its weights for vLLM to serve it.",
    )

    @model_validator(mode="after")
    def _time_sliced_needs_replicas(self) -> GpuSharing:
        if self.mode == "time-sliced" and self.replicas < 2:
            raise ValueError(
                f"gpu_sharing.replicas is {self.replicas} but time-slicing needs at least 2 replicas per GPU (one "
                "per model that shares it): set gpu_sharing.replicas to the number the cluster advertises (GKE "
                "max-shared-clients-per-gpu, the device plugin's replicas), or gpu_sharing.mode: exclusive"
            )
        return self


class ModelShare(_Model):
    """One model's share of a GPU, as :meth:`StackSpec.shares_fit` plans it."""

    name: str = Field(description="Model deployment name.")
    utilization: float = Field(description="Its gpu_memory_utilization (1.0 in exclusive mode: the whole GPU).")
    share_gb: float = Field(description="utilization x the GPU's memory, in GB.")
    weights_gb: float = Field(description="Size of its weights.")
    kv_cache_gb: float = Field(description="The least KV cache it needs (gpu_sharing.min_kv_cache_gb).")
    need_gb: float = Field(description="weights_gb + kv_cache_gb.")
    fits: bool = Field(description="need_gb <= share_gb.")

    def line(self, gpu_memory_gb: float) -> str:
        return f"{self.name} {self.utilization:g} x {gpu_memory_gb:g} GB = {self.share_gb:g} GB"

    def need_line(self) -> str:
        sign = "<=" if self.fits else ">"
        return (
            f"{self.name} needs {self.weights_gb:g} GB of weights + {self.kv_cache_gb:g} GB of KV cache = "
            f"{self.need_gb:g} GB {sign} its {self.share_gb:g} GB"
        )


class ShareVerdict(_Model):
    """Whether models fit one GPU together, with the numbers (:meth:`StackSpec.shares_fit`)."""

    mode: Literal["exclusive", "time-sliced"] = Field(description="The spec's gpu_sharing.mode.")
    gpu_memory_gb: float = Field(description="One physical GPU's memory, in GB.")
    replicas: int = Field(description="How many models may share one GPU (1 in exclusive mode).")
    models: list[ModelShare] = Field(description="Each model's share and need.")
    total_gb: float = Field(description="The sum of the models' shares, in GB.")
    shares_fit: bool = Field(description="total_gb <= gpu_memory_gb.")
    count_fits: bool = Field(description="len(models) <= replicas.")
    fits: bool = Field(description="Every model fits its share, the shares fit the GPU and the count the replicas.")

    @property
    def too_small(self) -> list[ModelShare]:
        """The models whose share cannot hold their weights and the least KV cache."""
        return [m for m in self.models if not m.fits]

    def summary(self) -> str:
        """The numbers in one line: each share, their sum against the card, each need against its share."""
        if not self.models:
            return "no model"
        shares = " and ".join(m.line(self.gpu_memory_gb) for m in self.models)
        needs = "; ".join(m.need_line() for m in self.models)
        return f"{shares}: {self.total_gb:g} GB of {self.gpu_memory_gb:g} GB; {needs}"

    def problems(self) -> list[str]:
        """What does not fit and what to change, one sentence each (empty when it fits)."""
        out = []
        if self.mode == "exclusive":
            if not self.count_fits:
                out.append(
                    f"gpu_sharing.mode is exclusive, so each of the {len(self.models)} models takes a whole GPU: run "
                    "one at a time, or set gpu_sharing.mode: time-sliced on a time-shared GPU node pool"
                )
        elif not self.count_fits:
            out.append(
                f"{len(self.models)} models but a GPU is shared by at most {self.replicas} (its time-slicing "
                "replicas): run fewer models together, or raise the replicas the GPU node pool advertises and "
                "gpu_sharing.replicas with them"
            )
        if not self.shares_fit and self.mode == "time-sliced":
            out.append(
                f"the shares add up to {self.total_gb:g} GB, more than the GPU's {self.gpu_memory_gb:g} GB: lower "
                "the models' gpu_memory_utilization so they add up to at most 1, or run fewer models together"
            )
        for m in self.too_small:
            least = _ceil2(m.need_gb / self.gpu_memory_gb)
            fix = (
                f"raise its gpu_memory_utilization to at least {least:g}"
                if least <= 1
                else f"it does not fit one {self.gpu_memory_gb:g} GB GPU even alone: use a smaller model or bigger GPU"
            )
            out.append(
                f"{m.name}'s share of {m.share_gb:g} GB cannot hold {m.weights_gb:g} GB of weights + "
                f"{m.kv_cache_gb:g} GB of KV cache: {fix}"
            )
        return out


# Shares of one 24 GB GPU (an L4) for chat and FIM together: coder-chat 0.55 (13.2 GB for 5.5 GB of weights), coder-fim
# 0.35 (8.4 GB for 3.1 GB), 21.6 of 24 GB; the agent keeps the whole card's 0.9 and runs alone.
STARTER_SHARES = {"chat": 0.55, "fim": 0.35}
# The tag:gpu limit's slots per GPU in time-sliced mode: a session occupies its models' shares in hundredths.
SHARE_SLOTS = 100


def _gb(x: float) -> float:
    return round(x, 2)


def _ceil2(x: float) -> float:
    """``x`` rounded up to 2 decimals (a utilization that is at least ``x``)."""
    return -(-round(x * 100, 6) // 1) / 100


class StackSpec(_Model):
    """The whole coder stack. Every default is the runbook's reference deployment."""

    serving_namespace: Name = Field("serving", description="Namespace of the vLLM model servers.")
    gateway_namespace: Name = Field("litellm", description="Namespace of the LiteLLM gateway.")
    experience_namespace: Name = Field("experience", description="Namespace of Open WebUI and Tabby.")
    gpus: int = Field(1, ge=1, le=64, description="GPUs in the cluster = models that may run at once.")
    gpu_node_memory_gb: float = Field(
        16.0, gt=0, le=4096, description="Host RAM of a GPU node (g2-standard-4: 16 GB); caps model size."
    )
    host_ram_overhead_gb: float = Field(2.0, ge=0, le=512, description="Host RAM vLLM needs beside the staged weights.")
    models: list[ModelSpec] = Field(
        default_factory=_default_models, min_length=1, max_length=64, description="GPU model servers."
    )
    default_model: Name = Field(
        "coder-chat", description="Model the morning bring-up leaves serving (swap's target when none is given)."
    )
    default_models: list[Name] | None = Field(
        None,
        max_length=64,
        description="Models the morning bring-up leaves serving together when gpu_sharing.mode is time-sliced and "
        "their shares fit one GPU (started one after another). Unset: default_model and the stack's fim model. "
        "Exclusive mode brings default_model alone.",
    )
    frontends: list[FrontendSpec] = Field(
        default_factory=lambda: [
            FrontendSpec(name="open-webui", app="open-webui"),
            FrontendSpec(name="tabby", app="tabby"),
        ],
        max_length=16,
        description="CPU front-end Deployments in the experience namespace.",
    )
    virtual_keys: list[ClientKeySpec] = Field(
        default_factory=_default_keys, max_length=64, description="Virtual keys to mint."
    )
    embeddings_alias: str = Field("embeddings", min_length=1, max_length=200, description="Embeddings alias.")
    gateway_service: Name = Field("litellm", description="LiteLLM Service name.")
    gateway_port: int = Field(4000, ge=1, le=65535, description="LiteLLM Service port.")
    master_key: SecretRef = Field(
        SecretRef(namespace="litellm", name="litellm-secrets", key="PROXY_MASTER_KEY"),
        description="LiteLLM master key.",
    )
    upstream_key: SecretRef = Field(
        SecretRef(namespace="litellm", name="litellm-secrets", key="UPSTREAM_API_KEY"),
        description="Key LiteLLM uses towards vLLM (for /model/new).",
    )
    vllm_key: SecretRef = Field(
        SecretRef(namespace="serving", name="vllm-api-key", key="api-key"),
        description="Shared vLLM --api-key, for direct smokes.",
    )
    openwebui_secret: Name = Field("openwebui-secrets", description="Secret holding Open WebUI's keys.")
    tabby_config_secret: Name = Field("tabby-config", description="Secret holding Tabby's config.toml.")
    keystore_secret: Name = Field(
        "coder-stack-keys", description="Secret in the gateway namespace holding keys with no other consumer."
    )
    idle_after_s: float = Field(
        1800.0,
        ge=0,
        le=86400,
        description="Reclaim a serving model (scale it to 0) once its request counters have not moved for this "
        "many seconds and nothing is running or waiting; 0: never reclaim.",
    )
    idle_grace_s: float = Field(
        600.0,
        ge=0,
        le=86400,
        description="Never reclaim a model whose pod has been Ready for less than this many seconds.",
    )
    wake: WakeSpec = Field(default_factory=WakeSpec, description="Wake on demand (the LiteLLM callback, wake_model).")
    gpu_sharing: GpuSharing = Field(
        default_factory=GpuSharing,
        description="How models share a GPU: exclusive (one model per GPU, the default) or time-sliced.",
    )
    access: AccessSpec = Field(default_factory=AccessSpec, description="How endpoints are reached.")
    timeouts: Timeouts = Field(default_factory=Timeouts, description="Timeouts outside cold starts.")

    @model_validator(mode="after")
    def _consistent(self) -> StackSpec:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if self.default_model not in names:
            raise ValueError(f"default_model {self.default_model!r} is not one of the models {names}")
        for name in self.default_models or []:
            if name not in names:
                raise ValueError(f"default_models names unknown model {name!r}; known: {names}")
        if self.gpu_sharing.mode == "time-sliced" and self.gpus != 1:
            raise ValueError(
                f"gpu_sharing.mode is time-sliced with gpus: {self.gpus}; time-slicing is planned on one GPU (the GPU "
                "limit cannot tell which card a share is on): set gpus: 1, or gpu_sharing.mode: exclusive"
            )
        aliases = {m.alias for m in self.models} | {self.embeddings_alias}
        for k in self.virtual_keys:
            unknown = [m for m in k.models if m not in aliases]
            if unknown:
                raise ValueError(f"key {k.alias!r} names unknown models {unknown}; known: {sorted(aliases)}")
        if len({k.alias for k in self.virtual_keys}) != len(self.virtual_keys):
            raise ValueError("key aliases must be unique")
        for alias, fallback in self.wake.fallbacks.items():
            model_aliases = sorted(m.alias for m in self.models)
            if alias not in model_aliases:
                raise ValueError(f"wake.fallbacks names unknown alias {alias!r}; the models' aliases: {model_aliases}")
            if fallback == alias:
                raise ValueError(f"wake.fallbacks: {alias!r} cannot fall back to itself")
        for name in self.access.overrides.models:
            if name not in names:
                raise ValueError(f"access.overrides.models names unknown model {name!r}; known: {names}")
        return self

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name or m.alias == name:
                return m
        raise SpecError(f"unknown model {name!r}; this stack has: {', '.join(m.name for m in self.models)}")

    def key(self, alias: str) -> ClientKeySpec:
        for k in self.virtual_keys:
            if k.alias == alias:
                return k
        raise SpecError(f"unknown key alias {alias!r}; this stack has: {', '.join(k.alias for k in self.virtual_keys)}")

    # ------------------------------------------------------------------------------ derived facts
    def shares_fit(
        self,
        models: Sequence[ModelSpec | str],
        *,
        gpu_memory_gb: float | None = None,
        replicas: int | None = None,
    ) -> ShareVerdict:
        """Whether ``models`` (specs or names) fit one GPU together, with the numbers. Pure: no I/O.

        Time-sliced: each model takes ``gpu_memory_utilization`` x the GPU's memory; the shares must add up to
        at most the GPU, each share must hold the model's weights plus ``min_kv_cache_gb``, and at most
        ``replicas`` models share it. Exclusive: each model takes the whole GPU, so only one fits.
        ``gpu_memory_gb`` and ``replicas`` override the spec's (what the cluster's nodes advertise).
        """
        sharing = self.gpu_sharing
        card = _gb(gpu_memory_gb if gpu_memory_gb is not None else sharing.gpu_memory_gb)
        exclusive = sharing.mode == "exclusive"
        slots = 1 if exclusive else (replicas if replicas is not None else sharing.replicas)
        specs = list({m.name: m for m in (x if isinstance(x, ModelSpec) else self.model(x) for x in models)}.values())
        shares = []
        for m in specs:
            utilization = 1.0 if exclusive else m.gpu_memory_utilization
            share = _gb(utilization * card)
            need = _gb(m.weights_gb + sharing.min_kv_cache_gb)
            shares.append(
                ModelShare(
                    name=m.name,
                    utilization=utilization,
                    share_gb=share,
                    weights_gb=m.weights_gb,
                    kv_cache_gb=sharing.min_kv_cache_gb,
                    need_gb=need,
                    fits=need <= share,
                )
            )
        total = _gb(sum(s.share_gb for s in shares))
        shares_ok = total <= card
        count_ok = len(shares) <= slots
        return ShareVerdict(
            mode=sharing.mode,
            gpu_memory_gb=card,
            replicas=slots,
            models=shares,
            total_gb=total,
            shares_fit=shares_ok,
            count_fits=count_ok,
            fits=shares_ok and count_ok and all(s.fits for s in shares),
        )

    def time_sliced_starter(self) -> StackSpec:
        """This stack on a time-sliced GPU, as a file to start from: ``gpu_sharing.mode: time-sliced`` and the chat
        and fim models at the shares :data:`STARTER_SHARES` (an L4: chat 13.2 GB and fim 8.4 GB of 24, room for
        both KV caches); other models keep theirs. The preflight checks the result against the cluster."""
        models = [
            m.model_copy(update={"gpu_memory_utilization": STARTER_SHARES.get(m.role, m.gpu_memory_utilization)})
            for m in self.models
        ]
        return self.model_copy(
            update={"models": models, "gpu_sharing": self.gpu_sharing.model_copy(update={"mode": "time-sliced"})}
        )

    @property
    def time_sliced(self) -> bool:
        return self.gpu_sharing.mode == "time-sliced"

    @property
    def gpu_limit_slots(self) -> int:
        """The size of the ``tag:gpu`` limit: ``gpus`` in exclusive mode (a session takes one slot: one model per
        GPU); :data:`SHARE_SLOTS` in time-sliced mode (a session takes its models' shares, in hundredths)."""
        return SHARE_SLOTS if self.time_sliced else self.gpus

    def occupy(self, models: Sequence[ModelSpec | str]) -> int:
        """The slots of the ``tag:gpu`` limit a GPU session of ``models`` takes. Exclusive: 1 (the whole GPU).
        Time-sliced: the models' shares of the GPU's memory in hundredths (``gpu_memory_utilization`` x 100, rounded
        up), capped at the limit's size. How many models share the card (its replicas) is checked when a model
        starts, not by the limit."""
        if not self.time_sliced:
            return 1
        specs = {m.name: m for m in (x if isinstance(x, ModelSpec) else self.model(x) for x in models)}
        total = sum(int(-(-round(m.gpu_memory_utilization * SHARE_SLOTS, 6) // 1)) for m in specs.values())
        return min(SHARE_SLOTS, max(1, total))

    def fit_together(self, models: Sequence[ModelSpec | str]) -> bool:
        """Whether ``models`` may serve on the GPU at once: one model always; more only when time-sliced and
        :meth:`shares_fit` says they fit."""
        names = {m if isinstance(m, str) else m.name for m in models}
        if len(names) <= 1:
            return True
        return self.time_sliced and self.shares_fit(list(names)).fits

    def fit_beside(self, base: Sequence[ModelSpec], candidates: Sequence[ModelSpec]) -> list[ModelSpec]:
        """The ``candidates`` that may serve beside ``base``, taken in order: each one that fits together with
        ``base`` and the candidates taken before it (:meth:`fit_together`). Exclusive mode: none beside a model."""
        taken: list[ModelSpec] = []
        for m in candidates:
            if m not in base and m not in taken and self.fit_together([*base, *taken, m]):
                taken.append(m)
        return taken

    @property
    def bring_up_models(self) -> list[ModelSpec]:
        """What the morning bring-up leaves serving, in start order: ``default_model`` first; time-sliced, also the
        other ``default_models`` (unset: the fim model). Whether they fit is the preflight's to say."""
        first = self.model(self.default_model)
        if not self.time_sliced:
            return [first]
        names = self.default_models
        if names is None:
            names = [m.name for m in self.models if m.role == "fim"][:1]
        rest = [self.model(n) for n in dict.fromkeys(names) if n != first.name]
        return [first, *rest]

    def frontend(self, app: FrontendApp) -> FrontendSpec | None:
        """The front-end Deployment that runs ``app``, if the stack has one."""
        return next((f for f in self.frontends if f.app == app), None)

    def key_delivered_to(self, destination: KeyDestination) -> ClientKeySpec | None:
        """The key delivered to ``destination`` (the first, if several are)."""
        return next((k for k in self.virtual_keys if k.deliver_to == destination), None)

    def key_home(self, key_spec: ClientKeySpec) -> KeyHome:
        """Where ``key_spec``'s key lives and which front-end Deployment consumes it."""
        ns = self.experience_namespace
        if key_spec.deliver_to == "keystore":
            return KeyHome(self.gateway_namespace, self.keystore_secret, key_spec.alias, None, ns)
        fe = self.frontend(CONSUMER_OF[key_spec.deliver_to])
        consumer = fe.name if fe else None
        if key_spec.deliver_to == "openwebui-secrets":
            return KeyHome(ns, self.openwebui_secret, OPENWEBUI_KEY, consumer, ns)
        return KeyHome(ns, self.tabby_config_secret, TABBY_CONFIG_KEY, consumer, ns)

    def deployments(self) -> list[tuple[str, str]]:
        """(namespace, name) of every Deployment the stack scales: the models, then the front-ends."""
        return [(self.serving_namespace, m.name) for m in self.models] + [
            (self.experience_namespace, f.name) for f in self.frontends
        ]

    def service_url(self, service: str, namespace: str, port: int) -> str:
        """A Service's URL as pods see it (cluster DNS)."""
        return f"http://{service}.{namespace}.svc.{self.access.cluster_domain}:{port}"

    @property
    def gateway_incluster_url(self) -> str:
        """The gateway as pods see it, without /v1."""
        return self.service_url(self.gateway_service, self.gateway_namespace, self.gateway_port)

    def model_incluster_url(self, model: ModelSpec) -> str:
        """A model server's OpenAI base URL as pods (and the gateway) see it, with /v1."""
        return self.service_url(model.name, self.serving_namespace, model.port) + "/v1"

    def key_for_model(self, model: ModelSpec) -> ClientKeySpec | None:
        """The key a smoke of this model uses: the first key scoped to its alias."""
        for k in self.virtual_keys:
            if model.alias in k.models:
                return k
        return None


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} problem(s):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  - {path}: {e['msg']}")
    lines.append("Fix the field(s) above; run `coder-stack spec` to print a complete valid stack file.")
    return "\n".join(lines)


def load_spec(path: str | Path | None = None) -> StackSpec:
    """Load the stack spec from a YAML file, or the runbook defaults when no path is given."""
    if path is None:
        return StackSpec()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(f"cannot read stack file {p}: {e.strerror}. Pass an existing YAML file to --stack.") from e
    try:
        data = yaml.load(text, Loader=yaml.CSafeLoader)  # libyaml: ~10x faster than safe_load
    except yaml.YAMLError as e:
        raise SpecError(f"stack file {p} is not valid YAML: {e}") from e
    return parse_spec(data, f"stack file {p}")


def parse_spec(data: object, source: str) -> StackSpec:
    """Validate a stack spec read from ``source`` (a file, a Prefect block); a problem is a :class:`SpecError`
    naming each bad field by its path (``models.1.weights_gb: ...``)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{source} must hold a mapping of fields, got {type(data).__name__}")
    try:
        return StackSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_validation_error(e, source)) from None


def spec_yaml(spec: StackSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
