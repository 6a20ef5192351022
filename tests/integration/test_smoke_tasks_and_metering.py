"""The gateway and smoke tasks end to end on the simulated cluster (port-forward access, keys from their homes).

One model at a time, as on the one-GPU cluster: coder-chat, then coder-fim, then coder-agent.
"""

from __future__ import annotations

import logging

import pytest
from simstack.stack import SimStack
from simstack.store import Store

from coder_stack.errors import SmokeFailed
from coder_stack.kubernetes.client import ClusterTarget
from coder_stack.spec import StackSpec, Timeouts
from coder_stack.tasks.gateway import ensure_keys_task, gateway_ready_task, read_spend_task, register_model_task
from coder_stack.tasks.smoke import smoke_agent_task, smoke_direct_task, smoke_frontends_task, smoke_gateway_task
from tests.conftest import pods_of, ready_pod, scale, wait_for

SPEC = StackSpec(timeouts=Timeouts(spend_visible_s=5, request_s=20))
S, EXP = SPEC.serving_namespace, SPEC.experience_namespace


def swap_to(sim: SimStack, name: str) -> None:
    for m in SPEC.models:
        if m.name != name:
            scale(sim, S, m.name, 0)

    def gone(store: Store) -> bool:
        return not any(pods_of(store, S, m.name) for m in SPEC.models if m.name != name)

    wait_for(sim, gone, 10, f"every model but {name} gone")
    scale(sim, S, name, 1)
    ready_pod(sim, S, name, timeout=15)


async def test_keys_smokes_and_metering_end_to_end(sim: SimStack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    target = ClusterTarget(kubeconfig=str(sim.kubeconfig_path))

    health = await gateway_ready_task.fn(target, SPEC)
    assert health.ready and health.url.startswith("http://127.0.0.1:")
    keys = await ensure_keys_task.fn(target, SPEC)
    assert [k.action for k in keys] == ["minted", "minted", "minted"]
    assert [k.action for k in await ensure_keys_task.fn(target, SPEC)] == ["kept", "kept", "kept"]

    # chat: direct, through Open WebUI's key (metered), and from inside the Open WebUI pod
    swap_to(sim, "coder-chat")
    direct = await smoke_direct_task.fn(target, SPEC, SPEC.model("coder-chat"))
    assert direct.ttft_s is not None and direct.target == "qwen2.5-coder-7b-instruct"
    chat = await smoke_gateway_task.fn(target, SPEC, SPEC.model("coder-chat"))
    assert chat.smoke.key_alias == "open-webui"
    assert chat.spend is not None and chat.spend.status == "metered"
    assert chat.spend.expected_increase and chat.spend.spend == pytest.approx(chat.spend.expected_increase, rel=1e-9)
    scale(sim, EXP, "open-webui", 1)
    ready_pod(sim, EXP, "open-webui", timeout=15)
    fe = await smoke_frontends_task.fn(target, SPEC, openwebui=True, tabby=False)
    assert fe.checks[0].detail == "coder-chat, coder-fim, embeddings"

    # FIM: swap, then through Tabby's key and with the key Tabby is configured with
    swap_to(sim, "coder-fim")
    fim = await smoke_gateway_task.fn(target, SPEC, SPEC.model("coder-fim"), key_alias="tabby")
    assert fim.smoke.excerpt.startswith("a + b") and fim.spend is not None and fim.spend.status == "metered"
    tabby = await smoke_frontends_task.fn(target, SPEC, openwebui=False, tabby=True)
    assert tabby.excerpt.startswith("a + b")

    # agent: register once (twice is a no-op), then the tool loop with the keystore key
    swap_to(sim, "coder-agent")
    first = await register_model_task.fn(target, SPEC, SPEC.model("coder-agent"))
    second = await register_model_task.fn(target, SPEC, SPEC.model("coder-agent"))
    assert (first.action, second.action, second.deployments) == ("registered", "already-registered", 1)
    agent = await smoke_agent_task.fn(target, SPEC, SPEC.model("coder-agent"))
    assert agent.spend is not None and agent.spend.status == "metered"
    assert "plain JSON" in agent.smoke.diagnostics[0]

    rows = await read_spend_task.fn(target, SPEC, [k.alias for k in SPEC.virtual_keys])
    assert all(r.spend > 0 and r.status == "no calls" for r in rows)

    # the chat model is down now: the chat smoke through the gateway names the model hop
    with pytest.raises(SmokeFailed) as ei:
        await smoke_gateway_task.fn(target, SPEC, SPEC.model("coder-chat"), check_spend=False)
    assert ei.value.hop == "model"

    secrets = list(sim.secrets.values())
    text = "\n".join(r.getMessage() for r in caplog.records)
    text += "".join(x.model_dump_json() for x in [*keys, direct, chat, fe, fim, tabby, agent, *rows])
    text += str(ei.value)
    for s in secrets:
        assert s not in text
    assert "sk-" not in text.replace("sk-***", "").replace("sk-...", "")
