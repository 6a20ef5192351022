"""The contract target: the stand-ins started on 127.0.0.1 ("standins", always) or a real gateway given by
environment ("real", skipped when the variables are absent — the one skip of this tier).

Environment (see docs/CONTRACT.md):

- ``CODER_STACK_CONTRACT_GATEWAY_URL`` (without ``/v1``) and ``CODER_STACK_CONTRACT_MASTER_KEY``: required
  for "real";
- ``CODER_STACK_CONTRACT_VLLM_URL`` and ``CODER_STACK_CONTRACT_VLLM_KEY``: a vLLM server serving the chat
  model, for the direct smoke;
- ``CODER_STACK_CONTRACT_CHAT_ALIAS`` / ``_FIM_ALIAS`` / ``_EMBEDDINGS_ALIAS`` (coder-chat / coder-fim /
  embeddings) and ``_CHAT_SERVED_NAME`` / ``_FIM_SERVED_NAME`` (the spec's defaults);
- ``CODER_STACK_CONTRACT_SERVING``: comma-separated gateway aliases whose model servers are up behind the
  gateway (default: the chat alias); tests that need a model answering expect the "model" hop otherwise.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest
from pydantic import SecretStr

from coder_stack.litellm import admin as gateway
from coder_stack.spec import ClientKeySpec, StackSpec, Timeouts
from coder_stack.transport import make_client
from tests.kits.gateway import gateway_stack

ENV = "CODER_STACK_CONTRACT_"
ALIAS_PREFIX = "coder-stack-contract-"


def contract_spec(
    *,
    chat_alias: str = "coder-chat",
    fim_alias: str = "coder-fim",
    embeddings_alias: str = "embeddings",
    chat_served: str | None = None,
    fim_served: str | None = None,
    spend_visible_s: float = 30.0,
) -> StackSpec:
    """The reference stack with the target's aliases and served names."""
    base = StackSpec()
    models = []
    for m in base.models:
        if m.role == "chat":
            m = m.model_copy(update={"alias": chat_alias, "served_model_name": chat_served or m.served_model_name})
        elif m.role == "fim":
            m = m.model_copy(update={"alias": fim_alias, "served_model_name": fim_served or m.served_model_name})
        models.append(m)
    agent = next(m.alias for m in models if m.role == "agent")
    keys = [
        ClientKeySpec(
            alias="open-webui", models=[chat_alias, fim_alias, embeddings_alias], deliver_to="openwebui-secrets"
        ),
        ClientKeySpec(alias="tabby", models=[fim_alias, embeddings_alias], deliver_to="tabby-config"),
        ClientKeySpec(alias="coder-agent", models=[agent], deliver_to="keystore"),
    ]
    return StackSpec(
        models=models,
        embeddings_alias=embeddings_alias,
        virtual_keys=keys,
        timeouts=Timeouts(spend_visible_s=spend_visible_s, request_s=60),
    )


@dataclass(frozen=True)
class Target:
    kind: str  # "standins" | "real"
    gateway_url: str
    master: SecretStr
    spec: StackSpec
    serving: dict[str, int]  # replicas per model name, as the doctor takes them
    vllm_url: str | None = None  # a vLLM server of the chat model, for the direct smoke
    vllm_key: SecretStr | None = None

    def is_serving(self, alias: str) -> bool:
        return self.serving.get(self.spec.model(alias).name, 0) > 0

    @property
    def chat(self) -> str:
        return next(m.alias for m in self.spec.models if m.role == "chat")

    @property
    def fim(self) -> str:
        return next(m.alias for m in self.spec.models if m.role == "fim")


def _real_target() -> Target:
    url, master = os.environ.get(ENV + "GATEWAY_URL"), os.environ.get(ENV + "MASTER_KEY")
    if not url or not master:
        pytest.skip(f"real gateway: set {ENV}GATEWAY_URL and {ENV}MASTER_KEY to run the contract against one")
    spec = contract_spec(
        chat_alias=os.environ.get(ENV + "CHAT_ALIAS") or "coder-chat",
        fim_alias=os.environ.get(ENV + "FIM_ALIAS") or "coder-fim",
        embeddings_alias=os.environ.get(ENV + "EMBEDDINGS_ALIAS") or "embeddings",
        chat_served=os.environ.get(ENV + "CHAT_SERVED_NAME") or None,
        fim_served=os.environ.get(ENV + "FIM_SERVED_NAME") or None,
    )
    chat = next(m for m in spec.models if m.role == "chat")
    up = [a.strip() for a in (os.environ.get(ENV + "SERVING") or chat.alias).split(",") if a.strip()]
    serving = {m.name: (1 if m.alias in up else 0) for m in spec.models}
    vurl, vkey = os.environ.get(ENV + "VLLM_URL"), os.environ.get(ENV + "VLLM_KEY")
    return Target(
        kind="real",
        gateway_url=url.rstrip("/").removesuffix("/v1"),
        master=SecretStr(master),
        spec=spec,
        serving=serving,
        vllm_url=vurl.rstrip("/").removesuffix("/v1") if vurl and vkey else None,
        vllm_key=SecretStr(vkey) if vurl and vkey else None,
    )


@pytest.fixture(scope="session", params=["standins", "real"])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    if request.param == "real":
        yield _real_target()
        return
    # spend written 0.1 s after a call (10 s x time_scale 0.01), like PROXY_BATCH_WRITE_AT=1 does in ~1-3 s
    spec = contract_spec(spend_visible_s=3.0)
    async with gateway_stack(spec) as st:
        chat = next(m for m in spec.models if m.role == "chat")
        yield Target(
            kind="standins",
            gateway_url=st.url,
            master=SecretStr(st.master),
            spec=spec,
            serving={m.name: 1 for m in spec.models},
            vllm_url=st.backend_url(chat.name),
            vllm_key=SecretStr(st.upstream),
        )


@pytest.fixture
async def gw(target: Target) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(target.spec.timeouts, base_url=target.gateway_url, backoff_s=0.1, max_wait_s=2.0) as c:
        yield c


Mint = Callable[..., Awaitable[tuple[str, gateway.MintedKey]]]


@pytest.fixture
async def throwaway(target: Target, gw: httpx.AsyncClient) -> AsyncIterator[Mint]:
    """Mint throwaway keys (unique aliases, tiny budget); every one is deleted afterwards, even on failure."""
    minted: list[gateway.MintedKey] = []

    async def mint(models: list[str], *, budget: float = 0.01, label: str = "key") -> tuple[str, gateway.MintedKey]:
        alias = f"{ALIAS_PREFIX}{label}-{secrets.token_hex(4)}"
        m = await gateway.generate_key(
            gw, target.master, alias=alias, models=models, max_budget=budget, budget_duration="1d"
        )
        minted.append(m)
        return alias, m

    try:
        yield mint
    finally:
        problems = []
        for m in minted:
            try:
                await gateway.delete_keys(gw, target.master, [m.key])
            except Exception as e:  # try every key, then say which could not be deleted
                problems.append(f"{m.record.alias}: {type(e).__name__}: {e}")
        assert not problems, f"throwaway keys left in the gateway: {problems}"
