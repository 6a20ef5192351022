"""`coder-stack setup`: the Prefect side of the stack — the GPU limit, the work pools, the crash automation,
the deployments.

Safe to run twice: the limit is resized (never duplicated), existing pools are kept, the crash automation is
replaced only when its definition changed, deployments (and the clean-up deployment's trigger) are re-applied
by `prefect deploy --all`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, Field

from coder_stack.errors import ConfigError
from coder_stack.orchestration.gpu import ensure_gpu_limit
from coder_stack.orchestration.liveness import ensure_crash_automation
from flows.cleanup import GPU_FLOWS

PROJECT_DIR = Path(__file__).resolve().parents[2]  # coder_stack/app/setup.py -> the checkout
POOLS = {"coder-stack-process": "process", "coder-stack-k8s": "kubernetes"}


class SetupReport(BaseModel):
    gpu_limit: str
    pools: list[str] = Field(default_factory=list)
    automation: str = ""
    deployed: bool = False
    deploy_output: str = ""


def _base_job_template(kind: str) -> dict:
    if kind == "kubernetes":
        from prefect_kubernetes.worker import KubernetesWorker

        return KubernetesWorker.get_default_base_job_template()
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


async def ensure_work_pools(names: dict[str, str] | None = None) -> list[str]:
    done = []
    async with get_client() as client:
        for name, kind in (names or POOLS).items():
            try:
                pool = await client.read_work_pool(name)
                done.append(f"{name} ({pool.type}) already exists")
                continue
            except ObjectNotFound:
                pass
            await client.create_work_pool(
                WorkPoolCreate(name=name, type=kind, base_job_template=_base_job_template(kind))
            )
            done.append(f"created {name} ({kind})")
    return done


def deploy_all(project_dir: Path = PROJECT_DIR, timeout_s: float = 180, names: list[str] | None = None) -> str:
    """`prefect --no-prompt deploy --all` for prefect.yaml (only ``names``, when given), with the checkout as
    working directory."""
    env = dict(os.environ)
    env.setdefault("CODER_STACK_DIR", str(project_dir))
    env.setdefault("CODER_STACK_IMAGE", "coder-stack:latest")
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


async def run_setup(gpus: int, deploy: bool = True, project_dir: Path | None = None) -> SetupReport:
    project_dir = project_dir or PROJECT_DIR
    if deploy:
        check_schedules(project_dir)  # before anything changes
    report = SetupReport(gpu_limit=await ensure_gpu_limit(gpus))
    report.pools = await ensure_work_pools()
    report.automation = await ensure_crash_automation(list(GPU_FLOWS))
    if deploy:
        report.deploy_output = deploy_all(project_dir)
        report.deployed = True
    return report
