"""What a GPU fleet does to a job, for real (issue 24): the operator process, the embedded cluster's real node,
workers training the tiny model. Preemptions marked and deleted as the scheduler and Kueue do are
disruptions (no restart spent); a worker frozen with SIGSTOP stalls its peer's next collective, which times
out and restarts the gang in place as Stalled; a whole gang frozen is a stall the progress deadline restarts;
and with the deadline off nothing restarts it.
"""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime, timezone
from typing import Any

import kubernetes
import pytest

from finetune_dev.harness import Jobs, kubectl, wait_for
from finetune_operator.builders import LABEL_ATTEMPT
from tests.e2e.test_training import describe, finish, first_checkpoint, run_job, trainer_process, training_process
from tests.e2e.tiny_jobs import JOB, TOTAL_STEPS, cluster_spec, metrics

pytestmark = pytest.mark.e2e

DEADLINE_SECONDS = 60
RESTARTED_WITHIN_SECONDS = 150  # the bound from the hang to the restart
WATCH_SECONDS = 150  # how long a frozen worker under no deadline is watched: the fault's length, not a wait


def running_worker(jobs: Jobs, rank: int, attempt: int) -> Any:
    """The worker's pod of that attempt once its trainer container runs."""

    def found() -> Any:
        pods = [p for p in jobs.pods(JOB, attempt) if p.metadata.name == f"{JOB}-worker-{rank}"]
        statuses = pods[0].status.container_statuses if pods and not pods[0].metadata.deletion_timestamp else None
        return pods[0] if statuses and statuses[0].state.running else None

    return wait_for(found, 120, what=f"worker {rank} of attempt {attempt} to run")


def preempt(core: kubernetes.client.CoreV1Api, namespace: str, pod: str, type_: str, reason: str) -> None:
    """What the scheduler's preemption (DisruptionTarget) and Kueue (TerminationTarget) do: mark, then delete."""
    current = core.read_namespaced_pod_status(pod, namespace)
    conditions = [c.to_dict() for c in current.status.conditions or []]
    conditions = [
        {
            "type": c["type"],
            "status": c["status"],
            "reason": c.get("reason"),
            "message": c.get("message"),
            "lastTransitionTime": c["last_transition_time"].strftime("%Y-%m-%dT%H:%M:%SZ")
            if c.get("last_transition_time")
            else None,
        }
        for c in conditions
    ]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    conditions.append(
        {"type": type_, "status": "True", "reason": reason, "message": f"e2e: {reason}", "lastTransitionTime": stamp}
    )
    core.patch_namespaced_pod_status(pod, namespace, {"status": {"conditions": conditions}})
    core.delete_namespaced_pod(pod, namespace)


def test_preemptions_by_the_scheduler_and_kueue_spend_no_restart(kube, jobs, runs, operator, node, tiny_assets):
    core = kubernetes.client.CoreV1Api(kube.api_client())
    run_job(jobs, cluster_spec(tiny_assets, restartPolicy={"maxRestarts": 0, "backoffSeconds": 0}))
    first_checkpoint(runs / JOB)
    running_worker(jobs, 1, attempt=0)
    preempt(core, jobs.namespace, f"{JOB}-worker-1", "DisruptionTarget", "PreemptionByScheduler")
    running_worker(jobs, 0, attempt=1)
    preempt(core, jobs.namespace, f"{JOB}-worker-0", "TerminationTarget", "StoppedByKueue")

    status = finish(jobs, node, "Succeeded")

    assert (status["restarts"], status["disruptions"]) == (0, 2), status
    records = status["restartHistory"]
    assert [(r["kind"], r["reason"], r["pod"]) for r in records] == [
        ("Disruption", "PreemptionByScheduler", f"{JOB}-worker-1"),
        ("Disruption", "StoppedByKueue", f"{JOB}-worker-0"),
    ]
    assert "taken by the scheduler's preemption" in records[0]["message"]
    assert "taken by Kueue's preemption" in records[1]["message"]
    assert metrics(runs / JOB)["global_step"] == TOTAL_STEPS
    text = describe(jobs)
    assert "the scheduler's preemption" in text and "Kueue's preemption" in text


def freeze(jobs: Jobs, node, ranks: tuple[int, ...]) -> list[Any]:
    """SIGSTOP those workers' training processes once the run has a checkpoint: they live and say nothing."""
    frozen = [training_process(node, running_worker(jobs, rank, attempt=0)) for rank in ranks]
    for process in frozen:
        process.send_signal(signal.SIGSTOP)
    return frozen


def restarted_within_the_bound(jobs: Jobs, frozen_at: float) -> None:
    wait_for(
        lambda: jobs.status(JOB).get("restartHistory"), RESTARTED_WITHIN_SECONDS, interval=1, what="the stall restart"
    )
    assert time.monotonic() - frozen_at <= RESTARTED_WITHIN_SECONDS


def test_a_frozen_worker_stalls_its_peers_collective_which_times_out_and_the_gang_restarts_in_place(
    jobs, runs, operator, node, tiny_assets
):
    """One rank frozen: its peer waits in the next collective, which times out at half the deadline
    (FINETUNE_COLLECTIVE_TIMEOUT), so the pods themselves restart the gang, in place, as Stalled."""
    policy = {"maxRestarts": 1, "backoffSeconds": 0, "progressDeadlineSeconds": DEADLINE_SECONDS}
    run_job(jobs, cluster_spec(tiny_assets, restartPolicy=policy))
    first_checkpoint(runs / JOB)
    uids = {p.metadata.name: p.metadata.uid for p in jobs.pods(JOB)}
    freeze(jobs, node, (1,))
    restarted_within_the_bound(jobs, time.monotonic())
    status = finish(jobs, node, "Succeeded")

    assert status["restarts"] == 1
    record = status["restartHistory"][0]
    assert (record["kind"], record["reason"], record["exitCode"]) == ("InPlace", "Stalled", 3), record
    assert f"a collective waited {DEADLINE_SECONDS // 2} s" in record["message"], record
    assert {p.metadata.name: p.metadata.uid for p in jobs.pods(JOB)} == uids  # no pod was made again
    assert metrics(runs / JOB)["global_step"] == TOTAL_STEPS


def test_a_frozen_gang_is_restarted_as_stalled_under_the_progress_deadline(jobs, runs, operator, node, tiny_assets):
    """Every rank frozen (nobody waits in a collective to notice): the operator's progress deadline does."""
    policy = {"maxRestarts": 1, "backoffSeconds": 0, "progressDeadlineSeconds": DEADLINE_SECONDS}
    run_job(jobs, cluster_spec(tiny_assets, restartPolicy=policy))
    first_checkpoint(runs / JOB)
    freeze(jobs, node, (0, 1))
    restarted_within_the_bound(jobs, time.monotonic())
    status = finish(jobs, node, "Succeeded")

    assert status["restarts"] == 1
    record = status["restartHistory"][0]
    assert (record["kind"], record["reason"]) == ("Stall", "Stalled"), record
    assert f"progressDeadlineSeconds={DEADLINE_SECONDS}" in record["message"] and "since" in record["message"]
    assert "Stalled" in describe(jobs)
    assert metrics(runs / JOB)["global_step"] == TOTAL_STEPS


def test_a_frozen_worker_without_a_deadline_is_left_running(jobs, runs, operator, node, tiny_assets):
    policy = {"maxRestarts": 1, "backoffSeconds": 0, "progressDeadlineSeconds": 0}
    run_job(jobs, cluster_spec(tiny_assets, restartPolicy=policy))
    first_checkpoint(runs / JOB)
    (trainer,) = freeze(jobs, node, (1,))
    try:
        watched_until = time.monotonic() + WATCH_SECONDS
        while time.monotonic() < watched_until:
            status = jobs.status(JOB)
            assert (status.get("phase"), status.get("restarts", 0)) == ("Running", 0), status
            time.sleep(5)
        assert all(p.metadata.labels[LABEL_ATTEMPT] == "0" for p in jobs.pods(JOB))
    finally:
        trainer.send_signal(signal.SIGCONT)
    finish(jobs, node, "Succeeded")


def test_what_a_killed_worker_printed_last_is_in_describe(jobs, runs, operator, node, tiny_assets):
    run_job(jobs, cluster_spec(tiny_assets))
    first_checkpoint(runs / JOB)
    trainer_process(node, running_worker(jobs, 0, attempt=0)).send_signal(signal.SIGKILL)

    status = finish(jobs, node, "Succeeded")

    record = status["restartHistory"][0]
    assert (record["pod"], record["exitCode"]) == (f"{JOB}-worker-0", 128 + signal.SIGKILL), record
    # SIGKILL leaves no termination message: the kubelet keeps the log's tail instead (FallbackToLogsOnError)
    assert "saved checkpoint" in record["message"], record
    assert "saved checkpoint" in describe(jobs)
    # The whole tail (up to 80 lines; the record keeps 400 characters) outlives the deleted pod, where the
    # restart's Event says: a ConfigMap the operator made, with the operator's own RBAC.
    assert f"kubectl describe configmap {JOB}-failure" in describe(jobs)
    kept = json.loads(kubectl("get", "configmap", f"{JOB}-failure", "-n", jobs.namespace, "-o", "json").stdout)
    tail = kept["data"][f"{JOB}-worker-0"]
    assert "saved checkpoint" in tail and tail.count("\n") > 1 and len(tail) > len(record["message"]), tail
