"""Bad input through the CLI: each is refused before anything changes, with a message that says what to fix.

The commands run in-process (typer's CliRunner) against a Prefect test harness and a simulated cluster;
"nothing changes" = no Deployment replica change on the sim's timeline, no Secret created or modified,
no key minted. Spec-level unit tests of the same inputs: tests/unit/test_spec.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from simstack.stack import SimStack
from simstack.store import Store
from typer.testing import CliRunner

import coder_stack.app.setup as cs_setup
from coder_stack.app.cli import app
from coder_stack.spec import StackSpec
from tests.kits.flowkit import PROJECT

pytestmark = pytest.mark.usefixtures("gpu_limit")


@pytest.fixture(scope="module")
def sim() -> Iterator[SimStack]:
    s = SimStack(time_scale=0.002, gpu_pool="static").start()
    yield s
    s.stop()


def state(sim: SimStack) -> dict[str, Any]:
    def _read(store: Store) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for d in store.list("deployments", None):
            out[f"deploy {d['metadata']['namespace']}/{d['metadata']['name']}"] = d["spec"].get("replicas")
        for o in store.list("secrets", None):
            out[f"secret {o['metadata']['namespace']}/{o['metadata']['name']}"] = o["metadata"]["resourceVersion"]
        out["keys"] = len(sim.services.litellm_db.get("keys", {}))
        return out

    result: dict[str, Any] = sim.call(_read, sim.store)
    return result


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, list(args))
    text = " ".join((res.output or "").split())
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        text += f" [exception {type(res.exception).__name__}: {res.exception}]"
    return res.exit_code, text


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


STACK_CASES = [
    ("malformed YAML", "gpus: [\n", "not valid YAML"),
    ("unknown field", "gpuz: 1\n", "gpuz: Extra inputs are not permitted"),
    ("unknown model", "default_model: coder-huge\n", "default_model 'coder-huge' is not one of the models"),
    (
        "negative budget",
        "virtual_keys:\n- alias: x\n  models: [coder-chat]\n  max_budget: -1\n",
        "virtual_keys.0.max_budget: Input should be greater than 0",
    ),
    ("zero GPUs", "gpus: 0\n", "gpus: Input should be greater than or equal to 1"),
    ("gateway URL not a URL", "access:\n  overrides:\n    gateway: not a url\n", "access.overrides.gateway"),
]


@pytest.mark.parametrize(("case", "text", "expected"), STACK_CASES, ids=[c[0] for c in STACK_CASES])
@pytest.mark.parametrize("command", [["validate"], ["swap", "coder-fim"], ["up"], ["down"], ["keys"]])
def test_bad_stack_file_is_refused_before_anything_changes(
    sim: SimStack, tmp_path: Path, command: list[str], case: str, text: str, expected: str
) -> None:
    before, mark = state(sim), len(sim.timeline)
    code, out = cli(*command, "--stack", write(tmp_path, "stack.yaml", text), "--kubeconfig", str(sim.kubeconfig_path))
    assert code == 1, out
    assert "error:" in out and expected in out, out
    assert state(sim) == before and sim.timeline[mark:] == []


def test_unknown_model_name_on_the_command_line(sim: SimStack) -> None:
    before, mark = state(sim), len(sim.timeline)
    for args in (["swap", "coder-32b"], ["up", "--model", "coder-32b"]):
        code, out = cli(*args, "--kubeconfig", str(sim.kubeconfig_path))
        assert code == 1, out
        assert "unknown model 'coder-32b'; this stack has: coder-chat, coder-fim, coder-agent" in out, out
    code, out = cli("validate", "--stage", "gpu", "--kubeconfig", str(sim.kubeconfig_path))
    assert code == 1 and "each stage must be one of chat, fim, agent" in out, out
    assert state(sim) == before and sim.timeline[mark:] == []


def test_a_kubeconfig_that_does_not_load(sim: SimStack, tmp_path: Path) -> None:
    before, mark = state(sim), len(sim.timeline)
    cases = [
        (str(tmp_path / "missing.yaml"), "does not exist; pass the path of a kubeconfig file"),
        (write(tmp_path, "garbage.yaml", "clusters: [\n"), "cannot be read as YAML"),
        (write(tmp_path, "empty.yaml", "kind: Config\n"), "has no contexts; is it a kubeconfig file?"),
        (
            write(
                tmp_path,
                "nouser.yaml",
                yaml.safe_dump(
                    {
                        "kind": "Config",
                        "contexts": [{"name": "c", "context": {"cluster": "nope", "user": "nope"}}],
                        "current-context": "c",
                    }
                ),
            ),
            "could not be loaded",
        ),
    ]
    for path, expected in cases:
        code, out = cli("swap", "coder-fim", "--kubeconfig", path)
        assert code == 1, out
        assert expected in out, (path, out)
    assert state(sim) == before and sim.timeline[mark:] == []


def test_a_context_that_does_not_exist(sim: SimStack) -> None:
    before, mark = state(sim), len(sim.timeline)
    code, out = cli("validate", "--kubeconfig", str(sim.kubeconfig_path), "--context", "prod-cluster")
    assert code == 1, out
    assert "context 'prod-cluster' is not in" in out and "its contexts are: coder-sim" in out, out
    assert state(sim) == before and sim.timeline[mark:] == []


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("serving_namespace", "serving-typo", "namespace serving-typo"),
        ("experience_namespace", "front", "namespace front"),
    ],
)
def test_a_namespace_that_does_not_exist_in_the_cluster(
    sim: SimStack, tmp_path: Path, field: str, value: str, expected: str
) -> None:
    before, mark = state(sim), len(sim.timeline)
    path = write(tmp_path, "stack.yaml", f"{field}: {value}\n")
    for command in (["validate"], ["swap", "coder-fim"], ["up"]):
        code, out = cli(*command, "--stack", path, "--kubeconfig", str(sim.kubeconfig_path))
        assert code == 1, out
        assert "the cluster lacks what the stack needs" in out and expected in out and "nothing was changed" in out, out
    assert state(sim) == before and sim.timeline[mark:] == []


def test_a_deployment_that_does_not_exist_in_the_cluster(sim: SimStack, tmp_path: Path) -> None:
    before, mark = state(sim), len(sim.timeline)
    doc = {"models": [m.model_dump(mode="json") for m in StackSpec().models]}
    doc["models"][1]["name"] = "coder-fim-v2"  # renamed in the spec, not in the cluster
    text = yaml.safe_dump(doc)
    path = write(tmp_path, "stack.yaml", text)
    for command in (["validate"], ["swap", "coder-fim-v2"], ["down"]):
        code, out = cli(*command, "--stack", path, "--kubeconfig", str(sim.kubeconfig_path))
        assert code == 1, out
        assert re.search(r"deployment (serving/)?coder-fim-v2|'coder-fim-v2' not found", out), out
    assert state(sim) == before and sim.timeline[mark:] == []


@pytest.mark.parametrize(
    ("cron", "tz", "expected"),
    [("0 25 * * *", "America/New_York", "cron"), ("0 7 * * 1-5", "Mars/Olympus", "timezone")],
)
def test_a_cron_or_timezone_that_does_not_parse_is_refused_by_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cron: str, tz: str, expected: str
) -> None:
    doc = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    doc["deployments"][1]["schedules"] = [{"cron": cron, "timezone": tz, "active": True}]
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(doc))
    monkeypatch.setattr(cs_setup, "PROJECT_DIR", tmp_path)
    called: list[str] = []

    async def no_limit(gpus: int) -> str:
        called.append("ensure_gpu_limit")
        return ""

    monkeypatch.setattr(cs_setup, "ensure_gpu_limit", no_limit)
    code, out = cli("setup")
    assert code == 1, out
    assert f"deployment 'evening-teardown' has a schedule whose {expected} does not parse" in out, out
    assert "'0 7 * * 1-5'" in out and "'America/New_York'" in out and "nothing was changed" in out
    assert called == []
