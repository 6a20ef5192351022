"""Peak RSS of the flow process and of the simulated stack, each in its own process.

The benchmark's main process runs the simulated clusters as threads beside the flows, so its own peak
RSS mixes both. Here they are separated: ``python -m coder_stack_dev.bench.rss sim`` runs one simulated cluster and
``python -m coder_stack_dev.bench.rss flows`` runs validate_coder_stack and then ``sessions`` GPU sessions at once
against it (the Prefect API from $PREFECT_API_URL); the parent reads each one's VmHWM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from coder_stack.spec import ModelSpec, PhaseBudgets, StackSpec, load_spec, spec_yaml


def vmhwm_mb(pid: int | str = "self") -> float:
    """Peak resident set size (VmHWM) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_spec(sessions: int, gpus: int) -> StackSpec:
    """The reference stack plus extra models so that ``sessions`` distinct models exist."""
    base = StackSpec()
    extra = [
        ModelSpec(
            name=f"m{i:02d}",
            role="chat",
            served_model_name=f"bench-model-{i:02d}",
            alias=f"m{i:02d}",
            weights_gb=5.5,
            budgets=PhaseBudgets(node=300, image=420, weights=300, start=180),
        )
        for i in range(len(base.models) + 1, sessions + 1)
    ]
    return base.model_copy(update={"models": [*base.models, *extra], "gpus": gpus})


def _sim_main(args: argparse.Namespace) -> None:
    from simstack.stack import SimStack

    from coder_stack_dev.bench.simrec import SimRecorder

    spec = load_spec(args.stack)
    with SimStack(spec=spec, time_scale=args.time_scale, gpu_pool="autoscaled", kubeconfig_path=args.kubeconfig) as sim:
        rec = SimRecorder.attach(sim, spec.gpus)
        print("ready", flush=True)
        sys.stdin.read()  # until the parent closes our stdin
        summary = sim.call(
            lambda: {
                k: getattr(rec, k)
                for k in ("overcommit_live", "overcommit_bound", "max_live", "max_bound", "gpu_pods_seen")
            }
        )
    print(json.dumps(summary), flush=True)


class SimProcess:
    """The simulated cluster in a child process (``python -m coder_stack_dev.bench.rss sim``), as a real cluster is not
    in the flows' process: its CPU does not compete with the flows' for this process's GIL. What its
    recorder saw (GPU pods alive and bound, overcommits) comes back from :meth:`stop`."""

    def __init__(self, spec: StackSpec, time_scale: float) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="coder-bench-sim-")
        self.stack = Path(self._tmp.name) / "stack.yaml"
        self.stack.write_text(spec_yaml(spec))
        self.kubeconfig = Path(self._tmp.name) / "kubeconfig"
        self._proc = subprocess.Popen(
            [*self.cmd("sim"), "--time-scale", str(time_scale)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"the simulated stack did not start: {line!r}")

    def cmd(self, role: str) -> list[str]:
        """``python -m coder_stack_dev.bench.rss ROLE`` on this cluster's stack file and kubeconfig."""
        files = ["--stack", str(self.stack), "--kubeconfig", str(self.kubeconfig)]
        return [sys.executable, "-m", "coder_stack_dev.bench.rss", role, *files]

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> dict[str, Any]:
        try:
            out, _ = self._proc.communicate(input="", timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, _ = self._proc.communicate()
        finally:
            self._tmp.cleanup()
        lines = (out or "").strip().splitlines()
        return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}


async def _flows_main(args: argparse.Namespace) -> dict[str, Any]:
    from coder_stack.flows.params import Connection
    from coder_stack.flows.validate import Stage, ValidateOptions, validate_coder_stack
    from coder_stack.orchestration.gpu_limit import ensure_gpu_limit
    from coder_stack_dev.bench.flows import gpu_session_run

    spec = load_spec(args.stack)
    conn = Connection(kubeconfig=args.kubeconfig, stack_file=args.stack)
    await ensure_gpu_limit(1)
    t0 = time.monotonic()
    await validate_coder_stack(options=ValidateOptions(stages=[Stage.CHAT, Stage.FIM]), connection=conn)
    t1 = time.monotonic()
    await ensure_gpu_limit(args.gpus)
    states = await asyncio.gather(
        *(gpu_session_run(connection=conn, model=m.name, return_state=True) for m in spec.models[: args.sessions])
    )
    t2 = time.monotonic()
    await ensure_gpu_limit(1)
    return {
        "validate_s": round(t1 - t0, 3),
        "sessions": args.sessions,
        "sessions_s": round(t2 - t1, 3),
        "sessions_failed": sum(1 for s in states if not s.is_completed()),
        "vmhwm_mb": round(vmhwm_mb(), 1),
    }


def measure(api_url: str, time_scale: float, sessions: int, gpus: int, timeout_s: float = 600) -> dict[str, Any]:
    """Run the sim and the flows in two child processes; their peak RSS in MB."""
    sim = SimProcess(rss_spec(sessions, gpus), time_scale)
    try:
        env = dict(os.environ, PREFECT_API_URL=api_url, PREFECT_LOGGING_LEVEL="WARNING")
        flows = subprocess.run(
            [*sim.cmd("flows"), "--sessions", str(sessions), "--gpus", str(gpus)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        sim_mb = vmhwm_mb(sim.pid)
    finally:
        sim.stop()
    if flows.returncode != 0:
        raise RuntimeError(f"the flow process failed ({flows.returncode}): {flows.stderr[-2000:]}")
    result = json.loads(flows.stdout.strip().splitlines()[-1])
    return {
        "flow_process": result["vmhwm_mb"],
        "sim": round(sim_mb, 1),
        "workload": f"validate_coder_stack (chat, FIM), then {sessions} GPU sessions at once on {gpus} GPU(s)",
        "detail": result,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coder_stack_dev.bench.rss")
    p.add_argument("role", choices=["sim", "flows"])
    p.add_argument("--stack", required=True)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--time-scale", type=float, default=0.005)
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--gpus", type=int, default=1)
    args = p.parse_args(argv)
    if args.role == "sim":
        _sim_main(args)
    else:
        print(json.dumps(asyncio.run(_flows_main(args))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
