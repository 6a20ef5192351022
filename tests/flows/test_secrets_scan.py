"""No key anywhere: after a full validate run and a failing one, through the CLI against a real Prefect
server with its own PREFECT_HOME, no file under that home (SQLite database with its WAL, result storage,
logs), nothing the CLI printed, and no artifact or log read back through the API contains the master,
upstream or vLLM key or any minted key (read from the Secrets the flows wrote). The project's exceptions
carry no header or key in their message or repr.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from simstack.stack import SimStack
from simstack.store import Store

from coder_stack import errors
from coder_stack.errors import CoderStackError, PodFailed, SmokeFailed, WaitTimeout
from tests.kits.flowkit import PROJECT, PrefectServer

CODER_STACK = Path(sys.executable).with_name("coder-stack")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    srv = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    srv.start()
    yield srv
    srv.stop()


def run_cli(server: PrefectServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CODER_STACK), *args],
        cwd=PROJECT,
        env=server.env() | {"COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def minted_keys(sim: SimStack) -> list[str]:
    """Every key the flows delivered: Open WebUI's Secret, Tabby's config, the keystore Secret."""

    def _read(store: Store) -> list[str]:
        out: list[str] = []
        for o in store.list("secrets", None):
            name = o["metadata"]["name"]
            if name not in ("openwebui-secrets", "tabby-config", "coder-stack-keys"):
                continue
            for k, v in (o.get("data") or {}).items():
                value = base64.b64decode(v).decode()
                if k == "config.toml":
                    out += re.findall(r'api_key\s*=\s*"([^"]+)"', value)
                else:
                    out.append(value)
        return out

    result: list[str] = sim.call(_read, sim.store)
    return result


def needles(secret: str) -> list[bytes]:
    """The whole value and its last 16 characters (a key with its prefix cut off is still a leak)."""
    return [secret.encode(), secret[-16:].encode()]


def scan(blobs: dict[str, bytes], secrets: dict[str, str]) -> list[str]:
    hits = []
    for where, data in blobs.items():
        for label, secret in secrets.items():
            if any(n in data for n in needles(secret)):
                hits.append(f"{label} in {where}")
    return hits


def test_no_key_in_the_prefect_home_cli_output_artifacts_or_logs(server: PrefectServer, tmp_path: Path) -> None:
    sim = SimStack(time_scale=0.002, gpu_pool="static").start()
    try:
        kc = str(sim.kubeconfig_path)
        outputs: dict[str, str] = {}
        setup = run_cli(server, "setup", "--no-deploy")
        assert setup.returncode == 0, setup.stdout + setup.stderr
        ok = run_cli(server, "validate", "--agent", "--kubeconfig", kc)
        outputs["validate (passing)"] = ok.stdout + ok.stderr
        assert ok.returncode == 0, outputs["validate (passing)"][-3000:]
        assert "passed" in ok.stdout
        sim.set_fault("coder-fim", "crashloop")
        bad = run_cli(server, "validate", "--agent", "--kubeconfig", kc)
        outputs["validate (failing)"] = bad.stdout + bad.stderr
        assert bad.returncode == 1, outputs["validate (failing)"][-3000:]
        assert "CrashLoopBackOff" in outputs["validate (failing)"]
        status = run_cli(server, "status", "--kubeconfig", kc)
        outputs["status"] = status.stdout + status.stderr

        keys = minted_keys(sim)
        assert len(keys) >= 3, keys  # open-webui, tabby, coder-agent
        secrets = {f"sim {k}": v for k, v in sim.secrets.items()}
        secrets |= {f"minted key #{i}": k for i, k in enumerate(keys)}
        webui = sim.call(lambda s: s.get("secrets", "experience", "openwebui-secrets"), sim.store)
        secrets["WEBUI_SECRET_KEY"] = base64.b64decode(webui["data"]["WEBUI_SECRET_KEY"]).decode()

        blobs: dict[str, bytes] = {f"CLI output of {k}": v.encode() for k, v in outputs.items()}
        files = [p for p in server.home.rglob("*") if p.is_file()]
        names = {p.name for p in files}
        assert any(n.endswith(".db") for n in names), names  # the database is there to be scanned
        print(f"scanned under the Prefect home: {sorted(str(p.relative_to(server.home)) for p in files)}")
        blobs |= {f"file {p.relative_to(server.home)}": p.read_bytes() for p in files}
        with httpx.Client(base_url=server.url, timeout=30) as api:
            arts = api.post("/artifacts/filter", json={"limit": 200})
            arts.raise_for_status()
            assert any(a.get("key") == "validate-report" for a in arts.json()), "no report artifact"
            blobs["artifacts (API)"] = arts.content
            for path in ("/logs/filter", "/flow_runs/filter", "/task_runs/filter"):
                r = api.post(path, json={"limit": 200})
                r.raise_for_status()
                blobs[f"{path} (API)"] = r.content
        hits = scan(blobs, secrets)
        assert hits == [], hits
        # The scan would have found them: the same values are in the cluster's Secrets (sanity check).
        assert scan({"k": " ".join(secrets.values()).encode()}, secrets)
    finally:
        sim.stop()


def _all_error_classes() -> list[type[CoderStackError]]:
    seen: list[type[CoderStackError]] = []
    todo: list[type[CoderStackError]] = [CoderStackError]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo += cls.__subclasses__()
    return seen


def test_exception_messages_and_reprs_carry_no_header_or_key() -> None:
    key = "sk-" + "a1b2c3d4" * 5
    token = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0.sig"
    text = (
        f"upstream said 401 for Authorization: Bearer {key}; headers {{'x-api-key': '{key}'}} "
        f"api_key={key} token: {token} master {key}"
    )
    classes = _all_error_classes()
    assert {PodFailed, WaitTimeout, SmokeFailed, errors.Forbidden} <= set(classes)
    for cls in classes:
        if cls is SmokeFailed:
            e: CoderStackError = SmokeFailed(text, hop="gateway")
        else:
            e = cls(text)
        for rendered in (str(e), repr(e), e.message, str(e.args)):
            assert key not in rendered and key[-16:] not in rendered, (cls.__name__, rendered)
            assert token not in rendered, (cls.__name__, rendered)
            assert "Bearer ***" in rendered or "***" in rendered, (cls.__name__, rendered)
