"""Helpers for running the flows inside the simulated cluster: deployments/rbac.yaml loaded into a sim's store,
and the Kubernetes work pool's base job template.

``k8s_pool_template`` builds the pool the way the project's pool is meant to be built (prefect-kubernetes's
default template with the stack's namespace, ServiceAccount, image and a pod watch timeout for cold nodes);
swap it for ``coder-stack setup``'s own template when setup creates the Kubernetes pool.
"""

from __future__ import annotations

import copy
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


def k8s_pool_template(
    image: str,
    *,
    namespace: str = "prefect",
    service_account: str = "coder-stack-flows",
    pod_watch_timeout_s: int = 900,
) -> dict[str, Any]:
    """prefect-kubernetes's default base job template with the stack's defaults filled in."""
    from prefect_kubernetes.worker import KubernetesWorker

    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    props = template["variables"]["properties"]
    props["namespace"]["default"] = namespace
    props["service_account_name"]["default"] = service_account
    props["image"]["default"] = image
    props["pod_watch_timeout_seconds"]["default"] = pod_watch_timeout_s
    return template
