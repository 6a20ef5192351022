"""Does Open WebUI read its OpenAI connection from its environment? (``ENABLE_PERSISTENT_CONFIG``)

Open WebUI's docs (https://docs.openwebui.com/getting-started/env-configuration/, "Important Note on
PersistentConfig Environment Variables" and the ``ENABLE_PERSISTENT_CONFIG`` entry), in our words: a
variable marked PersistentConfig is read from the environment at the first launch only; its value is stored
in the app's database and, on every later start, the stored value is used and the environment ignored.
``ENABLE_PERSISTENT_CONFIG`` (default ``True``) set to ``False`` makes all of them plain environment
variables again. ``OPENAI_API_KEY(S)`` and ``OPENAI_API_BASE_URL(S)`` are PersistentConfig, so without that
setting a key we re-mint or rotate into ``openwebui-secrets`` reaches the pod's environment but not the app.

How the value is read is from the app's source, not the docs: ``backend/open_webui/config.py`` computes
``os.environ.get("ENABLE_PERSISTENT_CONFIG", "True").lower() == "true"`` -- persistence is on only when the
variable is absent or spelled ``true`` in any case; any other value (``False``, ``0``, even empty) turns it
off. :func:`env_wins_for` follows that rule.

:func:`persistent_config_status` resolves the setting from the Deployment's pod template the way the kubelet
builds a container's environment: ``envFrom`` sources first (a later source overrides an earlier one), then
``env`` entries in order (a later entry overrides an earlier one and every ``envFrom`` source; an optional
reference to a missing Secret/ConfigMap/key is skipped). :func:`set_env_wins_in_secret` writes
``ENABLE_PERSISTENT_CONFIG=False`` into ``spec.openwebui_secret`` when the Deployment loads that Secret whole
via ``envFrom`` and nothing else sets the variable. No value read from a Secret is ever put in a result,
a log line or an exception: only whether it means "the environment wins".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from coder_stack.errors import Forbidden, NotFound
from coder_stack.kubernetes.client import read_config_map, read_secret, write_secret_keys
from coder_stack.kubernetes.workloads import read_deployment
from coder_stack.spec import StackSpec

PERSISTENT_CONFIG_VAR = "ENABLE_PERSISTENT_CONFIG"
ENV_WINS_VALUE = "False"  # what set_env_wins_in_secret writes (the docs' spelling)
OPENWEBUI_IMAGE_REPO = "open-webui/open-webui"  # ghcr.io/open-webui/open-webui


def env_wins_for(value: str | None) -> bool:
    """True if Open WebUI, seeing ``ENABLE_PERSISTENT_CONFIG=value`` (None: unset), reads PersistentConfig
    variables from the environment at every start (its config.py: persistence on iff ``value.lower() == "true"``)."""
    return value is not None and value.lower() != "true"


# Run in the Open WebUI pod (smoke): prints "unset" or "set:<value>" of the pod's ENABLE_PERSISTENT_CONFIG.
PERSISTENT_CONFIG_PROBE_CMD = [
    "sh",
    "-c",
    'if [ -n "${ENABLE_PERSISTENT_CONFIG+x}" ]; then printf "set:%s" "$ENABLE_PERSISTENT_CONFIG"; '
    "else printf unset; fi",
]


def parse_persistent_config_probe(stdout: str) -> str | None:
    """The value :data:`PERSISTENT_CONFIG_PROBE_CMD` printed (None: unset); ValueError if it printed neither."""
    if stdout == "unset":
        return None
    if stdout.startswith("set:"):
        return stdout[len("set:") :]
    raise ValueError("unexpected output from the ENABLE_PERSISTENT_CONFIG probe")


class PersistentConfigStatus(BaseModel):
    """Whether Open WebUI's environment wins over its stored config. Holds no Secret value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment: str = Field(max_length=300, description="namespace/name of the Open WebUI Deployment.")
    container: str = Field(max_length=253, description="The container whose environment was resolved.")
    env_wins: bool = Field(
        description="True: ENABLE_PERSISTENT_CONFIG resolves to a value other than 'true', so a new "
        "OPENAI_API_KEY in the environment reaches the app after a restart."
    )
    source: str | None = Field(
        None,
        max_length=300,
        description="Where the setting came from, e.g. 'env[4].value', "
        "'env[2].valueFrom.secretKeyRef experience/x key KEY', 'envFrom[0] secret experience/openwebui-secrets'; "
        "None if nothing sets it.",
    )
    reason: str = Field(max_length=800, description="Plain words: what was found and, if needed, what to do.")
    loads_secret: bool = Field(
        description="The container loads spec.openwebui_secret whole via envFrom (secretRef, no prefix)."
    )
    can_set_in_secret: bool = Field(
        description="Writing ENABLE_PERSISTENT_CONFIG=False into spec.openwebui_secret would take effect: "
        "the Secret is loaded whole and nothing sets the variable yet (no user value is overridden)."
    )

    @property
    def name(self) -> str:
        return self.deployment.split("/", 1)[-1]


@dataclass(frozen=True)
class _Found:
    source: str
    value: SecretStr | None  # None: the reference cannot be resolved (see problem)
    problem: str = ""


_EXPANSION = re.compile(r"\$\([A-Za-z_][A-Za-z0-9_]*\)")


def _container(dep: client.V1Deployment) -> client.V1Container:
    pod = dep.spec.template.spec if dep.spec and dep.spec.template else None
    containers = list(pod.containers or []) if pod else []
    if not containers:
        raise NotFound(f"deployment {dep.metadata.namespace}/{dep.metadata.name} has no containers")
    return next((c for c in containers if OPENWEBUI_IMAGE_REPO in (c.image or "")), containers[0])


class _Sources:
    """Secrets and ConfigMaps of one namespace, each read at most once."""

    def __init__(self, api: ApiClient, namespace: str, deployment: str = "the Deployment") -> None:
        self.api = api
        self.namespace = namespace
        self.deployment = deployment
        self.assume_exists: str | None = None  # a Secret taken as existing (empty) if it does not
        self._secrets: dict[str, dict[str, SecretStr] | None] = {}
        self._config_maps: dict[str, dict[str, str] | None] = {}

    async def secret(self, name: str) -> dict[str, SecretStr] | None:
        if name not in self._secrets:
            try:
                self._secrets[name] = await read_secret(self.api, self.namespace, name)
            except Forbidden as e:
                raise self._refused("secrets", "Secret", name) from e
        data = self._secrets[name]
        return {} if data is None and name == self.assume_exists else data

    async def config_map(self, name: str) -> dict[str, SecretStr] | None:
        if name not in self._config_maps:
            try:
                self._config_maps[name] = await read_config_map(self.api, self.namespace, name)
            except Forbidden as e:
                raise self._refused("configmaps", "ConfigMap", name) from e
        data = self._config_maps[name]
        return None if data is None else {k: SecretStr(v) for k, v in data.items()}

    def _refused(self, plural: str, kind: str, name: str) -> Forbidden:
        """The flows' ServiceAccount may not read a Secret/ConfigMap the Open WebUI Deployment takes its
        environment from: say which grant is missing (by name: never all Secrets) and the other way out."""
        return Forbidden(
            f"{self.deployment} takes environment variables from the {kind} {self.namespace}/{name}, which may set "
            f"{PERSISTENT_CONFIG_VAR}, and the cluster refused to get it. Grant it by name in the "
            f"coder-stack-flows Role of namespace {self.namespace!r} (deployments/rbac.yaml): "
            f'{{apiGroups: [""], resources: [{plural}], resourceNames: [{name}], verbs: [get]}}; '
            f"or set {PERSISTENT_CONFIG_VAR}=False in the Deployment's env directly",
            status=403,
            resource=f"{plural}/{name}",
        )


async def _from_env(sources: _Sources, env: list[Any]) -> _Found | None:
    """The ``env`` entry that sets the variable, last first; None if none does (or all are skipped)."""
    ns = sources.namespace
    for i in reversed(range(len(env))):
        e = env[i]
        if e.name != PERSISTENT_CONFIG_VAR:
            continue
        if e.value_from is None:
            value = e.value or ""
            if _EXPANSION.search(value.replace("$$", "")):
                return _Found(f"env[{i}].value", None, "refers to another variable with $(...), which is not resolved")
            return _Found(f"env[{i}].value", SecretStr(value.replace("$$", "$")))
        ref = e.value_from.secret_key_ref or e.value_from.config_map_key_ref
        if ref is None:
            return _Found(f"env[{i}].valueFrom", None, "comes from a fieldRef/resourceFieldRef, which is not resolved")
        kind = "secretKeyRef" if e.value_from.secret_key_ref is not None else "configMapKeyRef"
        data = await (sources.secret(ref.name) if kind == "secretKeyRef" else sources.config_map(ref.name))
        where = f"env[{i}].valueFrom.{kind} {ns}/{ref.name} key {ref.key}"
        if data is None or ref.key not in data:
            if ref.optional:
                continue  # the kubelet skips an optional reference that is missing
            what = "the Secret" if kind == "secretKeyRef" else "the ConfigMap"
            missing = f"{what} does not exist" if data is None else f"{what} has no key {ref.key!r}"
            return _Found(where, None, f"{missing}, so the pod cannot start")
        return _Found(where, data[ref.key])
    return None


async def _from_env_from(sources: _Sources, env_from: list[Any]) -> _Found | None:
    """The ``envFrom`` source that sets the variable, last first; None if none does."""
    ns = sources.namespace
    for i in reversed(range(len(env_from))):
        ef = env_from[i]
        prefix = ef.prefix or ""
        if not PERSISTENT_CONFIG_VAR.startswith(prefix):
            continue
        key = PERSISTENT_CONFIG_VAR[len(prefix) :]
        if ef.secret_ref is not None:
            data, where, what = await sources.secret(ef.secret_ref.name), f"secret {ns}/{ef.secret_ref.name}", "Secret"
            optional = ef.secret_ref.optional
        elif ef.config_map_ref is not None:
            cm = ef.config_map_ref
            data, where, what = await sources.config_map(cm.name), f"configmap {ns}/{cm.name}", "ConfigMap"
            optional = cm.optional
        else:
            continue
        source = f"envFrom[{i}] {where}" + (f" (prefix {prefix!r})" if prefix else "")
        if data is None:
            if optional:
                continue
            return _Found(source, None, f"the {what} does not exist, so the pod cannot start")
        if key in data:
            return _Found(source, data[key])
    return None


async def persistent_config_status(api: ApiClient, spec: StackSpec, name: str) -> PersistentConfigStatus:
    """Read ``deploy/<name>`` in the experience namespace and resolve its container's ``ENABLE_PERSISTENT_CONFIG``.

    The container is the one running the Open WebUI image (else the first). Raises NotFound if the
    Deployment does not exist; Forbidden/ClusterUnavailable from reading it or a Secret/ConfigMap it refers
    to (a Secret/ConfigMap the flows' ServiceAccount may not get: a Forbidden naming the grant, by name, that
    deployments/rbac.yaml lacks). A value that cannot be resolved (missing non-optional reference, ``$(VAR)``,
    fieldRef) counts as "the environment does not win", with the reason saying why.
    """
    ns = spec.experience_namespace
    dep = await read_deployment(api, ns, name)
    c = _container(dep)
    env, env_from = list(c.env or []), list(c.env_from or [])
    sources = _Sources(api, ns, f"deploy/{name}")
    found = await _from_env(sources, env) or await _from_env_from(sources, env_from)
    loads_secret = any(
        ef.secret_ref is not None and ef.secret_ref.name == spec.openwebui_secret and not ef.prefix for ef in env_from
    )
    can_set = False
    if loads_secret:
        # Would ENABLE_PERSISTENT_CONFIG written into our Secret be what the container sees? Only if nothing
        # else sets it -- with the Secret taken as existing, since writing the key creates it.
        sources.assume_exists = spec.openwebui_secret
        can_set = (await _from_env(sources, env) or await _from_env_from(sources, env_from)) is None
    deploy = f"deploy/{name}"
    fix = (
        f"set {PERSISTENT_CONFIG_VAR}={ENV_WINS_VALUE} on {deploy}"
        + (f" (or in the Secret {spec.openwebui_secret} it loads via envFrom)" if loads_secret else "")
        + ", then restart it"
    )
    stored = (
        "Open WebUI keeps using the OpenAI connection (key and URL) it stored in its database at first launch "
        "and ignores OPENAI_API_KEY(S) from its environment"
    )
    if found is None:
        env_wins = False
        reason = f"{deploy} does not set {PERSISTENT_CONFIG_VAR} (default True): {stored}; {fix}"
    elif found.value is None:
        env_wins = False
        reason = (
            f"{deploy}'s {PERSISTENT_CONFIG_VAR} ({found.source}) {found.problem}; it cannot be shown that the "
            f"environment wins, and if it does not, {stored}; {fix}"
        )
    elif env_wins_for(found.value.get_secret_value()):
        env_wins = True
        reason = (
            f"{deploy} sets {PERSISTENT_CONFIG_VAR} to a value other than 'true' ({found.source}): Open WebUI "
            "reads its OpenAI connection from the environment at every start"
        )
    else:
        env_wins = False
        reason = f"{deploy} sets {PERSISTENT_CONFIG_VAR} to 'true' ({found.source}): {stored}; {fix}"
    return PersistentConfigStatus(
        deployment=f"{ns}/{name}",
        container=c.name,
        env_wins=env_wins,
        source=found.source if found else None,
        reason=reason,
        loads_secret=loads_secret,
        can_set_in_secret=can_set,
    )


async def set_env_wins_in_secret(
    api: ApiClient, spec: StackSpec, name: str, status: PersistentConfigStatus | None = None
) -> list[str]:
    """Write ``ENABLE_PERSISTENT_CONFIG: "False"`` into ``spec.openwebui_secret`` if that takes effect.

    Only when ``deploy/<name>`` loads the Secret whole via envFrom and nothing sets the variable
    (``status.can_set_in_secret``; ``status`` is resolved here if not given), and only if the Secret does not
    have the key yet: an explicit user value is never overridden. Returns the data keys written
    (``["ENABLE_PERSISTENT_CONFIG"]`` or ``[]``). The running pods do not see it until the Deployment is
    restarted; then the environment wins.
    """
    status = status or await persistent_config_status(api, spec, name)
    if not status.can_set_in_secret:
        return []
    return await write_secret_keys(
        api,
        spec.experience_namespace,
        spec.openwebui_secret,
        {PERSISTENT_CONFIG_VAR: SecretStr(ENV_WINS_VALUE)},
        only_if_absent=frozenset({PERSISTENT_CONFIG_VAR}),
    )


__all__ = [
    "ENV_WINS_VALUE",
    "PERSISTENT_CONFIG_PROBE_CMD",
    "PERSISTENT_CONFIG_VAR",
    "PersistentConfigStatus",
    "env_wins_for",
    "parse_persistent_config_probe",
    "persistent_config_status",
    "set_env_wins_in_secret",
]
