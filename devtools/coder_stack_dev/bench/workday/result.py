"""What one policy's day came to: billed node time, cold starts and waits, reclaims, the killed run's trail."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from coder_stack_dev.bench.workday.schedules import HOUR, MINUTE, hm

WORKDAYS_PER_MONTH = 21


@dataclass
class Result:
    policy: str
    label: str
    node_seconds: float
    nodes: list[dict[str, str]]
    cold_starts: list[dict[str, Any]]
    wait_s: float  # sum over bring-backs: Ready - the first waiting request's arrival
    request_wait_s: float  # sum over every request of its wait
    reclaims: list[dict[str, str]]
    killed: dict[str, Any]
    events: list[tuple[float, str]]

    @property
    def node_hours(self) -> float:
        return self.node_seconds / HOUR

    def as_dict(self, price: float) -> dict[str, Any]:
        d = asdict(self)
        d.pop("events")
        d["events"] = [f"{hm(t)} {what}" for t, what in self.events]
        d["node_hours"] = round(self.node_hours, 3)
        d["wait_min"] = round(self.wait_s / MINUTE, 1)
        d["cost_per_day"] = round(self.node_hours * price, 2)
        d["cost_per_month"] = round(self.node_hours * price * WORKDAYS_PER_MONTH, 2)
        return d
