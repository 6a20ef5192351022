"""`demo`, `sim` and `bench` are development tools: a checkout's `./dev.sh` installs them beside the product and
they join `coder-stack` through the ``coder_stack.commands`` entry point; an installed package without them
answers those names with where to get them, never a bare "No such command"."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import pytest
from typer.testing import CliRunner

import coder_stack.app.cli as cli


@pytest.fixture
def cli_without_devtools(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The CLI module as a user's `pip install coder-stack` loads it: no distribution declares the entry point."""
    monkeypatch.setattr("importlib.metadata.entry_points", lambda **_: [])
    try:
        yield importlib.reload(cli)
    finally:
        monkeypatch.undo()
        importlib.reload(cli)


def test_a_checkout_has_the_development_commands_in_their_own_help_panel() -> None:
    res = CliRunner().invoke(cli.app, ["--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    tools = res.output[res.output.index("Development tools") :]
    for name in ("demo", "sim", "bench"):
        assert f" {name} " in tools, res.output
    res = CliRunner().invoke(cli.app, ["sim", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "--project-image" in res.output, res.output


@pytest.mark.parametrize("name", ["demo", "sim", "bench"])
def test_without_the_development_tools_each_of_their_commands_says_where_to_get_it(
    cli_without_devtools: ModuleType, name: str
) -> None:
    res = CliRunner().invoke(cli_without_devtools.app, [name, "--kubeconfig", "x"])
    assert res.exit_code == 1, res.output
    assert "development tool" in res.output and "./dev.sh demo" in res.output, res.output
    assert "Traceback" not in res.output
    listing = CliRunner().invoke(cli_without_devtools.app, ["--help"], env={"COLUMNS": "200"}).output
    assert "Development tools" not in listing and " sim " not in listing, listing
