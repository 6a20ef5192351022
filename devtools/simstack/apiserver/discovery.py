"""Discovery: ``/version``, ``/api``, ``/apis``, ``/apis/<group>`` and the APIResourceLists of every
group version, derived from ``store.RESOURCES``, with the subresources the server serves (status,
scale, exec, portforward). kubectl and the clients find the resources through these.
"""

from __future__ import annotations

from aiohttp import web

from simstack.apiserver.errors import not_found_resource
from simstack.store import RESOURCES, Obj, ResourceType

K8S_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-sim",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-12-11T00:00:00Z",
    "goVersion": "go1.23.3",
    "compiler": "gc",
    "platform": "linux/amd64",
}

#: resources with a status subresource: PUT/PATCH on the main resource keep the stored status
STATUS_SUBRESOURCE = {"pods", "deployments", "replicasets", "jobs", "nodes", "services", "namespaces"}
#: resources with a scale subresource
SCALE_SUBRESOURCE = {"deployments", "replicasets"}
CATEGORY_ALL = {"pods", "services", "deployments", "replicasets", "jobs"}
SINGULAR = {p: rt.kind.lower() for p, rt in RESOURCES.items()}


def _api_resource(rt: ResourceType) -> Obj:
    r: Obj = {
        "name": rt.plural,
        "singularName": SINGULAR[rt.plural],
        "namespaced": rt.namespaced,
        "kind": rt.kind,
        "verbs": sorted({*rt.verbs, "deletecollection"}),
    }
    if rt.short_names:
        r["shortNames"] = list(rt.short_names)
    if rt.plural in CATEGORY_ALL:
        r["categories"] = ["all"]
    return r


def _sub(rt: ResourceType, sub: str, verbs: list[str], kind: str | None = None, group: str | None = None) -> Obj:
    r: Obj = {
        "name": f"{rt.plural}/{sub}",
        "singularName": "",
        "namespaced": rt.namespaced,
        "kind": kind or rt.kind,
        "verbs": verbs,
    }
    if group is not None:
        r["group"], r["version"] = group.split("/")
    return r


def resource_list(group_version: str) -> Obj | None:
    rts = [rt for rt in RESOURCES.values() if rt.api_version == group_version]
    if not rts:
        return None
    resources: list[Obj] = []
    for rt in rts:
        resources.append(_api_resource(rt))
        if rt.plural in STATUS_SUBRESOURCE:
            resources.append(_sub(rt, "status", ["get", "patch", "update"]))
        if rt.plural in SCALE_SUBRESOURCE:
            resources.append(_sub(rt, "scale", ["get", "patch", "update"], "Scale", "autoscaling/v1"))
        if rt.plural == "pods":
            resources.append(_sub(rt, "exec", ["create", "get"], "PodExecOptions"))
            resources.append(_sub(rt, "portforward", ["create", "get"], "PodPortForwardOptions"))
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}


def api_groups() -> Obj:
    groups: dict[str, list[str]] = {}
    for rt in RESOURCES.values():
        if rt.group:
            groups.setdefault(rt.group, [])
            if rt.version not in groups[rt.group]:
                groups[rt.group].append(rt.version)
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [_api_group(g, vs) for g, vs in sorted(groups.items())],
    }


def _api_group(group: str, versions: list[str]) -> Obj:
    vs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": vs, "preferredVersion": vs[0]}


def discovery_response(request: web.Request, path: str, parts: list[str]) -> web.Response | None:
    """The answer to a discovery (or health) path, or None: not one."""
    if path == "/version":
        return web.json_response(K8S_VERSION)
    if path in ("/healthz", "/livez", "/readyz"):
        return web.Response(text="ok")
    if path == "/api":
        return web.json_response(
            {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}],
            }
        )
    if path == "/apis":
        return web.json_response(api_groups())
    if parts and parts[0] == "apis" and len(parts) == 2:
        groups = {g["name"]: g for g in api_groups()["groups"]}
        if parts[1] in groups:
            return web.json_response(groups[parts[1]])
        raise not_found_resource()
    if (parts[:1] == ["api"] and len(parts) == 2) or (parts[:1] == ["apis"] and len(parts) == 3):
        gv = "/".join(parts[1:])
        rl = resource_list(gv)
        if rl is None:
            raise not_found_resource()
        return web.json_response(rl)
    return None
