"""Which key does Open WebUI itself use? ENABLE_PERSISTENT_CONFIG on the simulated cluster.

Open WebUI's docs: PersistentConfig variables (OPENAI_API_KEY(S), OPENAI_API_BASE_URL(S)) are read from the
environment at the first launch only; later the value stored in its database wins, unless
ENABLE_PERSISTENT_CONFIG=False. So a key delivered into ``openwebui-secrets`` after the first boot reaches the
pod's environment (all the old smoke looked at) but not the app. These tests show it through the app's own
``/api/models`` (a session JWT signed with WEBUI_SECRET_KEY, over the project's port-forward), and that the
smoke, the resolver and the envFrom delivery path say and do the right thing.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from pydantic import SecretStr
from simstack.cluster_objects import b64, openwebui_deployment
from simstack.stack import SimStack
from simstack.standins.openwebui import sign_session
from simstack.store import Store

from coder_stack.errors import SmokeFailed
from coder_stack.kubernetes.client import ClusterTarget, open_api, read_secret, write_secret_keys
from coder_stack.kubernetes.exec import exec_in_deployment
from coder_stack.kubernetes.portforward import port_forward
from coder_stack.kubernetes.workloads import restart_deployment
from coder_stack.litellm import admin as gateway
from coder_stack.spec import StackSpec, Timeouts
from coder_stack.usecases.frontends import smoke_frontends
from coder_stack.usecases.openwebui import (
    PERSISTENT_CONFIG_VAR,
    PersistentConfigStatus,
    persistent_config_status,
    set_env_wins_in_secret,
)
from tests.conftest import SIM_SCALE, SimClients, is_ready, on_loop, pods_of, ready_pod, scale, sim_clients, wait_for

SPEC = StackSpec(timeouts=Timeouts(request_s=20))
EXP = SPEC.experience_namespace
UI = "open-webui"
SELECTOR = f"app.kubernetes.io/name={UI}"
FULL = sorted(SPEC.key("open-webui").models)  # coder-chat, coder-fim, embeddings
CHAT_ONLY = ["coder-chat"]  # key A's scope: tells "the app still uses A" apart from "it uses B"


# ---------------------------------------------------------------------------------------------- helpers


Env = SimClients


@pytest.fixture
async def env(make_sim: Callable[..., SimStack]) -> AsyncIterator[Env]:
    async with sim_clients(make_sim(spec=SPEC), SPEC) as e:
        yield e


def use_deployment(sim: SimStack, **kwargs: Any) -> None:
    """Replace deploy/open-webui's pod template with ``openwebui_deployment(**kwargs)``'s (still 0 replicas).

    The app's model-list timeout is raised (10 s simulated is 0.02 s at this time scale): a slow answer on a
    busy machine would list no models, which these tests read as "the gateway refused the app's key"."""
    new = openwebui_deployment(SPEC, UI, sim.gateway_url, **kwargs)
    new["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "AIOHTTP_CLIENT_TIMEOUT_MODEL_LIST", "value": str(round(10 / SIM_SCALE))}
    )

    def _swap(store: Store) -> None:
        d = store.get("deployments", EXP, UI)
        d["spec"]["template"] = new["spec"]["template"]
        store.update("deployments", d)

    on_loop(sim, _swap)


def set_container(sim: SimStack, *, env: list[dict[str, Any]], env_from: list[dict[str, Any]] | None = None) -> None:
    def _set(store: Store) -> None:
        d = store.get("deployments", EXP, UI)
        c = d["spec"]["template"]["spec"]["containers"][0]
        c["env"] = env
        if env_from is None:
            c.pop("envFrom", None)
        else:
            c["envFrom"] = env_from
        store.update("deployments", d)

    on_loop(sim, _set)


def put(sim: SimStack, plural: str, name: str, data: dict[str, str]) -> None:
    """Create or replace a Secret or ConfigMap in the experience namespace."""

    def _put(store: Store) -> None:
        body = {k: b64(v) for k, v in data.items()} if plural == "secrets" else dict(data)
        old = store.find(plural, EXP, name)
        if old is None:
            store.create(plural, {"metadata": {"name": name, "namespace": EXP}, "data": body})
        else:
            old["data"] = body
            store.update(plural, old)

    on_loop(sim, _put)


async def mint(e: Env, alias: str, models: list[str]) -> gateway.MintedKey:
    ks = SPEC.key("open-webui")
    return await gateway.generate_key(
        e.gw, e.master, alias=alias, models=models, max_budget=ks.max_budget, budget_duration=ks.budget_duration
    )


async def deliver(e: Env, key: SecretStr) -> list[str]:
    """What keys._deliver does for openwebui-secrets: the key, and a session secret once."""
    return await write_secret_keys(
        e.api,
        EXP,
        SPEC.openwebui_secret,
        {"OPENAI_API_KEY": key, "WEBUI_SECRET_KEY": SecretStr(secrets.token_hex(32))},
        only_if_absent=frozenset({"WEBUI_SECRET_KEY"}),
    )


def start_ui(e: Env) -> str:
    scale(e.sim, EXP, UI, 1)
    return str(ready_pod(e.sim, EXP, UI, timeout=15)["metadata"]["name"])


async def restart_ui(e: Env, old_pod: str) -> str:
    """`kubectl rollout restart deploy/open-webui` and wait until its only pod is a new, Ready one."""
    await restart_deployment(e.api, EXP, UI)
    return await wait_rolled(e, old_pod)


async def wait_rolled(e: Env, old_pod: str) -> str:
    """Wait until deploy/open-webui's only pod is a Ready one other than ``old_pod``."""

    def rolled(store: Store) -> str | None:
        pods = pods_of(store, EXP, UI)
        if len(pods) == 1 and is_ready(pods[0]) and pods[0]["metadata"]["name"] != old_pod:
            return str(pods[0]["metadata"]["name"])
        return None

    return str(wait_for(e.sim, rolled, 15, "the restarted open-webui pod"))


async def app_models(e: Env) -> list[str]:
    """The model ids Open WebUI itself lists: its /api/models, with a user session signed by WEBUI_SECRET_KEY,
    through a port-forward to svc/open-webui. The app fetches them from the gateway with ITS key."""
    data = await read_secret(e.api, EXP, SPEC.openwebui_secret)
    assert data is not None
    token = sign_session(data["WEBUI_SECRET_KEY"].get_secret_value())
    async with port_forward(e.api, EXP, UI, 8080) as (host, port), httpx.AsyncClient() as http:
        r = await http.get(f"http://{host}:{port}/api/models", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return sorted(m["id"] for m in r.json()["data"])


async def pod_key(e: Env) -> str:
    res = await exec_in_deployment(e.api, EXP, SELECTOR, ["sh", "-c", 'printf %s "$OPENAI_API_KEY"'], 10)
    assert res.exit_code == 0
    return res.stdout


async def smoke(e: Env) -> Any:
    return await smoke_frontends(e.api, SPEC, exec_in_deployment, e.sim.gateway_url + "/v1", tabby=False)


async def rekey_after_first_boot(e: Env) -> tuple[gateway.MintedKey, gateway.MintedKey]:
    """Key A (coder-chat only) at the first boot; then key B (the spec's full scope) delivered into the Secret,
    the Deployment restarted, and A deleted in the gateway -- a re-mint/rotation as keys.py does it."""
    a = await mint(e, "open-webui", CHAT_ONLY)
    await deliver(e, a.key)
    first = start_ui(e)
    assert await app_models(e) == CHAT_ONLY  # the first boot uses (and stores) A
    b = await mint(e, "open-webui-next", FULL)
    assert await deliver(e, b.key) == ["OPENAI_API_KEY"]
    await restart_ui(e, first)
    assert await pod_key(e) == b.key.get_secret_value()  # the pod's environment has B
    return a, b


# ---------------------------------------------------------------------------------------------- (a) the bug


async def test_persistence_on_the_app_keeps_the_first_key_while_the_pod_env_has_the_new_one(env: Env) -> None:
    """ENABLE_PERSISTENT_CONFIG absent (Open WebUI's default): after the first boot stored key A, key B in the
    Secret and a restart leave the APP on A -- and on 401s (no models) once A is deleted -- while the pod's
    $OPENAI_API_KEY is B. The smoke must not pass on the pod's env: it fails saying why."""
    use_deployment(env.sim, persistent_config=None)
    a, b = await rekey_after_first_boot(env)
    assert await app_models(env) == CHAT_ONLY  # B's scope would be FULL: the app still calls with A
    await gateway.delete_keys(env.gw, env.master, [a.key])
    assert await app_models(env) == []  # A is gone: the gateway answers the app 401, it lists nothing
    assert await pod_key(env) == b.key.get_secret_value()  # ...though its pod's environment holds a valid key

    with pytest.raises(SmokeFailed) as ei:
        await smoke(env)
    msg = str(ei.value)
    assert ei.value.hop == "frontend"
    assert "uses the OpenAI connection stored in its database at its first launch, not $OPENAI_API_KEY" in msg
    assert "cannot prove" in msg and f"{PERSISTENT_CONFIG_VAR}=False on deploy/{UI}" in msg
    assert a.key.get_secret_value() not in msg and b.key.get_secret_value() not in msg

    status = await persistent_config_status(env.api, SPEC, UI)
    assert (status.env_wins, status.source, status.loads_secret, status.can_set_in_secret) == (
        False,
        None,
        False,
        False,
    )


# ---------------------------------------------------------------------------------------------- (b) env wins


async def test_persistence_off_the_app_follows_the_new_key_and_the_smoke_passes(env: Env) -> None:
    """ENABLE_PERSISTENT_CONFIG=False (the sim's reference Deployment): the restarted app uses B."""
    use_deployment(env.sim)
    a, _ = await rekey_after_first_boot(env)
    assert await app_models(env) == FULL
    await gateway.delete_keys(env.gw, env.master, [a.key])
    assert await app_models(env) == FULL

    res = await smoke(env)
    assert res.checks[0].detail == ", ".join(FULL) and res.checks[0].name.endswith("(key from OPENAI_API_KEY)")
    assert PERSISTENT_CONFIG_VAR in res.checks[1].name
    status = await persistent_config_status(env.api, SPEC, UI)
    assert status.env_wins and status.source == "env[4].value"


async def test_openai_api_keys_wins_over_the_delivered_openai_api_key_and_the_smoke_names_it(env: Env) -> None:
    """Open WebUI's config.py reads OPENAI_API_KEYS when it is set and non-empty, OPENAI_API_KEY only otherwise.
    A Deployment that also sets OPENAI_API_KEYS (here to key A, coder-chat only) keeps the app on A whatever
    coder-stack delivers as OPENAI_API_KEY (key B, full scope): the smoke must not pass on B, and names the
    variable the app reads."""
    use_deployment(env.sim)
    a = await mint(env, "open-webui-old", CHAT_ONLY)
    b = await mint(env, "open-webui", FULL)
    await deliver(env, b.key)

    def _add_keys(store: Store) -> None:
        d = store.get("deployments", EXP, UI)
        c = d["spec"]["template"]["spec"]["containers"][0]
        c["env"].append({"name": "OPENAI_API_KEYS", "value": a.key.get_secret_value()})
        store.update("deployments", d)

    on_loop(env.sim, _add_keys)
    start_ui(env)
    assert await app_models(env) == CHAT_ONLY  # the app calls with A (OPENAI_API_KEYS), not B
    with pytest.raises(SmokeFailed) as ei:
        await smoke(env)
    msg = str(ei.value)
    assert ei.value.hop == "frontend" and "OPENAI_API_KEYS is set in the pod" in msg
    assert a.key.get_secret_value() not in msg and b.key.get_secret_value() not in msg


# ---------------------------------------------------------------------------------------------- (c) resolver


@pytest.fixture(scope="module")
def shared_sim() -> Iterator[SimStack]:
    """One sim for the resolver cases: they only rewrite deploy/open-webui's template (0 replicas)."""
    with SimStack(spec=SPEC, time_scale=SIM_SCALE, gpu_pool="static") as sim:
        yield sim


@pytest.fixture
async def api(shared_sim: SimStack) -> AsyncIterator[ApiClient]:
    async with open_api(ClusterTarget(kubeconfig=str(shared_sim.kubeconfig_path))) as client_:
        yield client_


def _val(value: str) -> dict[str, Any]:
    return {"name": PERSISTENT_CONFIG_VAR, "value": value}


def _skr(secret: str, key: str, optional: bool | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional is not None:
        ref["optional"] = optional
    return {"name": PERSISTENT_CONFIG_VAR, "valueFrom": {"secretKeyRef": ref}}


BASE = [{"name": "OPENAI_API_BASE_URL", "value": "http://gw/v1"}, {"name": "PORT", "value": "8080"}]
KEY_MARKER = "sk-never-in-a-report-0123456789"


async def status_of(sim: SimStack, api: ApiClient, env: list[dict[str, Any]], env_from: Any = None) -> Any:
    set_container(sim, env=BASE + env, env_from=env_from)
    return await persistent_config_status(api, SPEC, UI)


async def test_resolver_direct_env_value(shared_sim: SimStack, api: ApiClient) -> None:
    s = await status_of(shared_sim, api, [_val("False")])
    assert (s.env_wins, s.source, s.container) == (True, "env[2].value", "open-webui")
    for v in ("True", "true", "TRUE"):
        s = await status_of(shared_sim, api, [_val(v)])
        assert not s.env_wins and s.source == "env[2].value", v
        assert f"{PERSISTENT_CONFIG_VAR}=False on deploy/{UI}" in s.reason
    for v in ("false", "0", "no", ""):  # config.py: anything but 'true' turns persistence off
        assert (await status_of(shared_sim, api, [_val(v)])).env_wins, v
    # a later duplicate entry overrides an earlier one, as the kubelet builds the environment
    assert not (await status_of(shared_sim, api, [_val("False"), _val("True")])).env_wins
    assert (await status_of(shared_sim, api, [_val("True"), _val("False")])).env_wins
    s = await status_of(shared_sim, api, [])
    assert (s.env_wins, s.source) == (False, None)
    assert "does not set ENABLE_PERSISTENT_CONFIG" in s.reason and f"deploy/{UI}" in s.reason
    s = await status_of(shared_sim, api, [_val("$(OTHER)")])
    assert not s.env_wins and "$(...)" in s.reason


async def test_resolver_value_from_secret_and_config_map_refs(shared_sim: SimStack, api: ApiClient) -> None:
    put(shared_sim, "secrets", "owui-flags", {"persist": "False", "on": "True", "OPENAI_API_KEY": KEY_MARKER})
    put(shared_sim, "configmaps", "owui-cm", {"persist": "false"})
    s = await status_of(shared_sim, api, [_skr("owui-flags", "persist")])
    assert s.env_wins and s.source == f"env[2].valueFrom.secretKeyRef {EXP}/owui-flags key persist"
    assert not (await status_of(shared_sim, api, [_skr("owui-flags", "on")])).env_wins
    cm = {"name": PERSISTENT_CONFIG_VAR, "valueFrom": {"configMapKeyRef": {"name": "owui-cm", "key": "persist"}}}
    s = await status_of(shared_sim, api, [cm])
    assert s.env_wins and s.source == f"env[2].valueFrom.configMapKeyRef {EXP}/owui-cm key persist"
    # a missing non-optional reference: the pod cannot start, so nothing shows the environment wins
    s = await status_of(shared_sim, api, [_skr("owui-flags", "absent")])
    assert not s.env_wins and "cannot start" in s.reason
    assert not (await status_of(shared_sim, api, [_skr("no-such-secret", "persist")])).env_wins
    # an optional missing reference is skipped: the envFrom value below it applies
    put(shared_sim, "secrets", "owui-env", {PERSISTENT_CONFIG_VAR: "False"})
    s = await status_of(
        shared_sim, api, [_skr("owui-flags", "absent", optional=True)], [{"secretRef": {"name": "owui-env"}}]
    )
    assert s.env_wins and s.source == f"envFrom[0] secret {EXP}/owui-env"
    assert KEY_MARKER not in s.model_dump_json()


async def test_resolver_env_from_and_precedence(shared_sim: SimStack, api: ApiClient) -> None:
    sec = SPEC.openwebui_secret
    put(shared_sim, "secrets", sec, {PERSISTENT_CONFIG_VAR: "False", "OPENAI_API_KEY": KEY_MARKER})
    put(shared_sim, "configmaps", "owui-on", {PERSISTENT_CONFIG_VAR: "True"})
    whole = [{"secretRef": {"name": sec}}]
    s = await status_of(shared_sim, api, [], whole)
    assert (s.env_wins, s.source, s.loads_secret) == (True, f"envFrom[0] secret {EXP}/{sec}", True)
    # env overrides envFrom, both ways
    s = await status_of(shared_sim, api, [_val("True")], whole)
    assert (s.env_wins, s.source) == (False, "env[2].value")
    put(shared_sim, "configmaps", "owui-off", {PERSISTENT_CONFIG_VAR: "False"})
    assert (await status_of(shared_sim, api, [_val("False")], [{"configMapRef": {"name": "owui-on"}}])).env_wins
    # a later envFrom source overrides an earlier one
    on_then_secret = [{"configMapRef": {"name": "owui-on"}}, {"secretRef": {"name": sec}}]
    s = await status_of(shared_sim, api, [], on_then_secret)
    assert (s.env_wins, s.source) == (True, f"envFrom[1] secret {EXP}/{sec}")
    s = await status_of(shared_sim, api, [], list(reversed(on_then_secret)))
    assert (s.env_wins, s.source) == (False, f"envFrom[1] configmap {EXP}/owui-on")
    # a prefix renames the variable: OWUI_ENABLE_PERSISTENT_CONFIG is not the setting, and the Secret is not
    # loaded "whole" (a key written there would not reach ENABLE_PERSISTENT_CONFIG)
    s = await status_of(shared_sim, api, [], [{"secretRef": {"name": sec}, "prefix": "OWUI_"}])
    assert (s.env_wins, s.source, s.loads_secret) == (False, None, False)
    put(shared_sim, "configmaps", "owui-prefixed", {"PERSISTENT_CONFIG": "False"})  # ENABLE_ + PERSISTENT_CONFIG
    s = await status_of(shared_sim, api, [], [{"configMapRef": {"name": "owui-prefixed"}, "prefix": "ENABLE_"}])
    assert s.env_wins and s.source == f"envFrom[0] configmap {EXP}/owui-prefixed (prefix 'ENABLE_')"
    # a missing non-optional envFrom source: the pod cannot start; an optional one is skipped
    assert not (await status_of(shared_sim, api, [], [{"configMapRef": {"name": "gone"}}])).env_wins
    s = await status_of(shared_sim, api, [], [*whole, {"configMapRef": {"name": "gone", "optional": True}}])
    assert s.env_wins and s.source == f"envFrom[0] secret {EXP}/{sec}"
    assert KEY_MARKER not in s.model_dump_json()


async def test_setting_is_written_into_the_secret_only_when_it_takes_effect_and_nothing_sets_it(
    shared_sim: SimStack, api: ApiClient
) -> None:
    sec = SPEC.openwebui_secret
    whole = [{"secretRef": {"name": sec}}]

    async def secret_value() -> str | None:
        data = await read_secret(api, EXP, sec) or {}
        v = data.get(PERSISTENT_CONFIG_VAR)
        return None if v is None else v.get_secret_value()

    # an explicit user value in the Secret is never overridden
    put(shared_sim, "secrets", sec, {PERSISTENT_CONFIG_VAR: "True", "OPENAI_API_KEY": KEY_MARKER})
    s = await status_of(shared_sim, api, [], whole)
    assert (s.env_wins, s.can_set_in_secret) == (False, False)
    assert await set_env_wins_in_secret(api, SPEC, UI) == [] and await secret_value() == "True"
    # set on the Deployment (even to 'true'): writing the Secret would not take effect, so it is not written
    put(shared_sim, "secrets", sec, {"OPENAI_API_KEY": KEY_MARKER})
    s = await status_of(shared_sim, api, [_val("True")], whole)
    assert (s.loads_secret, s.can_set_in_secret) == (True, False)
    assert await set_env_wins_in_secret(api, SPEC, UI, s) == [] and await secret_value() is None
    # the Secret is read per key, not loaded whole: nothing to write into
    s = await status_of(
        shared_sim,
        api,
        [{"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": sec, "key": "OPENAI_API_KEY"}}}],
    )
    assert (s.loads_secret, s.can_set_in_secret) == (False, False)
    assert await set_env_wins_in_secret(api, SPEC, UI) == [] and await secret_value() is None
    # loaded whole and set nowhere: written once, the key kept
    s = await status_of(shared_sim, api, [], whole)
    assert (s.env_wins, s.loads_secret, s.can_set_in_secret) == (False, True, True)
    assert await set_env_wins_in_secret(api, SPEC, UI) == [PERSISTENT_CONFIG_VAR]
    assert await secret_value() == "False" and await set_env_wins_in_secret(api, SPEC, UI) == []
    after = await persistent_config_status(api, SPEC, UI)
    assert (after.env_wins, after.source) == (True, f"envFrom[0] secret {EXP}/{sec}")
    assert ((await read_secret(api, EXP, sec)) or {})["OPENAI_API_KEY"].get_secret_value() == KEY_MARKER
    # a stale status (someone set the key since): still not overridden
    put(shared_sim, "secrets", sec, {"OPENAI_API_KEY": KEY_MARKER})
    stale = await persistent_config_status(api, SPEC, UI)
    assert stale.can_set_in_secret
    put(shared_sim, "secrets", sec, {PERSISTENT_CONFIG_VAR: "True", "OPENAI_API_KEY": KEY_MARKER})
    assert await set_env_wins_in_secret(api, SPEC, UI, stale) == [] and await secret_value() == "True"


# ---------------------------------------------------------------------------------------------- (d) envFrom fix


async def test_setting_delivered_into_the_env_from_secret_makes_the_restarted_app_follow_the_new_key(
    env: Env,
) -> None:
    """deploy/open-webui loads openwebui-secrets whole via envFrom and sets no ENABLE_PERSISTENT_CONFIG:
    writing it into the Secret (with the new key, one restart) makes the app use the new key."""
    use_deployment(env.sim, persistent_config=None, secret_via_env_from=True)
    before = await persistent_config_status(env.api, SPEC, UI)
    assert isinstance(before, PersistentConfigStatus)
    assert (before.env_wins, before.loads_secret, before.can_set_in_secret) == (False, True, True)
    assert "(or in the Secret openwebui-secrets it loads via envFrom)" in before.reason

    a = await mint(env, "open-webui", CHAT_ONLY)
    await deliver(env, a.key)
    first = start_ui(env)
    assert await app_models(env) == CHAT_ONLY  # the first boot stored A (persistence on)

    assert await set_env_wins_in_secret(env.api, SPEC, UI) == [PERSISTENT_CONFIG_VAR]
    b = await mint(env, "open-webui-next", FULL)
    await deliver(env, b.key)
    await restart_ui(env, first)
    await gateway.delete_keys(env.gw, env.master, [a.key])
    assert await pod_key(env) == b.key.get_secret_value()
    assert await app_models(env) == FULL  # the app now follows its environment: B
    res = await smoke(env)
    assert len(res.checks) == 2
    after = await persistent_config_status(env.api, SPEC, UI)
    assert (after.env_wins, after.source) == (True, f"envFrom[0] secret {EXP}/{SPEC.openwebui_secret}")


# ---------------------------------------------------------------------------------------------- keys flow


async def test_rotation_is_refused_when_open_webui_would_keep_its_stored_key_and_nothing_changes(env: Env) -> None:
    """No ENABLE_PERSISTENT_CONFIG and the Secret loaded key by key: a rotated key would reach the pod but not
    the app, which fails once the old key is deleted. ensure_key refuses before touching anything."""
    from coder_stack.errors import DeliveryRefused
    from coder_stack.usecases.keys import ensure_key

    use_deployment(env.sim, persistent_config=None)
    first = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("open-webui"))
    assert first.action == "minted"
    assert any("may go on using the key stored at its first launch" in n for n in first.notes), first.notes
    secret_before = await read_secret(env.api, EXP, SPEC.openwebui_secret)
    keys_before = await gateway.list_keys_by_alias(env.gw, env.master, "open-webui")

    with pytest.raises(DeliveryRefused, match=r"not rotating 'open-webui'.*ENABLE_PERSISTENT_CONFIG=False.*Nothing"):
        await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("open-webui"), rotate=True)
    after = await read_secret(env.api, EXP, SPEC.openwebui_secret)
    assert {k: v.get_secret_value() for k, v in (after or {}).items()} == {
        k: v.get_secret_value() for k, v in (secret_before or {}).items()
    }
    assert await gateway.list_keys_by_alias(env.gw, env.master, "open-webui") == keys_before
    assert "rotating.open-webui" not in (await read_secret(env.api, "litellm", SPEC.keystore_secret) or {})


async def test_rotation_through_an_env_from_secret_sets_the_variable_and_the_app_follows(env: Env) -> None:
    from coder_stack.usecases.keys import ensure_key

    use_deployment(env.sim, persistent_config=None, secret_via_env_from=True)
    minted = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("open-webui"))
    assert any("set ENABLE_PERSISTENT_CONFIG=False" in n for n in minted.notes), minted.notes
    assert (await read_secret(env.api, EXP, SPEC.openwebui_secret) or {})[PERSISTENT_CONFIG_VAR].get_secret_value() == (
        "False"
    )
    first = start_ui(env)
    assert await app_models(env) == FULL
    # a restart stamp from the mint's restart would equal the rotation's within the same second: clear it
    body = {"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "cleared"}}}}}
    await client.AppsV1Api(env.api).patch_namespaced_deployment(UI, EXP, body)
    first = await wait_rolled(env, first)

    rep = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("open-webui"), rotate=True)
    assert rep.action == "rotated" and rep.consumer_restarted
    await wait_rolled(env, first)  # the restart ensure_key asked for
    assert await app_models(env) == FULL  # the old key is deleted: the app lists models only with the new one
    new = (await read_secret(env.api, EXP, SPEC.openwebui_secret) or {})["OPENAI_API_KEY"]
    assert await pod_key(env) == new.get_secret_value()
