"""The scale subresource of Deployments and ReplicaSets (``autoscaling/v1`` Scale): read, replace and
patch ``spec.replicas`` through it, as ``kubectl scale`` and the clients' ``*_scale`` calls do.
"""

from __future__ import annotations

from aiohttp import web

from simstack.apiserver.crud import Resources
from simstack.apiserver.errors import ApiError, bad_request, error_details
from simstack.apiserver.patch import apply_patch
from simstack.apiserver.tables import selector_string
from simstack.apiserver.target import Target
from simstack.store import Obj


class Scale:
    """The scale handlers, writing through the CRUD handlers."""

    def __init__(self, resources: Resources) -> None:
        self.resources = resources
        self.store = resources.store

    def get(self, t: Target) -> Obj:
        return self.of(self.resources.read(t))

    async def replace(self, request: web.Request, t: Target) -> web.Response:
        body = await self.resources.body(request)
        if not isinstance(body, dict):
            raise bad_request("the body of the request is not an object")
        cur = self.resources.read(t)
        return web.json_response(self._set(t, cur, body, check_rv=True))

    async def patch(self, request: web.Request, t: Target) -> web.Response:
        raw = await request.read()
        cur = self.resources.read(t)
        patched = apply_patch(self.of(cur), request.content_type, raw)
        return web.json_response(self._set(t, cur, patched, check_rv=True))

    def of(self, obj: Obj) -> Obj:
        meta = obj["metadata"]
        spec, st = obj.get("spec") or {}, obj.get("status") or {}
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                "name": meta["name"],
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
                "creationTimestamp": meta.get("creationTimestamp"),
            },
            "spec": {"replicas": spec.get("replicas", 1)},
            "status": {"replicas": st.get("replicas", 0), "selector": selector_string(spec.get("selector"))},
        }

    def _set(self, t: Target, cur: Obj, scale: Obj, *, check_rv: bool) -> Obj:
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise ApiError(
                422,
                "Invalid",
                f'Scale.autoscaling "{t.name}" is invalid: spec.replicas: Invalid value: {replicas}: '
                "must be greater than or equal to 0",
            )
        rv = (scale.get("metadata") or {}).get("resourceVersion")
        if check_rv and rv and rv != cur["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {self.store.qualified(t.rt.plural)} "{t.name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
                error_details(t.rt, t.name),
            )
        cur.setdefault("spec", {})["replicas"] = replicas
        main = Target(t.rt, t.namespace, t.name, None)
        return self.of(self.resources.write(main, cur, check_rv=False))
