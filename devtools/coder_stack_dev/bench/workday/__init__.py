"""The workday scenario: what one day of use costs in billed GPU-node hours and cold-start waits, per policy.

One day (:func:`workday_trace`; or a trace file, :func:`read_trace`): users' requests to coder-chat 09:00-12:00
and 13:30-17:30 with gaps and a lunch break, and a validate run (take_over, agent stage) started 09:40 and
killed at 10:00 with coder-agent serving and the GPU slot held. Each policy's day runs twice: in :class:`Day`,
an event-driven replay in simulated time (milliseconds; the table's numbers), and, in the full run, in
:class:`SimDay` on the real simulated cluster (time-scaled; the table's "sim" columns), which checks the
replay (the wake policy's rows too: :class:`SimDay` inherits the wake from :class:`Day`).

What the project's own code and numbers decide (in both):

- the GPU node: it bills from the autoscaler's TriggeredScaleUp (the VM is created when provisioning
  starts) until the autoscaler removes it ``scale_down_unneeded_s`` after its last GPU pod is gone (a real
  cluster-autoscaler: 10 min unneeded); a pod waits ``node_provision_s`` for a new node, pulls the vLLM image
  once per node, finds its weights on the model-cache PVC and starts (``devtools/simstack/timings.py``). The replay
  models these steps with those durations; :class:`SimDay` and :func:`sim_check` run ``SimStack``'s own
  deployment controller, scheduler, kubelet and cluster-autoscaler;
- the idle decision: at every reclaim tick the replay renders the stand-in vLLM's ``/metrics``
  (``devtools/simstack/standins/vllm/metrics.py: Metrics``, whose counters the trace's requests move), parses it with
  ``coder_stack/vllm/metrics.py`` (``parse_exposition``, ``activity_of``) and judges it with ``judge`` and the
  spec's ``idle_after_s`` / ``idle_grace_s``, keeping the reading between ticks as the annotation string
  ``read_idleness`` keeps; :class:`SimDay` calls ``coder_stack/usecases/idle.py: read_idleness`` itself
  through the Kubernetes API against the stand-in pod;
- the schedules: the morning bring-up, the evening teardown and the reclaim cadence are read from
  ``prefect.yaml``; a killed run's slot is held until its lease (``coder_stack/orchestration/gpu_limit.py:
  LEASE_SECONDS``) expires, and reclaim changes nothing while another run holds the slot
  (``flows/reclaim.py``).

What is modelled (no Prefect server or flow runs; the same in both):

- the GPU slot (tag:gpu, limit 1) is a variable: taken by the bring-up, ``coder-stack up`` and the validate
  run, released when they end; the killed run's lease is taken to expire the full ``LEASE_SECONDS`` after
  the kill (an upper bound: Prefect renews it before it runs out);
- the flows' own durations are 0 in the replay (a flow's API calls take seconds, the cluster's waits
  minutes); in :class:`SimDay` the driver's calls take wall time, which counts as simulated time;
- without wake, a request that finds its model not serving fails (counted), and a person brings the model
  back at that first failure (``Policy.react_s``, 0 by default; None: nobody, until a schedule does): by hand
  the engineer swaps it back with kubectl, with the flows ``coder-stack up`` (bring_up: waits for the GPU slot,
  frees the GPU, scales the model up, smokes it). Every request until it is Ready fails too. Nobody's
  reaction time is counted, so the outages are lower bounds;
- with wake (``Policy.wake``), the request waits (delayed, counted with its wait) and the first one of an
  outage wakes the model: ``wake_latency_s`` later (event -> trigger -> worker -> flow start) the wake flow
  takes the GPU slot and scales it up; while another model is scaled up it waits, without evicting it, until
  reclaim takes that one away (idle ``idle_after_s``); the hook's burst de-duplication is modelled as one wake
  per outage;
- the model-cache PVC already holds every model's weights (a workday after the first);
- the crash clean-up (flows/cleanup.py) scales a killed run's models to 0 and frees its slot
  ``crash_cleanup_s`` after the kill: by default the clean-up's bound (120 s), not its measurement (the crash
  group measures it: ~75 s); it does not bring back what the killed run had taken over;
- requests are instantaneous (nothing is running or waiting at a reclaim tick).

A team using chat and completion all day (issue 20; :func:`team_trace`, ``team.trace.csv``) is replayed under
:func:`team_policies`: exclusive (one model on the GPU at a time, as above) and shared (``Policy.shared``: the
models run on one time-sliced GPU together when ``StackSpec.shares_fit`` says they fit, each server starting
once the one before is Ready; a spec where they do not fit is refused, :class:`SharingRefused`). Replay only:
the flows that would share the GPU are not built yet, so :class:`SimDay` does not run these rows.

The modules, each importing only those above it: ``schedules`` (the clock, prefect.yaml's crons), ``trace``,
``policy``, ``result``, ``day`` (the replay, :class:`Day`), ``simday`` (:class:`SimDay`), ``check``
(:func:`sim_check`), ``scenario`` (:func:`workday`: every policy's day, priced) and ``report`` (the table the
benchmark prints). No module shares a name with a function the package exports.
"""

from coder_stack_dev.bench.workday.check import modelled_durations, sim_check
from coder_stack_dev.bench.workday.day import AGENT, CHAT, Day, SharingRefused, replay
from coder_stack_dev.bench.workday.policy import (
    TEAM_MODELS,
    WAKE_LATENCY_S,
    Policy,
    policies,
    team_policies,
    wake_policies,
)
from coder_stack_dev.bench.workday.report import table
from coder_stack_dev.bench.workday.result import WORKDAYS_PER_MONTH, Result
from coder_stack_dev.bench.workday.scenario import (
    NODE_PRICE_PER_HOUR,
    NODE_PRICE_SOURCE,
    TEAM_SHARES,
    team_spec,
    team_workday,
    workday,
)
from coder_stack_dev.bench.workday.schedules import HOUR, MINUTE, PREFECT_YAML, Schedules, at, hm, read_schedules
from coder_stack_dev.bench.workday.simday import SimDay, sim_day
from coder_stack_dev.bench.workday.trace import (
    TEAM_TRACE_FILE,
    WORKDAY_TRACE_FILE,
    Trace,
    TraceError,
    parse_trace,
    read_trace,
    short_trace,
    team_trace,
    trace_lines,
    workday_trace,
)

__all__ = [
    "AGENT",
    "CHAT",
    "HOUR",
    "MINUTE",
    "NODE_PRICE_PER_HOUR",
    "NODE_PRICE_SOURCE",
    "PREFECT_YAML",
    "TEAM_MODELS",
    "TEAM_SHARES",
    "TEAM_TRACE_FILE",
    "WAKE_LATENCY_S",
    "WORKDAYS_PER_MONTH",
    "WORKDAY_TRACE_FILE",
    "Day",
    "Policy",
    "Result",
    "Schedules",
    "SharingRefused",
    "SimDay",
    "Trace",
    "TraceError",
    "at",
    "hm",
    "modelled_durations",
    "parse_trace",
    "policies",
    "read_schedules",
    "read_trace",
    "replay",
    "short_trace",
    "sim_check",
    "sim_day",
    "table",
    "team_policies",
    "team_spec",
    "team_trace",
    "team_workday",
    "trace_lines",
    "wake_policies",
    "workday",
    "workday_trace",
]
