"""What a real gateway and a real model did to the flows, and what the user gets instead now.

- any failure inside a flow reaches the CLI as one line naming the step, after the run's report, never a
  traceback; hop tags such as ``[key]`` survive the terminal;
- ``swap`` with a stale key repairs it as the keys flow would and leaves a healthy model serving (a key
  that cannot be repaired, a spent budget: tests/flows/test_reliability.py);
- preflight names an alias the gateway does not serve (a key's /v1/models would list it anyway);
- the spend report compares against the spend before the calls, and says when Tabby's way of calling
  (streamed FIM) is not metered.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from simstack.stack import SimStack
from typer.testing import CliRunner

from coder_stack import probe
from coder_stack.app.cli import app
from coder_stack.errors import PreflightError, SmokeFailed
from coder_stack.flows.swap import SwapOptions, swap_model
from coder_stack.flows.validate import ValidateOptions, validate_coder_stack
from coder_stack.spec import StackSpec
from coder_stack.vllm import smoke as vllm_smoke
from tests.conftest import is_ready, pods_of
from tests.kits.flowkit import conn, replicas

pytestmark = pytest.mark.usefixtures("gpu_limit")

SPEC = StackSpec()
SERVING = SPEC.serving_namespace


def cli(*args: str) -> tuple[int, str, BaseException | None]:
    res = CliRunner().invoke(app, list(args))
    exc = res.exception if res.exception is not None and not isinstance(res.exception, SystemExit) else None
    return res.exit_code, res.output or "", exc


def set_key_fields(sim: SimStack, alias: str, **fields: object) -> None:
    def _set() -> None:
        [rec] = [r for r in sim.services.litellm_db["keys"].values() if r.get("key_alias") == alias]
        rec.update(fields)

    sim.call(_set)


def serving_ready(sim: SimStack, name: str) -> bool:
    return bool(sim.call(lambda s: any(is_ready(p) for p in pods_of(s, SERVING, name)), sim.store))


# ------------------------------------------------------------------ one line, never a traceback
def test_an_unexpected_error_is_one_line_naming_the_step_after_the_report(
    sim: SimStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*a: Any, **kw: Any) -> Any:
        probe.SmokeResult(kind="direct", target="x", total_s=-1)  # pydantic ValidationError: not ours
        raise AssertionError("unreachable")

    monkeypatch.setattr(vllm_smoke, "smoke_direct", broken)
    code, out, exc = cli("swap", "coder-chat", "--no-gateway-smoke", "--kubeconfig", str(sim.kubeconfig_path))
    assert exc is None, f"{type(exc).__name__} reached the user: {exc}"
    assert code == 1 and "Traceback" not in out
    assert "swap_model(coder-chat): failed: ValidationError" in " ".join(out.split())  # the report, printed
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: ") and "unexpected ValidationError" in last, out
    assert "error: coder-chat Ready after" in last, last  # the step it ended in (not the clean-up after it)
    assert replicas(sim)["coder-chat"] == 0  # the broken model was scaled back


def test_the_hop_tag_survives_the_terminal(sim: SimStack, monkeypatch: pytest.MonkeyPatch) -> None:
    async def refused(*a: Any, **kw: Any) -> Any:
        raise SmokeFailed("vLLM rejected the key (answered 401: Unauthorized)", hop="key")

    monkeypatch.setattr(vllm_smoke, "smoke_direct", refused)
    code, out, exc = cli("swap", "coder-chat", "--no-gateway-smoke", "--kubeconfig", str(sim.kubeconfig_path))
    assert exc is None and code == 1
    assert "[key] vLLM rejected the key" in out.strip().splitlines()[-1], out


# ------------------------------------------------------------------ swap keeps a healthy model over a key problem
async def test_swap_with_a_key_deleted_in_the_gateway_repairs_it_and_leaves_the_model_serving(sim: SimStack) -> None:
    from coder_stack.tasks.gateway import ensure_keys_task

    target = conn(sim).cluster_target()
    await ensure_keys_task.fn(target, SPEC, ["open-webui"])
    sim.call(lambda: sim.services.litellm_db["keys"].clear())  # deleted behind our back

    report = await swap_model(options=SwapOptions(target="coder-chat"), connection=conn(sim))

    assert report.outcome == "passed", report.to_markdown()
    assert any(a.startswith("open-webui: reminted") for a in report.key_actions), report.key_actions
    assert [s.ok for s in report.section("coder-chat").smokes] == [True, True]
    assert replicas(sim)["coder-chat"] == 1 and serving_ready(sim, "coder-chat")


# ------------------------------------------------------------------ preflight: every alias in the gateway
async def test_preflight_names_an_alias_the_gateway_does_not_serve_and_changes_nothing(
    sim: SimStack, tmp_path: Path
) -> None:
    doc = SPEC.model_dump(mode="json")
    for m in doc["models"]:
        if m["alias"] == "coder-fim":
            m["alias"] = "coder-fill"
    for k in doc["virtual_keys"]:
        k["models"] = ["coder-fill" if a == "coder-fim" else a for a in k["models"]]
    stack = tmp_path / "stack.yaml"
    stack.write_text(yaml.safe_dump(doc))
    mark = len(sim.timeline)
    keys_before = sim.call(lambda: len(sim.services.litellm_db.get("keys", {})))

    with pytest.raises(PreflightError, match="no model named 'coder-fill'"):
        await validate_coder_stack(connection=conn(sim, stack_file=str(stack)))
    assert sim.timeline[mark:] == []
    assert sim.call(lambda: len(sim.services.litellm_db.get("keys", {}))) == keys_before


# ------------------------------------------------------------------ spend: compared with before, streamed FIM
async def test_spend_is_compared_with_before_the_calls_and_unmetered_streamed_fim_is_called_so(
    make_sim: Callable[..., SimStack],
) -> None:
    from coder_stack.tasks.gateway import ensure_keys_task

    sim = make_sim()
    target = conn(sim).cluster_target()
    await ensure_keys_task.fn(target, SPEC)
    set_key_fields(sim, "open-webui", spend=1.0)  # spent earlier in the month

    report = await validate_coder_stack(options=ValidateOptions(stages=["chat", "fim"]), connection=conn(sim))

    assert report.outcome == "passed", report.to_markdown()
    notes = {s.alias: s.note for s in report.spend}
    assert notes["open-webui"].startswith("metered: spend moved from $1.000000 to"), notes
    # Tabby streams FIM; LiteLLM logs streamed /v1/completions at $0 and 0 tokens (recorded: spend-fim-stream-*)
    assert notes["tabby"].startswith("not metered:") and "rpm_limit/tpm_limit" in notes["tabby"], notes
    tabby_checks = [s.check for s in report.section("coder-fim").smokes]
    assert "Tabby's configured key completes FIM" in tabby_checks
