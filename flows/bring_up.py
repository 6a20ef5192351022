"""bring_up (the morning): keys, front-ends, the default model(s), smokes; leaves them serving.

The first model's cold start overlaps key minting and the front-ends' start. On a time-sliced GPU the spec's
``bring_up_models`` (coder-chat, then coder-fim) come up one after another, each only once its share of the
GPU is free and the one before is Ready (vLLM refuses to start when its share is not free); the preflight
refuses a set that does not fit one GPU before anything scales. If any step fails, every model it started is
scaled back to 0 (front-ends too) so a failed morning never bills a GPU all day.
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.flows.gpu_steps import free_gpu, release, smoke_served, start_models
from coder_stack.flows.guard import guarded
from coder_stack.flows.params import Connection
from coder_stack.flows.record import record_smoke
from coder_stack.flows.run import Run, logger
from coder_stack.kubernetes.client import cluster_session
from coder_stack.orchestration.gpu import gpu_session
from coder_stack.report import RunReport
from coder_stack.spec import KeyDestination, ModelSpec, StackSpec
from coder_stack.tasks.cluster import preflight_task
from coder_stack.tasks.gateway import gateway_ready_task
from coder_stack.tasks.smoke import smoke_frontends_task


def client_key_of(spec: StackSpec, model: ModelSpec) -> str | None:
    """The alias of the key its front-end calls ``model`` with: Open WebUI's for a chat model, Tabby's for a FIM
    model (None: the first key scoped to it)."""
    homes: dict[str, KeyDestination] = {"chat": "openwebui-secrets", "fim": "tabby-config"}
    home = homes.get(model.role)
    key = spec.key_delivered_to(home) if home is not None else None
    return key.alias if key is not None and model.alias in key.models else None


class BringUpOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        max_length=63,
        description="Model to leave serving; empty: the spec's default (time-sliced: every bring-up model).",
    )
    dry_run: bool = Field(False, description="Only report what would be minted and scaled.")


@flow(name="bring_up", log_prints=False)
async def bring_up(
    options: BringUpOptions = BringUpOptions(),
    connection: Connection = Connection(),
) -> RunReport:
    """Morning bring-up: the default model(s) serving behind the gateway, front-ends up, keys delivered."""
    spec, target = await connection.resolve()
    async with cluster_session(target):
        models = [spec.model(options.model)] if options.model else spec.bring_up_models
        names = ", ".join(m.name for m in models)
        frontends = [f.name for f in spec.frontends]
        aliases = [k.alias for k in spec.virtual_keys if k.deliver_to != "keystore"]
        log = logger()
        run = Run(target, spec, RunReport(flow="bring_up"))
        report = run.report
        async with guarded(report, "bring-up-report", "bring_up", final_state_of=(target, spec)):
            # the whole set: a combination that does not fit one GPU is refused here, before anything scales
            await preflight_task(target, spec, [m.name for m in models])
            await gateway_ready_task(target, spec)
            if options.dry_run:
                report.notes.append(
                    f"dry run: would check/mint keys {aliases}, scale {frontends} to 1, "
                    f"free the GPU and bring up {' then '.join(m.name for m in models)}"
                )
                report.finish("dry run: nothing changed")
                return report
            async with gpu_session(spec.timeouts.gpu_limit_s, occupy=spec.occupy(models)):
                run.step(f"holding the GPU limit; bringing up {names}")
                await free_gpu(run, models[0] if len(models) == 1 else models)
                ok = False
                try:
                    await start_models(run, models, aliases, list(spec.frontends))
                    for m in models:
                        # shared: each through the key of the front-end that uses it (Open WebUI's for chat, Tabby's
                        # for FIM); one model: as before, the first key scoped to it
                        await smoke_served(run, m, client_key_of(spec, m) if len(models) > 1 else None)
                    for m in models:
                        fe = await smoke_frontends_task(target, spec, openwebui=m.role == "chat", tabby=m.role == "fim")
                        record_smoke(report.section(m.name), fe, "front-ends")
                    ok = True
                finally:
                    if not ok:
                        what = "model" if len(models) == 1 else "models"
                        run.step(f"bring-up failed: scale the {what} and front-ends back to 0", cleanup=True)
                        outcome = await release(target, spec, models, frontends)
                        report.notes += outcome.notes()
            if len(models) > 1:
                report.notes.append(f"serving together on the time-sliced GPU: {names}")
            report.finish("passed: serving")
            log.info(
                "%s %s serving behind the gateway; Open WebUI and Tabby are up.",
                names,
                "is" if len(models) == 1 else "are",
            )
            return report
