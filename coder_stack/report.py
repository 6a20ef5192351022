"""The run report: what each flow did, in words and numbers an operator reads. Never holds a secret."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from pydantic import BaseModel, Field


class SmokeLine(BaseModel):
    check: str = Field(description="What was checked, e.g. 'gateway chat via open-webui key'.")
    ok: bool
    detail: str = Field("", description="Short evidence: status, excerpt, latency. No secrets.")
    seconds: float | None = None


class ModelSection(BaseModel):
    model: str
    phases: dict[str, float] = Field(default_factory=dict, description="Seconds per cold-start phase.")
    ready_s: float | None = None
    scale_up_seen: bool = False
    ttft_ms: float | None = None
    smokes: list[SmokeLine] = Field(default_factory=list)


class SpendLine(BaseModel):
    alias: str
    spend: float
    max_budget: float | None
    share_used: float | None
    models: list[str]
    note: str = ""


class IdleLine(BaseModel):
    model: str
    action: str = Field(description="reclaimed, would reclaim, or left serving.")
    reason: str = Field(description="How idle it was, or why it was left.")
    idle_s: float | None = Field(None, description="Seconds its request counters had stood still.")
    at: str | None = Field(None, description="When it was reclaimed (UTC).")
    bring_back: str | None = Field(None, description="The command that brings it back.")


class RunReport(BaseModel):
    flow: str
    started_at: str = Field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))
    started_monotonic: float = Field(default_factory=time.monotonic, exclude=True)
    wall_s: float | None = None
    outcome: str = "running"
    steps: list[str] = Field(default_factory=list, description="What happened, in order.")
    key_actions: list[str] = Field(default_factory=list, description="Key actions (alias: kept/minted/...).")
    models: list[ModelSection] = Field(default_factory=list)
    spend: list[SpendLine] = Field(default_factory=list)
    idle: list[IdleLine] = Field(default_factory=list, description="Idle models reclaimed or left serving.")
    final_state: dict[str, int] = Field(default_factory=dict, description="Replicas per Deployment at the end.")
    notes: list[str] = Field(default_factory=list)

    current_step: str = Field("start", exclude=True, description="The last step begun that is not a clean-up.")

    def step(self, text: str, *, cleanup: bool = False) -> None:
        """Record a step. Clean-up steps (run in a ``finally`` after a failure) do not become the step a
        failure is reported at."""
        elapsed = time.monotonic() - self.started_monotonic
        self.steps.append(f"+{elapsed:6.1f}s {text}")
        if not cleanup:
            self.current_step = text

    def section(self, model: str) -> ModelSection:
        for s in self.models:
            if s.model == model:
                return s
        sec = ModelSection(model=model)
        self.models.append(sec)
        return sec

    def finish(self, outcome: str) -> None:
        self.outcome = outcome
        self.wall_s = round(time.monotonic() - self.started_monotonic, 2)

    @property
    def all_smokes_ok(self) -> bool:
        return all(s.ok for m in self.models for s in m.smokes)

    def to_markdown(self) -> str:
        out = [f"# {self.flow}: {self.outcome}", "", f"Started {self.started_at}; wall time {self.wall_s} s.", ""]
        for m in self.models:
            out.append(f"## {m.model}")
            if m.phases:
                out.append("| phase | seconds |")
                out.append("|---|---|")
                for name, secs in m.phases.items():
                    out.append(f"| {name} | {secs:.2f} |")
                out.append("")
                extra = " (a GPU node was provisioned)" if m.scale_up_seen else ""
                if m.ready_s is not None:
                    out.append(f"Ready after {m.ready_s:.2f} s{extra}.")
            if m.ttft_ms is not None:
                out.append(f"Time to first token: {m.ttft_ms:.0f} ms.")
            if m.smokes:
                out.append("")
                out.append("| check | result | detail |")
                out.append("|---|---|---|")
                for s in m.smokes:
                    out.append(f"| {s.check} | {'pass' if s.ok else 'FAIL'} | {s.detail.replace('|', '/')} |")
            out.append("")
        if self.key_actions:
            out += ["## Keys", *[f"- {k}" for k in self.key_actions], ""]
        if self.spend:
            out += [
                "## Spend per key",
                "",
                "| key | spend (USD) | budget | used | models | note |",
                "|---|---|---|---|---|---|",
            ]
            for line in self.spend:
                used = f"{line.share_used:.4%}" if line.share_used is not None else "-"
                budget = line.max_budget if line.max_budget is not None else "-"
                out.append(
                    f"| {line.alias} | {line.spend:.6f} | {budget} | {used} | {', '.join(line.models)} | {line.note} |"
                )
            out.append("")
        if self.idle:
            out += ["## Idle models", "", "| model | action | why | at | bring it back |", "|---|---|---|---|---|"]
            for i in self.idle:
                out.append(
                    f"| {i.model} | {i.action} | {i.reason.replace('|', '/')} | {i.at or '-'} | {i.bring_back or '-'} |"
                )
            out.append("")
        if self.final_state:
            out += ["## Final state", "", "| deployment | replicas |", "|---|---|"]
            out += [f"| {k} | {v} |" for k, v in self.final_state.items()]
            out.append("")
        if self.steps:
            out += ["## Steps", "", "```", *self.steps, "```", ""]
        if self.notes:
            out += ["## Notes", *[f"- {n}" for n in self.notes], ""]
        return "\n".join(out)
