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


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
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
            folder = ROOT / base.replace(".", "/")
            out += [
                (node.lineno, f"{base}.{a.name}")
                for a in node.names
                if (folder / a.name).is_dir() or (folder / f"{a.name}.py").exists()
            ]
    return out


def sources(*tops: str) -> list[Path]:
    return sorted(p for t in tops for p in (ROOT / t).rglob("*.py"))


def test_product_imports_run_one_way() -> None:
    wrong = []
    for path in sources("coder_stack", "tasks", "flows"):
        me = module_name(path)
        mine = layer(me)
        assert mine is not None, f"{me} is in no layer: add it to the house rule in this test and the docs"
        for line, target in imports(path):
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


@pytest.mark.parametrize(
    ("module", "target", "verdict"),
    [
        ("coder_stack.usecases.keys", "flows.common", "up"),
        ("coder_stack.kubernetes.wait", "coder_stack.litellm.admin", "across"),
        ("coder_stack.app.cli", "flows.validate", "ok"),
        ("tasks.smoke", "coder_stack.vllm.smoke", "ok"),
    ],
)
def test_the_rule_itself(module: str, target: str, verdict: str) -> None:
    """The checker tells an upward or sideways arrow from a downward one."""
    mine, theirs = layer(module), layer(target)
    assert mine and theirs
    up = RANK[theirs] > RANK[mine]
    across = mine == theirs == "room" and room(module) != room(target)
    assert {"up": up, "across": across, "ok": not (up or across)}[verdict]
