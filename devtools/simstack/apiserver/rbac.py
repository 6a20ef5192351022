"""Authorisation: the hook the router calls for every request (:data:`Authorizer`), and
:class:`RBACAuthorizer`, which evaluates the store's Role/RoleBinding and ClusterRole/ClusterRoleBinding
objects for ServiceAccount bearer tokens (plus superuser tokens allowed everything).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from simstack.store import RESOURCES, Obj, Store

Authorizer = Callable[[str | None, str, str, str | None, str | None], "bool | str | Awaitable[bool | str]"]


class RBACAuthorizer:
    """Authorise ServiceAccount bearer tokens with the store's Role/RoleBinding objects.

    ``tokens`` maps a token to ``(namespace, serviceaccount)``. Unknown tokens are unauthenticated
    (401). ``superusers`` are tokens allowed everything (e.g. the kubeconfig's admin token).
    """

    def __init__(self, store: Store, tokens: dict[str, tuple[str, str]], superusers: set[str] | None = None) -> None:
        self.store = store
        self.tokens = tokens
        self.superusers = superusers or set()

    def authenticate(self, token: str | None) -> str | None:
        if token in self.superusers:
            return "system:admin"
        if token is None or token not in self.tokens:
            return None
        ns, sa = self.tokens[token]
        return f"system:serviceaccount:{ns}:{sa}"

    def __call__(self, token: str | None, verb: str, resource: str, namespace: str | None, name: str | None) -> bool:
        if token in self.superusers:
            return True
        if token is None or token not in self.tokens:
            return False
        sa_ns, sa = self.tokens[token]
        base = resource.partition("/")[0]
        rt = RESOURCES.get(base)
        group = rt.group if rt else ""

        def bound(binding: Obj) -> bool:
            return any(
                s.get("kind") == "ServiceAccount"
                and s.get("name") == sa
                and (s.get("namespace") or binding["metadata"].get("namespace")) == sa_ns
                for s in binding.get("subjects") or []
            )

        roles: list[Obj | None] = []
        # ClusterRoleBindings grant their ClusterRole everywhere (cluster scope and every namespace).
        for crb in self.store.list("clusterrolebindings", None):
            ref = crb.get("roleRef") or {}
            if bound(crb) and ref.get("kind") == "ClusterRole":
                roles.append(self.store.find("clusterroles", None, ref.get("name", "")))
        # RoleBindings grant a Role (or a ClusterRole's rules) in their own namespace only.
        if namespace:
            for rb in self.store.list("rolebindings", namespace):
                ref = rb.get("roleRef") or {}
                if not bound(rb):
                    continue
                if ref.get("kind") == "Role":
                    roles.append(self.store.find("roles", namespace, ref.get("name", "")))
                elif ref.get("kind") == "ClusterRole":
                    roles.append(self.store.find("clusterroles", None, ref.get("name", "")))
        for role in roles:
            for rule in (role or {}).get("rules") or []:
                if not _matches(rule.get("apiGroups"), group):
                    continue
                if not _matches(rule.get("resources"), resource):
                    continue
                if not _matches(rule.get("verbs"), verb):
                    continue
                names = rule.get("resourceNames")
                if names and name not in names:
                    continue
                return True
        return False


def _matches(allowed: list[str] | None, value: str) -> bool:
    return bool(allowed) and ("*" in allowed or value in allowed)  # type: ignore[operator]
