"""`coder-stack setup`: the Prefect side of the stack — the GPU limit, the blocks, the work pools, the crash
automation, the deployments.

Safe to run twice: the limit is resized (never duplicated), blocks are created or replaced by what the
options give (an equal one is left alone), the Kubernetes pool's template gets coder-stack's values only
where it still holds prefect-kubernetes' stock value or ours (a value someone changed is kept, with a note),
the crash automation is replaced only when its definition changed, deployments (and the clean-up
deployment's trigger) are re-applied by `prefect deploy --all`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, Field

from coder_stack.errors import ConfigError
from coder_stack.orchestration.gpu import ensure_gpu_limit
from coder_stack.orchestration.liveness import ensure_crash_automation
from coder_stack.orchestration.stack_block import (
    DEFAULT_STACK_BLOCK,
    register_stack_block_type,
    save_stack_block,
    stack_block_exists,
)
from coder_stack.spec import StackSpec
from flows.cleanup import GPU_FLOWS

PROJECT_DIR = Path(__file__).resolve().parents[2]  # coder_stack/app/setup.py -> the checkout
PROCESS_POOL = "coder-stack-process"
K8S_POOL = "coder-stack-k8s"
POOLS = {PROCESS_POOL: "process", K8S_POOL: "kubernetes"}
# Where the flows' Jobs run and as whom: deployments/rbac.yaml's ServiceAccount and its namespace.
FLOWS_NAMESPACE = "prefect"
FLOWS_SERVICE_ACCOUNT = "coder-stack-flows"
DEFAULT_IMAGE = f"coder-stack:{version('coder-stack')}"  # the tag README's `docker build` gives
# How long the worker may wait for a flow run's own pod to be created and start. prefect-kubernetes' default
# is 60 s; on an autoscaled node pool the pod first waits for a node scale-up (a CPU node: 2-5 min on
# GKE/EKS/AKS, more for a cold region or a GPU pool), then pulls the image. 900 s covers a slow scale-up
# plus the pull with room to spare, and is still short enough to notice a pod that never schedules.
# (prefect-kubernetes 0.8.0's worker returns once the Job is created and its observer follows the pod, so it
# reads neither watch timeout; the values are kept for workers that do, e.g. a pool shared with older ones.)
POD_WATCH_TIMEOUT_S = 900
# No job watch timeout (prefect-kubernetes' default, None): a run may queue for the GPU limit for
# timeouts.gpu_limit_s (3600 s) and then cold start a model for up to 1200 s; the flows bound their own waits.
JOB_WATCH_TIMEOUT_S: int | None = None
WORKER_VALUES = PROJECT_DIR / "deployments" / "prefect-worker-values.yaml"


class SetupReport(BaseModel):
    gpu_limit: str
    blocks: list[str] = Field(default_factory=list)
    pools: list[str] = Field(default_factory=list)
    automation: str = ""
    deployed: bool = False
    deploy_output: str = ""


def owned_job_variables(image: str) -> dict[str, Any]:
    """The base job template variables coder-stack sets (their defaults); everything else is prefect-kubernetes'."""
    return {
        "namespace": FLOWS_NAMESPACE,
        "service_account_name": FLOWS_SERVICE_ACCOUNT,
        "image": image,
        "pod_watch_timeout_seconds": POD_WATCH_TIMEOUT_S,
        "job_watch_timeout_seconds": JOB_WATCH_TIMEOUT_S,
    }


def _stock_template(kind: str) -> dict:
    if kind == "kubernetes":
        from prefect_kubernetes.worker import KubernetesWorker

        return KubernetesWorker.get_default_base_job_template()
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def k8s_base_job_template(image: str = DEFAULT_IMAGE) -> dict:
    """prefect-kubernetes 0.8.0's default base job template with coder-stack's namespace, ServiceAccount,
    image and pod watch timeout as the variables' defaults (a deployment's job_variables still override them)."""
    template = _stock_template("kubernetes")
    props = template["variables"]["properties"]
    for name, value in owned_job_variables(image).items():
        props[name]["default"] = value
    return template


def _base_job_template(kind: str, image: str) -> dict:
    return k8s_base_job_template(image) if kind == "kubernetes" else _stock_template(kind)


def reconcile_k8s_template(current: dict, image: str, image_given: bool) -> tuple[dict, list[str]]:
    """The pool's template with coder-stack's values where they are ours to set, and what was done.

    A variable's default is ours when it is still prefect-kubernetes' stock value or already ours; the image
    also when one was given (--image or CODER_STACK_IMAGE). A value someone else set is kept, and said so.
    """
    template = copy.deepcopy(current)
    props = template.get("variables", {}).get("properties", {})
    stock = _stock_template("kubernetes")["variables"]["properties"]
    notes = []
    for name, ours in owned_job_variables(image).items():
        if name not in props:
            notes.append(
                f"kept the template without variable {name!r} (someone removed it; coder-stack would set {ours!r})"
            )
            continue
        now = props[name].get("default")
        if now == ours:
            continue
        if now == stock[name].get("default") or (name == "image" and image_given):
            props[name]["default"] = ours
            notes.append(f"set {name} to {ours!r} (was {now!r})")
        elif name == "image":  # the image is the user's to choose: kept unless one is given
            notes.append(f"kept image {now!r} (give --image or CODER_STACK_IMAGE to change it)")
        else:
            notes.append(
                f"kept {name}={now!r}, changed since prefect-kubernetes' default (coder-stack would set {ours!r}; "
                "edit the pool's base job template to change it)"
            )
    return template, notes


async def ensure_work_pools(
    names: dict[str, str] | None = None, image: str | None = None, image_given: bool = False
) -> list[str]:
    image = image or DEFAULT_IMAGE
    done = []
    async with get_client() as client:
        for name, kind in (names or POOLS).items():
            try:
                pool = await client.read_work_pool(name)
            except ObjectNotFound:
                await client.create_work_pool(
                    WorkPoolCreate(name=name, type=kind, base_job_template=_base_job_template(kind, image))
                )
                done.append(f"created {name} ({kind})" + (f", image {image}" if kind == "kubernetes" else ""))
                continue
            if pool.type != kind or kind != "kubernetes":
                done.append(f"{name} ({pool.type}) already exists")
                continue
            template, notes = reconcile_k8s_template(pool.base_job_template, image, image_given)
            if template != pool.base_job_template:
                await client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
            done.append(
                f"{name} ({kind}) already exists" + ("".join(f"; {n}" for n in notes) or "; template up to date")
            )
    return done


async def ensure_credentials_block(name: str, kubeconfig: Path | None, context: str | None) -> str:
    """Create or replace the prefect-kubernetes KubernetesCredentials block ``name`` from a kubeconfig file
    (``KubernetesClusterConfig.from_file``; default ~/.kube/config and its current context). Its contents are
    credentials: the line returned names the file and context only."""
    from kubernetes_asyncio.config.config_exception import ConfigException
    from prefect_kubernetes.credentials import KubernetesClusterConfig, KubernetesCredentials

    try:
        cluster = KubernetesClusterConfig.from_file(kubeconfig, context)
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError, ConfigException) as e:
        where = kubeconfig or "~/.kube/config"
        detail = str(e) if isinstance(e, ValueError) and "Context" in str(e) else type(e).__name__
        raise ConfigError(
            f"cannot make a KubernetesCredentials block from kubeconfig {where}: {detail}; "
            "pass --kubeconfig with a kubeconfig that has contexts (and --context one of them)"
        ) from None
    await KubernetesCredentials.aregister_type_and_schema()
    try:
        existing: KubernetesCredentials | None = await KubernetesCredentials.aload(name)
    except (ValueError, RuntimeError):
        existing = None
    where = f"from kubeconfig {kubeconfig or '~/.kube/config'} (context {cluster.context_name})"
    if (
        existing is not None
        and existing.cluster_config is not None
        and (existing.cluster_config.config, existing.cluster_config.context_name)
        == (cluster.config, cluster.context_name)
    ):
        return f"credentials block {name!r} (Kubernetes Credentials) unchanged {where}"
    await KubernetesCredentials(cluster_config=cluster).asave(name, overwrite=True)
    return f"credentials block {name!r} (Kubernetes Credentials) {'updated' if existing else 'created'} {where}"


async def ensure_stack_block(name: str, spec: StackSpec | None) -> str:
    """The CoderStackSpec block ``name``: replaced by ``spec`` (a stack file) when given, otherwise created
    from the runbook's defaults only if it does not exist yet (never overwritten without a file)."""
    await register_stack_block_type()
    if spec is None:
        if await stack_block_exists(name):
            return f"stack block {name!r} (Coder Stack Spec) kept as it is (no --stack given)"
        return f"stack block {name!r} (Coder Stack Spec) {await save_stack_block(name, StackSpec())} from the defaults"
    return f"stack block {name!r} (Coder Stack Spec) {await save_stack_block(name, spec)} from the stack file"


def render_worker_values(image: str = DEFAULT_IMAGE) -> str:
    """deployments/prefect-worker-values.yaml for the official prefect-worker chart: the pool, its type and the
    same base job template `coder-stack setup` gives the pool (the chart syncs it into the pool at each start)."""
    header = f"""# Values for the official prefect-worker Helm chart (prefecthq/prefect-worker). Generated by
#   coder-stack worker-values --image {image}
# (tests/unit/test_worker_values.py checks that this file is that command's output). With your image:
#   coder-stack worker-values --image REGISTRY/coder-stack:TAG > my-worker-values.yaml
#   helm install coder-stack-worker prefect/prefect-worker -n {FLOWS_NAMESPACE} -f my-worker-values.yaml
# The worker runs each flow run as a Job in the `{FLOWS_NAMESPACE}` namespace under the {FLOWS_SERVICE_ACCOUNT}
# ServiceAccount (deployments/rbac.yaml), so flows use in-cluster access (spec access.mode: in-cluster).
# baseJobTemplate is the template `coder-stack setup` gives the {K8S_POOL} pool; the chart writes it into the
# pool each time the worker starts (`prefect work-pool update --base-job-template`), so keep the two the same.
"""
    values = {
        "worker": {
            "apiConfig": "selfHostedServer",
            "selfHostedServerApiConfig": {
                "apiUrl": f"http://prefect-server.{FLOWS_NAMESPACE}.svc.cluster.local:4200/api"
            },
            "image": {"prefectTag": f"{version('prefect')}-python3.11-kubernetes"},
            "config": {
                "workPool": K8S_POOL,
                "type": "kubernetes",
                "baseJobTemplate": {"configuration": json.dumps(k8s_base_job_template(image), indent=2) + "\n"},
            },
        },
        "serviceAccount": {"create": True, "name": "prefect-worker"},
    }
    return header + yaml.dump(values, Dumper=_BlockStrings, sort_keys=False, width=120)


class _BlockStrings(yaml.SafeDumper):
    """Multi-line strings (the template's JSON) as YAML literal blocks, readable in the values file."""


_BlockStrings.add_representer(
    str,
    lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def deploy_all(
    project_dir: Path = PROJECT_DIR,
    timeout_s: float = 180,
    names: list[str] | None = None,
    env_overrides: dict[str, str] | None = None,
) -> str:
    """`prefect --no-prompt deploy --all` for prefect.yaml (only ``names``, when given), with the checkout as
    working directory (``env_overrides``: e.g. the PREFECT_API_URL to deploy to)."""
    env = dict(os.environ) | (env_overrides or {})
    env.setdefault("CODER_STACK_DIR", str(project_dir))
    prefect = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect) if prefect.exists() else "prefect", "--no-prompt", "deploy"]
    cmd += [a for n in names for a in ("--name", n)] if names else ["--all"]
    try:
        proc = subprocess.run(
            cmd, cwd=project_dir, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise ConfigError(f"`prefect deploy --all` did not finish in {timeout_s:.0f} s; is the Prefect API up?") from e
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise ConfigError(f"`prefect deploy --all` failed (exit {proc.returncode}):\n{tail}")
    return text


def check_schedules(project_dir: Path | None = None) -> int:
    """Parse every cron schedule (and its timezone) in prefect.yaml as Prefect will; a bad one is a
    :class:`ConfigError` naming the deployment, the value and what to fix. Returns how many were checked."""
    import yaml
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    path = (project_dir or PROJECT_DIR) / "prefect.yaml"
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} cannot be read as YAML ({type(e).__name__}); fix the file and rerun setup") from e
    checked = 0
    for dep in doc.get("deployments") or []:
        for sched in (dep or {}).get("schedules") or []:
            if not isinstance(sched, dict) or "cron" not in sched:
                continue
            cron, tz = sched.get("cron"), sched.get("timezone")
            try:
                CronSchedule(cron=cron, timezone=tz)
            except ValidationError as e:
                field = str(e.errors()[0]["loc"][0]) if e.errors() and e.errors()[0]["loc"] else "cron"
                raise ConfigError(
                    f"{path}: deployment {dep.get('name')!r} has a schedule whose {field} does not parse "
                    f"(cron {cron!r}, timezone {tz!r}). Use five cron fields such as '0 7 * * 1-5' and an IANA "
                    "timezone such as 'America/New_York'; nothing was changed"
                ) from None
            checked += 1
    return checked


async def run_setup(
    gpus: int,
    deploy: bool = True,
    project_dir: Path | None = None,
    *,
    spec: StackSpec | None = None,
    stack_block: str = DEFAULT_STACK_BLOCK,
    image: str | None = None,
    credentials_block: str | None = None,
    kubeconfig: Path | None = None,
    context: str | None = None,
) -> SetupReport:
    """Everything Prefect needs, in order: the GPU limit, the blocks the deployments name, the work pools,
    the deployments. ``image``: the Kubernetes pool's image (else $CODER_STACK_IMAGE, else DEFAULT_IMAGE)."""
    project_dir = project_dir or PROJECT_DIR
    if deploy:
        check_schedules(project_dir)  # before anything changes
    given = image or os.environ.get("CODER_STACK_IMAGE") or None
    report = SetupReport(gpu_limit=await ensure_gpu_limit(gpus))
    report.blocks.append(await ensure_stack_block(stack_block, spec))
    if credentials_block:
        report.blocks.append(await ensure_credentials_block(credentials_block, kubeconfig, context))
    else:  # registered anyway, so one can be created in the UI (Blocks > Kubernetes Credentials)
        from prefect_kubernetes.credentials import KubernetesCredentials

        await KubernetesCredentials.aregister_type_and_schema()
    report.pools = await ensure_work_pools(image=given, image_given=given is not None)
    report.automation = await ensure_crash_automation(list(GPU_FLOWS))
    if deploy:
        report.deploy_output = deploy_all(project_dir)
        report.deployed = True
    return report
