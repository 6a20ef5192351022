"""manage_keys and report_spend: the gateway's virtual keys on their own (no GPU involved)."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.flows.params import Connection
from coder_stack.flows.record import publish, spend_lines
from coder_stack.flows.run import logger
from coder_stack.kubernetes.client import cluster_session
from coder_stack.report import RunReport
from coder_stack.tasks.gateway import ensure_keys_task, gateway_ready_task, read_spend_task


class KeyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    aliases: list[str] | None = Field(None, max_length=64, description="Key aliases to handle; empty: all of them.")
    rotate: bool = Field(False, description="Mint new keys, swap them in, then delete the old ones.")
    dry_run: bool = Field(False, description="Only report which keys would be checked or minted.")


@flow(name="manage_keys", log_prints=False)
async def manage_keys(options: KeyOptions = KeyOptions(), connection: Connection = Connection()) -> RunReport:
    """Mint, keep or correct each client's key and deliver it to its consumer (idempotent by alias)."""
    spec, target = await connection.resolve()
    async with cluster_session(target):
        aliases = options.aliases or [k.alias for k in spec.virtual_keys]
        for a in aliases:
            spec.key(a)  # unknown alias: refused before anything changes
        report = RunReport(flow="manage_keys")
        await gateway_ready_task(target, spec)
        if options.dry_run:
            verb = "rotate" if options.rotate else "check (and mint or correct if needed)"
            report.notes.append(f"dry run: would {verb} keys {aliases}")
            report.finish("dry run: nothing changed")
            return report
        reps = await ensure_keys_task(target, spec, aliases, rotate=options.rotate)
        report.key_actions += [
            f"{r.alias}: {r.action} ({r.delivered_to}{f'; restarted {r.consumer}' if r.consumer_restarted else ''})"
            for r in reps
        ]
        report.finish("passed")
        await publish(report, "keys-report")
        logger().info("Keys: %s", "; ".join(report.key_actions))
        return report


@flow(name="report_spend", log_prints=False)
async def report_spend(connection: Connection = Connection()) -> RunReport:
    """Spend, budget and share used per virtual key, read through the master key."""
    spec, target = await connection.resolve()
    async with cluster_session(target):
        report = RunReport(flow="report_spend")
        rows = await read_spend_task(target, spec, [k.alias for k in spec.virtual_keys])
        report.spend = spend_lines(rows)
        report.finish("passed")
        await publish(report, "spend-report")
        return report
