"""Registry of the processes behind simulated pods, and in-cluster DNS resolution to them.

When a pod turns Ready the kubelet starts its app's stand-in (an aiohttp server on 127.0.0.1) and
registers it here under (namespace, pod, container port). Port-forward and exec reach pods through this
registry; in-cluster URLs (``http://<svc>.<ns>.svc.cluster.local:<port>``) resolve through a Service's
selector to a Ready pod's backend, as kube-proxy would.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from simstack.pods import pod_is_ready
from simstack.store import Store, parse_label_selector


@dataclass(frozen=True)
class BackendAddress:
    host: str
    port: int


class Backends:
    def __init__(self, store: Store, cluster_domain: str = "cluster.local") -> None:
        self._store = store
        self._domain = cluster_domain
        self._by_pod: dict[tuple[str, str, int], BackendAddress] = {}

    def register(self, namespace: str, pod: str, container_port: int, host: str, port: int) -> None:
        self._by_pod[(namespace, pod, container_port)] = BackendAddress(host, port)

    def unregister(self, namespace: str, pod: str) -> None:
        for key in [k for k in self._by_pod if k[0] == namespace and k[1] == pod]:
            del self._by_pod[key]

    def lookup(self, namespace: str, pod: str, container_port: int) -> BackendAddress | None:
        return self._by_pod.get((namespace, pod, container_port))

    def service_backend(self, namespace: str, service: str, port: int) -> BackendAddress | None:
        """A Ready pod's backend behind a Service port (what kube-proxy would pick)."""
        svc = self._store.find("services", namespace, service)
        if svc is None:
            return None
        target = port
        for p in svc.get("spec", {}).get("ports", []):
            if p.get("port") == port:
                tp = p.get("targetPort", port)
                target = tp if isinstance(tp, int) else port
        match = parse_label_selector(",".join(f"{k}={v}" for k, v in (svc["spec"].get("selector") or {}).items()))
        for pod in self._store.list("pods", namespace):
            terminating = bool(pod["metadata"].get("deletionTimestamp"))
            if match(pod["metadata"].get("labels") or {}) and pod_is_ready(pod) and not terminating:
                addr = self.lookup(namespace, pod["metadata"]["name"], target)
                if addr:
                    return addr
        return None

    def resolve_url(self, url: str) -> str | None:
        """Map an in-cluster URL to the local URL of a Ready backend, or None (connection refused)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        labels = host.split(".")
        suffix = f".svc.{self._domain}"
        if (
            (host.endswith(suffix) and len(labels) >= 3)
            or len(labels) == 2
            or (len(labels) == 3 and labels[2] == "svc")
        ):
            service, namespace = labels[0], labels[1]
        else:
            return url  # not a cluster name: leave it alone
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addr = self.service_backend(namespace, service, port)
        if addr is None:
            return None
        return urlunsplit((parts.scheme, f"{addr.host}:{addr.port}", parts.path, parts.query, parts.fragment))
