"""Keys against what the real gateway does and what several runs do at once (issue 17: 1, 10, 12 and the
rotation whose answer was lost).

- a key blocked with /key/block (LiteLLM: status "revoked", blocked: true) is called blocked, never re-minted
  around, and the advice says how to unblock it or replace it on purpose (``keys --rotate``);
- a rotation marker names its owner: only the owner, or anyone once the owner is dead, finishes or undoes it;
  a retry of the owner does not rotate twice; a cancellation in the middle is tidied up;
- the gateway acted (renamed, minted, deleted) but its answer was lost: the rotation ends finished or undone,
  the consumer's key works, no key is lost or orphaned;
- Tabby's config.toml: only the gateway sections' ``api_key`` changes; a user's section survives byte for byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from kubernetes_asyncio import client
from pydantic import SecretStr
from simstack.stack import SimStack

from coder_stack.errors import KeyUnusable
from coder_stack.kubernetes.client import ClusterTarget, read_secret, write_secret_keys
from coder_stack.litellm import admin as gateway
from coder_stack.spec import StackSpec
from coder_stack.usecases import keys
from coder_stack.usecases.keys import RotationOwner, ensure_key, process_owner
from tests.conftest import SimClients, sim_clients

SPEC = StackSpec()
EXP = SPEC.experience_namespace
ALIAS = "open-webui"
Env = SimClients


@pytest.fixture
async def env(sim: SimStack) -> AsyncIterator[Env]:
    async with sim_clients(sim, SPEC) as e:
        yield e


def flow_owner() -> RotationOwner:
    return RotationOwner(f"flow-run:{uuid.uuid4()}")


async def data(e: Env, ns: str, name: str) -> dict[str, str]:
    d = await read_secret(e.api, ns, name)
    return {k: v.get_secret_value() for k, v in (d or {}).items()}


async def home_key(e: Env) -> str:
    return (await data(e, EXP, "openwebui-secrets"))["OPENAI_API_KEY"]


async def admin(e: Env, path: str, body: dict[str, object]) -> httpx.Response:
    r = await e.gw.post(path, json=body, headers={"Authorization": f"Bearer {e.sim.secrets['master_key']}"})
    assert r.status_code == 200, r.text
    return r


async def all_keys(e: Env) -> list[dict[str, object]]:
    r = await e.gw.get(
        "/key/list",
        params={"return_full_object": "true", "size": "100"},
        headers={"Authorization": f"Bearer {e.sim.secrets['master_key']}"},
    )
    return list(r.json()["keys"])


async def restarted_at(e: Env, name: str) -> str | None:
    dep = await client.AppsV1Api(e.api).read_namespaced_deployment(name, EXP)
    return (dep.spec.template.metadata.annotations or {}).get("kubectl.kubernetes.io/restartedAt")


async def restamp(e: Env, name: str) -> None:
    body = {"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "cleared"}}}}}
    await client.AppsV1Api(e.api).patch_namespaced_deployment(name, EXP, body)


async def chat_status(e: Env, key: str) -> tuple[int, str]:
    """Does the gateway accept the key? (/v1/models authenticates it like a call, with no model running.)"""
    r = await e.gw.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    return r.status_code, r.text


async def assert_one_working_key_at_home(e: Env) -> None:
    """Exactly one live key holds the alias or a retired alias of it, it is the one at home, it works
    (the gateway accepts it), and no marker is left."""
    home = await home_key(e)
    mine = [k for k in await all_keys(e) if str(k["key_alias"]).startswith(ALIAS)]
    assert [k["key_alias"] for k in mine] == [ALIAS], mine
    assert mine[0]["token"] == hashlib.sha256(home.encode()).hexdigest()
    info = await gateway.key_info(e.gw, e.master, SecretStr(home))
    assert info is not None and info.problem() is None
    assert (await data(e, "litellm", "coder-stack-keys")).get(f"rotating.{ALIAS}") is None


# ------------------------------------------------------------------ 1: a blocked key
async def test_a_blocked_key_is_called_blocked_never_reminted_and_the_advice_undoes_or_replaces_it(env: Env) -> None:
    first = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS))
    value = await home_key(env)
    await admin(env, "/key/block", {"key": value})  # an administrator's decision, through the gateway's API
    homes_before = await data(env, EXP, "openwebui-secrets")
    await restamp(env, "open-webui")

    target = ClusterTarget(kubeconfig=str(env.sim.kubeconfig_path))
    from coder_stack.tasks.gateway import ensure_keys_task  # bring-up, validate, swap and keys all ensure keys with it

    with pytest.raises(KeyUnusable) as err:
        await ensure_keys_task.fn(target, SPEC, [ALIAS])
    msg = str(err.value)
    assert "key 'open-webui' is blocked" in msg and "revoked" not in msg and "/key/delete" not in msg
    assert f'POST /key/unblock {{"key": "{first.token_id}"}}' in msg
    assert "coder-stack keys --rotate --alias open-webui" in msg
    assert value not in msg and env.sim.secrets["master_key"] not in msg
    # nothing rotated, re-minted or deleted; the consumer not restarted
    assert await data(env, EXP, "openwebui-secrets") == homes_before
    assert [k["token"] for k in await all_keys(env) if k["key_alias"] == ALIAS] == [first.token_id]
    assert await restarted_at(env, "open-webui") == "cleared"
    assert (await chat_status(env, value))[0] == 401

    # the administrator unblocks it: the same key is kept and works again
    await admin(env, "/key/unblock", {"key": first.token_id})
    again = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS))
    assert again.action == "kept" and again.token_id == first.token_id
    assert (await chat_status(env, value))[0] == 200


async def test_a_blocked_key_whose_value_is_lost_is_not_deleted_and_rotate_replaces_a_blocked_key(env: Env) -> None:
    first = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS))
    await admin(env, "/key/block", {"key": first.token_id})
    # the value is gone from its home: the blocked key still holds the alias, it is not deleted around
    await write_secret_keys(env.api, EXP, "openwebui-secrets", {"OPENAI_API_KEY": SecretStr("")})
    rep = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS))
    assert rep.action == "unusable" and rep.problem == "blocked" and "/key/unblock" in rep.notes[-1]
    assert [k["token"] for k in await all_keys(env) if k["key_alias"] == ALIAS] == [first.token_id]

    # replacing it on purpose: --rotate
    await admin(env, "/key/unblock", {"key": first.token_id})
    await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS))  # mints: the old value was lost
    blocked = await home_key(env)
    await admin(env, "/key/block", {"key": blocked})
    rotated = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS), rotate=True)
    assert rotated.action == "rotated"
    await assert_one_working_key_at_home(env)
    assert await home_key(env) != blocked
    gone = await gateway.key_info(env.gw, env.master, SecretStr(blocked))
    assert gone is not None and gone.problem() == "deleted"


def test_the_recorded_blocked_and_expired_answers_read_as_blocked_and_expired() -> None:
    from simstack import recordings

    blocked = recordings.exchange(recordings.LITELLM, "key-info-blocked").body["info"]
    expired = recordings.exchange(recordings.LITELLM, "key-info-expired").body["info"]
    assert blocked["status"] == "revoked" and gateway._record(blocked).problem() == "blocked"
    assert gateway._record(expired).problem() == "expired"


async def test_an_expired_key_through_the_gateway_is_reminted(env: Env) -> None:
    """Recorded (key-generate-expiring ... chat-expired-key): the key's life ended; a new one is minted."""
    first = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS))
    old = await home_key(env)
    r = await admin(env, "/key/update", {"key": first.token_id, "duration": "1s"})
    assert r.json()["token"] == first.token_id

    async def expired() -> bool:
        info = await gateway.key_info(env.gw, env.master, SecretStr(old))
        return info is not None and info.problem() == "expired"

    for _ in range(200):  # the key expires after 1 s of wall clock: ask until it has
        if await expired():
            break
        await asyncio.sleep(0.05)
    assert await expired()
    assert (await chat_status(env, old))[0] == 401
    rep = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS))
    assert rep.action == "reminted" and rep.problem == "expired"
    await assert_one_working_key_at_home(env)
    assert (await chat_status(env, await home_key(env)))[0] == 200


# ------------------------------------------------------------------ 10: whose rotation is it?
class Gate:
    """Pause the rotation right after the gateway renamed the old key, until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached = asyncio.Event()
        self.go = asyncio.Event()
        real = keys.generate_key

        async def paused(*a: object, **kw: object) -> object:
            self.reached.set()
            await self.go.wait()
            return await real(*a, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(keys, "generate_key", paused)
        self.real = real


async def test_a_bring_up_beside_a_rotation_in_flight_leaves_it_alone(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS))
    gate = Gate(monkeypatch)
    rotator = asyncio.create_task(
        ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS), rotate=True, owner=flow_owner())
    )
    await gate.reached.wait()  # the old key is renamed, the marker written, nothing minted yet
    monkeypatch.setattr(keys, "owner_alive", _always_alive)
    bringup = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS), owner=flow_owner())
    assert bringup.action == "kept" and "in flight; left to it" in bringup.notes[0]
    assert (await data(env, "litellm", "coder-stack-keys")).get(f"rotating.{ALIAS}") is not None
    gate.go.set()
    rotated = await rotator
    assert rotated.action == "rotated"
    await assert_one_working_key_at_home(env)
    assert (await chat_status(env, await home_key(env)))[0] == 200


async def _always_alive(owner: RotationOwner, since: object) -> bool:
    return True


async def test_a_retry_of_the_owner_does_not_rotate_twice(env: Env) -> None:
    await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS))
    run = flow_owner()
    first = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS), rotate=True, owner=run)
    after_first = await home_key(env)
    retry = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS), rotate=True, owner=run)
    assert first.action == retry.action == "rotated" and "not rotating it twice" in retry.notes[-1]
    assert await home_key(env) == after_first
    other = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS), rotate=True, owner=flow_owner())
    assert other.action == "rotated" and await home_key(env) != after_first  # another run rotates, on purpose
    await assert_one_working_key_at_home(env)


async def test_a_rotation_cancelled_in_the_middle_is_tidied_up(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS))
    old = await home_key(env)
    gate = Gate(monkeypatch)
    rotator = asyncio.create_task(
        ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS), rotate=True, owner=flow_owner())
    )
    await gate.reached.wait()
    rotator.cancel()
    with pytest.raises(asyncio.CancelledError):
        await rotator
    assert await home_key(env) == old
    await assert_one_working_key_at_home(env)


def _dead_process_owner() -> RotationOwner:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    owner = process_owner(proc.pid)
    proc.kill()
    proc.wait()
    return owner


@pytest.mark.parametrize("owner_state", ["killed", "alive"])
async def test_a_rotation_whose_owner_was_killed_is_undone_by_the_next_run_and_a_live_ones_is_not(
    env: Env, monkeypatch: pytest.MonkeyPatch, owner_state: str
) -> None:
    """The owner's process stops after the rename (the marker stays): a killed owner's rotation is undone by
    the next run; a live owner's (another process, still running) is left alone."""
    await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS))
    old = await home_key(env)
    sleeper = None
    if owner_state == "killed":
        owner = _dead_process_owner()
    else:
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        owner = process_owner(sleeper.pid)
    try:
        gate = Gate(monkeypatch)
        rotator = asyncio.create_task(
            ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS), rotate=True, owner=owner)
        )
        await gate.reached.wait()
        monkeypatch.setattr(keys, "recover_rotation", _process_killed)  # its tidy-up never runs: it is dead
        rotator.cancel()
        with pytest.raises(asyncio.CancelledError):
            await rotator
        monkeypatch.undo()
        assert (await data(env, "litellm", "coder-stack-keys")).get(f"rotating.{ALIAS}") is not None
        nxt = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS), owner=flow_owner())
        if owner_state == "killed":
            assert nxt.action == "kept" and "undid a dead run's interrupted rotation" in nxt.notes[0]
            assert await home_key(env) == old
            await assert_one_working_key_at_home(env)
        else:
            assert "in flight; left to it" in nxt.notes[0]
            retired = [k for k in await all_keys(env) if str(k["key_alias"]).startswith(f"{ALIAS}-retired-")]
            assert len(retired) == 1  # untouched: still the live owner's to finish
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()


async def _process_killed(*a: object, **kw: object) -> object:
    raise asyncio.CancelledError()


# ------------------------------------------------------------------ the gateway acted, the answer was lost
class LoseAnswer(httpx.AsyncBaseTransport):
    """Between the client's retrying transport and the gateway: the request reaches the gateway and is
    carried out, then the answer is replaced by a lost connection or a 5xx. ``down_after``: the gateway is
    unreachable from then on (so that only the next run can tidy up)."""

    def __init__(
        self, inner: httpx.AsyncBaseTransport, match: Callable[[httpx.Request], bool], how: str, down_after: bool
    ) -> None:
        self.inner, self.match, self.how, self.down_after = inner, match, how, down_after
        self.fired = 0
        self.down = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        resp = await self.inner.handle_async_request(request)
        if self.fired or not self.match(request):
            return resp
        await resp.aread()
        self.fired += 1
        self.down = self.down_after
        if self.how == "connection-lost":
            raise httpx.ReadError("connection reset by peer", request=request)
        return httpx.Response(502, json={"error": {"message": "bad gateway"}}, request=request)


def _body(request: httpx.Request) -> dict[str, object]:
    import json

    try:
        return dict(json.loads(request.content or b"{}"))
    except ValueError:
        return {}


STEPS: dict[str, Callable[[httpx.Request], bool]] = {
    "rename": lambda r: r.url.path == "/key/update" and str(_body(r).get("key_alias", "")).startswith("open-webui-r"),
    "mint": lambda r: r.url.path == "/key/generate" and _body(r).get("key_alias") == ALIAS,
    "delete-old": lambda r: r.url.path == "/key/delete",
}


@pytest.mark.parametrize("next_run", [False, True], ids=["same-run-tidies", "next-run-tidies"])
@pytest.mark.parametrize("how", ["connection-lost", "502"])
@pytest.mark.parametrize("step", list(STEPS))
async def test_rotation_whose_answer_was_lost_after_the_gateway_acted(
    env: Env, step: str, how: str, next_run: bool
) -> None:
    await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS))
    old = await home_key(env)
    retrying = env.gw._transport  # make_client's RetryingTransport
    inner = retrying._inner  # type: ignore[attr-defined]
    fault = LoseAnswer(inner, STEPS[step], how, down_after=next_run)
    retrying._inner = fault  # type: ignore[attr-defined]
    owner = _dead_process_owner() if next_run else flow_owner()
    try:
        rep: object = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS), rotate=True, owner=owner)
    except Exception as e:
        rep = e
    finally:
        retrying._inner = inner  # type: ignore[attr-defined]
    assert fault.fired == 1
    if next_run:
        assert isinstance(rep, Exception) and "run keys again" in str(rep)
        nxt = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS), owner=flow_owner())
        assert nxt.action == "kept" and "a dead run's interrupted rotation" in nxt.notes[0]
    elif step == "delete-old":  # everything was done: the rotation is complete and says so
        assert isinstance(rep, keys.KeyReport) and rep.action == "rotated", rep
    else:  # undone at once; the error says what happened
        assert isinstance(rep, Exception), rep
    await assert_one_working_key_at_home(env)
    now = await home_key(env)
    assert (now == old) == (step != "delete-old")  # the new key reached home only when the delete was asked
    assert (await chat_status(env, now))[0] == 200
    if now != old:
        assert (await chat_status(env, old))[0] == 401
    # no orphan anywhere: only one live key of any open-webui alias (checked above), and the next run keeps it
    assert (await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key(ALIAS))).action == "kept"


# ------------------------------------------------------------------ 12: Tabby's config.toml
USER_SECTION = """
# my own embedding model -- keep it!
[model.embedding.http]
kind = "openai/embedding"   # aligned comment
api_endpoint = "https://embeddings.example.com/v1"
api_key = "user-secret"

[[repositories]]
name = "coder-stack"
git_url = "https://example.com/coder-stack.git"
"""


async def test_a_users_tabby_section_survives_a_keys_pass_byte_for_byte_and_no_restart_when_unchanged(
    env: Env,
) -> None:
    await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("tabby"))
    written = (await data(env, EXP, "tabby-config"))["config.toml"]
    edited = written + USER_SECTION
    await write_secret_keys(env.api, EXP, "tabby-config", {"config.toml": SecretStr(edited)})
    await restamp(env, "tabby")

    kept = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("tabby"))
    assert kept.action == "kept" and not kept.consumer_restarted
    assert (await data(env, EXP, "tabby-config"))["config.toml"] == edited  # byte for byte
    assert await restarted_at(env, "tabby") == "cleared"

    old_key = keys.parse_tabby_config(SecretStr(edited))
    assert old_key is not None
    rotated = await ensure_key(env.api, env.gw, env.master, SPEC, SPEC.key("tabby"), rotate=True)
    assert rotated.action == "rotated" and rotated.consumer_restarted
    after = (await data(env, EXP, "tabby-config"))["config.toml"]
    new_key = keys.parse_tabby_config(SecretStr(after))
    assert new_key is not None and new_key.api_key.get_secret_value() != old_key.api_key.get_secret_value()
    # only the gateway section's api_key changed: the rest, the user's section included, byte for byte
    assert after == edited.replace(old_key.api_key.get_secret_value(), new_key.api_key.get_secret_value())
    assert USER_SECTION in after and 'api_key = "user-secret"' in after
