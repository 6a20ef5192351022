"""`coder-stack wake-setup`: wake on demand in the LiteLLM gateway (coder_stack/usecases/wake_setup.py does the
work). Without --apply it prints what it would apply; with --apply it applies it and restarts the gateway."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from coder_stack.errors import CoderStackError, one_line
from coder_stack.spec import StackSpec, load_spec

console = Console(stderr=True)
out = Console()


def _fail(err: BaseException) -> typer.Exit:
    console.print(Text.assemble(("error: ", "bold red"), one_line(err)), soft_wrap=True)
    return typer.Exit(1)


async def _apply(
    spec: StackSpec, url: str, kubeconfig: Path | None, context: str | None, timeout_s: float
) -> list[str]:
    from coder_stack.kubernetes.client import ClusterTarget, open_api
    from coder_stack.usecases.wake_setup import apply

    target = ClusterTarget(kubeconfig=str(kubeconfig.resolve()) if kubeconfig else None, context=context)
    async with open_api(target) as api:
        report = await apply(api, spec, url, timeout_s=timeout_s)
    return report.lines


def wake_setup(
    apply: Annotated[
        bool,
        typer.Option(
            "--apply",
            help="Create or update the ConfigMap and RBAC, mount the files and name the callback in the proxy config, "
            "restart the gateway and wait until it is Ready. Without it: print all of it as YAML.",
        ),
    ] = False,
    prefect_api_url: Annotated[
        str | None,
        typer.Option(
            "--prefect-api-url",
            help="The Prefect API as the LiteLLM pod reaches it, with /api (default: the spec's wake.prefect_api_url).",
        ),
    ] = None,
    stack: Annotated[
        Path | None, typer.Option("--stack", help="Stack spec YAML (default: the runbook's reference deployment).")
    ] = None,
    kubeconfig: Annotated[
        Path | None, typer.Option("--kubeconfig", help="Kubeconfig path (default: in-cluster, then $KUBECONFIG).")
    ] = None,
    context: Annotated[str | None, typer.Option("--context", help="Kubeconfig context (default: current).")] = None,
    service_account: Annotated[
        str,
        typer.Option(
            "--gateway-service-account",
            help="The LiteLLM pod's ServiceAccount in the printed RoleBinding (--apply reads it from the Deployment).",
        ),
    ] = "default",
    timeout_s: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the gateway's rollout.", min=1)
    ] = 600.0,
) -> None:
    """Wake on demand in the LiteLLM gateway: the callback module and its settings (a ConfigMap), the RBAC to read the
    models' Deployments, the mount and the proxy-config line that load it. Safe to rerun."""
    from coder_stack.usecases.wake_setup import prefect_api_url as resolve_url
    from coder_stack.usecases.wake_setup import render

    try:
        spec = load_spec(stack)
        url = resolve_url(spec, prefect_api_url)
        if not apply:
            sys.stdout.write(render(spec, url, service_account))  # as is: YAML must not be wrapped
            return
        if kubeconfig is not None and not kubeconfig.is_file():
            raise CoderStackError(f"--kubeconfig {kubeconfig} does not exist; pass the path of a kubeconfig file")
        lines = asyncio.run(_apply(spec, url, kubeconfig, context, timeout_s))
    except CoderStackError as e:
        raise _fail(e) from None
    except KeyboardInterrupt:
        console.print("interrupted: run `coder-stack wake-setup --apply` again to finish")
        raise typer.Exit(130) from None
    except Exception as e:  # not ours: one line, never a traceback
        raise _fail(e) from None
    for line in lines:
        out.print(line, markup=False, highlight=False, soft_wrap=True)


__all__ = ["wake_setup"]
