"""No key value in any URL (issue 17, item 4): every request the clients send during real flow runs on the
simulated stack is recorded (an httpx hook on every client of the process), and no minted key, master key or
vLLM key appears in its path or query. /key/info is asked by the key's hash (LiteLLM's token, its SHA-256)."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest
from simstack.stack import SimStack

from coder_stack.flows.keys import KeyOptions, manage_keys
from coder_stack.kubernetes.client import ClusterTarget, open_api, read_secret
from coder_stack.spec import StackSpec
from coder_stack.usecases.keys import parse_tabby_config
from tests.kits.flowkit import conn

SPEC = StackSpec()


async def key_values(sim: SimStack) -> set[str]:
    async with open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api:
        ow = await read_secret(api, SPEC.experience_namespace, SPEC.openwebui_secret) or {}
        tb = await read_secret(api, SPEC.experience_namespace, SPEC.tabby_config_secret) or {}
        ks = await read_secret(api, SPEC.gateway_namespace, SPEC.keystore_secret) or {}
    out = {ow["OPENAI_API_KEY"].get_secret_value(), ks["coder-agent"].get_secret_value()}
    cfg = parse_tabby_config(tb["config.toml"])
    assert cfg is not None
    out.add(cfg.api_key.get_secret_value())
    return out


async def test_no_key_value_in_any_url_during_keys_runs(
    sim: SimStack, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls: list[httpx.URL] = []
    real_send = httpx.AsyncClient.send

    async def recording_send(self: httpx.AsyncClient, request: httpx.Request, **kw: Any) -> httpx.Response:
        urls.append(request.url)
        return await real_send(self, request, **kw)

    monkeypatch.setattr(httpx.AsyncClient, "send", recording_send)
    first = await manage_keys(connection=conn(sim))  # mints every key
    minted = await key_values(sim)
    kept = await manage_keys(connection=conn(sim))  # looks every key up (/key/info), keeps it
    rotated = await manage_keys(options=KeyOptions(rotate=True), connection=conn(sim))
    assert first.outcome == kept.outcome == rotated.outcome == "passed", rotated
    secrets = minted | await key_values(sim) | {sim.secrets["master_key"], sim.secrets["vllm_key"]}
    assert len(secrets) == 8  # three keys, three rotated ones, the master key and the vLLM key

    gateway = [u for u in urls if u.path.startswith("/key/")]
    info = [u for u in gateway if u.path == "/key/info"]
    assert len(info) >= 6, [str(u) for u in gateway]  # each key asked for in each run: the check is not empty
    hashes = {hashlib.sha256(s.encode()).hexdigest() for s in minted}
    assert hashes & {u.params.get("key") for u in info}  # asked by hash
    for u in urls:
        where = f"{u.raw_path.decode()} {u.query.decode()}"
        for s in secrets:
            assert s not in where, f"a key value in the URL of a request to {u.host}{u.path}"
