"""The reconcile decision as one pure function: the job and its pods in, the new status and actions out.

Phase is always the job's current state; conditions keep the history of each state with reasons.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from finetune_operator.api import (
    FINISHED_PHASES,
    MUTABLE_SPEC_FIELDS,
    CheckpointStatus,
    Condition,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    OutputsStatus,
    Phase,
    Progress,
    RestartRecord,
    WorkersStatus,
)
from finetune_operator.builders import (
    EPHEMERAL_STORAGE_REASON,
    FAILURE_CONFIG_MAP_NAME,
    LABEL_ATTEMPT,
    LABEL_RANK,
    TRAINER_CONTAINER,
    SpecProblem,
    check_runnable,
    spec_fields,
    storage_notice,
)
from finetune_trainer.contract import (
    ADAPTER_DIR,
    BEST_ADAPTER_DIR,
    Activity,
    ExitCode,
    ProgressReport,
    restart_backoff,
)

RESTART_HISTORY_LENGTH = 10
MESSAGE_LIMIT = 400

# Reasons, stable for automation (kubectl wait --for=condition=..., alerts).
REASON_CREATED = "GangCreated"
REASON_RUNNING = "AllWorkersRunning"
REASON_RESTARTING = "WorkerFailed"
REASON_SUCCEEDED = "AllWorkersSucceeded"
REASON_PERMANENT_ERROR = "PermanentError"
REASON_RESTART_LIMIT = "RestartLimitExceeded"
REASON_DEADLINE = "DeadlineExceeded"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_SUSPENDED = "Suspended"
REASON_RESUMED = "Resumed"
REASON_EDIT_REFUSED = "SpecEditRefused"
REASON_EDIT_ACCEPTED = "SpecEditAccepted"
REASON_UNSCHEDULABLE = "Unschedulable"
REASON_CONTAINER_CREATING = "ContainerCreating"
REASON_STARTUP_TIMEOUT = "StartupTimeout"
REASON_TERMINATING = "PodStuckTerminating"
REASON_FINALIZER = "PodHeldByFinalizer"
REASON_FORCE_DELETED = "ForceDeleted"
REASON_FOREIGN_POD = "PodNotOwned"
REASON_PREDECESSOR = "WaitingForPredecessor"
REASON_UNBLOCKED = "Unblocked"
REASON_DISRUPTED = "WorkerDisrupted"
REASON_DISRUPTION_LIMIT = "DisruptionLimitExceeded"
REASON_STALLED = "Stalled"
REASON_RESTARTED_IN_PLACE = "RestartedInPlace"
REASON_STARTUP_LIMIT = "StartupRetriesExceeded"
REASON_GATED = "SchedulingGated"  # the pods' PodScheduled reason while a queue (Kueue) holds their gates
REASON_FORBIDDEN = "Forbidden"  # the API server's reason for a 403 (quota, admission), kept while workers are missing

# The condition each phase sets True; Pending's is "Created".
PHASE_CONDITION = {
    Phase.pending.value: "Created",
    Phase.queued.value: "Queued",
    Phase.running.value: "Running",
    Phase.restarting.value: "Restarting",
    Phase.suspended.value: "Suspended",
    Phase.succeeded.value: "Succeeded",
    Phase.failed.value: "Failed",
}
# Conditions that stop being true when the job moves on.
TRANSIENT_CONDITIONS = ("Queued", "Running", "Restarting", "Suspended")
READY = "Ready"
BLOCKED, EDIT_REFUSED = "Blocked", "EditRefused"
# Container waiting reasons that need a person: shown in the Blocked condition, in any phase.
STUCK_WAITING_REASONS = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
}
# A pod still creating its container this long after it was bound to a node is reported (volumes, image size).
CONTAINER_CREATING_REPORT_SECONDS = 120
# A pod still there this long past its deletionTimestamp (the end of its grace period) is force-deleted.
TERMINATING_MARGIN_SECONDS = 30

# The kinds of gang restart (the restart record's kind): a crash (the gang made again), an in-place restart (the
# pods' agents restarted their processes; the operator only counts it) and a stall spend maxRestarts, a disruption
# spends maxDisruptions.
CRASH, IN_PLACE, STALL, DISRUPTION = "Crash", "InPlace", "Stall", "Disruption"
# Pod conditions with which Kubernetes (DisruptionTarget, 1.26+) and Kueue (TerminationTarget) mark a pod they
# are about to take away; and the pod status reasons the kubelet and node controller leave on a pod they took.
# In a pod's view: deleted, and kept as the watch's deletion event left it for the disruption it shows
# (informer keep_deleted); a pass reads its failure once, and it blocks no new gang.
DEPARTED = "departed"
DISRUPTION_CONDITIONS = ("DisruptionTarget", "TerminationTarget")
DISRUPTED_POD_REASONS = {
    "Evicted": "the kubelet's eviction (node pressure)",
    "NodeLost": "the node controller (node unreachable)",
    "Shutdown": "the node's shutdown",
    "Terminated": "the node's shutdown",
    "Preempting": "the kubelet's preemption of a critical pod",
}
# Who took the worker, by the disruption condition's reason.
TAKEN_BY = {
    "PreemptionByScheduler": "the scheduler's preemption",
    "PreemptionByKubeScheduler": "the scheduler's preemption",
    "EvictionByEvictionAPI": "an eviction (drain, autoscaler consolidation)",
    "DeletionByTaintManager": "its node's NoExecute taint (node NotReady or unreachable past the tolerations)",
    "DeletionByPodGC": "pod garbage collection (its node is gone)",
    "TerminationByKubelet": "the kubelet (node pressure or shutdown)",
    "StoppedByKueue": "Kueue's preemption",
}


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)  # any RFC 3339 offset


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Decision:
    status: FineTuneJobStatus
    spec: FineTuneJobSpec | None = None  # the spec acted on: the accepted one (see the spec-edit policy)
    events: list[Event] = field(default_factory=list)
    create_missing_workers: list[int] = field(default_factory=list)
    delete_workers: list[str] = field(default_factory=list)
    force_delete_workers: list[str] = field(default_factory=list)  # stuck Terminating past grace + margin
    delete_job: bool = False
    requeue_after: float | None = None
    blocked: tuple[str, str] | None = None  # (reason, message) for the Blocked condition, set by this pass
    # By pod, the whole termination messages of the failed workers of a gang about to be deleted, kept in the
    # job's failure ConfigMap before the pods go (their logs go with them).
    failure_output: dict[str, str] = field(default_factory=dict)

    def requeue(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


@dataclass(frozen=True)
class WorkerFailure:
    pod: str
    rank: int
    reason: str
    exit_code: int | None
    message: str | None
    node: str | None
    finished_at: str | None
    taken_by: str | None = None  # set for a disruption: who took the worker

    @property
    def permanent(self) -> bool:
        return self.exit_code == ExitCode.PERMANENT and self.taken_by is None

    def describe(self) -> str:
        where = f" on node {self.node}" if self.node else ""
        detail = f": {self.message}" if self.message else ""
        if self.reason == REASON_STALLED:
            return f"the gang stalled: {self.message}"
        if self.taken_by is not None:
            return f"worker {self.pod} was taken by {self.taken_by} ({self.reason}){where}{detail}"
        code = f"exit code {self.exit_code}, " if self.exit_code is not None else ""
        return f"worker {self.pod} failed ({code}{self.reason}){where}{detail}"


@dataclass(frozen=True)
class GangObservation:
    """What the pods labelled with the job's name say about the current attempt."""

    pods_by_rank: dict[int, dict[str, Any]]
    stale_pods: list[dict[str, Any]]  # the job's own pods of earlier attempts
    foreign_pods: list[dict[str, Any]]  # pods with the job's name but another owner (a deleted predecessor)
    failures: list[WorkerFailure]
    ready: int
    succeeded: int
    bound: int  # pods of the attempt bound to a node: they hold its resources
    waiting_problem: tuple[str, str] | None  # (reason, message): image pull errors, stuck ContainerCreating
    unschedulable: str | None  # the scheduler's message for a pod it cannot place
    unschedulable_ranks: frozenset[int]
    first_bound: datetime | None  # when the attempt's first pod was bound to a node
    pulling: bool = False  # a bound pod still creating its container: an image pull (or volume) under way
    all_started: datetime | None = None  # when the last of the attempt's containers started (every pod pulled)
    gated: bool = False  # a pod held by scheduling gates (Kueue has not admitted the gang)

    @property
    def blocking_pods(self) -> list[dict[str, Any]]:
        """Pods that hold names the next gang needs."""
        return self.stale_pods + self.foreign_pods


def _name(pod: dict[str, Any]) -> str:
    return pod["metadata"]["name"]


def controller_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    refs = obj["metadata"].get("ownerReferences") or []
    return next((ref for ref in refs if ref.get("controller")), None)


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    return (controller_of(obj) or {}).get("uid") == uid


def _trainer_state(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == TRAINER_CONTAINER:
            return status
    return statuses[0] if statuses else {}


def _trainer_terminated(pod: dict[str, Any]) -> dict[str, Any]:
    return (_trainer_state(pod).get("state") or {}).get("terminated") or {}


def _trainer_succeeded(pod: dict[str, Any]) -> bool:
    """The worker is done: its pod succeeded, or its trainer exited 0 while a sidecar still runs."""
    return pod.get("status", {}).get("phase") == "Succeeded" or _trainer_terminated(pod).get("exitCode") == 0


def _shorten(text: str | None) -> str | None:
    if not text:
        return None
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_LIMIT else "..." + text[-MESSAGE_LIMIT:]


FAILURE_OUTPUTS_KEPT = 32


def failure_output(gang: GangObservation) -> dict[str, str]:
    """By pod, what each failed worker of the attempt left as its termination message, whole: its own last
    words (the trainer's), else the kubelet's tail of its log (FallbackToLogsOnError: up to 80 lines)."""
    outputs = {}
    for _, pod in sorted(gang.pods_by_rank.items()):
        terminated = _trainer_terminated(pod)
        if terminated.get("exitCode") not in (None, 0) and terminated.get("message"):
            outputs[_name(pod)] = terminated["message"]
    # A kubelet keeps 4 KiB of each: the first 32 ranks' stay far inside a ConfigMap's 1 MiB.
    return dict(list(outputs.items())[:FAILURE_OUTPUTS_KEPT])


def worker_failure(pod: dict[str, Any]) -> WorkerFailure | None:
    """Why this worker fails its attempt, or None while it has not failed."""
    metadata, status = pod["metadata"], pod.get("status", {})
    container = _trainer_state(pod)
    terminated = (container.get("state") or {}).get("terminated") or {}
    rank = int(metadata["labels"][LABEL_RANK])
    node = pod.get("spec", {}).get("nodeName")

    def failure(reason: str, exit_code: int | None, message: str | None) -> WorkerFailure:
        return WorkerFailure(
            metadata["name"], rank, reason, exit_code, _shorten(message), node, terminated.get("finishedAt")
        )

    disruption = _disruption(pod)
    if disruption is not None:
        reason, message, since, taken_by = disruption
        return WorkerFailure(
            metadata["name"], rank, reason, terminated.get("exitCode"), _shorten(message), node, since, taken_by
        )
    # A sidecar that never exits keeps the pod Running: the trainer container's exit decides.
    trainer_failed = terminated.get("exitCode") not in (None, 0)
    if status.get("phase") == "Failed" or trainer_failed:
        return failure(
            terminated.get("reason") or status.get("reason") or "Error",
            terminated.get("exitCode"),
            terminated.get("message") or status.get("message"),
        )
    if metadata.get("deletionTimestamp") and not _trainer_succeeded(pod):
        return failure(
            "Deleted",
            terminated.get("exitCode"),
            "the pod was deleted while the gang was running, with no disruption condition (DisruptionTarget, "
            "TerminationTarget): counted as a failure",
        )
    return None


def _rank(pod: dict[str, Any]) -> int:
    return int(pod["metadata"]["labels"][LABEL_RANK])


def _of_attempt(pod: dict[str, Any], job_uid: str, attempt: int) -> bool:
    return _owned_by(pod, job_uid) and pod["metadata"].get("labels", {}).get(LABEL_ATTEMPT) == str(attempt)


def taken_by_disruption(pod: dict[str, Any]) -> bool:
    """A worker the cluster took (preemption, eviction, a lost node) before its trainer finished: once deleted,
    its last state still tells the pass that this is a disruption, not a crash (informer keep_deleted)."""
    return _disruption(pod) is not None and pod.get("status", {}).get("phase") != "Succeeded"


def _disruption(pod: dict[str, Any]) -> tuple[str, str | None, str | None, str] | None:
    """(reason, message, since, who) when the pod was taken from the gang rather than failed in it."""
    status = pod.get("status", {})
    for condition in status.get("conditions") or []:
        if condition.get("type") in DISRUPTION_CONDITIONS and condition.get("status") == "True":
            reason = condition.get("reason") or condition["type"]
            who = TAKEN_BY.get(reason, f"a disruption ({condition['type']})")
            message = f"{condition['type']} {reason}" + (
                f": {condition['message']}" if condition.get("message") else ""
            )
            return reason, message, condition.get("lastTransitionTime"), who
    reason = status.get("reason")
    if reason in DISRUPTED_POD_REASONS and (
        status.get("phase") == "Failed" or pod["metadata"].get("deletionTimestamp")
    ):
        since = pod["metadata"].get("deletionTimestamp") or _trainer_terminated(pod).get("finishedAt")
        return reason, status.get("message"), since, DISRUPTED_POD_REASONS[reason]
    return None


def _is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _scheduled(pod: dict[str, Any]) -> dict[str, Any]:
    conditions = pod.get("status", {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "PodScheduled"), {})


def _bound_since(pod: dict[str, Any]) -> datetime | None:
    """When the pod was bound to a node: its PodScheduled transition, else its creation."""
    if not pod.get("spec", {}).get("nodeName"):
        return None
    stamp = _scheduled(pod).get("lastTransitionTime") or pod["metadata"].get("creationTimestamp")
    return parse_time(stamp) if stamp else None


def _unschedulable(pod: dict[str, Any]) -> str | None:
    scheduled = _scheduled(pod)
    if pod.get("spec", {}).get("nodeName") or pod.get("status", {}).get("phase", "Pending") != "Pending":
        return None
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return f"worker {_name(pod)}: {_shorten(scheduled.get('message')) or 'the scheduler cannot place it'}"
    return None


def _gated(pod: dict[str, Any]) -> bool:
    return bool(pod.get("spec", {}).get("schedulingGates")) or _scheduled(pod).get("reason") == REASON_GATED


def _creating(pod: dict[str, Any]) -> bool:
    """Bound, and its trainer container not created yet: the kubelet pulls the image (or mounts volumes)."""
    waiting = (_trainer_state(pod).get("state") or {}).get("waiting") or {}
    return bool(pod.get("spec", {}).get("nodeName")) and waiting.get("reason") == REASON_CONTAINER_CREATING


def _started_at(pod: dict[str, Any]) -> datetime | None:
    """When the pod's trainer container started (its image pulled), else when it was bound."""
    state = _trainer_state(pod).get("state") or {}
    stamp = (state.get("running") or state.get("terminated") or {}).get("startedAt")
    return parse_time(stamp) if stamp else _bound_since(pod)


def _waiting_problem(pod: dict[str, Any], now: datetime) -> tuple[str, str] | None:
    waiting = (_trainer_state(pod).get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason")
    detail = _shorten(waiting.get("message"))
    if reason in STUCK_WAITING_REASONS:
        return reason, f"worker {_name(pod)}: {reason}" + (f": {detail}" if detail else "")
    bound = _bound_since(pod)
    if reason == REASON_CONTAINER_CREATING and bound is not None:
        waited = (now - bound).total_seconds()
        if waited >= CONTAINER_CREATING_REPORT_SECONDS:
            node = pod["spec"]["nodeName"]
            return reason, (
                f"worker {_name(pod)} has been ContainerCreating on node {node} for {waited:.0f}s (pulling its "
                "image or mounting volumes; the startup timer starts once every worker's container has started)"
            )
    return None


def observe_gang(
    pods: list[dict[str, Any]], job_uid: str, attempt: int, workers: int, gang_was_running: bool, now: datetime
) -> GangObservation:
    departed = {_rank(p): p for p in pods if p.get(DEPARTED) and _of_attempt(p, job_uid, attempt)}
    pods = [p for p in pods if not p.get(DEPARTED)]  # gone: they block no new gang
    own = [p for p in pods if _owned_by(p, job_uid)]
    foreign = [p for p in pods if not _owned_by(p, job_uid)]
    current = [p for p in own if _of_attempt(p, job_uid, attempt)]
    stale = [p for p in own if p not in current]
    by_rank = {_rank(p): p for p in current}
    failures = [f for f in map(worker_failure, current) if f is not None]
    if gang_was_running:
        failures += [
            (worker_failure(departed[rank]) if rank in departed else None)
            or WorkerFailure(f"rank {rank}", rank, "Deleted", None, "the worker's pod is gone", None, None)
            for rank in range(workers)
            if rank not in by_rank
        ]
    # The first failure is the cause; later ones are usually the rest of the gang losing its peer (a disruption
    # counts from when its pod was marked). A permanent error wins: retrying cannot fix it.
    failures.sort(key=lambda f: (not f.permanent, f.finished_at or "9999", f.taken_by is None))
    problems = [problem for problem in (_waiting_problem(p, now) for p in current) if problem]
    unschedulable = [message for message in map(_unschedulable, current) if message]
    bound_times = [t for t in map(_bound_since, current) if t is not None]
    started = [t for t in map(_started_at, current) if t is not None]
    return GangObservation(
        pods_by_rank=by_rank,
        stale_pods=stale,
        foreign_pods=foreign,
        failures=failures,
        ready=sum(1 for p in current if _is_ready(p)),
        succeeded=sum(1 for p in current if _trainer_succeeded(p)),
        bound=sum(1 for p in current if p.get("spec", {}).get("nodeName")),
        waiting_problem=problems[0] if problems else None,
        unschedulable=unschedulable[0] if unschedulable else None,
        unschedulable_ranks=frozenset(rank for rank, pod in by_rank.items() if _unschedulable(pod)),
        first_bound=min(bound_times) if bound_times else None,
        pulling=any(map(_creating, current)),
        all_started=max(started) if len(started) == workers else None,
        gated=any(map(_gated, current)),
    )


def set_condition(status: FineTuneJobStatus, type_: str, value: bool, reason: str, message: str, now: str) -> bool:
    """Set a condition; True when its status or reason changed (what an Event is worth)."""
    text = "True" if value else "False"
    for condition in status.conditions:
        if condition.type == type_:
            changed = (condition.status, condition.reason) != (text, reason)
            if condition.status != text:
                condition.last_transition_time = now
            condition.status, condition.reason, condition.message = text, reason, message
            return changed
    status.conditions.append(
        Condition(type=type_, status=text, reason=reason, message=message, last_transition_time=now)
    )
    return True


def condition_is_true(status: FineTuneJobStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_ and c.status == "True"), None)


def _enter_phase(decision: Decision, phase: Phase, reason: str, message: str, now: datetime, warning: bool = False):
    status = decision.status
    stamp = rfc3339(now)
    changed = status.phase != phase.value
    status.phase = phase.value  # type: ignore[assignment]  # use_enum_values: the model holds the value
    condition_type = PHASE_CONDITION[phase.value]
    for transient in TRANSIENT_CONDITIONS:
        if transient != condition_type and condition_is_true(status, transient):
            set_condition(status, transient, False, reason, message, stamp)
    set_condition(status, condition_type, True, reason, message, stamp)
    if changed:
        decision.events.append(Event("Warning" if warning else "Normal", reason, message))
    if phase.value in FINISHED_PHASES:
        status.completion_time = status.completion_time or stamp


def has_persistent_storage(spec: FineTuneJobSpec) -> bool:
    """Whether checkpoints outlive the pods (else every gang restart starts the run over)."""
    return spec.storage.persistent_volume_claim is not None


def outputs_status(job: FineTuneJob, best_step: int | None) -> OutputsStatus:
    """Where the run's outputs land, in the words of the storage the job names."""
    storage = job.spec.storage
    keeps_best = job.spec.checkpoint.keep_best is not None
    claim = storage.persistent_volume_claim
    root = (storage.sub_path or job.name) if claim else None
    return OutputsStatus(
        claim_name=claim.claim_name if claim else None,
        sub_path=root,
        adapter="/".join(filter(None, [root, ADAPTER_DIR])),
        best_adapter="/".join(filter(None, [root, BEST_ADAPTER_DIR])) if keeps_best else None,
        best_step=best_step if keeps_best else None,
    )


def _advanced(previous: Progress | None, report: ProgressReport) -> bool:
    """Whether the report is progress: a new step or activity, or any new report outside training (liveness)."""
    if previous is None or (report.step, report.activity) != (previous.step, previous.activity):
        return True
    return report.activity not in (None, Activity.TRAINING) and report.time != previous.updated


def _of_another_attempt(status: FineTuneJobStatus, report: ProgressReport) -> bool:
    """Whether an earlier gang made the report (its checkpoint may be gone with it). Reports name their attempt;
    a spec.command script's may not, and then one older than the last restart is the old gang's."""
    if report.attempt is not None:
        return report.attempt != status.attempt
    return bool(status.restart_history) and parse_time(report.time) < parse_time(status.restart_history[-1].time)


def apply_progress(status: FineTuneJobStatus, report: ProgressReport | None, now: datetime) -> None:
    """Copy rank 0's progress report (progress.json, or the progress ConfigMap) into the status."""
    if report is None or _of_another_attempt(status, report):
        return
    previous = status.progress
    # The operator's clock, not the report's: a node's clock may be off, and the deadline is the operator's.
    advanced = rfc3339(now) if _advanced(previous, report) else (previous.advanced if previous else None)
    status.progress = Progress(
        step=report.step,
        total_steps=report.total_steps,
        loss=report.loss,
        tokens_per_second=report.tokens_per_second,
        eta_seconds=report.eta_seconds,
        eval_loss=report.eval_loss,
        eval_accuracy=report.eval_accuracy,
        updated=report.time,
        activity=report.activity,
        advanced=advanced,
    )
    if report.last_checkpoint_step is not None:
        status.last_checkpoint = CheckpointStatus(step=report.last_checkpoint_step, time=report.last_checkpoint_time)


def count_in_place_restarts(decision: Decision, job: FineTuneJob, report: ProgressReport | None, now: datetime) -> None:
    """Record each in-place restart of the current gang that rank 0's report names and the status lacks.

    The agents restart the processes themselves (within the restarts the pods were given); the operator only
    counts them, once each: by their number within the attempt, so a report read again counts nothing."""
    status, policy = decision.status, job.spec.restart_policy
    if report is None or report.attempt != status.attempt:
        return
    counted = max(
        (r.index or 0 for r in status.restart_history if r.kind == IN_PLACE and r.attempt == status.attempt),
        default=0,
    )
    new = sorted((r for r in report.in_place_restarts if r.index > counted), key=lambda r: r.index)
    for restart in new:
        step_reached = status.progress.step if status.progress and restart is new[0] else None
        resumed_from = status.last_checkpoint.step if status.last_checkpoint else 0  # the pods kept it
        failed_at = min(parse_time(restart.time), now)
        gpu_seconds_lost = round(
            _seconds_since_last_save(status, failed_at) * job.spec.workers * job.spec.gpus_per_worker
        )
        pod = restart.pod or "a worker"
        status.restart_history = [
            *status.restart_history,
            RestartRecord(
                time=rfc3339(failed_at),
                attempt=status.attempt,
                kind=IN_PLACE,
                reason=_in_place_reason(restart.exit_code),
                exit_code=restart.exit_code,
                pod=pod,
                message=_shorten(restart.message),
                index=restart.index,
                step_reached=step_reached,
                resumed_from_step=resumed_from,
                gpu_seconds_lost=gpu_seconds_lost,
            ),
        ][-RESTART_HISTORY_LENGTH:]
        status.steps_lost += max((step_reached or 0) - resumed_from, 0)
        status.gpu_seconds_lost += gpu_seconds_lost
        status.restarts += 1
        rank = f" (rank {restart.rank})" if restart.rank is not None else ""
        code = f" with exit code {restart.exit_code}" if restart.exit_code is not None else ""
        detail = f": {_shorten(restart.message)}" if restart.message else ""
        decision.events.append(
            Event(
                "Warning",
                REASON_RESTARTED_IN_PLACE,
                f"the training process of {pod}{rank} failed{code}{detail}; the gang restarted in place from the "
                f"checkpoint at step {resumed_from} (restart {status.restarts} of {policy.max_restarts}); "
                f"`kubectl logs {pod}` shows the failure",
            )
        )


def _in_place_reason(exit_code: int | None) -> str:
    """Why a training process failed: Stalled (a collective timed out waiting for a peer), the signal, or Error."""
    if exit_code == ExitCode.PEER_STALLED:
        return REASON_STALLED
    return "Error" if exit_code is None or exit_code < 128 else _signal_name(exit_code)


def _signal_name(exit_code: int) -> str:
    """A container runtime's 128 + N as the signal's name: 137 is SIGKILL."""
    try:
        return signal.Signals(exit_code - 128).name
    except ValueError:
        return "Error"


def _attempt_pods(gang: GangObservation) -> list[str]:
    return [_name(pod) for pod in gang.pods_by_rank.values()]


def _fail(decision: Decision, reason: str, message: str, now: datetime, gang: GangObservation) -> Decision:
    _enter_phase(decision, Phase.failed, reason, message, now, warning=True)
    decision.delete_workers = _unfinished_pods(gang)
    return decision


def _unfinished_pods(gang: GangObservation) -> list[str]:
    return [
        _name(pod)
        for pod in gang.pods_by_rank.values()
        if pod.get("status", {}).get("phase") not in ("Succeeded", "Failed")
    ] + [_name(pod) for pod in gang.stale_pods]


def _seconds_since_last_save(status: FineTuneJobStatus, now: datetime) -> float:
    """Training time the failure throws away: since the newest checkpoint, or since this attempt started."""
    running = [c for c in status.conditions if c.type == "Running" and c.status == "True"]
    marks = [parse_time(running[0].last_transition_time)] if running else []
    if status.last_checkpoint and status.last_checkpoint.time:
        marks.append(parse_time(status.last_checkpoint.time))
    return max((now - max(marks)).total_seconds(), 0.0) if marks else 0.0


def _restart_gang(
    decision: Decision,
    job: FineTuneJob,
    cause: WorkerFailure,
    gang: GangObservation,
    now: datetime,
    kind: str = CRASH,
) -> None:
    """Delete the gang to make it again from the newest checkpoint; a disruption spends no restart."""
    status, policy = decision.status, job.spec.restart_policy
    step_reached = status.progress.step if status.progress else None
    persistent = has_persistent_storage(job.spec)
    resumed_from = status.last_checkpoint.step if status.last_checkpoint and persistent else 0
    gpu_seconds_lost = round(_seconds_since_last_save(status, now) * job.spec.workers * job.spec.gpus_per_worker)
    status.restart_history = (
        [
            *status.restart_history,
            RestartRecord(
                time=rfc3339(now),
                attempt=status.attempt,
                kind=kind,
                reason=cause.reason,
                exit_code=cause.exit_code,
                pod=cause.pod,
                node=cause.node,
                message=_shorten(f"taken by {cause.taken_by}: {cause.message}") if cause.taken_by else cause.message,
                step_reached=step_reached,
                resumed_from_step=resumed_from,
                gpu_seconds_lost=gpu_seconds_lost,
            ),
        ]
    )[-RESTART_HISTORY_LENGTH:]
    status.steps_lost += max((step_reached or 0) - resumed_from, 0)
    status.gpu_seconds_lost += gpu_seconds_lost
    status.attempt += 1
    if kind == DISRUPTION:
        # Nothing failed, so nothing to back off from: the gang waits for its resources (or queue) again.
        status.disruptions += 1
        delay, reason = 0, REASON_DISRUPTED
        count = f"disruption {status.disruptions} of {policy.max_disruptions}; restarts are kept for failures"
    else:
        status.restarts += 1
        delay = restart_backoff(policy.backoff_seconds, policy.max_backoff_seconds, status.restarts)
        reason = REASON_STALLED if kind == STALL else REASON_RESTARTING
        count = f"restart {status.restarts} of {policy.max_restarts}"
    status.restart_after = rfc3339(now + timedelta(seconds=delay))
    if persistent:
        start = f"restarting the gang from the checkpoint at step {resumed_from}"
    else:
        # Without a claim the checkpoints lived in the pods' emptyDir and went with them.
        status.last_checkpoint = None
        start = "restarting the run from step 0 (no spec.storage.persistentVolumeClaim: checkpoints went with the pods)"
    message = f"{cause.describe()}; {start} in {delay}s ({count})"
    if kind != DISRUPTION:
        decision.failure_output = failure_output(gang)
    if decision.failure_output:
        config_map = FAILURE_CONFIG_MAP_NAME.format(job=job.name)
        message += f"; the failed workers' last output: kubectl describe configmap {config_map}"
    if status.phase == Phase.restarting.value:  # a gang lost again before it ran: still worth its own Event
        decision.events.append(Event("Warning", reason, message))
    _enter_phase(decision, Phase.restarting, reason, message, now, warning=True)
    decision.delete_workers = _attempt_pods(gang) + [_name(pod) for pod in gang.stale_pods]
    decision.requeue(delay)


def _this_attempt(status: FineTuneJobStatus, progress: Progress) -> bool:
    """Whether the progress was reported after the last restart (an older report is the old gang's)."""
    last = status.restart_history[-1].time if status.restart_history else None
    return last is None or (progress.updated is not None and parse_time(progress.updated) >= parse_time(last))


def _check_progress(decision: Decision, job: FineTuneJob, gang: GangObservation, now: datetime) -> bool:
    """The progress deadline: a running gang whose training has not moved for that long is restarted (Stalled).

    True when it acted. The deadline is armed by the attempt's first progress report (the trainer sends one
    as it starts loading the model): a gang whose reports cannot arrive (a spec.command script that sends
    none, a ConfigMap the workers may not patch) is never restarted for a silence that is not a stall.
    """
    status, policy = decision.status, job.spec.restart_policy
    deadline = policy.progress_deadline_seconds
    running = condition_is_true(status, "Running")
    if not deadline or running is None or status.phase != Phase.running.value:
        return False
    progress = status.progress
    if progress is None or progress.advanced is None or not _this_attempt(status, progress):
        return False
    # A report older than the gang's going Running (a suspended job resumed) arms the deadline from then.
    since = max(parse_time(progress.advanced), parse_time(running.last_transition_time))
    where = f"at step {progress.step}, {progress.activity or Activity.TRAINING}"
    left = (since + timedelta(seconds=deadline) - now).total_seconds()
    if left > 0:
        decision.requeue(left)
        return False
    message = (
        f"no training progress since {rfc3339(since)} ({where}) for "
        f"spec.restartPolicy.progressDeadlineSeconds={deadline}"
    )
    cause = WorkerFailure("the gang", 0, REASON_STALLED, None, message, None, None)
    if status.restarts >= policy.max_restarts:
        _fail(
            decision,
            REASON_RESTART_LIMIT,
            f"{cause.describe()}; spec.restartPolicy.maxRestarts={policy.max_restarts} reached",
            now,
            gang,
        )
    else:
        _restart_gang(decision, job, cause, gang, now, STALL)
    return True


def _retry_startup(decision: Decision, job: FineTuneJob, gang: GangObservation, now: datetime, why: str) -> None:
    """Make the gang again without spending a restart: it never started, so no training was lost."""
    status, policy = decision.status, job.spec.restart_policy
    if status.startup_retries >= policy.max_startup_retries:
        message = f"{why}; spec.restartPolicy.maxStartupRetries={policy.max_startup_retries} reached"
        _fail(decision, REASON_STARTUP_LIMIT, message, now, gang)
        return
    status.startup_retries += 1
    status.attempt += 1
    delay = restart_backoff(policy.backoff_seconds, policy.max_backoff_seconds, status.startup_retries)
    status.restart_after = rfc3339(now + timedelta(seconds=delay))
    message = (
        f"{why}; deleting the gang and making it again in {delay}s "
        f"(startup retry {status.startup_retries}; restarts are kept for training failures)"
    )
    decision.blocked = (REASON_STARTUP_TIMEOUT, message)
    decision.create_missing_workers = []
    decision.delete_workers = _attempt_pods(gang) + [_name(pod) for pod in gang.stale_pods]
    decision.requeue(delay)


def _finished(decision: Decision, job: FineTuneJob, gang: GangObservation, now: datetime) -> Decision:
    decision.delete_workers = _unfinished_pods(gang)
    decision.requeue_after = None
    decision.delete_job = ttl_expired(decision, job.spec.ttl_seconds_after_finished, now)
    return decision


def ttl_expired(decision: Decision, ttl: int | None, now: datetime) -> bool:
    """Whether a finished job's TTL is over; else requeue the decision for when it is."""
    if ttl is None or not decision.status.completion_time:
        return False
    remaining = (parse_time(decision.status.completion_time) + timedelta(seconds=ttl) - now).total_seconds()
    if remaining <= 0:
        return True
    decision.requeue(remaining)
    return False


def _success_story(status: FineTuneJobStatus) -> str:
    parts = ["all workers finished training"]
    if status.progress:
        total = f"/{status.progress.total_steps}" if status.progress.total_steps else ""
        parts.append(f"step {status.progress.step}{total}")
        if status.progress.loss is not None:
            parts.append(f"loss {status.progress.loss:.4g}")
    parts.append(f"{status.restarts} restart(s), {status.steps_lost} step(s) redone")
    return ", ".join(parts)


def changed_fields(old: Any, new: Any, path: str = "spec") -> list[str]:
    """The dotted paths where two dumped specs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            changed
            for key in sorted(set(old) | set(new))
            for changed in changed_fields(old.get(key), new.get(key), f"{path}.{key}")
        ]
    return [] if old == new else [path]


def accepted_spec(
    job: FineTuneJob, accepted: dict[str, Any] | None, spec_error: str | None
) -> tuple[FineTuneJobSpec, str | None]:
    """The spec to act on, and why the stored one is refused (None when it is accepted).

    The policy: only MUTABLE_SPEC_FIELDS may change on a live job; any other edit, or one that makes the
    spec invalid (spec_error, found by the caller), is refused whole and the job carries on with the
    spec it last accepted (accepted). Raises ValidationError when the accepted spec itself cannot be read.
    """
    if accepted is None:
        # A new job, one whose edit is judged already, or one no gang was made for yet: its spec is what runs.
        return job.spec, spec_error
    previous = FineTuneJobSpec.model_validate(accepted)
    if spec_error:
        return previous, spec_error
    changed = [
        path
        for path in changed_fields(spec_fields(previous), spec_fields(job.spec))
        if path.split(".")[1] not in MUTABLE_SPEC_FIELDS
    ]
    if changed:
        allowed = ", ".join(f"spec.{name}" for name in sorted(MUTABLE_SPEC_FIELDS))
        return previous, f"{', '.join(changed)} cannot change on a live job (only {allowed} can)"
    return job.spec, None


def _record_edit(decision: Decision, job: FineTuneJob, refusal: str | None, now: datetime) -> None:
    status, generation = decision.status, job.metadata.get("generation")
    stamp = rfc3339(now)
    if refusal is None:
        status.accepted_spec = None  # the spec is what runs: its durable copy is the trainer ConfigMap's
        status.observed_generation = generation
        if condition_is_true(status, EDIT_REFUSED):
            set_condition(status, EDIT_REFUSED, False, REASON_EDIT_ACCEPTED, "the spec is acted on", stamp)
        return
    status.accepted_spec = spec_fields(job.spec)  # the spec acted on: shown, and judged against, while refused
    acting_on = f"generation {status.observed_generation}" if status.observed_generation else "the accepted spec"
    message = f"the edit of generation {generation} is refused: {refusal}; the job carries on with {acting_on}"
    if set_condition(status, EDIT_REFUSED, True, REASON_EDIT_REFUSED, message, stamp) or not any(
        c.message == message for c in job.status.conditions
    ):
        decision.events.append(Event("Warning", REASON_EDIT_REFUSED, message))


def _wait_for_old_pods(decision: Decision, gang: GangObservation, now: datetime) -> None:
    """The next gang reuses the names of stale and predecessors' pods: delete them, and bound the wait."""
    stamp_blocked: tuple[str, str] | None = None
    for pod in gang.blocking_pods:
        metadata, name = pod["metadata"], _name(pod)
        owner = controller_of(pod)
        if pod in gang.foreign_pods and (owner is None or owner.get("kind") != "FineTuneJob"):
            stamp_blocked = (
                REASON_FOREIGN_POD,
                f"pod {name} has this job's name but is not owned by it; delete it to let the gang start",
            )
            continue
        if not metadata.get("deletionTimestamp"):
            decision.delete_workers.append(name)
            continue
        finalizers = metadata.get("finalizers") or []
        if finalizers and metadata.get("deletionGracePeriodSeconds") == 0:  # already forced: only they hold it
            stamp_blocked = (
                REASON_FINALIZER,
                f"pod {name} is held past its grace period by finalizer(s) {', '.join(finalizers)}; "
                "the gang waits for whoever owns them to remove them",
            )
            continue
        deadline = parse_time(metadata["deletionTimestamp"]) + timedelta(seconds=TERMINATING_MARGIN_SECONDS)
        if now < deadline:
            decision.requeue((deadline - now).total_seconds())
            if pod in gang.foreign_pods:
                stamp_blocked = stamp_blocked or (
                    REASON_PREDECESSOR,
                    f"waiting for pod {name} of a deleted job of the same name to stop",
                )
            continue
        if metadata.get("deletionGracePeriodSeconds") != 0:
            decision.force_delete_workers.append(name)
            decision.events.append(
                Event(
                    "Warning",
                    REASON_FORCE_DELETED,
                    f"pod {name} was still Terminating {TERMINATING_MARGIN_SECONDS}s past its grace period "
                    f"(node {pod.get('spec', {}).get('nodeName') or 'unknown'} lost?): deleted with grace period 0",
                ),
            )
        stamp_blocked = stamp_blocked or (
            REASON_TERMINATING,
            f"pod {name} was stuck Terminating past its grace period; force-deleted",
        )
    decision.blocked = stamp_blocked


def _is_startup_failure(gang: GangObservation, status: FineTuneJobStatus, cause: WorkerFailure) -> bool:
    """A worker failed before its gang ever ran while a peer could not be scheduled: rank 0 gave up its
    rendezvous with a peer that never came. Not a training failure, so it spends no restart."""
    return status.phase != Phase.running.value and bool(gang.unschedulable_ranks - {cause.rank})


def _startup(decision: Decision, job: FineTuneJob, gang: GangObservation, now: datetime) -> None:
    """A gang not all running yet: show why, and bound the wait while it holds nodes."""
    if gang.waiting_problem:
        decision.blocked = gang.waiting_problem
    elif gang.unschedulable:
        decision.blocked = (REASON_UNSCHEDULABLE, gang.unschedulable)
    if gang.first_bound is None:
        return  # nothing holds a node: a queue or the scheduler holds the gang, which costs nothing to wait
    if gang.unschedulable_ranks:
        clock = gang.first_bound  # part of the gang holds nodes while the rest cannot be placed
    elif gang.pulling or gang.all_started is None:
        # An image pull under way is progress; a pass comes back to report a long one (_waiting_problem).
        if gang.pulling and not decision.blocked:
            decision.requeue(CONTAINER_CREATING_REPORT_SECONDS)
        return
    else:
        clock = gang.all_started  # every worker scheduled and its image pulled: now it must come up
    timeout = job.spec.startup_timeout_seconds
    waited = (now - clock).total_seconds()
    if waited < timeout:
        decision.requeue(timeout - waited)
        return
    reason = ": ".join(decision.blocked) if decision.blocked else f"{gang.ready}/{job.spec.workers} workers running"
    why = f"the gang did not start within spec.startupTimeoutSeconds={timeout} ({reason})"
    _retry_startup(decision, job, gang, now, why)


def _still_holds(reason: str, decision: Decision) -> bool:
    """Reasons that outlive the pass that found them: a refused create until one passes, a startup retry
    until the new gang runs."""
    if reason == REASON_FORBIDDEN:
        return bool(decision.create_missing_workers)
    if reason == REASON_STARTUP_TIMEOUT:
        return decision.status.phase not in (Phase.running.value, *FINISHED_PHASES, Phase.suspended.value)
    return False


def _summary_reason(status: FineTuneJobStatus) -> str | None:
    """The one reason `kubectl get ftj` shows: why the job failed, waits, or runs on an older spec."""
    for type_ in ("Failed", BLOCKED, EDIT_REFUSED, "Restarting", "Suspended"):
        condition = condition_is_true(status, type_)
        if condition:
            return condition.reason
    return None


def reconcile(
    job: FineTuneJob,
    pods: list[dict[str, Any]],
    now: datetime,
    progress: ProgressReport | None = None,
    spec_error: str | None = None,
    accepted: dict[str, Any] | None = None,
) -> Decision:
    """Decide the job's next status and the actions that move its pods toward it.

    accepted: the spec last accepted, as stored, where the job's spec may differ from it (an edit not judged
    yet, or one refused): status.acceptedSpec, or the trainer ConfigMap's copy (the caller reads it); None when
    job.spec is accepted. spec_error: why the stored spec could not be read (the caller then passes the accepted
    spec in job). Raises ValidationError when the accepted spec cannot be read either.
    """
    spec, refusal = accepted_spec(job, accepted, spec_error)
    job = job.model_copy(update={"spec": spec})
    decision = Decision(status=job.status.model_copy(deep=True), spec=spec)
    _record_edit(decision, job, refusal, now)
    _decide(decision, job, pods, now, progress)
    status, stamp = decision.status, rfc3339(now)
    held = condition_is_true(status, BLOCKED)
    if held and _still_holds(held.reason, decision) and (not decision.blocked or held.reason == REASON_FORBIDDEN):
        decision.blocked = (held.reason, held.message)  # a refused create says more than a pod waiting for it
    if decision.blocked:
        reason, message = decision.blocked
        if set_condition(status, BLOCKED, True, reason, message, stamp):
            decision.events.append(Event("Warning", reason, message))
    elif condition_is_true(status, BLOCKED):
        set_condition(status, BLOCKED, False, REASON_UNBLOCKED, "nothing holds the gang back", stamp)
    _set_ready(status, job.metadata.get("generation"), stamp)
    status.reason = _summary_reason(status)
    return decision


def _set_ready(status: FineTuneJobStatus, generation: int | None, stamp: str) -> None:
    """Ready: True while the whole gang runs or once the job succeeded, for health checks (Argo CD, kstatus)."""
    if status.phase is None:
        return
    ready = status.phase in (Phase.running.value, Phase.succeeded.value)
    phase_condition = condition_is_true(status, PHASE_CONDITION[status.phase])
    reason = phase_condition.reason if phase_condition else status.phase
    message = phase_condition.message if phase_condition else f"the job is {status.phase}"
    set_condition(status, READY, ready, reason, message, stamp)
    next(c for c in status.conditions if c.type == READY).observed_generation = generation


def _decide(
    decision: Decision, job: FineTuneJob, pods: list[dict[str, Any]], now: datetime, progress: ProgressReport | None
) -> None:
    spec, status = job.spec, decision.status
    count_in_place_restarts(decision, job, progress, now)
    apply_progress(status, progress, now)
    known_best = status.outputs.best_step if status.outputs else None
    status.outputs = outputs_status(job, progress.best_step if progress else known_best)
    gang = observe_gang(
        pods, job.uid, status.attempt, spec.workers, gang_was_running=status.phase == Phase.running.value, now=now
    )
    status.workers = WorkersStatus(ready=gang.ready, total=spec.workers, summary=f"{gang.ready}/{spec.workers}")

    if status.phase in FINISHED_PHASES:
        _finished(decision, job, gang, now)
        return
    try:
        check_runnable(job)
    except SpecProblem as problem:
        _fail(decision, REASON_INVALID_SPEC, str(problem), now, gang)
        return

    if spec.suspend:
        decision.delete_workers = _attempt_pods(gang) + [_name(pod) for pod in gang.stale_pods]
        message = "spec.suspend is true: the workers are deleted; set it to false to resume from the checkpoint"
        if not has_persistent_storage(spec):
            message = (
                "spec.suspend is true: the workers are deleted; set it to false to start the run again "
                "(no spec.storage.persistentVolumeClaim: the checkpoints went with the pods)"
            )
        _enter_phase(decision, Phase.suspended, REASON_SUSPENDED, message, now)
        return
    if status.phase == Phase.suspended.value:
        status.attempt += 1  # a fresh gang; pods of the suspended attempt are stale
        status.start_time = None  # as a Kubernetes Job: the deadline counts from the resume
        status.restart_after = None
        _enter_phase(decision, Phase.pending, REASON_RESUMED, "spec.suspend cleared: creating the gang", now)
        gang = observe_gang(pods, job.uid, status.attempt, spec.workers, gang_was_running=False, now=now)

    if spec.active_deadline_seconds and status.start_time:
        remaining = parse_time(status.start_time) + timedelta(seconds=spec.active_deadline_seconds) - now
        if remaining.total_seconds() <= 0:
            message = f"the job ran longer than spec.activeDeadlineSeconds={spec.active_deadline_seconds}"
            _fail(decision, REASON_DEADLINE, message, now, gang)
            return
        decision.requeue(remaining.total_seconds())

    if gang.failures:
        cause, policy = gang.failures[0], spec.restart_policy
        if cause.permanent:
            message = f"{cause.describe()}; exit code 2 means bad config or data, so the job is not retried"
            _fail(decision, REASON_PERMANENT_ERROR, message, now, gang)
        elif cause.taken_by is not None and status.disruptions >= policy.max_disruptions:
            message = f"{cause.describe()}; spec.restartPolicy.maxDisruptions={policy.max_disruptions} reached"
            _fail(decision, REASON_DISRUPTION_LIMIT, message, now, gang)
        elif cause.taken_by is not None:
            _restart_gang(decision, job, cause, gang, now, DISRUPTION)
        elif _is_startup_failure(gang, status, cause):
            _retry_startup(decision, job, gang, now, f"{cause.describe()} while {gang.unschedulable}")
        elif status.restarts >= spec.restart_policy.max_restarts:
            message = f"{cause.describe()}; spec.restartPolicy.maxRestarts={spec.restart_policy.max_restarts} reached"
            _fail(decision, REASON_RESTART_LIMIT, message, now, gang)
        else:
            _restart_gang(decision, job, cause, gang, now)
        return

    if gang.succeeded == spec.workers:
        _enter_phase(decision, Phase.succeeded, REASON_SUCCEEDED, _success_story(status), now)
        decision.delete_workers = [_name(pod) for pod in gang.stale_pods]
        decision.requeue_after = None
        ttl_expired(decision, spec.ttl_seconds_after_finished, now)  # the next pass deletes it
        return
    if _check_progress(decision, job, gang, now):
        return

    if status.phase is None:
        _enter_phase(decision, Phase.pending, REASON_CREATED, f"creating {spec.workers} workers", now)
        notice = storage_notice(spec)
        if notice:  # `kubectl describe ftj` says it twice: an Event, and a condition that stays
            decision.events.append(Event("Warning", EPHEMERAL_STORAGE_REASON, notice))
            set_condition(status, "OutputsPersistent", False, EPHEMERAL_STORAGE_REASON, notice, rfc3339(now))
    if gang.blocking_pods:
        _wait_for_old_pods(decision, gang, now)
    if status.restart_after and not gang.pods_by_rank:
        wait = (parse_time(status.restart_after) - now).total_seconds()
        if wait > 0:
            decision.requeue(wait)
            return
    if gang.blocking_pods:
        return
    decision.create_missing_workers = [rank for rank in range(spec.workers) if rank not in gang.pods_by_rank]
    if decision.create_missing_workers and status.start_time is None:
        status.start_time = rfc3339(now)
    if gang.ready == spec.workers:
        if status.phase != Phase.running.value:
            message = f"all {spec.workers} workers are running (attempt {status.attempt})"
            if status.restarts and status.last_checkpoint:
                message += f", resuming from the checkpoint at step {status.last_checkpoint.step}"
            _enter_phase(decision, Phase.running, REASON_RUNNING, message, now)
    elif status.phase != Phase.running.value and gang.gated and gang.first_bound is None:
        message = (
            f"the gang waits for its queue to admit it (pods {REASON_GATED}, attempt {status.attempt}); "
            "a queued job is never timed out"
        )
        _enter_phase(decision, Phase.queued, REASON_GATED, message, now)
    elif status.phase != Phase.running.value:
        _startup(decision, job, gang, now)
    if gang.waiting_problem and not decision.blocked:
        decision.blocked = gang.waiting_problem  # in any phase: a pod that cannot start needs a person
