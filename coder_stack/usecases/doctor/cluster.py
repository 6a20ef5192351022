"""The doctor wired to a cluster: how it finds the keys (the master and vLLM keys from their Secrets), the
models' replicas (their Deployments) and the endpoints (port-forward, in-cluster or URL overrides, as the
flows open them), then runs the gateway's and the model servers' checks through them.

A failure to find something is a row (``fail``, with what to do), never an exception with a key in it."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from pydantic import SecretStr

from coder_stack.errors import CoderStackError
from coder_stack.spec import StackSpec

from .gateway import gateway_checks
from .rows import DoctorReport, DoctorRow, Rows, why
from .servers import model_server_checks


async def doctor_cluster(target: Any, spec: StackSpec) -> DoctorReport:
    """Read the master and vLLM keys from their Secrets and the models' replicas from their Deployments,
    open the gateway and the serving models' endpoints as the spec says, and run every check."""
    from coder_stack.kubernetes.client import open_api
    from coder_stack.kubernetes.workloads import deployment_status
    from coder_stack.transport import make_client
    from coder_stack.usecases.endpoints import open_endpoint, open_gateway, read_ref

    pre = Rows()
    async with open_api(target) as api, AsyncExitStack() as stack:
        replicas: dict[str, int] = {}
        for m in spec.models:
            try:
                replicas[m.name] = (await deployment_status(api, spec.serving_namespace, m.name)).replicas
            except CoderStackError as e:
                pre.add(f"model {m.name}", "fail", why(e), "apply the stack's manifests")
        vllm_key: SecretStr | None = None
        key_problem = ""
        if any(n > 0 for n in replicas.values()):
            try:
                vllm_key = await read_ref(api, spec.vllm_key)
            except CoderStackError as e:
                key_problem = why(e)
        urls: dict[str, str] = {}
        for m in spec.models:
            if replicas.get(m.name, 0) > 0:
                try:
                    urls[m.name] = await stack.enter_async_context(open_endpoint(api, spec, m.name))
                except CoderStackError as e:
                    pre.add(f"model {m.name}: endpoint", "fail", why(e), "check its Service and pods")
        try:
            master = await read_ref(api, spec.master_key)
            gw = await stack.enter_async_context(open_gateway(api, spec))
        except CoderStackError as e:
            pre.add("gateway ready", "fail", why(e), "check the litellm Secret, Service and pod")
            rows: list[DoctorRow] = []
        else:
            rows = await gateway_checks(gw, master, spec, serving=replicas)
        http = await stack.enter_async_context(make_client(spec.timeouts, attempts=2, max_wait_s=2.0))
        rows += await model_server_checks(http, spec, vllm_key, replicas, urls, key_problem=key_problem)
    return DoctorReport(rows=pre.rows + rows)


__all__ = ["doctor_cluster"]
