"""One Kubernetes API client per flow run, and credentials that stay fresh while it is held.

What users rely on: a flow run's tasks share one client (the kubeconfig is read and an SSL context built
once per run, not once per task or per watch), the client is closed when the run's block ends, a client
never crosses event loops, and a token from an exec plugin (GKE, EKS, AKS) is refreshed before it expires
however long the run holds the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from kubernetes_asyncio.client import api_client
from simstack.stack import SimStack

from coder_stack.errors import ConfigError
from coder_stack.kubernetes.client import ClusterTarget, cluster_session, load_configuration, open_api
from coder_stack.kubernetes.wait import wait_gone, wait_ready
from coder_stack.kubernetes.workloads import scale
from coder_stack.spec import StackSpec
from tests.kits.kubeconfigs import exec_kubeconfig

SPEC = StackSpec()
CHAT = SPEC.model("coder-chat")


def target_of(sim: SimStack) -> ClusterTarget:
    return ClusterTarget(kubeconfig=str(sim.kubeconfig_path), context="coder-sim")


@pytest.fixture
def clients_built(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Every plain ``ApiClient`` constructed during the test (each one builds an SSL context)."""
    built: list[object] = []
    orig = api_client.ApiClient.__init__

    def counting(self: api_client.ApiClient, *args: object, **kwargs: object) -> None:
        if type(self) is api_client.ApiClient:
            built.append(self)
        orig(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(api_client.ApiClient, "__init__", counting)
    yield built


async def test_a_session_shares_one_client_with_every_open_api_and_closes_it(sim: SimStack) -> None:
    target = target_of(sim)
    async with cluster_session(target):
        async with open_api(target) as a, open_api(target) as b:
            assert a is b
        # asyncio tasks started inside the block (gather, create_task) see the same client
        in_task = await asyncio.create_task(_client_id(target))
        assert in_task == id(a)
        async with cluster_session(target), open_api(target) as c:  # nested: reuses, does not close
            assert c is a
        assert not a.rest_client.pool_manager.closed
    assert a.rest_client.pool_manager.closed

    # outside a session: a client per call, closed on exit
    async with open_api(target) as d, open_api(target) as e:
        assert d is not e and d is not a
    assert d.rest_client.pool_manager.closed and e.rest_client.pool_manager.closed


async def _client_id(target: ClusterTarget) -> int:
    async with open_api(target) as api:
        return id(api)


async def test_a_client_never_crosses_event_loops(sim: SimStack) -> None:
    target = target_of(sim)
    async with cluster_session(target), open_api(target) as shared:
        # to_thread copies the context (the session is visible) but runs a different loop there
        other = await asyncio.to_thread(lambda: asyncio.run(_client_id(target)))
        assert other != id(shared)
        assert not shared.rest_client.pool_manager.closed


async def test_a_wait_through_a_cold_start_builds_no_client_beyond_the_sessions(
    sim: SimStack, clients_built: list[object]
) -> None:
    """The library's ``Watch()`` builds a client of its own per watch (and per reconnect); ours reuses
    the caller's. A whole scale-up-and-wait in a session builds exactly one client."""
    target = target_of(sim)
    async with cluster_session(target):
        async with open_api(target) as api:
            await scale(api, SPEC.serving_namespace, CHAT.name, 1)
        async with open_api(target) as api:
            report = await wait_ready(api, SPEC.serving_namespace, CHAT.name, CHAT.selector, CHAT.budgets)
        async with open_api(target) as api:
            await scale(api, SPEC.serving_namespace, CHAT.name, 0)
            await wait_gone(api, SPEC.serving_namespace, CHAT.selector, 30)
    assert report.pod
    assert len(clients_built) == 1, f"{len(clients_built)} ApiClients built for one session"


# ------------------------------------------------------------------ exec-plugin credentials
@pytest.mark.parametrize(
    ("expires_in", "tokens", "runs"),
    [
        # within the library's 5-minute skew: treated as expiring, so the plugin runs before each request
        (timedelta(minutes=1), ["Bearer token-2", "Bearer token-3"], 3),
        # an hour left (GKE's gke-gcloud-auth-plugin): the token is reused, the plugin not run again
        (timedelta(hours=1), ["Bearer token-1", "Bearer token-1"], 1),
    ],
)
async def test_an_exec_plugin_token_is_refreshed_before_it_expires(
    tmp_path: Path,
    make_sim: Callable[..., SimStack],
    expires_in: timedelta,
    tokens: list[str],
    runs: int,
) -> None:
    sim = make_sim()
    path, counter = exec_kubeconfig(tmp_path, sim, expires_in)
    cfg = await load_configuration(ClusterTarget(kubeconfig=str(path), context="coder-sim"))
    assert counter.read_text() == "1"  # loading runs the plugin once
    seen = [await cfg.get_api_key_with_prefix("BearerToken") for _ in range(2)]
    assert seen == tokens
    assert counter.read_text() == str(runs)


async def test_a_bad_kubeconfig_fails_at_the_first_use_not_when_the_session_opens(tmp_path: Path) -> None:
    """A flow opens its session before its guarded body; the kubeconfig error must surface in the first
    task (inside the body, so the run's report records it), with what to do."""
    target = ClusterTarget(kubeconfig=str(tmp_path / "missing"))
    async with cluster_session(target):
        with pytest.raises(ConfigError, match="does not exist; pass --kubeconfig with an existing file"):
            async with open_api(target):
                pytest.fail("opened a client for a missing kubeconfig")


@pytest.mark.parametrize(("status", "outcome"), [(409, "patched"), (422, "raised"), (400, "raised")])
async def test_creating_a_secret_treats_only_already_exists_as_created_concurrently(
    monkeypatch: pytest.MonkeyPatch, status: int, outcome: str
) -> None:
    """A 409 AlreadyExists on create means someone created it meanwhile: patch it. Any other 4xx is an error
    that names the Secret and carries the status, never a silent patch."""
    from kubernetes_asyncio.client import CoreV1Api
    from kubernetes_asyncio.client.exceptions import ApiException
    from pydantic import SecretStr

    from coder_stack.errors import ClusterRequestError
    from coder_stack.kubernetes import client as kclient

    patched: list[str] = []

    async def absent(*a: object, **kw: object) -> None:
        return None

    async def create(self: object, namespace: str, body: object, **kw: object) -> None:
        raise ApiException(status=status, reason="refused")

    async def patch(self: object, name: str, namespace: str, body: object, **kw: object) -> None:
        patched.append(name)

    monkeypatch.setattr(kclient, "read_secret", absent)
    monkeypatch.setattr(CoreV1Api, "create_namespaced_secret", create)
    monkeypatch.setattr(CoreV1Api, "patch_namespaced_secret", patch)
    api = api_client.ApiClient()
    try:
        if outcome == "patched":
            assert await kclient.write_secret_keys(api, "apps", "s", {"k": SecretStr("v")}) == ["k"]
            assert patched == ["s"]
        else:
            with pytest.raises(ClusterRequestError) as err:
                await kclient.write_secret_keys(api, "apps", "s", {"k": SecretStr("v")})
            assert err.value.status == status and err.value.resource == "secrets/s" and patched == []
    finally:
        await api.close()
