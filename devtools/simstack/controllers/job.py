"""The Job controller (batch/v1, pkg/controller/job): one pod at a time from the Job's template (labels
``job-name``/``controller-uid`` and their ``batch.kubernetes.io/`` forms, a controller ownerReference),
replacement pods after a failure with the controller's back-off until ``backoffLimit`` failures are exceeded,
the status the real controller writes (``startTime``, ``active``/``ready``/``succeeded``/``failed``/
``terminating``, conditions ``SuccessCriteriaMet``+``Complete`` or ``FailureTarget``+``Failed``,
``completionTime``), events (``SuccessfulCreate``, ``FailedCreate``, ``Completed``, ``BackoffLimitExceeded``),
``ttlSecondsAfterFinished`` (the TTL-after-finished controller) and garbage collection of a deleted Job's pods.

Only ``parallelism``/``completions`` of 1 (what the Prefect Kubernetes worker creates) are imitated.
GUESS: more are run one pod after another (a real controller runs ``parallelism`` pods at once).
"""

from __future__ import annotations

import time

from simstack.controllers.context import ClusterContext
from simstack.controllers.loop import Loop, log
from simstack.controllers.objects import condition, pod_from_template
from simstack.pods import pod_is_ready
from simstack.store import Obj, Store, StoreError, now_rfc3339

# pkg/controller/job: DefaultJobPodFailureBackOff 10 s, doubled per failure, MaxJobPodFailureBackOff 10 min.
BACKOFF_INITIAL_S = 10.0
BACKOFF_MAX_S = 600.0


def _finished(job: Obj) -> str | None:
    for ctype in ("Complete", "Failed"):
        c = condition(job, ctype)
        if c is not None and c.get("status") == "True":
            return ctype
    return None


def _condition(ctype: str, reason: str, message: str) -> Obj:
    now = now_rfc3339()
    return {
        "type": ctype,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": now,
        "lastTransitionTime": now,
    }


class JobController:
    """batch/v1 Jobs: pods from the template, status, back-off, TTL after finishing."""

    def __init__(self, cluster: ClusterContext) -> None:
        self.c = cluster
        self.loop = Loop("jobs", self.reconcile)
        # pods already counted per Job (the real controller tracks them with a finalizer): uid -> result
        self._counted: dict[str, dict[str, str]] = {}
        self._next_pod_at: dict[str, float] = {}  # Job uid -> monotonic time the back-off allows a new pod
        self._finished_at: dict[str, float] = {}  # Job uid -> monotonic time it finished (for the TTL)

    @property
    def store(self) -> Store:
        return self.c.store

    def reconcile(self) -> None:
        jobs = self.store.list("jobs")
        uids = {j["metadata"]["uid"] for j in jobs}
        for job in jobs:
            try:
                self._sync(job)
            except StoreError as e:
                log.debug("job sync %s: %s", job["metadata"]["name"], e)
                self.loop.kick_later(0.01)
        for uid in [u for u in self._counted if u not in uids]:
            self._counted.pop(uid, None)
            self._next_pod_at.pop(uid, None)
            self._finished_at.pop(uid, None)
        # garbage collection (background propagation): the pods of a Job that is gone
        for ns, name, _uid, owner, deleting in self.store.ownership("pods", owner_kind="Job"):
            if owner and owner not in uids and not deleting:
                pod = self.store.find("pods", ns, name)
                if pod is not None:
                    grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
                    self.store.mark_deleting("pods", ns, name, grace)

    def _sync(self, job: Obj) -> None:
        meta, spec = job["metadata"], job["spec"]
        uid = meta["uid"]
        if meta.get("deletionTimestamp"):
            return
        status = dict(job.get("status") or {})
        done = _finished(job)
        if done is not None:
            self._expire(job)
            return
        if spec.get("suspend"):
            return
        pods = self.store.list("pods", meta["namespace"], owners={uid})
        counted = self._counted.setdefault(uid, {})
        for p in pods:
            phase = (p.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed") and p["metadata"]["uid"] not in counted:
                counted[p["metadata"]["uid"]] = phase
                if phase == "Failed":
                    n = sum(1 for v in counted.values() if v == "Failed")
                    backoff = min(BACKOFF_INITIAL_S * 2 ** (n - 1), BACKOFF_MAX_S)
                    self._next_pod_at[uid] = time.monotonic() + self.c.scaled(backoff)
        succeeded = int(status.get("succeeded") or 0)
        failed = int(status.get("failed") or 0)
        succeeded = max(succeeded, sum(1 for v in counted.values() if v == "Succeeded"))
        failed = max(failed, sum(1 for v in counted.values() if v == "Failed"))
        live = [p for p in pods if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
        active = [p for p in live if not p["metadata"].get("deletionTimestamp")]
        terminating = [p for p in live if p["metadata"].get("deletionTimestamp")]
        status.setdefault("startTime", now_rfc3339())
        conditions = list(status.get("conditions") or [])
        completions = int(spec.get("completions") or 1)
        # GUESS: the interim conditions SuccessCriteriaMet / FailureTarget before Complete / Failed, as the
        # controller of Kubernetes 1.31+ writes them (the sim reports 1.32); not checked against a real cluster.
        if succeeded >= completions:
            conditions += [
                _condition("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods"),
                _condition("Complete", "CompletionsReached", "Reached expected number of succeeded pods"),
            ]
            status["completionTime"] = now_rfc3339()
            self.c.events.emit(job, "Completed", "Job completed", component="job-controller")
        elif failed > int(spec.get("backoffLimit", 6)):
            message = "Job has reached the specified backoff limit"
            conditions += [
                _condition("FailureTarget", "BackoffLimitExceeded", message),
                _condition("Failed", "BackoffLimitExceeded", message),
            ]
            self.c.events.emit(job, "BackoffLimitExceeded", message, "Warning", component="job-controller")
            for p in active:
                grace = int(p["spec"].get("terminationGracePeriodSeconds", 30))
                self.store.mark_deleting("pods", p["metadata"]["namespace"], p["metadata"]["name"], grace)
            active = []
        elif not live:
            wait = self._next_pod_at.get(uid, 0.0) - time.monotonic()
            if wait > 0:
                self.loop.kick_later(wait)
            elif (pod := self._create_pod(job)) is not None:
                active = [pod]
        status.update(
            active=len(active),
            ready=sum(1 for p in active if pod_is_ready(p)),
            succeeded=succeeded,
            failed=failed,
            terminating=len(terminating),
            uncountedTerminatedPods={},
            conditions=conditions,
        )
        for key in ("active", "succeeded", "failed"):  # the real status omits zero counts
            if not status[key]:
                del status[key]
        if not status["conditions"]:
            del status["conditions"]
        if status != (job.get("status") or {}):
            job["status"] = status
            self.store.update("jobs", job, status_only=True)
        if _finished(job) is not None:
            self._expire(job)

    def _create_pod(self, job: Obj) -> Obj | None:
        meta = job["metadata"]
        pod = pod_from_template(job, job["spec"]["template"], restart_policy="Never")
        sa = pod["spec"].get("serviceAccountName") or "default"
        if sa != "default" and self.store.find("serviceaccounts", meta["namespace"], sa) is None:
            # the ServiceAccount admission plugin refuses the pod; the controller retries with back-off
            why = (
                f'pods "{pod["metadata"]["name"]}" is forbidden: error looking up service account '
                f'{meta["namespace"]}/{sa}: serviceaccount "{sa}" not found'
            )
            self.c.events.emit(job, "FailedCreate", f"Error creating: {why}", "Warning", component="job-controller")
            self.loop.kick_later(self.c.scaled(BACKOFF_INITIAL_S))
            return None
        created = self.store.create("pods", pod)
        self.c.events.emit(
            job, "SuccessfulCreate", f"Created pod: {created['metadata']['name']}", component="job-controller"
        )
        return created

    def _expire(self, job: Obj) -> None:
        """The TTL-after-finished controller: delete a finished Job ``ttlSecondsAfterFinished`` later."""
        ttl = job["spec"].get("ttlSecondsAfterFinished")
        if ttl is None:
            return
        uid = job["metadata"]["uid"]
        finished = self._finished_at.setdefault(uid, time.monotonic())
        left = finished + self.c.scaled(float(ttl)) - time.monotonic()
        if left > 0:
            self.loop.kick_later(left)
            return
        self.store.delete("jobs", job["metadata"]["namespace"], job["metadata"]["name"])
        self.loop.kick()  # its pods are collected on the next pass
