"""Queueing and gang scheduling on a real API server: the PodGroup a gang-scheduled job gets, the labels
Kueue and the coscheduling scheduler read on every worker, and only worker-0 mounting the output claim.

Neither Kueue's webhook nor scheduler-plugins runs here (and 1.20 has no scheduling gates), so the tests
check the objects and labels those components act on. The PodGroup CRD is the project's reduced copy.
"""

from pathlib import Path

import kubernetes
import pytest
from kubernetes.client import ApiException

from finetune_dev.harness import install_crd, job_manifest, wait_for

pytestmark = pytest.mark.integration

POD_GROUP_CRD = Path(__file__).with_name("podgroups.scheduling.x-k8s.io.yaml")


@pytest.fixture(scope="module")
def pod_group_crd(kube):
    install_crd(kube.api_client(), POD_GROUP_CRD)


def test_gang_scheduled_queued_job_on_a_read_write_once_claim(kube, jobs, operator, pod_group_crd):
    manifest = job_manifest(
        "gang",
        workers=3,
        storage={"persistentVolumeClaim": {"claimName": "runs"}},
        gangScheduling={"scheduleTimeoutSeconds": 120},
    )
    manifest["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-queue"}
    created = jobs.create(manifest)
    pods = wait_for(lambda: len(jobs.pods("gang")) == 3 and jobs.pods("gang"), 60, what="the gang's 3 workers")

    group = kubernetes.client.CustomObjectsApi(kube.api_client()).get_namespaced_custom_object(
        "scheduling.x-k8s.io", "v1alpha1", jobs.namespace, "podgroups", "gang"
    )
    assert group["spec"] == {"minMember": 3, "scheduleTimeoutSeconds": 120}
    assert group["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]

    for pod in pods:
        labels, annotations = pod.metadata.labels, pod.metadata.annotations
        assert labels["scheduling.x-k8s.io/pod-group"] == "gang"
        assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert labels["kueue.x-k8s.io/pod-group-name"] == "gang-0"
        assert annotations["kueue.x-k8s.io/retriable-in-group"] == "false"
        assert annotations["kueue.x-k8s.io/pod-group-total-count"] == "3"
        assert pod.spec.scheduler_name == "scheduler-plugins-scheduler"
        claims = [v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim]
        assert claims == (["runs"] if pod.metadata.name == "gang-worker-0" else []), pod.metadata.name


def test_running_without_storage_must_be_stated(jobs):
    manifest = job_manifest("unstated")
    del manifest["spec"]["storage"]
    with pytest.raises(ApiException, match=r"spec\.storage") as refused:
        jobs.create(manifest)
    assert refused.value.status == 422
    manifest["spec"]["storage"] = {"emptyDir": {}}
    assert jobs.create(manifest)["spec"]["storage"] == {"emptyDir": {}}
