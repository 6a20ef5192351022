"""bring_up (the morning): keys, front-ends, the default model, smokes; leaves it serving.

The default model's cold start overlaps key minting and the front-ends' start. If any step fails, the
model is scaled back to 0 (front-ends too) so a failed morning never bills a GPU all day.
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.flows.gpu_steps import free_gpu, model_up_with_keys_and_frontends, release, smoke_served
from coder_stack.flows.guard import guarded
from coder_stack.flows.params import Connection
from coder_stack.flows.record import record_smoke
from coder_stack.flows.run import Run, logger
from coder_stack.kubernetes.client import cluster_session
from coder_stack.orchestration.gpu import gpu_session
from coder_stack.report import RunReport
from coder_stack.tasks.cluster import preflight_task
from coder_stack.tasks.gateway import gateway_ready_task
from coder_stack.tasks.smoke import smoke_frontends_task


class BringUpOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=63, description="Model to leave serving; empty: the spec's default.")
    dry_run: bool = Field(False, description="Only report what would be minted and scaled.")


@flow(name="bring_up", log_prints=False)
async def bring_up(
    options: BringUpOptions = BringUpOptions(),
    connection: Connection = Connection(),
) -> RunReport:
    """Morning bring-up: the default model serving behind the gateway, front-ends up, keys delivered."""
    spec, target = await connection.resolve()
    async with cluster_session(target):
        model = spec.model(options.model or spec.default_model)
        frontends = [f.name for f in spec.frontends]
        aliases = [k.alias for k in spec.virtual_keys if k.deliver_to != "keystore"]
        log = logger()
        run = Run(target, spec, RunReport(flow="bring_up"))
        report = run.report
        async with guarded(report, "bring-up-report", "bring_up", final_state_of=(target, spec)):
            await preflight_task(target, spec, [model.name])
            await gateway_ready_task(target, spec)
            if options.dry_run:
                report.notes.append(
                    f"dry run: would check/mint keys {aliases}, scale {frontends} to 1, "
                    f"free the GPU and bring up {model.name}"
                )
                report.finish("dry run: nothing changed")
                return report
            async with gpu_session(spec.timeouts.gpu_limit_s):
                run.step(f"holding the GPU limit; bringing up {model.name}")
                await free_gpu(run, model)
                ok = False
                try:
                    await model_up_with_keys_and_frontends(run, model, aliases, list(spec.frontends))
                    await smoke_served(run, model)
                    section = report.section(model.name)
                    fe = await smoke_frontends_task(
                        target, spec, openwebui=model.role == "chat", tabby=model.role == "fim"
                    )
                    record_smoke(section, fe, "front-ends")
                    ok = True
                finally:
                    if not ok:
                        run.step("bring-up failed: scale the model and front-ends back to 0", cleanup=True)
                        outcome = await release(target, spec, [model], frontends)
                        report.notes += outcome.notes()
            report.finish("passed: serving")
            log.info("%s is serving behind the gateway; Open WebUI and Tabby are up.", model.name)
            return report
