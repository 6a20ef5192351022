"""teardown (the evening, and the $0 backstop): every GPU model and front-end to 0, verified.

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
from coder_stack.orchestration.gpu import gpu_limit_status
from coder_stack.report import RunReport

NODE_DRAIN_MIN = 10


class TeardownOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(False, description="Only report what is running and would be scaled to 0.")


@flow(name="teardown", log_prints=False)
async def teardown(
    options: TeardownOptions = TeardownOptions(),
    connection: Connection = Connection(),
) -> RunReport:
    """Scale every GPU model and front-end to 0, wait until their pods are gone, verify nothing is left."""
    spec, target = await connection.resolve()
    async with cluster_session(target):
        log = logger()
        report = RunReport(flow="teardown")
        frontends = [f.name for f in spec.frontends]
        async with guarded(report, "teardown-report", "teardown", final_state_of=None):
            found: list[str] = []
            async with open_api(target) as api:
                for ns, name in spec.deployments():
                    st = await deployment_status(api, ns, name)
                    if st.replicas or st.pods:
                        found.append(f"{name} ({st.replicas} replica(s), {len(st.pods)} pod(s))")
            report.notes.append(f"found running: {', '.join(found) if found else 'nothing'}")
            log.info("Teardown found running: %s.", ", ".join(found) if found else "nothing")
            if options.dry_run:
                report.notes.append(f"dry run: would scale {', '.join(n for _, n in spec.deployments())} to 0")
                report.finish("dry run: nothing changed")
                return report
            outcome = await release(target, spec, list(spec.models), frontends)
            # a plain scale-down is not news; pods waited out or a failure is
            report.notes += [
                f"{n}: {line.detail}" for n, line in outcome.lines.items() if line.pods_seen or not line.released
            ]
            state = await final_state(target, spec)
            report.final_state = state
            left = [k for k, v in state.items() if v]
            async with open_api(target) as api:
                for m in spec.models:
                    pods = await pod_summary(api, spec.serving_namespace, m.selector)
                    left += [f"pod {p.name}" for p in pods]
            if left:
                raise TeardownIncomplete(
                    f"still running after teardown: {', '.join(left)}. A GitOps controller with self-heal may be "
                    "scaling them back up; check it, then rerun `coder-stack down`"
                )
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
            report.finish("passed: everything at 0")
            return report
