"""What a resource URL names: the resource type, the namespace, the object's name and the subresource
(:class:`Target`), parsed from the path as the real server's routes accept it.
"""

from __future__ import annotations

from dataclasses import dataclass

from simstack.apiserver.discovery import SCALE_SUBRESOURCE
from simstack.store import RESOURCES, ResourceType


@dataclass
class Target:
    rt: ResourceType
    namespace: str | None
    name: str | None
    sub: str | None


def parse_target(parts: list[str]) -> Target | None:
    """The resource a path names (its segments, without empty ones), or None: not a resource path."""
    if parts[:2] == ["api", "v1"]:
        gv, rest = "v1", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    else:
        return None
    by_plural = {rt.plural: rt for rt in RESOURCES.values() if rt.api_version == gv}
    ns: str | None = None
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in by_plural:
        ns, rest = rest[1], rest[2:]
    if not rest or rest[0] not in by_plural or len(rest) > 3:
        return None
    rt = by_plural[rest[0]]
    if ns is not None and not rt.namespaced:
        return None
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if name is not None and rt.namespaced and ns is None:
        return None
    if sub is not None and sub not in ("status", "scale", "exec", "portforward", "attach", "log"):
        return None
    if sub == "scale" and rt.plural not in SCALE_SUBRESOURCE:
        return None
    if sub in ("exec", "portforward", "attach", "log") and rt.plural != "pods":
        return None
    return Target(rt, ns, name, sub)
