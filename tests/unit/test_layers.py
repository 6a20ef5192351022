"""The house rule: imports run one way — app -> flows -> tasks -> use cases -> one room per external system
-> the foundation (spec, errors, the HTTP stack, the report, a probe's results) — and the simulator keeps no
copy of product logic (it reads only the spec and the errors).

Read from the code itself (every ``import`` and ``from ... import``, also inside functions), so a new upward
arrow fails here, naming the module and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FOUNDATION = {"coder_stack.spec", "coder_stack.errors", "coder_stack.http", "coder_stack.report", "coder_stack.probe"}
ROOMS = ("coder_stack.kubernetes", "coder_stack.litellm", "coder_stack.vllm", "coder_stack.orchestration")
RANK = {"foundation": 0, "room": 1, "usecases": 2, "tasks": 3, "flows": 4, "app": 5}


def layer(module: str) -> str | None:
    """The layer a project module belongs to (None: not ours, or the simulator)."""
    if module in FOUNDATION or module == "coder_stack":
        return "foundation"
    if module.startswith(ROOMS):
        return "room"
    if module.startswith("coder_stack.usecases"):
        return "usecases"
    if module.startswith("coder_stack.app"):
        return "app"
    if module == "tasks" or module.startswith("tasks."):
        return "tasks"
    if module == "flows" or module.startswith("flows."):
        return "flows"
    return None


def room(module: str) -> str | None:
    return next((r for r in ROOMS if module == r or module.startswith(r + ".")), None)


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


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
            folder = root / base.replace(".", "/")
            out += [
                (node.lineno, f"{base}.{a.name}")
                for a in node.names
                if (folder / a.name).is_dir() or (folder / f"{a.name}.py").exists()
            ]
    return out


def sources(*tops: str, root: Path = ROOT) -> list[Path]:
    return sorted(p for t in tops for p in (root / t).rglob("*.py"))


def violations(root: Path = ROOT) -> list[str]:
    """Every import of the product tree under ``root`` that breaks the house rule."""
    wrong = []
    for path in sources("coder_stack", "tasks", "flows", root=root):
        me = module_name(path, root)
        mine = layer(me)
        if mine is None:
            wrong.append(f"{me} is in no layer: add it to the house rule in this test and the docs")
            continue
        for line, target in imports(path, root):
            theirs = layer(target)
            if target.startswith("simstack") and mine != "app":
                wrong.append(f"{me}:{line} imports the simulator ({target}); only the app may")
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


def test_the_simulator_copies_no_product_logic() -> None:
    allowed = {"coder_stack.spec", "coder_stack.errors"}
    wrong = [
        f"{module_name(p)}:{line} imports {target}"
        for p in sources("simstack")
        for line, target in imports(p)
        if target.startswith(("coder_stack", "flows", "tasks")) and target not in allowed and target != "coder_stack"
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
    "flows/common.py": "from tasks import smoke\n",
}


def test_the_checker_passes_a_tree_whose_imports_run_down(tmp_path: Path) -> None:
    _tree(tmp_path, CLEAN_TREE)
    assert violations(tmp_path) == []


@pytest.mark.parametrize(
    ("rel", "text", "expected"),
    [
        # an upward import, hidden inside a function
        ("coder_stack/usecases/keys.py", "def f():\n    from flows import common\n", "imports flows.common (flows)"),
        # a relative upward import (tasks from a room, spelled relatively: resolved first)
        ("coder_stack/litellm/admin.py", "from ..usecases import keys\n", "coder_stack.usecases.keys (usecases)"),
        # one room reaching into another
        ("coder_stack/kubernetes/wait.py", "import coder_stack.litellm.admin\n", "the coder_stack.litellm room"),
        # the simulator from below the app
        ("tasks/smoke.py", "import simstack.standins\n", "imports the simulator"),
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
