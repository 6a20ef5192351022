"""What a flow run records in its report (ready times, smokes, spend, the replicas it leaves) and publishes."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

from coder_stack.errors import CoderStackError
from coder_stack.flows.run import logger
from coder_stack.kubernetes.client import ClusterTarget, open_api
from coder_stack.kubernetes.wait import ReadyReport
from coder_stack.kubernetes.workloads import deployment_replicas
from coder_stack.probe import SmokeResult
from coder_stack.report import ModelSection, RunReport, SmokeLine, SpendLine
from coder_stack.spec import StackSpec


def record_ready(section: ModelSection, ready: ReadyReport) -> None:
    section.phases = {k: round(v, 3) for k, v in ready.seconds.items()}
    section.ready_s = round(ready.total_s, 3)
    section.scale_up_seen = ready.scale_up_seen


def record_smoke(section: ModelSection, res: SmokeResult, label: str | None = None) -> None:
    via = f" via key {res.key_alias}" if res.key_alias else ""
    checks = "; ".join(c.name for c in res.checks)
    detail = f"{checks}. {res.excerpt!r}" if res.excerpt else checks
    for d in res.diagnostics:
        detail += f" [diagnostic: {d}]"
    section.smokes.append(SmokeLine(check=label or f"{res.kind}{via}", ok=True, detail=detail, seconds=res.total_s))
    if res.ttft_s is not None and section.ttft_ms is None:
        section.ttft_ms = round(res.ttft_s * 1000, 1)


def record_failure(section: ModelSection, label: str, err: BaseException) -> None:
    section.smokes.append(SmokeLine(check=label, ok=False, detail=str(err)))


async def read_replicas(target: ClusterTarget, spec: StackSpec) -> dict[str, int]:
    """spec.replicas of every Deployment the stack scales, now (``namespace/name``): one Deployment list per
    namespace (it runs as the GPU passes to the next session; a read per Deployment and its pods slowed
    that hand-off). A Deployment the stack names that is missing is left out and warned about."""
    deployments = spec.deployments()
    async with open_api(target) as api:
        by_ns = {ns: await deployment_replicas(api, ns) for ns in dict.fromkeys(ns for ns, _ in deployments)}
    missing = [f"{ns}/{name}" for ns, name in deployments if name not in by_ns[ns]]
    if missing:
        logger().warning("No such Deployment: %s.", ", ".join(missing))
    return {f"{ns}/{name}": by_ns[ns][name] for ns, name in deployments if name in by_ns[ns]}


async def final_state(target: ClusterTarget, spec: StackSpec) -> dict[str, int]:
    """The replicas as the run leaves them, for its report; a cluster that cannot be read is a warning here."""
    try:
        return await read_replicas(target, spec)
    except CoderStackError as e:
        logger().warning("Could not read the final state: %s", e)
        return {}


def spend_lines(rows: list[Any]) -> list[SpendLine]:
    out = []
    for r in rows:
        note = r.status if not r.note else f"{r.status}: {r.note}"
        out.append(
            SpendLine(
                alias=r.alias,
                spend=r.spend,
                max_budget=r.max_budget,
                share_used=r.share_used,
                models=list(r.models),
                note=note,
            )
        )
    return out


async def publish(report: RunReport, key: str) -> None:
    """The run's markdown report and spend table as Prefect artifacts (no secrets in either)."""
    try:
        await acreate_markdown_artifact(key=key, markdown=report.to_markdown(), description=f"{report.flow} report")
        if report.spend:
            await acreate_table_artifact(
                key=f"{key}-spend",
                table=[s.model_dump() for s in report.spend],
                description="Spend per virtual key",
            )
    except Exception as e:  # an artifact must never turn a clean-up into a crash
        logger().warning("Could not publish the report artifact: %s", type(e).__name__)
