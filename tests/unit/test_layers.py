"""The house rule: the folders at the top of the checkout are the layers, and imports run one way down them.

    app/          coder_stack.app        the command line and setup
    flows/        coder_stack.flows      one file per flow
    tasks/        coder_stack.tasks      thin @task wrappers
    coder_stack/  coder_stack            the library: use cases, then one room per external system (kubernetes,
                                         litellm, vllm, orchestration = the Prefect server), then the foundation
                                         (spec, errors, transport, report, probe)
    devtools/     simstack, coder_stack_dev   the simulator, the demo and the benchmark: development tools, not
                                         installed with the product; they may import the product, never the reverse

``coder_stack/app``, ``coder_stack/flows`` and ``coder_stack/tasks`` are links to the folders at the top, so the
installed package is one name (``coder_stack``) whose sub-packages are those folders.

Read from the code itself (every ``import`` and ``from ... import``, also inside functions), so a new upward
arrow fails here, naming the module and the import.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# folder at the top of the checkout -> the package it is installed as
PRODUCT = {
    "coder_stack": "coder_stack",
    "app": "coder_stack.app",
    "flows": "coder_stack.flows",
    "tasks": "coder_stack.tasks",
}
DEVTOOLS = {"devtools/simstack": "simstack", "devtools/coder_stack_dev": "coder_stack_dev"}
LINKS = ("app", "flows", "tasks")  # coder_stack/<name> -> ../<name>

FOUNDATION = {
    "coder_stack.spec",
    "coder_stack.errors",
    "coder_stack.transport",
    "coder_stack.report",
    "coder_stack.probe",
}
ROOMS = ("coder_stack.kubernetes", "coder_stack.litellm", "coder_stack.vllm", "coder_stack.orchestration")
RANK = {"foundation": 0, "room": 1, "usecases": 2, "tasks": 3, "flows": 4, "app": 5}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer(module: str) -> str | None:
    """The layer a product module belongs to (None: not ours, or a development tool)."""
    if module in FOUNDATION or module == "coder_stack":
        return "foundation"
    if module.startswith(ROOMS):
        return "room"
    for name in ("usecases", "tasks", "flows", "app"):
        if within(module, f"coder_stack.{name}"):
            return name
    return None


def is_devtool(module: str) -> bool:
    return any(within(module, p) for p in DEVTOOLS.values())


def room(module: str) -> str | None:
    return next((r for r in ROOMS if within(module, r)), None)


def module_name(path: Path, root: Path = ROOT) -> str:
    """The installed name of a source file: its folder at the top mapped to its package."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    for folder, package in {**DEVTOOLS, **PRODUCT}.items():
        top = tuple(folder.split("/"))
        if tuple(parts[: len(top)]) == top:
            parts = package.split(".") + parts[len(top) :]
            break
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def folder_of(module: str, root: Path) -> Path:
    """Where a module's package lives in the checkout (the inverse of module_name, for package names)."""
    for folder, package in sorted({**PRODUCT, **DEVTOOLS}.items(), key=lambda kv: -len(kv[1])):
        if within(module, package):
            return root / folder / module[len(package) :].lstrip(".").replace(".", "/")
    return root / module.replace(".", "/")


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base))
            # ``from coder_stack import x`` imports the module coder_stack.x
            folder = folder_of(base, root)
            out += [
                (node.lineno, f"{base}.{a.name}")
                for a in node.names
                if (folder / a.name).is_dir() or (folder / f"{a.name}.py").exists()
            ]
    return out


def sources(*folders: str, root: Path = ROOT) -> list[Path]:
    """Every .py file under the folders, not following links (coder_stack/flows is flows/, read once)."""
    out = []
    for f in folders:
        base = root / f
        for p in base.rglob("*.py"):
            rel = p.relative_to(base).parts
            if not any((base.joinpath(*rel[: i + 1])).is_symlink() for i in range(len(rel))):
                out.append(p)
    return sorted(out)


def violations(root: Path = ROOT) -> list[str]:
    """Every import of the product tree under ``root`` that breaks the house rule."""
    wrong = []
    for path in sources(*PRODUCT, root=root):
        me = module_name(path, root)
        mine = layer(me)
        if mine is None:
            wrong.append(f"{me} is in no layer: add it to the house rule in this test and the docs")
            continue
        for line, target in imports(path, root):
            if is_devtool(target):
                wrong.append(f"{me}:{line} imports the development tool {target}; the product never may")
                continue
            theirs = layer(target)
            if theirs is None or target == me:
                continue
            if RANK[theirs] > RANK[mine]:
                wrong.append(f"{me}:{line} ({mine}) imports {target} ({theirs}), a layer above it")
            if mine == "room" and theirs == "room" and room(me) != room(target):
                wrong.append(f"{me}:{line}: the {room(me)} room imports the {room(target)} room")
            if mine == "foundation" and theirs == "foundation" and me in ("coder_stack.errors",):
                wrong.append(f"{me}:{line} imports {target}: errors is the bottom of the house")
    return wrong


def test_product_imports_run_one_way() -> None:
    wrong = violations()
    assert wrong == [], "\n".join(wrong)


def test_the_folders_at_the_top_are_the_installed_packages() -> None:
    """coder_stack/app, coder_stack/flows and coder_stack/tasks are links to the folders at the top (so the wheel,
    mypy and a checkout's imports see one package), and nothing else at the top is a product package."""
    for name in LINKS:
        link = ROOT / "coder_stack" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), f"coder_stack/{name} -> ../{name}"
    tops = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert tops == {"coder_stack", "app", "flows", "tasks", "tests"}, tops


def test_the_simulator_copies_no_product_logic() -> None:
    allowed = {"coder_stack.spec", "coder_stack.errors"}
    wrong = [
        f"{module_name(p)}:{line} imports {target}"
        for p in sources("devtools/simstack")
        for line, target in imports(p)
        if within(target, "coder_stack") and target not in allowed and target != "coder_stack"
    ]
    assert wrong == [], "\n".join(wrong)


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)


CLEAN_TREE = {
    "coder_stack/__init__.py": "",
    "coder_stack/errors.py": "",
    "coder_stack/spec.py": "from coder_stack import errors\n",
    "coder_stack/kubernetes/__init__.py": "",
    "coder_stack/kubernetes/wait.py": "from coder_stack.spec import x\n",
    "coder_stack/litellm/__init__.py": "",
    "coder_stack/litellm/admin.py": "from ..errors import E\n",
    "coder_stack/usecases/__init__.py": "",
    "coder_stack/usecases/keys.py": "from coder_stack.litellm import admin\n",
    "tasks/__init__.py": "",
    "tasks/smoke.py": "import coder_stack.usecases.keys\n",
    "flows/__init__.py": "",
    "flows/common.py": "from coder_stack.tasks import smoke\nfrom . import validate\n",
    "flows/validate.py": "from .common import Run\n",
    "app/__init__.py": "",
    "app/cli.py": "from coder_stack.flows import validate\n",
    "devtools/simstack/__init__.py": "",
    "devtools/simstack/stack.py": "from coder_stack.spec import Spec\n",
}


def test_the_checker_passes_a_tree_whose_imports_run_down(tmp_path: Path) -> None:
    _tree(tmp_path, CLEAN_TREE)
    assert violations(tmp_path) == []


@pytest.mark.parametrize(
    ("rel", "text", "expected"),
    [
        # an upward import, hidden inside a function
        (
            "coder_stack/usecases/keys.py",
            "def f():\n    from coder_stack.flows import common\n",
            "imports coder_stack.flows.common (flows)",
        ),
        # a relative upward import (tasks from a room, spelled relatively: resolved first)
        ("coder_stack/litellm/admin.py", "from ..usecases import keys\n", "coder_stack.usecases.keys (usecases)"),
        # a relative import inside flows/ resolves to coder_stack.flows, and flows reaching up to the app fails
        ("flows/validate.py", "from ..app import cli\n", "imports coder_stack.app.cli (app)"),
        # tasks importing a flow
        ("tasks/smoke.py", "from coder_stack.flows.common import Run\n", "(tasks) imports coder_stack.flows.common"),
        # one room reaching into another
        ("coder_stack/kubernetes/wait.py", "import coder_stack.litellm.admin\n", "the coder_stack.litellm room"),
        # the simulator from the product, even from the app
        ("tasks/smoke.py", "import simstack.standins\n", "the development tool simstack.standins"),
        ("app/cli.py", "from coder_stack_dev import demo\n", "the development tool coder_stack_dev"),
        # errors at the bottom importing the rest of the foundation
        ("coder_stack/errors.py", "from coder_stack import spec\n", "errors is the bottom of the house"),
        # a module in no layer
        ("coder_stack/stray/__init__.py", "", "is in no layer"),
    ],
)
def test_the_checker_catches_a_wrong_arrow(tmp_path: Path, rel: str, text: str, expected: str) -> None:
    """The real checker, fed a synthetic tree that differs from a clean one by one wrong import, names it
    (and nothing in the other files)."""
    _tree(tmp_path, CLEAN_TREE | {rel: text})
    wrong = violations(tmp_path)
    me = module_name(tmp_path / rel, tmp_path)
    assert any(expected in w for w in wrong), wrong
    assert all(w.startswith(me) for w in wrong), wrong


# Modules shipped as a single file into another program (the wake hook runs inside the LiteLLM pod as
# coder_stack_wake.py): the standard library and the named packages only, never coder_stack.
STANDALONE = {"coder_stack.litellm.wake_hook": ("httpx", "fastapi", "litellm")}


def standalone_violations(root: Path = ROOT) -> list[str]:
    wrong = []
    for module, allowed in STANDALONE.items():
        path = folder_of(module, root).with_suffix(".py")
        for line, target in imports(path, root):
            top = target.split(".")[0]
            if top not in sys.stdlib_module_names and top not in allowed:
                wrong.append(f"{module}:{line} imports {target}; it is shipped alone and may import only {allowed}")
    return wrong


def test_a_module_shipped_alone_imports_only_what_its_host_has() -> None:
    assert standalone_violations() == []


def test_the_standalone_checker_catches_an_import_of_the_project(tmp_path: Path) -> None:
    hook = "coder_stack/litellm/wake_hook.py"
    _tree(tmp_path, CLEAN_TREE | {hook: "import json\nimport httpx\nfrom litellm.x import Y\n"})
    assert standalone_violations(tmp_path) == []
    _tree(tmp_path, {hook: "import httpx\n\ndef f():\n    from ..errors import E\n"})
    wrong = standalone_violations(tmp_path)
    assert len(wrong) == 1 and "wake_hook:4 imports coder_stack.errors" in wrong[0], wrong
    _tree(tmp_path, {hook: "import yaml\n"})
    assert "imports yaml" in standalone_violations(tmp_path)[0]


TERMINAL = ("rich", "typer", "click")


def test_only_the_app_talks_to_a_terminal() -> None:
    """The library, the tasks and the flows return typed results; rendering them for a person is the app's."""
    wrong = [
        f"{module_name(p)}:{line} imports {target}"
        for p in sources("coder_stack", "flows", "tasks")
        for line, target in imports(p)
        if any(within(target, t) for t in TERMINAL)
    ]
    assert wrong == [], "\n".join(wrong)
