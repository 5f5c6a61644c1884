"""The reconcile decision as one pure function: the job and its pods in, the new status and actions out.

Phase is always the job's current state; conditions keep the history of each state with reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from finetune_operator.api import (
    FINISHED_PHASES,
    CheckpointStatus,
    Condition,
    FineTuneJob,
    FineTuneJobStatus,
    Phase,
    Progress,
    RestartRecord,
    WorkersStatus,
)
from finetune_operator.builders import LABEL_ATTEMPT, LABEL_RANK, TRAINER_CONTAINER, SpecProblem, check_runnable
from finetune_trainer.contract import ExitCode, ProgressReport

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

# The condition each phase sets True; Pending's is "Created".
PHASE_CONDITION = {
    Phase.pending.value: "Created",
    Phase.running.value: "Running",
    Phase.restarting.value: "Restarting",
    Phase.suspended.value: "Suspended",
    Phase.succeeded.value: "Succeeded",
    Phase.failed.value: "Failed",
}
# Conditions that stop being true when the job moves on.
TRANSIENT_CONDITIONS = ("Running", "Restarting", "Suspended")
# Container waiting reasons that need a person: shown in the Pending condition instead of hanging silently.
STUCK_WAITING_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError"}


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
    events: list[Event] = field(default_factory=list)
    create_missing_workers: list[int] = field(default_factory=list)
    delete_workers: list[str] = field(default_factory=list)
    delete_job: bool = False
    requeue_after: float | None = None


@dataclass(frozen=True)
class WorkerFailure:
    pod: str
    rank: int
    reason: str
    exit_code: int | None
    message: str | None
    node: str | None
    finished_at: str | None

    @property
    def permanent(self) -> bool:
        return self.exit_code == ExitCode.PERMANENT

    def describe(self) -> str:
        code = f"exit code {self.exit_code}, " if self.exit_code is not None else ""
        where = f" on node {self.node}" if self.node else ""
        detail = f": {self.message}" if self.message else ""
        return f"worker {self.pod} failed ({code}{self.reason}){where}{detail}"


@dataclass(frozen=True)
class GangObservation:
    """What the job's pods say about the current attempt."""

    pods_by_rank: dict[int, dict[str, Any]]
    stale_pods: list[str]
    failures: list[WorkerFailure]
    ready: int
    succeeded: int
    waiting_problem: str | None


def _trainer_state(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == TRAINER_CONTAINER:
            return status
    return statuses[0] if statuses else {}


def _shorten(text: str | None) -> str | None:
    if not text:
        return None
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_LIMIT else "..." + text[-MESSAGE_LIMIT:]


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

    if status.get("phase") == "Failed":
        if status.get("reason") == "Evicted":
            return failure("Evicted", terminated.get("exitCode"), status.get("message"))
        return failure(
            terminated.get("reason") or status.get("reason") or "Error",
            terminated.get("exitCode"),
            terminated.get("message") or status.get("message"),
        )
    if metadata.get("deletionTimestamp") and status.get("phase") != "Succeeded":
        return failure("Deleted", terminated.get("exitCode"), "the pod was deleted while the gang was running")
    return None


def _is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _waiting_problem(pod: dict[str, Any]) -> str | None:
    waiting = (_trainer_state(pod).get("state") or {}).get("waiting") or {}
    if waiting.get("reason") in STUCK_WAITING_REASONS:
        return f"worker {pod['metadata']['name']}: {waiting['reason']}: {_shorten(waiting.get('message')) or ''}"
    return None


def observe_gang(pods: list[dict[str, Any]], attempt: int, workers: int, gang_was_running: bool) -> GangObservation:
    current = [p for p in pods if p["metadata"].get("labels", {}).get(LABEL_ATTEMPT) == str(attempt)]
    stale = [p["metadata"]["name"] for p in pods if p not in current]
    by_rank = {int(p["metadata"]["labels"][LABEL_RANK]): p for p in current}
    failures = [f for f in map(worker_failure, current) if f is not None]
    if gang_was_running:
        failures += [
            WorkerFailure(f"rank {rank}", rank, "Deleted", None, "the worker's pod is gone", None, None)
            for rank in range(workers)
            if rank not in by_rank
        ]
    # The first failure is the cause; later ones are usually the rest of the gang losing its peer.
    # A permanent error wins: retrying cannot fix it.
    failures.sort(key=lambda f: (not f.permanent, f.finished_at or "9999"))
    problems = [problem for problem in map(_waiting_problem, current) if problem]
    return GangObservation(
        pods_by_rank=by_rank,
        stale_pods=stale,
        failures=failures,
        ready=sum(1 for p in current if _is_ready(p)),
        succeeded=sum(1 for p in current if p.get("status", {}).get("phase") == "Succeeded"),
        waiting_problem=problems[0] if problems else None,
    )


def set_condition(status: FineTuneJobStatus, type_: str, value: bool, reason: str, message: str, now: str) -> None:
    text = "True" if value else "False"
    for condition in status.conditions:
        if condition.type == type_:
            if condition.status != text:
                condition.last_transition_time = now
            condition.status, condition.reason, condition.message = text, reason, message
            return
    status.conditions.append(
        Condition(type=type_, status=text, reason=reason, message=message, last_transition_time=now)
    )


def _enter_phase(decision: Decision, phase: Phase, reason: str, message: str, now: datetime, warning: bool = False):
    status = decision.status
    stamp = rfc3339(now)
    changed = status.phase != phase.value
    status.phase = phase.value
    condition_type = PHASE_CONDITION[phase.value]
    for transient in TRANSIENT_CONDITIONS:
        if transient != condition_type and any(c.type == transient and c.status == "True" for c in status.conditions):
            set_condition(status, transient, False, reason, message, stamp)
    set_condition(status, condition_type, True, reason, message, stamp)
    if changed:
        decision.events.append(Event("Warning" if warning else "Normal", reason, message))
    if phase.value in FINISHED_PHASES:
        status.completion_time = status.completion_time or stamp


def restart_backoff(backoff_seconds: int, max_backoff_seconds: int, restarts: int) -> int:
    """Seconds before restart number `restarts` (1-based): doubling, capped."""
    return min(backoff_seconds * 2 ** max(restarts - 1, 0), max_backoff_seconds)


def apply_progress(status: FineTuneJobStatus, report: ProgressReport | None) -> None:
    """Copy rank 0's progress report (progress.json, or the progress ConfigMap) into the status."""
    if report is None:
        return
    status.progress = Progress(
        step=report.step,
        total_steps=report.total_steps,
        loss=report.loss,
        tokens_per_second=report.tokens_per_second,
        eta_seconds=report.eta_seconds,
        updated=report.time,
    )
    if report.last_checkpoint_step is not None:
        status.last_checkpoint = CheckpointStatus(step=report.last_checkpoint_step, time=report.last_checkpoint_time)


def _fail(decision: Decision, reason: str, message: str, now: datetime, gang: GangObservation) -> Decision:
    _enter_phase(decision, Phase.failed, reason, message, now, warning=True)
    decision.delete_workers = _unfinished_pods(gang)
    return decision


def _unfinished_pods(gang: GangObservation) -> list[str]:
    return [
        pod["metadata"]["name"]
        for pod in gang.pods_by_rank.values()
        if pod.get("status", {}).get("phase") not in ("Succeeded", "Failed")
    ] + gang.stale_pods


def _seconds_since_last_save(status: FineTuneJobStatus, now: datetime) -> float:
    """Training time the failure throws away: since the newest checkpoint, or since this attempt started."""
    running = [c for c in status.conditions if c.type == "Running" and c.status == "True"]
    marks = [parse_time(running[0].last_transition_time)] if running else []
    if status.last_checkpoint and status.last_checkpoint.time:
        marks.append(parse_time(status.last_checkpoint.time))
    return max((now - max(marks)).total_seconds(), 0.0) if marks else 0.0


def _restart_gang(decision: Decision, job: FineTuneJob, cause: WorkerFailure, gang: GangObservation, now: datetime):
    status, policy = decision.status, job.spec.restart_policy
    step_reached = status.progress.step if status.progress else None
    resumed_from = status.last_checkpoint.step if status.last_checkpoint else 0
    gpu_seconds_lost = round(_seconds_since_last_save(status, now) * job.spec.workers * job.spec.gpus_per_worker)
    status.restart_history = (
        [
            *status.restart_history,
            RestartRecord(
                time=rfc3339(now),
                attempt=status.attempt,
                reason=cause.reason,
                exit_code=cause.exit_code,
                pod=cause.pod,
                node=cause.node,
                message=cause.message,
                step_reached=step_reached,
                resumed_from_step=resumed_from,
                gpu_seconds_lost=gpu_seconds_lost,
            ),
        ]
    )[-RESTART_HISTORY_LENGTH:]
    status.steps_lost += max((step_reached or 0) - resumed_from, 0)
    status.gpu_seconds_lost += gpu_seconds_lost
    status.restarts += 1
    status.attempt += 1
    delay = restart_backoff(policy.backoff_seconds, policy.max_backoff_seconds, status.restarts)
    status.restart_after = rfc3339(now + timedelta(seconds=delay))
    message = (
        f"{cause.describe()}; restarting the gang from the checkpoint at step {resumed_from} in {delay}s "
        f"(restart {status.restarts} of {policy.max_restarts})"
    )
    _enter_phase(decision, Phase.restarting, REASON_RESTARTING, message, now, warning=True)
    decision.delete_workers = [p["metadata"]["name"] for p in gang.pods_by_rank.values()] + gang.stale_pods
    decision.requeue_after = delay


def _finished(decision: Decision, job: FineTuneJob, gang: GangObservation, now: datetime) -> Decision:
    decision.delete_workers = _unfinished_pods(gang)
    ttl = job.spec.ttl_seconds_after_finished
    if ttl is not None and decision.status.completion_time:
        remaining = (parse_time(decision.status.completion_time) + timedelta(seconds=ttl) - now).total_seconds()
        if remaining <= 0:
            decision.delete_job = True
        else:
            decision.requeue_after = remaining
    return decision


def _success_story(status: FineTuneJobStatus) -> str:
    parts = ["all workers finished training"]
    if status.progress:
        total = f"/{status.progress.total_steps}" if status.progress.total_steps else ""
        parts.append(f"step {status.progress.step}{total}")
        if status.progress.loss is not None:
            parts.append(f"loss {status.progress.loss:.4g}")
    parts.append(f"{status.restarts} restart(s), {status.steps_lost} step(s) redone")
    return ", ".join(parts)


def reconcile(
    job: FineTuneJob, pods: list[dict[str, Any]], now: datetime, progress: ProgressReport | None = None
) -> Decision:
    """Decide the job's next status and the actions that move its pods toward it."""
    spec = job.spec
    decision = Decision(status=job.status.model_copy(deep=True))
    status = decision.status
    status.observed_generation = job.metadata.get("generation")
    apply_progress(status, progress)
    gang = observe_gang(pods, status.attempt, spec.workers, gang_was_running=status.phase == Phase.running.value)
    status.workers = WorkersStatus(ready=gang.ready, total=spec.workers, summary=f"{gang.ready}/{spec.workers}")

    if status.phase in FINISHED_PHASES:
        return _finished(decision, job, gang, now)
    try:
        check_runnable(job)
    except SpecProblem as problem:
        return _fail(decision, REASON_INVALID_SPEC, str(problem), now, gang)

    if spec.suspend:
        decision.delete_workers = [p["metadata"]["name"] for p in gang.pods_by_rank.values()] + gang.stale_pods
        message = "spec.suspend is true: the workers are deleted; set it to false to resume from the checkpoint"
        _enter_phase(decision, Phase.suspended, REASON_SUSPENDED, message, now)
        return decision
    if status.phase == Phase.suspended.value:
        status.attempt += 1  # a fresh gang; pods of the suspended attempt are stale
        _enter_phase(decision, Phase.pending, REASON_RESUMED, "spec.suspend cleared: creating the gang", now)
        gang = observe_gang(pods, status.attempt, spec.workers, gang_was_running=False)

    if spec.active_deadline_seconds and status.start_time:
        remaining = parse_time(status.start_time) + timedelta(seconds=spec.active_deadline_seconds) - now
        if remaining.total_seconds() <= 0:
            message = f"the job ran longer than spec.activeDeadlineSeconds={spec.active_deadline_seconds}"
            return _fail(decision, REASON_DEADLINE, message, now, gang)
        decision.requeue_after = remaining.total_seconds()

    if gang.failures:
        cause = gang.failures[0]
        if cause.permanent:
            message = f"{cause.describe()}; exit code 2 means bad config or data, so the job is not retried"
            return _fail(decision, REASON_PERMANENT_ERROR, message, now, gang)
        if status.restarts >= spec.restart_policy.max_restarts:
            message = f"{cause.describe()}; spec.restartPolicy.maxRestarts={spec.restart_policy.max_restarts} reached"
            return _fail(decision, REASON_RESTART_LIMIT, message, now, gang)
        _restart_gang(decision, job, cause, gang, now)
        return decision

    if gang.succeeded == spec.workers:
        _enter_phase(decision, Phase.succeeded, REASON_SUCCEEDED, _success_story(status), now)
        return decision

    decision.delete_workers = gang.stale_pods
    if status.phase == Phase.restarting.value and status.restart_after:
        wait = (parse_time(status.restart_after) - now).total_seconds()
        if wait > 0:
            decision.requeue_after = min(wait, decision.requeue_after or wait)
            return decision
    if status.phase is None:
        _enter_phase(decision, Phase.pending, REASON_CREATED, f"creating {spec.workers} workers", now)
    if gang.stale_pods:
        return decision  # the next gang reuses their names: wait until they are gone
    decision.create_missing_workers = [rank for rank in range(spec.workers) if rank not in gang.pods_by_rank]
    if decision.create_missing_workers and status.start_time is None:
        status.start_time = rfc3339(now)
    if gang.ready == spec.workers and status.phase != Phase.running.value:
        message = f"all {spec.workers} workers are running (attempt {status.attempt})"
        if status.restarts and status.last_checkpoint:
            message += f", resuming from the checkpoint at step {status.last_checkpoint.step}"
        _enter_phase(decision, Phase.running, REASON_RUNNING, message, now)
    elif gang.waiting_problem and status.phase == Phase.pending.value:
        set_condition(status, "Created", True, "WorkerWaiting", gang.waiting_problem, rfc3339(now))
    return decision
