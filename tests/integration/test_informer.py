"""The operator's pod informer and kube.py's list and watch against the real API server."""

from __future__ import annotations

from typing import Any

import kubernetes
import pytest

from finetune_dev.harness import wait_for
from finetune_operator import kube as operator_kube
from finetune_operator.builders import LABEL_JOB, LABEL_RANK
from finetune_operator.informer import Informer, Tenants, worker_view
from finetune_operator.status import taken_by_disruption, worker_failure


def worker(name: str, job: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {LABEL_JOB: job}},
        "spec": {"containers": [{"name": "trainer", "image": "trainer:1"}]},
    }


@pytest.fixture
def core(kube) -> kubernetes.client.CoreV1Api:
    operator_kube.api_client.cache_clear()  # kube.py's client for this session's cluster
    return kubernetes.client.CoreV1Api(kube.api_client())


def test_the_pod_informer_lists_then_follows_creates_updates_and_deletes(core, namespace):
    core.create_namespaced_pod(namespace, worker("a-worker-0", "a"))
    core.create_namespaced_pod(namespace, {**worker("unlabelled", "a"), "metadata": {"name": "unlabelled"}})
    woken: list[tuple[str, str]] = []
    pods = Informer("Pod", LABEL_JOB, [namespace], worker_view, woken.append)
    pods.start()
    try:

        def indexed() -> list[str]:
            return sorted(p["metadata"]["name"] for p in pods.get((namespace, "a")))

        assert indexed() == ["a-worker-0"]  # listed before start() returns
        assert woken == [(namespace, "a")]
        core.create_namespaced_pod(namespace, worker("a-worker-1", "a"))
        wait_for(lambda: indexed() == ["a-worker-0", "a-worker-1"], 30, what="the created pod indexed")
        core.patch_namespaced_pod("a-worker-1", namespace, {"metadata": {"annotations": {"seen": "yes"}}})
        wait_for(lambda: len(woken) >= 3, 30, what="the update to wake the job")
        core.delete_namespaced_pod("a-worker-0", namespace, grace_period_seconds=0)  # on no node: gone at once
        wait_for(lambda: indexed() == ["a-worker-1"], 30, what="the deleted pod out of the index")
    finally:
        pods.stop()


def test_a_worker_marked_by_a_preemption_and_deleted_before_any_pass_stays_indexed_as_a_disruption(core, namespace):
    """The API server's own sequence (condition DisruptionTarget on the status, then the delete, as the
    scheduler's preemption does), both done before the job's pass could run: the deletion's last state stays
    in the index, so the pass counts a disruption, not a pod deleted for no reason. A pod deleted without the
    mark leaves the index, and a kept one leaves once the operator's delete of it answers 404."""
    for rank in (0, 1):
        pod = worker(f"a-worker-{rank}", "a")
        pod["metadata"]["labels"][LABEL_RANK] = str(rank)
        core.create_namespaced_pod(namespace, pod)
    pods = Informer("Pod", LABEL_JOB, [namespace], worker_view, lambda key: None, keep_deleted=taken_by_disruption)
    pods.start()
    try:
        marked = {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "PreemptionByScheduler",
            "message": "Kubernetes Scheduler: preempting to accommodate a higher priority pod",
        }
        core.patch_namespaced_pod_status("a-worker-0", namespace, {"status": {"conditions": [marked]}})
        core.delete_namespaced_pod("a-worker-0", namespace, grace_period_seconds=0)
        core.delete_namespaced_pod("a-worker-1", namespace, grace_period_seconds=0)

        def indexed() -> dict[str, dict[str, Any]]:
            return {p["metadata"]["name"]: p for p in pods.get((namespace, "a"))}

        wait_for(lambda: list(indexed()) == ["a-worker-0"], 30, what="the unmarked pod out, the marked one kept")
        failure = worker_failure(indexed()["a-worker-0"])
        assert failure is not None and failure.taken_by == "the scheduler's preemption", failure
        pods.forget(namespace, [indexed()["a-worker-0"]["metadata"]["uid"]])  # what a 404 on its delete does
        assert indexed() == {}
    finally:
        pods.stop()


def test_tenants_follow_a_namespace_label_through_the_real_watch(core, namespace):
    """The API server's label-selected namespace watch says DELETED when the label goes and ADDED when it comes
    back: the namespace's pods leave the index and come back, without a new Tenants."""
    label = f"finetune.dev/tenant-{namespace[-6:]}"  # this test's own label: no other namespace carries it
    core.create_namespaced_pod(namespace, worker("a-worker-0", "a"))
    woken: list[tuple[str, str]] = []
    ready: list[str] = []
    pods = Informer("Pod", LABEL_JOB, [], worker_view, woken.append)
    tenants = Tenants(f"{label}=true", [pods], ready.append)
    tenants.start()
    try:
        assert not pods.serves(namespace) and ready == []
        core.patch_namespace(namespace, {"metadata": {"labels": {label: "true"}}})
        wait_for(lambda: ready == [namespace], 30, what="the labelled namespace served")
        assert [p["metadata"]["name"] for p in pods.get((namespace, "a"))] == ["a-worker-0"]
        core.patch_namespace(namespace, {"metadata": {"labels": {label: None}}})
        wait_for(lambda: not pods.serves(namespace), 30, what="the unlabelled namespace dropped")
        assert pods.get((namespace, "a")) == []
        core.patch_namespace(namespace, {"metadata": {"labels": {label: "true"}}})
        wait_for(lambda: ready == [namespace, namespace], 30, what="the namespace served again")
        assert [p["metadata"]["name"] for p in pods.get((namespace, "a"))] == ["a-worker-0"]
    finally:
        tenants.stop()
        pods.stop()
