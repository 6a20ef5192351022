"""Helpers for running the flows inside the simulated cluster: deployments/rbac.yaml loaded into a sim's store.
The Kubernetes work pool is made by ``coder-stack setup``'s own ``ensure_work_pools``."""

from __future__ import annotations

from typing import Any

import yaml

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
