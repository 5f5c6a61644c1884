"""One reconcile pass for one job: read it, decide (status.py), write the status, then act on the pods.

The status is written first and guarded by resourceVersion, so an operator killed between the two
steps re-derives the same actions from the API server and never counts a restart twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from finetune_operator import builders, kube
from finetune_operator.api import FineTuneJob, FineTuneJobStatus, Phase
from finetune_operator.config import OperatorSettings
from finetune_operator.status import REASON_INVALID_SPEC, Decision, Event, reconcile, rfc3339, set_condition
from finetune_trainer.config import format_validation_error
from finetune_trainer.contract import ProgressReport

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What the caller needs after a pass: the job as read, the events to post, when to look again."""

    body: dict[str, Any] | None
    events: list[Event]
    requeue_after: float | None
    status: dict[str, Any] | None = None  # the status written, when it changed


def reconcile_job(
    namespace: str,
    name: str,
    pods: list[dict[str, Any]],
    progress: ProgressReport | None,
    settings: OperatorSettings,
    now: datetime | None = None,
) -> Outcome:
    now = now or datetime.now(timezone.utc)
    body = kube.get_job(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Outcome(body, [], None)
    try:
        job = FineTuneJob.model_validate(body)
    except ValidationError as e:
        return _refuse_invalid_spec(body, e, now)
    decision = reconcile(job, pods, now, progress)
    try:
        written = _write_status(job, body, decision)
    except kube.StatusConflict:
        log.debug("%s/%s changed while reconciling; again from the fresh object", namespace, name)
        return Outcome(body, [], 0)
    try:
        _act(job, decision, pods, settings)
    except kube.ObjectRejected as rejected:
        return _fail_rejected(namespace, name, str(rejected), now)
    except kube.RetryLater as later:
        # The status is written, so its events are posted now; the next pass creates what is missing.
        log.info("%s/%s: %s; retrying in %gs", namespace, name, later, later.seconds)
        retry = min(later.seconds, decision.requeue_after or later.seconds)
        return Outcome(body, decision.events, retry, written)
    return Outcome(body, decision.events, decision.requeue_after, written)


def _write_status(job: FineTuneJob, body: dict[str, Any], decision: Decision) -> dict[str, Any] | None:
    new = decision.status.model_dump(mode="json", by_alias=True)
    if new == job.status.model_dump(mode="json", by_alias=True):
        return None
    kube.patch_job_status(job.namespace, job.name, new, body["metadata"]["resourceVersion"])
    return new


def _act(job: FineTuneJob, decision: Decision, pods: list[dict[str, Any]], settings: OperatorSettings) -> None:
    terminating = {p["metadata"]["name"] for p in pods if p["metadata"].get("deletionTimestamp")}
    for pod_name in decision.delete_workers:
        if pod_name not in terminating:
            kube.delete_pod(job.namespace, pod_name)
    if decision.create_missing_workers:
        if not pods:  # made before a gang's first worker: while any pod is there, they were (409s saved)
            for obj in builders.build_job_resources(job):
                kube.create(obj)
        for rank in decision.create_missing_workers:
            kube.create(builders.build_worker_pod(job, rank, decision.status.attempt, settings))
    if decision.delete_job:
        kube.delete_job(job.namespace, job.name)


def _refuse_invalid_spec(body: dict[str, Any], error: ValidationError, now: datetime) -> Outcome:
    """A spec the schema let through but the models refuse (e.g. reserved env): fail it, naming the field."""
    message = format_validation_error(error)
    metadata = body["metadata"]
    return _fail_rejected(metadata["namespace"], metadata["name"], message, now, body)


def _fail_rejected(namespace: str, name: str, message: str, now: datetime, body: dict | None = None) -> Outcome:
    body = body or kube.get_job(namespace, name)
    if body is None:
        return Outcome(None, [], None)
    status = dict(body.get("status") or {})
    if status.get("phase") == Phase.failed.value:
        return Outcome(body, [], None)
    parsed = FineTuneJobStatus.model_validate(status)
    stamp = rfc3339(now)
    parsed.phase = Phase.failed.value
    parsed.completion_time = parsed.completion_time or stamp
    set_condition(parsed, "Failed", True, REASON_INVALID_SPEC, message, stamp)
    try:
        kube.patch_job_status(
            namespace, name, parsed.model_dump(mode="json", by_alias=True), body["metadata"]["resourceVersion"]
        )
    except kube.StatusConflict:
        return Outcome(body, [], 0)
    written = parsed.model_dump(mode="json", by_alias=True)
    return Outcome(body, [Event("Warning", REASON_INVALID_SPEC, message)], None, written)
