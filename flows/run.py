"""A flow run's context: the cluster, the stack and the report every step works with; its logger; its id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect.context import FlowRunContext
from prefect.logging import get_run_logger

from coder_stack.kubernetes.client import ClusterTarget
from coder_stack.report import RunReport
from coder_stack.spec import StackSpec


@dataclass(frozen=True)
class Run:
    """What every step of a flow run works with: the cluster, the stack, and the run's report."""

    target: ClusterTarget
    spec: StackSpec
    report: RunReport

    def step(self, text: str, *, cleanup: bool = False) -> None:
        self.report.step(text, cleanup=cleanup)


def logger() -> Any:
    return get_run_logger()


def this_run_id() -> str | None:
    """This flow run's id, stamped on the models it brings up or uses (see coder_stack.usecases.stamps)."""
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else None
