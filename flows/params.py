"""A flow's parameters that say where it runs: which cluster and which stack (:class:`Connection`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from coder_stack.kubernetes.client import ClusterTarget
from coder_stack.orchestration.stack_block import load_stack_block
from coder_stack.spec import StackSpec, load_spec


class Connection(BaseModel):
    """Which cluster and which stack.

    The stack: a ``CoderStackSpec`` block named by ``stack_block`` (kept in Prefect, for runs in a Job pod),
    or a YAML file at ``stack_file`` (read on the machine that runs the flow), or neither (the runbook's
    reference deployment). The cluster: a ``KubernetesCredentials`` block named by ``credentials_block``, or
    a kubeconfig path, or neither (inside a pod its ServiceAccount, else $KUBECONFIG, else ~/.kube/config).
    Only names and paths: credentials never appear in a parameter.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kubeconfig: str | None = Field(
        None, max_length=4096, description="Kubeconfig path; empty: in-cluster, then $KUBECONFIG, then ~/.kube/config."
    )
    context: str | None = Field(None, max_length=253, description="Kubeconfig context; empty: the current one.")
    stack_file: str | None = Field(
        None, max_length=4096, description="Stack spec YAML; empty: the runbook's reference deployment."
    )
    stack_block: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="Name of the Coder Stack Spec block holding the stack spec (instead of stack_file).",
    )
    credentials_block: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="Name of a Kubernetes Credentials block for runs outside the cluster (instead of kubeconfig).",
    )

    @model_validator(mode="after")
    def _one_source_each(self) -> Connection:
        if self.stack_file and self.stack_block:
            raise ValueError("give stack_file or stack_block, not both")
        if self.kubeconfig and self.credentials_block:
            raise ValueError("give kubeconfig or credentials_block, not both")
        return self

    def cluster_target(self) -> ClusterTarget:
        """The cluster to talk to (serialisable; the credentials block, if any, is read when a client opens)."""
        return ClusterTarget(kubeconfig=self.kubeconfig, context=self.context, credentials_block=self.credentials_block)

    async def resolve(self) -> tuple[StackSpec, ClusterTarget]:
        """The spec and cluster target; a bad file or block fails here, before anything changes."""
        spec = await load_stack_block(self.stack_block) if self.stack_block else load_spec(self.stack_file)
        return spec, self.cluster_target()
