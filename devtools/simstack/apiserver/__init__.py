"""The simulated cluster's Kubernetes API server: the real REST API over :class:`simstack.store.Store`.

Real clients (kubernetes-asyncio, kubectl 1.32) talk to it unchanged through a kubeconfig
(:func:`kubeconfig_yaml`). It serves legacy discovery, CRUD + watch for every resource in
``store.RESOURCES``, the ``status`` and ``scale`` subresources, server-side Tables for ``kubectl get``,
and the ``exec`` / ``portforward`` WebSocket subresources (channel protocol v4/v5).

Everything runs on the event loop the server is started on (the store is not thread-safe).

Hooks for reliability tests:

* ``app["faults"]`` (:class:`~.faults.ApiFaults`): queue failures (500/429/403/...) for the next N requests
  matching a method and a path regex, or drop the next watch stream matching a path after K events.
* ``app["requests"]``: the last requests seen, as ``(method, path_qs)``.
* ``authorizer``: ``authorizer(token, verb, resource, namespace, name) -> bool | str`` (``str`` = the
  reason, refused). :class:`~.rbac.RBACAuthorizer` evaluates Role/RoleBinding objects of the store for
  ServiceAccount tokens.

The package, one module a concern: :mod:`~simstack.apiserver.app` (the router, :class:`ApiServer`, the
entry points), :mod:`~simstack.apiserver.discovery`, :mod:`~simstack.apiserver.target` (what a path
names), :mod:`~simstack.apiserver.crud`, :mod:`~simstack.apiserver.patch`, :mod:`~simstack.apiserver.scale`,
:mod:`~simstack.apiserver.watch`, :mod:`~simstack.apiserver.tables` (for kubectl),
:mod:`~simstack.apiserver.exec` and :mod:`~simstack.apiserver.portforward` (WebSockets),
:mod:`~simstack.apiserver.rbac`, :mod:`~simstack.apiserver.faults` and :mod:`~simstack.apiserver.errors`.
"""

from simstack.apiserver.app import ApiServer, kubeconfig_yaml, start_apiserver

__all__ = ["ApiServer", "kubeconfig_yaml", "start_apiserver"]
