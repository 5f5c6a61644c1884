"""The reconcile decision: phases, conditions, restarts, permanent errors, suspend, deadlines, TTL."""

from datetime import datetime, timedelta, timezone

import pytest

from finetune_operator.api import RestartRecord
from finetune_operator.status import DEPARTED, reconcile, restart_backoff, rfc3339
from finetune_trainer.contract import InPlaceRestart, ProgressReport

from .conftest import pod

NOW = datetime(2026, 1, 1, 0, 10, tzinfo=timezone.utc)
CLAIM = {"persistentVolumeClaim": {"claimName": "runs"}}


def running_status(**extra):
    running = {
        "type": "Running",
        "status": "True",
        "reason": "AllWorkersRunning",
        "message": "",
        "lastTransitionTime": "2026-01-01T00:01:00Z",
    }
    return {
        "phase": "Running",
        "attempt": 0,
        "restarts": 0,
        "startTime": "2026-01-01T00:00:00Z",
        "conditions": [running],
        **extra,
    }


def condition(status, type_):
    return next(c for c in status.conditions if c.type == type_)


def test_new_job_creates_its_gang(make_job):
    decision = reconcile(make_job(), [], NOW)
    assert decision.status.phase == "Pending"
    assert decision.create_missing_workers == [0, 1]
    assert decision.status.start_time == rfc3339(NOW)
    assert condition(decision.status, "Created").reason == "GangCreated"
    # no claim: `kubectl describe` warns that outputs and checkpoints vanish with the pods
    assert [e.reason for e in decision.events] == ["GangCreated", "EphemeralStorage"]
    assert condition(decision.status, "OutputsPersistent").status == "False"


def test_a_job_with_a_claim_gets_no_ephemeral_storage_warning(make_job):
    decision = reconcile(make_job(storage={"persistentVolumeClaim": {"claimName": "runs"}}), [], NOW)
    assert [e.reason for e in decision.events] == ["GangCreated"]


def test_all_ready_is_running_and_counts_workers(make_job):
    job = make_job(status={"phase": "Pending", "attempt": 0})
    decision = reconcile(job, [pod(0, phase="Running", ready=True), pod(1, phase="Running", ready=True)], NOW)
    assert decision.status.phase == "Running"
    assert decision.create_missing_workers == []
    assert (decision.status.workers.ready, decision.status.workers.summary) == (2, "2/2")
    assert condition(decision.status, "Running").status == "True"


def test_partial_gang_after_operator_crash_is_completed_not_restarted(make_job):
    job = make_job(status={"phase": "Pending", "attempt": 0})
    decision = reconcile(job, [pod(0)], NOW)
    assert decision.create_missing_workers == [1]
    assert decision.status.restarts == 0


@pytest.mark.parametrize(
    ("failed_pod", "reason", "exit_code"),
    [
        (pod(1, phase="Failed", exit_code=137, reason="OOMKilled"), "OOMKilled", 137),
        (pod(1, phase="Failed", exit_code=1), "Error", 1),
        (pod(1, phase="Running", deleting=True), "Deleted", None),
    ],
)
def test_a_failed_worker_restarts_the_whole_gang(make_job, failed_pod, reason, exit_code):
    job = make_job(
        status=running_status(progress={"step": 120}, lastCheckpoint={"step": 100, "time": "2026-01-01T00:09:00Z"}),
        restartPolicy={"maxRestarts": 3, "backoffSeconds": 10},
        storage=CLAIM,
    )
    decision = reconcile(job, [pod(0, phase="Running", ready=True), failed_pod], NOW)
    status = decision.status
    assert (status.phase, status.restarts, status.attempt) == ("Restarting", 1, 1)
    assert sorted(decision.delete_workers) == ["llama-worker-0", "llama-worker-1"]
    assert decision.create_missing_workers == []
    assert status.restart_after == rfc3339(NOW + timedelta(seconds=10)) and decision.requeue_after == 10
    record = status.restart_history[-1]
    assert (record.reason, record.exit_code, record.pod, record.node) == (
        reason,
        exit_code,
        "llama-worker-1",
        "gpu-node-1",
    )
    assert (record.step_reached, record.resumed_from_step, status.steps_lost) == (120, 100, 20)
    assert record.gpu_seconds_lost == status.gpu_seconds_lost == 60 * 2  # a minute since the checkpoint, 2 GPUs
    assert decision.events[0].type == "Warning" and "llama-worker-1" in decision.events[0].message


def test_a_gang_restart_keeps_the_failed_workers_output_for_32_ranks_at_most(make_job):
    job = make_job(workers=40, status=running_status())
    failed = [pod(rank, phase="Failed", exit_code=134, message=f"rank {rank}\nabort") for rank in range(39, -1, -1)]
    decision = reconcile(job, failed, NOW)
    assert decision.status.phase == "Restarting"
    assert list(decision.failure_output) == [f"llama-worker-{rank}" for rank in range(32)]
    assert decision.failure_output["llama-worker-0"] == "rank 0\nabort"  # whole, lines and all
    assert "kubectl describe configmap llama-failure" in decision.events[0].message


def test_next_attempt_waits_for_backoff_then_for_old_pods_to_go(make_job):
    status = running_status(phase="Restarting", attempt=1, restarts=1, restartAfter=rfc3339(NOW + timedelta(seconds=5)))
    old = [pod(0, attempt=0, phase="Failed", exit_code=1), pod(1, attempt=0, deleting=True, deleted_at=rfc3339(NOW))]
    waiting = reconcile(make_job(status=status), old, NOW)
    assert waiting.create_missing_workers == [] and waiting.requeue_after == 5
    later = NOW + timedelta(seconds=6)
    blocked = reconcile(make_job(status=status), old, later)
    assert blocked.create_missing_workers == [] and blocked.delete_workers == ["llama-worker-0"]
    assert blocked.force_delete_workers == [] and blocked.requeue_after == 30 - 6  # the terminating pod's margin
    ready = reconcile(make_job(status=status), [], later)
    assert ready.create_missing_workers == [0, 1] and ready.status.phase == "Restarting"
    running = reconcile(
        make_job(status=status), [pod(r, attempt=1, phase="Running", ready=True) for r in (0, 1)], later
    )
    assert running.status.phase == "Running" and running.status.restarts == 1
    assert not any(c.type == "Restarting" and c.status == "True" for c in running.status.conditions)


def test_stale_failures_do_not_count_twice(make_job):
    status = running_status(phase="Restarting", attempt=1, restarts=1, restartAfter=rfc3339(NOW))
    decision = reconcile(make_job(status=status), [pod(0, attempt=0, phase="Failed", exit_code=137)], NOW)
    assert decision.status.restarts == 1


def test_exit_code_2_fails_at_once_without_restart(make_job):
    failed = pod(0, phase="Failed", exit_code=2, message="dataset.path /data/x.jsonl does not exist")
    decision = reconcile(make_job(status=running_status()), [failed, pod(1, phase="Running", ready=True)], NOW)
    assert (decision.status.phase, decision.status.restarts) == ("Failed", 0)
    failed_condition = condition(decision.status, "Failed")
    assert failed_condition.reason == "PermanentError" and "/data/x.jsonl" in failed_condition.message
    assert decision.delete_workers == ["llama-worker-1"]
    assert decision.status.completion_time == rfc3339(NOW)


def test_permanent_error_wins_over_a_peer_crash(make_job):
    pods = [
        pod(0, phase="Failed", exit_code=1, finished_at="2026-01-01T00:00:01Z"),
        pod(1, phase="Failed", exit_code=2, finished_at="2026-01-01T00:00:02Z"),
    ]
    assert reconcile(make_job(status=running_status()), pods, NOW).status.phase == "Failed"


def test_restart_limit_fails_the_job(make_job):
    job = make_job(status=running_status(restarts=2, attempt=2), restartPolicy={"maxRestarts": 2})
    decision = reconcile(job, [pod(0, attempt=2, phase="Failed", exit_code=1)], NOW)
    assert decision.status.phase == "Failed"
    assert condition(decision.status, "Failed").reason == "RestartLimitExceeded"
    assert decision.status.restarts == 2


def test_all_succeeded_is_succeeded(make_job):
    pods = [pod(r, phase="Succeeded", exit_code=0) for r in (0, 1)]
    decision = reconcile(make_job(status=running_status()), pods, NOW)
    assert decision.status.phase == "Succeeded"
    assert condition(decision.status, "Succeeded").reason == "AllWorkersSucceeded"
    assert condition(decision.status, "Running").status == "False"


def test_one_rank_done_is_still_running(make_job):
    pods = [pod(0, phase="Succeeded", exit_code=0), pod(1, phase="Running", ready=True)]
    assert reconcile(make_job(status=running_status()), pods, NOW).status.phase == "Running"


def test_worker_missing_while_running_is_a_failure(make_job):
    decision = reconcile(make_job(status=running_status()), [pod(0, phase="Running", ready=True)], NOW)
    assert decision.status.phase == "Restarting"
    assert decision.status.restart_history[-1].reason == "Deleted"


def test_suspend_deletes_the_gang_and_resume_starts_a_fresh_attempt(make_job):
    pods = [pod(r, phase="Running", ready=True) for r in (0, 1)]
    suspended = reconcile(make_job(status=running_status(), suspend=True), pods, NOW)
    assert suspended.status.phase == "Suspended" and len(suspended.delete_workers) == 2
    assert condition(suspended.status, "Running").status == "False"
    status = suspended.status.model_dump(by_alias=True, mode="json")
    resumed = reconcile(make_job(status=status, suspend=False), [], NOW)
    assert resumed.status.phase == "Pending" and resumed.status.attempt == 1
    assert resumed.create_missing_workers == [0, 1] and resumed.status.restarts == 0
    assert condition(resumed.status, "Suspended").status == "False"


def test_active_deadline_fails_the_job(make_job):
    job = make_job(status=running_status(), activeDeadlineSeconds=300)
    pods = [pod(r, phase="Running", ready=True) for r in (0, 1)]
    assert reconcile(job, pods, NOW - timedelta(seconds=400)).requeue_after == 100
    decision = reconcile(job, pods, NOW)
    assert decision.status.phase == "Failed"
    assert condition(decision.status, "Failed").reason == "DeadlineExceeded"
    assert len(decision.delete_workers) == 2


def test_ttl_deletes_the_finished_job(make_job):
    done = {"phase": "Succeeded", "completionTime": rfc3339(NOW - timedelta(seconds=30))}
    assert reconcile(make_job(status=done, ttlSecondsAfterFinished=60), [], NOW).requeue_after == 30
    assert reconcile(make_job(status=done, ttlSecondsAfterFinished=10), [], NOW).delete_job is True
    assert reconcile(make_job(status=done), [], NOW).delete_job is False


def test_progress_report_reaches_the_status(make_job):
    report = ProgressReport(step=40, total_steps=100, loss=1.5, tokens_per_second=900.0, last_checkpoint_step=30)
    decision = reconcile(
        make_job(status=running_status()), [pod(r, phase="Running", ready=True) for r in (0, 1)], NOW, progress=report
    )
    assert (decision.status.progress.step, decision.status.progress.total_steps) == (40, 100)
    assert decision.status.last_checkpoint.step == 30


def test_image_pull_problem_is_shown_while_pending(make_job):
    stuck = pod(0, scheduled_at=rfc3339(NOW))
    stuck["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "ImagePullBackOff", "message": "no"}}
    decision = reconcile(make_job(status={"phase": "Pending"}), [stuck, pod(1, scheduled_at=rfc3339(NOW))], NOW)
    blocked = condition(decision.status, "Blocked")
    assert blocked.reason == "ImagePullBackOff" and "llama-worker-0" in blocked.message
    assert decision.status.reason == "ImagePullBackOff"
    assert [e.reason for e in decision.events] == ["ImagePullBackOff"]


def test_invalid_name_fails_with_the_field(make_job):
    decision = reconcile(make_job(name="x" * 60), [], NOW)
    assert decision.status.phase == "Failed" and "metadata.name" in condition(decision.status, "Failed").message
    assert decision.create_missing_workers == []


@pytest.mark.parametrize(("restarts", "expected"), [(1, 10), (2, 20), (3, 40), (10, 300)])
def test_backoff_doubles_up_to_its_cap(restarts, expected):
    assert restart_backoff(10, 300, restarts) == expected


def test_conditions_keep_transition_time_when_unchanged(make_job):
    pods = [pod(r, phase="Running", ready=True) for r in (0, 1)]
    first = reconcile(make_job(status={"phase": "Pending"}), pods, NOW).status
    again = reconcile(make_job(status=first.model_dump(by_alias=True, mode="json")), pods, NOW + timedelta(hours=1))
    assert condition(again.status, "Running").last_transition_time == rfc3339(NOW)
    assert again.events == []


@pytest.mark.parametrize(
    ("edit", "refused_field"),
    [
        ({"suspend": True}, None),
        ({"restartPolicy": {"maxRestarts": 9}}, None),
        ({"activeDeadlineSeconds": 60}, None),
        ({"ttlSecondsAfterFinished": 5}, None),
        ({"startupTimeoutSeconds": 60}, None),
        ({"workers": 4}, "spec.workers"),
        ({"training": {"learningRate": 0.1}}, "spec.training.learningRate"),
        ({"template": {"nodeSelector": {"gpu": "a100"}}}, "spec.template.nodeSelector"),
    ],
)
def test_only_the_mutable_fields_may_change_on_a_live_job(make_job, edit, refused_field):
    accepted = make_job().spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    job = make_job(status=running_status(observedGeneration=1), **edit)
    job.metadata["generation"] = 2
    pods = [pod(r, phase="Running", ready=True) for r in (0, 1)]
    decision = reconcile(job, pods, NOW, accepted=accepted)
    if refused_field is None:
        assert decision.status.observed_generation == 2 and not any(
            c.type == "EditRefused" for c in decision.status.conditions
        )
        assert decision.status.accepted_spec is None  # the spec is what runs: not kept in the status twice
        return
    refused = condition(decision.status, "EditRefused")
    assert refused.status == "True" and refused_field in refused.message
    assert decision.status.observed_generation == 1 and decision.spec.workers == 2
    assert decision.status.accepted_spec == accepted  # shown while the spec differs from it
    assert decision.status.phase == "Running" and decision.delete_workers == []
    assert [e.reason for e in decision.events] == ["SpecEditRefused"]


def test_a_restart_without_storage_says_the_run_starts_over(make_job):
    job = make_job(status=running_status(progress={"step": 120}, lastCheckpoint={"step": 100}))
    decision = reconcile(job, [pod(0, phase="Running", ready=True), pod(1, phase="Failed", exit_code=1)], NOW)
    status = decision.status
    assert status.steps_lost == 120 and status.last_checkpoint is None
    assert status.restart_history[-1].resumed_from_step == 0
    assert "from step 0" in condition(status, "Restarting").message


def test_resume_resets_the_start_time_so_suspended_time_never_counts(make_job):
    suspended = running_status(phase="Suspended", startTime="2025-01-01T00:00:00Z")
    decision = reconcile(make_job(status=suspended, activeDeadlineSeconds=60), [], NOW)
    assert decision.status.phase == "Pending" and decision.status.start_time == rfc3339(NOW)
    assert decision.create_missing_workers == [0, 1]


def _with_sidecar(p: dict) -> dict:
    """The pod as the kubelet shows it while a sidecar that never exits still runs beside the trainer."""
    p["status"]["phase"] = "Running"
    p["status"]["containerStatuses"].append({"name": "shipper", "state": {"running": {}}})
    return p


def test_a_sidecar_that_never_exits_does_not_hold_success(make_job):
    job = make_job(status=running_status())
    pods = [_with_sidecar(pod(r, exit_code=0)) for r in (0, 1)]
    decision = reconcile(job, pods, NOW)
    assert decision.status.phase == "Succeeded"
    job.status = decision.status
    assert sorted(reconcile(job, pods, NOW).delete_workers) == ["llama-worker-0", "llama-worker-1"]


def test_a_sidecar_does_not_hide_the_trainers_failure(make_job):
    pods = [_with_sidecar(pod(0, exit_code=2, message="bad data")), pod(1, phase="Running", ready=True)]
    assert reconcile(make_job(status=running_status()), pods, NOW).status.phase == "Failed"


def test_the_status_names_where_the_adapter_is(make_job):
    claim = {"persistentVolumeClaim": {"claimName": "runs"}, "subPath": "exp-1"}
    keep_best = {"keepBest": {"metric": "eval_loss"}}
    job = make_job(storage=claim, checkpoint=keep_best, dataset={"path": "/d.jsonl", "evalFraction": 0.1})
    report = ProgressReport(step=40, eval_loss=0.5, best_step=30)
    outputs = reconcile(job, [], NOW, progress=report).status.outputs
    assert outputs is not None
    assert (outputs.claim_name, outputs.adapter, outputs.best_adapter, outputs.best_step) == (
        "runs",
        "exp-1/adapter",
        "exp-1/adapter-best",
        30,
    )
    ephemeral = reconcile(make_job(), [], NOW).status.outputs
    assert ephemeral is not None and (ephemeral.claim_name, ephemeral.adapter, ephemeral.best_adapter) == (
        None,
        "adapter",
        None,
    )


def test_eval_metrics_reach_the_status(make_job):
    report = ProgressReport(step=40, eval_loss=0.75, eval_accuracy=0.9)
    progress = reconcile(make_job(status=running_status()), [], NOW, progress=report).status.progress
    assert progress is not None and (progress.eval_loss, progress.eval_accuracy) == (0.75, 0.9)


# --- failure classes: disruptions, stalls, startup (DESIGN.md's decision table) -----------------------------


def marked(p: dict, type_: str, reason: str, message: str = "", since: str = "2026-01-01T00:09:30Z") -> dict:
    """A pod as a controller marks it before taking it away (DisruptionTarget, Kueue's TerminationTarget)."""
    p["status"]["conditions"].append(
        {"type": type_, "status": "True", "reason": reason, "message": message, "lastTransitionTime": since}
    )
    return p


def ready_gang(attempt: int = 0) -> list[dict]:
    return [pod(r, attempt=attempt, phase="Running", ready=True) for r in (0, 1)]


@pytest.mark.parametrize(
    ("taken", "reason", "who"),
    [
        (
            marked(pod(1, phase="Running", deleting=True), "DisruptionTarget", "PreemptionByScheduler"),
            "PreemptionByScheduler",
            "the scheduler's preemption",
        ),
        (
            marked(pod(1, phase="Running", deleting=True), "TerminationTarget", "StoppedByKueue", "Preempted by q"),
            "StoppedByKueue",
            "Kueue's preemption",
        ),
        (
            marked(pod(1, phase="Running", deleting=True), "DisruptionTarget", "EvictionByEvictionAPI"),
            "EvictionByEvictionAPI",
            "an eviction (drain",
        ),
        (
            marked(pod(1, phase="Running", deleting=True), "DisruptionTarget", "DeletionByTaintManager"),
            "DeletionByTaintManager",
            "NotReady or unreachable",
        ),
        (
            marked(pod(1, phase="Failed", exit_code=143), "DisruptionTarget", "TerminationByKubelet"),
            "TerminationByKubelet",
            "the kubelet",
        ),
        (pod(1, phase="Failed", pod_reason="Evicted", message="node low on memory"), "Evicted", "node pressure"),
        (pod(1, phase="Running", deleting=True, pod_reason="NodeLost"), "NodeLost", "node unreachable"),
    ],
)
def test_a_disruption_restarts_the_gang_without_spending_restarts(make_job, taken, reason, who):
    job = make_job(
        status=running_status(progress={"step": 120}, lastCheckpoint={"step": 100, "time": "2026-01-01T00:09:00Z"}),
        restartPolicy={"maxRestarts": 0},
        storage=CLAIM,
    )
    decision = reconcile(job, [pod(0, phase="Running", ready=True), taken], NOW)
    status = decision.status
    assert (status.phase, status.restarts, status.disruptions, status.attempt) == ("Restarting", 0, 1, 1)
    record = status.restart_history[-1]
    assert (record.kind, record.reason, record.pod, record.resumed_from_step) == (
        "Disruption",
        reason,
        "llama-worker-1",
        100,
    )
    restarting = condition(status, "Restarting")
    assert restarting.reason == "WorkerDisrupted" and who in restarting.message
    assert "disruption 1 of 20" in restarting.message and "restarts are kept for failures" in restarting.message
    assert record.message.startswith("taken by ") and who in record.message
    assert sorted(decision.delete_workers) == ["llama-worker-0", "llama-worker-1"]
    assert decision.requeue_after == 0  # nothing failed: no backoff


def test_a_worker_marked_and_gone_before_the_pass_is_a_disruption_that_blocks_no_new_gang(make_job):
    """The informer keeps a deleted worker's last state when a disruption took it (DEPARTED): the pass counts a
    disruption, not a pod deleted for no reason, and does not wait for the departed pod to go: it has."""
    job = make_job(status=running_status(), restartPolicy={"maxRestarts": 0})
    departed = marked(pod(1, phase="Running", deleting=True), "DisruptionTarget", "PreemptionByScheduler")
    departed[DEPARTED] = True
    decision = reconcile(job, [pod(0, phase="Running", ready=True), departed], NOW)
    status = decision.status
    assert (status.phase, status.restarts, status.disruptions) == ("Restarting", 0, 1)
    assert status.restart_history[-1].reason == "PreemptionByScheduler"
    assert decision.delete_workers == ["llama-worker-0"]  # the departed one is gone already

    old = marked(pod(1, phase="Running", deleting=True), "DisruptionTarget", "PreemptionByScheduler")
    old[DEPARTED] = True
    later = reconcile(make_job(status={**running_status(), "phase": "Restarting", "attempt": 1}), [old], NOW)
    assert later.create_missing_workers == [0, 1]  # an earlier attempt's departed worker holds nothing back


def test_a_pod_deleted_without_a_disruption_condition_is_a_failure_and_says_so(make_job):
    decision = reconcile(make_job(status=running_status()), [pod(0, phase="Running", deleting=True)], NOW)
    status = decision.status
    assert (status.restarts, status.disruptions, status.restart_history[-1].kind) == (1, 0, "Crash")
    assert "no disruption condition" in condition(status, "Restarting").message


def test_the_disruption_bound_fails_the_job(make_job):
    job = make_job(status=running_status(disruptions=2), restartPolicy={"maxDisruptions": 2})
    taken = marked(pod(1, phase="Running", deleting=True), "TerminationTarget", "StoppedByKueue")
    decision = reconcile(job, [pod(0, phase="Running", ready=True), taken], NOW)
    assert decision.status.phase == "Failed"
    failed = condition(decision.status, "Failed")
    assert failed.reason == "DisruptionLimitExceeded" and "maxDisruptions=2" in failed.message


@pytest.mark.parametrize(
    ("crashed_at", "kind"), [("2026-01-01T00:09:40Z", "Disruption"), ("2026-01-01T00:09:20Z", "Crash")]
)
def test_a_peer_that_crashed_after_the_disruption_does_not_make_it_a_failure(make_job, crashed_at, kind):
    taken = marked(pod(1, phase="Running", deleting=True), "DisruptionTarget", "PreemptionByScheduler")
    peer = pod(0, phase="Failed", exit_code=1, finished_at=crashed_at)  # lost its peer, or crashed before
    decision = reconcile(make_job(status=running_status()), [peer, taken], NOW)
    assert decision.status.restart_history[-1].kind == kind


def test_a_gang_lost_again_before_it_ran_gets_an_event_of_its_own(make_job):
    status = running_status(phase="Restarting", attempt=1, disruptions=1, restartAfter=rfc3339(NOW))
    taken = marked(pod(0, attempt=1, phase="Running", deleting=True), "TerminationTarget", "StoppedByKueue")
    decision = reconcile(make_job(status=status), [taken, pod(1, attempt=1)], NOW)
    assert decision.status.disruptions == 2
    assert [(e.reason, "Kueue's preemption" in e.message) for e in decision.events] == [("WorkerDisrupted", True)]


def gated(p: dict) -> dict:
    p["spec"] = {"schedulingGates": [{"name": "kueue.x-k8s.io/admission"}]}
    p["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]
    return p


def test_a_gang_held_by_its_queue_is_queued_and_never_timed_out(make_job):
    status = running_status(phase="Restarting", attempt=1, disruptions=1, restartAfter=rfc3339(NOW))
    pods = [gated(pod(r, attempt=1, node=None)) for r in (0, 1)]
    decision = reconcile(make_job(status=status), pods, NOW + timedelta(hours=5))
    assert decision.status.phase == "Queued" and decision.status.startup_retries == 0
    assert condition(decision.status, "Queued").reason == "SchedulingGated"
    assert condition(decision.status, "Running").status == "False"
    assert decision.delete_workers == [] and decision.requeue_after is None


def report(step, activity="training", time="2026-01-01T00:09:00Z"):
    return ProgressReport(step=step, activity=activity, time=time)


@pytest.mark.parametrize(
    ("previous", "new", "advanced"),
    [
        (None, report(5), True),
        (report(5), report(6, time="2026-01-01T00:09:10Z"), True),  # a new step
        (report(5), report(5, time="2026-01-01T00:09:10Z"), False),  # the same step, reported again: no progress
        (report(0, "loading"), report(0, "loading", time="2026-01-01T00:09:10Z"), True),  # liveness while loading
        (report(5, "evaluating"), report(5, "evaluating", time="2026-01-01T00:09:10Z"), True),
        (report(5, "evaluating"), report(5, "evaluating"), False),  # the same report: nothing new
        (report(5), report(5, "saving"), True),  # a new activity
    ],
)
def test_what_counts_as_progress(make_job, previous, new, advanced):
    earlier = NOW - timedelta(minutes=5)
    job = make_job(status=running_status())
    status = reconcile(job, ready_gang(), earlier, previous).status if previous else job.status
    after = reconcile(make_job(status=status.model_dump(by_alias=True, mode="json")), ready_gang(), NOW, new)
    assert after.status.progress.advanced == rfc3339(NOW if advanced else earlier)


def stalled_job(make_job, deadline=60, restarts=0, **extra):
    progress = {
        "step": 7,
        "activity": "training",
        "updated": "2026-01-01T00:08:00Z",
        "advanced": "2026-01-01T00:08:50Z",
    }
    return make_job(
        status=running_status(progress=progress, lastCheckpoint={"step": 5}, restarts=restarts, **extra),
        restartPolicy={"progressDeadlineSeconds": deadline, "maxRestarts": 1},
        storage=CLAIM,
    )


def test_a_gang_without_progress_past_its_deadline_is_restarted_as_stalled(make_job):
    assert reconcile(stalled_job(make_job), ready_gang(), NOW - timedelta(seconds=50)).requeue_after == 40
    decision = reconcile(stalled_job(make_job), ready_gang(), NOW)  # 70 s after the last step
    status = decision.status
    assert (status.phase, status.restarts, status.attempt) == ("Restarting", 1, 1)
    record = status.restart_history[-1]
    assert (record.kind, record.reason, record.step_reached, record.resumed_from_step) == ("Stall", "Stalled", 7, 5)
    assert [e.reason for e in decision.events] == ["Stalled"]
    message = decision.events[0].message
    assert "since 2026-01-01T00:08:50Z (at step 7, training)" in message and "progressDeadlineSeconds=60" in message
    assert sorted(decision.delete_workers) == ["llama-worker-0", "llama-worker-1"]


def test_a_stall_spends_restarts(make_job):
    decision = reconcile(stalled_job(make_job, restarts=1, attempt=1), ready_gang(attempt=1), NOW)
    failed = condition(decision.status, "Failed")
    assert failed.reason == "RestartLimitExceeded" and "the gang stalled" in failed.message


def test_a_deadline_of_0_is_off_and_silence_before_the_first_report_is_not_a_stall(make_job):
    assert reconcile(stalled_job(make_job, deadline=0), ready_gang(), NOW + timedelta(days=1)).status.phase == "Running"
    job = make_job(status=running_status(), restartPolicy={"progressDeadlineSeconds": 60})
    decision = reconcile(job, ready_gang(), NOW + timedelta(days=1))
    assert decision.status.phase == "Running" and decision.requeue_after is None


def test_a_report_from_before_the_last_restart_does_not_arm_the_deadline(make_job):
    job = stalled_job(make_job, attempt=1)
    job.status.restart_history = [
        RestartRecord(time="2026-01-01T00:08:30Z", attempt=0, reason="Error", pod="llama-worker-1")
    ]
    assert reconcile(job, ready_gang(attempt=1), NOW).status.phase == "Running"


def started(p: dict, at: str) -> dict:
    p["status"]["containerStatuses"][0]["state"] = {"running": {"startedAt": at}}
    return p


def test_the_startup_timer_waits_for_image_pulls_and_counts_from_the_last_start(make_job):
    job = make_job(status={"phase": "Pending", "attempt": 0}, startupTimeoutSeconds=60)
    pulling = [pod(0), pod(1)]  # bound, ContainerCreating: pulling the image
    assert reconcile(job, pulling, NOW).requeue_after == 120  # a pass comes back to report a long pull
    decision = reconcile(job, pulling, NOW + timedelta(hours=1))
    assert decision.status.startup_retries == 0 and decision.requeue_after is None
    assert condition(decision.status, "Blocked").reason == "ContainerCreating"  # a long pull is shown, not failed
    up = [started(pod(0), "2026-01-01T00:09:30Z"), started(pod(1), "2026-01-01T00:09:50Z")]  # not Ready yet
    assert reconcile(job, up, NOW).requeue_after == 50
    assert reconcile(job, up, NOW + timedelta(seconds=50)).status.startup_retries == 1


def test_startup_retries_are_bounded_and_the_failure_names_what_blocked(make_job):
    job = make_job(
        status={"phase": "Pending", "attempt": 3, "startupRetries": 3},
        restartPolicy={"maxStartupRetries": 3},
        startupTimeoutSeconds=60,
    )
    pods = [pod(0, attempt=3), pod(1, attempt=3, node=None, unschedulable="0/4 nodes have nvidia.com/gpu")]
    decision = reconcile(job, pods, NOW)
    failed = condition(decision.status, "Failed")
    assert failed.reason == "StartupRetriesExceeded"
    assert "maxStartupRetries=3" in failed.message and "0/4 nodes have nvidia.com/gpu" in failed.message
    assert decision.status.restarts == 0


@pytest.mark.parametrize(
    ("status", "pods", "ready"),
    [
        ({"phase": "Pending"}, ready_gang(), True),
        (running_status(), [pod(0, phase="Running", ready=True), pod(1, phase="Failed", exit_code=1)], False),
        (running_status(), [pod(r, phase="Succeeded", exit_code=0) for r in (0, 1)], True),
        ({"phase": "Pending"}, [pod(0), pod(1)], False),
    ],
)
def test_ready_says_whether_the_gang_runs_or_succeeded_for_health_checks(make_job, status, pods, ready):
    decision = reconcile(make_job(status=status), pods, NOW)
    ready_condition = condition(decision.status, "Ready")
    assert (ready_condition.status, ready_condition.observed_generation) == ("True" if ready else "False", 1)


def in_place_report(*restarts, attempt=0, step=3, time="2026-01-01T00:09:50Z"):
    return ProgressReport(
        step=step,
        time=time,
        attempt=attempt,
        in_place_restarts=[
            InPlaceRestart(index=i, time="2026-01-01T00:09:40Z", pod=f"job-worker-{rank}", rank=rank, exit_code=code)
            for i, (rank, code) in enumerate(restarts, start=1)
        ],
    )


def in_place_job(make_job, **status):
    return make_job(
        status=running_status(
            progress={"step": 7, "updated": "2026-01-01T00:09:30Z"},
            lastCheckpoint={"step": 5, "time": "2026-01-01T00:09:00Z"},
            **status,
        ),
        restartPolicy={"maxRestarts": 3},
    )


@pytest.mark.parametrize(("exit_code", "reason"), [(3, "Stalled"), (1, "Error"), (134, "SIGABRT")])
def test_an_in_place_restart_names_why_the_process_failed(make_job, exit_code, reason):
    """Exit 3: the trainer's collective timed out waiting for a peer, i.e. the gang stalled."""
    decision = reconcile(in_place_job(make_job), ready_gang(), NOW, in_place_report((0, exit_code)))
    assert decision.status.restart_history[-1].reason == reason


def test_an_in_place_restart_is_counted_once_with_its_failed_rank(make_job):
    job = in_place_job(make_job)
    decision = reconcile(job, ready_gang(), NOW, in_place_report((1, 137)))
    status = decision.status
    assert (status.restarts, status.attempt, status.phase) == (1, 0, "Running")
    assert decision.delete_workers == [] and decision.create_missing_workers == []
    record = status.restart_history[-1]
    assert (record.kind, record.index, record.pod, record.exit_code, record.reason) == (
        "InPlace",
        1,
        "job-worker-1",
        137,
        "SIGKILL",
    )
    assert (record.step_reached, record.resumed_from_step, status.steps_lost) == (7, 5, 2)
    event = next(e for e in decision.events if e.reason == "RestartedInPlace")
    assert "restart 1 of 3" in event.message and "kubectl logs job-worker-1" in event.message
    # the next pass (or a restarted operator) reads the same report again: nothing more is counted
    job.status = status
    again = reconcile(job, ready_gang(), NOW + timedelta(seconds=5), in_place_report((1, 137)))
    assert again.status.restarts == 1 and len(again.status.restart_history) == 1
    assert not [e for e in again.events if e.reason == "RestartedInPlace"]
    # a second one in the same attempt is counted; a report of another attempt is not
    second = reconcile(job, ready_gang(), NOW, in_place_report((1, 137), (0, 1)))
    assert second.status.restarts == 2 and second.status.restart_history[-1].index == 2
    other = reconcile(job, ready_gang(), NOW, in_place_report((1, 137), (0, 1), attempt=1))
    assert other.status.restarts == 1


def test_in_place_and_recreated_restarts_share_one_budget(make_job):
    job = in_place_job(make_job)
    job.status = reconcile(job, ready_gang(), NOW, in_place_report((1, 137), (1, 1))).status
    assert job.status.restarts == 2
    # an agent out of restarts ends its pod; the job has one restart left, so the gang is made again
    failed = [pod(0, phase="Running", ready=True), pod(1, phase="Failed", exit_code=1)]
    decision = reconcile(job, failed, NOW, in_place_report((1, 137), (1, 1)))
    assert (decision.status.restarts, decision.status.attempt) == (3, 1)
    assert decision.status.restart_history[-1].kind == "Crash"
    # the new gang's agents got no restarts left: its next failure ends the job
    job.status = decision.status
    last = reconcile(job, [pod(0, attempt=1, phase="Failed", exit_code=137)], NOW + timedelta(minutes=5))
    assert condition(last.status, "Failed").reason == "RestartLimitExceeded"
    assert last.status.restarts == 3


def test_a_report_of_an_earlier_attempt_does_not_reach_the_status(make_job):
    job = make_job(status=running_status(attempt=2, progress={"step": 4, "updated": "2026-01-01T00:09:30Z"}))
    decision = reconcile(
        job, ready_gang(attempt=2), NOW, ProgressReport(step=9, attempt=1, time="2026-01-01T00:09:55Z")
    )
    assert decision.status.progress.step == 4
    decision = reconcile(
        job, ready_gang(attempt=2), NOW, ProgressReport(step=9, attempt=2, time="2026-01-01T00:09:55Z")
    )
    assert decision.status.progress.step == 9
