"""The faults a test injects per Deployment (``SimStack(faults=...)``, ``set_fault``, ``coder-stack sim
--fault``), checked in one place, and the effects that depend on the fault alone: the selector that
makes a pod unschedulable, the node provisioning delay, the crash a container makes. The kubelet plays
``imagepull`` itself (it walks the pull back-off).
"""

from __future__ import annotations

from simstack.cluster_objects import ACCEL_LABEL
from simstack.timings import Timings

FAULTS = ("crashloop", "imagepull", "oom", "unschedulable", "slow-node")


def check_fault(deployment: str, fault: str | None) -> None:
    """Raise ValueError unless ``fault`` is a known fault (or None/""/"none": no fault)."""
    if fault is not None and fault not in ("", "none") and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r} for {deployment}; known: {', '.join(FAULTS)}")


def scheduling_selector(fault: str | None) -> dict[str, str]:
    """The node selector a pod gets on top of its own: "unschedulable" asks for an accelerator no pool has."""
    return {ACCEL_LABEL: "nvidia-h100-80gb"} if fault == "unschedulable" else {}


def provision_delay(fault: str | None, t: Timings) -> float:
    """Simulated seconds until a GPU node the autoscaler adds for the pod arrives."""
    return t.slow_node_provision_s if fault == "slow-node" else t.node_provision_s


def injected_crash(fault: str | None, t: Timings) -> tuple[float, str, int] | None:
    """(seconds after start, reason, exit code) of the crash a fault makes, or None."""
    if fault == "crashloop":
        return (t.crash_after_s, "Error", 1)
    if fault == "oom":
        return (0.0, "OOMKilled", 137)
    return None
