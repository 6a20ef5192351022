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
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, Field

from coder_stack.errors import CoderStackError, ConfigError
from coder_stack.flows.cleanup import GPU_FLOWS
from coder_stack.kubernetes.client import ClusterTarget
from coder_stack.orchestration.gpu_limit import ensure_gpu_limit, ensure_start_limit
from coder_stack.orchestration.liveness import ensure_crash_automation
from coder_stack.orchestration.stack_block import (
    DEFAULT_STACK_BLOCK,
    register_stack_block_type,
    save_stack_block,
    stack_block_exists,
)
from coder_stack.spec import StackSpec

PROJECT_DIR = Path(__file__).resolve().parents[1]  # app/setup.py (coder_stack/app is a link to app/) -> the checkout
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
    connection: str = ""
    cluster: list[str] = Field(default_factory=list)
    deployed: bool = False
    deploy_output: str = ""


class DeploymentConnections(BaseModel):
    """The ``connection`` parameter setup gives the deployments: the process pool's (a worker on this machine)
    and the Kubernetes pool's (a Job pod, as its ServiceAccount), and the sentence that says which."""

    process: dict[str, str]
    in_cluster: dict[str, str]
    says: str


def deployment_connections(
    stack_block: str, credentials_block: str | None, kubeconfig: Path | None, context: str | None
) -> DeploymentConnections:
    """Where the deployed flows find the stack (the block setup wrote) and the cluster: the credentials block, or
    the kubeconfig given, or the default one ($KUBECONFIG, else ~/.kube/config) as an absolute path the process
    worker reads. A default kubeconfig that does not exist is refused: the schedules would fail at 07:00 and 19:00
    (the teardown being the $0 backstop) instead of now."""
    process: dict[str, str] = {"stack_block": stack_block}
    if credentials_block:
        process["credentials_block"] = credentials_block
        cluster = f"the cluster in the Kubernetes Credentials block {credentials_block!r}"
    else:
        env = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
        given = kubeconfig or (Path(env) if env else None)
        path = (given or Path("~/.kube/config")).expanduser().resolve()
        if not path.is_file():
            source = "--kubeconfig" if kubeconfig else ("$KUBECONFIG" if env else "the default kubeconfig")
            raise ConfigError(
                f"the process pool's deployments would reach the cluster through {source} {path}, which does not "
                "exist, so the schedules (the 07:00 bring-up, the 19:00 teardown, the idle reclaim) would fail. "
                "Give --kubeconfig PATH (a file the process worker can read) or --credentials-block NAME "
                "--kubeconfig PATH; nothing was deployed"
            )
        process["kubeconfig"] = str(path)
        cluster = f"the kubeconfig {path}"
    if context:
        process["context"] = context
        cluster += f" (context {context})"
    says = (
        f"deployments run the stack in block {stack_block!r}; the process pool's reach {cluster}, the "
        f"{K8S_POOL} pool's the cluster they run in (their ServiceAccount); clean-up-crashed-run uses the "
        "dead run's own connection"
    )
    return DeploymentConnections(process=process, in_cluster={"stack_block": stack_block}, says=says)


# The process pool's clean-up reads the dead run's own connection (it may have run from the CLI with another).
OWN_CONNECTION = {"clean-up-crashed-run"}


def render_deployments(project_dir: Path, conns: DeploymentConnections) -> str:
    """prefect.yaml with each deployment's ``connection`` parameter set from ``conns`` (the file's own values are
    the defaults of a hand-run `prefect deploy`)."""
    doc = yaml.safe_load((project_dir / "prefect.yaml").read_text()) or {}
    for dep in doc.get("deployments") or []:
        pool = ((dep or {}).get("work_pool") or {}).get("name")
        if dep.get("name") in OWN_CONNECTION:
            continue
        conn = conns.process if pool == PROCESS_POOL else conns.in_cluster if pool == K8S_POOL else None
        if conn is not None:
            dep["parameters"] = {**(dep.get("parameters") or {}), "connection": dict(conn)}
    return yaml.safe_dump(doc, sort_keys=False, width=120)


async def check_cluster(
    target: ClusterTarget, spec: StackSpec, namespace: str, service_account: str
) -> tuple[list[str], list[str]]:
    """What the deployments need from the cluster, read before deploying: the stack's Deployments (the schedules
    scale them by name) and the Kubernetes pool's ServiceAccount (without it the Jobs' pods are refused,
    ``FailedCreate``, and the run waits in Pending). Returns (lines to print, missing stack Deployments)."""
    from kubernetes_asyncio import client as k8s

    from coder_stack.errors import CoderStackError, NotFound
    from coder_stack.kubernetes.client import api_errors, open_api
    from coder_stack.kubernetes.workloads import deployment_replicas

    lines: list[str] = []
    missing: list[str] = []
    try:
        async with open_api(target) as api:
            for ns in dict.fromkeys(ns for ns, _ in spec.deployments()):
                have = await deployment_replicas(api, ns)
                missing += [f"{n}/{name}" for n, name in spec.deployments() if n == ns and name not in have]
            try:
                with api_errors("get", "serviceaccounts", namespace, service_account):
                    await k8s.CoreV1Api(api).read_namespaced_service_account(service_account, namespace)
                lines.append(
                    f"ServiceAccount {namespace}/{service_account} exists (the {K8S_POOL} pool's Jobs run as it)"
                )
            except NotFound:
                lines.append(
                    f"ServiceAccount {namespace}/{service_account} does not exist: the {K8S_POOL} pool's Jobs would "
                    f"be refused their pod (FailedCreate) and the runs sit in Pending. Apply it: kubectl apply -f "
                    f"deployments/rbac.yaml (the {namespace} namespace must exist); not needed for the process pool"
                )
    except CoderStackError as e:
        lines.append(f"could not read the cluster to check it ({e})")
    if missing:
        lines.append(f"the stack's Deployments missing in the cluster: {', '.join(missing)}")
    else:
        lines.append("the stack's Deployments exist in the cluster")
    return lines, missing


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
    connections: DeploymentConnections | None = None,
) -> str:
    """`prefect --no-prompt deploy --all` for prefect.yaml (only ``names``, when given), with the checkout as
    working directory (``env_overrides``: e.g. the PREFECT_API_URL to deploy to; ``connections``: the
    deployments' ``connection`` parameters, written into a copy of prefect.yaml given with --prefect-file)."""
    env = dict(os.environ) | (env_overrides or {})
    env.setdefault("CODER_STACK_DIR", str(project_dir))
    prefect = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect) if prefect.exists() else "prefect", "--no-prompt", "deploy"]
    cmd += [a for n in names for a in ("--name", n)] if names else ["--all"]
    with tempfile.TemporaryDirectory(prefix="coder-stack-deploy-") as tmp:
        if connections is not None:
            rendered = Path(tmp) / "prefect.yaml"
            rendered.write_text(render_deployments(project_dir, connections))
            cmd += ["--prefect-file", str(rendered)]
        return _deploy(cmd, project_dir, env, timeout_s)


def _deploy(cmd: list[str], project_dir: Path, env: dict[str, str], timeout_s: float) -> str:
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
    conns: DeploymentConnections | None = None
    if deploy:
        check_schedules(project_dir)  # before anything changes
        conns = deployment_connections(stack_block, credentials_block, kubeconfig, context)
    given = image or os.environ.get("CODER_STACK_IMAGE") or None
    # The limits follow the stack's GPU sharing (the stack file, else the stack block already stored): exclusive,
    # tag:gpu = the GPUs; time-sliced, tag:gpu counts hundredths of the GPU and tag:gpu-start lets one model start
    # on it at a time.
    sizing = spec if spec is not None else await _stored_spec(stack_block)
    time_sliced = sizing is not None and sizing.time_sliced
    report = SetupReport(gpu_limit=await ensure_gpu_limit(sizing.gpu_limit_slots if sizing and time_sliced else gpus))
    start = await ensure_start_limit(time_sliced)
    if start:
        report.gpu_limit += f"; {start}"
    report.blocks.append(await ensure_stack_block(stack_block, spec))
    if credentials_block:
        report.blocks.append(await ensure_credentials_block(credentials_block, kubeconfig, context))
    else:  # registered anyway, so one can be created in the UI (Blocks > Kubernetes Credentials)
        from prefect_kubernetes.credentials import KubernetesCredentials

        await KubernetesCredentials.aregister_type_and_schema()
    report.pools = await ensure_work_pools(image=given, image_given=given is not None)
    report.automation = await ensure_crash_automation(list(GPU_FLOWS))
    target = _reachable_target(credentials_block, kubeconfig, context)
    if target is not None:
        from coder_stack.orchestration.stack_block import load_stack_block

        namespace, account = await _pool_service_account()
        stack = spec or await load_stack_block(stack_block)
        report.cluster, missing = await check_cluster(target, stack, namespace, account)
        if deploy and missing:
            raise ConfigError(
                f"the stack in block {stack_block!r} names Deployments the cluster does not have "
                f"({', '.join(missing)}), "
                "so the scheduled bring-up, teardown and reclaim would fail on them. Give --stack FILE with your "
                "stack's names (`coder-stack spec > stack.yaml`, then edit it); the blocks and pools are set, nothing "
                "was deployed"
            )
    if deploy and conns is not None:
        report.connection = conns.says
        report.deploy_output = deploy_all(project_dir, connections=conns)
        report.deployed = True
    return report


def _reachable_target(
    credentials_block: str | None, kubeconfig: Path | None, context: str | None
) -> ClusterTarget | None:
    """The cluster setup can read, if any: the credentials block, the kubeconfig given, or an existing default one."""
    if credentials_block:
        return ClusterTarget(credentials_block=credentials_block, context=context)
    env = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    path = (kubeconfig or (Path(env) if env else Path("~/.kube/config"))).expanduser()
    return ClusterTarget(kubeconfig=str(path.resolve()), context=context) if path.is_file() else None


async def _stored_spec(name: str) -> StackSpec | None:
    """The spec the stack block ``name`` holds, or None if there is none (or it does not load: its own error comes
    from the flows that read it)."""
    from coder_stack.orchestration.stack_block import load_stack_block, stack_block_exists

    try:
        return await load_stack_block(name) if await stack_block_exists(name) else None
    except CoderStackError:
        return None


async def _pool_service_account() -> tuple[str, str]:
    """The namespace and ServiceAccount the Kubernetes pool's Jobs use (its template may have been edited)."""
    async with get_client() as client:
        try:
            pool = await client.read_work_pool(K8S_POOL)
        except ObjectNotFound:
            return FLOWS_NAMESPACE, FLOWS_SERVICE_ACCOUNT
    props = pool.base_job_template.get("variables", {}).get("properties", {})
    namespace = (props.get("namespace") or {}).get("default") or FLOWS_NAMESPACE
    account = (props.get("service_account_name") or {}).get("default") or FLOWS_SERVICE_ACCOUNT
    return str(namespace), str(account)
