"""teardown (the evening, and the $0 backstop): every GPU model and front-end to 0, verified.

With ``models`` named (``coder-stack down --model NAME``), only those models go to 0 (pods gone, verified): the
other models keep serving, and the front-ends stay up unless no model serves once the named ones are down (then
they go to 0 too, as in a full teardown). An unknown name is refused before anything changes.

Never waits for the GPU limit — it must run even while a session is stuck or a flow was killed with
SIGKILL. Idempotent: safe when everything is already down. Reports what it found running and when
the GPU node should drain (the autoscaler removes a node ~10 min after its last GPU pod exits).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from coder_stack.flows.cleanup import GPU_FLOWS
from coder_stack.flows.errors import TeardownIncomplete
from coder_stack.flows.gpu_steps import release
from coder_stack.flows.guard import guarded
from coder_stack.flows.params import Connection
from coder_stack.flows.record import final_state
from coder_stack.flows.run import logger
from coder_stack.kubernetes.client import cluster_session, open_api
from coder_stack.kubernetes.pods import pod_summary
from coder_stack.kubernetes.workloads import deployment_status
from coder_stack.orchestration.gpu_limit import gpu_limit_status
from coder_stack.report import RunReport
from coder_stack.spec import ModelSpec

NODE_DRAIN_MIN = 10


class TeardownOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(False, description="Only report what is running and would be scaled to 0.")
    models: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="Only these models (Deployment names or aliases) to 0, pods gone; the other models keep serving "
        "and the front-ends stay up unless no model serves afterwards. Empty: every model and front-end to 0.",
    )


@flow(name="teardown", log_prints=False)
async def teardown(
    options: TeardownOptions = TeardownOptions(),
    connection: Connection = Connection(),
) -> RunReport:
    """Scale every GPU model and front-end to 0 (or only ``options.models``), wait until their pods are gone,
    verify nothing is left of them."""
    spec, target = await connection.resolve()
    # an unknown name is refused here, before the cluster is even opened
    named = list({m.name: m for m in (spec.model(n) for n in options.models)}.values())
    async with cluster_session(target):
        log = logger()
        report = RunReport(flow=f"teardown({', '.join(m.name for m in named)})" if named else "teardown")
        async with guarded(report, "teardown-report", "teardown", final_state_of=None):
            found: list[str] = []
            serving: set[str] = set()
            async with open_api(target) as api:
                for ns, name in spec.deployments():
                    st = await deployment_status(api, ns, name)
                    if st.replicas or st.pods:
                        found.append(f"{name} ({st.replicas} replica(s), {len(st.pods)} pod(s))")
                    if st.replicas and ns == spec.serving_namespace:
                        serving.add(name)
            report.notes.append(f"found running: {', '.join(found) if found else 'nothing'}")
            log.info("Teardown found running: %s.", ", ".join(found) if found else "nothing")
            models = named or list(spec.models)

            def key(m: ModelSpec) -> str:
                return f"{spec.serving_namespace}/{m.name}"

            kept = sorted(n for n in serving if n not in {m.name for m in models})
            frontends = [f.name for f in spec.frontends] if not kept else []
            if named:
                report.notes.append(
                    f"kept serving: {', '.join(kept)}; the front-ends stay up for them"
                    if kept
                    else "no other model serves: the front-ends go to 0 as well"
                )
            if options.dry_run:
                what = [m.name for m in models] + frontends
                report.notes.append(f"dry run: would scale {', '.join(what)} to 0")
                report.finish("dry run: nothing changed")
                return report
            outcome = await release(target, spec, models, frontends)
            # a plain scale-down is not news; pods waited out or a failure is
            report.notes += [
                f"{n}: {line.detail}" for n, line in outcome.lines.items() if line.pods_seen or not line.released
            ]
            state = await final_state(target, spec)
            if named and not frontends and state and not any(state.get(key(m)) for m in spec.models):
                # the models kept were scaled to 0 meanwhile (another teardown of them, a reclaim): of two runs
                # interleaved, at least one reads the other's scale-down here, so the front-ends do not stay up alone
                frontends = [f.name for f in spec.frontends]
                report.notes.append("no model serves any more: the front-ends go to 0 as well")
                fronts = await release(target, spec, [], frontends)
                report.notes += [f"{n}: {line.detail}" for n, line in fronts.lines.items() if not line.released]
                state = await final_state(target, spec)
            report.final_state = state
            mine = {key(m) for m in models} | {f"{spec.experience_namespace}/{f}" for f in frontends}
            left = [k for k, v in state.items() if v and k in mine]
            async with open_api(target) as api:
                for m in models:
                    pods = await pod_summary(api, spec.serving_namespace, m.selector)
                    left += [f"pod {p.name}" for p in pods]
            if left:
                raise TeardownIncomplete(
                    f"still running after teardown: {', '.join(left)}. A GitOps controller with self-heal may be "
                    "scaling them back up; check it, then rerun `coder-stack down`"
                    + "".join(f" --model {m.name}" for m in named)
                )
            still = sorted(m.name for m in spec.models if m.name in kept and state.get(key(m)))
            if named and still:
                report.notes.append(f"{', '.join(still)} still serving: the GPU node stays up")
                report.finish(f"passed: {', '.join(m.name for m in named)} at 0; {', '.join(still)} serving")
                return report
            drain_at = datetime.now(UTC) + timedelta(minutes=NODE_DRAIN_MIN)
            report.notes.append(
                f"no GPU pod left; the GPU node should drain by about {drain_at:%H:%M} UTC "
                f"({NODE_DRAIN_MIN} min after the last GPU pod exits)"
            )
            try:
                gpu = await gpu_limit_status(GPU_FLOWS)
                report.notes.append(gpu.describe())
                if gpu.leaked:
                    log.warning("%s", gpu.describe())
            except Exception as e:  # the Prefect API is not needed to tear down; report and carry on
                report.notes.append(f"GPU limit status unknown: {type(e).__name__}")
            if named:
                report.finish(f"passed: {', '.join(m.name for m in named)} at 0; no model serving")
            else:
                report.finish("passed: everything at 0")
            return report
