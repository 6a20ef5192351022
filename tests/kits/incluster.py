"""Helpers for running the flows inside the simulated cluster: deployments/rbac.yaml loaded into a sim's store, or
applied through the API to a sim in another process (``coder-stack sim``). The Kubernetes work pool is made by
``coder-stack setup``'s own ``ensure_work_pools``."""

from __future__ import annotations

from typing import Any

import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.utils import create_from_yaml
from simstack.store import Store

from tests.kits.flowkit import PROJECT

RBAC_FILE = PROJECT / "deployments" / "rbac.yaml"
_PLURAL = {
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
}


def rbac_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(RBAC_FILE.read_text()) if d]


def load_rbac(store: Store, docs: list[dict[str, Any]]) -> None:
    """The namespace ``prefect`` and every object of deployments/rbac.yaml, as ``kubectl apply -f`` would."""
    if store.find("namespaces", None, "prefect") is None:
        store.create("namespaces", {"metadata": {"name": "prefect"}})
    for d in docs:
        meta = d["metadata"]
        store.create(
            _PLURAL[d["kind"]], {k: v for k, v in d.items() if k not in ("apiVersion", "kind")}, meta.get("namespace")
        )


async def apply_rbac(api: ApiClient) -> None:
    """The namespace ``prefect`` and deployments/rbac.yaml through the API, as README step 2 does with kubectl."""
    await client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="prefect")))
    await create_from_yaml(api, str(RBAC_FILE))
