"""What one policy's day came to: billed node time, cold starts and waits, reclaims, the killed run's trail."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
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
    wait_s: float  # sum over outages: Ready (or the end) - the first request that found the model not serving
    request_wait_s: float  # sum over the delayed requests (wake) of their wait; a failed request does not wait
    reclaims: list[dict[str, str]]
    killed: dict[str, Any]
    events: list[tuple[float, str]]
    failed_requests: int = 0  # without wake: requests that found their model not serving (an error to the user)
    delayed_requests: int = 0  # with wake: requests that waited out a wake and its cold start
    delays_s: list[float] = field(default_factory=list)  # each delayed request's wait
    wakes: list[dict[str, Any]] = field(default_factory=list)  # the wakes (one per outage of a model)
    failed_by_model: dict[str, int] = field(default_factory=dict)  # failed_requests per model
    delayed_by_model: dict[str, int] = field(default_factory=dict)  # delayed_requests per model
    delays_by_model: dict[str, list[float]] = field(default_factory=dict)  # delays_s per model

    @property
    def node_hours(self) -> float:
        return self.node_seconds / HOUR

    def as_dict(self, price: float) -> dict[str, Any]:
        d = asdict(self)
        d.pop("events")
        d["events"] = [f"{hm(t)} {what}" for t, what in self.events]
        d["node_hours"] = round(self.node_hours, 3)
        d["wait_min"] = round(self.wait_s / MINUTE, 1)
        d.pop("delays_s")
        d.pop("delays_by_model")
        d["delay_by_model_p50_max_min"] = {
            m: [round(statistics.median(v) / MINUTE, 1), round(max(v) / MINUTE, 1)] if v else None
            for m, v in self.delays_by_model.items()
        }
        d["delay_p50_min"] = round(statistics.median(self.delays_s) / MINUTE, 1) if self.delays_s else None
        d["delay_max_min"] = round(max(self.delays_s) / MINUTE, 1) if self.delays_s else None
        d["cost_per_day"] = round(self.node_hours * price, 2)
        d["cost_per_month"] = round(self.node_hours * price * WORKDAYS_PER_MONTH, 2)
        return d
