"""`coder-stack doctor`: quick checks of the gateway and the model servers before the morning run meets them.

Read-only, except for throwaway virtual keys (alias ``coder-stack-doctor-<hex>``, tiny budget) that are
always deleted again. No Prefect flow, no Prefect server. The modules, one concern each:

- :mod:`.rows`: the result model, :class:`DoctorRow` (name, ``ok`` / ``warn`` / ``fail`` / ``skipped``, what
  was seen, what to do) and :class:`DoctorReport` (its verdict and its JSON, ``doctor --json``); every text
  redacted, no key value, header or master key in a row, a log line or an exception;
- :mod:`.gateway`: :func:`gateway_checks` (ready, version, aliases, prices, upstreams, a throwaway key's
  lifecycle, streamed-FIM metering), given an httpx client on the gateway and the master key;
- :mod:`.servers`: :func:`model_server_checks` (``/health``, ``/version``, the served name), given the
  replicas and base URLs;
- :mod:`.cluster`: :func:`doctor_cluster`, the wiring to a cluster (Secrets, replicas, endpoints).

:func:`run_doctor` runs both sets of checks on clients it is given (no cluster needed). Showing a report
on a terminal is the app's (``coder_stack.app.doctor_view``); the library knows no terminal.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx
from pydantic import SecretStr

from coder_stack.spec import StackSpec

from .cluster import doctor_cluster
from .gateway import DOCTOR_ALIAS_PREFIX, NOT_METERED, gateway_checks, stack_aliases
from .rows import DoctorReport, DoctorRow, Status, selected
from .servers import model_server_checks


async def run_doctor(
    gw: httpx.AsyncClient,
    master: SecretStr,
    spec: StackSpec,
    *,
    serving: Mapping[str, int] | None = None,
    vllm_key: SecretStr | None = None,
    model_urls: Mapping[str, str] | None = None,
    http: httpx.AsyncClient | None = None,
) -> DoctorReport:
    """Gateway checks, then model-server checks when ``serving`` (replicas per model) is known."""
    rows = await gateway_checks(gw, master, spec, serving=serving)
    if serving is not None:
        rows += await model_server_checks(http or gw, spec, vllm_key, serving, model_urls or {})
    return DoctorReport(rows=rows)


__all__ = [
    "DOCTOR_ALIAS_PREFIX",
    "NOT_METERED",
    "DoctorReport",
    "DoctorRow",
    "Status",
    "doctor_cluster",
    "gateway_checks",
    "model_server_checks",
    "run_doctor",
    "selected",
    "stack_aliases",
]
