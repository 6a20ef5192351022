"""Everything that talks to the Kubernetes API (kubernetes-asyncio), one module per concern.

Each function takes an ``ApiClient`` first; errors are the project's (:mod:`coder_stack.errors`).
Imports go one way (no cycles): every module imports ``client``; ``workloads``, ``wait``, ``exec``,
``preflight`` and ``portforward`` import ``pods``; ``wait`` also imports ``watch`` and ``workloads``.

- ``client``: ``ClusterTarget`` (which cluster), ``open_api`` / ``cluster_session`` (the API client),
  ``api_errors`` / ``ws_errors`` (client errors -> the project's errors), Secrets and ConfigMaps.
- ``pods``: ``is_pod_ready``, the ``kubectl get pods`` STATUS text, ``PodSummary``, ``list_pods`` /
  ``pod_summary`` by label selector, ``ready_pod``.
- ``workloads``: Deployments: ``scale``, ``read_deployment``, ``deployment_status``, ``restart_deployment``.
- ``watch``: list-then-watch into a queue, resumed on stream end, re-listed on 410 Gone, BOOKMARKs skipped.
- ``wait``: ``wait_ready`` (cold-start phases node/image/weights/start with their budgets, ``on_phase``
  updates, diagnosis of pods that will not recover, ``ReadyReport``) and ``wait_gone`` (``GoneReport``).
- ``exec``: ``exec_in_deployment`` (`kubectl exec`) and its ``ExecResult``.
- ``preflight``: ``preflight`` (namespaces and Deployments exist, models fit the GPU node's RAM),
  ``parse_memory_gb``, ``node_size_for``.
- ``portforward``: `kubectl port-forward svc/x` in-process, to a Ready pod behind a Service.
"""
