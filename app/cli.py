"""`coder-stack`: the runbook as commands. Each command runs a Prefect flow (visible in the UI when
PREFECT_API_URL points at a server). `demo`, `sim` and `bench` come from the development tools of a checkout
(``devtools/``), added here through an entry point, never imported by the product."""

from __future__ import annotations

import asyncio
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from coder_stack.errors import CoderStackError, one_line
from coder_stack.flows.process import freeze_startup_heap
from coder_stack.spec import load_spec, spec_yaml

# Without PREFECT_API_URL every command starts a temporary Prefect server (15-20 s on 2 cores); Prefect's
# default 20 s start-up limit is too tight on a busy machine. A real server (`prefect server start`) is faster.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A flow run's heartbeat every 30 s (Prefect's default is 180): the crash automation takes a run silent for
# 60 s for dead and frees its GPU; a GPU session refuses to start with rarer heartbeats.
os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")

app = typer.Typer(
    help=(
        "Bring up, validate, swap and tear down a self-hosted coding assistant (vLLM + LiteLLM) on a "
        "one-GPU Kubernetes cluster. Start with `./dev.sh demo` in a checkout (no cluster needed), then point "
        "--kubeconfig at your cluster."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

StackOpt = Annotated[
    Path | None, typer.Option("--stack", help="Stack spec YAML (default: the runbook's reference deployment).")
]
KubeconfigOpt = Annotated[
    Path | None, typer.Option("--kubeconfig", help="Kubeconfig path (default: in-cluster, then $KUBECONFIG).")
]
ContextOpt = Annotated[str | None, typer.Option("--context", help="Kubeconfig context (default: current).")]
StackBlockOpt = Annotated[
    str | None, typer.Option("--stack-block", help="Coder Stack Spec block in Prefect holding the stack (not --stack).")
]
CredentialsBlockOpt = Annotated[
    str | None,
    typer.Option(
        "--credentials-block", help="Kubernetes Credentials block in Prefect for the cluster (not --kubeconfig)."
    ),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print what would change; change nothing.")]


def _fail(err: BaseException) -> NoReturn:
    """One line on stderr: the step it ended (for flows), what broke and what to do. Printed as plain
    text: error messages carry hop tags such as ``[key]`` that rich would take for markup."""
    console.print(Text.assemble(("error: ", "bold red"), one_line(err)), soft_wrap=True)
    raise typer.Exit(1)


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except CoderStackError as e:
        if e.report is not None:
            _show(e.report)
        _fail(e)
    except Exception as e:  # not ours: still one line, never a traceback
        _fail(e)
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130) from None


def _load(stack: Path | None) -> Any:
    """The stack spec, once per command; a bad file is one error line before anything starts."""
    try:
        return load_spec(stack)
    except CoderStackError as e:
        _fail(e)


def _check(check: Any, *args: Any) -> None:
    """``check(*args)`` (e.g. ``spec.model(name)``); a SpecError is one error line before any flow starts."""
    try:
        check(*args)
    except CoderStackError as e:
        _fail(e)


@app.command()
def spec(
    stack: StackOpt = None,
    time_sliced: Annotated[
        bool,
        typer.Option(
            "--time-sliced",
            help="Print it for a time-sliced GPU: chat and FIM serve together (shares 0.55 and 0.35 of an L4's "
            "24 GB). The GPU node pool must be time-shared (GKE gpu-sharing-strategy=time-sharing, or the NVIDIA "
            "device plugin's sharing.timeSlicing); rerun `coder-stack setup` after switching.",
        ),
    ] = False,
) -> None:
    """Print the effective stack spec as YAML (a complete, valid file to start from)."""
    try:
        loaded = load_spec(stack)
        out.print(
            spec_yaml(loaded.time_sliced_starter() if time_sliced else loaded), end="", markup=False, highlight=False
        )
    except CoderStackError as e:
        _fail(e)


def _connection(
    stack: Path | None,
    kubeconfig: Path | None,
    context: str | None,
    stack_block: str | None = None,
    credentials_block: str | None = None,
) -> tuple[Any, Any]:
    """(the flow's Connection, the spec loaded once here). The flow loads the file (or block) again where it
    runs (a worker may run it elsewhere); loading it here first refuses a bad one before any flow starts."""
    from pydantic import ValidationError

    from coder_stack.flows.params import Connection

    _check_kubeconfig(kubeconfig)
    try:
        conn = Connection(
            kubeconfig=str(kubeconfig.resolve()) if kubeconfig else None,
            context=context,
            stack_file=str(stack.resolve()) if stack else None,
            stack_block=stack_block,
            credentials_block=credentials_block,
        )
    except ValidationError as e:
        msg = str(e.errors()[0].get("msg", "bad connection")).removeprefix("Value error, ")
        _fail(CoderStackError(f"{msg} (--stack or --stack-block, --kubeconfig or --credentials-block)"))
    if stack_block:
        from coder_stack.orchestration.stack_block import load_stack_block

        return conn, _run(load_stack_block(stack_block))
    return conn, _load(stack)


def _check_kubeconfig(kubeconfig: Path | None) -> None:
    if kubeconfig is not None and not kubeconfig.is_file():
        _fail(CoderStackError(f"--kubeconfig {kubeconfig} does not exist; pass the path of a kubeconfig file"))


def _show(report: Any) -> None:
    from rich.markdown import Markdown

    out.print(Markdown(report.to_markdown()))


def _run_flow(coro: Any) -> Any:
    freeze_startup_heap()  # the flow's modules are imported: out of the garbage collector's view from here
    report = _run(coro)
    if report is not None:
        _show(report)
    return report


@app.command()
def validate(
    stage: Annotated[
        list[str] | None,
        typer.Option("--stage", help="chat, fim or agent; repeat for several, in order (default: chat then fim)."),
    ] = None,
    agent: Annotated[bool, typer.Option("--agent", help="Add the agent stage (coder-agent tool loop).")] = False,
    keep_frontends: Annotated[bool, typer.Option("--keep-frontends", help="Leave Open WebUI and Tabby up.")] = False,
    take_over: Annotated[
        bool, typer.Option("--take-over", help="Run even if a model is serving; restore it at the end.")
    ] = False,
    dry_run: DryRunOpt = False,
    stack: StackOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    stack_block: StackBlockOpt = None,
    credentials_block: CredentialsBlockOpt = None,
) -> None:
    """Run the whole runbook end to end (validate_coder_stack); leaves the GPU as it found it."""
    from pydantic import ValidationError

    from coder_stack.flows.validate import ValidateOptions, validate_coder_stack

    stages = list(stage or ["chat", "fim"])
    if agent and "agent" not in stages:
        stages.append("agent")
    try:
        options = ValidateOptions(stages=stages, keep_frontends=keep_frontends, take_over=take_over, dry_run=dry_run)  # type: ignore[arg-type]
    except ValidationError:
        _fail(CoderStackError(f"--stage {stages}: each stage must be one of chat, fim, agent"))
        return
    _run_flow(
        validate_coder_stack(
            options=options, connection=_connection(stack, kubeconfig, context, stack_block, credentials_block)[0]
        )
    )


@app.command()
def swap(
    model: Annotated[str, typer.Argument(help="Model to leave serving (coder-chat, coder-fim, coder-agent).")],
    no_gateway_smoke: Annotated[
        bool, typer.Option("--no-gateway-smoke", help="Only smoke the model directly, not through its key.")
    ] = False,
    dry_run: DryRunOpt = False,
    stack: StackOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    stack_block: StackBlockOpt = None,
    credentials_block: CredentialsBlockOpt = None,
) -> None:
    """Give the GPU to MODEL: others to 0 (pods gone), MODEL up, ready, smoked, left serving."""
    from coder_stack.flows.swap import SwapOptions, swap_model

    conn, spec_obj = _connection(stack, kubeconfig, context, stack_block, credentials_block)
    _check(spec_obj.model, model)
    _run_flow(
        swap_model(
            options=SwapOptions(target=model, smoke_gateway=not no_gateway_smoke, dry_run=dry_run), connection=conn
        )
    )


@app.command()
def up(
    model: Annotated[str | None, typer.Option("--model", help="Model to leave serving (default: coder-chat).")] = None,
    dry_run: DryRunOpt = False,
    stack: StackOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    stack_block: StackBlockOpt = None,
    credentials_block: CredentialsBlockOpt = None,
) -> None:
    """Morning bring-up: keys, front-ends, the default model serving and smoked (bring_up)."""
    from coder_stack.flows.bring_up import BringUpOptions, bring_up

    conn, spec_obj = _connection(stack, kubeconfig, context, stack_block, credentials_block)
    if model:
        _check(spec_obj.model, model)
    _run_flow(bring_up(options=BringUpOptions(model=model, dry_run=dry_run), connection=conn))


@app.command()
def down(
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="Only this model to 0, pods gone (repeatable). The other models keep serving, and Open WebUI and "
            "Tabby stay up unless no model serves afterwards. Default: every model and front-end to 0.",
        ),
    ] = None,
    dry_run: DryRunOpt = False,
    stack: StackOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    stack_block: StackBlockOpt = None,
    credentials_block: CredentialsBlockOpt = None,
) -> None:
    """Evening teardown to $0: every GPU model and front-end to 0, verified. Never waits for the GPU limit.

    With --model, only the named models go to 0 (e.g. `coder-stack down --model coder-fim` on a time-sliced GPU
    stops completions and leaves chat serving)."""
    from coder_stack.flows.teardown import TeardownOptions, teardown

    conn, spec_obj = _connection(stack, kubeconfig, context, stack_block, credentials_block)
    for name in model or []:
        _check(spec_obj.model, name)
    _run_flow(teardown(options=TeardownOptions(models=model or [], dry_run=dry_run), connection=conn))


@app.command()
def cleanup(
    run_id: Annotated[str, typer.Argument(help="The dead flow run's id (from `coder-stack status` or the UI).")],
    stack: StackOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    stack_block: StackBlockOpt = None,
    credentials_block: CredentialsBlockOpt = None,
) -> None:
    """Free the GPU a dead run left: scale to 0 the models it holds, wait until the pods are gone, free its GPU
    slot. A run still sending heartbeats is left alone: it decides once one heartbeat interval (plus 10 s) has
    passed since the run was marked dead, so it may wait up to ~40 s. Each model is changed only while it is still
    stamped with the dead run. Without the stack and cluster options, the dead run's own (from its parameters)."""
    from coder_stack.flows.cleanup import clean_up_crashed_run
    from coder_stack.orchestration.liveness import parse_run_id

    try:
        parse_run_id(run_id)  # before a flow run (and a temporary Prefect server) is started for nothing
    except CoderStackError as e:
        _fail(e)
    given = stack or kubeconfig or context or stack_block or credentials_block
    conn = _connection(stack, kubeconfig, context, stack_block, credentials_block)[0] if given else None
    _run_flow(clean_up_crashed_run(crashed_run=run_id, connection=conn))


@app.command()
def wake(
    model: Annotated[str, typer.Argument(help="The model's Deployment name (e.g. coder-chat).")],
    stack: StackOpt = None,
    stack_block: StackBlockOpt = None,
) -> None:
    """Ask for a wake of MODEL, as a request through the gateway does: the coder-stack.model.wake-requested event
    that starts the wake-model deployment (a worker on its pool runs it; `coder-stack status` shows it pending).
    Nothing happens if the model is Ready or a wake is already pending; a model in use is never evicted."""
    from coder_stack.errors import SpecError
    from coder_stack.orchestration.wake_events import request_wake

    spec_obj = _connection(stack, None, None, stack_block, None)[1]
    names = [m.name for m in spec_obj.models]
    if model not in names:
        _fail(SpecError(f"{model!r} is not a model of this stack; its models: {', '.join(names)}"))
    m = spec_obj.model(model)
    _run(request_wake(m.name, m.alias, m.role, "asked by hand (coder-stack wake)"))
    out.print(
        f"asked for a wake of {m.name}: the wake-model deployment runs it (`coder-stack status` shows it pending)"
    )


@app.command()
def reclaim(
    dry_run: DryRunOpt = False,
    stack: StackOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    stack_block: StackBlockOpt = None,
    credentials_block: CredentialsBlockOpt = None,
) -> None:
    """Scale serving models idle for idle_after_s (nothing running or waiting, counters unchanged) to 0."""
    from coder_stack.flows.reclaim import ReclaimOptions, reclaim_idle_models

    conn = _connection(stack, kubeconfig, context, stack_block, credentials_block)[0]
    _run_flow(reclaim_idle_models(options=ReclaimOptions(dry_run=dry_run), connection=conn))


@app.command()
def keys(
    alias: Annotated[list[str] | None, typer.Option("--alias", help="Only this key alias (repeatable).")] = None,
    rotate: Annotated[bool, typer.Option("--rotate", help="Mint new keys, swap them in, delete the old.")] = False,
    dry_run: DryRunOpt = False,
    stack: StackOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    stack_block: StackBlockOpt = None,
    credentials_block: CredentialsBlockOpt = None,
) -> None:
    """Mint or check the virtual keys and deliver them to Open WebUI, Tabby and the keystore (idempotent)."""
    from coder_stack.flows.keys import KeyOptions, manage_keys

    conn, spec_obj = _connection(stack, kubeconfig, context, stack_block, credentials_block)
    for a in alias or []:
        _check(spec_obj.key, a)
    _run_flow(manage_keys(options=KeyOptions(aliases=alias, rotate=rotate, dry_run=dry_run), connection=conn))


@app.command()
def spend(
    stack: StackOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    stack_block: StackBlockOpt = None,
    credentials_block: CredentialsBlockOpt = None,
) -> None:
    """Spend, budget and share used per virtual key."""
    from coder_stack.flows.keys import report_spend

    _run_flow(report_spend(connection=_connection(stack, kubeconfig, context, stack_block, credentials_block)[0]))


@app.command()
def status(
    stack: StackOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    stack_block: StackBlockOpt = None,
    credentials_block: CredentialsBlockOpt = None,
) -> None:
    """Replicas and pod status per model and front-end, the GPU's shares (time-sliced), who holds the GPU limit,
    spend per key (read-only)."""
    from rich.table import Table

    from coder_stack.app.shares_view import show as show_shares
    from coder_stack.flows.cleanup import GPU_FLOWS
    from coder_stack.orchestration.gpu_limit import gpu_limit_status
    from coder_stack.tasks.cluster import stack_status_task
    from coder_stack.tasks.gateway import read_spend_task
    from coder_stack.usecases.idle import reclaimed_note
    from coder_stack.usecases.shares import gpu_shares
    from coder_stack.usecases.stamps import orphaned_models
    from coder_stack.usecases.wake import pending_wakes

    conn, spec_obj = _connection(stack, kubeconfig, context, stack_block, credentials_block)
    target = conn.cluster_target()

    async def gather() -> tuple[Any, Any, Any, Any, Any, Any]:
        deps = await stack_status_task.fn(target, spec_obj)
        try:
            # time-sliced mode: each GPU node's shares (None in exclusive mode: nothing read, nothing shown)
            shares: Any = await gpu_shares(target, spec_obj)
        except CoderStackError as e:
            shares = f"GPU shares: unavailable ({e})"
        try:
            gpu: Any = await gpu_limit_status(GPU_FLOWS)
        except Exception as e:  # Prefect API down: still show the cluster
            gpu = f"GPU limit: unknown ({type(e).__name__}: is the Prefect API reachable?)"
        try:
            # serving models stamped with a run that is not alive: nothing scales them down by itself
            orphans: Any = await orphaned_models(spec_obj, deps)
        except Exception as e:
            orphans = f"model holders: unknown ({type(e).__name__}: is the Prefect API reachable?)"
        try:
            # wakes on the models' Deployments, and wake_model runs requested but not yet at a model
            wakes: Any = await pending_wakes(spec_obj, deps)
        except Exception as e:
            wakes = [f"pending wakes: unknown ({type(e).__name__}: is the Prefect API reachable?)"]
        try:
            rows: Any = await read_spend_task.fn(target, spec_obj, [k.alias for k in spec_obj.virtual_keys])
        except CoderStackError as e:
            rows = f"spend: unavailable ({e})"
        return deps, gpu, orphans, wakes, rows, shares

    deps, gpu, orphans, wakes, rows, shares = _run(gather())
    t = Table(title="Deployments")
    for col in ("deployment", "replicas", "ready", "pods"):
        t.add_column(col)
    for d in deps:
        t.add_row(f"{d.namespace}/{d.name}", str(d.replicas), str(d.ready_replicas),
                  ", ".join(f"{p.name} {p.status}" for p in d.pods) or "-")  # fmt: skip
    out.print(t)
    if isinstance(shares, str):
        out.print(Text(shares))
    elif shares is not None:
        show_shares(out, shares)
    for d in deps:
        if d.namespace == spec_obj.serving_namespace and not d.replicas:
            note = reclaimed_note(spec_obj, spec_obj.model(d.name), d.annotations)
            if note:
                out.print(note)
    for o in [orphans] if isinstance(orphans, str) else orphans:
        out.print(Text(o if isinstance(o, str) else o.describe()))
    for w in wakes:
        out.print(Text(w if isinstance(w, str) else f"wake pending: {w.describe()}"))
    out.print(Text(gpu if isinstance(gpu, str) else gpu.describe()))
    if isinstance(rows, str):
        out.print(rows)
    else:
        st = Table(title="Spend per key")
        for col in ("key", "spend (USD)", "budget", "models", "status"):
            st.add_column(col)
        for r in rows:
            budget = f"{r.max_budget:g}" if r.max_budget is not None else "-"
            st.add_row(r.alias, f"{r.spend:.6f}", budget, ", ".join(r.models) or "-", r.status)
        out.print(st)


DOCTOR_HELP = (
    "Check the gateway and the model servers before the morning run meets them: quick, no Prefect flow or server."
    "\n\n"
    "Read-only, except for throwaway virtual keys (alias coder-stack-doctor-HEX, budget $0.01) that it always "
    "deletes again, even when a check fails."
    "\n\n"
    "Checks: the gateway is ready, and its version; every alias the stack uses is in /model/info (a missing one "
    "breaks calls with 400 although /v1/models lists it), has prices (else spend reads $0) and routes to the spec's "
    "Service; a key's lifecycle (mint, /key/info, /key/list, /key/update, /key/delete, refused with 401 after); "
    "whether a streamed FIM completion (as Tabby sends it) is metered, when coder-fim is serving; /health, /version "
    "and the served name in /v1/models of each model whose Deployment has replicas > 0."
    "\n\n"
    "Each row is ok, warn, fail or skipped, with what was seen and what to do. Exit code 0 when nothing failed, "
    "1 otherwise. No key value is ever printed."
)


@app.command(help=DOCTOR_HELP)
def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON instead of a table.")] = False,
    stack: StackOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    stack_block: StackBlockOpt = None,
    credentials_block: CredentialsBlockOpt = None,
) -> None:
    """Check the gateway and the model servers before the morning run meets them (see DOCTOR_HELP)."""
    from coder_stack.app.doctor_view import show
    from coder_stack.usecases.doctor import doctor_cluster

    conn, spec_obj = _connection(stack, kubeconfig, context, stack_block, credentials_block)
    report = _run(doctor_cluster(conn.cluster_target(), spec_obj))
    if json_out:
        typer.echo(report.to_json())
    else:
        show(out, report)
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def setup(
    no_deploy: Annotated[
        bool, typer.Option("--no-deploy", help="Only the GPU limit, the blocks and the work pools.")
    ] = False,
    stack: StackOpt = None,
    stack_block: Annotated[
        str,
        typer.Option(
            "--stack-block",
            help="Coder Stack Spec block to write --stack into (created from the defaults if absent and no --stack). "
            "The in-cluster deployments read `coder-stack`.",
        ),
    ] = "coder-stack",
    image: Annotated[
        str | None,
        typer.Option(
            "--image", help="Image of the coder-stack-k8s pool (default: $CODER_STACK_IMAGE, else coder-stack:VERSION)."
        ),
    ] = None,
    credentials_block: Annotated[
        str | None,
        typer.Option(
            "--credentials-block",
            help="Create or update this Kubernetes Credentials block from --kubeconfig (runs outside the cluster).",
        ),
    ] = None,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(
            "--kubeconfig",
            help="Kubeconfig the process pool's deployments reach the cluster with, or the one --credentials-block "
            "stores (default: $KUBECONFIG, else ~/.kube/config; refused if it does not exist).",
        ),
    ] = None,
    context: Annotated[
        str | None, typer.Option("--context", help="Context for --credentials-block (default: the current one).")
    ] = None,
) -> None:
    """Create or resize the tag:gpu limit (the GPUs in the spec; time-sliced: 100 hundredths of the GPU, and the
    one-slot tag:gpu-start), write the stack (and credentials) blocks, create or update the work pools (the
    Kubernetes pool's namespace, ServiceAccount, image, pod watch timeout), deploy prefect.yaml. Safe to rerun: a
    pool value someone changed is kept and reported."""
    from coder_stack.app.setup import run_setup

    spec_obj = _load(stack)
    _check_kubeconfig(kubeconfig)
    report = _run(
        run_setup(
            gpus=spec_obj.gpus,
            deploy=not no_deploy,
            spec=spec_obj if stack else None,
            stack_block=stack_block,
            image=image,
            credentials_block=credentials_block,
            kubeconfig=kubeconfig,
            context=context,
        )
    )
    out.print(report.gpu_limit)
    for line in [*report.blocks, *report.pools, report.automation, *report.cluster, report.connection]:
        if line:
            out.print(line, markup=False, highlight=False, soft_wrap=True)
    if report.deployed:
        out.print("deployed prefect.yaml (prefect deploy --all)")


@app.command(name="worker-values")
def worker_values(
    image: Annotated[
        str | None,
        typer.Option("--image", help="The flows' image (default: $CODER_STACK_IMAGE, else coder-stack:VERSION)."),
    ] = None,
) -> None:
    """Print values for the official prefect-worker Helm chart: the coder-stack-k8s pool and the same base job
    template `coder-stack setup` gives it (deployments/prefect-worker-values.yaml is this for the default image)."""
    from coder_stack.app.setup import DEFAULT_IMAGE, render_worker_values

    typer.echo(render_worker_values(image or os.environ.get("CODER_STACK_IMAGE") or DEFAULT_IMAGE), nl=False)


@app.command(name="image")
def image_hint(
    registry: Annotated[
        str, typer.Option("--registry", help="Registry and path to push to, e.g. ghcr.io/acme.")
    ] = "REGISTRY",
) -> None:
    """Print how to build and push the flows' image (the Dockerfile at the checkout's root) and use it."""
    from coder_stack.app.setup import DEFAULT_IMAGE, PROJECT_DIR

    tag = f"{registry.rstrip('/')}/{DEFAULT_IMAGE}"
    typer.echo(
        f"cd {PROJECT_DIR}\n"
        f"docker build -t {tag} .\n"
        f"docker push {tag}\n"
        f"export CODER_STACK_IMAGE={tag}\n"
        "coder-stack setup --stack stack.yaml              # the coder-stack-k8s pool's image\n"
        "coder-stack worker-values > my-worker-values.yaml # the Helm chart's values, the same template"
    )


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except CoderStackError as e:
        console.print(Text.assemble(("error: ", "bold red"), one_line(e)), soft_wrap=True)
        sys.exit(1)


# wake on demand: the callback in the gateway (app/wake_setup.py)
from coder_stack.app.wake_setup import wake_setup as _wake_setup  # noqa: E402

app.command(name="wake-setup")(_wake_setup)


# ------------------------------------------------------------------------------ development tools
DEV_COMMANDS = ("demo", "sim", "bench")


def _add_dev_commands() -> None:
    """``demo``, ``sim`` and ``bench`` come from the development tools of a checkout (``./dev.sh`` installs
    them), found through the ``coder_stack.commands`` entry point; the product never imports them. Without
    them, each of those names is a command that says where to get it."""
    for ep in entry_points(group="coder_stack.commands"):
        ep.load()(app)
    have = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    for name in DEV_COMMANDS:
        if name not in have:
            app.command(name=name, hidden=True, context_settings=_ANY_ARGS)(_missing_dev_tool(name))


_ANY_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _missing_dev_tool(name: str) -> Any:
    def missing(ctx: typer.Context) -> None:
        _fail(
            CoderStackError(
                f"`coder-stack {name}` is a development tool: it comes with a checkout of the coder-stack repository "
                "(git clone ..., then ./dev.sh demo, or ./dev.sh shell for the environment), not with the "
                "installed package or the flows' image"
            )
        )

    return missing


_add_dev_commands()
