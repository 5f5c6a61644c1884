"""The operator against a real API server: schema refusals, the gang it builds, restarts, outcomes, GC.

No node runs here, so pods stay Pending; a test plays the kubelet by writing pod status.
"""

import json
import urllib.request

import kubernetes
import pytest
from kubernetes.client import ApiException

from finetune_dev.harness import GROUP, PLURAL, VERSION, job_manifest, kubectl, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"workers": 0}, "spec.workers"),
        ({"gpusPerWorker": -1}, "spec.gpusPerWorker"),
        ({"training": {"learningRate": 0}}, "spec.training.learningRate"),
        ({"training": {"precision": "int4"}}, "spec.training.precision"),
        ({"task": "translation"}, "spec.task"),
        ({"dataset": {"path": "/d", "format": "parquet"}}, "spec.dataset.format"),
        ({"dataset": {"format": "alpaca"}}, "spec.dataset.path"),
        ({"lora": {"r": 0}}, "spec.lora.r"),
        ({"lora": {"dropout": 1}}, "spec.lora.dropout"),
        ({"checkpoint": {"intervalSteps": 0}}, "spec.checkpoint.intervalSteps"),
        ({"restartPolicy": {"maxRestarts": -1}}, "spec.restartPolicy.maxRestarts"),
        ({"model": ""}, "spec.model"),
    ],
)
def test_api_server_refuses_bad_specs_naming_the_field(jobs, spec, field):
    with pytest.raises(ApiException) as refused:
        jobs.create(job_manifest("bad", **spec))
    assert refused.value.status == 422
    assert field in refused.value.body


def test_missing_model_is_refused(jobs):
    manifest = job_manifest("bad")
    del manifest["spec"]["model"]
    with pytest.raises(ApiException, match=r"spec\.model"):
        jobs.create(manifest)


def test_kubectl_apply_refuses_zero_workers(kube, namespace, crd):
    import yaml

    manifest = yaml.safe_dump(job_manifest("zero", workers=0))
    result = kubectl("apply", "-n", namespace, "-f", "-", kubeconfig=kube.kubeconfig, input=manifest, check=False)
    assert result.returncode != 0
    assert "spec.workers" in result.stderr


def test_defaults_are_filled_by_the_api_server(jobs):
    created = jobs.create(job_manifest("defaults"))
    spec = created["spec"]
    assert spec["training"]["learningRate"] == 0.0002 and spec["lora"]["r"] == 16
    assert spec["checkpoint"] == {"intervalSteps": 100, "keepLast": 3}


def test_a_job_gets_its_service_config_and_gang(jobs, operator):
    jobs.create(
        job_manifest("gang", workers=3, gpusPerWorker=2, storage={"persistentVolumeClaim": {"claimName": "runs"}})
    )
    pods = jobs.wait_pods("gang", 3)
    job = jobs.get("gang")
    assert [p.metadata.name for p in pods] == ["gang-worker-0", "gang-worker-1", "gang-worker-2"]
    for rank, pod in enumerate(pods):
        env = {e.name: e.value for e in pod.spec.containers[0].env}
        assert env["MASTER_ADDR"] == f"gang-worker-0.gang.{jobs.namespace}.svc"
        assert (env["MASTER_PORT"], env["WORLD_SIZE"], env["NNODES"], env["NODE_RANK"], env["NPROC_PER_NODE"]) == (
            "29500",
            "6",
            "3",
            str(rank),
            "2",
        )
        assert env["PET_NNODES"] == "3" and env["PET_MASTER_PORT"] == "29500"
        assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "2"
        assert pod.metadata.labels["finetune.dev/rank"] == str(rank)
        assert pod.metadata.labels["finetune.dev/attempt"] == "0"
        owner = pod.metadata.owner_references[0]
        assert (owner.kind, owner.uid, owner.controller) == ("FineTuneJob", job["metadata"]["uid"], True)
        assert (pod.spec.hostname, pod.spec.subdomain) == (f"gang-worker-{rank}", "gang")
    # the Service and the trainer's progress objects follow the pods, once the operator's pod creates pause
    progress = wait_for(
        lambda: (
            jobs.core.list_namespaced_config_map(jobs.namespace, field_selector="metadata.name=gang-progress").items
        ),
        30,
        what="gang-progress",
    )
    assert progress[0].metadata.owner_references[0].uid == job["metadata"]["uid"]
    service = jobs.core.read_namespaced_service("gang", jobs.namespace)
    assert service.spec.cluster_ip == "None" and service.spec.publish_not_ready_addresses
    binding = kubernetes.client.RbacAuthorizationV1Api(jobs.core.api_client).read_namespaced_role_binding(
        "gang-trainer", jobs.namespace
    )
    assert binding.role_ref.name == "gang-trainer" and binding.subjects[0].name == "gang-trainer"
    config = jobs.core.read_namespaced_config_map("gang-config", jobs.namespace)
    assert "outputDir: /mnt/finetune/output" in config.data["config.yaml"]
    status = jobs.wait_phase("gang", "Pending")
    assert status["workers"] == {"ready": 0, "total": 3, "summary": "0/3"}
    wait_for(lambda: any(e.reason == "GangCreated" for e in jobs.events("gang")), 30, what="a GangCreated Event")


def test_gang_runs_then_succeeds(jobs, operator):
    pods = jobs.start_running("happy")
    status = jobs.status("happy")
    assert status["workers"]["summary"] == "2/2"
    for pod in pods:
        jobs.finish_pod(pod.metadata.name, 0, reason="Completed")
    status = jobs.wait_phase("happy", "Succeeded")
    assert status["completionTime"] and status["restarts"] == 0
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True" and succeeded["reason"] == "AllWorkersSucceeded"


def test_worker_killed_restarts_the_whole_gang(jobs, operator):
    first = jobs.start_running("restart")
    jobs.finish_pod("restart-worker-1", 137, reason="OOMKilled")
    second = jobs.wait_pods("restart", 2, attempt=1)
    assert {p.metadata.uid for p in second}.isdisjoint({p.metadata.uid for p in first})
    status = jobs.status("restart")
    assert status["restarts"] == 1 and status["attempt"] == 1
    record = status["restartHistory"][0]
    assert (record["pod"], record["exitCode"], record["reason"]) == ("restart-worker-1", 137, "OOMKilled")
    event = wait_for(lambda: [e for e in jobs.events("restart") if e.reason == "WorkerFailed"], 30, what="event")
    assert "restart-worker-1" in event[0].message and "137" in event[0].message
    for pod in second:
        jobs.run_pod(pod.metadata.name)
    assert jobs.wait_phase("restart", "Running")["restarts"] == 1
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).read().decode()
    assert f'finetune_jobs_restarted_total{{namespace="{jobs.namespace}",reason="OOMKilled"}} 1.0' in metrics
    assert f'finetune_jobs{{namespace="{jobs.namespace}",phase="Running"}} 1.0' in metrics


def test_exit_code_2_fails_at_once(jobs, operator):
    jobs.create(job_manifest("permanent"))
    jobs.wait_pods("permanent", 2)
    jobs.finish_pod("permanent-worker-0", 2, message="dataset.path /data/train.jsonl: no such file")
    status = jobs.wait_phase("permanent", "Failed")
    assert status["restarts"] == 0
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PermanentError" and "/data/train.jsonl" in failed["message"]

    # The failed worker stays for its logs; the rest of the gang, which would hang, is deleted.
    def remaining():
        return [p.metadata.name for p in jobs.pods("permanent") if not p.metadata.deletion_timestamp]

    wait_for(lambda: remaining() == ["permanent-worker-0"], 30, what="the rest of the gang to be deleted")


def test_restart_limit_fails_the_job(jobs, operator):
    jobs.create(job_manifest("limit", workers=1, restartPolicy={"maxRestarts": 1, "backoffSeconds": 0}))
    jobs.wait_pods("limit", 1, attempt=0)
    jobs.finish_pod("limit-worker-0", 1)
    jobs.wait_pods("limit", 1, attempt=1)
    jobs.finish_pod("limit-worker-0", 1)
    status = jobs.wait_phase("limit", "Failed")
    assert status["restarts"] == 1
    assert next(c for c in status["conditions"] if c["type"] == "Failed")["reason"] == "RestartLimitExceeded"


def test_deleting_a_worker_pod_restarts_the_gang(jobs, operator):
    jobs.start_running("deleted")
    jobs.core.delete_namespaced_pod("deleted-worker-0", jobs.namespace)
    jobs.wait_pods("deleted", 2, attempt=1)
    assert jobs.status("deleted")["restartHistory"][0]["reason"] == "Deleted"


def test_suspend_and_resume(jobs, operator):
    jobs.create(job_manifest("pause"))
    jobs.wait_pods("pause", 2, attempt=0)
    jobs.patch("pause", {"suspend": True})
    jobs.wait_phase("pause", "Suspended")
    wait_for(lambda: not jobs.pods("pause"), 30, what="the gang to be deleted")
    jobs.patch("pause", {"suspend": False})
    jobs.wait_pods("pause", 2, attempt=1)
    assert jobs.status("pause")["restarts"] == 0


def test_reserved_env_fails_naming_the_field(jobs, operator):
    jobs.create(job_manifest("reserved", template={"env": [{"name": "WORLD_SIZE", "value": "9"}]}))
    status = jobs.wait_phase("reserved", "Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.template.env" in failed["message"]
    assert jobs.pods("reserved") == []


def test_ttl_deletes_the_finished_job(jobs, operator):
    jobs.create(job_manifest("ttl", workers=1, ttlSecondsAfterFinished=1))
    pod = jobs.wait_pods("ttl", 1)[0]
    jobs.finish_pod(pod.metadata.name, 0, reason="Completed")
    wait_for(lambda: jobs.get("ttl") is None, 30, what="the job to be deleted after its TTL")


def test_deleting_the_job_deletes_its_pods(jobs, operator):
    jobs.create(job_manifest("gc"))
    jobs.wait_pods("gc", 2)
    jobs.delete("gc")
    wait_for(lambda: not jobs.pods("gc"), 60, what="the garbage collector to delete the pods")

    def owned():
        return jobs.core.list_namespaced_config_map(jobs.namespace, label_selector="finetune.dev/job=gc").items

    wait_for(lambda: not owned(), 30, what="the job's ConfigMaps to be deleted")


def test_operator_restart_mid_job_duplicates_nothing(jobs, operator):
    jobs.create(job_manifest("survive", workers=3))
    pods = jobs.wait_pods("survive", 3)
    for pod in pods[:2]:
        jobs.run_pod(pod.metadata.name)
    operator.kill()
    jobs.run_pod(pods[2].metadata.name)
    operator.start()
    status = jobs.wait_phase("survive", "Running")
    after = jobs.pods("survive")
    assert [p.metadata.uid for p in after] == [p.metadata.uid for p in pods]
    assert status["restarts"] == 0 and status["attempt"] == 0
    operator.kill()
    jobs.finish_pod("survive-worker-1", 1)
    operator.start()
    jobs.wait_pods("survive", 3, attempt=1)
    assert jobs.status("survive")["restarts"] == 1


def test_kubectl_get_and_describe_show_the_story(kube, jobs, operator):
    jobs.start_running("story", workers=1)
    table = kubectl("get", "ftj", "-n", jobs.namespace, kubeconfig=kube.kubeconfig).stdout
    header = table.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "WORKERS", "STEP", "RESTARTS", "REASON", "AGE"]
    assert table.splitlines()[1].split()[:3] == ["story", "Running", "1/1"]
    described = kubectl("describe", "ftj", "story", "-n", jobs.namespace, kubeconfig=kube.kubeconfig).stdout
    assert "AllWorkersRunning" in described and "GangCreated" in described
    assert "Events:" in described


# --- Lifecycle on a real API server, controller-manager and scheduler (issue 10) ------------------------
# No node runs here: with no Node object the scheduler finds pods Unschedulable for real, and a pod bound to
# a Node object that no kubelet serves stays Terminating for real when deleted.


@pytest.fixture
def lost_node(jobs):
    """A Node object no kubelet serves, tainted so that the scheduler never places pods there by itself."""
    name = f"lost-{jobs.namespace}"[:63]
    jobs.core.create_node(
        {
            "metadata": {"name": name},
            "spec": {"taints": [{"key": "finetune.dev/test", "value": "lost", "effect": "NoSchedule"}]},
        }
    )
    yield name
    jobs.core.delete_node(name)


def bind(jobs, pod_name: str, node: str) -> None:
    """What the scheduler does: bind the pod to the node (the Binding's reply is not read)."""
    binding = {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": pod_name},
        "target": {"kind": "Node", "name": node},
    }
    jobs.core.create_namespaced_pod_binding(pod_name, jobs.namespace, binding, _preload_content=False)


def condition(status, type_):
    return next((c for c in status.get("conditions", []) if c["type"] == type_), None)


def blocked_reason(jobs, name):
    return (condition(jobs.status(name), "Blocked") or {}).get("reason")


def test_unschedulable_is_shown_within_seconds_and_spends_no_restart(kube, jobs, operator):
    jobs.create(job_manifest("nowhere", workers=2))
    wait_for(lambda: jobs.status("nowhere").get("reason") == "Unschedulable", 30, what="reason Unschedulable")
    blocked = condition(jobs.status("nowhere"), "Blocked")
    assert blocked["status"] == "True" and "node" in blocked["message"]  # the scheduler's words
    table = kubectl("get", "ftj", "nowhere", "-n", jobs.namespace, kubeconfig=kube.kubeconfig).stdout
    assert "Unschedulable" in table.splitlines()[1].split()
    wait_for(lambda: [e for e in jobs.events("nowhere") if e.reason == "Unschedulable"], 30, what="an Event")
    status = jobs.status("nowhere")
    assert status["restarts"] == 0 and status.get("startupRetries", 0) == 0 and status["attempt"] == 0


def test_creation_refused_by_a_quota_is_shown_and_retried_until_it_passes(jobs, operator):
    quota = {"metadata": {"name": "pods"}, "spec": {"hard": {"pods": "1"}}}
    jobs.core.create_namespaced_resource_quota(jobs.namespace, quota)
    wait_for(
        lambda: (jobs.core.read_namespaced_resource_quota("pods", jobs.namespace).status.hard or {}).get("pods"),
        30,
        what="the quota controller to count the namespace",
    )
    jobs.create(job_manifest("quota", workers=2))
    wait_for(lambda: blocked_reason(jobs, "quota") == "Forbidden", 30, what="reason Forbidden")
    blocked = condition(jobs.status("quota"), "Blocked")
    assert "exceeded quota" in blocked["message"] and jobs.status("quota")["reason"] == "Forbidden"
    wait_for(lambda: [e for e in jobs.events("quota") if e.reason == "Forbidden"], 30, what="a Forbidden Event")
    assert len(jobs.pods("quota")) == 1
    jobs.core.delete_namespaced_resource_quota("pods", jobs.namespace)
    jobs.wait_pods("quota", 2)
    wait_for(lambda: blocked_reason(jobs, "quota") != "Forbidden", 30, what="the refusal to clear")
    assert jobs.status("quota")["restarts"] == 0


def test_a_services_quota_refusing_the_gangs_service_is_shown_and_retried(jobs, operator):
    quota = {"metadata": {"name": "services"}, "spec": {"hard": {"services": "0"}}}
    jobs.core.create_namespaced_resource_quota(jobs.namespace, quota)
    counted = lambda: jobs.core.read_namespaced_resource_quota("services", jobs.namespace).status.hard  # noqa: E731
    wait_for(counted, 30, what="the quota controller to count the namespace")
    jobs.create(job_manifest("svc", workers=2))
    wait_for(lambda: blocked_reason(jobs, "svc") == "Forbidden", 30, what="reason Forbidden")
    blocked = condition(jobs.status("svc"), "Blocked")
    assert "Service svc" in blocked["message"] and "exceeded quota" in blocked["message"]
    wait_for(lambda: [e for e in jobs.events("svc") if e.reason == "Forbidden"], 30, what="a Forbidden Event")
    jobs.core.delete_namespaced_resource_quota("services", jobs.namespace)
    wait_for(lambda: blocked_reason(jobs, "svc") != "Forbidden", 60, what="the refusal to clear")
    assert jobs.core.read_namespaced_service("svc", jobs.namespace).spec.cluster_ip == "None"
    assert jobs.status("svc")["restarts"] == 0 and len(jobs.pods("svc")) == 2


def test_workers_edit_is_refused_and_the_job_still_succeeds(jobs, operator):
    pods = jobs.start_running("resize", workers=2)
    assert "acceptedSpec" not in jobs.status("resize") and _accepted_copy(jobs, "resize")["workers"] == 2
    jobs.patch("resize", {"workers": 1})
    refused = wait_for(lambda: condition(jobs.status("resize"), "EditRefused"), 30, what="EditRefused")
    assert refused["status"] == "True" and "spec.workers" in refused["message"]
    assert jobs.status("resize")["observedGeneration"] == 1 and jobs.status("resize")["acceptedSpec"]["workers"] == 2
    wait_for(lambda: [e for e in jobs.events("resize") if e.reason == "SpecEditRefused"], 30, what="an Event")
    jobs.patch("resize", {"workers": 2, "activeDeadlineSeconds": 3600})  # undone, and a field that may change
    wait_for(lambda: jobs.status("resize").get("observedGeneration") == 3, 30, what="the edit to be accepted")
    assert "acceptedSpec" not in jobs.status("resize")
    assert _accepted_copy(jobs, "resize")["activeDeadlineSeconds"] == 3600
    for pod in pods:
        jobs.finish_pod(pod.metadata.name, 0, reason="Completed")
    status = jobs.wait_phase("resize", "Succeeded")
    assert status["restarts"] == 0


def _accepted_copy(jobs, name):
    """The accepted spec's durable copy: the annotation on the job's trainer ConfigMap."""
    annotations = jobs.core.read_namespaced_config_map(f"{name}-config", jobs.namespace).metadata.annotations or {}
    copy = annotations.get("finetune.dev/accepted-spec")
    return None if copy is None else json.loads(copy)


def test_delete_and_reapply_while_running_counts_no_restart_and_succeeds(jobs, operator, lost_node):
    jobs.create(job_manifest("again", workers=2))
    old = jobs.wait_pods("again", 2)
    for pod in old:
        bind(jobs, pod.metadata.name, lost_node)
        jobs.run_pod(pod.metadata.name)
    jobs.wait_phase("again", "Running")
    jobs.delete("again")  # the old pods stay Terminating: no kubelet confirms
    wait_for(lambda: jobs.get("again") is None, 30, what="the old job to go")
    jobs.create(job_manifest("again", workers=2))
    wait_for(lambda: jobs.status("again").get("reason") == "WaitingForPredecessor", 60, what="the wait to be shown")
    for pod in old:  # what the kubelet would do once the trainers stopped
        jobs.core.delete_namespaced_pod(pod.metadata.name, jobs.namespace, grace_period_seconds=0)
    new = jobs.wait_pods("again", 2)
    uid = jobs.get("again")["metadata"]["uid"]
    assert {p.metadata.owner_references[0].uid for p in new} == {uid}
    config = wait_for(lambda: _config_map(jobs, "again-config"), 30, what="the new job's ConfigMap")
    assert config.metadata.owner_references[0].uid == uid  # replaced, not reused
    for pod in new:
        jobs.run_pod(pod.metadata.name)
    jobs.wait_phase("again", "Running")
    for pod in new:
        jobs.finish_pod(pod.metadata.name, 0, reason="Completed")
    status = jobs.wait_phase("again", "Succeeded")
    assert status["restarts"] == 0 and status.get("restartHistory", []) == []


def _config_map(jobs, name):
    try:
        found = jobs.core.read_namespaced_config_map(name, jobs.namespace)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    refs = found.metadata.owner_references or []
    return found if refs and refs[0].uid == jobs.get("again")["metadata"]["uid"] else None


def test_a_pod_stuck_terminating_is_force_deleted_and_a_finalizer_is_named(jobs, operator, lost_node):
    jobs.create(job_manifest("stuck", workers=2, restartPolicy={"maxRestarts": 3, "backoffSeconds": 0}))
    pods = jobs.wait_pods("stuck", 2, attempt=0)
    for pod in pods:
        bind(jobs, pod.metadata.name, lost_node)
        jobs.run_pod(pod.metadata.name)
    jobs.wait_phase("stuck", "Running")
    jobs.core.patch_namespaced_pod("stuck-worker-1", jobs.namespace, {"metadata": {"finalizers": ["example.com/hold"]}})
    # A drain with a short grace period: the node's kubelet is gone, so both pods stay Terminating.
    for pod in pods:
        jobs.core.delete_namespaced_pod(pod.metadata.name, jobs.namespace, grace_period_seconds=1)
    wait_for(lambda: jobs.status("stuck").get("restarts") == 1, 30, what="the gang restart")
    wait_for(lambda: [e for e in jobs.events("stuck") if e.reason == "ForceDeleted"], 90, what="a ForceDeleted Event")
    held = wait_for(
        lambda: blocked_reason(jobs, "stuck") == "PodHeldByFinalizer" and condition(jobs.status("stuck"), "Blocked"),
        120,
        what="the finalizer to be named",
    )
    assert "example.com/hold" in held["message"]
    holder = jobs.core.read_namespaced_pod("stuck-worker-1", jobs.namespace)
    assert holder.metadata.finalizers == ["example.com/hold"]  # never stripped by the operator
    jobs.core.patch_namespaced_pod("stuck-worker-1", jobs.namespace, {"metadata": {"finalizers": None}})
    jobs.wait_pods("stuck", 2, attempt=1)
    assert jobs.status("stuck")["restarts"] == 1


def test_an_operator_upgraded_mid_job_takes_over_its_gang(jobs, operator):
    pods = jobs.start_running("upgrade", workers=2)
    operator.stop()  # as a Deployment rollout stops the old replica
    # The previous version kept the accepted spec in the status, no copy of it, and wrote no reason or startupRetries.
    spec = jobs.get("upgrade")["spec"]
    body = {"status": {"acceptedSpec": spec, "reason": None, "startupRetries": None}}
    jobs.custom.patch_namespaced_custom_object_status(GROUP, VERSION, jobs.namespace, PLURAL, "upgrade", body)
    uncopied = {"metadata": {"annotations": {"finetune.dev/accepted-spec": None}}}
    jobs.core.patch_namespaced_config_map("upgrade-config", jobs.namespace, uncopied)
    assert "startupRetries" not in jobs.status("upgrade") and _accepted_copy(jobs, "upgrade") is None
    operator.start()
    wait_for(lambda: "startupRetries" in jobs.status("upgrade"), 60, what="the new operator to take the job over")
    assert "acceptedSpec" not in jobs.status("upgrade") and _accepted_copy(jobs, "upgrade")["workers"] == 2
    status = jobs.status("upgrade")
    assert (status["phase"], status["restarts"], status["attempt"]) == ("Running", 0, 0)
    assert [p.metadata.uid for p in jobs.pods("upgrade")] == [p.metadata.uid for p in pods]
    for pod in pods:
        jobs.finish_pod(pod.metadata.name, 0, reason="Completed")
    assert jobs.wait_phase("upgrade", "Succeeded")["restarts"] == 0
