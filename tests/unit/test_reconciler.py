"""The reconciler against an in-memory API server (fake_kube): every lifecycle scenario, no cluster."""

from __future__ import annotations

import copy
import json

import kopf
import pytest

from finetune_operator import kube
from finetune_operator.builders import ACCEPTED_SPEC_ANNOTATION, LABEL_ATTEMPT
from finetune_operator.reconciler import (
    COMPANIONS_SECONDS,
    EXPECTATION_SECONDS,
    Expectations,
    Freshness,
    Outcome,
    reconcile_job,
)
from finetune_operator.status import DEPARTED, rfc3339
from finetune_trainer.contract import ProgressReport

from .fake_kube import NAMESPACE, FakeKube, Operator

CLAIM = {"persistentVolumeClaim": {"claimName": "runs"}}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeKube:
    api = FakeKube()
    names = ("get_job", "patch_job_status", "delete_job", "create", "delete_pod", "owner_uids", "delete", "post_event")
    names += ("get", "patch")
    for name in names:
        monkeypatch.setattr(kube, name, getattr(api, name))
    monkeypatch.setattr(kube, "when_pods_pause", lambda call: call())  # no pod creates to pause for here
    return api


@pytest.fixture
def operator(fake: FakeKube) -> Operator:
    return Operator(fake)


def names(pods):
    return [p["metadata"]["name"] for p in pods]


def start(fake: FakeKube, operator: Operator, name: str = "j", **spec) -> dict:
    """Apply a job and run its gang: Running."""
    fake.apply_job(name, **spec)
    operator.settle(name)
    for pod in fake.pods(name):
        fake.run(pod["metadata"]["name"])
    operator.settle(name)
    assert fake.status(name)["phase"] == "Running"
    return fake.job(name)


def accepted_copy(fake: FakeKube, name: str = "j") -> dict | None:
    """The accepted spec's durable copy: the annotation on the job's trainer ConfigMap."""
    annotation = fake.config_map(f"{name}-config")["metadata"].get("annotations", {}).get(ACCEPTED_SPEC_ANNOTATION)
    return None if annotation is None else json.loads(annotation)


def finish_all(fake: FakeKube, name: str, code: int = 0) -> None:
    for pod in fake.pods(name):
        if not pod["metadata"].get("deletionTimestamp"):
            fake.finish(pod["metadata"]["name"], code)


# --- 1. ownership by uid ---------------------------------------------------------------------------------


def test_delete_and_reapply_while_running_counts_no_restart_and_succeeds(fake, operator):
    old = start(fake, operator, storage=CLAIM)
    fake.report_progress("j", ProgressReport(step=50, last_checkpoint_step=50))
    operator.settle("j")
    fake.user_delete_job("j")  # the old pods are Terminating, the old objects not collected yet
    new = fake.apply_job("j", storage=CLAIM)
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    operator.settle("j")
    status = fake.status("j")
    assert status["restarts"] == 0 and status.get("restartHistory", []) == []
    assert status["phase"] == "Pending" and status["reason"] == "WaitingForPredecessor"
    assert status.get("progress") is None  # the predecessor's progress ConfigMap is not this job's
    fake.kubelet_sync()
    operator.settle("j")
    pods = fake.pods("j")
    assert names(pods) == ["j-worker-0", "j-worker-1"]
    assert {p["metadata"]["ownerReferences"][0]["uid"] for p in pods} == {new["metadata"]["uid"]}
    # The predecessor's ConfigMaps were replaced, not reused with their stale content.
    config = fake.config_map("j-config")
    assert config["metadata"]["ownerReferences"][0]["uid"] == new["metadata"]["uid"]
    for pod in pods:
        fake.run(pod["metadata"]["name"])
    operator.settle("j")
    finish_all(fake, "j")
    operator.settle("j")
    status = fake.status("j")
    assert (status["phase"], status["restarts"]) == ("Succeeded", 0)


def test_a_predecessors_succeeded_pods_do_not_finish_the_new_job(fake, operator):
    start(fake, operator)
    finish_all(fake, "j")
    fake.user_delete_job("j")  # Succeeded pods: the garbage collector has not got to them yet
    fake.apply_job("j")
    operator.settle("j")
    assert fake.status("j")["phase"] == "Pending"
    fake.kubelet_sync()
    operator.settle("j")
    assert [p["status"]["phase"] for p in fake.pods("j")] == ["Pending", "Pending"]
    assert fake.status("j")["phase"] == "Pending"


def test_a_pod_with_the_jobs_name_but_no_owner_blocks_and_says_so(fake, operator):
    fake.apply_job("j", workers=1)
    fake.objects[("Pod", "ml", "j-worker-0")] = {
        "kind": "Pod",
        "metadata": {"name": "j-worker-0", "namespace": "ml", "uid": "someone", "labels": {"finetune.dev/job": "j"}},
        "spec": {},
        "status": {"phase": "Running"},
    }
    operator.settle("j")
    assert fake.condition("j", "Blocked")["reason"] == "PodNotOwned"
    assert fake.pod("j-worker-0")["metadata"]["uid"] == "someone"  # never deleted: not ours


# --- 2. spec-edit policy ---------------------------------------------------------------------------------


def test_an_invalid_edit_is_refused_and_the_gang_carries_on(fake, operator):
    start(fake, operator)
    uids = [p["metadata"]["uid"] for p in fake.pods("j")]
    fake.edit_job("j", template={"env": [{"name": "MASTER_PORT", "value": "1"}]})
    operator.settle("j")
    status = fake.status("j")
    assert status["phase"] == "Running" and status["observedGeneration"] == 1
    assert status["acceptedSpec"] == accepted_copy(fake)  # the unreadable spec fell back to the copy
    refused = fake.condition("j", "EditRefused")
    assert refused["status"] == "True" and "spec.template.env" in refused["message"]
    assert operator.reasons().count("SpecEditRefused") == 1
    assert [p["metadata"]["uid"] for p in fake.pods("j")] == uids
    finish_all(fake, "j")
    operator.settle("j")
    assert fake.status("j")["phase"] == "Succeeded"


def test_an_unreadable_job_fails_with_its_gang_stopped_and_ttl_applies(fake, operator):
    start(fake, operator, ttlSecondsAfterFinished=60)
    job = fake.job("j")
    job["spec"]["template"] = {"env": [{"name": "MASTER_PORT", "value": "1"}]}
    job["status"]["acceptedSpec"] = {"model": "org/base", "futureField": 1}  # a newer version's object
    operator.settle("j")
    status = fake.status("j")
    assert status["phase"] == "Failed" and status["reason"] == "InvalidSpec"
    assert "spec.template.env" in fake.condition("j", "Failed")["message"]
    assert all(p["metadata"].get("deletionTimestamp") for p in fake.pods("j"))
    fake.tick(61)
    operator.settle("j")
    assert fake.job("j") is None


def test_workers_edit_is_refused_and_the_job_still_succeeds(fake, operator):
    start(fake, operator, workers=4)
    fake.edit_job("j", workers=2)
    operator.settle("j")
    assert "spec.workers" in fake.condition("j", "EditRefused")["message"]
    assert fake.status("j")["reason"] == "SpecEditRefused"
    finish_all(fake, "j")
    operator.settle("j")
    assert (fake.status("j")["phase"], fake.status("j")["restarts"]) == ("Succeeded", 0)


def test_growing_workers_counts_no_restart(fake, operator):
    start(fake, operator, workers=2)
    fake.edit_job("j", workers=4)
    operator.settle("j")
    status = fake.status("j")
    assert (status["phase"], status["restarts"], len(fake.pods("j"))) == ("Running", 0, 2)


def test_learning_rate_edit_is_refused_and_observed_generation_stays(fake, operator):
    start(fake, operator)
    running = fake.job("j")["spec"]
    assert "acceptedSpec" not in fake.status("j") and accepted_copy(fake) == running  # the spec is not shown twice
    fake.edit_job("j", training={"learningRate": 0.1})
    operator.settle("j")
    assert fake.status("j")["observedGeneration"] == 1
    assert "spec.training.learningRate" in fake.condition("j", "EditRefused")["message"]
    assert fake.status("j")["acceptedSpec"] == running  # shown while the spec differs from what runs
    fake.edit_job("j", training={"learningRate": 0.0002})  # reverted: accepted again
    operator.settle("j")
    assert fake.status("j")["observedGeneration"] == 3
    assert fake.condition("j", "EditRefused")["status"] == "False"
    assert "acceptedSpec" not in fake.status("j") and accepted_copy(fake) == running


def test_a_job_no_gang_was_made_for_takes_any_edit(fake, operator):
    fake.apply_job("j", suspend=True)
    operator.settle("j")
    assert fake.config_map("j-config") is None  # nothing ran on any spec yet
    fake.edit_job("j", workers=4)
    operator.settle("j")
    assert fake.status("j")["observedGeneration"] == 2 and fake.condition("j", "EditRefused") is None
    fake.edit_job("j", suspend=False)
    operator.settle("j")
    assert len(fake.pods("j")) == 4 and accepted_copy(fake)["workers"] == 4


def test_mutable_fields_are_acted_on(fake, operator):
    start(fake, operator)
    fake.edit_job("j", restartPolicy={"maxRestarts": 0}, activeDeadlineSeconds=3600)
    operator.settle("j")
    status = fake.status("j")
    assert status["observedGeneration"] == 2 and "acceptedSpec" not in status
    assert accepted_copy(fake)["restartPolicy"]["maxRestarts"] == 0
    fake.finish("j-worker-0", 1)
    operator.settle("j")
    assert fake.condition("j", "Failed")["reason"] == "RestartLimitExceeded"


# --- 3. stuck gangs: visible and bounded -----------------------------------------------------------------


def test_unschedulable_is_shown_and_spends_nothing_while_no_pod_holds_a_node(fake, operator):
    fake.apply_job("j")
    operator.settle("j")
    for pod in fake.pods("j"):
        fake.unschedulable(pod["metadata"]["name"])
    operator.settle("j")
    blocked = fake.condition("j", "Blocked")
    assert blocked["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in blocked["message"]
    assert "Unschedulable" in operator.reasons()
    fake.tick(15 * 60)
    outcome = operator.settle("j")
    status = fake.status("j")
    assert (status["restarts"], status.get("startupRetries", 0), status["attempt"]) == (0, 0, 0)
    assert outcome.requeue_after is None  # held by the scheduler or a queue: no timer, no requests


def test_unschedulable_during_restarting_is_shown(fake, operator):
    start(fake, operator)
    fake.finish("j-worker-1", 1)
    operator.settle("j")
    fake.kubelet_sync()
    fake.tick(10)
    operator.settle("j")
    fake.unschedulable("j-worker-0")
    operator.settle("j")
    assert fake.status("j")["phase"] == "Restarting"
    assert fake.condition("j", "Blocked")["reason"] == "Unschedulable"


@pytest.mark.parametrize("phase_after", ["Running", "Restarting"])
def test_image_pull_errors_are_shown_in_any_phase(fake, operator, phase_after):
    start(fake, operator)
    if phase_after == "Restarting":
        fake.finish("j-worker-1", 1)
        operator.settle("j")
        fake.kubelet_sync()
        fake.tick(10)
        operator.settle("j")
        fake.bind("j-worker-0")
    fake.waiting("j-worker-0", "ImagePullBackOff", 'Back-off pulling image "trainer:1"')
    operator.settle("j")
    assert fake.condition("j", "Blocked")["reason"] == "ImagePullBackOff"
    assert fake.status("j")["reason"] == "ImagePullBackOff"


def test_stuck_container_creating_is_shown(fake, operator):
    fake.apply_job("j")
    operator.settle("j")
    for pod in fake.pods("j"):
        fake.bind(pod["metadata"]["name"])
        fake.waiting(pod["metadata"]["name"], "ContainerCreating")
    outcome = operator.settle("j")
    # an image pull under way is progress: no startup timer, a pass comes back to report a long one
    assert fake.condition("j", "Blocked") is None and outcome.requeue_after == 120
    fake.tick(150)
    operator.settle("j")
    assert fake.condition("j", "Blocked")["reason"] == "ContainerCreating"


def test_a_partly_scheduled_gang_is_retried_without_spending_restarts(fake, operator):
    fake.apply_job("j", restartPolicy={"maxRestarts": 0, "backoffSeconds": 5})
    operator.settle("j")
    fake.run("j-worker-0")
    fake.unschedulable("j-worker-1")
    outcome = operator.settle("j")
    assert outcome.requeue_after == 300  # startupTimeoutSeconds' default
    fake.tick(300)
    operator.settle("j")
    status = fake.status("j")
    assert (status["restarts"], status["startupRetries"], status["attempt"]) == (0, 1, 1)
    assert fake.condition("j", "Blocked")["reason"] == "StartupTimeout"
    assert "Unschedulable" in fake.condition("j", "Blocked")["message"]
    fake.kubelet_sync()
    fake.tick(5)
    operator.settle("j")
    assert [p["metadata"]["labels"]["finetune.dev/attempt"] for p in fake.pods("j")] == ["1", "1"]


def test_rank_0_giving_up_on_an_unschedulable_peer_spends_no_restart(fake, operator):
    fake.apply_job("j", restartPolicy={"maxRestarts": 0})
    operator.settle("j")
    fake.run("j-worker-0")
    fake.unschedulable("j-worker-1")
    operator.settle("j")
    fake.finish("j-worker-0", 1, message="gave up waiting for rank 0 peers")
    operator.settle("j")
    status = fake.status("j")
    assert status["phase"] != "Failed" and (status["restarts"], status["startupRetries"]) == (0, 1)


def test_startup_timeout_is_a_spec_field(fake, operator):
    fake.apply_job("j", startupTimeoutSeconds=30)
    operator.settle("j")
    fake.run("j-worker-0")
    fake.unschedulable("j-worker-1")
    assert operator.settle("j").requeue_after == 30


def test_creation_refused_with_403_backs_off_and_recovers(fake, operator):
    fake.refuse_creates["Pod"] = (403, "Forbidden", "exceeded quota: gpu, requested: pods=1, limited: pods=0")
    fake.apply_job("j")
    operator.reconcile("j")
    operator.reconcile("j")
    blocked = fake.condition("j", "Blocked")
    assert blocked["reason"] == "Forbidden" and "exceeded quota" in blocked["message"]
    assert fake.status("j")["reason"] == "Forbidden"
    assert len(operator.errors) == 2 and isinstance(operator.errors[0], kube.CreationRefused)
    assert operator.reasons().count("Forbidden") == 1  # one Event, not one per retry
    del fake.refuse_creates["Pod"]
    operator.settle("j")
    assert len(fake.pods("j")) == 2 and fake.condition("j", "Blocked")["status"] == "False"


def reject_creating(name: str, fake: FakeKube, monkeypatch: pytest.MonkeyPatch) -> None:
    """The API server refuses that pod as invalid (422); every other create goes through."""
    real_create = fake.create

    def reject(obj):
        if obj["metadata"]["name"] == name:
            raise kube.ObjectRejected(f"Pod {name}: spec.containers[0].resources: Invalid value")
        return real_create(obj)

    monkeypatch.setattr(kube, "create", reject)


def test_creation_rejected_with_422_fails_and_stops_the_pods_made(fake, operator, monkeypatch):
    fake.apply_job("j")
    reject_creating("j-worker-1", fake, monkeypatch)
    operator.settle("j")
    assert fake.status("j")["phase"] == "Failed"
    assert "resources" in fake.condition("j", "Failed")["message"]
    assert fake.pods("j") == []  # worker-0, made in the same pass, is stopped


def test_stuck_terminating_pod_is_force_deleted_with_an_event(fake, operator):
    start(fake, operator)
    fake.lost_nodes.add("node-1")
    fake.finish("j-worker-1", 1)
    operator.settle("j")
    assert fake.pod("j-worker-0")["metadata"]["deletionTimestamp"]
    fake.tick(60 + 29)
    assert operator.settle("j").requeue_after == 1
    fake.tick(1)
    operator.settle("j")
    assert "ForceDeleted" in operator.reasons()
    assert any(r.startswith("DELETE Pod j-worker-0 grace=0") for r in fake.requests)
    assert [p["metadata"]["labels"]["finetune.dev/attempt"] for p in fake.pods("j")] == ["1", "1"]


def test_a_finalizer_holding_a_pod_is_named_and_never_stripped(fake, operator):
    start(fake, operator)
    fake.lost_nodes.add("node-1")
    fake.pod("j-worker-0")["metadata"]["finalizers"] = ["example.com/protect"]
    fake.finish("j-worker-1", 1)
    operator.settle("j")
    fake.tick(120)
    operator.settle("j")
    blocked = fake.condition("j", "Blocked")
    assert blocked["reason"] == "PodHeldByFinalizer" and "example.com/protect" in blocked["message"]
    assert fake.pod("j-worker-0")["metadata"]["finalizers"] == ["example.com/protect"]


def test_a_worker_preempted_and_gone_before_a_pass_is_a_disruption_read_once(fake, operator):
    """The scheduler marks worker 1 and deletes it; the pass first runs after it is gone, from the last state
    the informer kept (DEPARTED): a disruption, no restart spent, the new gang made without waiting for it,
    and the kept state forgotten once read."""
    start(fake, operator, restartPolicy={"maxRestarts": 0, "backoffSeconds": 0})
    taken = fake.pod("j-worker-1")
    taken["status"].setdefault("conditions", []).append(
        {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
    )
    taken["metadata"]["deletionTimestamp"] = rfc3339(fake.now)
    del fake.objects[("Pod", NAMESPACE, "j-worker-1")]
    operator.stale_index["j-worker-1"] = {**taken, DEPARTED: True}
    operator.settle("j")
    status = fake.status("j")
    assert (status["restarts"], status["disruptions"]) == (0, 1), status
    assert taken["metadata"]["uid"] in operator.ghosts
    fake.kubelet_sync()  # worker 0, deleted by the restart, stops
    operator.settle("j")
    assert [p["metadata"]["labels"]["finetune.dev/attempt"] for p in fake.pods("j")] == ["1", "1"]


def test_a_ghost_in_the_index_cannot_block_the_job(fake, operator):
    start(fake, operator)
    fake.finish("j-worker-1", 1)
    operator.settle("j")
    ghost = fake.pod("j-worker-0")
    operator.stale_index["j-worker-0"] = ghost  # the watch missed its deletion
    fake.kubelet_sync()
    fake.tick(200)
    operator.settle("j")
    assert ghost["metadata"]["uid"] in operator.ghosts
    assert [p["metadata"]["labels"]["finetune.dev/attempt"] for p in fake.pods("j")] == ["1", "1"]


# --- 4. deadlines like a Kubernetes Job ------------------------------------------------------------------


def test_time_suspended_does_not_count_toward_the_deadline(fake, operator):
    start(fake, operator, activeDeadlineSeconds=600)
    fake.tick(300)
    fake.edit_job("j", suspend=True)
    operator.settle("j")
    fake.kubelet_sync()
    fake.tick(3600)
    fake.edit_job("j", suspend=False)
    operator.settle("j")
    status = fake.status("j")
    assert status["phase"] == "Pending" and status["startTime"] == rfc3339(fake.now)  # reset at the resume
    fake.tick(599)
    operator.settle("j")
    assert fake.status("j")["phase"] != "Failed"
    fake.tick(1)
    operator.settle("j")
    assert fake.condition("j", "Failed")["reason"] == "DeadlineExceeded"


# --- 5. honest accounting without storage ----------------------------------------------------------------


def test_a_restart_without_storage_starts_over(fake, operator):
    start(fake, operator)
    fake.tick(30)
    fake.report_progress("j", ProgressReport(step=40, last_checkpoint_step=30, time="2026-01-01T00:00:30Z"))
    operator.settle("j")
    fake.tick(10)
    fake.finish("j-worker-1", 1)
    operator.settle("j")
    status = fake.status("j")
    assert status["stepsLost"] == 40 and status.get("lastCheckpoint") is None
    assert status["restartHistory"][0]["resumedFromStep"] == 0
    assert "from step 0" in fake.condition("j", "Restarting")["message"]


# --- 6. errors keep the pass's events; a failing job never delays the others -----------------------------


def test_an_unexpected_error_keeps_the_passs_events(fake, operator):
    start(fake, operator)
    fake.fail_deletes = True
    fake.finish("j-worker-1", 1)
    outcome = operator.reconcile("j")
    assert outcome.error is not None and "WorkerFailed" in [e.reason for e in outcome.events]
    assert fake.status("j")["restarts"] == 1  # written before acting: the retry does not count it again
    fake.fail_deletes = False
    operator.settle("j")
    assert fake.status("j")["restarts"] == 1


# --- 7. re-apply resumes; 8. upgrades take over --------------------------------------------------------------


def test_reapply_uses_the_same_storage_folder(fake, operator):
    start(fake, operator, storage=CLAIM)
    mount = fake.pod("j-worker-0")["spec"]["containers"][0]["volumeMounts"][1]
    fake.user_delete_job("j")
    fake.kubelet_sync()
    fake.collect_garbage()
    fake.apply_job("j", storage=CLAIM)
    operator.settle("j")
    assert fake.pod("j-worker-0")["spec"]["containers"][0]["volumeMounts"][1] == mount  # same subPath: resumes


def test_an_upgraded_operator_takes_over_a_running_gang(fake, operator):
    start(fake, operator)
    job = fake.job("j")
    for field in ("reason", "startupRetries"):  # a status written by an earlier version
        job["status"].pop(field, None)
    del fake.config_map("j-config")["metadata"]["annotations"]  # which kept no copy of the spec
    uids = [p["metadata"]["uid"] for p in fake.pods("j")]
    fake.tick(3600)
    operator.settle("j")
    status = fake.status("j")
    assert (status["phase"], status["restarts"], status["attempt"]) == ("Running", 0, 0)
    assert status["startupRetries"] == 0 and "acceptedSpec" not in status
    assert [p["metadata"]["uid"] for p in fake.pods("j")] == uids


def test_an_accepted_spec_kept_in_the_status_by_the_previous_version_moves_to_the_copy(fake, operator):
    start(fake, operator)
    job = fake.job("j")
    job["status"]["acceptedSpec"] = copy.deepcopy(job["spec"])  # as the previous version kept it
    del fake.config_map("j-config")["metadata"]["annotations"]
    operator.settle("j")
    assert "acceptedSpec" not in fake.status("j") and accepted_copy(fake) == job["spec"]
    fake.edit_job("j", workers=4)  # judged against the copy
    operator.settle("j")
    assert "spec.workers" in fake.condition("j", "EditRefused")["message"]
    assert fake.status("j")["acceptedSpec"]["workers"] == 2 and len(fake.pods("j")) == 2


def test_a_refused_create_outranks_a_waiting_pod(fake, operator, monkeypatch):
    fake.apply_job("j")
    real_create = fake.create

    def quota(obj):
        if obj["metadata"]["name"] == "j-worker-1":
            raise kube.CreationRefused("Pod j-worker-1: exceeded quota: pods", "Forbidden")
        return real_create(obj)

    monkeypatch.setattr(kube, "create", quota)
    operator.reconcile("j")
    fake.unschedulable("j-worker-0")
    operator.reconcile("j")
    assert fake.status("j")["reason"] == "Forbidden"


# --- the existing scenarios, end to end through the reconciler ----------------------------------------------


def test_happy_path_creates_each_object_once_and_is_idle_while_running(fake, operator):
    start(fake, operator)
    creates = [r for r in fake.requests if r.startswith("CREATE")]
    assert len(creates) == len(set(creates)) == 8  # Service, 2 ConfigMaps, ServiceAccount, Role, RoleBinding, 2 pods
    # the pods right after what they need at creation; the companions after them, the progress ConfigMap last
    assert set(creates[:2]) == {"CREATE ConfigMap j-config", "CREATE ServiceAccount j-trainer"}
    assert set(creates[2:4]) == {"CREATE Pod j-worker-0", "CREATE Pod j-worker-1"}
    assert creates[-1] == "CREATE ConfigMap j-progress"
    # without `bind`, the API server answers a RoleBinding made before its Role with 404
    assert creates.index("CREATE RoleBinding j-trainer") > creates.index("CREATE Role j-trainer")
    assert operator.settle("j").requeue_after is None  # nothing to wait for: no timer, no request
    finish_all(fake, "j")
    operator.settle("j")
    status = fake.status("j")
    assert (status["phase"], status.get("reason")) == ("Succeeded", None)
    assert operator.reasons() == ["GangCreated", "EphemeralStorage", "AllWorkersRunning", "AllWorkersSucceeded"]


def test_failed_companions_are_retried_with_backoff_and_one_event(fake, operator, monkeypatch):
    real_create, failing = fake.create, {"Role"}

    def unavailable(obj):  # not a refusal: the API server failed (a 500)
        if obj["kind"] in failing:
            raise RuntimeError("500 Internal Server Error")
        return real_create(obj)

    monkeypatch.setattr(kube, "create", unavailable)
    fake.apply_job("j")
    operator.settle("j")
    assert names(fake.pods("j")) == ["j-worker-0", "j-worker-1"]  # the pods do not wait for their companions
    assert fake.config_map("j-progress") is None  # made last, so missing: the next pass hands them over again
    assert fake.posted == [
        ("Warning", "CreateFailed", "cannot create the gang's companion objects: 500 Internal Server Error")
    ]
    assert operator.retries == [1.0]
    operator.settle("j")
    assert operator.retries == [1.0]  # backing off: not tried again yet
    fake.tick(1)
    operator.settle("j")
    assert operator.retries == [1.0, 2.0] and len(fake.posted) == 1  # one Event for the whole streak
    failing.clear()
    fake.tick(2)
    operator.settle("j")
    assert fake.config_map("j-progress") is not None and operator.retries == [1.0, 2.0]
    creates = [r for r in fake.requests if r.startswith("CREATE") and "Event" not in r]
    assert creates.count("CREATE Pod j-worker-0") == 1 and creates.count("CREATE ConfigMap j-progress") == 1


def test_a_refused_companion_shows_in_blocked_and_no_gang_is_made_while_it_lasts(fake, operator):
    fake.refuse_creates["Service"] = (403, "Forbidden", "exceeded quota: services")
    fake.apply_job("j", restartPolicy={"backoffSeconds": 1})
    operator.settle("j")
    assert names(fake.pods("j")) == ["j-worker-0", "j-worker-1"]  # made before the Service was refused
    blocked = fake.condition("j", "Blocked")
    assert (blocked["status"], blocked["reason"], fake.status("j")["reason"]) == ("True", "Forbidden", "Forbidden")
    assert "Service j" in blocked["message"] and "exceeded quota: services" in blocked["message"]
    assert operator.reasons().count("Forbidden") == 1
    writes = [r for r in fake.requests if r.startswith("PATCH")]
    for _ in range(3):  # the work queue's retries, with its backoff
        operator.reconcile("j")
    assert isinstance(operator.errors[-1], kube.CreationRefused)
    assert [r for r in fake.requests if r.startswith("PATCH")] == writes  # no write, no Event per retry
    assert operator.reasons().count("Forbidden") == 1
    for pod in fake.pods("j"):  # the gang fails (rank 1 gave up on rank 0's name) and is stopped
        fake.finish(pod["metadata"]["name"], 1)
    for _ in range(3):
        operator.settle("j")
        fake.kubelet_sync()
        fake.tick(5)
    assert fake.pods("j") == []  # not made again while its Service is refused
    assert fake.condition("j", "Blocked")["reason"] == "Forbidden"
    del fake.refuse_creates["Service"]
    operator.settle("j")
    assert len(fake.pods("j")) == 2 and fake.config_map("j-progress") is not None
    assert fake.condition("j", "Blocked")["status"] == "False"


def test_a_restarted_operator_makes_the_companions_its_predecessor_did_not(fake, operator, monkeypatch):
    handed_over = []
    monkeypatch.setattr(kube, "when_pods_pause", handed_over.append)  # the operator stops before they are made
    fake.apply_job("j")
    operator.settle("j")
    assert len(handed_over) == 1  # once, however many passes ran while they waited
    assert names(fake.pods("j")) == ["j-worker-0", "j-worker-1"] and fake.config_map("j-progress") is None
    monkeypatch.setattr(kube, "when_pods_pause", lambda call: call())
    successor = Operator(fake)
    successor.settle("j")
    assert fake.config_map("j-progress") is not None
    assert {"Service", "Role", "RoleBinding"} <= {kind for kind, _, _ in fake.objects}
    assert [p["metadata"]["name"] for p in fake.pods("j")] == ["j-worker-0", "j-worker-1"]  # the same gang


def test_a_failed_worker_restarts_the_gang_once(fake, operator):
    start(fake, operator, restartPolicy={"backoffSeconds": 10})
    fake.finish("j-worker-1", 137, reason="OOMKilled")
    outcome = operator.settle("j")
    assert outcome.requeue_after == 10 and fake.status("j")["restarts"] == 1
    fake.kubelet_sync()
    operator.settle("j")
    assert fake.pods("j") == []  # the backoff is still running
    fake.tick(10)
    operator.settle("j")
    assert [p["metadata"]["labels"]["finetune.dev/attempt"] for p in fake.pods("j")] == ["1", "1"]
    assert fake.status("j")["restarts"] == 1 and fake.status("j")["reason"] == "WorkerFailed"


def test_a_status_conflict_acts_on_nothing(fake, operator, monkeypatch):
    fake.apply_job("j")

    def conflict(*_):
        raise kube.StatusConflict("changed")

    monkeypatch.setattr(kube, "patch_job_status", conflict)
    outcome = operator.reconcile("j")
    assert outcome.requeue_after == 0 and outcome.events == [] and fake.pods("j") == []


def test_an_exit_code_2_fails_at_once_and_stops_the_rest(fake, operator):
    start(fake, operator)
    fake.finish("j-worker-0", 2, message="dataset.path: no such file")
    operator.settle("j")
    assert fake.condition("j", "Failed")["reason"] == "PermanentError"
    assert fake.pod("j-worker-1")["metadata"].get("deletionTimestamp")
    assert fake.status("j")["reason"] == "PermanentError"


def test_suspend_and_resume_make_a_fresh_attempt_without_a_restart(fake, operator):
    start(fake, operator)
    fake.edit_job("j", suspend=True)
    operator.settle("j")
    assert fake.status("j")["phase"] == "Suspended" and fake.status("j")["reason"] == "Suspended"
    fake.kubelet_sync()
    assert fake.pods("j") == [] and operator.settle("j").requeue_after is None  # idle while suspended
    fake.edit_job("j", suspend=False)
    operator.settle("j")
    status = fake.status("j")
    assert (status["phase"], status["attempt"], status["restarts"], status["observedGeneration"]) == (
        "Pending",
        1,
        0,
        3,
    )
    assert [p["metadata"]["labels"]["finetune.dev/attempt"] for p in fake.pods("j")] == ["1", "1"]


def test_ttl_deletes_the_finished_job(fake, operator):
    start(fake, operator, ttlSecondsAfterFinished=30)
    finish_all(fake, "j")
    assert operator.settle("j").requeue_after == 30
    fake.tick(30)
    operator.settle("j")
    assert fake.job("j") is None


# --- a failed attempt's output outlives its pods (issue 24) ----------------------------------------------------

TRACEBACK = 'Traceback (most recent call last):\n  File "train.py", line 9, in <module>\nRuntimeError: boom'


def restart_after(fake: FakeKube, operator: Operator, pod: str, code: int = 1, message: str = TRACEBACK) -> None:
    fake.finish(pod, code, message=message)
    operator.settle("j")
    fake.kubelet_sync()


def test_a_gang_restart_keeps_the_failed_workers_output_whole_before_deleting_them(fake, operator):
    job = start(fake, operator)
    restart_after(fake, operator, "j-worker-1")
    kept = fake.config_map("j-failure")
    assert kept["data"] == {"j-worker-1": TRACEBACK}  # lines and all: the restart record keeps 400 characters
    assert kept["metadata"]["labels"][LABEL_ATTEMPT] == "0"
    assert [ref["uid"] for ref in kept["metadata"]["ownerReferences"]] == [job["metadata"]["uid"]]
    saved, deleted = fake.requests.index("CREATE ConfigMap j-failure"), fake.requests.index("DELETE Pod j-worker-1")
    assert saved < deleted
    assert "kubectl describe configmap j-failure" in fake.condition("j", "Restarting")["message"]
    fake.tick(10)
    operator.settle("j")
    for pod in fake.pods("j"):
        fake.run(pod["metadata"]["name"])
    operator.settle("j")
    restart_after(fake, operator, "j-worker-0", 137, "step 7 of 18")  # the next failure replaces it
    kept = fake.config_map("j-failure")
    assert (kept["data"], kept["metadata"]["labels"][LABEL_ATTEMPT]) == ({"j-worker-0": "step 7 of 18"}, "1")


def test_the_output_not_kept_holds_no_restart(fake, operator):
    start(fake, operator)
    fake.refuse_creates["ConfigMap"] = (403, "Forbidden", "exceeded quota: configmaps")
    restart_after(fake, operator, "j-worker-1")
    assert fake.config_map("j-failure") is None
    assert fake.status("j")["phase"] == "Restarting" and fake.pods("j") == []


def test_a_configmap_of_that_name_not_the_jobs_is_left_alone(fake, operator):
    start(fake, operator)
    theirs = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "j-failure", "namespace": NAMESPACE}}
    fake.create({**theirs, "data": {"mine": "yes"}})
    restart_after(fake, operator, "j-worker-1")
    assert fake.config_map("j-failure")["data"] == {"mine": "yes"}
    assert fake.status("j")["phase"] == "Restarting" and fake.pods("j") == []


# --- the job from the watch index ------------------------------------------------------------------------


def test_a_job_the_watch_keeps_up_with_is_never_read(fake, operator):
    start(fake, operator)
    finish_all(fake, "j")
    operator.settle("j")
    assert fake.status("j")["phase"] == "Succeeded"
    assert not [r for r in fake.requests if r.startswith("GET")]


def test_a_watched_copy_behind_the_operators_own_write_is_read_instead(fake, operator):
    """After a restart the watch may still hold the Running job of the old attempt while the pod index holds
    the new attempt's pods: acting on that copy would delete them as stale. The pass reads the job."""
    start(fake, operator, restartPolicy={"backoffSeconds": 0})
    fake.finish("j-worker-1", 137, reason="OOMKilled")
    operator.reconcile("j")  # Restarting: attempt 1, the old gang deleted
    fake.kubelet_sync()
    for _ in range(3):  # the job watch delivers nothing of this: its copy says Running, attempt 0
        operator.reconcile("j", deliver=False)
    assert operator.watched["j"]["status"]["attempt"] == 0
    pods = fake.pods("j")
    assert [p["metadata"]["labels"]["finetune.dev/attempt"] for p in pods] == ["1", "1"]
    assert not any(p["metadata"].get("deletionTimestamp") for p in pods)
    assert fake.status("j")["restarts"] == 1
    assert "GET FineTuneJob j" in fake.requests


def test_a_stale_copy_writes_nothing_and_so_acts_on_nothing(fake, operator):
    start(fake, operator, restartPolicy={"backoffSeconds": 0})
    stale = copy.deepcopy(fake.job("j"))  # Running, attempt 0
    fake.finish("j-worker-1", 137, reason="OOMKilled")
    operator.settle("j")
    fake.kubelet_sync()
    operator.settle("j")  # a new gang, attempt 1
    assert [p["metadata"]["labels"]["finetune.dev/attempt"] for p in fake.pods("j")] == ["1", "1"]
    outcome = reconcile_job(NAMESPACE, "j", operator.index("j"), [], operator.settings, now=fake.now, body=stale)
    assert outcome.requeue_after == 0 and outcome.reread and outcome.events == []
    assert not any(p["metadata"].get("deletionTimestamp") for p in fake.pods("j"))
    operator.freshness.passed((NAMESPACE, "j"), outcome, stale)
    assert operator.freshness.current((NAMESPACE, "j"), stale) is None  # read it next time


def test_freshness_follows_the_watch_to_the_version_a_pass_ended_on():
    key, freshness = ("ml", "j"), Freshness()
    watched = {"metadata": {"resourceVersion": "5"}}
    assert freshness.current(key, watched) is watched
    assert freshness.current(key, None) is None  # not watched (yet): read it
    written = Outcome({"metadata": {"resourceVersion": "5"}}, [], None, resource_version="7")
    freshness.passed(key, written, watched)
    assert freshness.current(key, watched) is None
    freshness.watched(key, "MODIFIED", {"metadata": {"resourceVersion": "6"}})  # an older event in flight
    assert freshness.current(key, watched) is None
    caught_up = {"metadata": {"resourceVersion": "7"}}
    freshness.watched(key, "MODIFIED", caught_up)
    assert freshness.current(key, caught_up) is caught_up
    freshness.passed(key, written, {"metadata": {"resourceVersion": "8"}})  # newer already: one read heals it
    newer = {"metadata": {"resourceVersion": "8"}}
    freshness.passed(key, Outcome(newer, [], None), newer)
    assert freshness.current(key, newer) is newer
    freshness.passed(key, written, watched)
    freshness.watched(key, "DELETED", {"metadata": {"resourceVersion": "5"}})
    assert freshness.current(key, watched) is watched


def test_freshness_reads_the_version_of_kopfs_watched_bodies():
    """kopf hands handlers a Body (a Mapping, not a dict): the watch catching up must be seen through it."""
    key, freshness = ("ml", "j"), Freshness()
    written = Outcome({"metadata": {"resourceVersion": "5"}}, [], None, resource_version="7")
    freshness.passed(key, written, {"metadata": {"resourceVersion": "5"}})
    caught_up = {"metadata": {"resourceVersion": "7"}}
    freshness.watched(key, "MODIFIED", kopf.Body(caught_up))
    assert freshness.current(key, caught_up) is caught_up


def test_a_pass_reports_the_pods_it_created_not_those_that_were_there(fake, operator):
    fake.apply_job("j")
    first = operator.reconcile("j")
    assert sorted(first.created) == [("j-worker-0", "0"), ("j-worker-1", "0")]
    fake.delete_pod(NAMESPACE, "j-worker-1", None, 0)  # before it was scheduled: made again
    again = operator.reconcile("j")
    assert again.created == [("j-worker-1", "0")]


def test_a_pass_waits_for_the_watch_to_deliver_the_pods_the_last_pass_created():
    key, expectations = ("ml", "j"), Expectations()

    def watched(*pods: tuple[str, str]) -> list[dict]:
        return [{"metadata": {"name": name, "labels": {LABEL_ATTEMPT: attempt}}} for name, attempt in pods]

    assert not expectations.unmet(key, [], now=0.0)  # nothing created: nothing to wait for
    expectations.created(key, [("j-worker-0", "1"), ("j-worker-1", "1")], now=0.0)
    assert expectations.unmet(key, watched(("j-worker-0", "1")), now=0.1)
    assert expectations.unmet(key, watched(("j-worker-0", "1"), ("j-worker-1", "0")), now=0.1)  # an old attempt's
    assert not expectations.unmet(key, watched(("j-worker-0", "1"), ("j-worker-1", "1")), now=0.2)
    assert not expectations.unmet(key, [], now=0.3)  # met once: forgotten
    expectations.created(key, [("j-worker-0", "2")], now=1.0)
    assert expectations.unmet(key, [], now=1.0 + EXPECTATION_SECONDS - 0.1)
    assert not expectations.unmet(key, [], now=1.0 + EXPECTATION_SECONDS)  # a pod the watch never showed


# --- fenced writes and whole status fields (issue 23) --------------------------------------------------------


def test_a_removed_deadline_and_ttl_stay_removed_after_a_refused_edit(fake, operator):
    start(fake, operator, activeDeadlineSeconds=3600, ttlSecondsAfterFinished=600)
    fake.edit_job("j", activeDeadlineSeconds=None, ttlSecondsAfterFinished=None)
    operator.settle("j")
    assert "activeDeadlineSeconds" not in accepted_copy(fake) and "ttlSecondsAfterFinished" not in accepted_copy(fake)
    fake.edit_job("j", workers=4)  # refused: the job falls back to the accepted spec
    operator.settle("j")
    accepted = fake.status("j")["acceptedSpec"]
    assert "activeDeadlineSeconds" not in accepted and "ttlSecondsAfterFinished" not in accepted
    fake.tick(3601)
    operator.settle("j")
    assert fake.status("j")["phase"] == "Running"  # no deadline killed it
    finish_all(fake, "j")
    operator.settle("j")
    fake.tick(601)
    operator.settle("j")
    assert fake.status("j")["phase"] == "Succeeded"  # no TTL deleted it


def test_a_steady_pass_reads_no_accepted_spec_copy(fake, operator):
    start(fake, operator)
    fake.report_progress("j", ProgressReport(step=5))
    fake.requests.clear()
    operator.settle("j")
    assert fake.requests and not [r for r in fake.requests if "ConfigMap j-config" in r]


def test_an_accepted_edit_stopped_before_its_status_write_is_judged_again_the_same(fake, operator, monkeypatch):
    start(fake, operator)
    fake.edit_job("j", activeDeadlineSeconds=60)
    real_write = fake.patch_job_status

    def stopped(*args):
        monkeypatch.setattr(kube, "patch_job_status", real_write)
        raise TimeoutError("the operator stopped here")

    monkeypatch.setattr(kube, "patch_job_status", stopped)
    with pytest.raises(TimeoutError):
        operator.reconcile("j")
    assert accepted_copy(fake)["activeDeadlineSeconds"] == 60 and fake.status("j")["observedGeneration"] == 1
    operator.settle("j")
    status = fake.status("j")
    assert status["observedGeneration"] == 2 and "acceptedSpec" not in status
    assert fake.condition("j", "EditRefused") is None


def test_a_copy_changed_since_it_was_read_is_not_written_over(fake, operator, monkeypatch):
    start(fake, operator)
    fake.edit_job("j", activeDeadlineSeconds=60)
    real_get = fake.get

    def changed_after_read(kind, namespace, name, timeout=None):
        found = real_get(kind, namespace, name)
        if kind == "ConfigMap":
            fake._bump(fake.config_map(name))  # someone wrote it between the read and the patch
        return found

    monkeypatch.setattr(kube, "get", changed_after_read)
    assert operator.reconcile("j").reread and fake.status("j")["observedGeneration"] == 1
    monkeypatch.setattr(kube, "get", real_get)
    operator.settle("j")
    assert fake.status("j")["observedGeneration"] == 2 and accepted_copy(fake)["activeDeadlineSeconds"] == 60


def test_a_ttl_delete_never_deletes_a_new_job_that_took_the_name(fake, operator):
    start(fake, operator, ttlSecondsAfterFinished=0)
    finish_all(fake, "j")
    operator.reconcile("j")  # writes Succeeded; the TTL deletes in the pass after
    finished, pods, progress = copy.deepcopy(fake.job("j")), operator.index("j"), operator.progress("j")
    assert finished["status"]["phase"] == "Succeeded"
    fake.user_delete_job("j")
    new = fake.apply_job("j")
    reconcile_job(NAMESPACE, "j", pods, progress, operator.settings, now=fake.now, body=finished)  # a late pass
    assert any(r == "DELETE FineTuneJob j" for r in fake.requests)
    assert fake.job("j")["metadata"]["uid"] == new["metadata"]["uid"]


def test_a_rejection_meeting_a_changed_job_writes_nothing_and_decides_again(fake, operator, monkeypatch):
    fake.apply_job("j")
    real_create = fake.create

    def reject_after_an_edit(obj):
        if obj["metadata"]["name"] == "j-worker-1":
            fake.edit_job("j", workers=1)  # the user fixes the spec while the pass runs
            raise kube.ObjectRejected("Pod j-worker-1: spec.containers[0].resources: Invalid value")
        return real_create(obj)

    monkeypatch.setattr(kube, "create", reject_after_an_edit)
    outcome = operator.reconcile("j")
    assert outcome.reread and fake.status("j")["phase"] != "Failed"


def test_a_refusal_meeting_a_changed_job_is_not_written_over_it(fake, operator, monkeypatch):
    fake.apply_job("j")
    real_create = fake.create

    def refuse_after_an_edit(obj):
        if obj["kind"] == "Pod":
            fake.edit_job("j", suspend=True)
            raise kube.CreationRefused("Pod j-worker-0: exceeded quota: pods", "Forbidden")
        return real_create(obj)

    monkeypatch.setattr(kube, "create", refuse_after_an_edit)
    outcome = operator.reconcile("j")
    assert outcome.reread and outcome.error is not None
    assert fake.condition("j", "Blocked") is None  # the next pass, on the fresh job, decides again


def test_an_unchanged_status_is_not_written(fake, operator):
    start(fake, operator)
    writes = [r for r in fake.requests if r.startswith("PATCH")]
    operator.reconcile("j")
    assert [r for r in fake.requests if r.startswith("PATCH")] == writes


def test_companions_waiting_for_their_thread_are_not_handed_over_again(fake, operator, monkeypatch):
    handed_over = []
    monkeypatch.setattr(kube, "when_pods_pause", handed_over.append)  # the background pool is busy
    fake.apply_job("j")
    operator.settle("j")
    fake.tick(COMPANIONS_SECONDS + 1)  # past the time they are trusted to be in the making
    operator.reconcile("j")
    assert len(handed_over) == 1  # the first hand-over has not run yet: not a second one
    handed_over[0]()
    assert fake.config_map("j-progress") is not None
