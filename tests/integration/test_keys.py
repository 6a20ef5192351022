"""ensure_key end to end on the simulated cluster: keys minted into their home Secrets, idempotent by alias,
drift corrected in place, re-minted when deleted behind our back, rotated without an invalid home key,
consumers restarted only when their key changed, WEBUI_SECRET_KEY never replaced, no key in any report/log."""

from __future__ import annotations

import logging
import tomllib
from collections.abc import AsyncIterator

import pytest
from kubernetes_asyncio import client
from pydantic import SecretStr
from simstack.stack import SimStack

from coder_stack.errors import NotFound
from coder_stack.kubernetes.client import ClusterTarget, delete_secret_keys, read_secret
from coder_stack.litellm import admin as gateway
from coder_stack.spec import StackSpec
from coder_stack.usecases.keys import KeyReport, ensure_key, read_client_key
from tests.conftest import SimClients, sim_clients

SPEC = StackSpec()
EXP = SPEC.experience_namespace
HOMES = [(EXP, "openwebui-secrets"), (EXP, "tabby-config"), ("litellm", "coder-stack-keys")]


Env = SimClients


@pytest.fixture
async def env(sim: SimStack) -> AsyncIterator[Env]:
    async with sim_clients(sim, SPEC) as e:
        yield e


async def ensure_all(e: Env, *, rotate: bool = False) -> dict[str, KeyReport]:
    out = {}
    for ks in SPEC.virtual_keys:
        out[ks.alias] = await ensure_key(e.api, e.gw, e.master, SPEC, ks, rotate=rotate)
    return out


async def data(e: Env, ns: str, name: str) -> dict[str, str]:
    d = await read_secret(e.api, ns, name)
    return {k: v.get_secret_value() for k, v in (d or {}).items()}


async def restarted_at(e: Env, name: str) -> str | None:
    dep = await client.AppsV1Api(e.api).read_namespaced_deployment(name, EXP)
    return (dep.spec.template.metadata.annotations or {}).get("kubectl.kubernetes.io/restartedAt")


async def restamp(e: Env, name: str) -> None:
    """Clear the restart stamp so a later restart is visible even within the same second."""
    body = {"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "cleared"}}}}}
    await client.AppsV1Api(e.api).patch_namespaced_deployment(name, EXP, body)


def tabby_cfg(text: str) -> dict[str, str]:
    return tomllib.loads(text)["model"]["completion"]["http"]


async def test_first_run_mints_scoped_budgeted_keys_into_their_homes(env: Env) -> None:
    reports = await ensure_all(env)
    assert {a: r.action for a, r in reports.items()} == {
        "open-webui": "minted",
        "tabby": "minted",
        "coder-agent": "minted",
    }
    assert reports["open-webui"].delivered_to == "experience/openwebui-secrets:OPENAI_API_KEY"
    assert reports["open-webui"].consumer_restarted and reports["tabby"].consumer_restarted
    assert not reports["coder-agent"].consumer_restarted and reports["coder-agent"].consumer is None

    ow = await data(env, EXP, "openwebui-secrets")
    assert ow["OPENAI_API_KEY"].startswith("sk-") and len(ow["WEBUI_SECRET_KEY"]) == 64
    cfg = tabby_cfg((await data(env, EXP, "tabby-config"))["config.toml"])
    assert cfg["kind"] == "vllm/completion" and cfg["model_name"] == "coder-fim"
    assert cfg["api_endpoint"] == "http://litellm.litellm.svc.cluster.local:4000/v1"
    assert cfg["prompt_template"] == "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    ks = await data(env, "litellm", "coder-stack-keys")
    assert ks["coder-agent"].startswith("sk-")

    for k in SPEC.virtual_keys:
        info = await gateway.key_info(env.gw, env.master, await read_client_key(env.api, SPEC, k.alias))
        assert info is not None and info.alias == k.alias
        assert sorted(info.models) == sorted(k.models) and info.max_budget == k.max_budget
        assert info.token is None and info.problem() is None  # /key/info never carries the hash (key-info-*)
        [listed] = await gateway.list_keys_by_alias(env.gw, env.master, k.alias)
        assert listed.token == reports[k.alias].token_id
    secrets = [ow["OPENAI_API_KEY"], ks["coder-agent"], cfg["api_key"]]
    for r in reports.values():
        assert all(s not in r.model_dump_json() for s in secrets)


async def test_minting_twice_changes_nothing(env: Env) -> None:
    await ensure_all(env)
    before = {n: await data(env, ns, n) for ns, n in HOMES}
    stamps = {n: await restarted_at(env, n) for n in ("open-webui", "tabby")}
    second = await ensure_all(env)
    assert {r.action for r in second.values()} == {"kept"}
    assert not any(r.consumer_restarted for r in second.values())
    after = {n: await data(env, ns, n) for ns, n in HOMES}
    assert after == before
    assert {n: await restarted_at(env, n) for n in ("open-webui", "tabby")} == stamps
    for k in SPEC.virtual_keys:
        assert len(await gateway.list_keys_by_alias(env.gw, env.master, k.alias)) == 1


async def test_scope_and_budget_drift_is_corrected_in_place_without_a_restart(env: Env) -> None:
    first = await ensure_all(env)
    token = first["open-webui"].token_id
    assert token is not None
    await gateway.update_key(env.gw, env.master, token, models=["coder-chat"], max_budget=0.5)
    value = (await data(env, EXP, "openwebui-secrets"))["OPENAI_API_KEY"]
    await restamp(env, "open-webui")
    rep = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("open-webui"))
    assert rep.action == "updated" and rep.token_id == token and not rep.consumer_restarted
    assert "models" in rep.notes[0] and "max_budget 0.5 -> 5.0" in rep.notes[0]
    info = await gateway.key_info(env.gw, env.master, SecretStr(value))
    assert info is not None and sorted(info.models) == sorted(SPEC.key("open-webui").models) and info.max_budget == 5
    assert (await data(env, EXP, "openwebui-secrets"))["OPENAI_API_KEY"] == value
    assert await restarted_at(env, "open-webui") == "cleared"


async def test_key_deleted_in_the_gateway_is_reminted_and_redelivered(env: Env) -> None:
    first = await ensure_all(env)
    old_cfg = (await data(env, EXP, "tabby-config"))["config.toml"]
    webui_before = (await data(env, EXP, "openwebui-secrets"))["WEBUI_SECRET_KEY"]
    tabby_token = first["tabby"].token_id
    assert tabby_token is not None
    await gateway.delete_keys(env.gw, env.master, [tabby_token])
    await restamp(env, "tabby")
    rep = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("tabby"))
    # LiteLLM answers /key/info for a deleted key with 200 and status "deleted" (recorded: key-info-deleted-*)
    assert rep.action == "reminted" and rep.consumer_restarted and rep.problem == "deleted"
    assert "is deleted in the gateway" in rep.notes[0]
    new_key = tabby_cfg((await data(env, EXP, "tabby-config"))["config.toml"])["api_key"]
    assert new_key != tabby_cfg(old_cfg)["api_key"]
    info = await gateway.key_info(env.gw, env.master, SecretStr(new_key))
    assert info is not None and info.alias == "tabby"
    assert await restarted_at(env, "tabby") not in (None, "cleared")
    assert (await data(env, EXP, "openwebui-secrets"))["WEBUI_SECRET_KEY"] == webui_before


async def test_alias_whose_value_we_lost_is_replaced_and_said_so(env: Env) -> None:
    first = await ensure_all(env)
    await delete_secret_keys(env.api, "litellm", "coder-stack-keys", ["coder-agent"])
    with pytest.raises(NotFound, match="mint it first"):
        await read_client_key(env.api, SPEC, "coder-agent")
    rep = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("coder-agent"))
    assert rep.action == "reminted" and rep.token_id != first["coder-agent"].token_id
    assert any("existed in the gateway but its value is not in" in n for n in rep.notes)
    [only] = await gateway.list_keys_by_alias(env.gw, env.master, "coder-agent")
    assert only.token == rep.token_id
    old_token = first["coder-agent"].token_id
    assert old_token is not None
    gone = await gateway.key_info_by_token(env.gw, env.master, old_token)
    assert gone is not None and gone.problem() == "deleted"


async def test_rotation_swaps_in_a_new_key_then_deletes_the_old(env: Env) -> None:
    await ensure_all(env)
    old = await data(env, EXP, "openwebui-secrets")
    await restamp(env, "open-webui")
    rep = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("open-webui"), rotate=True)
    assert rep.action == "rotated" and rep.consumer_restarted
    new = await data(env, EXP, "openwebui-secrets")
    assert new["OPENAI_API_KEY"] != old["OPENAI_API_KEY"]
    assert new["WEBUI_SECRET_KEY"] == old["WEBUI_SECRET_KEY"]  # signs sessions: never replaced
    gone = await gateway.key_info(env.gw, env.master, SecretStr(old["OPENAI_API_KEY"]))
    assert gone is not None and gone.problem() == "deleted"
    info = await gateway.key_info(env.gw, env.master, SecretStr(new["OPENAI_API_KEY"]))
    assert info is not None and info.alias == "open-webui"
    assert len(await gateway.list_keys_by_alias(env.gw, env.master, "open-webui")) == 1
    again = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("open-webui"))
    assert again.action == "kept"


async def test_no_key_value_in_reports_logs_or_errors(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    reports = list((await ensure_all(env)).values())
    reports += list((await ensure_all(env, rotate=True)).values())
    values = [
        (await data(env, EXP, "openwebui-secrets"))["OPENAI_API_KEY"],
        (await data(env, EXP, "openwebui-secrets"))["WEBUI_SECRET_KEY"],
        tabby_cfg((await data(env, EXP, "tabby-config"))["config.toml"])["api_key"],
        (await data(env, "litellm", "coder-stack-keys"))["coder-agent"],
        env.sim.secrets["master_key"],
    ]
    text = "\n".join(r.getMessage() for r in caplog.records) + "".join(r.model_dump_json() for r in reports)
    text += "".join(repr(r) for r in reports)
    for v in values:
        assert v not in text


# ------------------------------------------------------------------ keys that exist but cannot be used
def set_key_fields(e: Env, alias: str, **fields: object) -> None:
    """Change a key's row in the simulated gateway's database (as an admin or time would)."""

    def _set(_store: object) -> None:
        [rec] = [r for r in e.sim.services.litellm_db["keys"].values() if r.get("key_alias") == alias]
        rec.update(fields)

    e.sim.call(_set, e.sim.store)


async def test_expired_key_is_replaced_redelivered_and_its_consumer_restarted(env: Env) -> None:
    first = await ensure_all(env)
    old = tabby_cfg((await data(env, EXP, "tabby-config"))["config.toml"])["api_key"]
    set_key_fields(env, "tabby", expires="2020-01-01T00:00:00+00:00")
    await restamp(env, "tabby")
    rep = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("tabby"))
    assert rep.action == "reminted" and rep.problem == "expired" and rep.consumer_restarted
    assert rep.token_id != first["tabby"].token_id
    new = tabby_cfg((await data(env, EXP, "tabby-config"))["config.toml"])["api_key"]
    assert new != old
    info = await gateway.key_info(env.gw, env.master, SecretStr(new))
    assert info is not None and info.problem() is None
    assert len(await gateway.list_keys_by_alias(env.gw, env.master, "tabby")) == 1  # the expired one is deleted


@pytest.mark.parametrize(
    ("fields", "problem", "advice"),
    [
        ({"blocked": True}, "blocked", "POST /key/unblock"),
        ({"spend": 6.0}, "over budget", "raise max_budget"),
    ],
)
async def test_blocked_or_spent_key_is_reported_and_left_as_it_is(
    env: Env, fields: dict[str, object], problem: str, advice: str
) -> None:
    """Replacing these would undo an admin's block or a budget: nothing changes, the report says what to do."""
    await ensure_all(env)
    before = {n: await data(env, ns, n) for ns, n in HOMES}
    set_key_fields(env, "open-webui", **fields)
    await restamp(env, "open-webui")
    rep = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("open-webui"))
    assert rep.action == "unusable" and not rep.usable and rep.problem == problem
    assert advice in rep.notes[-1]
    assert {n: await data(env, ns, n) for ns, n in HOMES} == before
    assert await restarted_at(env, "open-webui") == "cleared"
    assert len(await gateway.list_keys_by_alias(env.gw, env.master, "open-webui")) == 1


async def test_ensure_keys_task_fails_naming_the_unusable_key_after_handling_the_rest(env: Env) -> None:
    from coder_stack.errors import KeyUnusable
    from coder_stack.tasks.gateway import ensure_keys_task

    await ensure_all(env)
    set_key_fields(env, "tabby", blocked=True)
    target = ClusterTarget(kubeconfig=str(env.sim.kubeconfig_path))
    with pytest.raises(KeyUnusable, match="key 'tabby' is blocked") as err:
        await ensure_keys_task.fn(target, SPEC)
    assert env.sim.secrets["master_key"] not in str(err.value)


def test_key_records_follow_the_recorded_key_info_answers() -> None:
    """/key/info carries no hash and keeps answering 200 for deleted keys (recorded LiteLLM 1.108.7)."""
    from simstack import recordings

    live = recordings.exchange(recordings.LITELLM, "key-info-by-value").body["info"]
    dead = recordings.exchange(recordings.LITELLM, "key-info-deleted-by-value").body["info"]
    rec, gone = gateway._record(live), gateway._record(dead)
    assert rec.token is None and rec.problem() is None and rec.alias == "open-webui"
    assert gone.token is None and gone.problem() == "deleted"
    assert gateway._record({**live, "status": "something-new"}).problem() == "something-new"


# ------------------------------------------------------------------ rotation interrupted at every step
async def live_keys_for(e: Env, alias: str) -> list[dict[str, object]]:
    """Every live key of ``alias`` or of its ``<alias>-retired-*`` stand-ins (the whole /key/list)."""
    resp = await e.gw.get(
        "/key/list",
        params={"return_full_object": "true", "size": "100"},
        headers={"Authorization": f"Bearer {e.sim.secrets['master_key']}"},
    )
    keys = resp.json()["keys"]
    return [k for k in keys if k["key_alias"] == alias or str(k["key_alias"]).startswith(f"{alias}-retired-")]


async def assert_one_usable_key_and_it_is_at_home(e: Env, alias: str) -> None:
    import hashlib

    home = (await data(e, EXP, "openwebui-secrets"))["OPENAI_API_KEY"]
    live = await live_keys_for(e, alias)
    usable = []
    for k in live:
        info = await gateway.key_info_by_token(e.gw, e.master, str(k["token"]))
        if info is not None and info.problem() is None:
            usable.append(k)
    assert len(usable) == 1, f"usable keys for {alias!r}: {[k['key_alias'] for k in usable]}"
    assert usable[0]["token"] == hashlib.sha256(home.encode()).hexdigest()  # LiteLLM's token is sha256(key)


class Interrupt(Exception):
    pass


ROTATION_STEPS = ["rename", "mint", "deliver", "restart", "delete-old", "clear-marker"]


@pytest.mark.parametrize("how", ["503", "cancelled"])
@pytest.mark.parametrize("step", ROTATION_STEPS)
async def test_rotation_interrupted_at_any_step_leaves_one_usable_key_the_one_at_home(
    env: Env, monkeypatch: pytest.MonkeyPatch, step: str, how: str
) -> None:
    import asyncio

    from coder_stack.errors import EndpointUnavailable
    from coder_stack.usecases import keys

    await ensure_all(env)
    exc: BaseException = EndpointUnavailable("the gateway answered 503") if how == "503" else asyncio.CancelledError()
    fired: list[str] = []

    def once(name: str, fn: object, when: object = None) -> None:
        async def wrapper(*a: object, **kw: object) -> object:
            if not fired and (when is None or when(*a, **kw)):  # type: ignore[operator]
                fired.append(name)
                raise exc
            return await fn(*a, **kw)  # type: ignore[operator]

        monkeypatch.setattr(keys, name, wrapper)

    if step == "rename":
        once("update_key", keys.update_key, lambda *a, **kw: str(kw.get("alias", "")).startswith("open-webui-retired"))
    elif step == "mint":
        once("generate_key", keys.generate_key)
    elif step == "deliver":
        once("_deliver", keys._deliver)
    elif step == "restart":
        once("_restart_consumer", keys._restart_consumer)
    elif step == "delete-old":
        once("delete_keys", keys.delete_keys)
    else:
        once("_clear_marker", keys._clear_marker)

    if how == "503" and step in ("restart", "delete-old", "clear-marker"):
        # the new key was home: the run's own tidy-up finished the rotation, and the report says so
        rep = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("open-webui"), rotate=True)
        assert rep.action == "rotated" and any("finished this run's interrupted rotation" in n for n in rep.notes)
    else:
        with pytest.raises(type(exc)):
            await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("open-webui"), rotate=True)
    assert fired == [{"rename": "update_key", "mint": "generate_key", "deliver": "_deliver",
                      "restart": "_restart_consumer", "delete-old": "delete_keys",
                      "clear-marker": "_clear_marker"}[step]]  # fmt: skip
    await assert_one_usable_key_and_it_is_at_home(env, "open-webui")
    assert "rotating.open-webui" not in await data(env, "litellm", "coder-stack-keys")

    again = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("open-webui"))
    assert again.action == "kept"
    await assert_one_usable_key_and_it_is_at_home(env, "open-webui")
    assert [k["key_alias"] for k in await live_keys_for(env, "open-webui")] == ["open-webui"]


async def test_rotation_cut_short_before_it_could_tidy_up_is_finished_by_the_next_run(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As if the process died after the old key was renamed: the marker stays, the next run undoes it."""
    from coder_stack.errors import EndpointUnavailable, GatewayRequestError
    from coder_stack.usecases import keys

    await ensure_all(env)
    real_generate, real_recover = keys.generate_key, keys.recover_rotation

    async def down(*a: object, **kw: object) -> object:
        raise EndpointUnavailable("the gateway answered 503")

    calls: list[int] = []

    async def recover_then_down(*a: object, **kw: object) -> object:
        calls.append(1)
        if len(calls) == 1:  # the check at the start of the run (nothing to recover yet)
            return await real_recover(*a, **kw)  # type: ignore[arg-type]
        raise EndpointUnavailable("the gateway answered 503")

    monkeypatch.setattr(keys, "generate_key", down)
    monkeypatch.setattr(keys, "recover_rotation", recover_then_down)
    with pytest.raises(GatewayRequestError, match="run keys again"):
        await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("open-webui"), rotate=True)
    assert "rotating.open-webui" in await data(env, "litellm", "coder-stack-keys")
    await assert_one_usable_key_and_it_is_at_home(env, "open-webui")  # the old key, under its retired alias

    monkeypatch.setattr(keys, "generate_key", real_generate)
    monkeypatch.setattr(keys, "recover_rotation", real_recover)
    rep = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("open-webui"))
    assert rep.action == "kept" and any("undid this run's interrupted rotation" in n for n in rep.notes)
    assert [k["key_alias"] for k in await live_keys_for(env, "open-webui")] == ["open-webui"]
    assert "rotating.open-webui" not in await data(env, "litellm", "coder-stack-keys")
