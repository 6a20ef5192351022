"""The development tools' commands: ``coder-stack demo``, ``sim`` and ``bench``.

They run the simulated stack (``simstack``) and the benchmark, which a checkout installs beside the product
(``./dev.sh`` installs ``devtools/``) and a user's ``pip install coder-stack`` or the flows' image does not. The
product's command line finds them through the ``coder_stack.commands`` entry point this distribution declares
(``devtools/pyproject.toml``), so the product never imports a development tool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coder_stack.app.cli import StackOpt, _fail
from coder_stack.errors import CoderStackError
from coder_stack.spec import load_spec

dev = typer.Typer()
PANEL = "Development tools (from a checkout: ./dev.sh)"


def register(app: typer.Typer) -> None:
    """Add the development commands to the product's ``coder-stack`` command line."""
    app.registered_commands += dev.registered_commands


@dev.command(rich_help_panel=PANEL)
def sim(
    kubeconfig: Annotated[Path, typer.Option("--kubeconfig", help="Where to write the sim's kubeconfig.")],
    time_scale: Annotated[
        float,
        typer.Option(
            "--time-scale", min=0.0001, max=10.0, help="Multiply every simulated duration (0.01: 10 min -> 6 s)."
        ),
    ] = 1.0,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            "--fault",
            help="DEPLOYMENT=KIND with KIND one of crashloop, imagepull, oom, unschedulable, slow-node. Repeatable.",
        ),
    ] = None,
    gpu_pool: Annotated[
        str, typer.Option("--gpu-pool", help="autoscaled (GPU node provisioned on demand) or static.")
    ] = "autoscaled",
    exit_after: Annotated[
        float | None, typer.Option("--exit-after", min=1, help="Stop by itself after this many seconds.")
    ] = None,
    project_image: Annotated[
        str | None,
        typer.Option(
            "--project-image",
            metavar="IMAGE",
            help="Run this checkout as IMAGE, the flows' image (the one `coder-stack image` prints or the "
            'coder-stack-k8s pool\'s, e.g. "$CODER_STACK_IMAGE"): a pod of IMAGE runs its command as a local '
            "process in the checkout, with this environment's python and prefect, its ServiceAccount's token and "
            "the cluster's DNS, so in-cluster Jobs really run. Any other image without a stand-in ends in "
            "ImagePullBackOff, as on a real cluster that cannot pull it.",
        ),
    ] = None,
    stack: StackOpt = None,
) -> None:
    """Serve a simulated cluster (Kubernetes API on 127.0.0.1) with the runbook's objects until interrupted."""
    from simstack.controllers.faults import FAULTS as FAULT_KINDS
    from simstack.stack import run_sim
    from simstack.standins import has_standin

    from coder_stack.app.setup import PROJECT_DIR

    faults: dict[str, str] = {}
    for f in fault or []:
        name, _, kind = f.partition("=")
        if not name or kind not in FAULT_KINDS:
            _fail(CoderStackError(f"--fault {f!r}: expected DEPLOYMENT=KIND with KIND one of {', '.join(FAULT_KINDS)}"))
        faults[name] = kind
    if gpu_pool not in ("autoscaled", "static"):
        _fail(CoderStackError(f"--gpu-pool {gpu_pool!r}: expected autoscaled or static"))
    try:
        spec_obj = load_spec(stack)
    except CoderStackError as e:
        _fail(e)
        return
    unknown = [n for n in faults if n not in {m.name for m in spec_obj.models} | {f.name for f in spec_obj.frontends}]
    if unknown:
        _fail(CoderStackError(f"--fault names unknown deployment(s) {unknown}"))
    runnable: dict[str, str | Path] = {}
    if project_image is not None:
        if not project_image.strip() or any(c.isspace() for c in project_image):
            _fail(CoderStackError(f"--project-image {project_image!r}: expected an image name, e.g. coder-stack:0.1.0"))
        if has_standin(project_image):
            _fail(CoderStackError(f"--project-image {project_image!r} is a stand-in's image; give the flows' image"))
        if not (PROJECT_DIR / "prefect.yaml").is_file():
            _fail(
                CoderStackError(
                    f"--project-image runs a checkout of coder-stack, and {PROJECT_DIR} is not one (no prefect.yaml): "
                    "install coder-stack from its checkout (pip install -e .) to use it"
                )
            )
        runnable[project_image] = PROJECT_DIR
    run_sim(
        kubeconfig,
        time_scale=time_scale,
        faults=faults,
        gpu_pool=gpu_pool,
        exit_after=exit_after,
        spec=spec_obj,
        runnable_images=runnable,
    )


@dev.command(rich_help_panel=PANEL)
def demo(
    keep_ui: Annotated[
        bool, typer.Option("--keep-ui", help="Keep the Prefect server (UI) running after the demo until Ctrl-C.")
    ] = False,
    time_scale: Annotated[
        float, typer.Option("--time-scale", min=0.0005, max=1.0, help="Simulated time factor (0.005: 10 min -> 3 s).")
    ] = 0.005,
    home: Annotated[Path, typer.Option("--home", help="Where the demo keeps its Prefect database.")] = Path(
        ".coder-stack"
    ),
) -> None:
    """Start the simulated stack and a local Prefect server, run validate_coder_stack with the agent stage."""
    from coder_stack_dev.demo import run_demo

    raise typer.Exit(run_demo(home=home, time_scale=time_scale, keep_ui=keep_ui))


@dev.command(rich_help_panel=PANEL, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer, shorter runs (under 3 minutes).")] = False,
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the results.")] = Path("bench-results.json"),
    only: Annotated[
        str | None,
        typer.Option(
            "--only",
            help="Scenario groups, comma-separated: detect, validate, handoff, scale, rss, crash, workday, hook.",
        ),
    ] = None,
    prefect_api: Annotated[
        str | None,
        typer.Option(
            "--prefect-api",
            help="Run against this Prefect server (e.g. one on PostgreSQL) instead of a temporary SQLite one.",
        ),
    ] = None,
    scale_time_scale: Annotated[
        float | None,
        typer.Option("--scale-time-scale", help="Time scale of the scale scenario only (full run: 0.005)."),
    ] = None,
) -> None:
    """Benchmark the flows on the simulated stack against the usual ways (see BENCHMARKS.md)."""
    from coder_stack_dev.bench.run import main as bench_main

    argv = (["--quick"] if quick else []) + ["--json", str(json_path), *ctx.args]
    argv += ["--only", only] if only else []
    argv += ["--prefect-api", prefect_api] if prefect_api else []
    argv += ["--scale-time-scale", str(scale_time_scale)] if scale_time_scale is not None else []
    raise typer.Exit(bench_main(argv))
