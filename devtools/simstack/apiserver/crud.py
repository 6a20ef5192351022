"""CRUD on every resource of ``store.RESOURCES``: get, list, create, replace, patch, delete and
deletecollection, with the real registry's rules: defaulting, resourceVersion preconditions, the status
subresource (``/status`` writes only the status; main-resource writes keep it), graceful pod deletion
and garbage collection of dependents (ownerReferences) unless ``propagationPolicy: Orphan``.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import yaml
from aiohttp import web

from simstack.apiserver.discovery import STATUS_SUBRESOURCE
from simstack.apiserver.errors import ApiError, bad_request, error_details, from_store_error, parse_bool
from simstack.apiserver.patch import apply_patch
from simstack.apiserver.tables import to_table, wants_table
from simstack.apiserver.target import Target
from simstack.store import RESOURCES, Obj, Store, StoreError, default_object, now_rfc3339


class Resources:
    """The CRUD handlers over one store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def read(self, t: Target) -> Obj:
        try:
            return self.store.get(t.rt.plural, t.namespace, t.name or "")
        except StoreError as e:
            raise from_store_error(e, t.rt, t.name) from None

    def list_objects(self, request: web.Request, t: Target) -> web.Response:
        q = request.query
        rv = str(self.store.resource_version)
        items = self.store.list(t.rt.plural, t.namespace, q.get("labelSelector"), q.get("fieldSelector"))
        if wants_table(request):
            return web.json_response(to_table(t.rt.plural, items, rv, q.get("includeObject", "Metadata")))
        for it in items:
            it.pop("apiVersion", None)
            it.pop("kind", None)
        return web.json_response(
            {
                "kind": f"{t.rt.kind}List",
                "apiVersion": t.rt.api_version,
                "metadata": {"resourceVersion": rv},
                "items": items,
            }
        )

    async def body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            if "yaml" in request.content_type:
                return yaml.safe_load(raw)
            return json.loads(raw or b"null")
        except (ValueError, yaml.YAMLError) as e:
            raise bad_request(f"error decoding request body: {e}") from None

    async def create(self, request: web.Request, t: Target) -> web.Response:
        if t.sub is not None:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        body = await self.body(request)
        if not isinstance(body, dict):
            raise bad_request("the body of the request is not an object")
        body_ns = (body.get("metadata") or {}).get("namespace")
        if t.rt.namespaced and body_ns and body_ns != t.namespace:
            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
        if body.get("kind") and body["kind"] != t.rt.kind:
            raise bad_request(f"the kind of the provided object ({body['kind']}) does not match {t.rt.kind}")
        meta = body.setdefault("metadata", {})
        for f in ("resourceVersion", "uid", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"):
            meta.pop(f, None)
        if t.rt.plural not in ("pods", "namespaces") and t.rt.plural in STATUS_SUBRESOURCE:
            body.pop("status", None)
        default_object(t.rt.plural, body)
        if t.rt.plural == "jobs":
            policy = (((body.get("spec") or {}).get("template") or {}).get("spec") or {}).get("restartPolicy")
            if policy not in ("Never", "OnFailure"):
                raise ApiError(
                    422,
                    "Invalid",
                    f'Job.batch "{meta.get("name") or meta.get("generateName", "")}" is invalid: '
                    f'spec.template.spec.restartPolicy: Required value: valid values: "OnFailure", "Never"',
                    error_details(t.rt, meta.get("name")),
                )
        if parse_bool(request.query.get("dryRun") and "true"):
            body["metadata"].setdefault("creationTimestamp", now_rfc3339())
            return web.json_response(body, status=201)
        try:
            obj = self.store.create(t.rt.plural, body, t.namespace)
        except StoreError as e:
            raise from_store_error(e, t.rt, meta.get("name")) from None
        return web.json_response(obj, status=201)

    def write(self, t: Target, new: Obj, *, check_rv: bool) -> Obj:
        """Store an updated main resource / status subresource, as the real registry would."""
        new.setdefault("metadata", {})
        if (new["metadata"].get("name") or t.name) != t.name:
            raise bad_request(
                f"the name of the object ({new['metadata'].get('name')}) does not match the name on the URL ({t.name})"
            )
        new["metadata"]["name"] = t.name
        if t.rt.namespaced:
            new["metadata"]["namespace"] = t.namespace
        try:
            if t.sub == "status":
                return self.store.update(t.rt.plural, new, status_only=True, check_rv=check_rv)
            if t.rt.plural in STATUS_SUBRESOURCE:
                cur = self.store.get(t.rt.plural, t.namespace, t.name or "")
                if "status" in cur:
                    new["status"] = cur["status"]
            default_object(t.rt.plural, new, creating=False)
            return self.store.update(t.rt.plural, new, check_rv=check_rv)
        except StoreError as e:
            raise from_store_error(e, t.rt, t.name) from None

    async def replace(self, request: web.Request, t: Target) -> web.Response:
        body = await self.body(request)
        if not isinstance(body, dict):
            raise bad_request("the body of the request is not an object")
        return web.json_response(self.write(t, body, check_rv=True))

    async def patch(self, request: web.Request, t: Target) -> web.Response:
        raw = await request.read()
        cur = self.read(t)
        patched = apply_patch(cur, request.content_type, raw)
        # a patch carrying a resourceVersion is a precondition, like an update's
        check = patched["metadata"].get("resourceVersion") != cur["metadata"]["resourceVersion"]
        return web.json_response(self.write(t, patched, check_rv=check))

    # -- delete
    async def _delete_options(self, request: web.Request) -> Obj:
        opts: Obj = {}
        raw = await request.read()
        if raw.strip():
            with contextlib.suppress(ValueError):
                body = json.loads(raw)
                if isinstance(body, dict):
                    opts = body
        if "gracePeriodSeconds" in request.query:
            try:
                opts["gracePeriodSeconds"] = int(request.query["gracePeriodSeconds"])
            except ValueError:
                raise bad_request("invalid gracePeriodSeconds") from None
        if "propagationPolicy" in request.query:
            opts["propagationPolicy"] = request.query["propagationPolicy"]
        return opts

    def delete_object(self, plural: str, namespace: str | None, name: str, opts: Obj) -> Obj:
        """Delete like the real registry: pods gracefully (the kubelet finishes), the rest at once;
        dependents (ownerReferences) are garbage-collected unless ``propagationPolicy: Orphan``."""
        rt = RESOURCES[plural]
        cur = self.store.get(plural, namespace, name)
        pre = opts.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != cur["metadata"].get("uid"):
            raise ApiError(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {pre['uid']}, "
                f"UID in object meta: {cur['metadata'].get('uid')}",
            )
        if pre.get("resourceVersion") and pre["resourceVersion"] != cur["metadata"].get("resourceVersion"):
            raise ApiError(
                409,
                "Conflict",
                f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                f"ResourceVersion in object meta: {cur['metadata'].get('resourceVersion')}",
            )
        if plural == "pods":
            grace = opts.get("gracePeriodSeconds")
            if grace is None:
                grace = (cur.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
            grace = max(0, int(grace))
            if grace == 0 or not (cur.get("spec") or {}).get("nodeName"):
                return self.store.delete(plural, namespace, name)
            return self.store.mark_deleting(plural, namespace, name, grace)
        gone = self.store.delete(plural, namespace, name)
        if opts.get("propagationPolicy") != "Orphan":
            self._collect_dependents(gone["metadata"].get("uid"))
        if plural == "namespaces":
            for other in RESOURCES.values():
                if other.namespaced:
                    for o in self.store.list(other.plural, name):
                        with contextlib.suppress(StoreError):
                            self.delete_object(other.plural, name, o["metadata"]["name"], {})
        del rt
        return gone

    def _collect_dependents(self, uid: str | None) -> None:
        if not uid:
            return
        for rt in RESOURCES.values():
            for o in self.store.list(rt.plural):
                if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or []):
                    with contextlib.suppress(StoreError):
                        self.delete_object(rt.plural, o["metadata"].get("namespace"), o["metadata"]["name"], {})

    async def delete(self, request: web.Request, t: Target) -> web.Response:
        opts = await self._delete_options(request)
        try:
            out = self.delete_object(t.rt.plural, t.namespace, t.name or "", opts)
        except StoreError as e:
            raise from_store_error(e, t.rt, t.name) from None
        if t.rt.plural == "pods":
            return web.json_response(out)
        details = error_details(t.rt, t.name) or {}
        details["uid"] = out["metadata"].get("uid")
        return web.json_response(
            {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}
        )

    async def delete_collection(self, request: web.Request, t: Target) -> web.Response:
        opts = await self._delete_options(request)
        q = request.query
        items = self.store.list(t.rt.plural, t.namespace, q.get("labelSelector"), q.get("fieldSelector"))
        out = []
        for o in items:
            with contextlib.suppress(StoreError):
                out.append(self.delete_object(t.rt.plural, o["metadata"].get("namespace"), o["metadata"]["name"], opts))
        return web.json_response(
            {
                "kind": f"{t.rt.kind}List",
                "apiVersion": t.rt.api_version,
                "metadata": {"resourceVersion": str(self.store.resource_version)},
                "items": out,
            }
        )
