"""One reconcile pass for one job: read it, decide (status.py), write the status, then act on the pods.

The status is written first and guarded by resourceVersion, so an operator killed between the two
steps re-derives the same actions from the API server and never counts a restart twice. A gang's pods go
out with only what they need at creation; its companion objects follow in the background (Companions).
A job sees only the pods and objects whose controller ownerReference carries its uid: those of a deleted
predecessor with the same name are waited for (pods) or replaced (the other objects), never reused.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

from pydantic import ValidationError

from finetune_operator import builders, kube
from finetune_operator.api import FINISHED_PHASES, FineTuneJob, FineTuneJobSpec, FineTuneJobStatus, Phase
from finetune_operator.config import OperatorSettings
from finetune_operator.status import (
    BLOCKED,
    DEPARTED,
    REASON_INVALID_SPEC,
    Decision,
    Event,
    condition_is_true,
    controller_of,
    parse_time,
    reconcile,
    rfc3339,
    set_condition,
)
from finetune_trainer.config import format_validation_error
from finetune_trainer.contract import ProgressReport

log = logging.getLogger(__name__)

REPLACE_RETRY_SECONDS = 1.0  # after deleting a predecessor's object, create ours on the next pass
# How long a pass waits for the pod watch to deliver the pods the previous pass created: far longer than the
# watch takes, short enough that a pod deleted before the watch saw it delays the job little.
EXPECTATION_SECONDS = 2.0
# How long a gang's companions handed to the background are trusted to be in the making (they wait for a pause
# in pod creates, at most kube.BACKGROUND_AT_MOST_SECONDS); after a failure, the retries back off up to a minute.
COMPANIONS_SECONDS = 30.0
COMPANIONS_MAX_BACKOFF_SECONDS = 60.0
# A pass makes a few requests one after another (read, status, deletes, creates), each bounded by kube.py's
# timeouts; the pass as a whole by this, after which it gives up and the job is retried with backoff.
PASS_SECONDS = 2 * kube.READ_SECONDS


@dataclass
class Outcome:
    """What the caller needs after a pass: the job as read, the events to post, when to look again."""

    body: dict[str, Any] | None
    events: list[Event]
    requeue_after: float | None
    status: dict[str, Any] | None = None  # the status written, when it changed
    ghosts: list[str] = field(default_factory=list)  # uids of pods the watch index holds but the server has not
    created: list[tuple[str, str]] = field(default_factory=list)  # (name, attempt label) of the pods it created
    companions: list[dict[str, Any]] = field(default_factory=list)  # for Companions.make: the gang lacks them
    companions_made: bool = False  # the pass made the companions itself (they had been refused: Companions.made)
    error: Exception | None = None  # the pass failed after deciding: post the events, then retry with backoff
    # The job's resourceVersion as this pass last saw it on the server (read or written): the body's by default.
    resource_version: str | None = None
    reread: bool = False  # the server's version is unknown (a conflict, say): read the job on the next pass

    def __post_init__(self) -> None:
        if self.body is not None and self.resource_version is None:
            self.resource_version = self.body["metadata"].get("resourceVersion")


@dataclass(frozen=True)
class OwnedProgress:
    """A progress report with the uid of the job whose ConfigMap carried it."""

    owner_uid: str | None
    report: ProgressReport | None


class Unreadable(Exception):
    """The stored job cannot be read as a FineTuneJob (an invalid new spec, or a newer version's object)."""


def reconcile_job(
    namespace: str,
    name: str,
    pods: list[dict[str, Any]],
    progress: list[OwnedProgress],
    settings: OperatorSettings,
    now: datetime | None = None,
    body: dict[str, Any] | None = None,
    refused_companions: Mapping[str, kube.CreationRefused] | None = None,
) -> Outcome:
    """refused_companions: by job uid, the API server's refusal of a gang's companions in the background
    (Companions.refusals): shown as Blocked, and the pass makes them itself, before any pod.

    body: the job as the watch delivered it, when that is no older than the operator's own last write of it
    (handlers.py); without it the job is read from the API server. Either way a stale body writes nothing and
    so acts on nothing: the status write is guarded by its resourceVersion. The pass gives up after
    PASS_SECONDS (kube.DeadlineExceeded, a timeout): the work queue retries the job with backoff."""
    with kube.deadline(PASS_SECONDS):
        now = now or datetime.now(timezone.utc)
        return _reconcile_job(namespace, name, pods, progress, settings, now, body, refused_companions or {})


def _reconcile_job(
    namespace: str,
    name: str,
    pods: list[dict[str, Any]],
    progress: list[OwnedProgress],
    settings: OperatorSettings,
    now: datetime,
    body: dict[str, Any] | None,
    refused_companions: Mapping[str, kube.CreationRefused],
) -> Outcome:
    body = body if body is not None else kube.get_job(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Outcome(body, [], None)
    uid = body["metadata"]["uid"]
    report = next((p.report for p in progress if p.owner_uid == uid), None)
    kept = AcceptedSpecCopy(body)
    try:
        job, spec_error, accepted = _read(body, kept)
        decision = reconcile(job, pods, now, report, spec_error, accepted)
    except (Unreadable, ValidationError) as problem:
        message = format_validation_error(problem) if isinstance(problem, ValidationError) else str(problem)
        return _fail_unreadable(body, pods, message, now)
    companions_refused = refused_companions.get(uid)
    if companions_refused is not None and decision.status.phase not in FINISHED_PHASES:
        _show_companions_refused(decision, job, companions_refused, now)
    else:
        companions_refused = None
    job = job.model_copy(update={"spec": decision.spec})
    try:
        # The copy first: a pass stopped between the two judges the edit again, against it, to the same answer.
        if decision.status.accepted_spec is None and not kept.keep(job.spec):
            raise kube.StatusConflict(f"{namespace}/{name}'s trainer ConfigMap changed since it was read")
        written, version = _write_status(job, body, decision)
    except kube.StatusConflict:
        log.debug("%s/%s changed while reconciling; again from the fresh object", namespace, name)
        return Outcome(body, [], 0, reread=True)
    outcome = Outcome(body, decision.events, decision.requeue_after, written, resource_version=version)
    departed = [p["metadata"]["uid"] for p in pods if p.get(DEPARTED)]  # read once: the written status has them
    pods = [p for p in pods if not p.get(DEPARTED)]
    try:
        outcome.ghosts, outcome.created, outcome.companions_made = _act(
            job, decision, pods, settings, companions_refused is not None
        )
        outcome.ghosts += departed
    except kube.ObjectRejected as rejected:
        failed = _fail_rejected(body, written, version, pods, str(rejected), now)
        failed.events = decision.events + failed.events
        if failed.status is None and written is not None:
            failed.reread = True  # written, but the version is not known here
        return failed
    except kube.CreationRefused as refused:
        outcome.error = refused
        try:
            events, version = _record_refusal(body, written or body.get("status") or {}, version, refused, now)
        except kube.StatusConflict:  # the job changed: the retry reads it and decides again
            outcome.reread = True
        else:
            outcome.events += events
            outcome.resource_version = version or outcome.resource_version
    except kube.RetryLater as later:
        # The status is written, so its events are posted now; the next pass creates what is missing.
        log.info("%s/%s: %s; retrying in %gs", namespace, name, later, later.seconds)
        outcome.requeue_after = min(later.seconds, decision.requeue_after or later.seconds)
    except Exception as error:  # the pass's events are still posted; the work queue retries with backoff
        outcome.error = error
    if companions_refused is None:
        outcome.companions = _companions_due(job, pods, outcome.created, progress)
    return outcome


def _refusal_message(refused: kube.CreationRefused) -> str:
    return f"the API server refused to create {refused}; retrying with backoff"


def _show_companions_refused(
    decision: Decision, job: FineTuneJob, refused: kube.CreationRefused, now: datetime
) -> None:
    """A companion object refused in the background (a Services quota, say) shows in Blocked and the Reason as
    a refused pod does, kept as stored while it lasts (no write or Event per retry)."""
    status, message = decision.status, _refusal_message(refused)
    stored = condition_is_true(job.status, BLOCKED)
    if stored is not None and (stored.reason, stored.message) == (refused.reason, message):
        status.conditions = [stored if c.type == BLOCKED else c for c in status.conditions]
    elif set_condition(status, BLOCKED, True, refused.reason, message, rfc3339(now)):
        decision.events.append(Event("Warning", refused.reason, message))
    status.reason = refused.reason


class AcceptedSpecCopy:
    """The durable copy of the spec a job acts on: an annotation on its trainer ConfigMap, made with its first
    gang (builders.build_trainer_config_map). status.acceptedSpec holds the spec only while an edit is refused;
    the copy is read, at most once a pass, only where the job's spec may differ from it and the status does not
    say (an edit not judged yet, an unreadable spec), or where status.acceptedSpec goes."""

    def __init__(self, body: dict[str, Any]) -> None:
        metadata = body["metadata"]
        self._namespace, self._uid = metadata["namespace"], metadata["uid"]
        self._name = builders.CONFIG_MAP_NAME.format(job=metadata["name"])
        self._in_status = (body.get("status") or {}).get("acceptedSpec") is not None
        self._read = False
        self._config_map: dict[str, Any] | None = None

    def _get(self) -> dict[str, Any] | None:
        if not self._read:
            found = kube.get("ConfigMap", self._namespace, self._name)
            self._config_map = found if found is not None and _owned(found, self._uid) else None
            self._read = True
        return self._config_map

    def spec(self) -> dict[str, Any] | None:
        """The accepted spec as stored; None without a copy: no gang was made yet (so nothing ran on any spec),
        or a version that kept none made it."""
        annotations = ((self._get() or {}).get("metadata") or {}).get("annotations") or {}
        try:
            fields = json.loads(annotations.get(builders.ACCEPTED_SPEC_ANNOTATION) or "null")
        except ValueError:
            return None
        return fields if isinstance(fields, dict) else None

    def keep(self, spec: FineTuneJobSpec) -> bool:
        """Before a status write without status.acceptedSpec: make the copy say `spec` where it may not, that is
        where it was read to judge an edit, or where status.acceptedSpec goes (a refused edit undone, an edit
        accepted on top of one, a status written by a version that kept the spec there). False when the
        ConfigMap changed since it was read: decide again."""
        if not (self._read or self._in_status):
            return True  # the edit was judged before: the copy says the spec already
        config_map = self._get()
        if config_map is None:
            return True  # no gang yet: its ConfigMap will carry the spec
        if self.spec() == builders.spec_fields(spec):
            return True
        changes = {"metadata": {"annotations": builders.accepted_spec_annotation(spec)}}
        return kube.patch("ConfigMap", self._namespace, self._name, changes, config_map["metadata"]["resourceVersion"])


def _read(body: dict[str, Any], kept: AcceptedSpecCopy) -> tuple[FineTuneJob, str | None, dict[str, Any] | None]:
    """The job; why its stored spec is refused when only the accepted spec can be read; and the accepted spec
    where the job's may differ from it (None: the job's spec is the accepted one)."""
    try:
        job, error = FineTuneJob.model_validate(body), None
    except ValidationError as e:
        job, error = None, format_validation_error(e)
    status = body.get("status") or {}
    accepted = status.get("acceptedSpec")
    observed = status.get("observedGeneration")
    unjudged = observed is not None and (error or observed != body["metadata"].get("generation"))
    if unjudged and not isinstance(accepted, dict):
        accepted = kept.spec()  # an edit not judged yet, or a spec that cannot be read
    if job is not None:
        return job, None, accepted if isinstance(accepted, dict) else None
    if not isinstance(accepted, dict):
        raise Unreadable(error)
    try:
        return FineTuneJob.model_validate({**body, "spec": accepted}), error, accepted
    except ValidationError as e:
        raise Unreadable(error) from e


def _write_status(
    job: FineTuneJob, body: dict[str, Any], decision: Decision
) -> tuple[dict[str, Any] | None, str | None]:
    """The status written (None: unchanged) and the job's resourceVersion after the pass."""
    new = decision.status.model_dump(mode="json", by_alias=True)
    version = body["metadata"].get("resourceVersion")
    stored = body.get("status") or {}
    # Against what is stored (defaults never written are written), fields of a newer version's status kept.
    patch = merge_patch_between({key: value for key, value in stored.items() if key in new}, new)
    if not patch:
        return None, version
    stored = kube.patch_job_status(job.namespace, job.name, patch, version)
    return new, _version_of(stored)


def merge_patch_between(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns old into new: what changed, and the keys new lacks as null
    (a plain merge of new would keep them, e.g. a field removed from the spec in status.acceptedSpec)."""
    patch: dict[str, Any] = {key: None for key in old.keys() - new.keys() if old[key] is not None}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            if nested := merge_patch_between(before, value):
                patch[key] = nested
        elif value != before:  # None: absent
            patch[key] = value
    return patch


def _version_of(stored: Any) -> str | None:
    """The resourceVersion of a job as returned or watched (kopf's Body is a Mapping, not a dict)."""
    return stored["metadata"].get("resourceVersion") if isinstance(stored, Mapping) else None


def _act(
    job: FineTuneJob,
    decision: Decision,
    pods: list[dict[str, Any]],
    settings: OperatorSettings,
    companions_first: bool = False,
) -> tuple[list[str], list[tuple[str, str]], bool]:
    """Delete, force-delete and create pods as decided; the uids of pods found already gone (ghosts), the
    (name, attempt label) of the pods created, and whether it made the companions. companions_first: make
    the gang's companions in this pass, before any pod (they were refused in the background): while they
    are refused, no gang is made again."""
    by_name = {p["metadata"]["name"]: p for p in pods}
    ghosts, created = [], []
    if decision.failure_output:
        _keep_failure_output(job, decision.status.attempt - 1, decision.failure_output)
    for pod_name, grace in [(n, None) for n in decision.delete_workers] + [
        (n, 0) for n in decision.force_delete_workers
    ]:
        pod = by_name.get(pod_name, {"metadata": {}})
        if grace is None and pod["metadata"].get("deletionTimestamp"):
            continue
        uid = pod["metadata"].get("uid")
        if not kube.delete_pod(job.namespace, pod_name, uid, grace) and uid:
            ghosts.append(uid)
    made_companions = companions_first and bool(
        decision.create_missing_workers or any(_owned(p, job.uid) and _live(p) for p in pods)
    )
    if made_companions:
        make_companions(builders.build_gang_companions(job), job.uid)
    if decision.create_missing_workers:
        # What the pods need at creation at once, then the pods at once; the companions follow (Companions).
        if not any(_owned(p, job.uid) for p in pods):  # made before a gang's first worker (409s saved)
            kube.in_parallel([partial(_ensure, obj, job.uid) for obj in builders.build_gang_prerequisites(job)])
        attempt = decision.status.attempt
        workers = [builders.build_worker_pod(job, rank, attempt, settings) for rank in decision.create_missing_workers]
        made = kube.in_parallel([partial(kube.create, pod) for pod in workers])
        created = [_attempt_of(pod) for pod, new in zip(workers, made, strict=True) if new]
    if decision.delete_job:
        kube.delete_job(job.namespace, job.name, job.uid)
    return ghosts, created, made_companions


def _attempt_of(pod: dict[str, Any]) -> tuple[str, str]:
    return pod["metadata"]["name"], (pod["metadata"].get("labels") or {}).get(builders.LABEL_ATTEMPT, "")


def _owned(obj: dict[str, Any], uid: str) -> bool:
    return (controller_of(obj) or {}).get("uid") == uid


def _live(pod: dict[str, Any]) -> bool:
    phase = pod.get("status", {}).get("phase")
    return phase not in ("Succeeded", "Failed") and not pod["metadata"].get("deletionTimestamp")


def _companions_due(
    job: FineTuneJob, pods: list[dict[str, Any]], created: list[tuple[str, str]], progress: list[OwnedProgress]
) -> list[dict[str, Any]]:
    """The gang's companions while it has (or just got) live pods but its progress ConfigMap, made last, is not
    watched: not made yet, in the making, failed, or the operator restarted before making them."""
    if any(p.owner_uid == job.uid for p in progress):
        return []
    if created or any(_owned(p, job.uid) and _live(p) for p in pods):
        return builders.build_gang_companions(job)
    return []


def _ensure(obj: dict[str, Any], uid: str) -> None:
    """Create obj, or make sure the one already there is this job's: a deleted predecessor's (the garbage
    collector has not got to it yet, or it was orphaned) has stale content, so it is replaced."""
    kind, namespace, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    if kube.create(obj):
        return
    owners = kube.owner_uids(kind, namespace, name)
    if owners is None:
        kube.create(obj)  # it went between the two calls
    elif uid not in owners:
        kube.delete(kind, namespace, name)
        raise kube.RetryLater(f"{kind} {name} belongs to a deleted job of the same name; replacing it", 1.0)


def _keep_failure_output(job: FineTuneJob, attempt: int, outputs: dict[str, str]) -> None:
    """Keep the failed workers' output in the job's failure ConfigMap, replacing the last restart's, before
    their pods are deleted. Best effort: a write that fails is logged and the restart goes on."""
    config_map = builders.build_failure_config_map(job, attempt, outputs)
    name = config_map["metadata"]["name"]
    try:
        if not kube.create(config_map):
            owners = kube.owner_uids("ConfigMap", job.namespace, name)
            if owners is not None and job.uid not in owners:
                log.warning("%s/%s: ConfigMap %s is another's; the output is not kept", job.namespace, job.name, name)
                return
            kube.delete("ConfigMap", job.namespace, name)
            kube.create(config_map)
    except Exception as error:  # the output is worth a log line, never a held restart
        log.warning("%s/%s: the failed workers' output not kept in %s: %s", job.namespace, job.name, name, error)


def _record_refusal(
    body: dict[str, Any], status: dict[str, Any], version: str | None, refused: kube.CreationRefused, now: datetime
) -> tuple[list[Event], str | None]:
    """Show a refused creation (403) in the Blocked condition; status.reconcile keeps it while workers are
    missing. Guarded by the version the pass last wrote (version): StatusConflict when the job changed since."""
    parsed = FineTuneJobStatus.model_validate(status)
    before = parsed.model_dump(mode="json", by_alias=True)
    message = _refusal_message(refused)
    set_condition(parsed, BLOCKED, True, refused.reason, message, rfc3339(now))
    parsed.reason = refused.reason
    new = parsed.model_dump(mode="json", by_alias=True)
    if new == before:
        return [], None  # already shown: the retries add no Event
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    stored = kube.patch_job_status(namespace, name, merge_patch_between(before, new), version)
    return [Event("Warning", refused.reason, message)], _version_of(stored)


def _fail_rejected(
    body: dict[str, Any],
    written: dict[str, Any] | None,
    version: str | None,
    pods: list[dict[str, Any]],
    message: str,
    now: datetime,
) -> Outcome:
    """The API server refused an object the spec produced (422): fail the job and stop the pods it has. The
    failure is written only if the job is still at `version` (the version this pass wrote or read)."""
    metadata = {**body["metadata"], "resourceVersion": version or body["metadata"]["resourceVersion"]}
    as_written = {**body, "metadata": metadata, "status": written or body.get("status")}
    outcome = _fail_unreadable(as_written, pods, message, now)
    if outcome.reread:
        return outcome  # the job changed: the next pass decides again
    known = {p["metadata"]["name"] for p in pods}
    workers = (body.get("spec") or {}).get("workers") or 0
    for rank in range(workers if isinstance(workers, int) else 0):  # those made in this very pass: by uid too
        pod_name = builders.WORKER_NAME.format(job=metadata["name"], rank=rank)
        if pod_name not in known:
            _delete_if_owned(metadata["namespace"], pod_name, metadata["uid"])
    return outcome


def _delete_if_owned(namespace: str, name: str, uid: str) -> None:
    """Delete the pod `name` if the job with `uid` controls it, fenced by the pod's own uid."""
    pod = kube.get("Pod", namespace, name)
    if pod is not None and _owned(pod, uid):
        kube.delete_pod(namespace, name, pod["metadata"]["uid"])


def _fail_unreadable(body: dict[str, Any], pods: list[dict[str, Any]], message: str, now: datetime) -> Outcome:
    """Fail a job the operator cannot act on, naming the field, with its gang stopped; TTL still applies.
    Written as plain dicts: the status may be a newer version's too."""
    metadata = body["metadata"]
    namespace, name, uid = metadata["namespace"], metadata["name"], metadata["uid"]
    raw_status: dict[str, Any] = body["status"] if isinstance(body.get("status"), dict) else {}
    for pod in pods:
        if _owned(pod, uid) and _live(pod):
            kube.delete_pod(namespace, pod["metadata"]["name"], pod["metadata"].get("uid"))
    if raw_status.get("phase") in FINISHED_PHASES:
        return _expire(body, raw_status, now)
    stamp = rfc3339(now)
    conditions = [c for c in raw_status.get("conditions") or [] if isinstance(c, dict) and c.get("type") != "Failed"]
    failed = {"type": "Failed", "status": "True", "reason": REASON_INVALID_SPEC, "message": message}
    status = {
        **raw_status,
        "phase": Phase.failed.value,
        "reason": REASON_INVALID_SPEC,
        "completionTime": stamp,
        "conditions": [*conditions, {**failed, "lastTransitionTime": stamp}],
    }
    try:
        patch = merge_patch_between(raw_status, status)
        stored = kube.patch_job_status(namespace, name, patch, metadata["resourceVersion"])
    except kube.StatusConflict:
        return Outcome(body, [], 0, reread=True)
    outcome = _expire(body, status, now)
    events = [Event("Warning", REASON_INVALID_SPEC, message), *outcome.events]
    return Outcome(body, events, outcome.requeue_after, status, resource_version=_version_of(stored))


def _expire(body: dict[str, Any], status: dict[str, Any], now: datetime) -> Outcome:
    """TTL of a finished job read as plain dicts."""
    ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
    completed = status.get("completionTime")
    if not isinstance(ttl, int) or not isinstance(completed, str):
        return Outcome(body, [], None)
    remaining = (parse_time(completed) + timedelta(seconds=ttl) - now).total_seconds()
    if remaining <= 0:
        kube.delete_job(body["metadata"]["namespace"], body["metadata"]["name"], body["metadata"]["uid"])
        return Outcome(body, [], None)
    return Outcome(body, [], remaining)


class Freshness:
    """Which jobs' watched copies may be older than what the operator last saw on the server (its own status
    writes, mostly): a pass reads those from the API server; the others reconcile from the watch, no GET.

    Events of one watch arrive in order, so once the watch delivers the resourceVersion a pass ended on, the
    copy is current again. A version the watch never delivers (a watch gap that skipped it) only costs GETs:
    the next pass reads the newest version, which the re-listing delivers too.
    """

    UNKNOWN = ""  # a conflict, or a write whose version is not known: read the job next time

    def __init__(self) -> None:
        self._behind: dict[Any, str] = {}  # key -> the resourceVersion the watched copy must reach

    def current(self, key: Any, watched: dict[str, Any] | None) -> dict[str, Any] | None:
        """The watched copy when a pass may use it, else None (read the job)."""
        return watched if watched is not None and key not in self._behind else None

    def passed(self, key: Any, outcome: Outcome, watched: dict[str, Any] | None) -> None:
        """After a pass; watched: the watched copy now."""
        version = None if outcome.reread else outcome.resource_version
        caught_up = watched is not None and version is not None and version == _version_of(watched)
        if outcome.body is None or caught_up:
            self._behind.pop(key, None)
        else:
            self._behind[key] = version or self.UNKNOWN

    def watched(self, key: Any, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A watch event of the job. (Its echo of the operator's own status write still wakes a pass: some
        decisions act in the pass after the one that wrote them, e.g. a TTL of 0 once Succeeded is written.)"""
        if event_type == "DELETED" or self._behind.get(key) == _version_of(body):
            self._behind.pop(key, None)


class Expectations:
    """Pods a pass created that the pod watch has not delivered yet, kept as Kubernetes' ReplicaSet controller
    keeps its expectations: until the watch has them (or EXPECTATION_SECONDS passed), the job's next pass
    waits, since it would find its own new gang missing and make it again (409s for each pod and object).

    The pass woken by the echo of the status write that came just before those creates is the usual one.
    """

    def __init__(self) -> None:
        self._pending: dict[Any, tuple[set[tuple[str, str]], float]] = {}  # key -> pods, until when

    def created(self, key: Any, pods: list[tuple[str, str]], now: float) -> None:
        """pods: (name, attempt label) of the pods a pass created; now: a monotonic clock."""
        if pods:
            self._pending[key] = (set(pods), now + EXPECTATION_SECONDS)

    def unmet(self, key: Any, indexed: list[dict[str, Any]], now: float) -> bool:
        """Whether the key's pass should wait for the pod watch; indexed: the job's pods as watched now."""
        pending = self._pending.get(key)
        if pending is None:
            return False
        expected, until = pending
        if now < until and not expected <= {_attempt_of(pod) for pod in indexed}:
            return True
        del self._pending[key]
        return False


class Companions:
    """Makes gangs' companions (builders.build_gang_companions: the headless Service, the trainer's Role and
    RoleBinding, the progress ConfigMap) in the background, once the operator's pod creates pause: running
    workers use them, but their creation does not, and in a burst of new jobs the API server's writes go to the
    pods first (bench/RESULTS.md, "Operator CPU at scale"). A job's pass hands them over again while its progress
    ConfigMap is not watched, so a failure, or an operator restart before they were made, is repaired; one
    handed over recently, or failed and backing off, is not made twice.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # job uid -> no new attempt before this time, failed attempts in a row (kept COMPANIONS_SECONDS after)
        self._attempts: dict[str, tuple[float, int]] = {}
        self._handed_over: set[str] = set()  # job uids whose companions wait for or are in the making
        self._refused: dict[str, kube.CreationRefused] = {}  # job uid -> the API server's last refusal (403)

    def refusals(self) -> dict[str, kube.CreationRefused]:
        """By job uid, the companions the API server refused: the job's pass shows it and makes them itself."""
        with self._lock:
            return dict(self._refused)

    def made(self, uid: str) -> None:
        """A pass made the job's companions itself."""
        with self._lock:
            self._refused.pop(uid, None)

    def make(self, job: dict[str, Any], objects: list[dict[str, Any]], retry: Callable[[float], None]) -> None:
        """job: as watched or read (for its uid and Events); retry(seconds): wake the job's pass after a failure."""
        uid = job["metadata"]["uid"]
        with self._lock:
            now = self._clock()
            self._attempts = {u: a for u, a in self._attempts.items() if a[0] + COMPANIONS_SECONDS > now}
            not_before, failures = self._attempts.get(uid, (now, 0))
            if not_before > now or uid in self._handed_over or uid in self._refused:
                return
            self._attempts[uid] = (now + COMPANIONS_SECONDS, failures)
            self._handed_over.add(uid)
        kube.when_pods_pause(partial(self._make, job, objects, retry))

    def _make(self, job: dict[str, Any], objects: list[dict[str, Any]], retry: Callable[[float], None]) -> None:
        uid = job["metadata"]["uid"]
        try:
            make_companions(objects, uid)
        except Exception as error:
            with self._lock:
                self._handed_over.discard(uid)
                if isinstance(error, kube.CreationRefused):
                    self._refused[uid] = error
                failures = self._attempts.get(uid, (0.0, 0))[1] + 1
                backoff = min(2.0 ** (failures - 1), COMPANIONS_MAX_BACKOFF_SECONDS)
                if isinstance(error, kube.RetryLater):
                    backoff = error.seconds
                self._attempts[uid] = (self._clock() + backoff, failures)
            metadata = job["metadata"]
            log.warning("%s/%s: %s; retrying in %gs", metadata["namespace"], metadata["name"], error, backoff)
            if failures == 1 and not isinstance(error, (kube.RetryLater, kube.CreationRefused)):  # the pass shows a 403
                kube.post_event(job, "Warning", "CreateFailed", f"cannot create the gang's companion objects: {error}")
            retry(backoff)
        else:
            with self._lock:
                self._handed_over.discard(uid)
                not_before, _ = self._attempts.get(uid, (0.0, 0))
                self._attempts[uid] = (not_before, 0)


def make_companions(objects: list[dict[str, Any]], uid: str) -> None:
    """Make a gang's companions (or make sure those there are the job's with `uid`), in waves in this order: a
    RoleBinding goes after its Role (without `bind` the API server checks the Role's rules against the
    operator's own, and answers 404 while the Role is missing), and the progress ConfigMap last."""
    for kinds in (("Service", "Role"), ("RoleBinding",), ("ConfigMap",)):
        kube.in_parallel([partial(_ensure, obj, uid) for obj in objects if obj["kind"] in kinds])
