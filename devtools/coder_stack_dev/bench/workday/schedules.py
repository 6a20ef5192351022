"""The clock of the workday (seconds since midnight) and the three scheduled deployments' crons from
``prefect.yaml`` in the checkout: the morning bring-up, the evening teardown, the reclaim cadence."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from coder_stack_dev import CHECKOUT

HOUR = 3600.0
MINUTE = 60.0
PREFECT_YAML = CHECKOUT / "prefect.yaml"


def hm(s: float) -> str:
    """Seconds since midnight as HH:MM (HH:MM:SS when not on a minute)."""
    h, rest = divmod(round(s), 3600)
    m, sec = divmod(rest, 60)
    return f"{h:02d}:{m:02d}" + (f":{sec:02d}" if sec else "")


def at(clock: str) -> float:
    h, m = clock.split(":")
    return int(h) * HOUR + int(m) * MINUTE


@dataclass(frozen=True)
class Schedules:
    bring_up_s: float  # morning-bring-up
    teardown_s: float  # evening-teardown
    reclaim_every_s: float  # reclaim-idle-models


def _cron_time(cron: str) -> float:
    minute, hour = cron.split()[:2]
    return int(hour) * HOUR + int(minute) * MINUTE


def _cron_every(cron: str) -> float:
    minute, hour = cron.split()[:2]
    if not minute.startswith("*/") or hour != "*":
        raise ValueError(f"not an every-N-minutes cron: {cron!r}")
    return int(minute[2:]) * MINUTE


def read_schedules(path: Path = PREFECT_YAML) -> Schedules:
    """The three scheduled deployments' crons (local time) from prefect.yaml."""
    doc = yaml.safe_load(path.read_text())
    crons = {d["name"]: d["schedules"][0]["cron"] for d in doc["deployments"] if d.get("schedules")}
    return Schedules(
        bring_up_s=_cron_time(crons["morning-bring-up"]),
        teardown_s=_cron_time(crons["evening-teardown"]),
        reclaim_every_s=_cron_every(crons["reclaim-idle-models"]),
    )
