"""The model servers' checks: per model whose Deployment has replicas > 0, ``/health``, ``/version`` and its
served name in ``/v1/models`` (asked with the vLLM key). Takes an httpx client, the replicas and the base
URLs (testable against any server, no cluster needed)."""

from __future__ import annotations

from collections.abc import Mapping

import httpx
from pydantic import SecretStr

from coder_stack.errors import redact
from coder_stack.spec import StackSpec
from coder_stack.transport import bearer, scrub_url

from .rows import DoctorRow, Rows, answer, why


async def model_server_checks(
    http: httpx.AsyncClient,
    spec: StackSpec,
    vllm_key: SecretStr | None,
    replicas: Mapping[str, int],
    urls: Mapping[str, str],
    *,
    key_problem: str = "",
) -> list[DoctorRow]:
    """Per model: ``/health``, ``/version``, its served name in ``/v1/models`` (with the vLLM key), when its
    Deployment has replicas > 0 (``replicas`` per model name, ``urls`` its base URL without ``/v1``)."""
    rows = Rows(vllm_key.get_secret_value() if vllm_key else "")
    for m in spec.models:
        n = replicas.get(m.name, 0)
        if n <= 0:
            rows.add(f"model {m.name}", "skipped", "not serving (replicas 0)")
            continue
        base = urls.get(m.name)
        if not base:
            rows.add(f"model {m.name}", "fail", f"replicas {n} but no endpoint to reach it", "check its Service")
            continue
        base = base.rstrip("/")
        try:
            r = await http.get(f"{base}/health")
            if r.status_code == 200:
                rows.add(f"model {m.name}: /health", "ok", "200")
            else:
                rows.add(f"model {m.name}: /health", "fail", answer(r), f"read the {m.name} pod's log")
            r = await http.get(f"{base}/version")
            version = ""
            if r.status_code == 200:
                try:
                    version = str((r.json() or {}).get("version") or "")
                except (ValueError, AttributeError):
                    version = ""
            if version:
                rows.add(f"model {m.name}: /version", "ok", f"vLLM {redact(version, limit=40)}")
            else:
                rows.add(f"model {m.name}: /version", "warn", f"no version in the answer ({answer(r)})")
        except httpx.HTTPError as e:
            rows.add(
                f"model {m.name}: /health",
                "fail",
                f"{scrub_url(base)} {why(e)}",
                f"replicas {n}: is a pod Ready? (kubectl -n {spec.serving_namespace} get pods)",
            )
            continue
        if vllm_key is None:
            rows.add(
                f"model {m.name}: served name",
                "fail",
                key_problem or "no vLLM key to ask /v1/models with",
                f"create the Secret {spec.vllm_key.namespace}/{spec.vllm_key.name} key {spec.vllm_key.key}",
            )
            continue
        try:
            r = await http.get(f"{base}/v1/models", headers=bearer(vllm_key))
        except httpx.HTTPError as e:
            rows.add(f"model {m.name}: served name", "fail", why(e), f"read the {m.name} pod's log")
            continue
        if r.status_code == 401:
            rows.add(
                f"model {m.name}: served name",
                "fail",
                f"/v1/models refused the vLLM key ({answer(r)})",
                f"the pod's --api-key differs from {spec.vllm_key.namespace}/{spec.vllm_key.name}: restart it",
            )
            continue
        try:
            ids = [str(d.get("id")) for d in r.json().get("data") or [] if isinstance(d, dict)]
        except (ValueError, AttributeError):
            ids = []
        if r.status_code == 200 and m.served_model_name in ids:
            rows.add(f"model {m.name}: served name", "ok", f"/v1/models lists {m.served_model_name}")
        else:
            rows.add(
                f"model {m.name}: served name",
                "fail",
                f"/v1/models ({r.status_code}) lists {ids}, not {m.served_model_name!r}",
                "make --served-model-name and spec.models[].served_model_name agree",
            )
    return rows.rows


__all__ = ["model_server_checks"]
