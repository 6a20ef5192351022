"""The doctor's report on a terminal: a rich table of its rows and the summary line under it.

The library's :class:`~coder_stack.usecases.doctor.DoctorReport` knows no terminal; ``doctor --json`` prints
its own JSON (``DoctorReport.to_json``), this module only the table.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from coder_stack.usecases.doctor import DoctorReport

STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skipped": "dim"}


def render(report: DoctorReport) -> Table:
    """A rich Table of the rows; every cell is plain Text (messages hold ``[...]`` that markup would eat)."""
    t = Table(title="coder-stack doctor")
    for col in ("check", "status", "seen", "what to do"):
        t.add_column(col)
    for r in report.rows:
        t.add_row(Text(r.name), Text(r.status, style=STYLE[r.status]), Text(r.seen), Text(r.todo))
    return t


def show(out: Console, report: DoctorReport) -> None:
    """The table, then the summary (bold, red when something failed)."""
    out.print(render(report))
    out.print(Text(report.summary(), style="bold" if report.ok else "bold red"))


__all__ = ["STYLE", "render", "show"]
